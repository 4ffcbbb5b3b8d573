"""Weight bytes, peak memory and time per step of none / int8 / fp8-storage, side by side in one run.

The model is the full-size CogVideoX-2b transformer architecture (diffusers'
`CogVideoXTransformer3DModel()` defaults, 1.69 B parameters) with random
weights, built in bf16 as `from_pretrained(torch_dtype=bf16)` would load it.

* weights, bytes/param, quantize s, host RSS after quantize: the whole model
  (all `--full-blocks` = 30 blocks), measured from the real storage with
  `quant.weight_bytes` after `quant.apply`.
* peak and s/step: on CPU the same architecture cut to `--blocks` blocks (every
  width full size: 30 blocks at a real token count take minutes per step here);
  on CUDA the whole model. Input: `--frames` frames at 480x720 (1 frame = 1350
  video + 226 text tokens).

Each mode's memory is measured in its own child process, so one mode's
allocations cannot inflate another's: on CPU the peak is the high-water RSS
(VmHWM, reset after the warm-up forward), on CUDA `max_memory_allocated`. Time
is measured in one more child that holds all modes and runs their steps in turn
(none, int8, fp8-storage, none, ...), so load from other processes on a shared
machine falls on every mode alike; the table shows the fastest step per mode.

    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/quant_memory.py
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

MODES = ("none", "int8", "fp8-storage")
TEXT_TOKENS = 226  # CogVideoX-2b max_text_seq_length
TEXT_DIM = 4096  # T5-XXL hidden size


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _setup(args: argparse.Namespace):
    import torch

    torch.set_num_threads(args.threads)
    try:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()  # `.to(bf16)` warns about an empty fp32 keep-list on every build
    except ImportError:
        pass
    cuda = torch.cuda.is_available() and not args.cpu
    return torch.device("cuda" if cuda else "cpu")


def build_transformer(num_layers: int):
    """CogVideoX-2b transformer with `num_layers` blocks, built directly in bf16 (random init)."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate in bf16 from the start: no float32 copy of 1.69 B weights
    try:
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(num_layers=num_layers).eval()
    finally:
        torch.set_default_dtype(previous)
    # The sincos position table is computed in float64; from_pretrained(torch_dtype=bf16) casts it, so do we.
    return model.to(torch.bfloat16)


