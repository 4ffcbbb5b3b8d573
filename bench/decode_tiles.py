"""Decode tiles sized by the planner: resolution x card x model -> tile, stride, tiles, pixel overhead, predicted
decode peak (the README table), and with --time a timed decode of the planner's tiles against the seed's.

    python bench/decode_tiles.py                # the table: pure arithmetic, a second
    python bench/decode_tiles.py --time         # + full-size VAEs (random weights) at 480x720 on this CPU
    python bench/decode_tiles.py --overlaps     # + seam error against the overlap (full-size VAEs, 240x360)
    flock /tmp/fitvideo-heavy.lock python bench/decode_tiles.py --time

Pixel overhead: pixels through the decoder over the frame's pixels (1.00x untiled). The seed decoded every frame
in 272 px tiles with a 144 x 128 px stride whatever the memory (15 tiles, 2.76x at 480x720). Each row is the
model's default T2V request (frames, preset) at the resolution, on a synthetic machine with one empty GPU
of that size and 64 GB of RAM (bench/plan_table.py `machine`).

--time decodes with diffusers' full-size CogVideoX and Wan 2.1 VAEs (their default configs, random weights,
float32) one or two latent frames at 480x720 through decode.stream_decode, once with the planner's tiles for the
12 GB card and once with the seed's, and prints the time ratio next to the pixel-overhead ratio (the first
should follow the second) and the PSNR between the two videos.
"""
from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import DecodeSettings, GenerationRequest, Plan
from configs.registry import get_model_spec  # noqa: E402
from vram_utils import plan_for  # noqa: E402
from vram_utils.archs import arch_for  # noqa: E402
from vram_utils.ladder import tile_layout  # noqa: E402
from vram_utils.probe import GIB  # noqa: E402

from bench.plan_table import machine  # noqa: E402

