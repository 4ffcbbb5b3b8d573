"""What a LoRA costs per run on a loaded transformer (the `engine.lora.Loras` modifier: loaded before the run,
unloaded after it) next to reloading the transformer fresh.

Two full-width, reduced-depth transformers with random bf16 weights (built on the meta device and materialised
tensor by tensor, as bench/host_ram.py's `build_stack` does), saved with `save_pretrained` to a temp folder:

  cogvideox-2b   diffusers' `CogVideoXTransformer3DModel`, CogVideoX-2b config (30 heads x 64 = 1920 hidden),
                 `--blocks` of its 30 blocks (4 by default)
  wan2.1-1.3b    diffusers' `WanTransformer3DModel`, Wan 2.1 1.3B config (12 heads x 128 = 1536 hidden, ffn 8960,
                 text 4096, in/out 16), `--blocks` of its 30 blocks

Per model, side by side in one run:

  fresh reload   `from_pretrained(folder, torch_dtype=torch.bfloat16)`: what giving a run the base model back
                 would cost without adapters. "warm": the file's pages already in the page cache (every reload
                 after the first); "cold": the file's pages dropped first (fsync + POSIX_FADV_DONTNEED on that file
                 only). bf16 weights stay memory-mapped after `from_pretrained`, so a plain reload does not read
                 them all; the "+ touch" rows also read one element of every 4 KiB page of every weight (what the
                 first step would)
  LoRA cases     what the runner does around every run, on a minimal pipeline holding the already-loaded
                 transformer (`PipelineClass(transformer=model, everything else None)`, as tests/test_lora.py
                 builds one): `Loras(active).apply(pipe)` before the run (each LoRA file read, converted by the
                 family's diffusers loader and loaded into its own peft adapter `fv0`, `fv1`, ..., then
                 `set_adapters` with the strengths) and `remove(pipe)` after it (peft's `unload_lora`: the base
                 modules back, bitwise). Cases: LoRA A; LoRAs A and B at once; A at another strength (a strength
                 change between runs is no special case now: the next run's apply simply uses the new strength).
                 A and B are random rank-`--rank` peft-format LoRAs (tests/lora_files.py `make_lora`: Wan's
                 attention + ffn, CogVideoX's attention), different seeds. One untimed apply/remove goes first
                 (imports, first-call costs). `lora_file(path)` (what resolving a request does: reads the file
                 once for its signature, cached afterwards) is timed on its own, first call and cached.

Each case is the median of `--reps` runs (the fastest one shown too: the machine may be shared, and the load
average at the start and end is printed); apply and remove are timed within the same runs, and "apply + remove"
is the median of their per-run sums. Ratio = median case / median fresh reload. Then `--cycle` apply/remove
cycles (alternating A and B) with the RSS (VmRSS, RssAnon) before and after, and a check: one transformer forward
after the last remove equals the forward taken before any LoRA was loaded (torch.equal) while with A on it
differs, and no peft adapter or layer is left (`loaded_adapters(module) == []`). `--profile` prints the top
functions (cProfile, cumulative) of one apply + remove.

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
# name -> (transformer class, config, the pipeline class whose LoRA loader converts and loads the files)
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


def lora_rows(pipe, files: tuple, reps: int) -> list[tuple[str, float, list[float]]]:
    """Per-run LoRA costs on the pipeline's loaded transformer: `Loras(active).apply(pipe)` and `.remove(pipe)`, for
    A, A + B, and A at another strength (a strength change between runs: the next run's apply with it)."""
    from engine.lora import ActiveLora

    a, b = files
    run_once(pipe, (ActiveLora(a, (1.0,)),))  # warm-up: imports, peft's first-call costs
    rows = []
    for label, acts in (("LoRA A", (ActiveLora(a, (1.0,)),)),
                        ("LoRAs A + B", (ActiveLora(a, (1.0,)), ActiveLora(b, (1.0,)))),
                        ("LoRA A at 0.7 (strength change)", (ActiveLora(a, (0.7,)),))):
        gc.collect()
        runs = [run_once(pipe, acts) for _ in range(reps)]
        applies, removes = [r[0] for r in runs], [r[1] for r in runs]
        sums = [x + y for x, y in runs]
        if label == "LoRA A at 0.7 (strength change)":
            rows.append((f"{label}: apply + remove", statistics.median(sums), sums))
            continue
        rows += [(f"{label}: apply (load)", statistics.median(applies), applies),
                 (f"{label}: remove (unload_lora)", statistics.median(removes), removes),
                 (f"{label}: apply + remove (per run)", statistics.median(sums), sums)]
    return rows


def run_once(pipe, acts: tuple) -> tuple[float, float]:
    """What the runner does around one run: the `Loras` modifier applied, then removed; (apply s, remove s)."""
    from engine.lora import Loras

    mod = Loras(acts)
    t0 = time.perf_counter()
    mod.apply(pipe)
    t1 = time.perf_counter()
    mod.remove(pipe)
    return t1 - t0, time.perf_counter() - t1


def file_rows(paths: list[Path], reps: int) -> tuple[tuple, list[tuple[str, float, list[float]]]]:
    """`lora_file(path)` for A and B: the first call (reads and converts each file for its signature) and the
    cached one (what resolving every later request costs)."""
    from engine.lora import lora_file

    t0 = time.perf_counter()
    files = tuple(lora_file(str(p)) for p in paths)
    rows = [("lora_file(path), first call (x2, A and B)", time.perf_counter() - t0, [])]
    rows.append(("lora_file(path), cached (x2, A and B)",
                 *median_time(lambda: [lora_file(str(p)) for p in paths], reps)))
    return files, rows


def apply_cycle(pipe, files: tuple, n: int) -> str:
    """`n` runs' apply/remove, alternating A and B; the RSS before and after (adapters unloaded each time:
    nothing should pile up)."""
    from engine.lora import ActiveLora

    a, b = files
    run_once(pipe, (ActiveLora(a, (1.0,)),))
    gc.collect()
    rss0, anon0 = status_bytes("VmRSS"), status_bytes("RssAnon")
    t0 = time.perf_counter()
    for i in range(n):
        run_once(pipe, (ActiveLora(b if i % 2 == 0 else a, (1.0,)),))
    took = time.perf_counter() - t0
    gc.collect()
    rss1, anon1 = status_bytes("VmRSS"), status_bytes("RssAnon")
    mib = 2**20
    return (f"{n} apply/remove cycles (A, B alternating) in {took:.1f} s: VmRSS {rss0 / mib:.0f} -> "
            f"{rss1 / mib:.0f} MiB ({(rss1 - rss0) / mib:+.0f}), RssAnon {anon0 / mib:.0f} -> {anon1 / mib:.0f} MiB "
            f"({(anon1 - anon0) / mib:+.0f})")


def profile_run(pipe, files: tuple, top: int = 14) -> str:
    """cProfile of one apply + remove of A: the functions that cost it, cumulative."""
    import cProfile
    import io
    import pstats

    from engine.lora import ActiveLora

    prof = cProfile.Profile()
    prof.enable()
    run_once(pipe, (ActiveLora(files[0], (1.0,)),))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return "\n".join(ln for ln in out.getvalue().splitlines() if ln.strip())


def forward(model):
    """One transformer forward on fixed random bf16 inputs (tests/lora_files.py's `forward`)."""
    import torch
    from tests.lora_files import forward as forward_in

    return forward_in(model, torch.bfloat16)


# --------------------------------------------------------------------------- one model


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Build, save, time the reloads and the LoRA cases of one model; what the report prints."""
    import diffusers
    import torch

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
    base = forward(model)  # before any LoRA touched the model
    pipe = pipe_cls(tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=None)
    paths = [make_lora(model, work / f"{name}-{x}.safetensors", fmt="peft", rank=args.rank, seed=seed)
             for x, seed in (("A", 1), ("B", 2))]
    files, frows = file_rows(paths, args.reps)
    rows += frows
    rows += lora_rows(pipe, files, args.reps)
    result = dict(name=name, params=params, file_bytes=file_bytes, build_s=build_s, rows=rows,
                  lora_params=files[0].signature.params, lora_bytes=paths[0].stat().st_size,
                  shape=_shape(name, config, args.blocks))
    if args.cycle:
        result["cycle"] = apply_cycle(pipe, files, args.cycle)
    if args.profile:
        result["profile"] = profile_run(pipe, files)
    result["adapter_check"] = _adapter_check(pipe, model, files, base)
    del pipe, model
    gc.collect()
    return result


def _shape(name: str, config: dict, blocks: int) -> str:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config.get("ffn_dim", 4 * width)
    return (f"{name}: {config['num_attention_heads']} heads x {config['attention_head_dim']} = {width} hidden, "
            f"ffn {ffn}, {blocks} blocks")


def _adapter_check(pipe, model, files: tuple, base) -> str:
    """That the cases did what they say: after every apply/remove above, the forward equals the one taken before
    any LoRA was loaded (bitwise) and no adapter or peft layer is left; with A and B on, both adapters are there
    and the forward differs (the check can fail); after removing them, bitwise again."""
    import torch

    from engine.lora import ActiveLora, Loras, loaded_adapters

    a, b = files
    after_cycles = torch.equal(forward(model), base)
    mod = Loras((ActiveLora(a, (1.0,)), ActiveLora(b, (0.8,))))
    mod.apply(pipe)
    during, with_lora = loaded_adapters(model), forward(model)
    mod.remove(pipe)
    after = forward(model)
    left = loaded_adapters(model)
    peft_layers = sum(1 for m in model.modules() if "lora" in type(m).__module__.lower())
    equal, differs = torch.equal(after, base), not torch.equal(with_lora, base)
    ok = after_cycles and equal and differs and during == ["fv0", "fv1"] and left == [] and peft_layers == 0
    return (f"forward after all the cycles == base forward: {after_cycles}; with A + B on: adapters {during}, "
            f"forward differs: {differs} (max |diff| {(with_lora.float() - base.float()).abs().max().item():.3g}); "
            f"after remove: torch.equal(forward, base) {equal}, loaded_adapters {left}, peft layers {peft_layers}; "
            f"{'ok' if ok else 'WRONG'}")


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
            lines += ["", f"{r['name']}: cProfile of one apply + remove of A (cumulative)", r["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--blocks", type=int, default=4, help="transformer blocks of the 30")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cycle", type=int, default=20,
                   help="apply/remove cycles (A, B alternating) with RSS before/after (0: skip)")
    p.add_argument("--profile", action="store_true", help="cProfile one apply + remove per model")
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
