"""Wan 2.1 / 2.2 (Wan-AI ...-Diffusers): everything FitVideo knows about this family.

- Pipelines: WanPipeline (t2v), WanImageToVideoPipeline (i2v, with a CLIP image encoder for 2.1 I2V),
  WanVideoToVideoPipeline (v2v).
- Wan 2.2 A14B: the same pipelines with two experts, `transformer` (high noise) and `transformer_2` (low
  noise), each a Wan 14B transformer, switching at `boundary_ratio` x 1000 timesteps (T2V 0.875, I2V 0.9).
  One family, not a module of their own: only the expert count differs, and `ModelFamily.arch` reads it from
  the parameter counts (`ModelArch.experts`: 2 where models.yaml lists `transformer_2`).
- Frames: 4k+1.
- Text: a UMT5-XXL encoder reading at most 512 tokens (the tokenizer's `model_max_length` where smaller); the
  transformer cross-attends to it, and cond / uncond run one after the other (no batch of 2).
- Latents: the pipeline returns (B, C, F, H, W) normalised per channel (`latents_mean` / `latents_std`).
- VAE: AutoencoderKLWan, causal frame by frame (one latent frame per chunk), 8x spatial (Wan 2.2: 16x, with
  a patchified 48-channel latent) and 4x temporal. Chunked causal decode: decode/causal.py `WanCausal`.
- Memory: activation coefficients measured on the real architectures with random weights
  (bench/plan_accuracy.py --calibrate); parameter counts are in configs/models.yaml.
"""
from __future__ import annotations

from families.base import ModelFamily, TransformerArch, VaeArch, VaeProfile

VAE_21 = VaeProfile(
    decode_elems_per_px=5_033.0, decode_elems_per_px_single_chunk=1_737.0, decode_elems_per_px_one_frame=1_737.0,
    encode_elems_per_px=3_689.0, cpu_extra_elems_per_px=120.0,
)
# Wan 2.2's VAE: scaled from Wan 2.1's by the decoder width (256 vs 96 channels at full resolution) and the
# encoder width (160 vs 96) until measured.
VAE_22 = VaeProfile(
    decode_elems_per_px=5_033.0 * 256 / 96, decode_elems_per_px_single_chunk=1_737.0 * 256 / 96,
    decode_elems_per_px_one_frame=1_737.0 * 256 / 96, encode_elems_per_px=3_689.0 * 160 / 96,
    cpu_extra_elems_per_px=120.0 * 256 / 96,
)
VAE_TINY = VaeProfile(  # pipeline_utils/tiny.py's miniature (3 channels), float32
    decode_elems_per_px=78.0, decode_elems_per_px_single_chunk=27.0, decode_elems_per_px_one_frame=27.0,
    encode_elems_per_px=63.0, cpu_im2col_elems_per_px=321.0,
)
# (top decoder channels, latent channels) -> measured profile; anything else scales Wan 2.1's by width
VAE_PROFILES = {(96, 16): VAE_21, (256, 48): VAE_22, (3, 16): VAE_TINY}
FULL_TOP_CHANNELS = 96
MAX_TEXT_TOKENS = 512


class Wan(ModelFamily):
    name = "wan"
    class_prefix = "Wan"
    pipelines = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline", "v2v": "WanVideoToVideoPipeline"}
    image_pipeline = "WanImageToVideoPipeline"
    vae_class = "AutoencoderKLWan"
    frame_step = 4
    own_decode_chunk = 1
    block_prefixes = {"transformer": "blocks.", "transformer_2": "blocks.", "text_encoder": "encoder.block."}
    default_fps = 16
    default_frames = 81
    max_frames = 81

    # ---------------------------------------------------------------- facts from configs
    def folder_defaults(self, configs) -> dict:
        patch = configs.get("transformer", {}).get("patch_size") or (1, 2, 2)
        return dict(
            resolutions=((480, 832), (832, 480)), default_frames=self.default_frames, max_frames=self.max_frames,
            fps=self.default_fps, size_multiple=self._spatial(configs["vae"]) * int(patch[1]),
        )

    def transformer_arch(self, cfg: dict, parts: dict[str, int]) -> TransformerArch:
        patch = cfg.get("patch_size") or (1, 2, 2)
        return TransformerArch(
            params=parts["total"], layers=int(cfg["num_layers"]),
            dim=int(cfg["num_attention_heads"]) * int(cfg.get("attention_head_dim", 128)), ff_dim=int(cfg["ffn_dim"]),
            patch_t=int(patch[0]), patch_hw=int(patch[1]), joint_text_tokens=0, cfg_in_batch=False,
            act_elems_per_dim=4.4,  # measured on Wan 2.1 (float32 norms and residuals)
            largest_leaf_params=parts["largest_leaf"], non_block_params=parts["non_block"],
        )

    def vae_arch(self, cfg: dict, parts: dict[str, int]) -> VaeArch:
        top = int(cfg.get("decoder_base_dim") or cfg.get("base_dim", 96))
        latent = int(cfg.get("z_dim", 16))
        profile = VAE_PROFILES.get((top, latent)) or VAE_21.scaled(top / FULL_TOP_CHANNELS)
        return VaeArch(
            params=parts["total"], latent_channels=latent, spatial_ratio=self._spatial(cfg),
            temporal_ratio=int(cfg.get("scale_factor_temporal") or 4), chunk_latent_frames=1,
            largest_leaf_params=parts["largest_leaf"], top_channels=top, steady_chunk_frames=4,
            own_chunk=self.own_decode_chunk, **vars(profile),
        )

    def text_seq_len(self, configs) -> int:
        return min(MAX_TEXT_TOKENS, int(configs.get("tokenizer", {}).get("model_max_length", MAX_TEXT_TOKENS)))

    @staticmethod
    def _spatial(vae_cfg: dict) -> int:
        return int(vae_cfg.get("scale_factor_spatial") or 8)

    # ---------------------------------------------------------------- behaviour on a loaded pipeline
    def max_sequence_length(self, pipe) -> int:
        return min(MAX_TEXT_TOKENS, int(pipe.tokenizer.model_max_length))

    def to_vae_latents(self, pipe, latents, num_frames: int):
        import torch

        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        return latents * std + mean  # (B, C, F, H, W)

    def vae_spatial_ratio(self, vae) -> int:
        return self._spatial(dict(vae.config))

    def enable_vae_tiling(self, vae, tile, stride) -> None:
        ratio = self.vae_spatial_ratio(vae)

        def step(tile_px: int | None, given: int | None) -> int | None:
            if given is not None:
                if given > (tile_px or given) or given % ratio:
                    raise ValueError(f"tile stride {given} px must be a multiple of {ratio} and at most the tile")
                return given
            return None if tile_px is None else max(ratio, (tile_px * 3 // 4) // ratio * ratio)  # 1/4 overlap

        vae.enable_tiling(
            tile_sample_min_height=tile[0], tile_sample_min_width=tile[1],
            tile_sample_stride_height=step(tile[0], stride[0]), tile_sample_stride_width=step(tile[1], stride[1]),
        )


FAMILY = Wan()
