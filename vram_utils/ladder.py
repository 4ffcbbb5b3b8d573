"""The memory ladder: every rung a run can step down to, and every floor, in one place (DESIGN.md).

Rungs, fastest first:

  offload   none -> model -> group -> sequential. Only with a CUDA GPU: without one every rung onloads
            to the CPU, the weights stay in the same RAM, and nothing is freed, so a CPU ladder has none.
  tiling    VAE tiling on.
  tiles     tiles halved, down to TILE_FLOOR_PX (one floor for the planner, the runner and the stream).
  chunks    decode chunks halved, from the family's own chunk (CogVideoX 2 latent frames, Wan 1) down to
            one latent frame. Wan has no chunk rung: its VAE already decodes one latent frame at a time.

  host      for host RAM, after the GPU's (configs/schema.py HOST_RUNGS, fastest first), each keeping the
            measures above it except where said: ram (everything in RAM at the model's dtype) ->
            text-encoder-first (the prompt is encoded first and the text encoder freed before the rest
            loads) -> one-expert (two-expert models only: one expert in RAM at a time, the second loaded at
            the switch) -> in-place (weights memory-mapped from their safetensors files are read in place:
            only the layer computing must stay resident, the kernel drops and re-reads the rest under pressure,
            slower but nothing is copied; only where some weights load mapped) -> low-precision (transformer
            weights stored in RAM at fp8, anonymous: not in place) -> disk (the
            transformers' block groups streamed from files under $FITVIDEO_HOME, on top of any offload rung:
            vram_utils/offload.py; bf16 as loaded, so without low-precision; one expert at a time, so that a
            load that materialises an expert before writing its files holds one, not two).
            The planner searches them (`host_rungs`); the plan carries their flags (`host_flags`).

  auto      above all of these, when a request leaves the tiles to the planner (`auto_tiles`: tiling on at the
            schema's default tiles): untiled, then ever smaller tiles with the seed's overlaps, least pixel
            overhead first, down to the seed's own tiles (`tile_rungs`); the planner takes the first that fits.

A rung that would change nothing is not a rung: tiling on (or a halving) whose tiles still cover the
frame is skipped, and so is a chunk rung at one latent frame. Every step goes strictly down, so a run
that keeps stepping never tries a rung twice: the planner searches the decode rungs before a run
(`decode_rungs`), the runner steps one rung per out-of-memory (`step`, from where the streaming decode
left off), and the streaming decode steps the decode rungs inside one decode (`next_decode`).

Pure: settings in, settings out; no torch, no device access.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from configs.schema import HOST_RUNGS, OFFLOADS, DecodeSettings, HostRung, Offload, Plan, Quant
from vram_utils.tiles import axis_tiles, frame_layout

TILE_FLOOR_PX = 64  # smaller tiles see too little context for a clean seam and cost more in seams than they save
OFFLOAD_RUNGS: tuple[Offload, ...] = OFFLOADS  # type: ignore[assignment]  # fastest first
RungKind = Literal["offload", "tiling", "tiles", "chunks"]
Stage = Literal["loading", "encoding", "denoising", "decoding"]


@dataclass(frozen=True)
class HostMeasures:
    """What a host rung does to the run (cumulative down the host rungs, see the module docstring)."""

    release_text_encoder: bool = False
    one_expert: bool = False
    in_place: bool = False  # mapped weights count only the layer computing (the kernel may drop the others' pages)
    low_precision: bool = False  # transformer weights stored as fp8 (quant "fp8-storage")
    disk: bool = False


HOST_MEASURES: dict[str, HostMeasures] = {
    "ram": HostMeasures(),
    "text-encoder-first": HostMeasures(release_text_encoder=True),
    "one-expert": HostMeasures(release_text_encoder=True, one_expert=True),
    "in-place": HostMeasures(release_text_encoder=True, one_expert=True, in_place=True),
    "low-precision": HostMeasures(release_text_encoder=True, one_expert=True, low_precision=True),
    "disk": HostMeasures(release_text_encoder=True, one_expert=True, disk=True),
}
# What reading weights in place costs when RAM holds less of them than the run reads each step: measured by
# bench/host_ram.py --rungs in-place (a 4-block Wan-14B-width transformer on 2 AMD EPYC cores, a virtual disk; the
# second step's time under caps of the process's start + 1.0x, 0.5x and 0.25x of the weight bytes, against the same
# step uncapped); the plan's text quotes it. A faster disk, and more compute per weight byte, pay less.
IN_PLACE_SLOWDOWN = "measured 2.5x / 3.3x / 3.3x the step time with 1.0 / 0.5 / 0.25 of the weights' bytes free"
HOST_RUNG_TEXT = {  # one line each, for the plan's reasons
    "ram": "every component in RAM at the model's dtype",
    "text-encoder-first": "the prompt encoded first and the text encoder freed before the transformer loads",
    "one-expert": "one expert in RAM at a time (the low-noise expert loads at the switch, the first is freed)",
    "in-place": ("memory-mapped weights read in place from their files: only the layer computing must stay in RAM; "
                 f"when RAM holds less than the weights the kernel drops and re-reads pages every step "
                 f"({IN_PLACE_SLOWDOWN}, bench/host_ram.py)"),
    "low-precision": "transformer weights stored in RAM at fp8 (cast to the compute dtype layer by layer)",
    "disk": "transformer weights streamed from disk, one block group at a time (group offload to files)",
}
assert tuple(HOST_MEASURES) == HOST_RUNGS


def host_rungs(experts: int, quant: Quant, mapped: bool = True) -> tuple[HostRung, ...]:
    """The host rungs that change something for this model, fastest first: one-expert only for a two-expert
    model, in-place only where some weights load memory-mapped (`mapped`), low-precision only when the weights are
    not already quantized."""
    out = []
    for rung in HOST_RUNGS:
        m = HOST_MEASURES[rung]
        if (rung == "one-expert" and experts < 2) or (m.low_precision and quant != "none") or \
                (m.in_place and not mapped):
            continue
        out.append(rung)
    return tuple(out)  # type: ignore[return-value]


def step_host(plan: Plan) -> tuple[Plan, str] | None:
    """During a run whose host RAM neared its limit: the next host rung that frees RAM the run holds (the text
    encoder released before the transformers load, then the transformers' weights streamed from disk), with a
    line for the person; None when none is left below the plan's."""
    experts = 2 if plan.experts_in_ram else 1
    for rung in ("text-encoder-first", "disk"):
        if HOST_RUNGS.index(rung) > HOST_RUNGS.index(plan.host_rung):
            flags = host_flags(rung, experts)  # type: ignore[arg-type]
            flags.pop("quant", None)
            return plan.replace(**flags), f"host {plan.host_rung} -> {rung}"
    return None


def host_flags(rung: HostRung, experts: int) -> dict:
    """The Plan fields a host rung sets (the runner and apply_plan read these, never the rung's name)."""
    if rung not in HOST_MEASURES:
        raise ValueError(f"host_rung={rung!r} is not allowed; choose one of {', '.join(HOST_RUNGS)}")
    m = HOST_MEASURES[rung]
    flags = dict(host_rung=rung, release_text_encoder=m.release_text_encoder, disk_offload=m.disk,
                 experts_in_ram=0 if experts < 2 else (1 if m.one_expert else 2))
    if m.low_precision:
        flags["quant"] = "fp8-storage"
    return flags


@dataclass(frozen=True)
class DecodeStep:
    """One decode rung down: the settings after it and a line for the person and the sidecar."""

    kind: RungKind
    settings: DecodeSettings
    change: str


@dataclass(frozen=True)
class Ladder:
    """The rungs below a position, for one run on one machine.

    cuda: offload rungs free GPU memory; on the CPU there are none (see the module docstring).
    own_chunk: the family's own decode chunk in latent frames, where `chunk_frames == 0` starts.
    frame_px: (height, width) of the video, so that tile rungs which would change nothing are skipped;
        None when unknown (every halving then counts).
    spatial_factor: output pixels per latent pixel; halved tiles stay whole latent pixels.
    """

    cuda: bool
    own_chunk: int = 1
    frame_px: tuple[int, int] | None = None
    spatial_factor: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.own_chunk, int) or self.own_chunk < 1:
            raise ValueError(f"own_chunk={self.own_chunk!r} is not allowed; use a positive count of latent frames")
        if not isinstance(self.spatial_factor, int) or self.spatial_factor < 1:
            raise ValueError(f"spatial_factor={self.spatial_factor!r} is not allowed; use a positive integer")

    # ---------------------------------------------------------------- offload

    def offload_rungs(self) -> tuple[Offload, ...]:
        """The offload rungs that can free memory here: all four on CUDA, none below "none" on the CPU."""
        return OFFLOAD_RUNGS if self.cuda else OFFLOAD_RUNGS[:1]

    def next_offload(self, offload: Offload) -> Offload | None:
        """The offload rung below `offload`, or None (at the bottom, or on the CPU where none frees RAM)."""
        if not self.cuda:
            return None
        if offload not in OFFLOAD_RUNGS:
            raise ValueError(f"offload={offload!r} is not allowed; choose one of {', '.join(OFFLOAD_RUNGS)}")
        i = OFFLOAD_RUNGS.index(offload)
        return OFFLOAD_RUNGS[i + 1] if i + 1 < len(OFFLOAD_RUNGS) else None

    # ---------------------------------------------------------------- decode

    def next_decode(self, d: DecodeSettings) -> DecodeStep | None:
        """The decode rung below `d`: tiling on, else halved tiles, else smaller chunks; None at the bottom."""
        if not d.enable_vae_tiling:
            tiled = dataclasses.replace(d, enable_vae_tiling=True)
            if not self._covers_frame(tiled):
                return DecodeStep("tiling", tiled, f"VAE tiling on ({tiled.tile_x}x{tiled.tile_y} px tiles)")
            halved = self._halve(tiled)  # tiles as large as the frame would change nothing: start smaller
            if halved is not None:
                return DecodeStep("tiling", halved, f"VAE tiling on ({halved.tile_x}x{halved.tile_y} px tiles)")
        else:
            halved = self._halve(d)
            if halved is not None:
                return DecodeStep("tiles", halved, f"tiles {d.tile_x}x{d.tile_y} -> {halved.tile_x}x{halved.tile_y} px")
        chunk = d.chunk_frames or self.own_chunk
        if chunk > 1:
            fewer = dataclasses.replace(d, chunk_frames=chunk // 2)
            return DecodeStep("chunks", fewer, f"decode chunks {chunk} -> {chunk // 2} latent frames")
        return None

    def decode_rungs(self, d: DecodeSettings) -> list[DecodeSettings]:
        """`d`, then every decode rung below it, in order (what the planner searches)."""
        rungs = [d]
        while (step := self.next_decode(rungs[-1])) is not None:
            rungs.append(step.settings)
        return rungs

    # ---------------------------------------------------------------- one step for a run

    def step(self, plan: Plan, stage: Stage) -> tuple[Plan, str] | None:
        """The plan one rung lower after an out-of-memory at `stage`, with a one-line description; None
        at the bottom. Only offload helps a load or a denoise; a decode tries offload first (the
        transformer leaves the GPU), then the decode rungs."""
        lower = self.next_offload(plan.offload)
        if lower is not None:
            return plan.replace(offload=lower), f"offload {plan.offload} -> {lower}"
        if stage != "decoding":
            return None
        step = self.next_decode(plan.decode)
        return (plan.replace(decode=step.settings), step.change) if step is not None else None

    # ---------------------------------------------------------------- tile arithmetic

    def _covers_frame(self, d: DecodeSettings) -> bool:
        """Whether one tile spans the whole frame (tiling then decodes exactly what untiled does)."""
        return self.frame_px is not None and d.tile_y >= self.frame_px[0] and d.tile_x >= self.frame_px[1]

    def _halve(self, d: DecodeSettings) -> DecodeSettings | None:
        """Both tile sides halved (each side down to the floor, a side at the floor kept); None if neither
        side can shrink."""
        frame_h, frame_w = self.frame_px or (None, None)
        tile_y, stride_y = self._halve_axis(d.tile_y, d.tile_stride_y, frame_h)
        tile_x, stride_x = self._halve_axis(d.tile_x, d.tile_stride_x, frame_w)
        if (tile_y, tile_x) == (d.tile_y, d.tile_x):
            return None
        return dataclasses.replace(d, tile_y=tile_y, tile_x=tile_x, tile_stride_y=stride_y, tile_stride_x=stride_x)

    def _halve_axis(self, tile: int, stride: int, frame: int | None) -> tuple[int, int]:
        f = self.spatial_factor
        span = min(tile, frame) if frame else tile  # what a tile really covers on this axis
        floor = max(f, TILE_FLOOR_PX // f * f)
        if span <= floor:
            return tile, stride
        new = max(floor, span // 2 // f * f)
        if frame and tile >= frame:
            new_stride = new * 3 // 4  # one tile covered the axis: a quarter of the new tile overlaps
        else:
            new_stride = stride * new // tile  # keep the overlap in proportion, so seams stay blended
        return new, min(new, max(f, new_stride // f * f))


# ---------------------------------------------------------------- tiles chosen by the planner

SEED_DECODE = DecodeSettings()  # the seed's tiles: 272 px, stride 144 x 128 (overlaps 128 px across, 144 px down)


def auto_tiles(d: DecodeSettings) -> bool:
    """Whether a request leaves the tiles to the planner: tiling on at exactly the schema's default tiles and
    strides (what every form and flag sends when a person changes nothing), not marked `fixed_tiles` (the
    page's "Tiles as set", a CLI tile flag given). Anything else is a person's choice and is honoured; so is
    tiling off."""
    seed = SEED_DECODE
    return d.enable_vae_tiling and not d.fixed_tiles and (d.tile_x, d.tile_y, d.tile_stride_x, d.tile_stride_y) == (
        seed.tile_x, seed.tile_y, seed.tile_stride_x, seed.tile_stride_y)


def _axis_options(frame: int, factor: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(tile, stride) in output pixels for 1, 2, ... tiles along one axis, up to the count `tile` / `stride`
    takes, each the smallest tile that still keeps the overlap `tile - stride` (whole latent pixels)."""
    length, overlap = frame // factor, -(-(tile - stride) // factor)
    most = len(axis_tiles(length, max(1, tile // factor), max(1, stride // factor))[1])
    out = [(frame, frame)]
    for n in range(2, most + 1):
        size = -(-(length + (n - 1) * overlap) // n)
        if overlap < size < length and len(axis_tiles(length, size, size - overlap)[1]) == n:
            out.append((size * factor, (size - overlap) * factor))
    return out


def tile_rungs(d: DecodeSettings, frame_px: tuple[int, int], factor: int) -> list[DecodeSettings]:
    """The planner's tile choices above `d` (the seed's tiles), fastest first: untiled, then tiles with the seed's
    overlaps, by pixel overhead (pixels through the decoder over the frame's), each kept only if its tiles are
    smaller than every one before it (so that it can fit where they did not). `d` itself is not included."""
    seed = frame_layout(frame_px, factor, (d.tile_y, d.tile_x), (d.tile_stride_y, d.tile_stride_x))
    ys = _axis_options(frame_px[0], factor, d.tile_y, d.tile_stride_y)
    xs = _axis_options(frame_px[1], factor, d.tile_x, d.tile_stride_x)
    found = []
    for (ty, sy) in ys:
        for (tx, sx) in xs:
            layout = frame_layout(frame_px, factor, (ty, tx), (sy, sx))
            if layout.overhead < seed.overhead and layout.count > 1:
                found.append((layout.overhead, layout.count, layout.tile_h * layout.tile_w, (ty, tx, sy, sx)))
    out, smallest = [dataclasses.replace(d, enable_vae_tiling=False)], seed.height * seed.width
    for _, _, area, (ty, tx, sy, sx) in sorted(found):
        if area < smallest:
            smallest = area
            out.append(dataclasses.replace(d, tile_y=ty, tile_x=tx, tile_stride_y=sy, tile_stride_x=sx))
    return out


def tile_layout(d: DecodeSettings, frame_px: tuple[int, int], factor: int):
    """The `vram_utils.tiles.TileLayout` the stream decodes for `d` on a frame of (height, width) output pixels."""
    tile = (d.tile_y, d.tile_x) if d.enable_vae_tiling else None
    return frame_layout(frame_px, factor, tile, (d.tile_stride_y, d.tile_stride_x))


def tile_text(d: DecodeSettings, frame_px: tuple[int, int], factor: int) -> str:
    """"untiled, 1.00x" or "2x3 tiles of 360x480 px (h x w), 1.25x": the layout the stream decodes and its pixel
    overhead (pixels through the decoder over the frame's pixels)."""
    layout = tile_layout(d, frame_px, factor)
    if not layout.tiled:
        return f"untiled, {layout.overhead:.2f}x"
    f = layout.factor
    return (f"{len(layout.ys)}x{len(layout.xs)} tiles of {layout.tile_h * f}x{layout.tile_w * f} px (h x w), "
            f"{layout.overhead:.2f}x")


def decode_change(old: DecodeSettings, new: DecodeSettings) -> str | None:
    """One line for what changed between two decode settings (the planner's reason), or None."""
    if old == new:
        return None
    parts = []
    if not old.enable_vae_tiling and new.enable_vae_tiling:
        parts.append(f"VAE tiling on ({new.tile_x}x{new.tile_y} px tiles)")
    elif (old.tile_x, old.tile_y) != (new.tile_x, new.tile_y):
        parts.append(f"VAE tiles {old.tile_x}x{old.tile_y} -> {new.tile_x}x{new.tile_y} px")
    if old.chunk_frames != new.chunk_frames:
        parts.append(f"decode chunks {old.chunk_frames or 'own'} -> {new.chunk_frames} latent frames")
    return ", ".join(parts) or None
