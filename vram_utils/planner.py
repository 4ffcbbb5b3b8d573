"""The planner: pick the fastest (offload rung, host rung) whose predicted GPU peak fits the GPU and whose
predicted host peak fits the RAM, with a reason per choice.

Pure: a request, a model spec and a `DeviceInfo` (from `probe()`, or synthetic in
tests) in; a `Plan` out. No torch.cuda calls here. `plan()` probes the device and the free disk under
$FITVIDEO_HOME only when it is not handed them.

Two budgets (DESIGN.md "Memory: the ladder, two budgets"):
  GPU   the chosen GPU's free bytes (driver free + our reserved-but-inactive) plus `resident_bytes` (what
        the caller already holds there and will reuse or drop, e.g. a cached pipeline's weights), minus a
        margin for what the estimate does not see: a CUDA context not created yet (~0.3-0.5 GiB),
        caching-allocator fragmentation and kernel workspaces. Margin = 512 MiB + 5% of the card.
  RAM   `host_available_bytes + resident_host_bytes - margin`: the room under the host limit that binds (the
        machine's available memory, or a container's memory cgroup: vram_utils/host_budget.py), plus the cache's
        weights for this run already in RAM (the run needs no second copy), minus a margin for the OS and the
        app's own growth (1 GiB on a machine; 5 % of a container's limit, at least 64 MiB: the OS is outside it).
        Without a GPU it is the only budget. What must fit it is the host need: every byte the run holds, or on
        the in-place rung its anonymous memory plus the layer computing (memory-mapped weights are file pages the
        kernel drops and reads again; see vram_utils/estimate.py).

Search order, fastest first: host rungs outer, offload rungs inner (ram with none, model, group, sequential;
then text-encoder-first with each; ...). A lower offload rung never needs less RAM (streams pin a copy of
what they offload), while a lower host rung can let a faster offload rung fit the GPU too (one expert or no
text encoder beside the transformer); keeping every weight in RAM is the status quo, so it is tried with every
offload rung first. The disk rung (the transformers' block groups read from files) sits on top of any offload
rung (vram_utils/offload.py says how they compose) and is searched only when the free disk under
$FITVIDEO_HOME holds the transformers' weights.

When nothing fits, the plan is the closest pair (fewest bytes over the two budgets) with suggestions (fewer
frames, a smaller model, INT8, the free disk the disk rung needs). It is refused outright when no pair fits
the GPU's total memory and the RAM available (`_refusal`): missing free GPU memory is recoverable (an
out-of-memory steps down the ladder), running out of host RAM is not (the OS kills the app or swaps).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from configs.paths import fitvideo_home
from configs.schema import DecodeSettings, GenerationRequest, ModelSpec, Offload, Plan
from configs.registry import get_model_spec
from vram_utils.archs import ModelArch, arch_for
from vram_utils.estimate import (
    GIB, LADDER, MIB, Estimate, Workload, apart_peak_bytes, disk_bytes_needed, estimate, workload_for,
)
from vram_utils.ladder import (
    HOST_MEASURES,
    HOST_RUNG_TEXT,
    auto_tiles,
    host_flags,
    host_rungs,
    tile_layout,
    tile_text,
)
from vram_utils.probe import DeviceInfo, GpuInfo, probe

from vram_utils.search import (  # noqa: F401  (the margins and the search are the planner's API too)
    DISK_MARGIN_BYTES, HOST_MARGIN_BYTES, LIMIT_MARGIN_FRACTION, LIMIT_MARGIN_MIN_BYTES, MARGIN_FIXED_BYTES,
    MARGIN_FRACTION, MIN_TILE_PX, RUNG_TEXT, _auto_options, _Choice, _decode_change, _decode_options, _disk_ok,
    _fewer_frames, _first_fit, _host_workload, _ladder_options, _lowest, _smaller_model, _smallest, _Target,
)

logger = logging.getLogger(__name__)

def gib(n: int) -> str:
    """Bytes for a person: GiB with one decimal, MiB below 1 GiB (so a tiny model does not read "0.0 GiB")."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def gpu_margin_bytes(gpu: GpuInfo) -> int:
    return MARGIN_FIXED_BYTES + int(MARGIN_FRACTION * gpu.total_bytes)