RESOLUTIONS = ((480, 720), (720, 1280), (768, 1360))
CARDS_GB = (8, 12, 24)
RAM_GB = 64
MODELS = ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "THUDM/CogVideoX-5b")
SEED = DecodeSettings()
TIMED_CARD_GB = 12
TIMED_MODELS = {"cogvideox": "THUDM/CogVideoX-5b", "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
# Latent frames per timed decode, so that the four decodes take under 6 minutes on 2 CPU cores (a latent frame
# at 480x720 untiled on 2 cores: Wan ~20 s for the first, ~100 s for each later one (4 frames), CogVideoX ~40 s;
# Wan at 2 latent frames: untiled 118 s, seed 271 s)
TIMED_LATENT_FRAMES = {"cogvideox": 1, "wan": 1}


def plan_row(model: str, hw: tuple[int, int], gpu_gb: int) -> Plan:
    spec = get_model_spec(model)
    req = GenerationRequest(model=model, task="t2v", prompt="a cat on a beach", height=hw[0], width=hw[1])
    return plan_for(req, spec, machine(gpu_gb, RAM_GB))


def describe(d: DecodeSettings, hw: tuple[int, int], factor: int) -> tuple[str, str, str, float]:
    """(tile, stride, tiles, overhead) for a table row: what the stream decodes for `d`."""
    layout = tile_layout(d, hw, factor)
    if not layout.tiled:
        return "untiled", "-", "1", layout.overhead
    f = layout.factor
    return (f"{layout.tile_h * f}x{layout.tile_w * f}", f"{d.tile_stride_y}x{d.tile_stride_x}",
            f"{len(layout.ys)}x{len(layout.xs)} = {layout.count}", layout.overhead)


def table() -> str:
    lines = ["| resolution | card | model | offload | tile (h x w px) | stride (px) | tiles | overhead | "
             "seed's overhead | decode peak / budget GiB | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for hw in RESOLUTIONS:
        for gpu_gb in CARDS_GB:
            for model in MODELS:
                p = plan_row(model, hw, gpu_gb)
                factor = arch_for(get_model_spec(model), "t2v").vae.spatial_ratio
                tile, stride, tiles, over = describe(p.decode, hw, factor)
                seed = tile_layout(SEED, hw, factor).overhead
                peak = p.stages.get("decode", 0)
                lines.append(f"| {hw[0]}x{hw[1]} | {gpu_gb} GB | {get_model_spec(model).label} | {p.offload} | {tile} | "
                             f"{stride} | {tiles} | {over:.2f}x | {seed:.2f}x | {peak / GIB:.1f} / "
                             f"{p.budget_bytes / GIB:.1f} | {'yes' if p.fits else 'no'} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"


class _Frames:
    """A sink that keeps the decoded frames (uint8) for the PSNR between two decodes."""

    def __init__(self):
        self.parts = []

    def write(self, frames) -> None:
        self.parts.append(frames)


def _psnr(a, b) -> float:
    import numpy as np

    x, y = np.concatenate(a.parts).astype(np.float64), np.concatenate(b.parts).astype(np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _vae(family: str):
    import torch
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    torch.manual_seed(0)
    return (AutoencoderKLCogVideoX() if family == "cogvideox" else AutoencoderKLWan()).eval()


def _latents(vae, latent_frames: int, hw: tuple[int, int], factor: int):
    """Random latents (seed 1) for `latent_frames` frames of `hw` output pixels in this VAE's channels."""
    import torch

    channels = vae.config.latent_channels if hasattr(vae.config, "latent_channels") else vae.config.z_dim
    return torch.randn(1, channels, latent_frames, hw[0] // factor, hw[1] // factor,
                       generator=torch.Generator().manual_seed(1))


def time_family(family: str, hw: tuple[int, int], latent_frames: int) -> str:
    """Decode with the planner's tiles (the 12 GB card) and the seed's; one line with the ratios."""
    import torch

    from decode import stream_decode

    vae, model = _vae(family), TIMED_MODELS[family]
    factor = 8
    z = _latents(vae, latent_frames, hw, factor)
    planned = plan_row(model, hw, TIMED_CARD_GB).decode
    runs = {}
    for name, d in (("planner", planned), ("seed", SEED)):
        sink, start = _Frames(), time.perf_counter()
        with torch.inference_mode():
            stream_decode(vae, z, d, sink)
        runs[name] = (time.perf_counter() - start, sink, describe(d, hw, factor))
    (tp, sp, dp), (ts, ss, ds) = runs["planner"], runs["seed"]
    return (f"{family} {hw[0]}x{hw[1]}, {latent_frames} latent frames: planner {dp[0]} ({dp[2]} tiles, {dp[3]:.2f}x) "
            f"{tp:.1f} s; seed {ds[0]} ({ds[2]} tiles, {ds[3]:.2f}x) {ts:.1f} s; time ratio seed/planner "
            f"{ts / tp:.2f}, pixel-overhead ratio {ds[3] / dp[3]:.2f}; PSNR planner vs seed {_psnr(sp, ss):.1f} dB")


OVERLAP_HW = (240, 360)  # small enough for an untiled reference per VAE in seconds, 2 x 3 tiles of 128 px
OVERLAP_TILE = 128
OVERLAPS = (16, 32, 64, 96)  # output pixels; the seed's are 128 across and 144 down (here: tile 128 caps them)


def overlap_rows(family: str, latent_frames: int = 1) -> list[str]:
    """Seam error against the overlap: the untiled decode as the reference, then OVERLAP_TILE px tiles at each
    overlap (stride = tile - overlap) through decode.stream_decode; PSNR to the reference and time. Random
    weights: the numbers say how far the blended tiles drift from the whole-frame decode for this architecture's
    receptive field, not how a trained VAE's seams look."""
    import torch

    from decode import stream_decode

    vae, hw, factor = _vae(family), OVERLAP_HW, 8
    z = _latents(vae, latent_frames, hw, factor)
    settings = [("untiled", DecodeSettings(enable_vae_tiling=False))] + [
        (f"overlap {o} px", DecodeSettings(True, OVERLAP_TILE, OVERLAP_TILE, OVERLAP_TILE - o, OVERLAP_TILE - o,
                                           fixed_tiles=True)) for o in OVERLAPS]
    rows, reference = [], None
    for name, d in settings:
        sink, start = _Frames(), time.perf_counter()
        with torch.inference_mode():
            stream_decode(vae, z, d, sink)
        seconds = time.perf_counter() - start
        reference = reference or sink
        tiles = describe(d, hw, factor)
        psnr = "reference" if sink is reference else f"PSNR {_psnr(sink, reference):.1f} dB"
        rows.append(f"{family} {hw[0]}x{hw[1]} {name}: {tiles[2]} tiles, {tiles[3]:.2f}x, {seconds:.1f} s, {psnr}")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", action="store_true", help="also time full-size VAE decodes at 480x720 (minutes)")
    ap.add_argument("--latent-frames", type=int, default=None,
                    help="latent frames per timed decode (default 1; Wan at 2 takes ~6.5 minutes)")
    ap.add_argument("--overlaps", action="store_true", help="also the seam error against the overlap (minutes)")
    ap.add_argument("--families", default="cogvideox,wan", help="VAEs to time, comma separated")
    args = ap.parse_args(argv)
    print(table())
    if not (args.time or args.overlaps):
        return
    import torch

    print(f"\nCPU: {cpu_model()}, torch threads {torch.get_num_threads()}")
    for family in args.families.split(",") if args.overlaps else []:
        overlap_rows(family)
    for family in args.families.split(",") if args.time else []:
        frames = args.latent_frames or TIMED_LATENT_FRAMES[family]
        print(time_family(family, RESOLUTIONS[0], frames), flush=True)


if __name__ == "__main__":
    main()
