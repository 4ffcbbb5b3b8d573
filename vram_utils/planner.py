"""The planner: pick the fastest offload rung whose predicted peak fits, with a reason per choice.

Pure: a request, a model spec and a `DeviceInfo` (from `probe()`, or synthetic in
tests) in; a `Plan` out. No torch.cuda calls here. `plan()` probes only when it
is not handed a device.

Budget: the chosen GPU's free bytes (driver free + our reserved-but-inactive)
plus `resident_bytes` (what the caller already holds there and will reuse or
drop, e.g. a cached pipeline's weights), minus a margin for what the estimate
does not see: a CUDA context not created yet (~0.3-0.5 GiB), caching-allocator
fragmentation and kernel workspaces. Margin = 512 MiB + 5% of the card.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

from configs.schema import (
    DecodeSettings,
    GenerationRequest,
    ModelSpec,
    Offload,
    Plan,
    get_model_spec,
    load_registry,
)
from vram_utils.archs import ModelArch, arch_for
from vram_utils.estimate import GIB, LADDER, MIB, Estimate, Workload, estimate, workload_for
from vram_utils.ladder import TILE_FLOOR_PX, Ladder, decode_change
from vram_utils.probe import DeviceInfo, GpuInfo, probe

logger = logging.getLogger(__name__)

MARGIN_FIXED_BYTES = 512 * MIB
MARGIN_FRACTION = 0.05
HOST_MARGIN_BYTES = 1 * GIB  # the OS and the app's own growth on the host side
MIN_TILE_PX = TILE_FLOOR_PX  # the ladder's one tile floor (vram_utils/ladder.py)
RUNG_TEXT = {
    "none": "everything on the GPU",
    "model": "model CPU offload",
    "group": "group offload (block level, CUDA streams)",
    "sequential": "sequential offload (leaf level, CUDA streams)",
}


def gib(n: int) -> str:
    """Bytes for a person: GiB with one decimal, MiB below 1 GiB (so a tiny model does not read "0.0 GiB")."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def gpu_margin_bytes(gpu: GpuInfo) -> int:
    return MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * gpu.total_bytes)


# --------------------------------------------------------------------------- decode options


def _decode_options(arch: ModelArch, w: Workload) -> list[DecodeSettings]:
    """The request's decode settings first, then the ladder's decode rungs below them (tiling on, halved
    tiles down to the floor, smaller chunks), none that would change nothing for this frame size."""
    ladder = Ladder(cuda=False, own_chunk=arch.vae.own_chunk, frame_px=(w.height, w.width),
                    spatial_factor=arch.vae.spatial_ratio)
    return ladder.decode_rungs(w.decode)


def _decode_change(old: DecodeSettings, new: DecodeSettings) -> str | None:
    return decode_change(old, new)


# --------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class _Choice:
    offload: Offload
    decode: DecodeSettings
    est: Estimate


def _first_fit(
    arch: ModelArch, w: Workload, rungs: Iterable[Offload], budget: int, backend: str
) -> _Choice | None:
    """The fastest rung (then the least change to decode) whose predicted peak fits `budget`."""
    for rung in rungs:
        for d in _decode_options(arch, w):
            est = estimate(arch, w.replace(decode=d), rung, backend)  # type: ignore[arg-type]
            if est.peak_device_bytes <= budget:
                return _Choice(rung, d, est)
    return None


def _smallest(arch: ModelArch, w: Workload, rung: Offload, backend: str) -> _Choice:
    d = _decode_options(arch, w)[-1]
    return _Choice(rung, d, estimate(arch, w.replace(decode=d), rung, backend))  # type: ignore[arg-type]


def _fewer_frames(spec: ModelSpec, arch: ModelArch, w: Workload, rungs, budget: int, backend: str) -> tuple[int, _Choice] | None:
    """The largest frame count below the request's that fits, respecting the family's frame rule."""
    f = spec.snap_frames(w.frames)
    if f >= w.frames:
        f -= spec.frame_step
    while f >= 1:
        choice = _first_fit(arch, w.replace(frames=f), rungs, budget, backend)
        if choice is not None:
            return f, choice
        f -= spec.frame_step
    return None


