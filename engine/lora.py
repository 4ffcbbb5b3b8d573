"""LoRAs: where they come from, which model each fits, and adapters swapped on a cached pipeline.

A LoRA is a `.safetensors` file in the LoRA folder (`$FITVIDEO_HOME/loras`, or `--loras-dir` /
`FITVIDEO_LORAS_DIR`), a path, or a hub file `owner/repo/weights.safetensors` fetched like a model (offline and
not on this machine: the same clear error). Its state dict is converted by the family's own diffusers loader
(`WanLoraLoaderMixin.lora_state_dict` turns kohya / musubi `lora_unet_*` and the original-Wan
`diffusion_model.*` files, which the lightx2v and CausVid distill LoRAs are, into diffusers keys), and the
family, width and depth it targets are read from the converted keys and shapes, never from the file name.

On a pipeline, the `Loras` modifier (engine/modifiers.py) loads a run's LoRAs into each transformer (both experts
of a Wan 2.2 A14B, each with its own strength) with diffusers' adapter API before the run, and takes them out with
`unload_lora` after it, so the base model's output comes back exactly and the next run starts from the model as it
was loaded. It goes on before the offload rung, so every rung places the adapter weights with their layers.

Quantized bases: int8 (torchao) takes the adapters on top of its quantized layers (peft's torchao LoRA
layer); fp8 storage keeps its base weights in fp8 and the adapter weights in the compute dtype (peft would
otherwise give the adapter its base layer's fp8 dtype: `_keep_adapters_in_compute_dtype`).

A LoRA may carry run settings (a distill LoRA: 4 steps at guidance 1): a `NAME.json` next to the file, or
`fitvideo.preset` / `steps`, `guidance_scale`, `shift` in the safetensors metadata. They are offered as a
preset, never applied silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configs.schema import LoraChoice, ModelSpec, RequestError, task_experts
from configs.registry import get_model_spec, load_registry

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"


def _block_keys() -> dict[str, re.Pattern]:
    """family -> where its transformer's blocks sit in a converted LoRA's keys (families/: `lora_block_key`)."""
    from families import FAMILIES

    return {name: re.compile(f.lora_block_key) for name, f in FAMILIES.items() if f.lora_block_key}


class LoraError(RequestError):
    """A LoRA that cannot be used: missing, corrupt, or made for another model. The message says which and why."""


@dataclass(frozen=True)
class LoraPreset:
    """Run settings a LoRA was made for (a distill LoRA: few steps, guidance 1, a scheduler shift)."""

    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    source: str = ""  # where the numbers come from: "NAME.json" or "metadata"

    def text(self, name: str) -> str:
        parts = [f"{self.steps} steps" if self.steps else "", f"guidance {self.guidance:g}" if self.guidance is not None
                 else "", f"shift {self.shift:g}" if self.shift is not None else ""]
        return f"{', '.join(p for p in parts if p)}, from {name}"


@dataclass(frozen=True)
class LoraSignature:
    """What a LoRA file targets, from its converted keys and shapes."""

    family: str
    width: int  # the hidden size its attention projections read
    blocks: int  # the deepest block it touches + 1
    params: int  # LoRA parameters (what it adds to the transformer in memory, at the compute dtype)
    rank: int
    image_branch: bool  # targets the I2V image cross-attention (add_k_proj / add_v_proj)


@dataclass(frozen=True)
class LoraFile:
    name: str  # what a person picks: the file name without .safetensors (or the path / hub id given)
    path: Path
    signature: LoraSignature
    preset: LoraPreset | None = None
    adapter: str = ""  # the adapter name on a transformer: file stem + a key of path, size and mtime


@dataclass(frozen=True)
class ActiveLora:
    """One LoRA of a run, resolved: its file, and its strength per expert (index 0 high-noise / the only one)."""

    file: LoraFile
    strengths: tuple[float, ...]
    record: dict = field(default_factory=dict)  # what the sidecar keeps


# --------------------------------------------------------------------------- where LoRAs come from


def loras_dir() -> Path:
    from configs.paths import fitvideo_home

    return Path(os.environ.get("FITVIDEO_LORAS_DIR") or fitvideo_home() / "loras")


def find_lora(name: str) -> Path:
    """A LoRA's file: a name in the LoRA folder, a path, or a hub file `owner/repo/weights.safetensors`."""
    text = str(name).strip()
    if not text:
        raise LoraError("a LoRA name is empty; give a file name from the LoRA folder, a path or owner/repo/file")
    folder = loras_dir()
    for candidate in (folder / text, folder / (text + LORA_SUFFIX), Path(text).expanduser()):
        if candidate.is_file():
            return candidate.resolve()
    if text.count("/") >= 2 and text.endswith(LORA_SUFFIX) and not Path(text).is_absolute():
        return _hub_file(text)
    known = ", ".join(p.stem for p in sorted(folder.glob("*" + LORA_SUFFIX))) or "none"
    raise LoraError(f"LoRA {text!r} not found: not in the LoRA folder {folder} (it has: {known}), not a file path, "
                    "not a hub file owner/repo/weights.safetensors")


