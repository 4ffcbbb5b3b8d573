"""CogVideoX's streaming decoder (families/cogvideox.py `causal_decoder`), built from diffusers' own modules.

The causal caches are diffusers': the nested `conv_cache` dicts that `CogVideoXDecoder3D` returns. Each
`CogVideoXCausalConv3d` caches the last `kernel - 1` frames of its *concatenated* input (cache + new frames), so a
chunk shorter than the cache is topped up from the old cache, as seed 000 asks.

Where it departs from diffusers: CogVideoX's temporal upsampler keeps a chunk's first frame single whenever the
chunk has an odd number of frames > 1 and never doubles a 1-frame chunk: right for diffusers' own chunks ([3], [2],
[2], ...), wrong for any finer or other split. Ours keeps exactly the video's first frame single (when the latent
frame count is odd, as diffusers does) and doubles every other frame.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from families.causal import CausalDecoder


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
