"""CogVideoX (THUDM CogVideoX 2B, 5B, 5B-I2V, 1.5 5B): everything FitVideo knows about this family.

- Pipelines: CogVideoXPipeline (t2v), CogVideoXImageToVideoPipeline (i2v), CogVideoXVideoToVideoPipeline (v2v).
  An I2V transformer has twice the input channels and learned positional embeddings, so it cannot share the
  T2V transformer; VAE, text encoder, tokenizer and scheduler are shared.
- Frames: 8k+1. CogVideoX 1.0 silently returns the wrong count for other lengths (5 frames give 8).
- Text: a T5-XXL encoder; `max_sequence_length` must equal the transformer's `max_text_seq_length` (226).
  The text tokens join the video sequence (joint attention), and cond + uncond run as one batch of 2.
- Latents: the pipeline returns (B, F, C, H, W) scaled by `scaling_factor`; CogVideoX 1.5 pads the front to a
  multiple of `patch_size_t`.
- Latent preview: kijai's ComfyUI-CogVideoXWrapper factors (ComfyUI itself publishes none for CogVideoX),
  hand-tuned; COGVIDEOX_RGB_FACTORS below says where from, for which latent space, and how it is converted.
- VAE: AutoencoderKLCogVideoX, 8x spatial / 4x temporal; diffusers decodes 2 latent frames per chunk (the
  remainder joins the first). Chunked causal decode: families/cogvideox_vae.py `CogVideoXCausal`.
- diffusers' tiling keeps `tile - int(tile * f)` pixel rows per tile but steps `int(L * (1 - f))` latent rows,
  so most custom tile sizes come out the wrong size: `enable_vae_tiling` picks overlap factors that agree.
- Memory: activation coefficients measured on the real architectures with random weights
  (bench/plan_accuracy.py --calibrate); parameter counts are in configs/models.yaml.
"""
from __future__ import annotations

from families.base import ModelFamily, TransformerArch, VaeArch, VaeProfile
from families.tiny import TEXT_DIM, TINY_SEED, make_tokenizer, t5_config

TINY_TEXT_LEN = 16  # the tiny twin: the pipeline's max_sequence_length must equal the transformer's max_text_seq_length
TINY_I2V_SIZE = (32, 32)  # the tiny twin's learned positional embeddings fix its I2V resolution

# Measured live-tensor peaks (element units per pixel), see VaeProfile.
VAE_FULL = VaeProfile(
    decode_elems_per_px=22_787.0, decode_elems_per_px_single_chunk=17_132.0, decode_elems_per_px_one_frame=5_168.0,
    encode_elems_per_px=9_472.0,
)
VAE_TINY = VaeProfile(  # the tiny twin's VAE (8 channels, build_tiny), float32
    decode_elems_per_px=1_416.0, decode_elems_per_px_single_chunk=1_037.0, decode_elems_per_px_one_frame=183.0,
    encode_elems_per_px=309.0, cpu_im2col_elems_per_px=1_525.0,
)
# (top decoder channels, latent channels) -> measured profile; anything else scales the full one by width
VAE_PROFILES = {(128, 16): VAE_FULL, (8, 4): VAE_TINY}
FULL_TOP_CHANNELS = 128

