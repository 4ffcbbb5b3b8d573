"""What a LoRA change costs on a loaded transformer (our `sync_module`) next to reloading the transformer fresh.

Two full-width, reduced-depth transformers with random bf16 weights (built on the meta device and materialised
tensor by tensor, as bench/host_ram.py's `build_stack` does), saved with `save_pretrained` to a temp folder:

  cogvideox-2b   diffusers' `CogVideoXTransformer3DModel`, CogVideoX-2b config (30 heads x 64 = 1920 hidden),
                 `--blocks` of its 30 blocks (4 by default)
  wan2.1-1.3b    diffusers' `WanTransformer3DModel`, Wan 2.1 1.3B config (12 heads x 128 = 1536 hidden, ffn 8960,
                 text 4096, in/out 16), `--blocks` of its 30 blocks

Per model, side by side in one run:

  fresh reload   `from_pretrained(folder, torch_dtype=torch.bfloat16)`: what a LoRA change would cost without
                 adapters. "warm": the file's pages already in the page cache (every reload after the first);
                 "cold": the file's pages dropped first (fsync + POSIX_FADV_DONTNEED on that file only). bf16
                 weights stay memory-mapped after `from_pretrained`, so a plain reload does not read them all; the
                 "+ touch" rows also read one element of every 4 KiB page of every weight (what the first step would)
  LoRA cases     `engine.lora.sync_module(PipelineClass, transformer, {adapter: (LoraFile, strength)})` on
                 the already-loaded transformer: first load of A; A's strength changed; A swapped for B; all
                 unloaded; the swap again with torch on 1 thread. A and B are random rank-`--rank` peft-format LoRAs (tests/lora_files.py `make_lora`:
                 Wan's attention + ffn, CogVideoX's attention), different seeds. `lora_file(path)` (reads the file
                 once for its signature, cached afterwards) is timed on its own.

Each case is the median of `--reps` runs (the fastest one shown too: the machine may be shared, and the load
average at the start and end is printed). Ratio = median case / median fresh reload. Then `--cycle` swaps A <-> B with the RSS
(VmRSS, RssAnon) before and after. `--profile` prints the top functions (cProfile, cumulative) of one swap.

    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/lora.py
    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/lora.py --blocks 4 --rank 32 --reps 5 --cycle 20 --profile
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# diffusers' CogVideoX-2b transformer config (THUDM/CogVideoX-2b transformer/config.json), num_layers left out
COGVIDEOX_2B_CONFIG = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False,
)
# diffusers' Wan 2.1 T2V 1.3B transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json)
WAN_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)
# name -> (transformer class, config, the pipeline class whose LoRA loader sync_module is given)
MODELS = {
    "cogvideox-2b": ("CogVideoXTransformer3DModel", COGVIDEOX_2B_CONFIG, "CogVideoXPipeline"),
    "wan2.1-1.3b": ("WanTransformer3DModel", WAN_1_3B_CONFIG, "WanPipeline"),
}


# --------------------------------------------------------------------------- models and files


def build_model(cls_name: str, config: dict, blocks: int, folder: Path, seed: int = 0) -> int:
    """Save a `blocks`-deep transformer of `config` with random bf16 weights to `folder`; returns its parameters.
    Built on meta and materialised one tensor at a time from a shared random pool (bench/host_ram.py)."""
    import diffusers

    from bench.host_ram import random_bf16_model

    model = random_bf16_model(getattr(diffusers, cls_name), config, blocks, seed, pool_size=1 << 22)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return params


def drop_page_cache(folder: Path) -> None:
    """Drop the folder's safetensors pages from the page cache (only theirs): the next read is from the disk."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def touch_weights(model) -> None:
    """Read one element of every 4 KiB page of every parameter and buffer (mapped pages come in)."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            flat = t.detach().reshape(-1)
            step = max(1, 4096 // t.element_size())
            flat[::step].float().sum()


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    name = fields.get("Model name", "?").strip()
    return f"CPU: {name}; lscpu CPU(s) {fields.get('CPU(s)', '?').strip()}, torch threads {_threads()}"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- timing


def median_time(fn, reps: int, before=None) -> tuple[float, list[float]]:
    """Median seconds of `fn()` over `reps` runs; `before()` (untimed) runs ahead of each."""
    times = []
    for _ in range(reps):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def reload_rows(cls, folder: Path, reps: int) -> list[tuple[str, float, list[float]]]:
    """Fresh `from_pretrained` times: page cache warm / cold, with and without reading every weight page."""
    import torch

    def load(touch: bool):
        def run():
            model = cls.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
            if touch:
                touch_weights(model)
            del model
        return run

    cls.from_pretrained(folder, torch_dtype=torch.bfloat16)  # warm-up: imports, first-call costs, pages in
    gc.collect()
    rows = []
    for label, touch, cold in (("fresh reload, page cache warm", False, False),
                               ("fresh reload + touch, page cache warm", True, False),
                               ("fresh reload, cold (pages dropped)", False, True),
                               ("fresh reload + touch, cold (pages dropped)", True, True)):
        med, times = median_time(load(touch), reps, before=(lambda: (gc.collect(), drop_page_cache(folder)))
                                 if cold else gc.collect)
        rows.append((label, med, times))
    return rows


def lora_rows(pipe_cls, model, files: tuple, reps: int) -> list[tuple[str, float, list[float]]]:
    """sync_module times on the loaded `model`: first load of A, strength change, swap A -> B, unload all."""
    from engine.lora import sync_module

    a, b = files
    only_a = {a.adapter: (a, 1.0)}
    sync = (lambda wanted: (lambda: sync_module(pipe_cls, model, wanted)))
    rows = [("LoRA A first load", *median_time(sync(only_a), reps, before=sync({})))]
    strengths = iter([0.7, 1.0] * reps)
    rows.append(("LoRA A strength 1.0 <-> 0.7", *median_time(
        lambda: sync_module(pipe_cls, model, {a.adapter: (a, next(strengths))}), reps, before=None)))
    sync({})()
    sync(only_a)()
    targets = iter([{b.adapter: (b, 1.0)}, only_a] * reps)
    rows.append(("LoRA swap A <-> B", *median_time(lambda: sync_module(pipe_cls, model, next(targets)), reps)))
    rows.append(("LoRA swap A <-> B, 1 torch thread", *single_thread(
        lambda: median_time(lambda: sync_module(pipe_cls, model, next(targets)), reps))))
    rows.append(("LoRA unload all", *median_time(sync({}), reps, before=sync(only_a))))
    return rows


def single_thread(fn):
    """`fn()` with torch on one intra-op thread (its many small ops then wait on no other thread), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def swap_cycle(pipe_cls, model, files: tuple, n: int) -> str:
    """`n` swaps A <-> B; the RSS before and after (adapters deleted each time: nothing should pile up)."""
    from engine.lora import sync_module

    a, b = files
    sync_module(pipe_cls, model, {a.adapter: (a, 1.0)})
    gc.collect()
    rss0, anon0 = status_bytes("VmRSS"), status_bytes("RssAnon")
    t0 = time.perf_counter()
    for i in range(n):
        f = b if i % 2 == 0 else a
        sync_module(pipe_cls, model, {f.adapter: (f, 1.0)})
    took = time.perf_counter() - t0
    gc.collect()
    rss1, anon1 = status_bytes("VmRSS"), status_bytes("RssAnon")
    sync_module(pipe_cls, model, {})
    mib = 2**20
    return (f"{n} swaps A<->B in {took:.1f} s: VmRSS {rss0 / mib:.0f} -> {rss1 / mib:.0f} MiB "
            f"({(rss1 - rss0) / mib:+.0f}), RssAnon {anon0 / mib:.0f} -> {anon1 / mib:.0f} MiB "
            f"({(anon1 - anon0) / mib:+.0f})")


