"""Step caches: diffusers' cache hooks (First Block Cache, TaylorSeer, MagCache, PAB, FasterCache) on every
denoiser of a pipeline, with counters of the block computations they skip. A run's step cache is a modifier
(engine/modifiers.py): chosen once when the request is resolved (`choose`), applied before the run and removed
after it, so the next run on the same cached transformer starts from the model as it was loaded.

    choice = choose(request, spec)                       # StepCacheChoice, or RequestError naming why not
    cache = StepCache(choice, denoising_steps(request))  # a modifier: apply(pipe) / remove(pipe)
    ... pipe(...) ...
    sidecar["step_cache"] = cache.stats()

Defaults (diffusers 0.42.1 docstrings; the number after ':' overrides the first one):
  first-block  threshold 0.05 - relative absmean change of block 0's residual below which the other blocks
               are skipped (0 = never skip). Needs >= 2 blocks.
  taylorseer   cache_interval 5 - one full step every N after `disable_cache_before_step`=3 warm-up steps
               (1 = always compute). Lite mode: blocks skipped, proj_out predicted by a 1st-order Taylor series
               (the default per-attention mode matches no module of these models and would keep 2 latent-sized
               tensors per attention layer).
  magcache     threshold 0.06 - accumulated magnitude-ratio error allowed (max_skip_steps 3, retention 0.2);
               needs ratios from a calibration run (diffusers ships them only for Flux). Ratios are a function of
               the run's settings alone: they are calibrated on fixed inputs (CALIBRATION_PROMPT, seed 0, a fixed
               image / video) with the run's model, LoRAs, sizes, steps and guidance, and filed under a key of all
               of them, so a run's video never depends on which run calibrated first.
  pab          spatial_attention_block_skip_range 2 - attention recomputed every N calls, between timesteps
               100 and 800 (1 = always compute).
  fastercache  spatial_attention_block_skip_range 2, timestep range (-1, 681), uncond batch skip 5
               (1 = attention always computed; the uncond-branch skip stays).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

STEP_CACHES = ("off", "first-block", "taylorseer", "magcache", "pab", "fastercache")
DEFAULTS: dict[str, float] = {"first-block": 0.05, "taylorseer": 5, "magcache": 0.06, "pab": 2, "fastercache": 2}
INTEGER = ("taylorseer", "pab", "fastercache")  # their number is an interval, >= 1
ATTENTION_UNITS = ("pab", "fastercache")  # what they skip: attention layers (the others skip whole blocks)
_COUNTER = "fitvideo_step_counter"
CALIBRATION_PROMPT = "a person walks along a city street at dusk, cinematic, detailed"


class StepCacheError(ValueError):
    """A step cache that cannot apply to this transformer; the message says why."""


def parse_step_cache(text: str) -> tuple[str, float | None]:
    """"first-block:0.2" -> ("first-block", 0.2); "off" -> ("off", None); a bad value raises ValueError."""
    name, _, num = str(text).strip().partition(":")
    allowed = f"allowed: {', '.join(STEP_CACHES)}, optionally NAME:NUMBER (e.g. first-block:0.2, pab:3)"
    if name not in STEP_CACHES:
        raise ValueError(f"step cache {text!r} is not known; {allowed}")
    if not num:
        return name, None
    if name == "off":
        raise ValueError(f"step cache {text!r}: 'off' takes no number; {allowed}")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"step cache {text!r}: {num!r} is not a number; {allowed}") from None
    if name in INTEGER and (value < 1 or value != int(value)):
        raise ValueError(f"step cache {text!r}: {name} takes an interval, a whole number >= 1")
    if value < 0:
        raise ValueError(f"step cache {text!r}: the threshold must be >= 0")
    return name, (int(value) if name in INTEGER else value)


# --------------------------------------------------------------------------- which cache a run gets


@dataclass(frozen=True)
class StepCacheChoice:
    """The step cache of a resolved run: its name and the number in effect (the default filled in), or "off" and,
    when the preset's cache was left off, the reason."""

    name: str = "off"
    value: float | None = None
    note: str = ""

    @property
    def text(self) -> str:
        """The request field's form: "off", the name (at its default number), or "name:number"."""
        if self.name == "off" or self.value == DEFAULTS.get(self.name):
            return self.name
        return f"{self.name}:{self.value:g}"