# Latent preview. ComfyUI publishes no CogVideoX preview factors: its comfy/latent_formats.py `CogVideoX` /
# `CogVideoX1_5` formats (present at Comfy-Org/ComfyUI 75399d78ddcc01f46f9b94521b29f1fe8a90ed53, absent at
# a125cd84b054 of 2025-10-11) set only `scale_factor`. The one published set is kijai's ComfyUI-CogVideoXWrapper,
# pipeline_cogvideox.py class `CogVideoXLatentFormat` (`latent_rgb_factors`, `latent_rgb_factors_bias`),
# https://github.com/kijai/ComfyUI-CogVideoXWrapper/blob/fdb8abd2790b5459ddc7066c31861bb0b62e988b/pipeline_cogvideox.py
# copied verbatim below. They are hand-tuned, not a fit to VAE decodes (the wrapper's `CogVideoLatentPreview` node
# draws random factors in +-0.15 from a seed to try by eye), so expect rough colours. Their space: the wrapper's
# sampler hands ComfyUI's Latent2RGB previewer `5 * x0_pred` in the pipeline's latent space (raw VAE latent *
# the VAE's `scaling_factor`). Which scaling they were tuned under is not stated; the format's `scale_factor =
# 0.7` (the 5B-class VAE config) says 5B, so we take them as factors for 5 * 0.7 * raw = 3.5 * raw, and
# `rgb_projection` folds 5 * 0.7 / scaling_factor into them so that callback latents of either VAE scaling
# (2B: 1.15258426, 5B / 1.5: 0.7) map one raw latent to one colour. FitVideo projects the noisy latents that
# diffusers' callback carries (no x0 prediction there), so early previews are noisy. No real CogVideoX VAE
# weights were at hand to fit or check these numbers against.
COGVIDEOX_RGB_FACTORS = (  # 16 channels, verbatim
    (0.03197404301362048, 0.04091260743347359, 0.0015679806301828524),
    (0.005517101026578029, 0.0052348639043457755, -0.005613441650464035),
    (0.0012485338264583965, -0.016096744206117782, 0.025023940031635054),
    (0.01760126794276171, 0.0036818415416642893, -0.0006019202528157255),
    (0.000444954842288864, 0.006102128982092191, 0.0008457999272962447),
    (-0.010531904354560697, -0.0032275501924977175, -0.00886595780267917),
    (-0.0001454543946122991, 0.010199210750845965, -0.00012702234832386188),
    (0.02078497279904325, -0.001669617778939972, 0.006712703698951264),
    (0.005529571599763264, 0.009733929789086743, 0.001887302765339838),
    (0.012138415094654218, 0.024684961927224837, 0.037211249767461915),
    (0.0010364484570000384, 0.01983636315929172, 0.009864602025627755),
    (0.006802862648143341, -0.0010509255113510681, -0.007026003345126021),
    (0.0003532208468418043, 0.005351971582801936, -0.01845912126717106),
    (-0.009045079994694397, -0.01127941143183089, 0.0042294057970470806),
    (0.002548289972720752, 0.025224244654428216, -0.0006086130121693347),
    (-0.011135669222532816, 0.0018181308593668505, 0.02794541485349922),
)
COGVIDEOX_RGB_BIAS = (-0.023, 0.0, -0.017)
COGVIDEOX_PREVIEW_GAIN = 5.0  # the wrapper's `callback_tensor * 5`
COGVIDEOX_PREVIEW_SCALING = 0.7  # the wrapper format's `scale_factor` (the VAE scaling the factors saw)


