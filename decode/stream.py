"""Streaming VAE decode: causal chunks in time, blended tiles in space, each chunk handed to a sink at once.

    for each chunk of latent frames (causal; each tile's conv caches carried to the next chunk):
        for each tile: decode the chunk of that tile, add it into the chunk's frame with its blend weight
        clamp, turn into uint8 on the device, move to the CPU, drop the device tensors, sink.write(frames)

No tensor ever holds the whole decoded video, on the device or in RAM: the largest is one chunk of frames
(a few frames, float32, full size) plus the causal caches. On a CUDA device the caches of the tiles not
being decoded wait in host memory, so the device holds one tile's cache at a time.

Out of memory: the decode steps down the decode rungs of the one ladder (vram_utils/ladder.py): tiling on,
tiles halved down to its floor, then smaller chunks down to one latent frame (frame by frame). The caches are
rebuilt by decoding the earlier chunks again without output, and the chunk is retried. Every step down is in
the stats; at the bottom, DecodeOutOfMemory says where the decode ended, so a caller never tries those rungs
again. A caller with cheaper rungs to try first (offload on a GPU) passes `step_down=False`.
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

from configs.schema import DecodeSettings
from configs.validate import check_decode
from decode.causal import CausalDecoder, causal_decoder
from vram_utils.tiles import TileLayout, blend_weight, plan_tiles
from vram_utils.ladder import TILE_FLOOR_PX, DecodeStep, Ladder
from vram_utils.sizes import is_out_of_memory, release_memory, trim_host_heap

logger = logging.getLogger(__name__)

MIN_TILE_PX = TILE_FLOOR_PX  # the ladder's one tile floor; below it an OOM is raised


class FrameSink(Protocol):
    def write(self, frames: np.ndarray) -> None: ...


class DecodeCancelled(Exception):
    """The stop event was set; the decode ended between two chunks."""


class DecodeOutOfMemory(torch.OutOfMemoryError):
    """Out of memory at the bottom of the decode rungs. Still a torch.OutOfMemoryError, so callers' OOM handling
    applies; `settings` is where the decode ended and `steps` how it got there, so no caller retries them."""

    def __init__(self, message: str, settings: DecodeSettings | None = None, steps: tuple["OomStep", ...] = ()):
        super().__init__(message)
        self.settings = settings
        self.steps = steps


@dataclass(frozen=True)
class OomStep:
    """One step down after an out-of-memory error."""

    chunk: int  # 0-based chunk that failed
    tile_from_px: tuple[int, int]  # (height, width) in output pixels; the whole frame when untiled
    tile_to_px: tuple[int, int]
    stride_to_px: tuple[int, int] | None
    replayed_chunks: int  # earlier chunks decoded again (without output) to rebuild the caches
    error: str
    action: str = "halve tiles"  # or "one latent frame per chunk" (or "chunks of N latent frames") at the tile floor

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

    def __init__(self, vae: torch.nn.Module, latents: torch.Tensor, settings: DecodeSettings, step_down: bool = True):
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
        # Where the decode stands on the ladder's decode rungs (what an out-of-memory steps down from), and
        # whether it steps at all (False: an out-of-memory is raised as it is, for the caller's own rungs).
        self.position = settings
        self.step_down = step_down
        self.ladder = Ladder(cuda=False, own_chunk=self.decoder.own_chunk,
                             frame_px=(self.lat_h * self.factor, self.lat_w * self.factor), spatial_factor=self.factor)
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

    def write_to(
        self, sink: FrameSink, on_chunk: Callable[[int, int], None] | None = None, stop: threading.Event | None = None
    ) -> DecodeStats:
        """Every chunk into `sink.write((T, H, W, 3) uint8)`; on_chunk(j, m) after chunk j of m (1-based) is in."""
        for j, frames in enumerate(self.chunks(lambda video: to_uint8_frames(video).cpu().numpy(), stop), start=1):
            sink.write(frames)
            del frames
            if on_chunk is not None:
                on_chunk(j, self.num_chunks)  # the count grows if an out-of-memory step splits the chunks
        stats = self.stats()
        logger.info(
            "decoded %d frames (%dx%d) in %d chunks, %.1f s%s",
            stats.frames, stats.width, stats.height, stats.chunks, stats.seconds,
            f"; {len(stats.oom_steps)} out-of-memory step(s) down" if stats.oom_steps else "",
        )
        return stats

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
                    if not is_out_of_memory(exc) or not self.step_down:
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
            release_memory(run_only=True)
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

    def _step_down(self, j: int, error: str) -> None:
        """One decode rung down the ladder from where the decode stands; DecodeOutOfMemory at the bottom."""
        while (step := self.ladder.next_decode(self.position)) is not None:
            taken = self._split_chunks(j, step, error) if step.kind == "chunks" else self._retile(j, step, error)
            self.position = step.settings
            if taken:
                return
        tile = (self.layout.max_tile_h * self.factor, self.layout.max_tile_w * self.factor)
        raise DecodeOutOfMemory(
            f"out of memory decoding chunk {j + 1}/{self.num_chunks} even with {tile[0]}x{tile[1]} px tiles "
            f"(the floor is {MIN_TILE_PX} px) and one latent frame per chunk "
            f"({len(self.oom_steps)} step(s) down already): {error}",
            settings=self.position, steps=tuple(self.oom_steps),
        )

    def _retile(self, j: int, step: DecodeStep, error: str) -> bool:
        """Smaller tiles from chunk j on (the settings' tiles, clamped to the frame)."""
        f, s = self.factor, step.settings
        before = (self.layout.max_tile_h * f, self.layout.max_tile_w * f)
        stride = (s.tile_stride_y, s.tile_stride_x)
        self.layout = plan_tiles(self.lat_h, self.lat_w, f, (s.tile_y, s.tile_x), stride)
        self._stride_px = stride
        self._weights.clear()
        after = (self.layout.max_tile_h * f, self.layout.max_tile_w * f)
        self.oom_steps.append(OomStep(j, before, after, stride, j, error))
        logger.warning(
            "out of memory at decode chunk %d/%d: tiles %dx%d -> %dx%d px (stride %dx%d), replaying %d earlier chunk(s)",
            j + 1, self.num_chunks, *before, *after, *stride, j,
        )
        return True

    def _split_chunks(self, j: int, step: DecodeStep, error: str) -> bool:
        """Smaller chunks from chunk j on (one latent frame: frame by frame too). False if nothing would change."""
        size = step.settings.chunk_frames
        bounds = _split_chunks_after(self.bounds, j, size)
        by_frame = self.decoder.frame_by_frame or size == 1
        if bounds == self.bounds and by_frame == self.decoder.frame_by_frame:
            return False
        self.bounds, self.decoder.frame_by_frame, self.chunk_frames = bounds, by_frame, size
        tile = (self.layout.max_tile_h * self.factor, self.layout.max_tile_w * self.factor)
        action = "one latent frame per chunk" if size == 1 else f"chunks of {size} latent frames"
        self.oom_steps.append(OomStep(j, tile, tile, self._stride_px, j, error, action))
        logger.warning(
            "out of memory at decode chunk %d: tiles are at the floor; decoding the rest in %s (%d chunks now), "
            "replaying %d earlier chunk(s)", j + 1, action, self.num_chunks, j,
        )
        return True


def _split_chunks_after(bounds: list[tuple[int, int]], j: int, size: int = 1) -> list[tuple[int, int]]:
    """Chunks [0, j) as they were; from chunk j on, each chunk split into pieces of at most `size` latent frames
    (existing boundaries are kept: Wan's first latent frame stays a chunk of its own)."""
    return bounds[:j] + [(s, min(s + size, b)) for a, b in bounds[j:] for s in range(a, b, size)]


def decode_ladder(vae: torch.nn.Module, frame_px: tuple[int, int] | None, cuda: bool = False) -> Ladder:
    """The ladder for a decode with `vae`: its chunk rungs start at the VAE's own chunk (CogVideoX 2 latent
    frames, Wan 1), its tiles are whole latent pixels. `frame_px` is the video's (height, width)."""
    dec = causal_decoder(vae)
    return Ladder(cuda=cuda, own_chunk=dec.own_chunk, frame_px=frame_px, spatial_factor=dec.spatial_factor)


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
    return StreamingDecode(vae, latents, settings).write_to(sink, on_chunk, stop)