def host_margin_bytes(device: DeviceInfo) -> int:
    """What the host budget keeps back: 1 GiB on a machine (the OS lives there too); under a container's or the
    commit limit 5 % of it, at least 64 MiB and at most 1 GiB."""
    if device.host_limit_kind == "machine":
        return HOST_MARGIN_BYTES
    return min(HOST_MARGIN_BYTES, max(LIMIT_MARGIN_MIN_BYTES, int(LIMIT_MARGIN_FRACTION * device.host_total_bytes)))


def disk_free_bytes(path: Path | None = None) -> int:
    """Free bytes on the disk that holds `path` (default $FITVIDEO_HOME; its nearest existing folder)."""
    p = path or fitvideo_home()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# --------------------------------------------------------------------------- plan


def _target(request: GenerationRequest, device: DeviceInfo, resident_bytes: int, resident_host_bytes: int,
            disk_free: int | None) -> _Target:
    """The device a run goes to, its budget (free bytes + what the caller already holds there - margin),
    and the host budget."""
    requested = request.offload
    gpu = device.best_gpu if device.cuda else None
    margin = host_margin_bytes(device)
    limit = device.host_limit_text
    if gpu is None:  # the CPU computes: the caller's resident bytes are host bytes
        budget = max(0, device.host_available_bytes + max(resident_bytes, resident_host_bytes) - margin)
        rungs = ("none",) if requested == "auto" else (requested,)
        why = ("offload none: no CUDA GPU: running on the CPU" if requested == "auto"
               else f"offload {requested}: as requested (no CUDA GPU: it onloads to the CPU)")
        return _Target("cpu", budget, rungs, "host RAM", "cpu", None, [why], budget, disk_free, limit,  # type: ignore[arg-type]
                       margin)
    budget = max(0, gpu.free_bytes + resident_bytes - gpu_margin_bytes(gpu))
    host_budget = max(0, device.host_available_bytes + resident_host_bytes - margin)
    rungs = LADDER if requested == "auto" else (requested,)
    return _Target("cuda", budget, rungs, f"GPU{gpu.index} ({gpu.name})", f"cuda:{gpu.index}", gpu, [],  # type: ignore[arg-type]
                   host_budget, disk_free, limit, margin)


def _peaks(est: Estimate, t: _Target) -> str:
    """"GPU a of b, RAM c of d" (the CPU backend: RAM only); on the in-place rung the RAM that must stay resident
    and the mapped weights read in place."""
    ram = f"RAM {gib(est.host_need_bytes)} of {gib(t.host_budget)}"
    if HOST_MEASURES[est.host_rung].in_place:
        ram += f" (+{gib(est.peak_host_mapped_bytes)} of mapped weights read in place)"
    return f"GPU {gib(est.peak_device_bytes)} of {gib(t.budget)}, {ram}" if t.backend == "cuda" else ram


def _suggest(spec: ModelSpec, arch: ModelArch, w: Workload, t: _Target) -> tuple[int | None, str | None]:
    """When nothing fits: the largest frame count, a smaller model, INT8 weights and the disk rung that
    would, as reasons."""
    fewer = _fewer_frames(spec, arch, w, t)
    if fewer is not None:
        rung = RUNG_TEXT[fewer[1].offload] if t.backend == "cuda" else "CPU"
        t.reasons.append(f"suggestion: {fewer[0]} frames fit ({rung}, {_peaks(fewer[1].est, t)})")
    smaller = _smaller_model(spec, w, t)
    if smaller is not None:
        t.reasons.append(f"suggestion: {smaller[0]} fits at its defaults ({_peaks(smaller[1].est, t)})")
    if w.quant == "none" and t.backend == "cuda":
        q = _first_fit(arch, w.replace(quant="int8"), t, LADDER)
        if q is not None:
            t.reasons.append(f"suggestion: INT8 weights fit ({RUNG_TEXT[q.offload]}, {_peaks(q.est, t)})")
    if not _disk_ok(arch, w, t):
        disk = _first_fit(arch, w, t, t.search_rungs, any_disk=True)
        if disk is not None and HOST_MEASURES[disk.host_rung].disk:
            have = "was not checked" if t.disk_free is None else f"has {gib(t.disk_free)} free"
            t.reasons.append(f"suggestion: the disk rung fits ({_peaks(disk.est, t)}) but needs "
                             f"{gib(disk_bytes_needed(arch, w) + DISK_MARGIN_BYTES)} free disk under "
                             f"{fitvideo_home()}; it {have}")
    return (fewer[0] if fewer else None), (smaller[0] if smaller else None)


