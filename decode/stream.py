"""Streaming VAE decode: causal chunks in time, blended tiles in space, each chunk handed to a sink at once.

    for each chunk of latent frames (causal; each tile's conv caches carried to the next chunk):
        for each tile: decode the chunk of that tile, add it into the chunk's frame with its blend weight
        clamp, turn into uint8 on the device, move to the CPU, drop the device tensors, sink.write(frames)

No tensor ever holds the whole decoded video, on the device or in RAM: the largest is one chunk of frames
(a few frames, float32, full size) plus the causal caches. On a CUDA device the caches of the tiles not
being decoded wait in host memory, so the device holds one tile's cache at a time.

Out of memory: the tile is halved (down to MIN_TILE_PX); at the floor, the rest of the video is decoded one
latent frame per chunk (frame by frame). The caches are rebuilt by decoding the earlier chunks again without
output, and the chunk is retried. Every step down is in the stats.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from configs.schema import DecodeSettings, check_decode
from decode.causal import CausalDecoder, causal_decoder
from decode.tiling import TileLayout, blend_weight, plan_tiles
from vram_utils.sizes import is_out_of_memory, release_memory, trim_host_heap

logger = logging.getLogger(__name__)

MIN_TILE_PX = 64  # smaller tiles see too little context for a clean seam; below this an OOM is raised


class FrameSink(Protocol):
    def write(self, frames: np.ndarray) -> None: ...


class DecodeCancelled(Exception):
    """The stop event was set; the decode ended between two chunks."""


class DecodeOutOfMemory(torch.OutOfMemoryError):
    """Out of memory even at the smallest tile. Still a torch.OutOfMemoryError, so callers' OOM handling applies."""


@dataclass(frozen=True)
class OomStep:
    """One step down after an out-of-memory error."""

    chunk: int  # 0-based chunk that failed
    tile_from_px: tuple[int, int]  # (height, width) in output pixels; the whole frame when untiled
    tile_to_px: tuple[int, int]
    stride_to_px: tuple[int, int] | None
    replayed_chunks: int  # earlier chunks decoded again (without output) to rebuild the caches
    error: str
    action: str = "halve tiles"  # or "one latent frame per chunk" once the tiles are at the floor

    def change(self) -> str:
        """One line for the person and the sidecar."""
        if self.action == "halve tiles":
            return (f"decode chunk {self.chunk + 1}: tiles {self.tile_from_px[0]}x{self.tile_from_px[1]} -> "
                    f"{self.tile_to_px[0]}x{self.tile_to_px[1]} px, {self.replayed_chunks} earlier chunk(s) replayed")
        return f"decode chunk {self.chunk + 1}: {self.action} from here on, {self.replayed_chunks} earlier chunk(s) replayed"


