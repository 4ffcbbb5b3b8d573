"""Turn a pipeline's `output_type="latent"` result into the VAE's input space, per family."""
from __future__ import annotations

import torch


def to_vae_latents(pipe, latents: torch.Tensor, family: str, num_frames: int) -> torch.Tensor:
    """(pipeline latents) -> (B, C, F_latent, H, W), scaled as the VAE's decode expects.

    Mirrors what each diffusers pipeline does before `vae.decode` when output_type != "latent".
    """
    vae = pipe.vae
    if family == "cogvideox":
        # CogVideoX returns (B, F, C, H, W); CogVideoX 1.5 pads the front to a multiple of patch_size_t.
        patch_t = getattr(pipe.transformer.config, "patch_size_t", None)
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        extra = patch_t - latent_frames % patch_t if patch_t and latent_frames % patch_t else 0
        z = latents[:, extra:].permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        return z / vae.config.scaling_factor
    if family == "wan":
        # Wan returns (B, C, F, H, W) normalised per channel.
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        return latents * std + mean
    raise ValueError(f"family={family!r} is not allowed; choose cogvideox or wan")
