"""The planner's search (pure): the decode options, the budgets a plan is fitted into (`_Target`), and the pairs
of (offload rung, host rung) tried fastest first until one fits both budgets; the closest when none does, and what
would fit instead (fewer frames, a smaller model). vram_utils/planner.py turns a choice into a Plan and its words.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from configs.schema import DecodeSettings, HostRung, ModelSpec, Offload, Plan
from configs.registry import load_registry
from vram_utils.archs import ModelArch, arch_for
from vram_utils.estimate import GIB, LADDER, MIB, Estimate, Workload, disk_bytes_needed, estimate
from vram_utils.ladder import (
    HOST_MEASURES,
    TILE_FLOOR_PX,
    Ladder,
    auto_tiles,
    decode_change,
    host_rungs,
    tile_rungs,
)
from vram_utils.probe import GpuInfo


MARGIN_FIXED_BYTES = 512 * MIB
MARGIN_FRACTION = 0.05
HOST_MARGIN_BYTES = 1 * GIB  # the OS and the app's own growth on the host side, on a machine
LIMIT_MARGIN_FRACTION, LIMIT_MARGIN_MIN_BYTES = 0.05, 64 * MIB  # under a container's limit (the OS is outside it)
# Free disk the disk rung keeps beyond the files it writes (the outputs and latents of the run go there too).
DISK_MARGIN_BYTES = 2 * GIB
MIN_TILE_PX = TILE_FLOOR_PX  # the ladder's one tile floor (vram_utils/ladder.py)
RUNG_TEXT = {
    "none": "everything on the GPU",
    "model": "model CPU offload",
    "group": "group offload (block level, CUDA streams)",
    "sequential": "sequential offload (leaf level, CUDA streams)",
}



# --------------------------------------------------------------------------- decode options


def _decode_options(arch: ModelArch, w: Workload) -> list[DecodeSettings]:
    """The request's decode settings first, then the ladder's decode rungs below them (tiling on, halved
    tiles down to the floor, smaller chunks), none that would change nothing for this frame size. When the
    request leaves the tiles to the planner (`auto_tiles`), untiled and ever smaller tiles with the seed's
    overlaps come before the seed's tiles, least pixel overhead first: the first that fits is the largest."""
    return _auto_options(arch, w) + _ladder_options(arch, w)


def _ladder_options(arch: ModelArch, w: Workload) -> list[DecodeSettings]:
    """The request's decode settings, then the ladder's decode rungs below them."""
    ladder = Ladder(cuda=False, own_chunk=arch.vae.own_chunk, frame_px=(w.height, w.width),
                    spatial_factor=arch.vae.spatial_ratio)
    return ladder.decode_rungs(w.decode)


def _auto_options(arch: ModelArch, w: Workload) -> list[DecodeSettings]:
    """Untiled, then larger tiles than the seed's (vram_utils/ladder.py `tile_rungs`); [] for a person's own tiles."""
    return tile_rungs(w.decode, (w.height, w.width), arch.vae.spatial_ratio) if auto_tiles(w.decode) else []


def _decode_change(old: DecodeSettings, new: DecodeSettings) -> str | None:
    return decode_change(old, new)


# --------------------------------------------------------------------------- target and search


@dataclasses.dataclass
class _Target:
    """Where a plan runs and what it may use: the device and its budget, the host budget and free disk, the
    rungs it may search, and the reasons collected so far (one planning pass; not shared)."""

    backend: str  # "cuda" or "cpu"
    budget: int  # the computing device's (host RAM on the CPU backend)
    rungs: tuple[Offload, ...]
    where: str  # for a person: "GPU0 (name)" or "host RAM"
    device_name: str  # "cuda:<index>" or "cpu"
    gpu: GpuInfo | None
    reasons: list[str]
    host_budget: int = 0
    disk_free: int | None = None  # None: not checked, the disk rung is not offered
    host_limit: str = ""  # where the host budget comes from ("container limit 2.0 GiB (cgroup v1 /x)")
    host_margin: int = HOST_MARGIN_BYTES

    @property
    def search_rungs(self) -> tuple[Offload, ...]:
        """Rungs a suggestion may use: the whole ladder on a GPU, the requested rung on the CPU."""
        return LADDER if self.backend == "cuda" else self.rungs

    def rung_text(self, offload: Offload) -> str:
        return RUNG_TEXT[offload] if self.backend == "cuda" else "the CPU run"

    def fits(self, est: Estimate) -> bool:
        if self.backend == "cpu":  # host RAM computes: what must stay resident, mapped weights read in place
            return est.host_need_bytes <= self.host_budget
        return est.peak_device_bytes <= self.budget and est.host_need_bytes <= self.host_budget


@dataclasses.dataclass(frozen=True)
class _Choice:
    offload: Offload
    decode: DecodeSettings
    est: Estimate
    host_rung: HostRung = "ram"

    @property
    def quant(self) -> str:
        return "fp8-storage" if HOST_MEASURES[self.host_rung].low_precision else ""


def _host_workload(w: Workload, host_rung: HostRung) -> Workload:
    low = HOST_MEASURES[host_rung].low_precision
    return w.replace(host_rung=host_rung, quant="fp8-storage" if low else w.quant)


def _disk_ok(arch: ModelArch, w: Workload, t: _Target) -> bool:
    return t.disk_free is not None and t.disk_free >= disk_bytes_needed(arch, w) + DISK_MARGIN_BYTES