def _rung_reason(arch: ModelArch, w: Workload, t: _Target, choice: _Choice, auto: bool) -> str:
    peak = gib(choice.est.peak_device_bytes)
    if t.backend == "cpu":  # no live number here: what is free moves from one probe to the next, the decision does not
        return f"host RAM: predicted {gib(choice.est.host_need_bytes)}, within what is available ({t.host_limit})"
    if not auto:
        return f"offload {choice.offload}: as requested, predicted {peak} of {gib(t.budget)}"
    faster = LADDER[: LADDER.index(choice.offload)]
    needs = ", ".join(f"{r} {gib(_smallest(arch, w, r, t.backend).est.peak_device_bytes)}" for r in faster)
    why = f"; faster rungs need more ({needs})" if faster else ""
    assert t.gpu is not None
    return (f"offload {choice.offload}: {RUNG_TEXT[choice.offload]} fits {peak} in {gib(t.budget)} free on {t.where} "
            f"after a {gib(gpu_margin_bytes(t.gpu))} margin{why}")


def _host_reason(arch: ModelArch, w: Workload, t: _Target, choice: _Choice) -> str:
    """The host rung in one line: what it does, its host peak against the RAM budget, what faster ones need."""
    rungs = host_rungs(arch.experts, w.quant, bool(w.mapped))
    faster = rungs[: rungs.index(choice.host_rung)]
    needs = []
    for host in faster:
        hw = _host_workload(w, host).replace(decode=choice.decode)
        needs.append(f"{host} {gib(estimate(arch, hw, choice.offload, t.backend).peak_host_bytes)}")  # type: ignore[arg-type]
    why = f"; faster host rungs need more ({', '.join(needs)})" if needs else ""
    return (f"host RAM {choice.host_rung}: {HOST_RUNG_TEXT[choice.host_rung]}; predicted {gib(choice.est.peak_host_bytes)} "
            f"in {gib(t.host_budget)} available ({t.host_limit}) after a {gib(t.host_margin)} margin{why}")


def _decode_reason(arch: ModelArch, w: Workload, chosen: DecodeSettings, fits: bool = True) -> str:
    """The decode in one line: what was chosen and why, the tiles the stream decodes and their pixel overhead
    (pixels through the decoder over the frame's pixels)."""
    layout = f"{tile_text(chosen, (w.height, w.width), arch.vae.spatial_ratio)} the frame's pixels through the decoder"
    change = _decode_change(w.decode, chosen)
    if auto_tiles(w.decode):
        options = _decode_options(arch, w)
        i, seed = options.index(chosen), options.index(w.decode)
        if not fits:
            return f"decode: the closest setting ({layout})"
        if i == 0:
            return "decode: untiled, the whole frame fits (1.00x the frame's pixels through the decoder)"
        if i < seed:
            return f"decode: the largest tiles that fit ({layout}); larger ones do not"
        what = "the seed's tiles (272 px, stride 144x128)" if i == seed else change
        return f"decode: {what}, as larger tiles do not fit ({layout})"
    if change:
        return f"decode: {change} so the decode fits ({layout})"
    if not chosen.enable_vae_tiling:
        return "decode: VAE tiling off as set"  # untiled: 1.00x the frame's pixels, nothing to add
    return f"decode: VAE tiling on ({chosen.tile_x}x{chosen.tile_y} px tiles) as set ({layout})"