def _hub_file(text: str) -> Path:
    from huggingface_hub import hf_hub_download

    from engine.loaders import is_offline

    owner, repo, filename = text.split("/", 2)
    try:
        return Path(hf_hub_download(f"{owner}/{repo}", filename, local_files_only=is_offline()))
    except Exception as e:  # noqa: BLE001  (offline, missing repo or file: one clear error)
        raise LoraError(f"LoRA {text!r} is not on this machine and could not be fetched from the hub "
                        f"({type(e).__name__}). Fetch it with `hf download {owner}/{repo} {filename}`, or put the "
                        f"file in {loras_dir()}") from None


_SIGNATURES: dict[tuple, LoraSignature] = {}


def read_signature(path: Path) -> LoraSignature:
    """The family, width and depth a LoRA file targets (cached per path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SIGNATURES:
        _SIGNATURES[key] = _signature(converted_state_dict(path))
    return _SIGNATURES[key]


def converted_state_dict(path: Path, family: str | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors with diffusers keys (`transformer.…lora_A.weight`), converted by the family's loader."""
    import diffusers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"LoRA file {path} cannot be read as safetensors ({e}); is the download complete?") from None
    from families import FAMILIES

    keys = _block_keys()
    for fam in (family,) if family else tuple(keys):  # each family's converter; its own block keys must result
        try:
            sd = getattr(diffusers, FAMILIES[fam].lora_loader).lora_state_dict(dict(raw))
        except Exception as e:  # noqa: BLE001  (a converter that does not know these keys)
            logger.debug("%s's LoRA loader cannot convert %s: %s", fam, path, e)
            continue
        if any(keys[fam].match(k) for k in sd):
            return sd
    raise LoraError(f"LoRA file {path} holds no LoRA layers for a transformer of a known family "
                    f"({', '.join(keys)}; first keys: {', '.join(list(raw)[:3]) or 'none'})")


def _signature(sd: dict[str, torch.Tensor]) -> LoraSignature:
    keys = _block_keys()
    family = next((f for f, rx in keys.items() if any(rx.match(k) for k in sd)), "")
    blocks = [int(m.group(1)) for k in sd if (m := keys[family].match(k))]
    q = next((v for k, v in sd.items() if ".attn1.to_q.lora_A" in k), None)
    downs = [v for k, v in sd.items() if ".lora_A." in k]
    if q is None or not downs:
        raise LoraError("the LoRA does not adapt the self-attention query (attn1.to_q): its width cannot be told")
    return LoraSignature(family=family, width=int(q.shape[1]), blocks=max(blocks) + 1,
                         params=sum(v.numel() for k, v in sd.items() if "lora" in k), rank=int(q.shape[0]),
                         image_branch=any("add_k_proj" in k for k in sd))


def model_width(spec: ModelSpec) -> tuple[int, int]:
    """(hidden size, blocks) of a model's transformer, from its configs."""
    cfg = spec.config.get("transformer", {})
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]), int(cfg["num_layers"])


def fits(sig: LoraSignature, spec: ModelSpec) -> bool:
    width, blocks = model_width(spec)
    return sig.family == spec.family and sig.width == width and sig.blocks <= blocks


def check_fits(file: LoraFile, spec: ModelSpec) -> None:
    """Refuse a LoRA made for another model, naming the models it fits."""
    if fits(file.signature, spec):
        return
    sig = file.signature
    others = [s.label for s in load_registry().values() if fits(sig, s)]
    made = f"it fits {', '.join(others)}" if others else (
        f"no registry model has its shape ({sig.family}, width {sig.width}, {sig.blocks} blocks)")
    raise LoraError(f"LoRA {file.name!r} does not fit {spec.label}: it was made for a {sig.family} transformer of "
                    f"width {sig.width} with {sig.blocks} blocks; {made}")


