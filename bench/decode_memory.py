"""Decode memory and time: diffusers' plain decode, diffusers' `enable_tiling`, and our streaming decode.

Full-size VAEs with random weights (CogVideoX-2b VAE and Wan 2.1 VAE, their diffusers defaults), bf16.
Every case runs in its own subprocess and ends with the mp4 on disk:
  plain / tiled   vae.decode -> the pipeline's usual post-processing (VideoProcessor.postprocess_video,
                  "pil" for CogVideoX, "np" for Wan) -> diffusers.utils.export_to_video
  ours            decode.stream_decode -> decode.VideoWriter (frames encoded as they arrive)
Peak memory is the process's resident set (VmHWM, reset with /proc/self/clear_refs just before the decode,
so model loading is not in it; the loaded model is) on CPU, and torch.cuda.max_memory_allocated on CUDA.
ffmpeg runs as a child process in every case and is not counted.

Sizes: on CPU, latents of 3 and 13 frames at 30x45 (9 and 49 frames at 240x360); on CUDA, 3 and 13 frames
at 60x90 (9 and 49 frames at 480x720). 13 = 4 x 3 + 1 latent frames: the frame counts the pipelines make.
Tiles at 240x360 (so that tiling really happens; diffusers' defaults do not tile CogVideoX there):
  CogVideoX  diffusers enable_tiling(240, 200): 240x200 px tiles (one row, two columns), its default
             overlap factors (1/6, 1/5), i.e. strides 200x160 px (heights multiple of 48 and widths of 40
             avoid its size bug); ours the same tiles and strides, 1 latent frame per chunk, frame by frame.
             (With 144x200 tiles, 2x2: diffusers 2.31 GiB, ours 1.68 GiB at 13 latent frames; every tile keeps
             its causal caches between chunks, so on the CPU fewer, larger tiles suit ours.)
  Wan        diffusers enable_tiling() defaults: 256x256 px tiles, stride 192; ours the same settings, own
             chunks (our tiles shrink to 240x216 px, still overlapping by at least 256 - 192 px).
On CUDA at 480x720 both use diffusers' default tiles (CogVideoX 240x360 / overlap 1/6, 1/5; Wan 256 / 192).

    .venv/bin/python bench/decode_memory.py                 # everything, prints the table and the ratios
    .venv/bin/python bench/decode_memory.py --families wan  # one VAE
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

CACHE = ROOT / ".cache" / "bench" / "decode_memory"
FAMILIES = ("cogvideox", "wan")
MODES = ("plain", "tiled", "ours")
FPS = {"cogvideox": 8, "wan": 16}
SEED = 0
GIB = 2**30

# Per device kind: latent (height, width), the base latent frame count, and each family's tiles.
SIZES = {
    "cpu": {"latent_hw": (30, 45), "frames": (3, 13)},
    "cuda": {"latent_hw": (60, 90), "frames": (3, 13)},
}
TILES = {  # diffusers enable_tiling kwargs, and our DecodeSettings kwargs for the same tiles
    ("cpu", "cogvideox"): (
        dict(tile_sample_min_height=240, tile_sample_min_width=200),
        dict(tile_y=240, tile_x=200, tile_stride_y=200, tile_stride_x=160, chunk_frames=1),
    ),
    ("cpu", "wan"): (dict(), dict(tile_y=256, tile_x=256, tile_stride_y=192, tile_stride_x=192, chunk_frames=0)),
    ("cuda", "cogvideox"): (
        dict(),
        dict(tile_y=240, tile_x=360, tile_stride_y=200, tile_stride_x=288, chunk_frames=1),
    ),
    ("cuda", "wan"): (dict(), dict(tile_y=256, tile_x=256, tile_stride_y=192, tile_stride_x=192, chunk_frames=0)),
}
TARGETS = {"frames_ratio": 1.05, "cog_vs_tiled": 0.7, "wan_vs_tiled": 1.0, "time_vs_tiled": 1.2}


# --------------------------------------------------------------------------- memory readings (Linux)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------- setup (own subprocess)


def vae_dir(family: str) -> Path:
    return CACHE / f"{family}-vae-seed{SEED}"


def latents_path(family: str, frames: int, hw: tuple[int, int]) -> Path:
    return CACHE / f"{family}-latents-{frames}x{hw[0]}x{hw[1]}.pt"


def setup(families: list[str], kind: str) -> None:
    """Random-weight VAEs saved once as bf16 (so every case loads them the usual way), and seeded latents."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    CACHE.mkdir(parents=True, exist_ok=True)
    for family in families:
        folder = vae_dir(family)
        if not (folder / "config.json").is_file():
            torch.manual_seed(SEED)
            torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy of 216M parameters
            vae = AutoencoderKLCogVideoX() if family == "cogvideox" else AutoencoderKLWan()
            torch.set_default_dtype(torch.float32)
            vae.save_pretrained(folder)
            del vae
        h, w = SIZES[kind]["latent_hw"]
        for frames in SIZES[kind]["frames"]:
            path = latents_path(family, frames, (h, w))
            if not path.is_file():
                gen = torch.Generator().manual_seed(SEED + frames)
                torch.save(torch.randn(1, 16, frames, h, w, generator=gen).to(torch.bfloat16), path)