def _smaller_model(spec: ModelSpec, w: Workload, rungs, budget: int, backend: str) -> tuple[str, _Choice] | None:
    """The largest registry model for the same task, smaller than this one, that fits at its defaults."""
    mine = arch_for(spec).transformer.params
    candidates = []
    for other in load_registry().values():
        if other.tiny or other.id == spec.id or w.task not in other.tasks:
            continue
        other_arch = arch_for(other)
        if other_arch.transformer.params >= mine:
            continue
        candidates.append((other.family != spec.family, -other_arch.transformer.params, other, other_arch))
    for _, _, other, other_arch in sorted(candidates, key=lambda c: c[:2]):
        h, wd = other.default_resolution
        ow = w.replace(frames=other.default_frames, height=h, width=wd, dtype_bytes=2 if other.default_dtype != "float32" else 4)
        choice = _first_fit(other_arch, ow, rungs, budget, backend)
        if choice is not None:
            return other.id, choice
    return None


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass
class _Target:
    """Where a plan runs and what it may use: the device, its budget, the rungs it may search, and the
    reasons collected so far (one planning pass; not shared)."""

    backend: str  # "cuda" or "cpu"
    budget: int
    rungs: tuple[Offload, ...]
    where: str  # for a person: "GPU0 (name)" or "host RAM"
    device_name: str  # "cuda:<index>" or "cpu"
    gpu: GpuInfo | None
    reasons: list[str]

    @property
    def search_rungs(self) -> tuple[Offload, ...]:
        """Rungs a suggestion may use: the whole ladder on a GPU, the requested rung on the CPU."""
        return LADDER if self.backend == "cuda" else self.rungs

    def rung_text(self, offload: Offload) -> str:
        return RUNG_TEXT[offload] if self.backend == "cuda" else "the CPU run"


def _target(request: GenerationRequest, device: DeviceInfo, resident_bytes: int) -> _Target:
    """The device a run goes to, its budget (free bytes + what the caller already holds there - margin)."""
    requested = request.offload
    gpu = device.best_gpu if device.cuda else None
    if gpu is None:
        budget = max(0, device.host_available_bytes + resident_bytes - HOST_MARGIN_BYTES)
        rungs = ("none",) if requested == "auto" else (requested,)
        why = ("offload none: no CUDA GPU: running on the CPU" if requested == "auto"
               else f"offload {requested}: as requested (no CUDA GPU: it onloads to the CPU)")
        return _Target("cpu", budget, rungs, "host RAM", "cpu", None, [why])  # type: ignore[arg-type]
    budget = max(0, gpu.free_bytes + resident_bytes - gpu_margin_bytes(gpu))
    rungs = LADDER if requested == "auto" else (requested,)
    return _Target("cuda", budget, rungs, f"GPU{gpu.index} ({gpu.name})", f"cuda:{gpu.index}", gpu, [])  # type: ignore[arg-type]


def _suggest(spec: ModelSpec, arch: ModelArch, w: Workload, t: _Target) -> tuple[int | None, str | None]:
    """When nothing fits: the largest frame count, a smaller model and INT8 weights that would, as reasons."""
    fewer = _fewer_frames(spec, arch, w, t.search_rungs, t.budget, t.backend)
    if fewer is not None:
        rung = RUNG_TEXT[fewer[1].offload] if t.backend == "cuda" else "CPU"
        t.reasons.append(f"suggestion: {fewer[0]} frames fit ({rung}, predicted {gib(fewer[1].est.peak_device_bytes)})")
    smaller = _smaller_model(spec, w, t.search_rungs, t.budget, t.backend)
    if smaller is not None:
        t.reasons.append(f"suggestion: {smaller[0]} fits at its defaults (predicted {gib(smaller[1].est.peak_device_bytes)})")
    if w.quant == "none" and t.backend == "cuda":
        q = _first_fit(arch, w.replace(quant="int8"), LADDER, t.budget, t.backend)
        if q is not None:
            t.reasons.append(f"suggestion: INT8 weights fit ({RUNG_TEXT[q.offload]}, predicted {gib(q.est.peak_device_bytes)})")
    return (fewer[0] if fewer else None), (smaller[0] if smaller else None)


