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
from vram_utils.probe import DeviceInfo, GpuInfo, probe

logger = logging.getLogger(__name__)

MARGIN_FIXED_BYTES = 512 * MIB
MARGIN_FRACTION = 0.05
HOST_MARGIN_BYTES = 1 * GIB  # the OS and the app's own growth on the host side
MIN_TILE_PX = 128  # smaller tiles cost more in seams and time than they save
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


def _decode_options(d: DecodeSettings) -> list[DecodeSettings]:
    """The request's decode settings first, then cheaper ones: tiling on, then halved tiles."""
    options = [d]
    tiled = d if d.enable_vae_tiling else dataclasses.replace(d, enable_vae_tiling=True)
    if tiled is not d:
        options.append(tiled)
    tx, ty, sx, sy = tiled.tile_x, tiled.tile_y, tiled.tile_stride_x, tiled.tile_stride_y
    while min(tx, ty) // 2 >= MIN_TILE_PX:
        tx, ty, sx, sy = tx // 2, ty // 2, max(MIN_TILE_PX // 2, sx // 2), max(MIN_TILE_PX // 2, sy // 2)
        options.append(dataclasses.replace(tiled, tile_x=tx, tile_y=ty, tile_stride_x=sx, tile_stride_y=sy))
    return options


def _decode_change(old: DecodeSettings, new: DecodeSettings) -> str | None:
    if old == new:
        return None
    if not old.enable_vae_tiling:
        return f"VAE tiling on ({new.tile_x}x{new.tile_y} px tiles)"
    return f"VAE tiles {old.tile_x}x{old.tile_y} -> {new.tile_x}x{new.tile_y} px"


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
        for d in _decode_options(w.decode):
            est = estimate(arch, w.replace(decode=d), rung, backend)  # type: ignore[arg-type]
            if est.peak_device_bytes <= budget:
                return _Choice(rung, d, est)
    return None


def _smallest(arch: ModelArch, w: Workload, rung: Offload, backend: str) -> _Choice:
    d = _decode_options(w.decode)[-1]
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