def read_preset(path: Path) -> LoraPreset | None:
    """Run settings next to the LoRA (`NAME.json`) or in its safetensors metadata; None when it has none."""
    side = path.with_suffix(".json")
    data, source = {}, ""
    if side.is_file():
        try:
            data, source = json.loads(side.read_text()), side.name
        except (OSError, ValueError) as e:
            logger.warning("ignoring %s: %s", side, e)
    if not data:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        data = json.loads(meta["fitvideo.preset"]) if "fitvideo.preset" in meta else meta
        source = "metadata"
    steps, guidance = data.get("steps"), data.get("guidance", data.get("guidance_scale"))
    shift = data.get("shift", data.get("flow_shift"))
    if steps is None and guidance is None and shift is None:
        return None
    return LoraPreset(int(steps) if steps is not None else None, float(guidance) if guidance is not None else None,
                      float(shift) if shift is not None else None, source)


def lora_file(name: str) -> LoraFile:
    path = find_lora(name)
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]
    return LoraFile(name=str(name).strip().removesuffix(LORA_SUFFIX) if path.parent == loras_dir().resolve()
                    else str(name).strip(), path=path, signature=read_signature(path), preset=read_preset(path),
                    adapter=f"{stem}_{key}")


def list_loras(model: str | None = None) -> list[LoraFile]:
    """The LoRA folder's files (those that fit `model` when given); unreadable ones are logged and left out."""
    found = []
    for path in sorted(loras_dir().glob("*" + LORA_SUFFIX)):
        try:
            file = lora_file(path.stem)
        except LoraError as e:
            logger.warning("LoRA folder: %s", e)
            continue
        if model is None or fits(file.signature, get_model_spec(model)):
            found.append(file)
    return found


# --------------------------------------------------------------------------- a run's LoRAs


def resolve_loras(choices: tuple[LoraChoice, ...], spec: ModelSpec, task: str) -> tuple[ActiveLora, ...]:
    """A request's LoRAs, found and checked against its model (LoraError names the bad one)."""
    experts = task_experts(spec, task)
    active, seen = [], set()
    for choice in choices:
        file = lora_file(choice.name)
        check_fits(file, spec)
        if file.adapter in seen:
            raise LoraError(f"LoRA {choice.name!r} is listed twice; give it once with the strength you want")
        seen.add(file.adapter)
        strengths = (choice.strength,) if experts == 1 else (
            choice.strength, choice.strength if choice.strength_2 is None else choice.strength_2)
        record = {"name": file.name, "file": file.path.name, "bytes": file.path.stat().st_size,
                  "strength": choice.strength}
        if experts == 2:
            record["strength_2"] = strengths[1]
        active.append(ActiveLora(file, strengths, record))
    return tuple(active)


def lora_bytes(active: tuple[ActiveLora, ...], itemsize: int) -> int:
    """What the adapters add to one expert's transformer in memory (peft keeps them at the compute dtype)."""
    return sum(a.file.signature.params for a in active) * itemsize


@dataclass(eq=False)
class Loras:
    """Modifier: the run's LoRAs in every loaded denoiser (each expert of a Wan 2.2 A14B with its own strengths;
    an expert whose strengths are all 0 gets none). `remove` unloads peft's layers: the base modules come back
    bitwise, so the next run on the cached transformer starts from the model as it was loaded."""

    active: tuple[ActiveLora, ...]
    name: str = "lora"
    _on: list[torch.nn.Module] = field(default_factory=list)

    def added_bytes(self) -> int:
        return 0  # counted with the transformer's parameters (`with_lora_params`): they sit in its blocks

    def apply(self, pipe) -> None:
        from engine.stepcache import denoisers_of
        from families import family_of_pipeline

        family = family_of_pipeline(type(pipe).__name__)
        order = family.denoisers if family is not None else ("transformer",)
        for attr, module in denoisers_of(pipe):
            if any(m is module for m in self._on):
                continue
            expert = order.index(attr)
            wanted = [(a.file, s) for a in self.active if (s := a.strengths[min(expert, len(a.strengths) - 1)]) != 0]
            if wanted:
                self._on.append(module)
                load_adapters(type(pipe), module, wanted)

    def remove(self, pipe) -> None:
        for module in self._on:
            unload_adapters(module)
        self._on = []


def load_adapters(pipe_cls, module: torch.nn.Module, wanted: list[tuple[LoraFile, float]]) -> None:
    """Each (file, strength) into its own peft adapter (`fv0`, `fv1`, ...) of `module`, the strengths set."""
    names = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small copies: one thread is faster than waiting for a busy second one
    try:
        for i, (file, _) in enumerate(wanted):
            names.append(f"fv{i}")
            _load_adapter(pipe_cls, module, file, names[-1])
    except BaseException:
        unload_adapters(module)
        raise
    finally:
        torch.set_num_threads(threads)
    module.set_adapters(names, [s for _, s in wanted])


