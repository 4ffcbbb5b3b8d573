"""Causal, chunk-by-chunk decoders for the CogVideoX and Wan VAEs, built from diffusers' own modules.

One object per VAE family knows three things: how the latent frames split into causal chunks, how many
video frames a chunk yields, and how to decode one chunk of one tile given that tile's causal state (the
last frames every causal conv saw, carried from chunk to chunk).

The causal caches are diffusers' own:
- CogVideoX: the nested `conv_cache` dicts that `CogVideoXDecoder3D` returns. Each `CogVideoXCausalConv3d`
  caches the last `kernel - 1` frames of its *concatenated* input (cache + new frames), so a chunk shorter
  than the cache is topped up from the old cache, as seed 000 asks.
- Wan: the `feat_cache` list and `feat_idx` counter that `AutoencoderKLWan` keeps in `_feat_map` /
  `_conv_idx`. The index is reset for every chunk and the cache kept; diffusers' code already caches the
  concatenated input and tops up short chunks. We keep one list per tile instead of the VAE's single
  `_feat_map`, and never call `clear_cache`, which would drop it.

What we write ourselves is the walk through the decoder's blocks (a few lines per family), because
diffusers' forward methods assume the whole video or diffusers' own chunking:
- CogVideoX's temporal upsampler keeps a chunk's first frame single whenever the chunk has an odd number
  of frames > 1 and never doubles a 1-frame chunk: right for diffusers' own chunks ([3], [2], [2], ...),
  wrong for any finer or other split. Ours keeps exactly the video's first frame single (when the latent
  frame count is odd, as diffusers does) and doubles every other frame.
- Wan's decoder is causal frame by frame (its norms are per pixel, its attention per frame), so after
  each block we carry on one frame at a time, depth first: the same numbers as diffusers with a quarter
  of the activations at full resolution.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)



class CausalDecoder:
    """Decode one chunk of latent frames of one tile, carrying each tile's causal state across chunks."""

    family: str = ""  # the families/ module this VAE belongs to
    spatial_factor: int = 8  # output pixels per latent pixel
    temporal_factor: int = 4  # output frames per latent frame, after the first
    own_chunk: int = 1  # latent frames per chunk in diffusers' own decode
    frame_by_frame: bool = False  # whether blocks after the first run one output frame at a time

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        # Called after every stage (a block, or conv_in + mid block, or norm + conv_out) of one tile: the
        # stream hands the host heap's freed pages back there when decoding on the CPU.
        self.after_stage: Callable[[], None] | None = None

    def _stage_done(self) -> None:
        if self.after_stage is not None:
            self.after_stage()

    def chunk_bounds(self, num_latent: int, chunk_frames: int = 0) -> list[tuple[int, int]]:
        """[start, end) latent frames of each chunk; chunk_frames 0 means the VAE's own chunk size."""
        raise NotImplementedError

    def frames_out(self, start: int, end: int, num_latent: int) -> int:
        """Video frames that latent frames [start, end) of a `num_latent`-frame video decode to."""
        raise NotImplementedError

    def total_frames(self, num_latent: int, chunk_frames: int = 0) -> int:
        return sum(self.frames_out(a, b, num_latent) for a, b in self.chunk_bounds(num_latent, chunk_frames))

    def new_state(self) -> Any:
        """An empty causal state for one tile."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor, state: Any, start: int, num_latent: int) -> Iterator[torch.Tensor]:
        """z: (B, C, t, h, w), latent frames [start, start + t) of one tile, on the VAE's device and dtype.

        Yields the chunk's video frames in order, as (B, 3, n, h * f, w * f) pieces, and updates `state`.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------- CogVideoX

# Spatial norms' 1-frame convs (conv_y, conv_b) never read their cache, but diffusers stores a full copy of
# their input as one; with one cache per tile kept across chunks, that copy would cost as much as a layer's.
_UNUSED_CACHE_KEYS = frozenset({"conv_y", "conv_b"})


def _prune_cache(cache: dict) -> dict:
    return {k: _prune_cache(v) if isinstance(v, dict) else v for k, v in cache.items() if k not in _UNUSED_CACHE_KEYS}


