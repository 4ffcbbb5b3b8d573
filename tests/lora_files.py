"""Random LoRA files for tests and benches, written in the formats people download.

  peft   diffusers / peft keys: `transformer.blocks.N.attn1.to_q.lora_A.weight` (what diffusers saves)
  wan    the original Wan layout the lightx2v and CausVid distill LoRAs use:
         `diffusion_model.blocks.N.self_attn.q.lora_A.weight`
  kohya  musubi-tuner / kohya: `lora_unet_blocks_N_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`

CogVideoX LoRAs are written in the peft layout (`transformer.transformer_blocks.N.attn1.to_q...`), the one
format diffusers' CogVideoX loader reads.
"""
from __future__ import annotations

from pathlib import Path

import torch

WAN_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
COGVIDEOX_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
# diffusers name -> original Wan name (what diffusers' _convert_non_diffusers_wan_lora_to_diffusers maps back)
WAN_ORIGINAL = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                "ffn.net.2": "ffn.2"}


def _key_pair(fmt: str, block_attr: str, i: int, target: str) -> tuple[str, str, str | None]:
    if fmt == "peft":
        base = f"transformer.{block_attr}.{i}.{target}"
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight", None
    if fmt == "wan":
        base = f"diffusion_model.blocks.{i}.{WAN_ORIGINAL[target]}"
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight", None
    if fmt == "kohya":
        base = f"lora_unet_blocks_{i}_{WAN_ORIGINAL[target].replace('.', '_')}"
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
    raise ValueError(f"fmt={fmt!r}: use peft, wan or kohya")


def make_lora(transformer: torch.nn.Module, path: str | Path, fmt: str = "peft", rank: int = 4, seed: int = 0,
              scale: float = 0.5, metadata: dict[str, str] | None = None) -> Path:
    """A random LoRA for `transformer` (its blocks, widths and family) saved at `path` in `fmt`."""
    from safetensors.torch import save_file

    block_attr = "blocks" if hasattr(transformer, "blocks") else "transformer_blocks"
    targets = WAN_TARGETS if block_attr == "blocks" else COGVIDEOX_TARGETS
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(getattr(transformer, block_attr)):
        for target in targets:
            layer = block.get_submodule(target)
            down, up, alpha = _key_pair(fmt, block_attr, i, target)
            sd[down] = torch.randn(rank, layer.in_features, generator=g) * scale
            sd[up] = torch.randn(layer.out_features, rank, generator=g) * scale
            if alpha:
                sd[alpha] = torch.tensor(float(rank))  # alpha = rank: scale 1, as the peft file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def forward(transformer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One transformer forward on fixed random inputs in `dtype` (Wan: B, C, F, H, W; CogVideoX: B, F, C, H, W):
    equal outputs before and after a LoRA came off mean it came off cleanly."""
    g, cfg = torch.Generator().manual_seed(0), transformer.config
    if hasattr(transformer, "blocks"):
        x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
        text = torch.randn(1, 8, cfg.text_dim, generator=g)
    else:
        x = torch.randn(1, 3, cfg.in_channels, 4, 4, generator=g)
        text = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype),
                           timestep=torch.tensor([500]), return_dict=False)[0]
