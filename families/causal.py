"""The shape of a family's streaming decoder (decode/stream.py drives it): decode one chunk of latent frames of one
tile, carrying that tile's causal state (the last frames every causal conv saw) from chunk to chunk.

Each family writes its own, beside its module (families/<name>_vae.py), because the walk through a VAE's decoder
blocks is that VAE's: diffusers' forward methods assume the whole video or diffusers' own chunking. The causal caches
are diffusers' own; see decode/stream.py for how chunks, tiles and memory fit together.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


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