class CogVideoX(ModelFamily):
    name = "cogvideox"
    class_prefix = "CogVideoX"
    pipelines = {"t2v": "CogVideoXPipeline", "i2v": "CogVideoXImageToVideoPipeline", "v2v": "CogVideoXVideoToVideoPipeline"}
    image_pipeline = "CogVideoXImageToVideoPipeline"
    vae_class = "AutoencoderKLCogVideoX"
    frame_step = 8
    own_decode_chunk = 2
    block_prefixes = {"transformer": "transformer_blocks.", "text_encoder": "encoder.block."}
    default_fps = 8
    default_frames = 49
    max_frames = 49
    latent_rgb_factors = COGVIDEOX_RGB_FACTORS
    latent_rgb_bias = COGVIDEOX_RGB_BIAS
    # CogVideoXAttnProcessor2_0 calls F.scaled_dot_product_attention directly: a backend set on the model would do
    # nothing until engine/attention.py routes the call through the dispatcher
    attention_dispatched = False
    lora_loader = "CogVideoXPipeline"
    lora_block_key = r"^transformer\.transformer_blocks\.(\d+)\."
    # patch_embed (conv + text_proj), positional and time embeddings. Deliberately NOT kept: the AdaLN modulation
    # Linears (`norm1.linear`, `norm2.linear`): 21 % of CogVideoX-2b's weights; keeping them would cut the fp8 saving
    # from ~50 % to ~40 %.
    quant_keep = (r"patch_embed", r"pos_embed", r"time_embed")

    # ---------------------------------------------------------------- facts from configs
    def folder_defaults(self, configs) -> dict:
        tr, vae = configs.get("transformer", {}), configs["vae"]
        ratio = 2 ** (len(vae["block_out_channels"]) - 1)
        frames = int(tr.get("sample_frames", self.default_frames))
        packed = bool(tr.get("patch_size_t"))  # CogVideoX 1.5: 16 fps, up to 161 frames
        size = (int(tr.get("sample_height", 60)) * ratio, int(tr.get("sample_width", 90)) * ratio)
        return dict(
            resolutions=(size,), default_frames=frames, max_frames=161 if packed else frames,
            fps=16 if packed else self.default_fps, size_multiple=ratio * int(tr.get("patch_size", 2)),
            # learned positional embeddings (the I2V models) fix the size they were trained at
            fixed_size=size if tr.get("use_learned_positional_embeddings") else None,
        )

    def transformer_arch(self, cfg: dict, parts: dict[str, int]) -> TransformerArch:
        dim = int(cfg["num_attention_heads"]) * int(cfg.get("attention_head_dim", 64))
        return TransformerArch(
            params=parts["total"], layers=int(cfg["num_layers"]), dim=dim, ff_dim=4 * dim,
            patch_t=int(cfg.get("patch_size_t") or 1), patch_hw=int(cfg.get("patch_size", 2)),
            joint_text_tokens=int(cfg.get("max_text_seq_length", 226)), cfg_in_batch=True,
            # measured: CogVideoX-2b 4.1; the rotary models (5B, 1.5) keep cos/sin tables alive: 4.65
            act_elems_per_dim=4.65 if cfg.get("use_rotary_positional_embeddings") else 4.1,
            largest_leaf_params=parts["largest_leaf"], non_block_params=parts["non_block"],
        )

    def vae_arch(self, cfg: dict, parts: dict[str, int]) -> VaeArch:
        top, latent = int(cfg["block_out_channels"][0]), int(cfg.get("latent_channels", 16))
        profile = VAE_PROFILES.get((top, latent)) or VAE_FULL.scaled(top / FULL_TOP_CHANNELS)
        return VaeArch(
            params=parts["total"], latent_channels=latent, spatial_ratio=2 ** (len(cfg["block_out_channels"]) - 1),
            temporal_ratio=int(cfg.get("temporal_compression_ratio", 4)), chunk_latent_frames=3,
            largest_leaf_params=parts["largest_leaf"], top_channels=top, steady_chunk_frames=8,
            own_chunk=self.own_decode_chunk, **vars(profile),
        )

    def text_seq_len(self, configs) -> int:
        return int(configs["transformer"].get("max_text_seq_length", 226))

    # ---------------------------------------------------------------- behaviour on a loaded pipeline
    def max_sequence_length(self, pipe) -> int:
        return int(pipe.transformer.config.max_text_seq_length)  # anything else breaks the joint attention

    def to_vae_latents(self, pipe, latents, num_frames: int):
        patch_t = getattr(pipe.transformer.config, "patch_size_t", None)
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        extra = patch_t - latent_frames % patch_t if patch_t and latent_frames % patch_t else 0
        z = latents[:, extra:].permute(0, 2, 1, 3, 4)  # (B, F, C, H, W) -> (B, C, F, H, W)
        return z / pipe.vae.config.scaling_factor

    def preview_latents(self, latents):
        # (B, F, C, H, W) -> (B, C, F, H, W), a view. CogVideoX 1.5's front padding frames stay (to_vae_latents
        # drops them; a preview does not need the frame count it takes).
        return latents.permute(0, 2, 1, 3, 4)

    def rgb_projection(self, channels: int, pipe=None):
        factors, bias = super().rgb_projection(channels, pipe)
        if factors is not COGVIDEOX_RGB_FACTORS:
            return factors, bias
        # the factors want 5 * 0.7 * raw and the callback latents are scaling_factor * raw (see COGVIDEOX_RGB_FACTORS)
        scaling = float(pipe.vae.config.scaling_factor) if pipe is not None else COGVIDEOX_PREVIEW_SCALING
        gain = COGVIDEOX_PREVIEW_GAIN * COGVIDEOX_PREVIEW_SCALING / scaling
        return tuple(tuple(v * gain for v in row) for row in factors), bias

    def vae_spatial_ratio(self, vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def causal_decoder(self, vae):
        from families.cogvideox_vae import CogVideoXCausal

        return CogVideoXCausal(vae)

    def enable_vae_tiling(self, vae, tile, stride) -> None:
        # stride: diffusers' CogVideoX tiling has no stride; the overlap factor below plays its part
        ratio = self.vae_spatial_ratio(vae)
        kwargs = {}
        for axis, px, default in (("height", tile[0], 1 / 6), ("width", tile[1], 1 / 5)):
            if px:
                kwargs[f"tile_sample_min_{axis}"] = px
                kwargs[f"tile_overlap_factor_{axis}"] = overlap_factor(px, ratio, default)
        vae.enable_tiling(**kwargs)


    # ---------------------------------------------------------------- the tiny twin
    tiny_twins = ("tiny-cogvideox",)

    def build_tiny(self, name: str) -> dict[str, object]:
        import torch
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline
        from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(TINY_SEED)
        tokenizer = make_tokenizer(TINY_TEXT_LEN)
        text_encoder = T5EncoderModel(t5_config(T5Config, len(tokenizer)))
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )
        common = dict(
            num_attention_heads=2,
            attention_head_dim=16,  # rotary (I2V) splits it 4/6/6 over t/h/w: each share must be even
            out_channels=4, time_embed_dim=2, text_embed_dim=TEXT_DIM, num_layers=1, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=TINY_TEXT_LEN,
        )
        transformer = CogVideoXTransformer3DModel(in_channels=4, sample_width=4, sample_height=4, **common)
        h, w = TINY_I2V_SIZE
        transformer_i2v = CogVideoXTransformer3DModel(
            in_channels=8,  # noise latents + image latents
            sample_height=h // 8, sample_width=w // 8,
            use_rotary_positional_embeddings=True,  # as CogVideoX-5b-I2V: rotary + learned
            use_learned_positional_embeddings=True, **common,
        )
        scheduler = CogVideoXDDIMScheduler(  # the CogVideoX-2b scheduler config
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
            timestep_spacing="trailing",
        )
        shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)
        return {
            "t2v": CogVideoXPipeline(transformer=transformer, scheduler=scheduler, **shared),
            "i2v": CogVideoXImageToVideoPipeline(transformer=transformer_i2v, scheduler=scheduler, **shared),
        }


def overlap_factor(tile_px: int, ratio: int, default: float) -> float:
    """An overlap factor with which diffusers' CogVideoX tiling puts tiles back at the right size.

    Its tiled decode steps `int(L * (1 - f))` latent rows per tile (L = tile_px / ratio) but keeps
    `tile_px - int(tile_px * f)` pixel rows of each, so unless the two agree the video comes out the
    wrong size (120 px tiles give 248 rows for 240). The encode side has the mirror condition. Search
    the latent overlap nearest to the default for which both hold, in the same float arithmetic.
    """
    latent = tile_px // ratio

    def exact(f: float) -> bool:
        decode_ok = int(latent * (1 - f)) * ratio == tile_px - int(tile_px * f)
        encode_ok = int(tile_px * (1 - f)) == ratio * (latent - int(latent * f))
        return decode_ok and encode_ok and 0 < int(latent * (1 - f)) < latent

    target = default * latent
    for overlap in sorted(range(1, latent), key=lambda o: abs(o - target)):
        f = overlap / latent
        if exact(f):
            return f
    raise ValueError(f"tile size {tile_px} px leaves no exact overlap for the CogVideoX VAE; use e.g. 240, 256 or 360")


FAMILY = CogVideoX()