# --------------------------------------------------------------------------- one case (own subprocess)


class TeeSink:
    """The video writer, plus the raw uint8 frames appended to a file (for PSNR; the file is not in RAM)."""

    def __init__(self, writer, raw_path: Path):
        self.writer = writer
        self.raw = open(raw_path, "wb")
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def write(self, frames) -> None:
        self.writer.write(frames)
        self.raw.write(frames.tobytes())
        self.shape = frames.shape[1:]
        self.count += len(frames)


def run_case(spec: dict) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan
    from diffusers.utils import export_to_video
    from diffusers.video_processor import VideoProcessor

    import decode
    from configs.schema import DecodeSettings

    family, mode, kind = spec["family"], spec["mode"], spec["kind"]
    device = torch.device("cuda" if kind == "cuda" else "cpu")
    cls = AutoencoderKLCogVideoX if family == "cogvideox" else AutoencoderKLWan
    vae = cls.from_pretrained(vae_dir(family), torch_dtype=torch.bfloat16).to(device).eval()
    z = torch.load(spec["latents"], weights_only=True)  # (1, 16, F, h, w) bf16, CPU
    out = Path(spec["out"])
    raw = out.with_suffix(".u8")
    diffusers_tiles, our_tiles = TILES[kind, family]

    rss_before = _status_kib("VmRSS") * 1024
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if device.type == "cuda" else None
    reset_peak_rss()
    t0 = time.perf_counter()
    info: dict = {}
    if mode == "ours":
        settings = DecodeSettings(enable_vae_tiling=True, **our_tiles)
        with decode.VideoWriter(out, FPS[family]) as writer:
            sink = TeeSink(writer, raw)
            stats = decode.stream_decode(vae, z, settings, sink)
        sink.raw.close()
        frames, shape = sink.count, sink.shape
        info = {"tiles": stats.tiles, "chunks": stats.chunks, "oom_steps": len(stats.oom_steps)}
    else:
        if mode == "tiled":
            vae.enable_tiling(**diffusers_tiles)
        with torch.inference_mode():
            video = vae.decode(z.to(device)).sample  # (1, 3, T, H, W)
            processor = VideoProcessor(vae_scale_factor=8)
            if family == "cogvideox":  # CogVideoXPipeline's default output_type="pil"
                result = processor.postprocess_video(video=video, output_type="pil")[0]
            else:  # WanPipeline's default output_type="np"
                result = processor.postprocess_video(video, output_type="np")[0]
            del video
            export_to_video(result, str(out), fps=FPS[family])
        frames = len(result)
        seconds_decode = time.perf_counter() - t0
        info = {"decode_to_mp4_s": seconds_decode}
    seconds = time.perf_counter() - t0
    peak_rss = _status_kib("VmHWM") * 1024
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if mode != "ours":  # raw frames for PSNR, outside the measured span
        arr = np.stack([np.asarray(f) for f in result])
        if arr.dtype != np.uint8:
            arr = (arr * 255).round().astype(np.uint8)
        raw.write_bytes(arr.tobytes())
        shape = arr.shape[1:]
    return {
        **spec, **info,
        "frames": frames, "frame_shape": list(shape), "seconds": seconds,
        "rss_before": rss_before, "peak_rss": peak_rss, "peak_gpu": peak_gpu, "base_gpu": base_gpu,
        "mp4_frames": mp4_frame_count(out), "mp4_bytes": out.stat().st_size,
    }


def mp4_frame_count(path: Path) -> int:
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return reader.count_frames()
    finally:
        reader.close()


# --------------------------------------------------------------------------- driver


