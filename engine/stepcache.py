"""Step caches: diffusers' cache hooks (First Block Cache, TaylorSeer, MagCache, PAB, FasterCache) on every
transformer of a pipeline, with counters of the block computations they skip.

    state = apply_step_cache(pipe, "first-block", 0.05, steps=req.steps)   # after apply_loras, before apply_plan
    ... pipe(...) ...
    sidecar["step_cache"] = state.stats()

Order: like `apply_loras`, a change here strips the offload hooks (`remove_all_offload`) so the caller's
`vram_utils.apply_plan` puts them back *outside* the cache hooks: a skipped block then still passes through its
offload hook (onload/offload stay paired, streams' prefetch chain intact), and accelerate's root hook (model
offload), which restores `forward` by assignment, is always removed before the cache hooks under it.

Defaults (diffusers 0.42.1 docstrings; the number after ':' overrides the first one):
  first-block  threshold 0.05 - relative absmean change of block 0's residual below which the other blocks
               are skipped (0 = never skip). Needs >= 2 blocks.
  taylorseer   cache_interval 5 - one full step every N after `disable_cache_before_step`=3 warm-up steps
               (1 = always compute). Lite mode: blocks skipped, proj_out predicted by a 1st-order Taylor series
               (the default per-attention mode matches no module of these models and would keep 2 latent-sized
               tensors per attention layer).
  magcache     threshold 0.06 - accumulated magnitude-ratio error allowed (max_skip_steps 3, retention 0.2);
               needs ratios from `calibrate_magcache` (diffusers ships them only for Flux).
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
EXPERTS = ("transformer", "transformer_2")
_COUNTER = "fitvideo_step_counter"
_STATE = "_fitvideo_step_cache"


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


_NO_CONTEXT = ("diffusers' WanVideoToVideoPipeline calls the transformer without `cache_context`, so the cache "
               "hooks have no per-branch state (cond and uncond would share, or the hook raises)")
_SPLIT_CFG = ("Wan runs cond and uncond as two transformer calls; {} keeps one cache per attention layer, so a "
              "skipped call would reuse the other branch's attention")


def supported(family: str, task: str) -> dict[str, str | None]:
    """name -> None where the cache applies to (family, task), else the reason it does not."""
    out: dict[str, str | None] = {name: None for name in STEP_CACHES}
    if family == "wan":
        out["pab"] = _SPLIT_CFG.format("Pyramid Attention Broadcast")
        out["fastercache"] = _SPLIT_CFG.format("FasterCache (which also expects cond+uncond in one batch)")
        if task == "v2v":
            out.update({n: _NO_CONTEXT for n in STEP_CACHES if n != "off"})
    elif family != "cogvideox":
        out.update({n: f"no step cache is wired for family {family!r}" for n in STEP_CACHES if n != "off"})
    return out


# --------------------------------------------------------------------------- counting


class _Counted:
    """Calls reaching a module (`called`, a torch pre-hook outside every diffusers hook) and calls reaching its
    own forward (`computed`, a diffusers hook registered before the cache hooks, so innermost)."""

    def __init__(self) -> None:
        self.called = 0
        self.computed = 0


def _attach_counter(module: torch.nn.Module, counts: _Counted) -> list:
    from diffusers.hooks import HookRegistry, ModelHook

    class Counter(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            counts.computed += 1
            return args, kwargs

    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(Counter(), _COUNTER)

    def called(*_):
        counts.called += 1

    return [module.register_forward_pre_hook(called)]


def _units(transformer: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """What a cache skips: attention layers (PAB, FasterCache: those their regexes pick) or whole blocks."""
    if name in ("pab", "fastercache"):
        pattern = re.compile(r"^(transformer_blocks|blocks)\.\d+\.attn1$")
        return [m for n, m in transformer.named_modules() if pattern.match(n)]
    return list(_blocks(transformer))


def _blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    for attr in ("blocks", "transformer_blocks"):
        if isinstance(getattr(transformer, attr, None), torch.nn.ModuleList):
            return getattr(transformer, attr)
    raise ValueError(f"{type(transformer).__name__} has no block list a step cache can hook")


@dataclass
class StepCacheState:
    """What is applied on a pipeline's transformers, and the counts since the last `reset_counts`."""

    name: str = "off"
    threshold: float | None = None
    steps: int | None = None
    unit: str = "blocks"
    counts: list[_Counted] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def reset_counts(self) -> None:
        for c in self.counts:
            c.called = c.computed = 0

    def stats(self) -> dict:
        total = sum(c.called for c in self.counts)
        done = sum(c.computed for c in self.counts)
        return {"name": self.name, "threshold": self.threshold, "unit": self.unit, "blocks_computed": done,
                "blocks_total": total, "skipped_fraction": round(1 - done / total, 4) if total else 0.0}


