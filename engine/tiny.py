"""The tiny offline model family: random-weight miniatures of CogVideoX and Wan.

Built in code with the same diffusers / transformers classes as the real models
(recipes after diffusers' own pipeline tests, with a T5/UMT5 encoder and a
tokenizer made in memory instead of the hub's tiny T5), written once with
`save_pretrained` into a local cache folder and loaded with `from_pretrained`,
so the real loading path is what runs. The same seed builds the same weights.

Layout on disk: <home>/tiny/v<TINY_VERSION>/<name>/<t2v|i2v>/ (a diffusers pipeline folder).
T2V and V2V share the t2v folder; the i2v folder holds the same VAE and text
encoder weights (so sharing them across tasks is truthful) and its own transformer.

tiny-wan-moe is Wan 2.2 A14B in miniature: two experts, `transformer` (high noise) and `transformer_2` (low
noise, other random weights), switching at `boundary_ratio` 0.875; its I2V, like Wan 2.2 I2V A14B, has no
image encoder (the image reaches the transformer only through the VAE latents: in_channels 36, no image_dim).
Its VAE and text encoder are built exactly as tiny-wan's (same seed, same order), so their weights are equal.
"""
from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TINY_VERSION = 2
TINY_SEED = 0
TINY_NAMES = ("tiny-cogvideox", "tiny-wan", "tiny-wan-moe")
TEXT_DIM = 32
COGVIDEOX_TEXT_LEN = 16  # pipeline max_sequence_length must equal transformer max_text_seq_length
WAN_TEXT_LEN = 32
TINY_COG_I2V_SIZE = (32, 32)  # learned positional embeddings fix the I2V resolution

_WORDS = (
    "a an the of and with in on at to from by over under near "
    "cat dog bird fish horse person man woman child car boat train city street forest beach "
    "sea ocean river mountain sky cloud sun moon sunset sunrise night rain snow fire light "
    "red blue green yellow white black golden bright dark slow fast small big old new "
    "walks runs flies swims jumps dances sits moves turns rolls falls plays looks camera "
    "video scene shot view close wide aerial cinematic realistic"
).split()


def fitvideo_home() -> Path:
    return Path(os.environ.get("FITVIDEO_HOME", Path.home() / ".cache" / "fitvideo"))


def tiny_root() -> Path:
    return fitvideo_home() / "tiny" / f"v{TINY_VERSION}"


def make_tokenizer(max_length: int):
    """A Unigram T5 tokenizer built in memory (no files, no hub)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    vocab += [("▁" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5_config(config_cls, vocab_size: int):
    return config_cls(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )


def _build_cogvideox() -> dict[str, object]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(TINY_SEED)
    tokenizer = make_tokenizer(COGVIDEOX_TEXT_LEN)
    text_encoder = T5EncoderModel(_t5_config(T5Config, len(tokenizer)))
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    common = dict(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary (I2V) splits it 4/6/6 over t/h/w: each share must be even
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=COGVIDEOX_TEXT_LEN,
    )
    transformer = CogVideoXTransformer3DModel(in_channels=4, sample_width=4, sample_height=4, **common)
    h, w = TINY_COG_I2V_SIZE
    transformer_i2v = CogVideoXTransformer3DModel(
        in_channels=8,  # noise latents + image latents
        sample_height=h // 8,
        sample_width=w // 8,
        use_rotary_positional_embeddings=True,  # as CogVideoX-5b-I2V: rotary + learned
        use_learned_positional_embeddings=True,
        **common,
    )
    # The CogVideoX-2b scheduler config.
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)
    return {
        "t2v": CogVideoXPipeline(transformer=transformer, scheduler=scheduler, **shared),
        "i2v": CogVideoXImageToVideoPipeline(transformer=transformer_i2v, scheduler=scheduler, **shared),
    }


def _build_wan() -> dict[str, object]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(TINY_SEED)
    tokenizer = make_tokenizer(WAN_TEXT_LEN)
    text_encoder = UMT5EncoderModel(_t5_config(UMT5Config, len(tokenizer)))
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    common = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    transformer = WanTransformer3DModel(in_channels=16, **common)
    transformer_i2v = WanTransformer3DModel(in_channels=36, image_dim=4, **common)  # 16 noise + 16 image + 4 mask
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=1,
        )
    )
    image_processor = CLIPImageProcessorPil(crop_size=32, size=32)  # the PIL backend: no torchvision needed
    # The Wan 2.1 scheduler config (flow matching, UniPC).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)
    return {
        "t2v": WanPipeline(transformer=transformer, scheduler=scheduler, **shared),
        "i2v": WanImageToVideoPipeline(
            transformer=transformer_i2v,
            scheduler=scheduler,
            image_encoder=image_encoder,
            image_processor=image_processor,
            **shared,
        ),
    }


TINY_MOE_BOUNDARY = 0.875  # Wan 2.2 T2V A14B's; the real I2V A14B switches at 0.9


def _build_wan_moe() -> dict[str, object]:
    """Wan 2.2 A14B in miniature: tiny-wan's VAE, text encoder and transformer shape, two experts per task."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(TINY_SEED)  # the same draws as _build_wan up to the VAE: equal weights
    tokenizer = make_tokenizer(WAN_TEXT_LEN)
    text_encoder = UMT5EncoderModel(_t5_config(UMT5Config, len(tokenizer)))
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    common = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, out_channels=16, text_dim=TEXT_DIM,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    # Each expert its own random draw: the high-noise and low-noise experts differ, as in the real model.
    high, low = (WanTransformer3DModel(in_channels=16, **common) for _ in range(2))
    high_i2v, low_i2v = (WanTransformer3DModel(in_channels=36, **common) for _ in range(2))  # noise+image+mask
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    shared = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                  boundary_ratio=TINY_MOE_BOUNDARY)
    return {
        "t2v": WanPipeline(transformer=high, transformer_2=low, **shared),
        "i2v": WanImageToVideoPipeline(
            transformer=high_i2v, transformer_2=low_i2v, image_encoder=None, image_processor=None, **shared
        ),
    }


_BUILDERS = {"tiny-cogvideox": _build_cogvideox, "tiny-wan": _build_wan, "tiny-wan-moe": _build_wan_moe}


def build_tiny_pipelines(name: str) -> dict[str, object]:
    """Build the in-memory pipelines of a tiny model (no disk), keyed by folder ('t2v', 'i2v')."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_NAMES)}")
    return _BUILDERS[name]()


def ensure_tiny_model(name: str) -> Path:
    """Write the tiny model's folders once (atomically) and return <root>/<name>."""
    target = tiny_root() / name
    if (target / "t2v" / "model_index.json").is_file() and (target / "i2v" / "model_index.json").is_file():
        return target
    pipes = build_tiny_pipelines(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for folder, pipe in pipes.items():
            pipe.save_pretrained(staging / folder)
        try:
            os.rename(staging, target)  # atomic: a reader never sees a half-written model
            logger.info("wrote tiny model %s to %s", name, target)
        except OSError:
            if not (target / "t2v" / "model_index.json").is_file():  # lost a race to a twin: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
