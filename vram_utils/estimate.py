"""Pure memory estimator: sizes and shapes in, predicted peak bytes per stage out.

No torch, no device access: an estimate is arithmetic on the architecture
numbers in `archs.py` and the request's shapes, so it runs (and is tested)
anywhere. Bytes everywhere; GiB only where a reason is written for a person.

A run goes through stages (text encoding, image encoding for Wan I2V, VAE
encoding for I2V / V2V, denoising, VAE decoding). The peak on the device that
computes is, per stage, the weights resident there during that stage plus the
stage's live activations plus what persists across stages (latents, prompt
embeddings); the run's peak is the largest stage. Which weights are resident in
a stage is what the offload rung changes:

  none        every component, all the time
  model       the component computing (diffusers' model offload chain also leaves the
              text encoder on the GPU through a VAE encode, and the VAE through denoising
              once it has encoded)
  group       block level with CUDA streams: what lies outside the repeated blocks plus two
              blocks (the one computing and the one being prefetched); the VAE stays resident
  sequential  leaf level with CUDA streams: the layer computing and the one prefetched (two of the
              largest; for a text encoder its embedding and an FF projection)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from configs.schema import DecodeSettings, GenerationRequest, ModelSpec, Offload, Quant, load_presets
from vram_utils.archs import ModelArch, TransformerArch, VaeArch
from vram_utils.ladder import OFFLOAD_RUNGS

Backend = Literal["cuda", "cpu"]
LADDER: tuple[Offload, ...] = OFFLOAD_RUNGS  # fastest first (vram_utils/ladder.py owns the rungs)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIB = 2**20
GIB = 2**30

# Host RSS above the live-tensor peak on the CPU (oneDNN scratch buffers, allocator bookkeeping):
# 20-32 MB in the calibration runs of bench/plan_accuracy.py.
CPU_RUNTIME_BYTES = 24 * MIB
# cuBLAS / cuDNN workspaces come from the caching allocator and count in max_memory_allocated.
# Not yet measured here (no GPU on the development machine); bench/plan_accuracy.py checks it on CUDA.
CUDA_WORKSPACE_BYTES = 64 * MIB
# Linear weights are ~98% of a video transformer's parameters; quantization stores them in one byte
# while norms, biases and embeddings keep the compute dtype.
QUANTIZED_FRACTION = 0.98


@dataclass(frozen=True)
class Workload:
    """What one run computes (resolved shapes, no defaults left open)."""

    task: str
    frames: int
    height: int
    width: int
    cfg: bool  # classifier-free guidance (guidance > 1): CogVideoX doubles its batch
    dtype_bytes: int
    quant: Quant = "none"
    decode: DecodeSettings = DecodeSettings()

    def replace(self, **changes) -> "Workload":
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StageEstimate:
    name: str
    weights_bytes: int  # weights resident on the computing device during the stage
    activation_bytes: int  # live activations of the stage, persistent tensors included

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes


@dataclass(frozen=True)
class Estimate:
    offload: Offload
    backend: Backend
    stages: tuple[StageEstimate, ...]
    component_bytes: dict[str, int] = field(default_factory=dict)
    host_extra_bytes: int = 0  # on the CUDA backend: what the host holds beyond the weights

    @property
    def peak_device_bytes(self) -> int:
        """Peak on the device that computes: the GPU, or host RAM on the CPU backend."""
        return max(s.peak_bytes for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.peak_bytes).name

    @property
    def peak_gpu_bytes(self) -> int:
        return self.peak_device_bytes if self.backend == "cuda" else 0

    @property
    def weights_total_bytes(self) -> int:
        return sum(self.component_bytes.values())

    @property
    def peak_host_bytes(self) -> int:
        """Host RAM above the process baseline. On CUDA every rung loads all weights into host RAM first
        (from_pretrained), and the offload rungs keep them there (pinned where streams copy them)."""
        if self.backend == "cpu":
            return self.peak_device_bytes
        return self.weights_total_bytes + self.host_extra_bytes

    def stage_dict(self) -> dict[str, int]:
        return {s.name: s.peak_bytes for s in self.stages}


# --------------------------------------------------------------------------- shapes


def latent_frames(frames: int, vae: VaeArch) -> int:
    return (frames - 1) // vae.temporal_ratio + 1


def video_tokens(w: Workload, arch: ModelArch) -> int:
    """Tokens of the latent video the transformer attends over."""
    tr, vae = arch.transformer, arch.vae
    t = math.ceil(latent_frames(w.frames, vae) / tr.patch_t)
    h = w.height // vae.spatial_ratio // tr.patch_hw
    wd = w.width // vae.spatial_ratio // tr.patch_hw
    return t * h * wd


def workload_for(request: GenerationRequest, spec: ModelSpec) -> Workload:
    """The request's shapes with the model's and preset's defaults filled in (no validation here)."""
    h0, w0 = spec.default_resolution
    guidance = request.guidance
    if guidance is None:
        guidance = load_presets()[request.preset].guidance
    return Workload(
        task=request.task,
        frames=request.frames or spec.default_frames,
        height=request.height or h0,
        width=request.width or w0,
        cfg=guidance > 1.0,
        dtype_bytes=DTYPE_BYTES[spec.default_dtype],
        quant=request.quant,
        decode=request.decode,
    )