def unload_adapters(module: torch.nn.Module) -> None:
    """peft's layers out of `module`: the base modules back, bitwise."""
    if getattr(module, "peft_config", None):
        _own_adapter_tensors(module)
        module.unload_lora()
        logger.debug("LoRAs unloaded from %s", type(module).__name__)


def _own_adapter_tensors(module: torch.nn.Module) -> None:
    """Adapter weights an offload hook moved during a run (under torch.inference_mode) are inference tensors;
    peft sets requires_grad on them when it takes them out, which torch refuses: copy them back to ordinary
    tensors (adapter weights only: small)."""
    with torch.inference_mode(False):
        for pname, param in module.named_parameters():
            if ".lora_" in pname and param.is_inference():
                param.data = param.data.clone()


def loaded_adapters(module: torch.nn.Module) -> list[str]:
    """The peft adapters a transformer holds now (none between runs)."""
    return sorted(getattr(module, "peft_config", None) or {})


def _load_adapter(pipe_cls, module: torch.nn.Module, file: LoraFile, slot: str) -> None:
    """Load `file` into adapter `slot` of `module`, converted by the family's own diffusers loader."""
    sd = converted_state_dict(file.path, file.signature.family)
    if hasattr(pipe_cls, "_maybe_expand_t2v_lora_for_i2v"):
        sd = pipe_cls._maybe_expand_t2v_lora_for_i2v(transformer=module, state_dict=sd)  # a T2V LoRA on I2V
    try:
        pipe_cls.load_lora_into_transformer(sd, transformer=module, adapter_name=slot, low_cpu_mem_usage=True)
    except Exception as e:  # noqa: BLE001  (shapes that do not match, a format peft refuses)
        raise LoraError(f"LoRA {file.name!r} could not be loaded into {type(module).__name__}: {e}") from None
    _keep_adapters_in_compute_dtype(module, slot)
    logger.info("LoRA %s loaded (%s parameters, rank %d)", file.name, f"{file.signature.params:,}",
                file.signature.rank)


def _keep_adapters_in_compute_dtype(module: torch.nn.Module, name: str) -> None:
    """Adapter weights that peft gave a low-precision storage dtype (fp8 storage: the base layer's) go to the
    compute dtype, where the layerwise casting hooks never touch them."""
    compute = next((p.dtype for p in module.parameters() if p.dtype in (torch.float32, torch.bfloat16,
                                                                         torch.float16)), torch.float32)
    for pname, param in module.named_parameters():
        if f".{name}." in pname and param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            param.data = param.data.to(compute)


def with_lora_params(spec: ModelSpec, active: tuple[ActiveLora, ...]) -> ModelSpec:
    """The spec the planner reads, with each expert's adapters counted into its transformer's parameters (they
    sit inside the blocks: every rung then places them with their layers, on the device and in RAM)."""
    if not active:
        return spec
    import dataclasses

    params = dict(spec.params)
    for i, name in enumerate(spec.family_module.denoisers):
        if name in params:
            params[name] += sum(a.file.signature.params for a in active
                                if a.strengths[min(i, len(a.strengths) - 1)] != 0)
    return dataclasses.replace(spec, params=params)


@contextlib.contextmanager
def scheduler_shift(pipe, shift: float | None):
    """The pipeline's scheduler with another flow shift for one run (a distill LoRA's preset), restored after."""
    if shift is None:
        yield
        return
    original = pipe.scheduler
    if "flow_shift" not in original.config and "shift" not in original.config:
        raise LoraError(f"shift={shift!r}: the {type(original).__name__} scheduler has no shift")
    key = "flow_shift" if "flow_shift" in original.config else "shift"
    pipe.scheduler = type(original).from_config(original.config, **{key: shift})
    try:
        yield
    finally:
        pipe.scheduler = original


def lora_reason(active: tuple[ActiveLora, ...], spec: ModelSpec) -> str:
    """One line for the plan: which LoRAs, at which strengths, and what they add to the weights."""
    itemsize = 4 if spec.default_dtype == "float32" else 2
    names = ", ".join(f"{a.file.name} x{'/'.join(f'{s:g}' for s in a.strengths)}" for a in active)
    n = lora_bytes(active, itemsize)
    size = f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    return (f"LoRAs: {names} (+{size} of adapter weights, counted with the transformer on every rung; loaded "
            "into the cached model for this run and taken out after it)")
