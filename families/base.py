"""What a model family is: the facts every layer asks about, and the few behaviours that differ.

A family answers, from one module (families/cogvideox.py, families/wan.py):
  - which diffusers pipeline serves each task, which VAE class it decodes with, how a pipeline folder
    is recognised (`model_index.json`'s `_class_name`)
  - the frame rule (CogVideoX 8k+1, Wan 4k+1) and the text length the pipeline encodes
  - the latent <-> VAE transform after `output_type="latent"`
  - VAE tiling through diffusers (tile sizes that reassemble exactly)
  - the architecture numbers the memory estimator needs, built from component configs (the diffusers
    `config.json` keys, given in models.yaml for registry models or read from a local folder) and parameter
    counts (models.yaml, or a local folder's safetensors headers)
  - the streaming decoder of its VAE (`causal_decoder`: the walk through the VAE's blocks, beside the family
    module in families/<name>_vae.py), and its tiny twin (`build_tiny`)
  - what the run's modifiers need: its transformers (`denoisers`), LoRA key layout and loader, which step caches
    apply per task and why not, whether attention goes through diffusers' dispatcher, repeated blocks for compile,
    the flow shift, the layers quantization keeps

Nothing here imports the rest of FitVideo; torch and diffusers are imported inside the methods that
touch a pipeline, so the facts load anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Configs = dict[str, dict[str, Any]]  # component -> its config values (diffusers / transformers config.json keys)
Parts = dict[str, dict[str, int]]  # component -> {"total", "largest_leaf", "non_block", "block_leaf"} parameter counts
RgbProjection = tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]  # (factors C x 3, bias 3)


# --------------------------------------------------------------------------- architecture numbers


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
    # parameters the model keeps in float32 whatever the load dtype (diffusers' `_keep_in_fp32_modules`): converted
    # on load into anonymous memory, 4 bytes each
    fp32_params: int = 0

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
class VaeProfile:
    """Measured activation coefficients of one VAE architecture (element units).

    Decode: peak live activation per output pixel with the VAE's own frame chunking (CogVideoX: a first batch
    of 3 latent frames -> 9 frames, then 2 -> 8; Wan: 1 latent frame -> 4 frames): `steady` once a chunk
    follows another (the causal conv caches of the previous chunk are alive while the next ones are made),
    `single_chunk` when the whole video is one chunk, `one_frame` for 1 frame. Encode: per input pixel.
    CPU only, RSS above the live tensors per output pixel: `cpu_extra` is oneDNN scratch (bf16); `cpu_im2col`
    the column buffer of ATen's slow conv3d, which float32 convs with inputs up to 5 Mi elements take
    (the tiny VAEs' narrow convs). Re-measure with `bench/plan_accuracy.py --calibrate`.
    """

    decode_elems_per_px: float
    decode_elems_per_px_single_chunk: float
    decode_elems_per_px_one_frame: float
    encode_elems_per_px: float
    cpu_extra_elems_per_px: float = 0.0
    cpu_im2col_elems_per_px: float = 0.0

    def scaled(self, factor: float) -> "VaeProfile":
        return VaeProfile(*(v * factor for v in (
            self.decode_elems_per_px, self.decode_elems_per_px_single_chunk, self.decode_elems_per_px_one_frame,
            self.encode_elems_per_px, self.cpu_extra_elems_per_px, self.cpu_im2col_elems_per_px,
        )))


@dataclass(frozen=True)
class VaeArch:
    params: int
    latent_channels: int
    spatial_ratio: int
    temporal_ratio: int
    decode_elems_per_px: float
    decode_elems_per_px_single_chunk: float
    decode_elems_per_px_one_frame: float
    encode_elems_per_px: float
    chunk_latent_frames: int  # latent frames in the first chunk
    largest_leaf_params: int
    top_channels: int = 0  # decoder channels at full resolution
    steady_chunk_frames: int = 4  # output frames a chunk after the first makes (CogVideoX 8, Wan 4)
    own_chunk: int = 1  # latent frames per chunk in diffusers' own decode (ModelFamily.own_decode_chunk)
    cpu_extra_elems_per_px: float = 0.0
    cpu_im2col_elems_per_px: float = 0.0


@dataclass(frozen=True)
class ModelArch:
    transformer: TransformerArch
    text_encoder: TextEncoderArch
    vae: VaeArch
    image_encoder_params: int = 0
    note: str = ""
    # Transformers that take turns over the schedule with the same architecture: 2 for Wan 2.2 A14B
    # (`transformer` high noise, `transformer_2` low noise; `transformer` is the arch of each), else 1.
    experts: int = 1


def text_encoder_arch(cfg: dict, parts: dict[str, int], seq_len: int) -> TextEncoderArch:
    """A T5 / UMT5 encoder from its transformers config (d_model, d_ff, num_heads, num_layers)."""
    return TextEncoderArch(
        params=parts["total"], dim=int(cfg["d_model"]), ff_dim=int(cfg["d_ff"]), heads=int(cfg["num_heads"]),
        seq_len=seq_len, largest_leaf_params=parts["largest_leaf"], non_block_params=parts["non_block"],
        layers=int(cfg["num_layers"]), block_leaf_params=parts["block_leaf"],
    )


# --------------------------------------------------------------------------- the family


class ModelFamily:
    """One family's facts (class attributes) and behaviour (methods). Subclassed once per family."""

    name: str = ""
    class_prefix: str = ""  # `_class_name` prefix in model_index.json ("CogVideoX", "Wan")
    pipelines: dict[str, str] = {}  # task -> diffusers pipeline class
    image_pipeline: str = ""  # the pipeline class whose folders serve i2v; any other serves t2v and v2v
    vae_class: str = ""  # the diffusers VAE class (decode/causal.py finds the chunked decoder by it)
    frame_step: int = 4  # frames per latent frame after the first: frames must be frame_step * k + 1
    own_decode_chunk: int = 1  # latent frames per chunk in diffusers' own decode (the decode ladder's start)
    block_prefixes: dict[str, str] = {}  # component -> name prefix of its repeated blocks in the state dict
    default_fps: int = 16
    default_frames: int = 81
    max_frames: int = 81
    # Latent preview (engine/preview.py): a linear latent -> RGB projection, rgb = x @ factors + bias
    # with rgb in [-1, 1], one (R, G, B) row per latent channel, as published (each family names the source and
    # the latent space they were published for). `preview_latents` gives the (B, C, F, H, W) view of the callback
    # latents, `rgb_projection` the factors for the pipeline's own latent space (any VAE scaling folded in);
    # a latent width without published numbers gets `fallback_rgb_projection`.
    latent_rgb_factors: tuple[tuple[float, float, float], ...] = ()
    latent_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # What the run's modifiers (engine/modifiers.py) need to know of the family's pipelines:
    denoisers: tuple[str, ...] = ("transformer",)  # the transformer components, in the order they run
    # the attention processor calls diffusers' dispatcher (False: engine/attention.py routes it there first)
    attention_dispatched: bool = True
    # the transformer declares `_repeated_blocks` (diffusers' compile_repeated_blocks needs them)
    repeated_blocks: bool = False
    # the transformer declares a context-parallel plan (diffusers' `_cp_plan`: engine/parallel.py splits its
    # sequence over several processes); `attention_heads` reads the head count Ulysses divides among them
    context_parallel: bool = False
    # tasks whose pipeline runs the first expert alone even on a two-expert model (Wan's V2V pipeline has one
    # transformer)
    single_expert_tasks: tuple[str, ...] = ()

    # LoRAs (engine/lora.py): the pipeline class whose `lora_state_dict` converts a file's keys to diffusers', and
    # where the transformer's blocks sit in the converted keys (the family, width and depth a LoRA targets)
    lora_loader: str = ""
    lora_block_key: str = ""  # a regex with the block index as group 1
    flow_shift: bool = False  # the scheduler takes a flow shift (a request's `shift`)
    # Layers quantization keeps in the loaded dtype (quant/quantize.py): regexes searched in module names
    quant_keep: tuple[str, ...] = ()

    # Tiny twins (random weights, offline): their names; `build_tiny(name)` makes their pipelines in memory
    tiny_twins: tuple[str, ...] = ()

    def build_tiny(self, name: str) -> dict[str, object]:
        """The in-memory pipelines of tiny twin `name`, keyed by folder ("t2v", "i2v"; V2V reads the t2v one)."""
        raise NotImplementedError

    def attention_heads(self, transformer_config: dict) -> int:
        return int(transformer_config.get("num_attention_heads", 1))

    def step_cache_problems(self, task: str) -> dict[str, str]:
        """Step cache name -> why it does not apply to this family's `task` pipeline (absent: it applies)."""
        return {}

    # ---------------------------------------------------------------- recognising a pipeline folder
    def serves(self, class_name: str) -> bool:
        return class_name.startswith(self.class_prefix)

    def tasks_of(self, class_name: str) -> tuple[str, ...]:
        """Tasks a folder saved from pipeline `class_name` serves (T2V weights also serve V2V)."""
        return ("i2v",) if class_name == self.image_pipeline else ("t2v", "v2v")

    # ---------------------------------------------------------------- facts from configs (local folders)
    def folder_defaults(self, configs: Configs) -> dict[str, Any]:
        """Resolutions, frames, fps and size multiple for a local folder, from its configs."""
        raise NotImplementedError

    def arch(self, configs: Configs, parts: Parts, image_encoder_params: int = 0) -> ModelArch:
        """The estimator's numbers for a model from its component configs and parameter counts."""
        return ModelArch(
            transformer=self.transformer_arch(configs["transformer"], parts["transformer"]),
            text_encoder=text_encoder_arch(configs["text_encoder"], parts["text_encoder"], self.text_seq_len(configs)),
            vae=self.vae_arch(configs["vae"], parts["vae"]),
            image_encoder_params=image_encoder_params,
            experts=2 if "transformer_2" in parts else 1,
        )

    def transformer_arch(self, cfg: dict, parts: dict[str, int]) -> TransformerArch:
        raise NotImplementedError

    def vae_arch(self, cfg: dict, parts: dict[str, int]) -> VaeArch:
        raise NotImplementedError

    def text_seq_len(self, configs: Configs) -> int:
        raise NotImplementedError

    # ---------------------------------------------------------------- behaviour on a loaded pipeline
    def max_sequence_length(self, pipe) -> int:
        """The `max_sequence_length` to pass to the pipeline (text tokens the encoder reads)."""
        raise NotImplementedError

    def to_vae_latents(self, pipe, latents, num_frames: int):
        """(pipeline latents) -> (B, C, F_latent, H, W), scaled as the VAE's decode expects."""
        raise NotImplementedError

    def preview_latents(self, latents):
        """(pipeline latents, as `callback_on_step_end` sees them) -> a (B, C, F, H, W) view, values untouched."""
        raise NotImplementedError

    def rgb_projection(self, channels: int, pipe=None) -> RgbProjection:
        """(factors, bias) that map the pipeline's own latents (in `preview_latents` layout) to RGB in [-1, 1].

        The published set when `channels` matches it, with any change of space (VAE scaling, normalisation)
        folded into the factors, `pipe` giving the VAE config where that depends on it; else the fallback.
        """
        if len(self.latent_rgb_factors) == channels:
            return self.latent_rgb_factors, self.latent_rgb_bias
        return fallback_rgb_projection(channels)

    def vae_spatial_ratio(self, vae) -> int:
        raise NotImplementedError

    def causal_decoder(self, vae):
        """The streaming decoder for this family's VAE (families/causal.py `CausalDecoder`; the family's own in
        families/<name>_vae.py, imported here so that the facts load without torch)."""
        raise NotImplementedError

    def enable_vae_tiling(self, vae, tile: tuple[int | None, int | None], stride: tuple[int | None, int | None]) -> None:
        """diffusers' tiled encode/decode with (height, width) tiles and strides in output pixels (None: the VAE's)."""
        raise NotImplementedError


def fallback_rgb_projection(channels: int) -> RgbProjection:
    """A colour-free stand-in for latents without published factors (the tiny models' narrow latents).

    Not a colour model: channel c feeds colour c % 3, averaged, so the preview shows the latent's spatial
    structure (and how it sharpens over the steps) but its colours mean nothing.
    """
    counts = [len(range(k, channels, 3)) or 1 for k in range(3)]
    rows = tuple(tuple(0.5 / counts[k] if c % 3 == k else 0.0 for k in range(3)) for c in range(channels))
    return rows, (0.0, 0.0, 0.0)
