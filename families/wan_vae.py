"""Wan's streaming decoder (families/wan.py `causal_decoder`), built from diffusers' own modules.

The causal caches are diffusers': the `feat_cache` list and `feat_idx` counter that `AutoencoderKLWan` keeps in
`_feat_map` / `_conv_idx`. The index is reset for every chunk and the cache kept; diffusers' code already caches the
concatenated input and tops up short chunks. We keep one list per tile instead of the VAE's single `_feat_map`, and
never call `clear_cache`, which would drop it.

Where it departs from diffusers: Wan's decoder is causal frame by frame (its norms are per pixel, its attention per
frame), so after each block we carry on one frame at a time, depth first: the same numbers as diffusers with a
quarter of the activations at full resolution.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from families.causal import CausalDecoder


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
                "diffusers' AutoencoderKLWan layout changed; families/wan_vae.py needs updating"
            )
        return x