def _refusal(spec: ModelSpec, arch: ModelArch, w: Workload, t: _Target, device: DeviceInfo,
             hints: tuple[int | None, str | None]) -> str:
    """Why a run is refused ("" when it is not): no pair fits the GPU's total memory and the RAM available
    (free disk aside: the suggestions say what it needs). Estimates carry margins and a GPU out-of-memory steps
    down the ladder, so a run that only misses the free GPU memory is still tried; running out of host RAM
    gets the app killed or the computer swapping, so on a GPU machine a run the RAM cannot hold is refused.
    Without a GPU (RAM is the computing device, and the torch allocator's failure is recoverable) the bound
    stays the RAM in all."""
    gpu_total = t.gpu.total_bytes if t.gpu is not None else device.host_total_bytes
    # under a container's limit nothing swaps: what does not fit the room left under it is killed, so it is the bound
    limited = device.host_limit_kind != "machine"
    host_bound = t.host_budget if t.backend == "cuda" or limited else device.host_total_bytes
    if t.backend == "cpu" and limited:
        gpu_total = host_bound
    empty = dataclasses.replace(t, budget=gpu_total, host_budget=host_bound, reasons=[])
    if _first_fit(arch, w, empty, any_disk=True) is not None:
        return ""
    closest = _lowest(arch, w, empty)
    frames, model = hints
    hint = (f"; {frames} frames would fit" if frames else "") + (f"; {model} fits at its defaults" if model else "")
    head = f"{w.width}x{w.height}, {w.frames} frames on {spec.id} is too large for this machine: the planner predicts"
    need, host_need = closest.est.peak_device_bytes, closest.est.host_need_bytes
    if t.backend == "cpu":
        room = f"{gib(gpu_total)} free under the {t.host_limit}" if limited else f"{gib(gpu_total)} in all"
        return (f"{head} {gib(host_need)} at its lowest setting ({t.rung_text(closest.offload)}, host "
                f"{closest.host_rung}), and {t.where} has {room}. Allowed: a size, frame count or model whose "
                f"estimate fits{hint}")
    return (f"{head} GPU {gib(need)} and RAM {gib(host_need)} at its closest setting ({t.rung_text(closest.offload)}, "
            f"host {closest.host_rung}), and {t.where} has {gib(gpu_total)} in all, the computer {gib(host_bound)} of "
            f"RAM available after the margin ({t.host_limit}). Allowed: a size, frame count or model whose estimate "
            f"fits{hint}")


def _summary(arch: ModelArch, w: Workload, choice: _Choice, t: _Target, fits: bool) -> str:
    est = choice.est
    layout = tile_layout(choice.decode, (w.height, w.width), arch.vae.spatial_ratio)
    tiling = (f"on ({len(layout.ys)}x{len(layout.xs)} tiles, {layout.overhead:.2f}x pixels)" if layout.tiled
              else "off")
    limit = "" if t.host_limit.startswith("machine") else f" ({t.host_limit})"  # where the RAM budget comes from
    return (f"offload {choice.offload}, host {choice.host_rung}, tiling {tiling}, peak {_peaks(est, t)}{limit}"
            + ("" if fits else " (does not fit)"))


def _apart(arch: ModelArch, w: Workload, t: _Target, device: DeviceInfo, request: GenerationRequest,
           choice: _Choice | None) -> tuple[_Choice, str, str] | None:
    """Components across GPUs in one box: with two or more GPUs and no context parallel, the text encoder on the
    GPU with the most free memory after the run's own, when that lets the transformer run without offload where it
    could not beside the encoder. (choice, the reason, "cuda:<second>"), else None."""
    if t.backend != "cuda" or request.offload != "auto" or request.context_parallel > 1 or len(device.gpus) < 2:
        return None
    if choice is not None and choice.offload == "none":
        return None
    second = max((g for g in device.gpus if t.gpu is None or g.index != t.gpu.index), key=lambda g: g.free_bytes)
    room, aw = max(0, second.free_bytes - gpu_margin_bytes(second)), w.replace(encoder_apart=True)
    need = apart_peak_bytes(arch, aw)
    found = _first_fit(arch, aw, t, rungs=("none",)) if need <= room else None
    if found is None:
        return None
    return found, (f"text encoder on GPU{second.index} ({second.name}): {gib(need)} of {gib(room)} free there, so "
                   f"the transformer runs without offload on {t.where}"), f"cuda:{second.index}"