@dataclass(frozen=True)
class DecodeStats:
    frames: int = 0
    chunks: int = 0
    seconds: float = 0.0
    family: str = ""
    latent_frames: int = 0
    height: int = 0  # output pixels
    width: int = 0
    chunk_frames: int = 0  # latent frames per chunk used (after resolving 0 = the VAE's own)
    frame_by_frame: bool = False
    tiles: int = 1  # per frame, in the final layout
    tile_px: tuple[int, int] | None = None  # (height, width) of the final tiles; None = untiled
    stride_px: tuple[int, int] | None = None
    oom_steps: tuple[OomStep, ...] = ()
    device: str = "cpu"
    dtype: str = ""
    peak_gpu_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated during the decode
    peak_gpu_bytes_before: int | None = None  # CUDA: the peak before the decode (the decode resets the counter)

    def to_dict(self) -> dict:
        return asdict(self)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(B=1, C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8, as diffusers' postprocess rounds. Stays on video's device."""
    video = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (video * 255).round().to(torch.uint8).permute(1, 2, 3, 0)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def execution_device(vae: torch.nn.Module) -> torch.device:
    """Where the decode runs. With accelerate's model CPU offload, bring the VAE in first, as `vae.decode` would."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device

        return torch.device(_get_group_onload_device(vae))
    except (ImportError, ValueError):
        pass
    return next(vae.parameters()).device


class StreamingDecode:
    """One decode of one latent video. Iterate `chunks()`; read `stats()` afterwards."""

    def __init__(self, vae: torch.nn.Module, latents: torch.Tensor, settings: DecodeSettings):
        check_decode(settings, min_px=1, max_px=None)
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(f"latents must be (1, C, F, H, W) for one video, got {tuple(latents.shape)}")
        self.vae = vae
        self.settings = settings
        self.latents = latents  # (1, C, F, h, w); slices move to the device per chunk and tile
        _, _, self.num_latent, self.lat_h, self.lat_w = latents.shape
        # CogVideoX at one latent frame per chunk also runs its upper blocks one frame at a time: the
        # smallest setting; GroupNorm then sees single frames (a PSNR cost, measured in the tests).
        self.decoder: CausalDecoder = causal_decoder(vae, frame_by_frame=settings.chunk_frames == 1)
        self.bounds = self.decoder.chunk_bounds(self.num_latent, settings.chunk_frames)
        self.chunk_frames = settings.chunk_frames or self.decoder.own_chunk
        self.factor = self.decoder.spatial_factor
        tile = (settings.tile_y, settings.tile_x) if settings.enable_vae_tiling else None
        self.layout = plan_tiles(
            self.lat_h, self.lat_w, self.factor, tile, (settings.tile_stride_y, settings.tile_stride_x)
        )
        self._stride_px: tuple[int, int] | None = (
            (settings.tile_stride_y, settings.tile_stride_x) if settings.enable_vae_tiling else None
        )
        self.oom_steps: list[OomStep] = []
        self.frames = 0
        self.chunks_done = 0
        self.seconds = 0.0
        self.device = torch.device("cpu")
        self.dtype = next(vae.parameters()).dtype
        self._peak_gpu: int | None = None
        self._peak_gpu_before: int | None = None
        self._weights: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def num_chunks(self) -> int:
        return len(self.bounds)

    def chunks(
        self, convert: Callable[[torch.Tensor], Any], stop: threading.Event | None = None
    ) -> Iterator[Any]:
        """Yield convert(chunk) per chunk, chunk = (1, 3, n, H, W) clamped to [-1, 1], float32, on the device.

        `convert` runs before the chunk's device tensors are dropped; what it returns should live on the CPU.
        """
        t0 = time.perf_counter()
        self.device = execution_device(self.vae)
        if self.device.type == "cpu":
            # glibc keeps freed blocks in its heap, and the per-frame activations of one tile, freed between
            # the long-lived causal caches, leave holes that the next stage cannot reuse: RSS climbs to every
            # tile's high-water mark. Handing freed pages back after each stage keeps RSS near what is live
            # (Wan 240x360: 1.32 -> 1.21 GiB) at a few page faults; a fixed 1 MiB mmap threshold held it
            # lower (1.12 GiB) but every tensor then faulted in fresh pages: 45 s instead of 33 s.
            self.decoder.after_stage = trim_host_heap
        if self.device.type == "cuda":
            self._peak_gpu_before = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        logger.info(
            "decode %s: %d latent frames in %d chunks (%s latent frames each%s), %s, on %s",
            self.decoder.family, self.num_latent, self.num_chunks, self.settings.chunk_frames or "own",
            ", frame by frame" if self.decoder.frame_by_frame else "", self.layout.describe(), self.device,
        )
        states: list | None = None
        j = 0
        try:
            while j < self.num_chunks:
                if stop is not None and stop.is_set():
                    raise DecodeCancelled(f"stopped before chunk {j + 1}/{self.num_chunks}")
                failure = None
                try:
                    if states is None:
                        states = [self.decoder.new_state() for _ in self.layout.tiles()]
                        self._replay(states, j)
                    video = self._decode_chunk(states, j)  # (1, 3, n, H, W) float32, on the device
                    out = convert(video)
                    del video
                except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if failure is not None:
                    # Out of the except block, so the traceback no longer pins the failed chunk's tensors.
                    states = None
                    release_memory()
                    self._step_down(j, failure)
                    continue
                self.frames += self._frames_in(out)
                self.chunks_done = j + 1
                yield out
                del out
                j += 1
        finally:
            del states
            self._weights.clear()
            if self.device.type == "cuda":
                self._peak_gpu = torch.cuda.max_memory_allocated(self.device)
            release_memory()
            self.seconds = time.perf_counter() - t0

    @staticmethod
    def _frames_in(out: Any) -> int:
        shape = getattr(out, "shape", None)
        if shape is None:
            return 0
        return int(shape[0]) if len(shape) == 4 else int(shape[2])  # (T, H, W, C) frames or (B, C, T, H, W)

    def stats(self) -> DecodeStats:
        f = self.factor
        tiled = self.layout.tiled
        return DecodeStats(
            frames=self.frames,
            chunks=self.chunks_done,
            seconds=self.seconds,
            family=self.decoder.family,
            latent_frames=self.num_latent,
            height=self.lat_h * f,
            width=self.lat_w * f,
            chunk_frames=self.chunk_frames,
            frame_by_frame=self.decoder.frame_by_frame,
            tiles=self.layout.count,
            tile_px=(self.layout.tile_h * f, self.layout.tile_w * f) if tiled else None,
            stride_px=self._stride_px if tiled else None,
            oom_steps=tuple(self.oom_steps),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            peak_gpu_bytes=self._peak_gpu,
            peak_gpu_bytes_before=self._peak_gpu_before,
        )

    # ---------------------------------------------------------------- one chunk

    def _weight(self, y0: int, x0: int) -> torch.Tensor:
        """The tile's blend weight divided by the sum over all tiles, so blended pixels need no division."""
        if not self._weights:
            total = torch.zeros(self.lat_h * self.factor, self.lat_w * self.factor)
            raw = {}
            for ty, tx in self.layout.tiles():
                raw[ty, tx] = blend_weight(self.layout, ty, tx)
                total[self._pixels(ty, tx)] += raw[ty, tx]
            for (ty, tx), w in raw.items():
                self._weights[ty, tx] = (w / total[self._pixels(ty, tx)]).to(self.device)
        return self._weights[y0, x0]

    def _pixels(self, y0: int, x0: int) -> tuple[slice, slice]:
        f, lay = self.factor, self.layout
        return slice(y0 * f, (y0 + lay.tile_h) * f), slice(x0 * f, (x0 + lay.tile_w) * f)

    def _tile_latents(self, j: int, y0: int, x0: int) -> torch.Tensor:
        a, b = self.bounds[j]
        lay = self.layout
        z = self.latents[:, :, a:b, y0 : y0 + lay.tile_h, x0 : x0 + lay.tile_w]  # (1, C, t, th, tw)
        return z.to(self.device, self.dtype)

    def _park(self, state: Any) -> Any:
        # On a GPU, the caches of the tiles not being decoded wait in host memory.
        if self.device.type == "cuda" and self.layout.tiled:
            return _map_tensors(state, lambda t: t.to("cpu"))
        return state

    def _unpark(self, state: Any) -> Any:
        if self.device.type == "cuda" and self.layout.tiled:
            return _map_tensors(state, lambda t: t.to(self.device))
        return state

    @torch.inference_mode()
    def _decode_chunk(self, states: list, j: int) -> torch.Tensor:
        a, b = self.bounds[j]
        n = self.decoder.frames_out(a, b, self.num_latent)
        last = j == self.num_chunks - 1  # no chunk follows: each tile's causal cache goes as soon as it is done
        if not self.layout.tiled:
            pieces = list(self.decoder.decode(self._tile_latents(j, 0, 0), states[0], a, self.num_latent))
            video = torch.cat(pieces, dim=2).float() if len(pieces) > 1 else pieces[0].float()
            del pieces
            return video.clamp_(-1.0, 1.0)
        out_c = self.vae.config.out_channels
        video = torch.zeros(
            1, out_c, n, self.lat_h * self.factor, self.lat_w * self.factor, dtype=torch.float32, device=self.device
        )  # (B, C, T, H, W): this chunk only
        for t, (y0, x0) in enumerate(self.layout.tiles()):
            ys, xs = self._pixels(y0, x0)
            w = self._weight(y0, x0)  # (th * f, tw * f)
            state = self._unpark(states[t])
            k = 0
            for piece in self.decoder.decode(self._tile_latents(j, y0, x0), state, a, self.num_latent):
                m = piece.shape[2]
                video[:, :, k : k + m, ys, xs].addcmul_(piece.float(), w)
                k += m
                del piece
            states[t] = None if last else self._park(state)
            del state
            if k != n:
                raise RuntimeError(f"chunk {j} of tile ({y0}, {x0}) gave {k} frames, expected {n}")
        return video.clamp_(-1.0, 1.0)

    @torch.inference_mode()
    def _replay(self, states: list, upto: int) -> None:
        """Rebuild the causal caches of fresh tiles by decoding chunks [0, upto) again, output discarded."""
        for j in range(upto):
            for t, (y0, x0) in enumerate(self.layout.tiles()):
                state = self._unpark(states[t])
                for _ in self.decoder.decode(self._tile_latents(j, y0, x0), state, self.bounds[j][0], self.num_latent):
                    pass
                states[t] = self._park(state)

    # ---------------------------------------------------------------- out of memory

    def _split_chunks(self, j: int, tile_px: tuple[int, int], error: str) -> bool:
        """The last rung: from chunk j on, one latent frame per chunk, frame by frame. False if already so."""
        if self.decoder.frame_by_frame and all(b - a == 1 for a, b in self.bounds[j:]):
            return False
        self.bounds = _split_chunks_after(self.bounds, j)
        self.decoder.frame_by_frame = True
        self.chunk_frames = 1
        self.oom_steps.append(OomStep(j, tile_px, tile_px, self._stride_px, j, error, "one latent frame per chunk"))
        logger.warning(
            "out of memory at decode chunk %d: tiles are at the floor; decoding the rest one latent frame per chunk "
            "(%d chunks now), replaying %d earlier chunk(s)", j + 1, self.num_chunks, j,
        )
        return True

    def _step_down(self, j: int, error: str) -> None:
        f = self.factor
        # Halve the largest tile asked for (the layout's own may be smaller) and report it, so that the
        # settings a step names reproduce it.
        old_h, old_w = self.layout.max_tile_h, self.layout.max_tile_w
        floor = max(1, MIN_TILE_PX // f)
        tile_h = max(floor, old_h // 2) if old_h > floor else old_h
        tile_w = max(floor, old_w // 2) if old_w > floor else old_w
        before = (old_h * f, old_w * f)
        if (tile_h, tile_w) == (old_h, old_w):
            if self._split_chunks(j, before, error):
                return
            raise DecodeOutOfMemory(
                f"out of memory decoding chunk {j + 1}/{self.num_chunks} even with {before[0]}x{before[1]} px tiles "
                f"(the floor is {MIN_TILE_PX} px) and one latent frame per chunk "
                f"({len(self.oom_steps)} step(s) down already): {error}"
            )
        # Keep the overlap in proportion to the tile, so seams stay blended.
        if self._stride_px is not None:
            sy = self._stride_px[0] * tile_h // old_h
            sx = self._stride_px[1] * tile_w // old_w
        else:  # was untiled: a quarter of the tile overlaps
            sy, sx = tile_h * f * 3 // 4, tile_w * f * 3 // 4
        stride = (max(f, sy // f * f), max(f, sx // f * f))
        self.layout = plan_tiles(self.lat_h, self.lat_w, f, (tile_h * f, tile_w * f), stride)
        self._stride_px = stride
        self._weights.clear()
        step = OomStep(j, before, (tile_h * f, tile_w * f), stride, j, error)
        self.oom_steps.append(step)
        logger.warning(
            "out of memory at decode chunk %d/%d: tiles %dx%d -> %dx%d px (stride %dx%d), replaying %d earlier chunk(s)",
            j + 1, self.num_chunks, *before, *step.tile_to_px, *stride, j,
        )


def _split_chunks_after(bounds: list[tuple[int, int]], j: int) -> list[tuple[int, int]]:
    """Chunks [0, j) as they were; from chunk j on, one latent frame per chunk."""
    return bounds[:j] + [(a, a + 1) for a in range(bounds[j][0], bounds[-1][1])]


def stream_decode(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    settings: DecodeSettings,
    sink: FrameSink,
    on_chunk: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> DecodeStats:
    """Decode `latents` (1, C, F, h, w), VAE space, chunk by chunk into `sink.write((T, H, W, 3) uint8)`.

    on_chunk(j, m) runs after chunk j of m (1-based) is in the sink; it may raise to cancel.
    """
    run = StreamingDecode(vae, latents, settings)
    for j, frames in enumerate(run.chunks(lambda video: to_uint8_frames(video).cpu().numpy(), stop), start=1):
        sink.write(frames)
        del frames
        if on_chunk is not None:
            on_chunk(j, run.num_chunks)  # the count grows if an out-of-memory step splits the chunks
    stats = run.stats()
    logger.info(
        "decoded %d frames (%dx%d) in %d chunks, %.1f s%s",
        stats.frames, stats.width, stats.height, stats.chunks, stats.seconds,
        f"; {len(stats.oom_steps)} out-of-memory step(s) down" if stats.oom_steps else "",
    )
    return stats