def _rung_reason(arch: ModelArch, w: Workload, t: _Target, choice: _Choice, auto: bool) -> str:
    peak = gib(choice.est.peak_device_bytes)
    if t.backend == "cpu":  # no live number here: what is free moves from one probe to the next, the decision does not
        return f"host RAM: predicted {peak}, within what is available"
    if not auto:
        return f"offload {choice.offload}: as requested, predicted {peak} of {gib(t.budget)}"
    faster = LADDER[: LADDER.index(choice.offload)]
    needs = ", ".join(f"{r} {gib(_smallest(arch, w, r, t.backend).est.peak_device_bytes)}" for r in faster)
    why = f"; faster rungs need more ({needs})" if faster else ""
    assert t.gpu is not None
    return (f"offload {choice.offload}: {RUNG_TEXT[choice.offload]} fits {peak} in {gib(t.budget)} free on {t.where} "
            f"after a {gib(gpu_margin_bytes(t.gpu))} margin{why}")


def _decode_reason(asked: DecodeSettings, chosen: DecodeSettings) -> str:
    change = _decode_change(asked, chosen)
    if change:
        return f"decode: {change} so the decode fits"
    tiling = f"on ({chosen.tile_x}x{chosen.tile_y} px tiles)" if chosen.enable_vae_tiling else "off"
    return f"decode: VAE tiling {tiling} as set"


def _refusal(spec: ModelSpec, w: Workload, t: _Target, choice: _Choice, device: DeviceInfo,
             hints: tuple[int | None, str | None]) -> str:
    """Why a run that needs more than the device has in all, even empty, is refused ("" when it is not).

    Estimates carry margins, so a run that only misses the free memory is still tried."""
    total = t.gpu.total_bytes if t.gpu is not None else device.host_total_bytes
    need = choice.est.peak_device_bytes
    if need <= total:
        return ""
    frames, model = hints
    hint = (f"; {frames} frames would fit" if frames else "") + (f"; {model} fits at its defaults" if model else "")
    return (
        f"{w.width}x{w.height}, {w.frames} frames on {spec.id} is too large for this machine: the planner "
        f"predicts {gib(need)} at its lowest setting ({t.rung_text(choice.offload)}), and {t.where} has "
        f"{gib(total)} in all. Allowed: a size, frame count or model whose estimate fits{hint}"
    )


