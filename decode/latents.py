"""Turn a pipeline's `output_type="latent"` result into the VAE's input space: the family knows how."""
from __future__ import annotations

import torch

from families import get_family


def to_vae_latents(pipe, latents: torch.Tensor, family: str, num_frames: int) -> torch.Tensor:
    """(pipeline latents) -> (B, C, F_latent, H, W), scaled as the VAE's decode expects.

    Mirrors what each diffusers pipeline does before `vae.decode` when output_type != "latent"
    (families/cogvideox.py, families/wan.py: `to_vae_latents`).
    """
    return get_family(family).to_vae_latents(pipe, latents, num_frames)