def support(spec, task: str, parallel: int = 1) -> dict[str, str | None]:
    """name -> None where the cache applies to the (model, task) pipeline, else the reason it does not: the
    family's own (families/), then what this model's transformer allows (its depth, its experts), then a denoise
    shared by `parallel` processes (engine/parallel.py)."""
    from configs.schema import task_experts

    out: dict[str, str | None] = dict.fromkeys(STEP_CACHES)
    out.update(spec.family_module.step_cache_problems(task))
    if parallel > 1:
        out.update({n: f"with context_parallel={parallel} each process would decide on its own share of the tokens "
                       f"whether to skip a step, and every process must make the same call"
                    for n in STEP_CACHES if n != "off"})
    blocks = int(spec.config.get("transformer", {}).get("num_layers", 2))
    if out["first-block"] is None and blocks < 2:
        out["first-block"] = (f"first-block needs a transformer of 2 or more blocks (block 0 decides whether the rest "
                              f"are skipped); {spec.label} has {blocks}")
    if out["magcache"] is None and task_experts(spec, task) == 2:
        out["magcache"] = ("MagCache counts steps per transformer and the two experts split the steps between them, "
                           "so its ratios would not line up")
    return out


def choose(request, spec) -> StepCacheChoice:
    """The request's own step cache (RequestError with the reason where it does not apply), else its preset's
    (left off, with a note, where it does not apply)."""
    from configs.schema import RequestError
    from configs.registry import load_presets

    own = request.step_cache is not None
    text = request.step_cache if own else load_presets()[request.preset].step_cache
    try:
        name, value = parse_step_cache(text)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    allowed = support(spec, request.task, request.context_parallel)
    reason = allowed[name]
    if reason is None:
        return StepCacheChoice(name, DEFAULTS.get(name) if value is None else value)
    if own:
        ok = ", ".join(n for n, r in allowed.items() if r is None)
        raise RequestError(f"step cache {name!r} does not apply to {spec.label} {request.task}: {reason}; "
                           f"choose one of {ok}")
    return StepCacheChoice(note=f"the {request.preset} preset's step cache ({name}) is left off here: {reason}")


# --------------------------------------------------------------------------- counting


class _Counted:
    """Calls reaching a module (`called`, a torch pre-hook outside every diffusers hook) and calls reaching its
    own forward (`computed`, a diffusers hook registered before the cache hooks, so innermost)."""

    def __init__(self) -> None:
        self.called = 0
        self.computed = 0


