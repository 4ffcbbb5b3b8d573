"""Upscale x2 / x4, frame by frame, tiled with blended seams.

Models: Real-ESRGAN-class files loaded with spandrel, which recognises the architecture from the state dict
(so other ESRGAN-family files work too). Without weights on the machine, `auto` falls back to a Lanczos
resize (no model), and says so.

Tiles come from vram_utils.tiles's planner with the scale as its factor (input pixels play the latent's part):
the output is exactly scale x the input, and overlapping tiles are blended with weights that sum to one. An
out-of-memory halves the tile on the one ladder (vram_utils.ladder: the same floor and halving as the
decode) and retries the frame.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from configs.schema import DecodeSettings, RequestError
from postprocess.frames import iter_frames, probe_video
from postprocess.result import FinishResult

logger = logging.getLogger(__name__)

UPSCALE_SCALES = (2, 4)
UpscaleMethod = Literal["auto", "realesrgan", "lanczos"]
DEFAULT_TILE_PX = 512  # output pixels: 128x128 input tiles at x4 (a few hundred MiB of fp16 activations)
DEFAULT_STRIDE_PX = 384  # tile - stride = 128 output px of overlap (32 input px at x4) to blend the seams


@dataclass(frozen=True)
class UpscalerSpec:
    """A registry entry: where the weights are fetched from on first use, like the video models."""

    name: str
    repo: str
    file: str
    scale: int
    params: int  # parameter count (RRDBNet, 23 blocks, 64 features): for the memory line

    @property
    def fetch_command(self) -> str:
        return f"hf download {self.repo} {self.file}"


UPSCALERS: dict[int, UpscalerSpec] = {
    2: UpscalerSpec("realesrgan-x2", "ai-forever/Real-ESRGAN", "RealESRGAN_x2.pth", 2, 16_703_171),
    4: UpscalerSpec("realesrgan-x4", "ai-forever/Real-ESRGAN", "RealESRGAN_x4.pth", 4, 16_697_987),
}


@dataclass(frozen=True)
class UpscalerChoice:
    """What `resolve_upscaler` picked: a weights file for spandrel, or Lanczos (path None)."""

    scale: int
    path: Path | None
    label: str
    notes: tuple[str, ...] = ()


def check_scale(scale) -> int:
    if scale not in UPSCALE_SCALES:
        raise RequestError(f"scale={scale!r} is not allowed; use one of {', '.join(map(str, UPSCALE_SCALES))}")
    return int(scale)


def cached_weights(spec: UpscalerSpec) -> Path | None:
    """The weights file in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.repo, spec.file)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def fetch_weights(spec: UpscalerSpec) -> Path:
    """The weights file, downloaded on first use; RequestError naming the command when that cannot happen."""
    import os

    found = cached_weights(spec)
    if found is not None:
        return found
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RequestError(f"{spec.name} weights are not on this machine and the hub is offline; "
                           f"fetch them with `{spec.fetch_command}` (or use --method lanczos)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.repo, spec.file))
    except Exception as exc:  # no network, repo moved, disk full: the person needs the command either way
        raise RequestError(f"could not fetch {spec.name} weights ({type(exc).__name__}); "
                           f"fetch them with `{spec.fetch_command}` (or use --method lanczos)") from exc


def resolve_upscaler(scale: int, method: str = "auto", weights: str | Path | None = None) -> UpscalerChoice:
    """Pick the upscaler. `weights`: a model file (any ESRGAN-family file spandrel reads). `auto`: the learned
    model when its weights are on this machine, else Lanczos (no model), saying which."""
    scale = check_scale(scale)
    if method not in get_args(UpscaleMethod):
        raise RequestError(f"method={method!r} is not allowed; use one of {', '.join(get_args(UpscaleMethod))}")
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise RequestError(f"weights file {str(path)!r} does not exist; give a Real-ESRGAN / ESRGAN "
                               f".pth or .safetensors file, or leave --weights out")
        return UpscalerChoice(scale, path, f"{path.name} (learned)")
    spec = UPSCALERS[scale]
    if method == "lanczos":
        return UpscalerChoice(scale, None, "lanczos (no model)")
    if method == "realesrgan":
        return UpscalerChoice(scale, fetch_weights(spec), f"{spec.name} (learned)")
    found = cached_weights(spec)
    if found is not None:
        return UpscalerChoice(scale, found, f"{spec.name} (learned)")
    note = f"no {spec.name} weights on this machine (`{spec.fetch_command}` fetches them): used Lanczos (no model)"
    logger.info(note)
    return UpscalerChoice(scale, None, "lanczos (no model)", (note,))


# =========================================================================== the upscalers


class Lanczos:
    """No model: a Lanczos resize. Works on a fresh machine."""

    label = "lanczos (no model)"

    def __init__(self, scale: int):
        self.scale = check_scale(scale)

    def upscale(self, frame: np.ndarray, tiles: "TileState") -> np.ndarray:
        from PIL import Image

        h, w = frame.shape[:2]
        return np.asarray(Image.fromarray(frame).resize((w * self.scale, h * self.scale), Image.LANCZOS))


@dataclass(eq=False)
class Upscaler:
    """A spandrel model on its device. `components` lets the pipeline cache count, hold and evict it like a
    pipeline."""

    label: str
    model: object  # torch.nn.Module
    scale: int
    device: str
    dtype: object  # torch.dtype

    @property
    def components(self) -> dict[str, object]:
        return {"model": self.model}

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def upscale(self, frame: np.ndarray, tiles: "TileState") -> np.ndarray:
        """(H, W, 3) uint8 -> (H*s, W*s, 3) uint8; after an out-of-memory the tile is halved and the frame
        run again, down to the ladder's floor."""
        while True:
            try:
                return _upscale_tiled(self, frame, tiles, tiles.layout(frame.shape[0], frame.shape[1], self.scale))
            except Exception as exc:
                from vram_utils.sizes import is_out_of_memory

                if not is_out_of_memory(exc):
                    raise
                tiles.step_down(exc, frame.shape[:2], self.scale, self.device.startswith("cuda"))


def load_upscaler(path: str | Path, device: str | None = None, dtype: str | None = None) -> Upscaler:
    """A spandrel super-resolution model from a file; RequestError for a file spandrel does not recognise.
    fp16 on a GPU, float32 on the CPU (CPU half-precision convolutions are slow and lossy)."""
    import torch
    from postprocess.spandrel_import import import_spandrel

    spandrel = import_spandrel()
    ImageModelDescriptor, ModelLoader = spandrel.ImageModelDescriptor, spandrel.ModelLoader
    UnsupportedModelError = spandrel.UnsupportedModelError

    path = Path(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        desc = ModelLoader(device=device).load_from_file(str(path))
    except (UnsupportedModelError, ValueError, RuntimeError, OSError) as exc:
        raise RequestError(f"{path.name!r} is not an upscaler model spandrel recognises ({type(exc).__name__}: "
                           f"{str(exc)[:160]}); give a Real-ESRGAN / ESRGAN-family .pth or .safetensors") from exc
    if not isinstance(desc, ImageModelDescriptor) or desc.scale not in UPSCALE_SCALES or desc.input_channels != 3:
        raise RequestError(f"{path.name!r} is a {desc.architecture.name} model with scale {desc.scale}; "
                           f"an RGB upscaler of scale {' or '.join(map(str, UPSCALE_SCALES))} is needed")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        dtype or ("float16" if device.startswith("cuda") else "float32"))
    if torch_dtype is None:
        raise RequestError(f"dtype={dtype!r} is not allowed; use float16, bfloat16 or float32")
    model = desc.model.eval().to(device=device, dtype=torch_dtype)
    logger.info("loaded %s: %s x%d on %s (%s)", path.name, desc.architecture.name, desc.scale, device, torch_dtype)
    return Upscaler(f"{path.name} ({desc.architecture.name} x{desc.scale}, learned)", model, desc.scale, device,
                    torch_dtype)


# =========================================================================== tiles


@dataclass
class TileState:
    """The tile a video is upscaled with, in output pixels (square as asked; the ladder may lower one side
    only), None = whole frames; lowered on the one ladder after an out-of-memory."""

    tile_px: int | None = DEFAULT_TILE_PX
    stride_px: int = DEFAULT_STRIDE_PX
    oom_steps: list[str] = field(default_factory=list)
    _settings: DecodeSettings | None = None  # after a step down: the ladder's (tile_y, tile_x) pair
    # The output frame and blend weights of the current layout, reused frame after frame: allocating them
    # anew for every frame let the heap grow with the frame count (+16 MiB over 40 frames at 480x720).
    _buffers: dict = field(default_factory=dict)

    def buffers(self, layout) -> tuple:
        """(output (3, H*s, W*s) float32, {(y0, x0): weight}) for `layout`, made once per layout."""
        from vram_utils.tiles import blend_weight
        import torch

        if self._buffers.get("layout") != layout:
            self._buffers = {"layout": layout, "out": torch.empty(3, layout.height * layout.factor,
                                                                  layout.width * layout.factor),
                             "weights": {t: blend_weight(layout, *t) for t in layout.tiles()}}
        return self._buffers["out"], self._buffers["weights"]

    def settings(self) -> DecodeSettings:
        if self._settings is not None:
            return self._settings
        t = self.tile_px or DEFAULT_TILE_PX
        s = min(self.stride_px, t)
        return DecodeSettings(enable_vae_tiling=self.tile_px is not None, tile_x=t, tile_y=t, tile_stride_x=s,
                              tile_stride_y=s)

    def layout(self, height: int, width: int, scale: int):
        from vram_utils.tiles import plan_tiles

        d = self.settings()
        tile = (d.tile_y, d.tile_x) if d.enable_vae_tiling else None
        return plan_tiles(height, width, scale, tile, (d.tile_stride_y, d.tile_stride_x))

    def step_down(self, exc: BaseException, frame_hw: tuple[int, int], scale: int, cuda: bool) -> None:
        """One rung down the decode's tile rungs (tiling on, then halved tiles, to TILE_FLOOR_PX); re-raises
        at the floor. Chunk rungs mean nothing for single frames."""
        import vram_utils
        from vram_utils.ladder import Ladder

        ladder = Ladder(cuda=cuda, frame_px=(frame_hw[0] * scale, frame_hw[1] * scale), spatial_factor=scale)
        old = self.layout(*frame_hw, scale)
        step = ladder.next_decode(self.settings())
        if step is None or step.kind == "chunks":
            raise exc
        self._settings = step.settings
        self.tile_px = max(step.settings.tile_y, step.settings.tile_x)
        new = self.layout(*frame_hw, scale)
        change = f"tiles {old.describe()} -> {new.describe()}"
        self.oom_steps.append(change)
        logger.warning("out of memory while upscaling; retrying with %s", change)
        vram_utils.release_memory()


def _upscale_tiled(up: Upscaler, frame: np.ndarray, tiles: TileState, layout) -> np.ndarray:
    """One frame through the model tile by tile; tiles blended into a float32 frame of exactly scale x size
    (the blend weights of overlapping tiles sum to one)."""
    import torch

    s = layout.factor
    x = torch.from_numpy(np.array(frame)).permute(2, 0, 1)[None].float().div_(255)  # (1, 3, H, W)
    out, weights = tiles.buffers(layout)  # (3, H*s, W*s)
    out.zero_()
    th, tw = layout.tile_h, layout.tile_w
    with torch.inference_mode():
        for y0, x0 in layout.tiles():
            tile = x[:, :, y0:y0 + th, x0:x0 + tw].to(up.device, up.dtype).contiguous()
            y = up.model(tile)[0].float().cpu()  # (3, th*s, tw*s)
            out[:, y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s].add_(y.mul_(weights[(y0, x0)]))
            del tile, y
    return out.clamp(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()


# =========================================================================== the video


def upscale_video(
    src: str | Path,
    dst: str | Path,
    upscaler: Upscaler | Lanczos,
    tiles: TileState | None = None,
    on_frame: Callable[[int, int], None] | None = None,
) -> FinishResult:
    """Read `src` frame by frame, upscale each, write it into `dst` as it comes (a temporary name, renamed
    when complete). `on_frame(i, n)` runs after each frame (progress; it may raise to stop)."""
    from decode.writer import VideoWriter

    info = probe_video(src)
    tiles = tiles or TileState()
    if upscaler.scale not in UPSCALE_SCALES:
        raise RequestError(f"scale={upscaler.scale!r} is not allowed; use 2 or 4")
    t0 = time.perf_counter()
    with VideoWriter(dst, round(info.fps)) as writer:
        for i, frame in enumerate(iter_frames(info), 1):
            writer.write(upscaler.upscale(frame, tiles))
            if on_frame is not None:
                on_frame(i, info.frames)
    written = writer.frames_written
    learned = isinstance(upscaler, Upscaler)
    notes = []
    if learned:
        peak = predicted_peak_bytes(upscaler.weight_bytes(), tiles.tile_px, (info.height, info.width), upscaler.scale)
        notes.append(f"memory: {upscaler.weight_bytes() / 2**20:.0f} MiB of weights + one tile's activations, "
                     f"{peak / 2**20:.0f} MiB predicted in all ({tiles.layout(info.height, info.width, upscaler.scale).describe()})")
    return FinishResult(
        "upscale", upscaler.label, str(src), str(dst), upscaler.scale, info.frames, written, info.fps,
        float(round(info.fps)), (info.width, info.height), (info.width * upscaler.scale, info.height * upscaler.scale),
        time.perf_counter() - t0, tiles.tile_px if learned else None, list(tiles.oom_steps), notes,
    )


def open_upscaler(choice: UpscalerChoice, device: str | None = None) -> Upscaler | Lanczos:
    """The upscaler a choice names, loaded (callers that keep models use the pipeline cache around this)."""
    if choice.path is None:
        return Lanczos(choice.scale)
    up = load_upscaler(choice.path, device)
    if up.scale != choice.scale:
        raise RequestError(f"{choice.path.name!r} upscales x{up.scale}, not x{choice.scale}; "
                           f"use --scale {up.scale} or another weights file")
    return up


def predicted_peak_bytes(weight_bytes: int, tile_px: int | None, frame_hw: tuple[int, int], scale: int) -> int:
    """Weights plus one tile's activations (RRDBNet: a dense block holds 64 + 4x32 = 192 channels at input
    resolution; the upsampler 64 channels at each scale step; fp16 on a GPU), plus the float32 output frame."""
    h, w = frame_hw
    th, tw = (min(h, tile_px // scale), min(w, tile_px // scale)) if tile_px else (h, w)
    act_elems = th * tw * (192 * 2 + 64 * scale * scale * 2)
    return weight_bytes + act_elems * 4 + 3 * h * w * scale * scale * 4