def plan_for(
    request: GenerationRequest, spec: ModelSpec, device: DeviceInfo, resident_bytes: int = 0
) -> Plan:
    """The plan for `request` on `device` (pure)."""
    w = workload_for(request, spec)
    arch = arch_for(spec)
    reasons: list[str] = []
    if arch.note:
        reasons.append(f"estimate: {arch.note}")
    requested = request.offload
    gpu = device.best_gpu if device.cuda else None

    if gpu is None:
        backend = "cpu"
        budget = max(0, device.host_available_bytes + resident_bytes - HOST_MARGIN_BYTES)
        rungs: tuple[Offload, ...] = ("none",) if requested == "auto" else (requested,)  # type: ignore[assignment]
        where, device_name = "host RAM", "cpu"
        if requested == "auto":
            reasons.append("offload none: no CUDA GPU: running on the CPU")
        else:
            reasons.append(f"offload {requested}: as requested (no CUDA GPU: it onloads to the CPU)")
    else:
        backend = "cuda"
        margin = gpu_margin_bytes(gpu)
        budget = max(0, gpu.free_bytes + resident_bytes - margin)
        rungs = LADDER if requested == "auto" else (requested,)  # type: ignore[assignment]
        where, device_name = f"GPU{gpu.index} ({gpu.name})", f"cuda:{gpu.index}"

    choice = _first_fit(arch, w, rungs, budget, backend)
    fits = choice is not None
    suggested_frames = suggested_model = None
    if choice is None:
        choice = _smallest(arch, w, rungs[-1], backend)
        need = choice.est.peak_device_bytes
        reasons.append(
            f"nothing fits: even {RUNG_TEXT[choice.offload] if backend == 'cuda' else 'the CPU run'} needs "
            f"{gib(need)}, {where} has {gib(budget)} to spare"
        )
        fewer = _fewer_frames(spec, arch, w, LADDER if backend == "cuda" else rungs, budget, backend)
        if fewer is not None:
            suggested_frames = fewer[0]
            reasons.append(
                f"suggestion: {fewer[0]} frames fit ({RUNG_TEXT[fewer[1].offload] if backend == 'cuda' else 'CPU'}, "
                f"predicted {gib(fewer[1].est.peak_device_bytes)})"
            )
        smaller = _smaller_model(spec, w, LADDER if backend == "cuda" else rungs, budget, backend)
        if smaller is not None:
            suggested_model = smaller[0]
            reasons.append(f"suggestion: {smaller[0]} fits at its defaults (predicted {gib(smaller[1].est.peak_device_bytes)})")
        if w.quant == "none" and backend == "cuda":
            q = _first_fit(arch, w.replace(quant="int8"), LADDER, budget, backend)
            if q is not None:
                reasons.append(f"suggestion: INT8 weights fit ({RUNG_TEXT[q.offload]}, predicted {gib(q.est.peak_device_bytes)})")
    elif backend == "cuda":
        if requested == "auto":
            faster = LADDER[: LADDER.index(choice.offload)]
            why = f"; faster rungs need more ({', '.join(f'{r} {gib(_smallest(arch, w, r, backend).est.peak_device_bytes)}' for r in faster)})" if faster else ""
            reasons.append(
                f"offload {choice.offload}: {RUNG_TEXT[choice.offload]} fits {gib(choice.est.peak_device_bytes)} "
                f"in {gib(budget)} free on {where} after a {gib(gpu_margin_bytes(gpu))} margin{why}"
            )
        else:
            reasons.append(f"offload {choice.offload}: as requested, predicted {gib(choice.est.peak_device_bytes)} of {gib(budget)}")
    else:  # no live number here: what is free moves from one probe to the next, the decision does not
        reasons.append(f"host RAM: predicted {gib(choice.est.peak_device_bytes)}, within what is available")

    est = choice.est
    change = _decode_change(w.decode, choice.decode)
    if change:
        reasons.append(f"decode: {change} so the decode fits")
    else:
        d = choice.decode
        reasons.append(
            f"decode: VAE tiling {'on (' + str(d.tile_x) + 'x' + str(d.tile_y) + ' px tiles)' if d.enable_vae_tiling else 'off'}"
            " as set"
        )
    if backend == "cuda":
        host_need = est.peak_host_bytes
        host_budget = device.host_available_bytes + device.process_rss_bytes - HOST_MARGIN_BYTES
        if host_need > host_budget:
            reasons.append(
                f"warning: host RAM may be short: the weights need {gib(host_need)} in RAM, "
                f"{gib(host_budget)} is available"
            )
    if w.quant != "none":
        reasons.append(f"precision: {w.quant} transformer weights, as set")

    refused = ""
    if not fits:
        # Estimates carry margins, so a run that misses the free memory is still tried; one that needs
        # more than the device has in all, even empty, cannot run and is refused with the estimate.
        total = gpu.total_bytes if gpu is not None else device.host_total_bytes
        if choice.est.peak_device_bytes > total:
            hint = f"; {suggested_frames} frames would fit" if suggested_frames else ""
            hint += f"; {suggested_model} fits at its defaults" if suggested_model else ""
            refused = (
                f"{w.width}x{w.height}, {w.frames} frames on {spec.id} is too large for this machine: the planner "
                f"predicts {gib(choice.est.peak_device_bytes)} at its lowest setting "
                f"({RUNG_TEXT[choice.offload] if backend == 'cuda' else 'the CPU run'}), and {where} has "
                f"{gib(total)} in all. Allowed: a size, frame count or model whose estimate fits{hint}"
            )
            reasons.insert(0, f"refused: {refused}")
    summary = (
        f"offload {choice.offload}, tiling {'on' if choice.decode.enable_vae_tiling else 'off'}, "
        f"peak {'GPU' if backend == 'cuda' else 'RAM'} {gib(est.peak_device_bytes)}"
        + ("" if fits else " (does not fit)")
    )
    return Plan(
        offload=choice.offload,
        quant=w.quant,
        decode=choice.decode,
        predicted_peak_gpu_bytes=est.peak_gpu_bytes,
        predicted_peak_host_bytes=est.peak_host_bytes,
        stages=est.stage_dict(),
        reasons=tuple(reasons),
        summary=summary,
        device=device_name,
        fits=fits,
        budget_bytes=budget,
        peak_stage=est.peak_stage,
        suggested_frames=suggested_frames,
        suggested_model=suggested_model,
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