def _attach_counter(module: torch.nn.Module, counts: _Counted):
    from diffusers.hooks import HookRegistry, ModelHook

    class Counter(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            counts.computed += 1
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(module).register_hook(Counter(), _COUNTER)

    def called(*_):
        counts.called += 1

    return module.register_forward_pre_hook(called)


def units(transformer: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """What a cache skips: attention layers (PAB, FasterCache: those their regexes pick) or whole blocks."""
    if name in ATTENTION_UNITS:
        pattern = re.compile(r"^(transformer_blocks|blocks)\.\d+\.attn1$")
        return [m for n, m in transformer.named_modules() if pattern.match(n)]
    return list(blocks_of(transformer))


def blocks_of(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    for attr in ("blocks", "transformer_blocks"):
        if isinstance(getattr(transformer, attr, None), torch.nn.ModuleList):
            return getattr(transformer, attr)
    raise StepCacheError(f"{type(transformer).__name__} has no block list a step cache can hook")


def denoisers_of(pipe) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's transformers that are loaded now (a freed expert is None)."""
    from families import family_of_pipeline

    family = family_of_pipeline(type(pipe).__name__)
    names = family.denoisers if family is not None else ("transformer",)
    return [(n, getattr(pipe, n)) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


# --------------------------------------------------------------------------- the modifier


@dataclass(eq=False)
class StepCache:
    """Modifier: a step cache on every loaded denoiser of a pipeline, with counters. `calibrate`: MagCache's
    calibration mode instead (nothing skipped, the per-step magnitude ratios recorded)."""

    choice: StepCacheChoice
    steps: int
    ratios: list[float] | None = None  # MagCache's, from the calibration (`ratios_for`)
    calibrate: bool = False
    name: str = "step_cache"
    counts: list[_Counted] = field(default_factory=list)
    recorded: list[float] = field(default_factory=list)  # calibration: the ratios so far
    _on: list[tuple[torch.nn.Module, list[torch.nn.Module], list]] = field(default_factory=list)

    def added_bytes(self) -> int:
        return 0  # what a cache keeps lives in the denoise stage's activations (the planner counts it there)

    def apply(self, pipe) -> None:
        for attr, module in denoisers_of(pipe):
            if any(m is module for m, _, _ in self._on):
                continue  # already on (an expert loaded mid-run: only the new one gets it)
            config = self._config(pipe, attr, module)
            hooked, handles = units(module, self.choice.name), []
            for unit in hooked:  # counters first: innermost in each registry
                counts = _Counted()
                self.counts.append(counts)
                handles.append(_attach_counter(unit, counts))
            module.enable_cache(config)
            self._on.append((module, hooked, handles))

    def remove(self, pipe) -> None:
        from diffusers.hooks import HookRegistry

        for module, hooked, handles in self._on:
            if module.is_cache_enabled:
                module.disable_cache()
            for unit, handle in zip(hooked, handles):
                handle.remove()
                registry = getattr(unit, "_diffusers_hook", None)
                if registry is not None:
                    registry.remove_hook(_COUNTER, recurse=False)
            HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()
        self._on = []

    def reset_counts(self) -> None:
        for c in self.counts:
            c.called = c.computed = 0

    def stats(self) -> dict:
        total = sum(c.called for c in self.counts)
        done = sum(c.computed for c in self.counts)
        unit = "attention layers" if self.choice.name in ATTENTION_UNITS else "blocks"
        return {"name": self.choice.name, "threshold": self.choice.value, "unit": unit, "blocks_computed": done,
                "blocks_total": total, "skipped_fraction": round(1 - done / total, 4) if total else 0.0}

    def calibration_callback(self):
        """The calibration run's `callback_on_step_end`: keeps the magnitude ratios diffusers has recorded so far
        (`recorded`). Read per step because the pipeline resets its stateful hooks when the call ends."""
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

        def on_step_end(_pipe, i, t, kwargs):
            module = self._on[0][0]
            manager = blocks_of(module)[-1]._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK).state_manager
            states = list(manager._state_cache.values())
            if states:
                self.recorded = [float(r) for r in states[0].calibration_ratios]
            return kwargs

        return on_step_end

    def _config(self, pipe, attr: str, module: torch.nn.Module):
        """The diffusers config for this cache on one transformer (StepCacheError where it cannot apply)."""
        from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                     PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

        name, value = self.choice.name, self.choice.value
        if name == "first-block":
            if len(blocks_of(module)) < 2:
                raise StepCacheError(f"first-block cache needs a transformer of >= 2 blocks; {attr} has "
                                     f"{len(blocks_of(module))}")
            return FirstBlockCacheConfig(threshold=float(value))
        if name == "taylorseer":
            return TaylorSeerCacheConfig(cache_interval=int(value), use_lite_mode=True, taylor_factors_dtype=None)
        clock = lambda: pipe.current_timestep  # noqa: E731  (the pipeline's own timestep while it denoises)
        if name == "pab":
            return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value),
                                                   current_timestep_callback=clock)
        if name == "fastercache":
            return FasterCacheConfig(spatial_attention_block_skip_range=int(value), current_timestep_callback=clock,
                                     attention_weight_callback=lambda _: 0.5, tensor_format="BFCHW")
        if name != "magcache":
            raise StepCacheError(f"step cache {name!r} has no config")
        if self.calibrate:
            # steps + 1: diffusers clears the ratios when its step counter reaches num_inference_steps; one more
            # keeps them until the run has ended and they are read
            return MagCacheConfig(calibrate=True, num_inference_steps=self.steps + 1)
        if not self.ratios:
            raise StepCacheError("magcache needs ratios from a calibration run (the runner makes them first)")
        return MagCacheConfig(threshold=float(value), num_inference_steps=self.steps, mag_ratios=self.ratios)


# --------------------------------------------------------------------------- MagCache ratios on disk


def ratios_key_for(spec, facts: dict) -> str:
    """The ratio file's key: the model's weights (its id or folder, its transformer's config and size) and every
    run setting the ratios depend on (`facts`: engine/runner.py `ratios_facts`), hashed."""
    weights = {"model": spec.id, "folder": spec.folder, "transformer": spec.config.get("transformer"),
               "params": spec.params.get("transformer")}
    digest = hashlib.sha256(json.dumps({**weights, **facts}, sort_keys=True, default=str).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(spec.folder or spec.id)).name)[-60:]
    return f"{name}-{digest[:16]}"