def _pairs(arch: ModelArch, w: Workload, t: _Target, rungs, any_disk: bool = False) -> Iterator[tuple[Offload, Workload]]:
    """(offload rung, workload at a host rung), fastest first (module docstring); `any_disk` offers the
    disk rung whatever the free disk (to say what it would need)."""
    for host in host_rungs(arch.experts, w.quant, bool(w.mapped)):
        hw = _host_workload(w, host)
        disk = HOST_MEASURES[host].disk
        if disk and not (any_disk or _disk_ok(arch, hw, t)):
            continue
        for rung in rungs:
            yield rung, hw


def _first_fit(arch: ModelArch, w: Workload, t: _Target, rungs=None, any_disk: bool = False) -> _Choice | None:
    """The fastest pair (then the least change to decode) whose GPU and host peaks both fit."""
    for rung, hw in _pairs(arch, w, t, rungs or t.rungs, any_disk):
        choice = _fit_decode(arch, hw, rung, t)
        if choice is not None:
            return choice
    return None


def _fit_decode(arch: ModelArch, hw: Workload, rung: Offload, t: _Target) -> _Choice | None:
    """The first decode that fits this pair. The pair is chosen as with the seed's tiles (the request's settings
    and the ladder's rungs below them): larger tiles, when the planner picks them, then only make the decode
    faster on that pair, never change which pair runs (fewer tiles park fewer caches in RAM, which could
    otherwise let a faster host rung such as fp8 storage win on a larger tile alone)."""
    for d in _ladder_options(arch, hw):
        est = estimate(arch, hw.replace(decode=d), rung, t.backend)  # type: ignore[arg-type]
        if t.fits(est):
            for a in _auto_options(arch, hw):
                a_est = estimate(arch, hw.replace(decode=a), rung, t.backend)  # type: ignore[arg-type]
                if t.fits(a_est):
                    return _Choice(rung, a, a_est, hw.host_rung)
            return _Choice(rung, d, est, hw.host_rung)
    return None


def _smallest(arch: ModelArch, w: Workload, rung: Offload, backend: str) -> _Choice:
    """`rung` with every weight in RAM and the smallest decode (what the reasons compare against)."""
    d = _decode_options(arch, w)[-1]
    return _Choice(rung, d, estimate(arch, w.replace(decode=d), rung, backend))  # type: ignore[arg-type]


def _lowest(arch: ModelArch, w: Workload, t: _Target) -> _Choice:
    """When nothing fits: the pair and decode that miss the two budgets by the fewest bytes together, the
    fastest of equals (smaller tiles save GPU memory but park more causal caches in RAM, so the smallest decode
    is not always the closest), and of equals one whose own decode fits. The pair is chosen with the seed's
    tiles and the ladder's rungs below them; on it, larger tiles are taken when they miss by no more."""
    best: tuple[tuple[int, int], _Choice] | None = None
    for r, hw in _pairs(arch, w, t, t.rungs):
        for d in _ladder_options(arch, hw):
            miss, est = _miss(arch, hw.replace(decode=d), r, t)
            if best is None or miss < best[0]:
                best = (miss, _Choice(r, d, est, hw.host_rung))
    assert best is not None  # the "ram" host rung is always searched
    choice = best[1]
    hw = _host_workload(w, choice.host_rung)
    for a in _auto_options(arch, hw):
        miss, est = _miss(arch, hw.replace(decode=a), choice.offload, t)
        if miss <= best[0]:
            return _Choice(choice.offload, a, est, choice.host_rung)
    return choice


def _miss(arch: ModelArch, w: Workload, rung: Offload, t: _Target) -> tuple[tuple[int, int], Estimate]:
    """(bytes over the two budgets, bytes the decode alone is over the device's), and the estimate."""
    est = estimate(arch, w, rung, t.backend)  # type: ignore[arg-type]
    device = est.host_need_bytes if t.backend == "cpu" else est.peak_device_bytes
    over = max(0, device - t.budget) + max(0, est.host_need_bytes - t.host_budget)
    return (over, max(0, est.stage_dict().get("decode", 0) - t.budget)), est


def _fewer_frames(spec: ModelSpec, arch: ModelArch, w: Workload, t: _Target) -> tuple[int, _Choice] | None:
    """The largest frame count below the request's that fits, respecting the family's frame rule."""
    f = spec.snap_frames(w.frames)
    if f >= w.frames:
        f -= spec.frame_step
    while f >= 1:
        choice = _first_fit(arch, w.replace(frames=f), t, t.search_rungs)
        if choice is not None:
            return f, choice
        f -= spec.frame_step
    return None


def _smaller_model(spec: ModelSpec, w: Workload, t: _Target) -> tuple[str, _Choice] | None:
    """The largest registry model for the same task, smaller than this one, that fits at its defaults."""
    mine = arch_for(spec, w.task).transformer.params * arch_for(spec, w.task).experts
    candidates = []
    for other in load_registry().values():
        if other.tiny or other.id == spec.id or w.task not in other.tasks:
            continue
        other_arch = arch_for(other, w.task)
        size = other_arch.transformer.params * other_arch.experts
        if size >= mine:
            continue
        candidates.append((other.family != spec.family, -size, other, other_arch))
    for _, _, other, other_arch in sorted(candidates, key=lambda c: c[:2]):
        h, wd = other.default_resolution
        ow = w.replace(frames=other.default_frames, height=h, width=wd, dtype_bytes=2 if other.default_dtype != "float32" else 4)
        choice = _first_fit(other_arch, ow, t, t.search_rungs)
        if choice is not None:
            return other.id, choice
    return None
