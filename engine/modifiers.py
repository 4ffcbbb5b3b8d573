"""Modifiers: what a run puts on a cached pipeline's modules, and takes off again when it ends.

    ORDER = ("lora", "step_cache", "attention", "context_parallel", "compile", "offload")

Each modifier has a name, the bytes it adds, `apply(pipe)` and `remove(pipe)`, and touches only what it put there
(the model to follow: diffusers' `HookRegistry`, where each hook is registered under its own name and removed by
it). One function applies a run's modifiers in ORDER (`apply_all`) and one takes them off in the reverse order
(`remove_all`), after every run: finished, failed, stopped, or before it goes on one rung lower after an
out-of-memory. Why this order:
  - LoRA first: peft replaces linear layers inside the blocks; every later hook wraps the blocks as they will run.
  - the step cache's hooks wrap whole blocks (or attention layers) and must see the LoRA'd layers inside.
  - the attention backend and regional compile change how a block computes; compile captures the backend.
  - context parallel (engine/parallel.py) splits the sequence at the blocks' inputs and gathers it at the output;
    its processors need the backend already chosen (diffusers checks that it supports context parallel).
  - offload last, so its hooks are outermost: a block the step cache skips still passes its offload hook (onload
    and offload stay paired, CUDA streams' prefetch chain intact), and accelerate's root hook (model offload), which
    restores `forward` by assignment, comes off first, before the hooks under it.

A pipeline's components are fingerprinted when they load (`fingerprint`): their hooks (diffusers', accelerate's,
torch's), attention processors and backends, peft layers, compiled forwards, the VAE's tiling flags and FitVideo's
own marks. After a run `PipelineCache.leftovers()` compares every cached component with its load-time
fingerprint; anything left is a bug, listed by the runner, the leak sentinel and the tests. Quantization is not
a modifier: it is part of the cache key (a quantized transformer is another cached model), so its layerwise-casting
hooks are in the load-time fingerprint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

ORDER = ("lora", "step_cache", "attention", "context_parallel", "compile", "offload")


class Modifier(Protocol):
    name: str

    def added_bytes(self) -> int: ...

    def apply(self, pipe) -> None: ...

    def remove(self, pipe) -> None: ...


def apply_all(pipe, modifiers: list[Modifier]) -> None:
    """Apply `modifiers` in ORDER. If one fails, those already on come off again before the error goes on."""
    done: list[Modifier] = []
    try:
        for m in sorted(modifiers, key=lambda m: ORDER.index(m.name)):
            m.apply(pipe)
            done.append(m)
    except BaseException:
        remove_all(pipe, done)
        raise


def remove_all(pipe, modifiers: list[Modifier]) -> None:
    """Take `modifiers` off in the reverse of ORDER; every one is tried, the first failure is raised after."""
    first: BaseException | None = None
    for m in sorted(modifiers, key=lambda m: ORDER.index(m.name), reverse=True):
        try:
            m.remove(pipe)
        except Exception as exc:  # noqa: BLE001  (the others must still come off)
            logger.exception("removing %s failed", m.name)
            first = first or exc
    if first is not None:
        raise first


# --------------------------------------------------------------------------- placement


_VAE_FLAGS = ("use_", "tile_")  # the VAE attributes configure_vae_tiling sets


@dataclass(eq=False)
class Placement:
    """Modifier: the plan's offload rung (with the disk rung) and its VAE tiling (vram_utils.apply_plan).
    `remove`: every offload hook off the pipeline's modules (they stay where they are: resting on the CPU, or on the
    GPU for the `none` rung) and the VAE's tiling attributes back as they were before `apply`."""

    plan: Any  # configs.schema.Plan
    name: str = "offload"
    _vae: tuple[torch.nn.Module, dict] | None = None
    _storage: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def added_bytes(self) -> int:
        return 0

    def apply(self, pipe) -> None:
        import vram_utils

        vae = getattr(pipe, "vae", None)
        if self._vae is None and isinstance(vae, torch.nn.Module):
            self._vae = (vae, {k: v for k, v in vars(vae).items() if k.startswith(_VAE_FLAGS)})
        if self.plan.device == "cpu" and self.plan.offload == "model" and not self.plan.disk_offload:
            self._keep_storage(pipe)
        vram_utils.apply_plan(pipe, self.plan)

    def remove(self, pipe) -> None:
        from vram_utils import remove_all_offload

        remove_all_offload(pipe)
        for tensor, data in self._storage.values():
            if tensor.data is not data:
                tensor.data = data
        self._storage = {}
        if self._vae is not None:
            vae, flags = self._vae
            for k in [k for k in vars(vae) if k.startswith(_VAE_FLAGS) and k not in flags]:
                delattr(vae, k)
            vars(vae).update(flags)
            self._vae = None

    def forget(self, module: torch.nn.Module) -> None:
        """A component about to be freed mid-run (one expert in RAM): its loaded storage must not be kept alive."""
        ids = {id(t) for t in (*module.parameters(), *module.buffers())}
        self._storage = {k: v for k, v in self._storage.items() if k not in ids}

    def _keep_storage(self, pipe) -> None:
        """On the CPU, remember each weight's storage: accelerate's model offload moves weights to the CPU they are
        already on by copying them into new, differently aligned buffers (under inference mode), and the CPU's
        matrix kernels sum in another order on them (4e-7 on tiny-wan's transformer), so the next run on the
        cached model would differ from the same run in a fresh process. `remove` puts the loaded storage back.
        Only model offload copies on the CPU (group and leaf-level offload leave CPU weights where they are); on a
        GPU every rung moves weights into the allocator's aligned blocks, so the rung leaves no trace."""
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for t in (*module.parameters(), *module.buffers()):
                    self._storage.setdefault(id(t), (t, t.data))