def denoising_steps(req) -> int:
    """The steps the transformer really runs: all of them, except V2V, which starts part way down the schedule
    (diffusers' `get_timesteps`: min(int(steps * strength), steps) of them). MagCache counts these."""
    if req.task != "v2v":
        return req.steps
    return min(int(req.steps * req.strength), req.steps)


def calibration_inputs(req) -> dict:
    """MagCache's fixed conditioning for a request's task: a colour gradient at the request's size as the image
    (I2V) or held for every frame (V2V, at the request's strength); the frame count for T2V."""
    import numpy as np
    from PIL import Image

    h, w = req.height, req.width
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 255 // max(1, w + h - 2)], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    if req.task == "i2v":
        return {"image": image}
    if req.task == "v2v":
        return {"video": [image] * req.frames, "strength": req.strength}
    return {"num_frames": req.frames}


def ratios_path(key: str) -> Path:
    from configs.paths import fitvideo_home

    return fitvideo_home() / "magcache" / f"{key}.json"


def load_ratios(key: str) -> list[float] | None:
    """Ratios calibrated before under `key`, or None (a damaged file counts as none: it is made again)."""
    path = ratios_path(key)
    try:
        ratios = [float(r) for r in json.loads(path.read_text())["ratios"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ratios or None


def save_ratios(key: str, ratios: list[float], facts: dict) -> Path:
    from decode.writer import write_json_atomic

    path = ratios_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"ratios": ratios, "settings": facts})
    return path


# --------------------------------------------------------------------------- the plan's words


def plan_note(choice: StepCacheChoice, steps: int, kept_bytes: int = 0) -> str:
    """One line for the plan: the cache, what it keeps in memory, and the share of block computations it runs."""
    name, value = choice.name, choice.value
    if name == "off":
        return choice.note
    if name == "taylorseer":
        computed = min(steps, 3 + max(0, steps - 3 + int(value) - 1) // int(value))
        share = f"computes blocks on {computed} of {steps} steps ({computed / steps:.0%})"
    elif name in ATTENTION_UNITS:
        share = f"recomputes spatial attention every {int(value)} steps within its timestep window"
    else:
        share = f"skips a step's remaining blocks while the change stays under {value:g} (adaptive: the sidecar says how many)"
    memory = {"first-block": "two hidden-state tensors per branch", "magcache": "one residual per branch",
              "taylorseer": "the output projection's input and its first difference per branch",
              "pab": "one attention output per layer", "fastercache": "attention outputs per layer and branch"}[name]
    size = f", {kept_bytes / 2**30:.2f} GiB counted in the denoise stage" if kept_bytes else ""
    return f"step cache {choice.name}:{value:g} {share}; keeps {memory} (latent-token sized{size})"