# --------------------------------------------------------------------------- component sizes


def transformer_weight_bytes(params: int, dtype_bytes: int, quant: Quant) -> int:
    if quant == "none":
        return params * dtype_bytes
    # int8 / fp8 / fp8 storage: one byte per quantized weight (+ per-channel scales, negligible)
    return int(params * QUANTIZED_FRACTION + params * (1 - QUANTIZED_FRACTION) * dtype_bytes)


def component_bytes(arch: ModelArch, w: Workload) -> dict[str, int]:
    b = w.dtype_bytes
    sizes = {
        "text_encoder": arch.text_encoder.params * b,
        "transformer": transformer_weight_bytes(arch.transformer.params, b, w.quant),
        "vae": arch.vae.params * b,
    }
    if arch.image_encoder_params and w.task == "i2v":
        sizes["image_encoder"] = arch.image_encoder_params * b
    return sizes


def _scaled(params_part: int, params_all: int, bytes_all: int) -> int:
    return int(bytes_all * params_part / max(1, params_all))


def resident_bytes(arch: ModelArch, w: Workload, offload: Offload, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes of each component on the device while that component computes, under `offload`."""
    if offload in ("none", "model"):
        return dict(sizes)
    tr, te, vae = arch.transformer, arch.text_encoder, arch.vae
    out = {}
    if offload == "group":  # non-block part + the block computing + the block prefetched
        out["transformer"] = _scaled(tr.non_block_params + 2 * tr.block_params, tr.params, sizes["transformer"])
        out["text_encoder"] = _scaled(te.non_block_params + 2 * te.block_params, te.params, sizes["text_encoder"])
        out["vae"] = sizes["vae"]  # resident all run long (see offload.py: small, and decode() bypasses forward hooks)
    else:  # sequential: leaf level, the layer computing + the layer prefetched
        out["transformer"] = _scaled(2 * tr.largest_leaf_params, tr.params, sizes["transformer"])
        # the embedding (the largest layer, used first) and the FF projection prefetched after it
        out["text_encoder"] = _scaled(te.largest_leaf_params + te.block_leaf_params, te.params, sizes["text_encoder"])
        out["vae"] = _scaled(2 * vae.largest_leaf_params, vae.params, sizes["vae"])
    if "image_encoder" in sizes:
        out["image_encoder"] = sizes["image_encoder"] if offload == "group" else min(sizes["image_encoder"], 64 * MIB)
    return out


# --------------------------------------------------------------------------- activations


def text_activation_bytes(arch: ModelArch, w: Workload) -> int:
    """One prompt through the T5/UMT5 encoder (the negative prompt runs as a second call, not a batch)."""
    te = arch.text_encoder
    s, b = te.seq_len, w.dtype_bytes
    hidden = s * (6 * te.dim + 3 * te.ff_dim) * b  # residual, norm, q/k/v/out; gated FF keeps 3 x ff alive
    scores = 2 * te.heads * s * s * 4  # eager attention: fp32 scores and their softmax
    return hidden + scores


def prompt_embedding_bytes(arch: ModelArch, w: Workload) -> int:
    """Prompt (and negative prompt) embeddings kept through denoising."""
    return (2 if w.cfg else 1) * arch.text_encoder.seq_len * arch.text_encoder.dim * w.dtype_bytes


def latent_bytes(arch: ModelArch, w: Workload) -> int:
    vae = arch.vae
    return (
        vae.latent_channels
        * latent_frames(w.frames, vae)
        * (w.height // vae.spatial_ratio)
        * (w.width // vae.spatial_ratio)
        * 4  # the schedulers keep latents in float32
    )


def denoise_activation_bytes(arch: ModelArch, w: Workload) -> int:
    """Peak live activations of one transformer forward: the widest point of a block (the FF input and
    its GELU output alive together) over every token of the batch. Attention runs through SDPA's
    flash / memory-efficient kernels, linear in tokens (no tokens x tokens matrix)."""
    tr: TransformerArch = arch.transformer
    batch = 2 if (w.cfg and tr.cfg_in_batch) else 1
    tokens = video_tokens(w, arch) + tr.joint_text_tokens
    per_token = tr.act_elems_per_dim * tr.dim + 2 * tr.ff_dim
    act = int(batch * tokens * per_token * w.dtype_bytes)
    if w.quant != "none":  # a quantized layer is dequantized / upcast to the compute dtype while it runs
        act += tr.largest_leaf_params * w.dtype_bytes
    # latents, noise predictions (cond + uncond) and the scheduler's copies
    return act + 4 * latent_bytes(arch, w)


# ATen runs a float32 conv3d on the CPU with its slow im2col kernel up to this input size, with oneDNN above
# (checked with torch._C._select_conv_backend: 8 x 10 x 256 x 256 -> Slow3d, 8 x 11 x 256 x 256 -> Mkldnn).
SLOW_CONV3D_MAX_NUMEL = 5 * 2**20


def _cpu_extra_per_px(vae: VaeArch, w: Workload, th: int, tw: int, chunk_frames: int) -> float:
    extra = vae.cpu_extra_elems_per_px
    # the widest conv input: the top channels over the chunk's frames plus the 2 cached / padded ones
    if w.dtype_bytes == 4 and vae.top_channels * (chunk_frames + 2) * th * tw <= SLOW_CONV3D_MAX_NUMEL:
        extra += vae.cpu_im2col_elems_per_px
    return extra


def _tile(w: Workload, tiling: bool, tile_y: int, tile_x: int) -> tuple[int, int]:
    if tiling and (w.height > tile_y or w.width > tile_x):
        return min(w.height, tile_y), min(w.width, tile_x)
    return w.height, w.width


def decode_activation_bytes(arch: ModelArch, w: Workload, backend: Backend = "cuda") -> int:
    """VAE decode: the peak chunk of one tile (the whole frame without tiling), plus the decoded video the
    decoder accumulates (torch.cat keeps old and new alive: 2x) and, with tiling, the tiles' outputs."""
    vae, d, b = arch.vae, w.decode, w.dtype_bytes
    th, tw = _tile(w, d.enable_vae_tiling, d.tile_y, d.tile_x)
    n_lat = latent_frames(w.frames, vae)
    if n_lat == 1:
        per_px, chunk_frames = vae.decode_elems_per_px_one_frame, 1
    elif n_lat <= vae.chunk_latent_frames:
        per_px, chunk_frames = vae.decode_elems_per_px_single_chunk, w.frames
    else:
        per_px, chunk_frames = vae.decode_elems_per_px, vae.steady_chunk_frames
        if d.chunk_frames > vae.chunk_latent_frames:  # a longer causal chunk holds proportionally more frames
            per_px *= d.chunk_frames / vae.chunk_latent_frames
    if backend == "cpu":
        per_px += _cpu_extra_per_px(vae, w, th, tw, chunk_frames)
    chunk = int(per_px * th * tw * b)
    video = w.frames * 3 * w.height * w.width * b
    held = 2 * video
    if (th, tw) != (w.height, w.width):
        overlap = (d.tile_y / max(1, d.tile_stride_y)) * (d.tile_x / max(1, d.tile_stride_x))
        held += int(video * overlap)
    return chunk + held + latent_bytes(arch, w)


def encode_activation_bytes(arch: ModelArch, w: Workload, backend: Backend = "cuda") -> int:
    """VAE encode of the conditioning input: the image for CogVideoX I2V, the whole video for V2V and for
    Wan I2V (which encodes the image followed by zero frames)."""
    vae, b = arch.vae, w.dtype_bytes
    frames_in = 1 if (w.task == "i2v" and arch.transformer.joint_text_tokens) else w.frames
    d = w.decode
    th, tw = _tile(w, d.enable_vae_tiling, d.tile_y, d.tile_x)
    per_px = vae.encode_elems_per_px if frames_in > 1 else vae.decode_elems_per_px_one_frame
    if backend == "cpu":
        per_px += _cpu_extra_per_px(vae, w, th, tw, min(frames_in, vae.steady_chunk_frames))
    video_in = frames_in * 3 * w.height * w.width * b
    return int(per_px * th * tw * b) + 2 * video_in + latent_bytes(arch, w)


def image_encoder_activation_bytes(arch: ModelArch, w: Workload) -> int:
    # CLIP ViT-H/14 on one 224x224 image: 257 tokens x 1280 wide; tiny next to its weights
    return 257 * (6 * 1280 + 2 * 5120) * w.dtype_bytes if arch.image_encoder_params else 0


# --------------------------------------------------------------------------- the estimate


def estimate(arch: ModelArch, w: Workload, offload: Offload = "none", backend: Backend = "cuda") -> Estimate:
    """Predicted peak bytes per stage for `w` under `offload` on `backend`.

    On the CPU backend everything lives in host RAM and offload moves nothing, so
    every rung reads as "none" and the stages add the CPU runtime's own scratch.
    """
    sizes = component_bytes(arch, w)
    rung: Offload = offload if backend == "cuda" else "none"
    res = resident_bytes(arch, w, rung, sizes)
    embeds = prompt_embedding_bytes(arch, w)
    lat = latent_bytes(arch, w)
    encodes = w.task in ("i2v", "v2v")
    extra = CUDA_WORKSPACE_BYTES if backend == "cuda" else CPU_RUNTIME_BYTES

    def on_device(*names: str) -> int:
        if rung == "none":
            return sum(sizes.values())
        if rung == "group":  # the VAE is resident throughout
            names = tuple(set(names) | {"vae"})
        return sum(res.get(n, 0) for n in names)

    stages = [StageEstimate("text", on_device("text_encoder"), text_activation_bytes(arch, w) + extra)]
    if "image_encoder" in sizes:
        stages.append(
            StageEstimate("image", on_device("image_encoder"), image_encoder_activation_bytes(arch, w) + embeds + extra)
        )
    if encodes:
        # model offload: the VAE's hook only offloads the transformer before it, so the encoder that ran
        # last (text or image) is still on the GPU while the VAE encodes
        before = "image_encoder" if "image_encoder" in sizes else "text_encoder"
        names = ("vae", before) if rung == "model" else ("vae",)
        stages.append(StageEstimate("encode", on_device(*names), encode_activation_bytes(arch, w, backend) + embeds + extra))
    # model offload: the VAE stays on the GPU through denoising once it has encoded
    names = ("transformer", "vae") if (rung == "model" and encodes) else ("transformer",)
    stages.append(StageEstimate("denoise", on_device(*names), denoise_activation_bytes(arch, w) + embeds + extra))
    stages.append(StageEstimate("decode", on_device("vae"), decode_activation_bytes(arch, w, backend) + extra))

    # host side on CUDA: the decoded frames (uint8) and a float32 copy of the latents saved to disk
    host_extra = w.frames * 3 * w.height * w.width + lat + CPU_RUNTIME_BYTES
    return Estimate(rung, backend, tuple(stages), sizes, host_extra)