# --------------------------------------------------------------------------- a run's modifiers


def for_run(run, plan, step_cache=None) -> list[Modifier]:
    """The modifiers of a resolved run (engine/resolve.py ResolvedRun) on `plan`: its LoRAs, its step cache
    (`step_cache`: the StepCache to use, built by the runner with MagCache's ratios), its attention backend when
    it is not the dispatcher's default, regional compile when asked, and the placement."""
    from engine.attention import AttentionBackend, RegionalCompile
    from engine.lora import Loras

    mods: list[Modifier] = []
    if run.loras:
        mods.append(Loras(run.loras))
    if step_cache is not None:
        mods.append(step_cache)
    if run.attention != "native":
        mods.append(AttentionBackend(run.attention))
    if run.request.context_parallel > 1:
        from engine.parallel import ContextParallel

        mods.append(ContextParallel(run.request.context_parallel, str(plan.device)))
    if run.request.compile:
        mods.append(RegionalCompile(plan.device))
    mods.append(Placement(plan))
    return mods


# --------------------------------------------------------------------------- clean state


def module_state(module: torch.nn.Module) -> dict[str, tuple]:
    """What modifiers change, per submodule that has any of it: hooks (diffusers' by name, accelerate's, torch's),
    the attention processor and its backend, peft layers and adapters, a compiled forward, the VAE's tiling
    attributes, FitVideo's marks (`_fitvideo*`)."""
    out = {}
    for path, m in module.named_modules():
        sig: list[tuple] = []
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            sig.append(("hooks", *registry._hook_order))
        if hasattr(m, "_hf_hook"):
            sig.append(("accelerate hook", type(m._hf_hook).__name__))
        torch_hooks = sorted(_hook_name(h) for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))
        torch_hooks = [h for h in torch_hooks if h not in LIBRARY_HOOKS]
        if torch_hooks:
            sig.append(("torch hooks", *torch_hooks))
        processor = m.__dict__.get("processor")
        if processor is not None:
            sig.append(("processor", type(processor).__name__, str(getattr(processor, "_attention_backend", None))))
        if m.__dict__.get("_compiled_call_impl") is not None:
            sig.append(("compiled",))
        if getattr(m, "peft_config", None):
            sig.append(("adapters", *sorted(m.peft_config)))
        if type(m).__module__.startswith("peft."):
            sig.append(("peft layer", type(m).__name__))
        flags = sorted((k, v) for k, v in vars(m).items() if k.startswith(_VAE_FLAGS) and isinstance(v, (bool, int, float)))
        if flags:
            sig.append(("attributes", *flags))
        marks = sorted(k for k in m.__dict__ if k.startswith("_fitvideo"))
        if marks:
            sig.append(("marks", *marks))
        if sig:
            out[path] = tuple(sig)
    return out


# torch hooks a library puts on its own modules the first time they run, for good (transformers 5 captures the
# hidden states a pipeline asks of the CLIP image encoder this way): part of the model, not of a run
LIBRARY_HOOKS = ("install_output_capuring_hook.<locals>.output_capturing_hook",)


def _hook_name(hook) -> str:
    return getattr(hook, "__qualname__", type(hook).__name__)


def fingerprint(pipe) -> dict[str, dict[str, tuple]]:
    """component -> `module_state` of each of the pipeline's modules (taken when it loads: its clean state)."""
    return {name: module_state(c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def differences(component: str, clean: dict[str, tuple], now: dict[str, tuple]) -> list[str]:
    """What differs between a component's clean state and its state now, one line per submodule."""
    lines = []
    for path in sorted(set(clean) | set(now)):
        before, after = set(clean.get(path, ())), set(now.get(path, ()))
        if before != after:
            where = f"{component}.{path}" if path else component
            added = "; ".join(" ".join(map(str, s)) for s in sorted(after - before, key=str))
            gone = "; ".join(" ".join(map(str, s)) for s in sorted(before - after, key=str))
            lines.append(f"{where}: " + ", ".join(p for p in (f"has {added}" if added else "",
                                                              f"lost {gone}" if gone else "") if p))
    return lines


def pipe_marks(pipe) -> list[str]:
    """Run state left on the pipeline object itself (our marks, model offload's hook chain)."""
    marks = [k for k in pipe.__dict__ if k.startswith("_fitvideo") and k != "_fitvideo_token"]
    if getattr(pipe, "_all_hooks", None):
        marks.append("_all_hooks")
    return marks


@dataclass
class CleanStates:
    """The load-time fingerprints of one cached pipeline's components (engine/cache.py keeps one per entry)."""

    states: dict[str, dict[str, tuple]] = field(default_factory=dict)

    def take(self, pipe, components: list[str] | None = None) -> None:
        for name, c in pipe.components.items():
            if isinstance(c, torch.nn.Module) and (components is None or name in components):
                self.states[name] = module_state(c)

    def leftovers(self, pipe, label: str) -> list[str]:
        from engine.attention import process_default_left

        lines = [f"{label}: {m}" for m in pipe_marks(pipe)]
        if process_default_left():  # process-wide state a modifier can leave: the attention dispatcher's default
            lines.append(f"{label}: {process_default_left()}")
        for name, c in pipe.components.items():
            if isinstance(c, torch.nn.Module) and name in self.states:
                lines += [f"{label} {line}" for line in differences(name, self.states[name], module_state(c))]
        return lines
