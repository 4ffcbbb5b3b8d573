"""Architecture numbers the memory estimator needs, per registry model (pure data).

Parameter counts are those of the diffusers / transformers modules built from
each model's published config (checked in tests/test_vram_utils.py by building
them on the meta device); `largest_leaf_params` is the biggest single layer (what
leaf-level offload keeps on the GPU), `non_block_params` what stays outside the
repeated blocks (resident under block-level offload).

Activation coefficients are measured, not guessed: `act_elems_per_dim` and the
VAE `*_elems_per_px` figures are the peak of live tensor bytes (every storage an
op creates, freed when its last reference goes) of the real architectures with
random weights on the CPU, divided by the tensor sizes they scale with and by the
element size. Live tensor bytes are what `torch.cuda.max_memory_allocated`
counts, so the same figures serve the CUDA estimate. Re-measure with
`bench/plan_accuracy.py --calibrate` when diffusers moves.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from configs.schema import ModelSpec


@dataclass(frozen=True)
class TransformerArch:
    params: int
    layers: int
    dim: int  # heads * head_dim
    ff_dim: int
    patch_t: int  # frames per token (CogVideoX 1.5 packs 2 latent frames)
    patch_hw: int
    joint_text_tokens: int  # CogVideoX joins the text tokens to the video sequence; Wan cross-attends (0)
    cfg_in_batch: bool  # CogVideoX runs cond + uncond as one batch of 2; Wan runs them one after the other
    # Peak live activation per sequence token in element units: act_elems_per_dim * dim + 2 * ff_dim
    # (the FF input and its GELU output are alive together). Measured: CogVideoX-2b 4.1, -5b (rotary) 4.65,
    # Wan 2.1 (float32 norms and residuals) 4.4.
    act_elems_per_dim: float
    largest_leaf_params: int
    non_block_params: int

    @property
    def block_params(self) -> int:
        return (self.params - self.non_block_params) // max(1, self.layers)


@dataclass(frozen=True)
class TextEncoderArch:
    params: int
    dim: int
    ff_dim: int
    heads: int
    seq_len: int  # tokens the pipeline encodes per prompt
    largest_leaf_params: int  # the token embedding
    non_block_params: int
    layers: int
    block_leaf_params: int  # the largest layer inside a block (an FF projection)

    @property
    def block_params(self) -> int:
        return (self.params - self.non_block_params) // max(1, self.layers)


@dataclass(frozen=True)
class VaeArch:
    params: int
    latent_channels: int
    spatial_ratio: int
    temporal_ratio: int
    # Peak live decode activation per output pixel, in element units, with the VAE's own frame chunking
    # (CogVideoX: a first batch of 3 latent frames -> 9 frames, then 2 -> 8; Wan: 1 latent frame -> 4 frames):
    # `steady` once a chunk follows another (the causal conv caches of the previous chunk are alive while
    # the next ones are made), `single_chunk` when the whole video is one chunk, `one_frame` for 1 frame.
    # Encode: per input pixel, same chunking. The decoded video itself is counted apart (estimate.py).
    decode_elems_per_px: float
    decode_elems_per_px_single_chunk: float
    decode_elems_per_px_one_frame: float
    encode_elems_per_px: float
    chunk_latent_frames: int  # latent frames in the first chunk
    largest_leaf_params: int
    top_channels: int = 0  # decoder channels at full resolution
    steady_chunk_frames: int = 4  # output frames a chunk after the first makes (CogVideoX 8, Wan 4)
    # CPU only, RSS above the live tensors per output pixel (element units): buffers the kernels allocate
    # inside themselves, the slope of RSS - live between two sizes. `cpu_extra` is oneDNN scratch (bf16);
    # `cpu_im2col` is the column buffer of ATen's slow conv3d, which float32 convs with inputs up to
    # 5 Mi elements take instead of oneDNN (the tiny VAEs' narrow convs; estimate.py applies the rule).
    cpu_extra_elems_per_px: float = 0.0
    cpu_im2col_elems_per_px: float = 0.0


@dataclass(frozen=True)
class ModelArch:
    transformer: TransformerArch
    text_encoder: TextEncoderArch
    vae: VaeArch
    image_encoder_params: int = 0
    note: str = ""


# --------------------------------------------------------------------------- components

T5_XXL = TextEncoderArch(
    params=4_762_310_656, dim=4096, ff_dim=10240, heads=64, seq_len=226,
    largest_leaf_params=131_596_288, non_block_params=131_600_384, layers=24, block_leaf_params=41_943_040,
)
# UMT5-XXL: the 256k-token embedding alone is 1.05 B parameters (2.1 GB in bf16), which is what
# leaf-level offload must still hold at once.
UMT5_XXL = TextEncoderArch(
    params=5_680_910_336, dim=4096, ff_dim=10240, heads=64, seq_len=512,
    largest_leaf_params=1_050_148_864, non_block_params=1_050_152_960, layers=24, block_leaf_params=41_943_040,
)

COGVIDEOX_VAE = VaeArch(
    params=215_583_907, latent_channels=16, spatial_ratio=8, temporal_ratio=4,
    decode_elems_per_px=22_787.0, decode_elems_per_px_single_chunk=17_132.0, decode_elems_per_px_one_frame=5_168.0,
    encode_elems_per_px=9_472.0, chunk_latent_frames=3, largest_leaf_params=7_078_400, top_channels=128,
    steady_chunk_frames=8,
)
WAN21_VAE = VaeArch(
    params=126_892_531, latent_channels=16, spatial_ratio=8, temporal_ratio=4,
    decode_elems_per_px=5_033.0, decode_elems_per_px_single_chunk=1_737.0, decode_elems_per_px_one_frame=1_737.0,
    encode_elems_per_px=3_689.0, chunk_latent_frames=1, largest_leaf_params=3_981_696, top_channels=96,
    cpu_extra_elems_per_px=120.0,
)
# Wan 2.2's VAE compresses 16x in space (patchified); its coefficients are scaled from Wan 2.1's by the
# decoder width (256 vs 96 channels at full resolution) until measured.
WAN22_VAE = VaeArch(
    params=704_587_571, latent_channels=48, spatial_ratio=16, temporal_ratio=4,
    decode_elems_per_px=5_033.0 * 256 / 96, decode_elems_per_px_single_chunk=1_737.0 * 256 / 96,
    decode_elems_per_px_one_frame=1_737.0 * 256 / 96, encode_elems_per_px=3_689.0 * 160 / 96,
    chunk_latent_frames=1, largest_leaf_params=28_312_576, top_channels=256, cpu_extra_elems_per_px=120.0 * 256 / 96,
)


def _cog(params: int, layers: int, heads: int, rotary: bool, leaf: int, non_block: int, patch_t: int = 1):
    dim = heads * 64
    return TransformerArch(
        params=params, layers=layers, dim=dim, ff_dim=4 * dim, patch_t=patch_t, patch_hw=2, joint_text_tokens=226,
        cfg_in_batch=True, act_elems_per_dim=4.65 if rotary else 4.1, largest_leaf_params=leaf,
        non_block_params=non_block,
    )


def _wan(params: int, layers: int, heads: int, ff: int, leaf: int, non_block: int):
    return TransformerArch(
        params=params, layers=layers, dim=heads * 128, ff_dim=ff, patch_t=1, patch_hw=2, joint_text_tokens=0,
        cfg_in_batch=False, act_elems_per_dim=4.4, largest_leaf_params=leaf, non_block_params=non_block,
    )


COG_2B = _cog(1_693_783_872, 30, 30, False, 14_753_280, 11_337_792)
COG_5B = _cog(5_570_283_072, 42, 48, True, 37_761_024, 17_982_528)
COG_5B_I2V = _cog(5_570_479_680, 42, 48, True, 37_761_024, 18_179_136)
COG_15_5B = _cog(5_570_676_352, 42, 48, True, 37_761_024, 18_375_808, patch_t=2)
WAN_1_3B = _wan(1_418_996_800, 30, 12, 8960, 14_164_992, 25_775_680)
WAN_14B = _wan(14_288_491_584, 40, 40, 13824, 157_317_120, 232_719_424)
WAN_14B_I2V = _wan(16_394_878_784, 40, 40, 13824, 157_317_120, 241_340_224)
WAN22_5B = _wan(4_999_787_712, 30, 24, 14336, 56_641_536, 90_086_592)

CLIP_VIT_H = 632_076_800

# --------------------------------------------------------------------------- tiny family (pipeline_utils/tiny.py)
# Exact counts of the random-weight miniatures; activation figures measured the same way (float32).
TINY_COG_T5 = TextEncoderArch(
    params=18_944, dim=32, ff_dim=37, heads=4, seq_len=16, largest_leaf_params=5_824, non_block_params=5_856, layers=2,
    block_leaf_params=1_184,
)
TINY_WAN_UMT5 = replace(TINY_COG_T5, params=21_344, seq_len=32)
TINY_COG_VAE = VaeArch(
    params=65_195, latent_channels=4, spatial_ratio=8, temporal_ratio=4,
    decode_elems_per_px=1_416.0, decode_elems_per_px_single_chunk=1_037.0, decode_elems_per_px_one_frame=183.0,
    encode_elems_per_px=309.0, chunk_latent_frames=3, largest_leaf_params=1_736, top_channels=8,
    steady_chunk_frames=8, cpu_im2col_elems_per_px=1_525.0,
)
TINY_WAN_VAE = VaeArch(
    params=13_861, latent_channels=16, spatial_ratio=8, temporal_ratio=4,
    decode_elems_per_px=78.0, decode_elems_per_px_single_chunk=27.0, decode_elems_per_px_one_frame=27.0,
    encode_elems_per_px=63.0, chunk_latent_frames=1, largest_leaf_params=2_624, top_channels=3,
    cpu_im2col_elems_per_px=321.0,
)
TINY_COG_TR = TransformerArch(
    params=16_440, layers=1, dim=32, ff_dim=128, patch_t=1, patch_hw=2, joint_text_tokens=16, cfg_in_batch=True,
    act_elems_per_dim=4.1, largest_leaf_params=4_224, non_block_params=2_520,
)
TINY_WAN_TR = TransformerArch(
    params=28_328, layers=2, dim=24, ff_dim=32, patch_t=1, patch_hw=2, joint_text_tokens=0, cfg_in_batch=False,
    act_elems_per_dim=4.4, largest_leaf_params=6_168, non_block_params=14_968,
)

ARCHS: dict[str, ModelArch] = {
    "THUDM/CogVideoX-2b": ModelArch(COG_2B, T5_XXL, COGVIDEOX_VAE),
    "THUDM/CogVideoX-5b": ModelArch(COG_5B, T5_XXL, COGVIDEOX_VAE),
    "THUDM/CogVideoX-5b-I2V": ModelArch(COG_5B_I2V, T5_XXL, COGVIDEOX_VAE),
    "THUDM/CogVideoX1.5-5B": ModelArch(COG_15_5B, T5_XXL, COGVIDEOX_VAE),
    "THUDM/CogVideoX1.5-5B-I2V": ModelArch(COG_15_5B, T5_XXL, COGVIDEOX_VAE),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ModelArch(WAN_1_3B, UMT5_XXL, WAN21_VAE),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ModelArch(WAN_14B, UMT5_XXL, WAN21_VAE),
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": ModelArch(WAN_14B_I2V, UMT5_XXL, WAN21_VAE, image_encoder_params=CLIP_VIT_H),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": ModelArch(WAN22_5B, UMT5_XXL, WAN22_VAE),
    "tiny-cogvideox": ModelArch(TINY_COG_TR, TINY_COG_T5, TINY_COG_VAE),
    "tiny-wan": ModelArch(TINY_WAN_TR, TINY_WAN_UMT5, TINY_WAN_VAE, image_encoder_params=4_636),
}

_FAMILY_REFERENCE = {"cogvideox": "THUDM/CogVideoX-5b", "wan": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}


def arch_for(spec: ModelSpec) -> ModelArch:
    """The architecture numbers of a registry model; a model missing from the table borrows its family's
    reference shapes, with the registry's parameter counts (the note says so)."""
    if spec.id in ARCHS:
        return ARCHS[spec.id]
    ref_id = _FAMILY_REFERENCE[spec.family]
    ref = ARCHS[ref_id]
    p = spec.params
    return replace(
        ref,
        transformer=replace(ref.transformer, params=p.get("transformer", ref.transformer.params)),
        text_encoder=replace(ref.text_encoder, params=p.get("text_encoder", ref.text_encoder.params)),
        vae=replace(ref.vae, params=p.get("vae", ref.vae.params)),
        image_encoder_params=p.get("image_encoder", ref.image_encoder_params),
        note=f"activation shapes borrowed from {ref_id}",
    )