def make_inputs(args: argparse.Namespace, device) -> tuple:
    import torch

    g = torch.Generator("cpu").manual_seed(1)
    latent_frames = (args.frames - 1) // 4 + 1
    hidden = torch.randn(1, latent_frames, 16, args.height // 8, args.width // 8, generator=g)  # (B, F, C, H, W)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g) * 0.1  # (B, L, D)
    tokens = latent_frames * (args.height // 16) * (args.width // 16) + TEXT_TOKENS
    bf16 = torch.bfloat16
    return (hidden.to(device, bf16), text.to(device, bf16), torch.tensor([500], device=device)), tokens


def timed_blocks(args: argparse.Namespace, device) -> int:
    return args.full_blocks if device.type == "cuda" else args.blocks


def memory_child(mode: str, args: argparse.Namespace) -> dict:
    """Bytes of the whole model under `mode`, then the peak of forward steps (in this process only)."""
    import torch

    import quant

    device = _setup(args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads}"
    out: dict = {"mode": mode, "device": name}

    # 1. The whole model: real bytes after quantization, and what the process holds afterwards.
    model = build_transformer(args.full_blocks)
    result = quant.apply(model, mode)  # ends with gc, empty_cache and a heap trim
    out.update(
        applied=result.applied,
        params=result.params,
        weight_bytes=quant.weight_bytes(model),
        bytes_per_param=result.bytes_per_param,
        quantize_s=result.seconds,
        layers=result.layers,
        host_rss_bytes=_rss_bytes(),
    )
    blocks = timed_blocks(args, device)
    if blocks != args.full_blocks:
        del model, result
        quant.release_memory()
        model = build_transformer(blocks)
        quant.apply(model, mode)
    model.to(device)

    # 2. Peak of the steps over what the process held before them.
    inputs, out["tokens"] = make_inputs(args, device)
    with torch.inference_mode():
        pred = model(*inputs, return_dict=False)[0]  # warm-up: first-call allocations and kernel selection
        del pred
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            quant.release_memory()
            _reset_peak_rss()
            start = _rss_bytes()
        for _ in range(args.mem_steps):
            pred = model(*inputs, return_dict=False)[0]
            del pred
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
    out.update(timed_blocks=blocks, peak_bytes=peak, start_bytes=start)
    return out


def time_child(modes: list[str], args: argparse.Namespace) -> dict:
    """All modes in one process, steps taken in turn; fastest step per mode, and the outputs' cosine to none."""
    import torch

    import quant

    device = _setup(args)
    models = {}
    for mode in modes:
        models[mode] = build_transformer(timed_blocks(args, device))
        quant.apply(models[mode], mode)
        models[mode].to(device)
    inputs, _ = make_inputs(args, device)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    preds = {}
    with torch.inference_mode():
        for mode in modes:  # warm-up
            preds[mode] = models[mode](*inputs, return_dict=False)[0].float()
        for _ in range(args.steps):
            for mode in modes:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                models[mode](*inputs, return_dict=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
    ref = preds[modes[0]].flatten()
    return {
        mode: {
            "step_s": min(times[mode]),
            "steps_s": times[mode],
            "cosine": torch.nn.functional.cosine_similarity(preds[mode].flatten(), ref, dim=0).item(),
        }
        for mode in modes
    }


def _run_child(argv: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, *extra, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)  # failure reported below
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"child {' '.join(extra)} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(rows: list[dict], timing: dict, full_blocks: int) -> str:
    base = rows[0]
    blocks = base["timed_blocks"]
    head = (
        f"| mode | runs as | weights ({full_blocks} blocks) | × none | bytes/param | quantize s "
        "| host RSS after quantize "
        f"| peak ({blocks} blocks) | × none | step needs above resident | × none "
        f"| s/step ({blocks} blocks) | × none | cosine to none |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, t0 = timing[r["mode"]], timing[base["mode"]]
        lines.append(
            f"| {r['mode']} | {r['applied']} | {_gib(r['weight_bytes'])} "
            f"| {r['weight_bytes'] / base['weight_bytes']:.3f} "
            f"| {r['bytes_per_param']:.3f} | {r['quantize_s']:.1f} | {_gib(r['host_rss_bytes'])} "
            f"| {_gib(r['peak_bytes'])} | {r['peak_bytes'] / base['peak_bytes']:.3f} "
            f"| {_gib(r['peak_bytes'] - r['start_bytes'])} "
            f"| {(r['peak_bytes'] - r['start_bytes']) / (base['peak_bytes'] - base['start_bytes']):.3f} "
            f"| {t['step_s']:.2f} | {t['step_s'] / t0['step_s']:.2f} | {t['cosine']:.5f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated; the first is the reference")
    p.add_argument("--full-blocks", type=int, default=30, help="blocks of the model whose weight bytes are measured")
    p.add_argument("--blocks", type=int, default=2, help="blocks of the model stepped on CPU")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode after one warm-up")
    p.add_argument("--mem-steps", type=int, default=2, help="steps whose peak is measured after one warm-up")
    p.add_argument("--frames", type=int, default=1, help="video frames (4k+1) of the input")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--time-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    if args.memory_child:
        print("RESULT " + json.dumps(memory_child(args.memory_child, args)), flush=True)
        return 0
    if args.time_child:
        print("RESULT " + json.dumps(time_child(modes, args)), flush=True)
        return 0

    t_start = time.perf_counter()
    rows = []
    for mode in modes:
        rows.append(_run_child(argv, ["--memory-child", mode]))
        r = rows[-1]
        print(f"[{mode}] weights {_gib(r['weight_bytes'])}, quantize {r['quantize_s']:.1f} s, "
              f"step peak {_gib(r['peak_bytes'])}", file=sys.stderr, flush=True)
    timing = _run_child(argv, ["--time-child"])
    first = rows[0]
    print(
        f"CogVideoX-2b transformer architecture, random weights, bf16, {first['params'] / 1e9:.3f} B params; "
        f"{first['device']}; input {args.frames} frame(s) {args.height}x{args.width} ({first['tokens']} tokens); "
        f"fastest of {args.steps} steps per mode, taken in turn; total {time.perf_counter() - t_start:.0f} s"
    )
    print(table(rows, timing, args.full_blocks))
    print("steps (s): " + "; ".join(f"{m} " + ", ".join(f"{s:.2f}" for s in timing[m]["steps_s"]) for m in modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
