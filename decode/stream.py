"""VAE decode that hands finished frames to a sink.

Starting point from "Runnable base": one diffusers decode, then frames handed
over chunk by chunk. The tiled, causal, streaming decode replaces it in the
"Streaming decode" issue.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from configs.schema import DecodeSettings

logger = logging.getLogger(__name__)


@dataclass
class DecodeStats:
    frames: int = 0
    chunks: int = 0
    seconds: float = 0.0


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(B=1, C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8, as diffusers' postprocess rounds."""
    video = (video[0].float() / 2 + 0.5).clamp(0, 1)
    return (video * 255).round().to(torch.uint8).permute(1, 2, 3, 0)


@torch.inference_mode()
def stream_decode(vae, latents: torch.Tensor, settings: DecodeSettings, sink, on_chunk=None, stop=None) -> DecodeStats:
    import time

    t0 = time.perf_counter()
    z = latents.to(device=vae.device, dtype=vae.dtype)
    video = vae.decode(z).sample  # (B, C, T, H, W)
    frames = to_uint8_frames(video).cpu().numpy()
    del video, z
    sink.write(frames)
    stats = DecodeStats(frames=len(frames), chunks=1, seconds=time.perf_counter() - t0)
    if on_chunk:
        on_chunk(1, 1)
    return stats