def profile_swap(pipe_cls, model, files: tuple, top: int = 14) -> str:
    """cProfile of one swap A -> B (then back, unprofiled): the functions that cost it, cumulative."""
    import cProfile
    import io
    import pstats

    from engine.lora import sync_module

    a, b = files
    sync_module(pipe_cls, model, {a.adapter: (a, 1.0)})
    prof = cProfile.Profile()
    prof.enable()
    sync_module(pipe_cls, model, {b.adapter: (b, 1.0)})
    prof.disable()
    sync_module(pipe_cls, model, {})
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return "\n".join(ln for ln in out.getvalue().splitlines() if ln.strip())


# --------------------------------------------------------------------------- one model


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Build, save, time the reloads and the LoRA cases of one model; what the report prints."""
    import diffusers
    import torch

    from engine.lora import lora_file
    from tests.lora_files import make_lora

    cls_name, config, pipe_name = MODELS[name]
    cls, pipe_cls = getattr(diffusers, cls_name), getattr(diffusers, pipe_name)
    folder = work / name
    t0 = time.perf_counter()
    params = build_model(cls_name, config, args.blocks, folder)
    gc.collect()
    build_s = time.perf_counter() - t0
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = reload_rows(cls, folder, args.reps)
    model = cls.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    paths = [make_lora(model, work / f"{name}-{x}.safetensors", fmt="peft", rank=args.rank, seed=seed)
             for x, seed in (("A", 1), ("B", 2))]
    t0 = time.perf_counter()
    files = tuple(lora_file(str(p)) for p in paths)
    rows.append(("lora_file(path), first call (x2, A and B)", time.perf_counter() - t0, []))
    rows += lora_rows(pipe_cls, model, files, args.reps)
    result = dict(name=name, params=params, file_bytes=file_bytes, build_s=build_s, rows=rows,
                  lora_params=files[0].signature.params, lora_bytes=paths[0].stat().st_size,
                  shape=_shape(name, config, args.blocks), adapter_check=_adapter_check(pipe_cls, model, files))
    if args.cycle:
        result["cycle"] = swap_cycle(pipe_cls, model, files, args.cycle)
    if args.profile:
        result["profile"] = profile_swap(pipe_cls, model, files)
    del model
    gc.collect()
    return result


def _shape(name: str, config: dict, blocks: int) -> str:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config.get("ffn_dim", 4 * width)
    return (f"{name}: {config['num_attention_heads']} heads x {config['attention_head_dim']} = {width} hidden, "
            f"ffn {ffn}, {blocks} blocks")


def _adapter_check(pipe_cls, model, files: tuple) -> str:
    """That the cases did what they say: after loading A then swapping to B, only B is on the model; after
    unloading, no peft layer is left."""
    from engine.lora import loaded_adapters, sync_module

    a, b = files
    sync_module(pipe_cls, model, {a.adapter: (a, 0.5)})
    sync_module(pipe_cls, model, {b.adapter: (b, 0.8)})
    after_swap = sorted(loaded_adapters(model))
    sync_module(pipe_cls, model, {})
    leftover = sum(1 for m in model.modules() if "lora" in type(m).__module__.lower())
    ok = after_swap == [b.adapter] and leftover == 0
    return f"adapters after swap: {after_swap}; peft layers after unload: {leftover}; {'ok' if ok else 'WRONG'}"


# --------------------------------------------------------------------------- report


def report(results: list[dict], args: argparse.Namespace) -> str:
    mib = 2**20
    lines = [cpu_line(), f"rank {args.rank} LoRAs (peft format, float32 in the file), median of {args.reps}"]
    for r in results:
        lines.append(f"{r['shape']}: {r['params'] / 1e6:.1f} M params, {r['file_bytes'] / mib:.0f} MiB bf16 on "
                     f"disk (built in {r['build_s']:.0f} s); LoRA {r['lora_params'] / 1e6:.2f} M params, "
                     f"{r['lora_bytes'] / mib:.1f} MiB file")
    lines.append("load average (1, 5, 15 min) at start / end: " + " / ".join(
        ", ".join(f"{x:.2f}" for x in la) for la in (args.load_start, os.getloadavg())))
    lines += ["", "| model | case | median s | min s | runs s | / warm reload | / cold reload + touch |",
              "|" + "---|" * 7]
    for r in results:
        rows = {label: med for label, med, _ in r["rows"]}
        warm, cold = rows["fresh reload, page cache warm"], rows["fresh reload + touch, cold (pages dropped)"]
        for label, med, times in r["rows"]:
            runs = ", ".join(f"{t:.3f}" for t in times) or "-"
            low = min(times, default=med)
            lines.append(f"| {r['name']} | {label} | {med:.3f} | {low:.3f} | {runs} | {med / warm:.3f} "
                         f"| {med / cold:.3f} |")
    for r in results:
        lines.append(f"{r['name']}: {r['adapter_check']}")
        if "cycle" in r:
            lines.append(f"{r['name']}: {r['cycle']}")
    for r in results:
        if "profile" in r:
            lines += ["", f"{r['name']}: cProfile of one swap A -> B (cumulative)", r["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--blocks", type=int, default=4, help="transformer blocks of the 30")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cycle", type=int, default=20, help="A <-> B swaps with RSS before/after (0: skip)")
    p.add_argument("--profile", action="store_true", help="cProfile one swap per model")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()  # other jobs share the machine: the times are only as quiet as it was
    logging.getLogger("engine.lora").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fitvideo-lora-bench-"))
    os.environ.setdefault("FITVIDEO_HOME", str(work / "home"))
    try:
        results = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            t0 = time.perf_counter()
            results.append(bench_model(name, args, work))
            print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        print(report(results, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
