"""The streaming decoder of a VAE: its family's (families/<name>_vae.py, through `ModelFamily.causal_decoder`).

One object per VAE knows three things: how the latent frames split into causal chunks, how many video frames a
chunk yields, and how to decode one chunk of one tile given that tile's causal state (families/causal.py).
"""
from __future__ import annotations

import torch

from families.causal import CausalDecoder


def causal_decoder(vae: torch.nn.Module, frame_by_frame: bool = False) -> CausalDecoder:
    """The chunked decoder for a diffusers VAE, found by its family's VAE class (families/)."""
    from families import FAMILIES, family_of_vae

    try:
        family = family_of_vae(vae)
    except TypeError:
        known = ", ".join(f.vae_class for f in FAMILIES.values())
        raise TypeError(f"streaming decode supports {known}, not {type(vae).__name__}") from None
    decoder = family.causal_decoder(vae)
    decoder.frame_by_frame = decoder.frame_by_frame or frame_by_frame
    return decoder
