"""CogVideoX (THUDM CogVideoX 2B, 5B, 5B-I2V, 1.5 5B): everything FitVideo knows about this family.

- Pipelines: CogVideoXPipeline (t2v), CogVideoXImageToVideoPipeline (i2v), CogVideoXVideoToVideoPipeline (v2v).
  An I2V transformer has twice the input channels and learned positional embeddings, so it cannot share the
  T2V transformer; VAE, text encoder, tokenizer and scheduler are shared.
- Frames: 8k+1. CogVideoX 1.0 silently returns the wrong count for other lengths (5 frames give 8).
- Text: a T5-XXL encoder; `max_sequence_length` must equal the transformer's `max_text_seq_length` (226).
  The text tokens join the video sequence (joint attention), and cond + uncond run as one batch of 2.
- Latents: the pipeline returns (B, F, C, H, W) scaled by `scaling_factor`; CogVideoX 1.5 pads the front to a
  multiple of `patch_size_t`.
- VAE: AutoencoderKLCogVideoX, 8x spatial / 4x temporal; diffusers decodes 2 latent frames per chunk (the
  remainder joins the first). Chunked causal decode: decode/causal.py `CogVideoXCausal`.
- diffusers' tiling keeps `tile - int(tile * f)` pixel rows per tile but steps `int(L * (1 - f))` latent rows,
  so most custom tile sizes come out the wrong size: `enable_vae_tiling` picks overlap factors that agree.
- Memory: activation coefficients measured on the real architectures with random weights
  (bench/plan_accuracy.py --calibrate); parameter counts are in configs/models.yaml.
"""
from __future__ import annotations

from families.base import ModelFamily, TransformerArch, VaeArch, VaeProfile

# Measured live-tensor peaks (element units per pixel), see VaeProfile.
VAE_FULL = VaeProfile(
    decode_elems_per_px=22_787.0, decode_elems_per_px_single_chunk=17_132.0, decode_elems_per_px_one_frame=5_168.0,
    encode_elems_per_px=9_472.0,
)
VAE_TINY = VaeProfile(  # pipeline_utils/tiny.py's miniature (8 channels), float32
    decode_elems_per_px=1_416.0, decode_elems_per_px_single_chunk=1_037.0, decode_elems_per_px_one_frame=183.0,
    encode_elems_per_px=309.0, cpu_im2col_elems_per_px=1_525.0,
)
# (top decoder channels, latent channels) -> measured profile; anything else scales the full one by width
VAE_PROFILES = {(128, 16): VAE_FULL, (8, 4): VAE_TINY}
FULL_TOP_CHANNELS = 128


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

    def vae_spatial_ratio(self, vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def enable_vae_tiling(self, vae, tile, stride) -> None:
        # stride: diffusers' CogVideoX tiling has no stride; the overlap factor below plays its part
        ratio = self.vae_spatial_ratio(vae)
        kwargs = {}
        for axis, px, default in (("height", tile[0], 1 / 6), ("width", tile[1], 1 / 5)):
            if px:
                kwargs[f"tile_sample_min_{axis}"] = px
                kwargs[f"tile_overlap_factor_{axis}"] = overlap_factor(px, ratio, default)
        vae.enable_tiling(**kwargs)


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