def plan_for(
    request: GenerationRequest, spec: ModelSpec, device: DeviceInfo, resident_bytes: int = 0,
    resident_host_bytes: int = 0, disk_free: int | None = None,
) -> Plan:
    """The plan for `request` on `device` (pure). `resident_host_bytes`: the cache's weights for this run
    already in RAM; `disk_free`: free bytes under $FITVIDEO_HOME (None: not checked, no disk rung)."""
    # 1. What the run computes, on which architecture, on which device with which budgets.
    w, arch = workload_for(request, spec), arch_for(spec, request.task)
    t = _target(request, device, resident_bytes, resident_host_bytes, disk_free)
    if arch.note:
        t.reasons.insert(0, f"estimate: {arch.note}")

    # 2. The fastest pair (then the least change to the decode) that fits both; else the lowest, with suggestions.
    # With two GPUs, the text encoder on the second one first when that spares the transformer any offload.
    choice = _first_fit(arch, w, t)
    apart = _apart(arch, w, t, device, request, choice)
    if apart is not None:
        choice, w = apart[0], w.replace(encoder_apart=True)
        t.reasons.append(apart[1])
    fits = choice is not None
    hints: tuple[int | None, str | None] = (None, None)
    if choice is None:
        choice = _lowest(arch, w, t)
        t.reasons.append(f"nothing fits: the closest, {t.rung_text(choice.offload)} with host {choice.host_rung}, "
                         f"predicts {_peaks(choice.est, t)}")
        hints = _suggest(spec, arch, w, t)
    else:
        t.reasons.append(_rung_reason(arch, w, t, choice, request.offload == "auto"))

    # 3. Why, for the rest: the host RAM, the decode, the precision.
    est = choice.est
    if t.backend == "cuda" or choice.host_rung != "ram":
        t.reasons.append(_host_reason(arch, w, t, choice))
    t.reasons.append(_decode_reason(arch, w, choice.decode, fits))
    quant = choice.quant or w.quant
    if w.quant != "none":
        t.reasons.append(f"precision: {w.quant} transformer weights, as set")
    refused = "" if fits else _refusal(spec, arch, w, t, device, hints)
    if refused:
        t.reasons.insert(0, f"refused: {refused}")

    # 4. The plan.
    flags = host_flags(choice.host_rung, arch.experts)
    flags.pop("quant", None)
    return Plan(
        offload=choice.offload, quant=quant, decode=choice.decode,  # type: ignore[arg-type]
        predicted_peak_gpu_bytes=est.peak_gpu_bytes, predicted_peak_host_bytes=est.peak_host_bytes,
        stages=est.stage_dict(), reasons=tuple(t.reasons), summary=_summary(arch, w, choice, t, fits), device=t.device_name,
        fits=fits, budget_bytes=t.budget, peak_stage=est.peak_stage, suggested_frames=hints[0],
        suggested_model=hints[1], refused=refused, host_stages=est.host_stage_dict(), host_budget_bytes=t.host_budget,
        host_limit=t.host_limit, host_need_bytes=est.host_need_bytes, predicted_anon_host_bytes=est.peak_host_anon_bytes,
        predicted_mapped_host_bytes=est.peak_host_mapped_bytes, encoder_device=apart[2] if apart else "", **flags,
    )


def plan(
    request: GenerationRequest, spec: ModelSpec, device: DeviceInfo | None = None, resident_bytes: int = 0,
    resident_host_bytes: int = 0, disk_free: int | None = None,
) -> Plan:
    """Plan a run. `device` defaults to `probe()` of this machine and `disk_free` to the free disk under
    $FITVIDEO_HOME; everything after that is pure."""
    free = disk_free if disk_free is not None else disk_free_bytes()
    result = plan_for(request, spec, device if device is not None else probe(), resident_bytes,
                      resident_host_bytes, free)
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