def psnr_u8(a_path: Path, b_path: Path) -> float | None:
    import numpy as np

    a, b = np.fromfile(a_path, dtype=np.uint8), np.fromfile(b_path, dtype=np.uint8)
    if a.shape != b.shape:
        return None
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_subprocess(args: list[str], timeout: int, extra_env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--frames", default=None, help="latent frame counts to run, e.g. 3 (default: both sizes)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    p.add_argument(
        "--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
        help="run every case with MALLOC_MMAP_THRESHOLD_=BYTES (glibc then returns every freed block of that "
        "size or more to the OS at once: lower RSS, more page faults), to compare all cases under that setting",
    )
    p.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    import torch

    kind = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    families = [f for f in args.families.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    if args.setup:
        setup(families, kind)
        return 0
    t_all = time.perf_counter()
    run_subprocess(["--setup", "--families", ",".join(families), "--device", kind], args.timeout)
    out_dir = CACHE / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = SIZES[kind]["latent_hw"]
    results: dict[tuple[str, int, str], dict] = {}
    sizes = [int(f) for f in args.frames.split(",")] if args.frames else SIZES[kind]["frames"]
    for family in families:
        for frames in sizes:
            for mode in modes:
                spec = {
                    "family": family, "mode": mode, "kind": kind, "latent_frames": frames,
                    "latents": str(latents_path(family, frames, hw)),
                    "out": str(out_dir / f"{family}-{frames}-{mode}.mp4"),
                }
                env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
                r = run_subprocess(["--case", json.dumps(spec)], args.timeout, env)
                results[family, frames, mode] = r
                print(
                    f"  {family:9s} {frames:2d} latent frames {mode:5s}: {r['seconds']:7.1f} s, "
                    f"peak RSS {fmt_bytes(r['peak_rss'])} GiB, GPU {fmt_bytes(r['peak_gpu'])} GiB",
                    flush=True,
                )
    print_report(results, kind, hw, families, modes, time.perf_counter() - t_all)
    return 0


def print_report(results: dict, kind: str, hw: tuple[int, int], families: list[str], modes: list[str], total_s: float) -> None:
    peak_key = "peak_gpu" if kind == "cuda" else "peak_rss"
    print(f"\nDecode memory, {kind}, bf16, latents {{{', '.join(map(str, SIZES[kind]['frames']))}}}x{hw[0]}x{hw[1]}, "
          f"output {hw[0] * 8}x{hw[1] * 8}; peak = {'max_memory_allocated' if kind == 'cuda' else 'VmHWM during decode'}")
    print("| VAE | latent frames | video frames | mode | tiles | peak GiB | peak - before GiB | time s | PSNR vs plain dB | mp4 frames |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (family, frames, mode), r in results.items():
        plain = results.get((family, frames, "plain"))
        psnr = psnr_u8(Path(r["out"]).with_suffix(".u8"), Path(plain["out"]).with_suffix(".u8")) if plain else None
        before = r["base_gpu"] if kind == "cuda" else r["rss_before"]
        tiles = r.get("tiles", "-" if mode == "plain" else "diffusers")
        print(
            f"| {family} | {frames} | {r['frames']} | {mode} | {tiles} | {fmt_bytes(r[peak_key])} | "
            f"{fmt_bytes(r[peak_key] - before)} | {r['seconds']:.1f} | "
            f"{'-' if psnr is None or mode == 'plain' else f'{psnr:.1f}'} | {r['mp4_frames']} |"
        )
    print("\nRatios (one run, side by side):")
    lo, hi = SIZES[kind]["frames"]
    checks = []

    def ratio(name: str, a: dict | None, b: dict | None, key: str, target: float) -> None:
        if a is None or b is None:
            return
        value = a[key] / b[key]
        checks.append(value <= target)
        print(f"  {name}: {value:.3f} (target <= {target}) {'PASS' if value <= target else 'FAIL'}")

    for family in families:
        ours_lo, ours_hi = results.get((family, lo, "ours")), results.get((family, hi, "ours"))
        ratio(f"{family} ours peak {hi} / {lo} latent frames", ours_hi, ours_lo, peak_key, TARGETS["frames_ratio"])
        for frames in (lo, hi):
            ours, tiled = results.get((family, frames, "ours")), results.get((family, frames, "tiled"))
            target = TARGETS["cog_vs_tiled"] if family == "cogvideox" else TARGETS["wan_vs_tiled"]
            if family == "cogvideox" and frames == lo:
                target = None  # the CogVideoX bound is set at the larger size
            if target is None:
                if ours and tiled:
                    print(f"  {family} ours / diffusers tiled peak, {frames} latent frames: "
                          f"{ours[peak_key] / tiled[peak_key]:.3f} (no target at this size)")
            else:
                ratio(f"{family} ours / diffusers tiled peak, {frames} latent frames", ours, tiled, peak_key, target)
            ratio(f"{family} ours / diffusers tiled time, {frames} latent frames", ours, tiled, "seconds",
                  TARGETS["time_vs_tiled"])
    print(f"\n{sum(checks)}/{len(checks)} targets met; bench took {total_s / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