def _expand_time(zq: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """Repeat latent frames to follow a temporal upsampling, so zq stays aligned frame for frame with f.

    Nearest interpolation in diffusers' spatial norm maps the same frames, so the values do not change.
    """
    if keep_first:
        return torch.cat([zq[:, :, :1], zq[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
    return zq.repeat_interleave(2, dim=2)


def _cogvideox_upsample(upsampler: torch.nn.Module, x: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """CogVideoXUpsample3D.forward with the first-frame rule made explicit (see the module docstring)."""
    if upsampler.compress_time:
        if keep_first:  # the video's first frame: spatial upsampling only
            first = F.interpolate(x[:, :, 0], scale_factor=2.0)[:, :, None]  # (B, C, 1, 2H, 2W)
            if x.shape[2] > 1:
                x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
            else:
                x = first
        else:
            x = F.interpolate(x, scale_factor=2.0)  # (B, C, 2T, 2H, 2W), nearest
    else:
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = F.interpolate(x, scale_factor=2.0)
        x = x.reshape(b, t, c, *x.shape[2:]).permute(0, 2, 1, 3, 4)
    b, c, t, h, w = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    x = upsampler.conv(x)
    return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C', T', H', W')


class CogVideoXCausal(CausalDecoder):
    """AutoencoderKLCogVideoX, chunk by chunk.

    GroupNorm in CogVideoX normalises over the frames of a chunk, so only diffusers' own chunking (2 latent
    frames, the remainder in the first chunk) reproduces its numbers; finer chunks, and `frame_by_frame`,
    trade a little fidelity (PSNR) for memory.
    """

    family = "cogvideox"

    def __init__(self, vae: torch.nn.Module, frame_by_frame: bool = False):
        super().__init__(vae)
        self.decoder = vae.decoder
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.levels = int(math.log2(vae.config.temporal_compression_ratio))
        self.temporal_factor = 2**self.levels
        self.own_chunk = int(getattr(vae, "num_latent_frames_batch_size", 2))
        self.frame_by_frame = frame_by_frame
        self.last_stage = len(self.decoder.up_blocks) + 1

    def chunk_bounds(self, num_latent: int, chunk_frames: int = 0) -> list[tuple[int, int]]:
        # diffusers' rule: floor(F / c) chunks of c frames, the remainder joining the first.
        c = chunk_frames or self.own_chunk
        n = max(num_latent // c, 1)
        first = num_latent - (n - 1) * c
        return [(0, first)] + [(first + i * c, first + (i + 1) * c) for i in range(n - 1)]

    def keeps_first(self, start: int, num_latent: int) -> bool:
        # diffusers keeps the first frame single exactly when its first chunk is odd, i.e. F is odd.
        return start == 0 and num_latent % 2 == 1

    def frames_out(self, start: int, end: int, num_latent: int) -> int:
        t = end - start
        return (t - 1) * self.temporal_factor + 1 if self.keeps_first(start, num_latent) else t * self.temporal_factor

    def new_state(self) -> dict:
        return {}

    def decode(self, z: torch.Tensor, state: dict, start: int, num_latent: int) -> Iterator[torch.Tensor]:
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        yield from self._run(0, z, z, self.keeps_first(start, num_latent), state)

    def _run(self, stage: int, x: torch.Tensor, zq: torch.Tensor, keep_first: bool, state: dict) -> Iterator[torch.Tensor]:
        x, zq = self._stage(stage, x, zq, keep_first, state)
        self._stage_done()
        if stage == self.last_stage:
            yield x
        elif self.frame_by_frame and x.shape[2] > 1:
            for i in range(x.shape[2]):
                yield from self._run(stage + 1, x[:, :, i : i + 1], zq[:, :, i : i + 1], keep_first and i == 0, state)
        else:
            yield from self._run(stage + 1, x, zq, keep_first, state)

    def _stage(self, stage: int, x: torch.Tensor, zq: torch.Tensor, keep_first: bool, state: dict):
        dec = self.decoder
        if stage == 0:  # conv_in + mid block, at latent resolution
            x, state["conv_in"] = dec.conv_in(x, conv_cache=state.get("conv_in"))
            x, cache = dec.mid_block(x, None, zq, conv_cache=state.get("mid_block"))
            state["mid_block"] = _prune_cache(cache)
            return x, zq
        if stage == self.last_stage:  # norm_out + conv_out, at full resolution
            x, _ = dec.norm_out(x, zq, conv_cache=None)
            x = dec.conv_act(x)
            x, state["conv_out"] = dec.conv_out(x, conv_cache=state.get("conv_out"))
            return x, zq
        key = f"up_block_{stage - 1}"
        block = dec.up_blocks[stage - 1]
        # Take each resnet's old cache out as it is used, so old and new caches of a whole block never coexist.
        old, new = state.pop(key, {}), {}
        for i, resnet in enumerate(block.resnets):
            x, cache = resnet(x, None, zq, conv_cache=old.pop(f"resnet_{i}", None))
            new[f"resnet_{i}"] = _prune_cache(cache)
            del cache
        state[key] = new
        if block.upsamplers is not None:
            upsampler = block.upsamplers[0]
            x = _cogvideox_upsample(upsampler, x, keep_first)
            if upsampler.compress_time:
                zq = _expand_time(zq, keep_first)
        return x, zq


# --------------------------------------------------------------------------- Wan


def _wan_cached_conv(conv: torch.nn.Module, x: torch.Tensor, cache: list, idx: int) -> torch.Tensor:
    """What WanDecoder3d.forward does around conv_in and conv_out: cache the last 2 frames of the input,
    topped up with the old cache's last frame when the chunk has only one."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T

    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < CACHE_T and cache[idx] is not None:
        cache_x = torch.cat([cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    out = conv(x, cache[idx])
    cache[idx] = cache_x
    return out


def _wan_slots(module: torch.nn.Module) -> int:
    """Cache entries a Wan decoder block uses per call: two per residual block, one per temporal upsampler."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample, WanResidualBlock

    return sum(
        2 if isinstance(m, WanResidualBlock) else 1
        for m in module.modules()
        if isinstance(m, WanResidualBlock) or (isinstance(m, WanResample) and m.mode == "upsample3d")
    )


class WanCausal(CausalDecoder):
    """AutoencoderKLWan (2.1 and 2.2), one latent frame per chunk by default, one output frame at a time."""

    family = "wan"
    frame_by_frame = True

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        cfg = vae.config
        self.decoder = vae.decoder
        self.patch_size = cfg.patch_size
        self.spatial_factor = int(cfg.scale_factor_spatial or 8)
        self.temporal_factor = int(cfg.scale_factor_temporal or 4)
        self.own_chunk = 1
        self.last_stage = len(self.decoder.up_blocks) + 1
        # Cache slot where each stage starts: conv_in is slot 0, the mid block follows, then each up block.
        starts = [1]
        for block in [self.decoder.mid_block, *self.decoder.up_blocks]:
            starts.append(starts[-1] + _wan_slots(block))
        self.slot_starts = starts  # [mid, up_0, ..., up_n, conv_out]
        self.slots = starts[-1] + 1

    def chunk_bounds(self, num_latent: int, chunk_frames: int = 0) -> list[tuple[int, int]]:
        # The first latent frame must be a chunk of its own: the temporal upsamplers mark their first call
        # ("Rep") and skip it, so anything decoded with it would not be upsampled in time.
        c = chunk_frames or self.own_chunk
        return [(0, 1)] + [(s, min(s + c, num_latent)) for s in range(1, num_latent, c)]

    def frames_out(self, start: int, end: int, num_latent: int) -> int:
        t = end - start
        return (t - 1) * self.temporal_factor + 1 if start == 0 else t * self.temporal_factor

    def new_state(self) -> list:
        return [None] * self.slots

    def decode(self, z: torch.Tensor, state: list, start: int, num_latent: int) -> Iterator[torch.Tensor]:
        x = self.vae.post_quant_conv(z)  # 1x1x1: frame by frame, pixel by pixel
        yield from self._run(0, x, state, start == 0)

    def _run(self, stage: int, x: torch.Tensor, state: list, first: bool) -> Iterator[torch.Tensor]:
        x = self._stage(stage, x, state, first)
        self._stage_done()
        if stage == self.last_stage:
            if self.patch_size is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                x = unpatchify(x, patch_size=self.patch_size)
            yield x
            return
        for i in range(x.shape[2]):  # depth first: finish each frame before starting the next
            yield from self._run(stage + 1, x[:, :, i : i + 1], state, first)

    def _stage(self, stage: int, x: torch.Tensor, state: list, first: bool) -> torch.Tensor:
        dec = self.decoder
        if stage == 0:
            x = _wan_cached_conv(dec.conv_in, x, state, 0)
            idx = [self.slot_starts[0]]
            x = dec.mid_block(x, feat_cache=state, feat_idx=idx)
        elif stage == self.last_stage:
            x = dec.nonlinearity(dec.norm_out(x))
            return _wan_cached_conv(dec.conv_out, x, state, self.slot_starts[-1])
        else:
            idx = [self.slot_starts[stage]]
            x = dec.up_blocks[stage - 1](x, feat_cache=state, feat_idx=idx, first_chunk=first)
        if idx[0] != self.slot_starts[stage + 1]:
            raise RuntimeError(
                f"Wan decoder stage {stage} used cache slots up to {idx[0]}, expected {self.slot_starts[stage + 1]}: "
                "diffusers' AutoencoderKLWan layout changed; decode/causal.py needs updating"
            )
        return x


def causal_decoder(vae: torch.nn.Module, frame_by_frame: bool = False) -> CausalDecoder:
    """The chunked decoder for a diffusers VAE, found by its family's VAE class (families/)."""
    from families import family_of_vae

    try:
        family = family_of_vae(vae)
    except TypeError:
        raise TypeError(
            f"streaming decode supports {', '.join(DECODERS)}, not {type(vae).__name__}"
        ) from None
    decoder = DECODERS[family.vae_class](vae)
    decoder.frame_by_frame = decoder.frame_by_frame or frame_by_frame
    return decoder


# families.ModelFamily.vae_class -> its chunked decoder
DECODERS: dict[str, type[CausalDecoder]] = {"AutoencoderKLCogVideoX": CogVideoXCausal, "AutoencoderKLWan": WanCausal}