def plan_for(
    request: GenerationRequest, spec: ModelSpec, device: DeviceInfo, resident_bytes: int = 0
) -> Plan:
    """The plan for `request` on `device` (pure)."""
    # 1. What the run computes, on which architecture, on which device with which budget.
    w, arch = workload_for(request, spec), arch_for(spec)
    t = _target(request, device, resident_bytes)
    if arch.note:
        t.reasons.insert(0, f"estimate: {arch.note}")

    # 2. The fastest rung (then the least change to the decode) that fits; else the lowest, with suggestions.
    choice = _first_fit(arch, w, t.rungs, t.budget, t.backend)
    fits = choice is not None
    hints: tuple[int | None, str | None] = (None, None)
    if choice is None:
        choice = _smallest(arch, w, t.rungs[-1], t.backend)
        t.reasons.append(f"nothing fits: even {t.rung_text(choice.offload)} needs "
                         f"{gib(choice.est.peak_device_bytes)}, {t.where} has {gib(t.budget)} to spare")
        hints = _suggest(spec, arch, w, t)
    else:
        t.reasons.append(_rung_reason(arch, w, t, choice, request.offload == "auto"))

    # 3. Why, for the rest: the decode, the host RAM on a GPU machine, the precision.
    est = choice.est
    t.reasons.append(_decode_reason(w.decode, choice.decode))
    if t.backend == "cuda":
        host_budget = device.host_available_bytes + device.process_rss_bytes - HOST_MARGIN_BYTES
        if est.peak_host_bytes > host_budget:
            t.reasons.append(f"warning: host RAM may be short: the weights need {gib(est.peak_host_bytes)} in RAM, "
                             f"{gib(host_budget)} is available")
    if w.quant != "none":
        t.reasons.append(f"precision: {w.quant} transformer weights, as set")
    refused = "" if fits else _refusal(spec, w, t, choice, device, hints)
    if refused:
        t.reasons.insert(0, f"refused: {refused}")

    # 4. The plan.
    summary = (f"offload {choice.offload}, tiling {'on' if choice.decode.enable_vae_tiling else 'off'}, "
               f"peak {'GPU' if t.backend == 'cuda' else 'RAM'} {gib(est.peak_device_bytes)}"
               + ("" if fits else " (does not fit)"))
    return Plan(
        offload=choice.offload, quant=w.quant, decode=choice.decode,
        predicted_peak_gpu_bytes=est.peak_gpu_bytes, predicted_peak_host_bytes=est.peak_host_bytes,
        stages=est.stage_dict(), reasons=tuple(t.reasons), summary=summary, device=t.device_name, fits=fits,
        budget_bytes=t.budget, peak_stage=est.peak_stage, suggested_frames=hints[0], suggested_model=hints[1],
        refused=refused,
    )


def plan(
    request: GenerationRequest, spec: ModelSpec, device: DeviceInfo | None = None, resident_bytes: int = 0
) -> Plan:
    """Plan a run. `device` defaults to `probe()` of this machine; everything after that is pure."""
    result = plan_for(request, spec, device if device is not None else probe(), resident_bytes)
    logger.info("plan for %s %s: %s", spec.id, request.task, result.summary)
    for reason in result.reasons:
        logger.debug("  %s", reason)
    return result


# --------------------------------------------------------------------------- seed 003 API


def _default_request(spec: ModelSpec) -> GenerationRequest:
    task = "t2v" if "t2v" in spec.tasks else next(iter(spec.tasks))
    return GenerationRequest(model=spec.id, task=task, prompt="plan")  # type: ignore[arg-type]


def _spec(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else get_model_spec(model)


def get_recommended_offload_strategy(model: str | ModelSpec, device: DeviceInfo | None = None) -> Offload:
    """The rung the planner picks for the model's default request here: "none" | "model" | "group" | "sequential".

    Without a CUDA GPU: "none" (everything runs on the CPU)."""
    spec = _spec(model)
    return plan(_default_request(spec), spec, device).offload


def check_vram_availability(
    model: str | ModelSpec, required_buffer_gb: float = 2.0, device: DeviceInfo | None = None
) -> tuple[bool, str]:
    """(is_sufficient, message): does the model's default request fit the free GPU memory with
    `required_buffer_gb` GiB to spare, on the rung the planner would pick?"""
    spec = _spec(model)
    info = device if device is not None else probe()
    if not info.cuda or not info.gpus:
        return False, f"no CUDA GPU: {spec.id} would run on the CPU ({info.summary()})"
    p = plan_for(_default_request(spec), spec, info)
    gpu = info.best_gpu
    assert gpu is not None
    buffer = int(required_buffer_gb * GIB)
    need = p.predicted_peak_gpu_bytes + buffer
    ok = p.fits and need <= gpu.free_bytes
    head = (
        f"{spec.id}: offload {p.offload} needs {gib(p.predicted_peak_gpu_bytes)} + {required_buffer_gb:.1f} GiB buffer, "
        f"{gib(gpu.free_bytes)} free on GPU{gpu.index}"
    )
    if ok:
        return True, head
    hints = [f"{p.suggested_frames} frames" if p.suggested_frames else "", p.suggested_model or ""]
    hints = [h for h in hints if h]
    return False, head + (f"; try {' or '.join(hints)}" if hints else "")