# --------------------------------------------------------------------------- applying


def transformers_of(pipe) -> list[tuple[str, torch.nn.Module]]:
    return [(n, getattr(pipe, n)) for n in EXPERTS if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def current_state(pipe) -> StepCacheState:
    return pipe.__dict__.get(_STATE) or StepCacheState()


def remove_step_cache(pipe) -> None:
    """Take every cache and counter hook off the pipeline's transformers (offload hooks come off first, as in
    `apply_step_cache`; the caller re-applies its plan)."""
    from diffusers.hooks import HookRegistry

    state = pipe.__dict__.pop(_STATE, None)
    if state is None:
        return
    _strip_offload(pipe)
    for h in state.handles:
        h.remove()
    for _, module in transformers_of(pipe):
        if module.is_cache_enabled:
            module.disable_cache()
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.remove_hook(_COUNTER, recurse=True)
        registry.invalidate_child_registries_cache()


def _strip_offload(pipe) -> None:
    from vram_utils.offload import remove_all_offload

    remove_all_offload(pipe)


def apply_step_cache(pipe, name: str, threshold: float | None = None, steps: int | None = None,
                     key: str | None = None) -> StepCacheState:
    """Put cache `name` ("off" removes) on every transformer of `pipe`; idempotent (the same again leaves the
    hooks alone and only zeroes the counters and the hooks' per-run state). `steps`: the run's step count
    (MagCache needs it). `key`: the MagCache ratio file's model key (default `magcache_key(pipe)`)."""
    name, parsed = parse_step_cache(name) if threshold is None else (name, threshold)
    if name not in STEP_CACHES:
        parse_step_cache(name)
    threshold = DEFAULTS.get(name) if parsed is None else parsed
    old = pipe.__dict__.get(_STATE)
    wanted = (name, threshold, steps if name == "magcache" else None, key)
    if old is not None and (old.name, old.threshold, old.steps, getattr(old, "key", None)) == wanted:
        old.reset_counts()
        for _, module in transformers_of(pipe):
            module._reset_stateful_cache()
        return old
    remove_step_cache(pipe)
    if name == "off":
        return StepCacheState()
    _strip_offload(pipe)
    state = StepCacheState(name, threshold, wanted[2], "attention layers" if name in ("pab", "fastercache") else "blocks")
    state.key = key  # type: ignore[attr-defined]
    for attr, module in transformers_of(pipe):
        config = _config(pipe, attr, module, state, key)
        for unit in _units(module, name):  # counters first: innermost in each registry
            counts = _Counted()
            state.counts.append(counts)
            state.handles += _attach_counter(unit, counts)
        module.enable_cache(config)
    pipe.__dict__[_STATE] = state
    return state


def _config(pipe, attr: str, module: torch.nn.Module, state: StepCacheState, key: str | None):
    """The diffusers config for `state.name` on one transformer (raises a clear error where it cannot apply)."""
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    name, value = state.name, state.threshold
    blocks = len(_blocks(module))
    if name == "first-block":
        if blocks < 2:
            raise ValueError(f"first-block cache needs a transformer of >= 2 blocks; {attr} has {blocks}")
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
    if len(transformers_of(pipe)) > 1:
        raise ValueError("magcache counts steps per transformer; a two-expert pipeline splits the steps between "
                         "them, so its ratios would not line up: use first-block or taylorseer")
    if not state.steps:
        raise ValueError("magcache needs the run's step count (steps=)")
    ratios = load_magcache_ratios(key or magcache_key(pipe))
    return MagCacheConfig(threshold=float(value), num_inference_steps=state.steps, mag_ratios=ratios)


# --------------------------------------------------------------------------- MagCache calibration


def magcache_key(pipe) -> str:
    """A file name for the transformer's weights: its source folder's name and a hash of its config."""
    module = pipe.transformer
    cfg = dict(module.config)
    source = Path(str(cfg.pop("_name_or_path", "") or type(module).__name__)).name
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{type(module).__name__}-{source}")[-80:] + f"-{digest}"


def magcache_path(key: str) -> Path:
    from engine.tiny import fitvideo_home

    return fitvideo_home() / "magcache" / f"{key}.json"


def load_magcache_ratios(key: str) -> list[float]:
    path = magcache_path(key)
    if not path.is_file():
        raise ValueError(f"magcache has no ratios for this model ({path} is missing); calibrate once with "
                         "`engine.stepcache.calibrate_magcache(pipe, steps=..., prompt=...)`")
    return [float(r) for r in json.loads(path.read_text())["ratios"]]


def calibrate_magcache(pipe, steps: int, key: str | None = None, **call) -> Path:
    """Run the pipeline once with diffusers' MagCache calibration mode (nothing skipped) and save the
    per-step residual magnitude ratios at $FITVIDEO_HOME/magcache/<key>.json. `call`: the pipeline's inputs."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

    remove_step_cache(pipe)
    module = pipe.transformer
    # steps + 1: diffusers clears the ratios when its step counter reaches num_inference_steps; one more
    # keeps them until our step callback has read them.
    module.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    manager = _blocks(module)[-1]._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK).state_manager
    seen: list[float] = []

    def on_step_end(_pipe, i, t, kwargs):
        states = list(manager._state_cache.values())
        if states:
            seen[:] = list(states[0].calibration_ratios)
        return kwargs

    try:
        pipe(num_inference_steps=steps, callback_on_step_end=on_step_end, **call)
    finally:
        module.disable_cache()
    path = magcache_path(key or magcache_key(pipe))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": steps, "ratios": seen}, indent=1))
    return path


# --------------------------------------------------------------------------- a run's choice


def resolve_step_cache(request, spec) -> tuple[str, float | None, str]:
    """(name, threshold, note) for a request: its own choice (refused with the reason where it does not
    apply), else its motion preset's (left off, with a note, where it does not apply)."""
    from configs.schema import RequestError, load_presets

    own = request.step_cache is not None
    text = request.step_cache if own else load_presets()[request.preset].step_cache
    try:
        name, value = parse_step_cache(text)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    reason = supported(spec.family, request.task)[name]
    if reason is None:
        return name, value, ""
    if own:
        raise RequestError(f"step cache {name!r} does not apply to {spec.label} {request.task}: {reason}; "
                           f"choose one of {', '.join(n for n, r in supported(spec.family, request.task).items() if r is None)}")
    return "off", None, f"the {request.preset} preset's step cache ({name}) is left off here: {reason}"


def needs_calibration(pipe, name: str) -> bool:
    """MagCache on a model with no ratios recorded yet (the first run calibrates them)."""
    return name == "magcache" and not magcache_path(magcache_key(pipe)).is_file()


def plan_note(name: str, threshold: float | None, steps: int, kept_bytes: int = 0) -> str:
    """One line for the plan: the cache, what it keeps in memory, and the share of block computations it runs."""
    if name == "off":
        return ""
    value = DEFAULTS.get(name) if threshold is None else threshold
    if name == "taylorseer":
        computed = min(steps, 3 + max(0, steps - 3 + int(value) - 1) // int(value))
        share = f"computes blocks on {computed} of {steps} steps ({computed / steps:.0%})"
    elif name in ("pab", "fastercache"):
        share = f"recomputes spatial attention every {int(value)} steps within its timestep window"
    else:
        share = f"skips a step's remaining blocks while the change stays under {value:g} (adaptive: the sidecar says how many)"
    memory = {"first-block": "two hidden-state tensors per branch", "magcache": "one residual per branch",
              "taylorseer": "the output projection's input and its first difference per branch",
              "pab": "one attention output per layer", "fastercache": "attention outputs per layer and branch"}[name]
    size = f", {kept_bytes / 2**30:.2f} GiB counted in the denoise stage" if kept_bytes else ""
    return f"step cache {name}:{value:g} {share}; keeps {memory} (latent-token sized{size})"
