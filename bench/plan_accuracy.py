"""Plan accuracy: the memory estimator's predicted peak against the measured peak, side by side.

    python bench/plan_accuracy.py              # CPU grid; the CUDA grid too when a GPU is present
    python bench/plan_accuracy.py --quick      # a smaller CPU grid (about a minute)
    python bench/plan_accuracy.py --calibrate  # re-measure the activation coefficients of vram_utils/archs.py

Run it under the shared lock: `flock /tmp/fitvideo-heavy.lock python bench/plan_accuracy.py`.

CPU: every case runs in a fresh subprocess. The baseline (python + torch + libraries,
imports done) is measured there before the work; the measured peak is the kernel's
peak RSS (VmHWM, reset at the baseline) minus that baseline, compared with the
predicted host peak of the work (weights + activations). The subprocess fixes
glibc's mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor
leaves RSS at once, as a freed block leaves torch.cuda.max_memory_allocated;
with glibc's default dynamic threshold RSS also keeps up to ~130 MB of freed heap,
which is the allocator's, not the model's.

Components are the real architectures with random weights, built on the meta
device and materialised straight in their dtype (no float32 detour): the
full-size VAEs of CogVideoX and Wan 2.1 at small sizes, and the tiny offline
pipelines end to end (text encoding, denoising, decoding).

CUDA (when present): full-size CogVideoX-2b and Wan 2.1 1.3B pipelines with random
weights; for each emulated card (8/12/16/24 GB, torch.cuda.set_per_process_memory_fraction)
the planner picks a rung for that budget, the plan is applied and the run's
torch.cuda.max_memory_allocated (above the allocated bytes before the weights
moved) is compared with the plan's predicted peak.

Target: every predicted/measured ratio within 0.8-1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 2**20
TARGET = (0.8, 1.2)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}

# (name, case) -- frames follow each family's rule; sizes are multiples of 16
CPU_GRID = [
    ("CogVideoX VAE decode 9x96x144", dict(kind="vae_decode", model="THUDM/CogVideoX-2b", frames=9, height=96, width=144)),
    ("CogVideoX VAE decode 17x80x128", dict(kind="vae_decode", model="THUDM/CogVideoX-2b", frames=17, height=80, width=128)),
    ("CogVideoX VAE decode 9x112x112 tiled 64", dict(kind="vae_decode", model="THUDM/CogVideoX-2b", frames=9, height=112, width=112, tile=64)),
    ("Wan2.1 VAE decode 9x128x224", dict(kind="vae_decode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=9, height=128, width=224)),
    ("Wan2.1 VAE decode 5x192x192 tiled 128", dict(kind="vae_decode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=5, height=192, width=192, tile=128)),
    ("Wan2.1 VAE decode 1x192x320", dict(kind="vae_decode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=1, height=192, width=320)),
    ("Wan2.1 VAE encode 9x96x160", dict(kind="vae_encode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=9, height=96, width=160)),
    ("tiny-cogvideox t2v 17x192x192", dict(kind="pipeline", model="tiny-cogvideox", frames=17, height=192, width=192)),
    ("tiny-cogvideox t2v 9x256x256", dict(kind="pipeline", model="tiny-cogvideox", frames=9, height=256, width=256)),
    ("tiny-wan t2v 17x256x256", dict(kind="pipeline", model="tiny-wan", frames=17, height=256, width=256)),
    ("tiny-wan t2v 33x320x320", dict(kind="pipeline", model="tiny-wan", frames=33, height=320, width=320)),
]
QUICK = {3, 7, 9}

# --calibrate: each measured figure is the live-tensor peak divided by what archs.py scales it by
CALIBRATION = [
    ("COGVIDEOX_VAE single_chunk", dict(kind="vae_decode", model="THUDM/CogVideoX-2b", frames=9, height=64, width=96)),
    ("COGVIDEOX_VAE steady", dict(kind="vae_decode", model="THUDM/CogVideoX-2b", frames=17, height=64, width=96)),
    ("COGVIDEOX_VAE one_frame", dict(kind="vae_decode", model="THUDM/CogVideoX-2b", frames=1, height=64, width=96)),
    ("COGVIDEOX_VAE encode", dict(kind="vae_encode", model="THUDM/CogVideoX-2b", frames=17, height=64, width=96)),
    ("WAN21_VAE steady", dict(kind="vae_decode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=9, height=64, width=96)),
    ("WAN21_VAE one_frame", dict(kind="vae_decode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=1, height=64, width=96)),
    ("WAN21_VAE encode", dict(kind="vae_encode", model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", frames=9, height=64, width=96)),
    ("TINY_COG_VAE single_chunk", dict(kind="vae_decode", model="tiny-cogvideox", frames=9, height=128, width=128)),
    ("TINY_COG_VAE steady", dict(kind="vae_decode", model="tiny-cogvideox", frames=17, height=128, width=128)),
    ("TINY_COG_VAE one_frame", dict(kind="vae_decode", model="tiny-cogvideox", frames=1, height=128, width=128)),
    ("TINY_COG_VAE encode", dict(kind="vae_encode", model="tiny-cogvideox", frames=17, height=128, width=128)),
    ("TINY_WAN_VAE steady", dict(kind="vae_decode", model="tiny-wan", frames=9, height=128, width=128)),
    ("TINY_WAN_VAE one_frame", dict(kind="vae_decode", model="tiny-wan", frames=1, height=128, width=128)),
    ("TINY_WAN_VAE encode", dict(kind="vae_encode", model="tiny-wan", frames=9, height=128, width=128)),
]


# =========================================================================== child side (one case)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class LiveTensorPeak:
    """Peak of live tensor bytes on the CPU: every storage an op creates counts until it is freed.
    What torch.cuda.max_memory_allocated counts on a GPU, measured on the CPU (used by --calibrate)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._note(out)
                return out

        self.live = self.peak = 0
        self._seen: dict[int, int] = {}
        self._mode = _Mode()

    def _note(self, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    n = storage.nbytes()
                    self._seen[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def _random_module(build, dtype):
    """A module of the real architecture with random weights, materialised straight in `dtype`."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = build()
    module = module.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()
    return module.eval()


def _vae(model: str, dtype):
    from configs.registry import get_model_spec

    spec = get_model_spec(model)
    if spec.tiny:
        from engine.loaders import load_pipeline

        return load_pipeline(model, "t2v").vae.to(dtype)
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    build = AutoencoderKLCogVideoX if spec.family == "cogvideox" else AutoencoderKLWan
    return _random_module(build, dtype)


def _tile_kwargs(case: dict, family: str) -> dict:
    tile = case.get("tile")
    if not tile:
        return {}
    return dict(tile_sample_min_height=tile, tile_sample_min_width=tile)


def run_case(case: dict, calibrate: bool = False) -> dict:
    """Run one case in this (fresh) process; bytes above the baseline measured after the imports."""
    import torch

    import diffusers  # noqa: F401  (imports before the baseline)
    import vram_utils
    from configs.registry import get_model_spec
    from engine import loaders  # noqa: F401
    from vram_utils.probe import _read_vmhwm, _reset_vmhwm

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    spec = get_model_spec(case["model"])
    # diffusers and transformers import model code lazily, on first attribute access: pull in everything the
    # case uses now, so its code pages land in the baseline and not in the measured work
    for name in ("AutoencoderKLCogVideoX", "AutoencoderKLWan", "CogVideoXTransformer3DModel", "WanTransformer3DModel",
                 *spec.family_module.pipelines.values()):
        getattr(diffusers, name)
    import transformers

    for name in ("T5EncoderModel", "UMT5EncoderModel", "T5Tokenizer", "CLIPVisionModelWithProjection"):
        getattr(transformers, name)
    dtype = getattr(torch, case.get("dtype") or ("float32" if spec.tiny else "bfloat16"))
    base = _rss()
    _reset_vmhwm()
    t0 = time.perf_counter()
    live = LiveTensorPeak() if calibrate else None
    if case["kind"] in ("vae_decode", "vae_encode"):
        vae = _vae(case["model"], dtype)
        vram_utils.configure_vae_tiling(vae, bool(case.get("tile")), **_tile_kwargs(case, spec.family))
        ratio, lat_c = 8, vae.config.latent_channels if hasattr(vae.config, "latent_channels") else vae.config.z_dim
        n_lat = (case["frames"] - 1) // 4 + 1
        with torch.inference_mode():
            if case["kind"] == "vae_decode":
                z = torch.randn(1, lat_c, n_lat, case["height"] // ratio, case["width"] // ratio, dtype=dtype)
                if live:
                    with live:
                        out = vae.decode(z).sample
                else:
                    out = vae.decode(z).sample
                shape = list(out.shape)
            else:
                x = torch.rand(1, 3, case["frames"], case["height"], case["width"], dtype=dtype) * 2 - 1
                if live:
                    with live:
                        out = vae.encode(x).latent_dist.mode()
                else:
                    out = vae.encode(x).latent_dist.mode()
                shape = list(out.shape)
    elif case["kind"] == "pipeline":
        from engine.loaders import load_pipeline

        pipe = load_pipeline(case["model"], "t2v")
        vram_utils.configure_vae_tiling(pipe, bool(case.get("tile")), **_tile_kwargs(case, spec.family))
        max_seq = pipe.transformer.config.max_text_seq_length if spec.family == "cogvideox" else int(
            pipe.tokenizer.model_max_length
        )
        with torch.inference_mode():
            latents = pipe(
                prompt="a cat walks on the beach", num_frames=case["frames"], height=case["height"],
                width=case["width"], num_inference_steps=2, guidance_scale=6.0, output_type="latent",
                max_sequence_length=max_seq, generator=torch.Generator("cpu").manual_seed(0),
            ).frames
            if spec.family == "cogvideox":  # (B, F, C, H, W) -> (B, C, F, H, W), unscaled
                z = latents.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor
            else:
                z = latents
            out = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
            shape = list(out.shape)
    else:
        raise ValueError(f"unknown case kind {case['kind']!r}")
    seconds = time.perf_counter() - t0
    peak = (_read_vmhwm() or _rss()) - base
    return {"measured_bytes": int(peak), "live_bytes": live.peak if live else None, "seconds": seconds, "out_shape": shape}


# =========================================================================== parent side


def weight_bytes(case: dict) -> int:
    """Bytes of the weights the case holds (the part of the peak that needs no activation model)."""
    from configs.registry import get_model_spec
    from vram_utils import estimate as est
    from vram_utils.archs import arch_for

    spec = get_model_spec(case["model"])
    arch = arch_for(spec)
    b = 4 if (case.get("dtype") == "float32" or (spec.tiny and not case.get("dtype"))) else 2
    if case["kind"] == "pipeline":
        w = est.Workload("t2v", case["frames"], case["height"], case["width"], True, b)
        return sum(est.component_bytes(arch, w).values())
    return arch.vae.params * b


def predicted_bytes(case: dict) -> int:
    """The estimator's host peak for the case's work (CPU backend), above the process baseline."""
    from configs.schema import DecodeSettings
    from configs.registry import get_model_spec
    from vram_utils import estimate as est
    from vram_utils.archs import arch_for

    spec = get_model_spec(case["model"])
    arch = arch_for(spec)
    dtype_bytes = 4 if (case.get("dtype") == "float32" or (spec.tiny and not case.get("dtype"))) else 2
    tile = case.get("tile")
    decode = DecodeSettings(enable_vae_tiling=bool(tile))
    if tile:
        stride = _diffusers_tile_stride(spec.family, tile)
        decode = DecodeSettings(True, tile, tile, stride, stride)
    w = est.Workload(
        task="t2v", frames=case["frames"], height=case["height"], width=case["width"], cfg=True,
        dtype_bytes=dtype_bytes, decode=decode,
    )
    if case["kind"] == "pipeline":
        return est.estimate(arch, w, "none", "cpu").peak_host_bytes
    weights = arch.vae.params * dtype_bytes
    if case["kind"] == "vae_decode":
        return weights + est.decode_activation_bytes(arch, w, "cpu") + est.CPU_RUNTIME_BYTES
    return weights + est.encode_activation_bytes(arch, w.replace(task="v2v"), "cpu") + est.CPU_RUNTIME_BYTES


def _diffusers_tile_stride(family: str, tile: int) -> int:
    """The output-pixel stride diffusers' tiling uses for `tile` (configure_vae_tiling's choice)."""
    if family == "wan":
        return max(8, (tile * 3 // 4) // 8 * 8)
    from families.cogvideox import overlap_factor

    f = overlap_factor(tile, 8, 1 / 6)
    return tile - int(tile * f)


def _spawn(case: dict, calibrate: bool) -> dict:
    env = {**os.environ, **CHILD_ENV}
    env.setdefault("FITVIDEO_HOME", str(ROOT / ".cache" / "test-home"))
    cmd = [sys.executable, __file__, "--case", json.dumps(case)] + (["--calibrate"] if calibrate else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _row(name: str, pred: int, meas: int, weights: int | None = None) -> tuple[str, bool]:
    ratio = pred / meas if meas > 0 else float("inf")
    ok = TARGET[0] <= ratio <= TARGET[1]
    act = ""
    if weights is not None:  # the same ratio without the weights, which need no model to predict
        act = f" {(pred - weights) / max(1, meas - weights):>9.2f}"
    return f"{name:<44} {pred / MIB:>10.1f} {meas / MIB:>10.1f} {ratio:>7.2f}{act}  {'ok' if ok else 'OUT'}", ok


def run_cpu(quick: bool) -> list[bool]:
    print("CPU: peak RSS above the subprocess baseline (python + torch + libraries, imports done),")
    print("     glibc mmap threshold fixed at 64 KiB (a freed tensor leaves RSS, as on CUDA); bf16 for the full-size")
    print("     VAEs (random weights), float32 for the tiny pipelines (text encode + 2 denoise steps + decode)")
    print("     act ratio: the same ratio with the weights taken out of both sides (activations alone)")
    print(f"{'case':<44} {'pred MiB':>10} {'meas MiB':>10} {'ratio':>7} {'act ratio':>9}")
    oks = []
    for i, (name, case) in enumerate(CPU_GRID):
        if quick and i not in QUICK:
            continue
        pred = predicted_bytes(case)
        res = _spawn(case, calibrate=False)
        line, ok = _row(name, pred, res["measured_bytes"], weight_bytes(case))
        print(f"{line}   ({res['seconds']:.0f} s)", flush=True)
        oks.append(ok)
    return oks


def run_calibration() -> None:
    """Print the live-tensor coefficients archs.py holds, re-measured."""
    from configs.schema import DecodeSettings
    from configs.registry import get_model_spec
    from vram_utils import estimate as est
    from vram_utils.archs import arch_for

    print("live-tensor peak per pixel, element units (what vram_utils/archs.py holds)")
    for name, case in CALIBRATION:
        res = _spawn(case, calibrate=True)
        spec = get_model_spec(case["model"])
        arch = arch_for(spec)
        b = 4 if spec.tiny else 2
        w = est.Workload("v2v", case["frames"], case["height"], case["width"], True, b, decode=DecodeSettings(False))
        px = case["height"] * case["width"]
        if case["kind"] == "vae_decode":
            held = est.decode_activation_bytes(arch, w) - int(_per_px(arch.vae, w) * px * b)
        else:
            held = est.encode_activation_bytes(arch, w) - int(arch.vae.encode_elems_per_px * px * b)
        coef = (res["live_bytes"] - held) / px / b
        print(f"{name:<30} {coef:>10.0f}   (live {res['live_bytes'] / MIB:.1f} MiB, RSS {res['measured_bytes'] / MIB:.1f} MiB)", flush=True)


def _per_px(vae, w) -> float:
    from vram_utils.estimate import latent_frames

    n = latent_frames(w.frames, vae)
    if n == 1:
        return vae.decode_elems_per_px_one_frame
    return vae.decode_elems_per_px_single_chunk if n <= vae.chunk_latent_frames else vae.decode_elems_per_px


# --------------------------------------------------------------------------- CUDA


CUDA_CAPS_GB = (8, 12, 16, 24)
CUDA_MODELS = ("THUDM/CogVideoX-2b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def _random_pipeline(model: str):
    """The full-size pipeline of `model` with random weights (configs as published), on the CPU."""
    import torch
    from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from engine.tiny import make_tokenizer

    dtype = torch.float16 if model.endswith("2b") else torch.bfloat16
    t5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
    if "CogVideoX" in model:
        te = _random_module(lambda: T5EncoderModel(T5Config(vocab_size=32128, **t5)), dtype)
        tr = _random_module(lambda: CogVideoXTransformer3DModel(num_attention_heads=30, attention_head_dim=64, num_layers=30,
                                                                 text_embed_dim=4096, time_embed_dim=512), dtype)
        return CogVideoXPipeline(tokenizer=make_tokenizer(226), text_encoder=te, vae=_random_module(AutoencoderKLCogVideoX, dtype),
                                 transformer=tr, scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    te = _random_module(lambda: UMT5EncoderModel(UMT5Config(vocab_size=256384, **t5)), dtype)
    tr = _random_module(lambda: WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                                                      text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                                      qk_norm="rms_norm_across_heads"), dtype)
    return WanPipeline(tokenizer=make_tokenizer(512), text_encoder=te, vae=_random_module(AutoencoderKLWan, dtype),
                       transformer=tr, scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                         use_flow_sigmas=True, flow_shift=3.0))


def run_cuda() -> list[bool]:
    import torch

    import vram_utils
    from configs.schema import GenerationRequest
    from configs.registry import get_model_spec
    from vram_utils.probe import DeviceInfo, GpuInfo

    total = torch.cuda.get_device_properties(0).total_memory
    print(f"\nCUDA: {torch.cuda.get_device_name(0)}; torch.cuda.max_memory_allocated above the bytes allocated before "
          "the weights moved; cards emulated with set_per_process_memory_fraction")
    print(f"{'case':<44} {'pred MiB':>10} {'meas MiB':>10} {'ratio':>7}")
    oks = []
    for model in CUDA_MODELS:
        spec = get_model_spec(model)
        pipe = _random_pipeline(model)
        for cap_gb in CUDA_CAPS_GB:
            cap = cap_gb * 10**9
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
            vram_utils.remove_all_offload(pipe)
            pipe.to("cpu")
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(0)
            gpu = GpuInfo(0, torch.cuda.get_device_name(0), cap, base, cap - base, 0, 0)
            host = DeviceInfo(True, (gpu,), 128 * 2**30, 100 * 2**30, 2**30)
            req = GenerationRequest(model=model, task="t2v", prompt="a cat", steps=2, guidance=6.0)
            p = vram_utils.plan_for(req, spec, host)
            torch.cuda.reset_peak_memory_stats(0)
            try:
                vram_utils.apply_plan(pipe, p)
                with torch.inference_mode():
                    frames = spec.default_frames
                    h, w = spec.default_resolution
                    kwargs = dict(max_sequence_length=226) if spec.family == "cogvideox" else {}
                    lat = pipe(prompt="a cat", num_frames=frames, height=h, width=w, num_inference_steps=2,
                               guidance_scale=6.0, output_type="latent", **kwargs).frames
                    z = lat.permute(0, 2, 1, 3, 4) if spec.family == "cogvideox" else lat
                    vram_utils.apply_plan(pipe, p)
                    pipe.vae.decode(z.to(pipe.vae.device if p.offload != "model" else "cuda:0", pipe.vae.dtype))
                meas = torch.cuda.max_memory_allocated(0) - base
                line, ok = _row(f"{spec.label} {cap_gb} GB: {p.offload}", p.predicted_peak_gpu_bytes, meas)
            except torch.OutOfMemoryError as exc:
                line, ok = f"{spec.label} {cap_gb} GB: {p.offload}: OOM ({str(exc).splitlines()[0][:60]})", False
            print(line, flush=True)
            oks.append(ok)
        del pipe
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    return oks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), calibrate=args.calibrate)))
        return 0
    if args.calibrate:
        run_calibration()
        return 0
    t0 = time.perf_counter()
    print(f"FitVideo plan accuracy: predicted / measured peak memory (target {TARGET[0]}-{TARGET[1]})\n")
    oks = run_cpu(args.quick)
    import torch

    if torch.cuda.is_available():
        oks += run_cuda()
    else:
        print("\nCUDA: no CUDA GPU here; the CUDA grid (8/12/16/24 GB caps) did not run")
    print(f"\n{sum(oks)}/{len(oks)} ratios within {TARGET[0]}-{TARGET[1]}; {time.perf_counter() - t0:.0f} s")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
