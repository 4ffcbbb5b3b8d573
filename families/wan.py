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
- Latent preview: ComfyUI's published `Wan21` / `Wan22` latent -> RGB factors, on the normalised latents as
  the pipeline keeps them (WAN21_RGB_FACTORS below says where from and why no transform).
- VAE: AutoencoderKLWan, causal frame by frame (one latent frame per chunk), 8x spatial (Wan 2.2: 16x, with
  a patchified 48-channel latent) and 4x temporal. Chunked causal decode: families/wan_vae.py `WanCausal`.
- Memory: activation coefficients measured on the real architectures with random weights
  (bench/plan_accuracy.py --calibrate); parameter counts are in configs/models.yaml.
"""
from __future__ import annotations

from families.base import ModelFamily, TransformerArch, VaeArch, VaeProfile
from families.tiny import TEXT_DIM, TINY_SEED, make_tokenizer, t5_config

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
VAE_TINY = VaeProfile(  # the tiny twins' VAE (3 channels, build_tiny), float32
    decode_elems_per_px=78.0, decode_elems_per_px_single_chunk=27.0, decode_elems_per_px_one_frame=27.0,
    encode_elems_per_px=63.0, cpu_im2col_elems_per_px=321.0,
)
# (top decoder channels, latent channels) -> measured profile; anything else scales Wan 2.1's by width
VAE_PROFILES = {(96, 16): VAE_21, (256, 48): VAE_22, (3, 16): VAE_TINY}
FULL_TOP_CHANNELS = 96
MAX_TEXT_TOKENS = 512
TINY_TEXT_LEN = 32
TINY_MOE_BOUNDARY = 0.875  # tiny-wan-moe switches experts where Wan 2.2 T2V A14B does (its I2V A14B: 0.9)
# the tiny twins' transformer (tiny-wan's, and each expert of tiny-wan-moe)
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, out_channels=16, text_dim=TEXT_DIM,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)

# Latent preview factors: ComfyUI comfy/latent_formats.py, classes `Wan21` and `Wan22` (`latent_rgb_factors`,
# `latent_rgb_factors_bias`),
# https://github.com/Comfy-Org/ComfyUI/blob/a125cd84b054a57729b5eecab930ca9408719832/comfy/latent_formats.py
# (the same numbers at 75399d78ddcc01f46f9b94521b29f1fe8a90ed53). One (R, G, B) row per latent channel, output in
# [-1, 1]. Space: ComfyUI's Latent2RGB previewer (latent_preview.py) applies them to the sampler's `denoised`,
# which is in the model's space, `process_in`-ed = (raw - latents_mean) / latents_std: exactly diffusers' Wan
# pipeline latents (the pipeline un-normalises with `latents * std + mean` only before the VAE decode). So the
# callback latents take them as they are; only ComfyUI's TAEHV previewer `process_out`s first. ComfyUI previews the
# x0 prediction; diffusers' callback carries the noisy latents, so FitVideo's early previews are noisier.
WAN21_RGB_FACTORS = (  # 16 channels: Wan 2.1 VAE (Wan 2.1 all, Wan 2.2 A14B)
    (-0.1299, -0.1692,  0.2932), ( 0.0671,  0.0406,  0.0442),
    ( 0.3568,  0.2548,  0.1747), ( 0.0372,  0.2344,  0.1420),
    ( 0.0313,  0.0189, -0.0328), ( 0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925), ( 0.0166,  0.1902,  0.1975),
    (-0.0412,  0.0267, -0.1364), (-0.1293,  0.0740,  0.1636),
    ( 0.0680,  0.3019,  0.1128), ( 0.0032,  0.0581,  0.0639),
    (-0.1251,  0.0927,  0.1699), ( 0.0060, -0.0633,  0.0005),
    ( 0.3477,  0.2275,  0.2950), ( 0.1984,  0.0913,  0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)
WAN22_RGB_FACTORS = (  # 48 channels: Wan 2.2 VAE (TI2V 5B)
    ( 0.0119,  0.0103,  0.0046), (-0.1062, -0.0504,  0.0165), ( 0.0140,  0.0409,  0.0491),
    (-0.0813, -0.0677,  0.0607), ( 0.0656,  0.0851,  0.0808), ( 0.0264,  0.0463,  0.0912),
    ( 0.0295,  0.0326,  0.0590), (-0.0244, -0.0270,  0.0025), ( 0.0443, -0.0102,  0.0288),
    (-0.0465, -0.0090, -0.0205), ( 0.0359,  0.0236,  0.0082), (-0.0776,  0.0854,  0.1048),
    ( 0.0564,  0.0264,  0.0561), ( 0.0006,  0.0594,  0.0418), (-0.0319, -0.0542, -0.0637),
    (-0.0268,  0.0024,  0.0260), ( 0.0539,  0.0265,  0.0358), (-0.0359, -0.0312, -0.0287),
    (-0.0285, -0.1032, -0.1237), ( 0.1041,  0.0537,  0.0622), (-0.0086, -0.0374, -0.0051),
    ( 0.0390,  0.0670,  0.2863), ( 0.0069,  0.0144,  0.0082), ( 0.0006, -0.0167,  0.0079),
    ( 0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), ( 0.0714,  0.0827,  0.0447),
    (-0.0304, -0.0574, -0.0196), ( 0.0401,  0.0384,  0.0204), (-0.0758, -0.0297, -0.0014),
    ( 0.0568,  0.1307,  0.1372), (-0.0055, -0.0310, -0.0380), ( 0.0239, -0.0305,  0.0325),
    (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), ( 0.0166,  0.0112, -0.0093),
    (-0.0211,  0.0011,  0.0331), ( 0.1833,  0.1466,  0.2250), (-0.0368,  0.0370,  0.0295),
    (-0.3441, -0.3543, -0.2008), (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153,  0.0800),
    (-0.0101,  0.0068,  0.0156), (-0.0690, -0.0452, -0.0927), (-0.0145,  0.0041,  0.0015),
    ( 0.0421,  0.0451,  0.0373), ( 0.0504, -0.0483, -0.0356), (-0.0837,  0.0168,  0.0055),
)
WAN22_RGB_BIAS = (0.0317, -0.0878, -0.1388)


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
    latent_rgb_factors = WAN21_RGB_FACTORS
    latent_rgb_bias = WAN21_RGB_BIAS
    denoisers = ("transformer", "transformer_2")  # Wan 2.2 A14B: high-noise then low-noise expert
    repeated_blocks = True
    context_parallel = True  # WanTransformer3DModel._cp_plan
    single_expert_tasks = ("v2v",)  # diffusers' WanVideoToVideoPipeline has no second expert
    lora_loader = "WanPipeline"  # converts kohya / musubi `lora_unet_*` and original-Wan `diffusion_model.*` files
    lora_block_key = r"^transformer\.blocks\.(\d+)\."
    flow_shift = True
    quant_keep = (r"patch_embedding", r"condition_embedder")  # the input projection; time / text / image embedders

    def step_cache_problems(self, task: str) -> dict[str, str]:
        split = ("Wan runs cond and uncond as two transformer calls; {} keeps one cache per attention layer, so a "
                 "skipped call would reuse the other branch's attention")
        problems = {"pab": split.format("Pyramid Attention Broadcast"),
                    "fastercache": split.format("FasterCache (which also expects cond+uncond in one batch)")}
        if task == "v2v":
            no_context = ("diffusers' WanVideoToVideoPipeline calls the transformer without `cache_context`, so the "
                          "cache hooks have no per-branch state (cond and uncond would share, or the hook raises)")
            problems.update(dict.fromkeys(("first-block", "taylorseer", "magcache", "pab", "fastercache"), no_context))
        return problems

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
            fp32_params=self._fp32_params(cfg),
        )

    @staticmethod
    def _fp32_params(cfg: dict) -> int:
        """WanTransformer3DModel keeps `time_embedder`, `scale_shift_table` and `norm2` in float32 (diffusers'
        `_keep_in_fp32_modules`): the time embedder's two Linears (freq_dim -> dim -> dim), the output's 2 x dim
        table, and per block a 6 x dim table and norm2's weight and bias. 27.7 M for a 4-block 14B-width stack,
        checked against a loaded model."""
        dim = int(cfg["num_attention_heads"]) * int(cfg.get("attention_head_dim", 128))
        freq = int(cfg.get("freq_dim", 256))
        return freq * dim + dim + dim * dim + dim + 2 * dim + int(cfg["num_layers"]) * 8 * dim

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

    def preview_latents(self, latents):
        return latents  # (B, C, F, H, W) already

    def rgb_projection(self, channels: int, pipe=None):
        # the pipeline's latents are normalised: the space the ComfyUI factors are for (see WAN21_RGB_FACTORS)
        if channels == len(WAN22_RGB_FACTORS):
            return WAN22_RGB_FACTORS, WAN22_RGB_BIAS
        return super().rgb_projection(channels, pipe)

    def vae_spatial_ratio(self, vae) -> int:
        return self._spatial(dict(vae.config))

    def causal_decoder(self, vae):
        from families.wan_vae import WanCausal

        return WanCausal(vae)

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


    # ---------------------------------------------------------------- the tiny twins
    # tiny-wan: Wan 2.1 in miniature, with a CLIP image encoder for I2V. tiny-wan-moe: Wan 2.2 A14B in miniature, two
    # experts (other random weights each) switching at TINY_MOE_BOUNDARY; its I2V, like Wan 2.2 I2V A14B, has no image
    # encoder (the image reaches the transformer only through the VAE latents: in_channels 36, no image_dim). Both
    # draw the text encoder and the VAE first from the same seed: their weights are equal.
    tiny_twins = ("tiny-wan", "tiny-wan-moe")

    def build_tiny(self, name: str) -> dict[str, object]:
        from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

        shared = self._tiny_shared(moe=name == "tiny-wan-moe")
        # the Wan 2.1 scheduler config (flow matching, UniPC)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=3.0)
        if name == "tiny-wan-moe":
            high, low, high_i2v, low_i2v = shared.pop("experts")
            shared.update(scheduler=scheduler, boundary_ratio=TINY_MOE_BOUNDARY)
            return {"t2v": WanPipeline(transformer=high, transformer_2=low, **shared),
                    "i2v": WanImageToVideoPipeline(transformer=high_i2v, transformer_2=low_i2v, image_encoder=None,
                                                   image_processor=None, **shared)}
        transformer, transformer_i2v, image_encoder, image_processor = shared.pop("experts")
        return {"t2v": WanPipeline(transformer=transformer, scheduler=scheduler, **shared),
                "i2v": WanImageToVideoPipeline(transformer=transformer_i2v, scheduler=scheduler,
                                               image_encoder=image_encoder, image_processor=image_processor, **shared)}

    @staticmethod
    def _tiny_shared(moe: bool = False) -> dict:
        """Tokenizer, text encoder, VAE, then ("experts") the transformers in the order their weights are drawn."""
        import torch
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection
        from transformers import UMT5Config, UMT5EncoderModel

        torch.manual_seed(TINY_SEED)
        tokenizer = make_tokenizer(TINY_TEXT_LEN)
        text_encoder = UMT5EncoderModel(t5_config(UMT5Config, len(tokenizer)))
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        if moe:  # each expert its own random draw: the high- and low-noise experts differ, as in the real model
            experts = [WanTransformer3DModel(in_channels=c, **TINY_TRANSFORMER) for c in (16, 16, 36, 36)]
        else:
            experts = [WanTransformer3DModel(in_channels=16, **TINY_TRANSFORMER),
                       WanTransformer3DModel(in_channels=36, image_dim=4, **TINY_TRANSFORMER),  # noise+image+mask
                       CLIPVisionModelWithProjection(CLIPVisionConfig(
                           hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           intermediate_size=16, patch_size=1)),
                       CLIPImageProcessorPil(crop_size=32, size=32)]  # the PIL backend: no torchvision needed
        return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, experts=experts)


FAMILY = Wan()
