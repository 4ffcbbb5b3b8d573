"""A long server life: N seeded requests (tests/history.py's generator: three tiny models, every task, preset, step
cache, LoRA set, offload rung the CPU runs, precision, attention backend, Stops and forced out-of-memory step-downs)
through one runner, then each alone in a fresh process.

Prints the runner's RSS after run 1, 100 and N (the ratio to run 1 must stay <= 1.02: memory comes back after every
run) and how many outcomes differ from the fresh process's (must be 0: a run depends on its request alone), with the
shortest sequence that reproduces a difference.

    python bench/sequence.py               # 500 runs (about 20 minutes on 2 cores)
    python bench/sequence.py --runs 100    # quicker
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("FITVIDEO_HOME", str(ROOT / ".cache" / "bench-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def setup(folder: Path) -> tuple[dict, dict]:
    """The tiny models, LoRA files and input media (tests/history.py `make_world`, as the test makes them)."""
    from history import make_world

    from engine.tiny import TINY_NAMES, ensure_tiny_model

    for name in TINY_NAMES:
        ensure_tiny_model(name)
    inputs, env = make_world(folder)
    os.environ.update(env)
    return inputs, env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--warmup", type=int, default=40, help="uncounted runs first (another seed)")
    args = ap.parse_args()
    import psutil
    import torch
    from history import describe, draw, fresh_outcomes, run_case, shrink

    from engine.cache import PipelineCache
    from engine.runner import Runner
    from vram_utils import release_memory

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="fitvideo-sequence-"))
    inputs, env = setup(folder)
    cases = draw(random.Random(args.seed), args.runs, inputs)
    runner = Runner(PipelineCache(max_size=2), outputs_dir=folder / "runner")
    runner.previews = False
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; torch threads 1; {args.runs} runs, seed {args.seed}")
    # Warm-up, not counted: a server's first runs import and initialise what later runs reuse (torchao's int8 and
    # fp8 paths, peft, the LoRA converters, ffmpeg): RSS grows by about 15 MiB over them, once. Run 1 is measured
    # after this, so the ratio says whether memory grows with the number of runs.
    for i, case in enumerate(draw(random.Random(args.seed + 1), args.warmup, inputs)):
        run_case(runner, case, folder / "warmup" / f"{i}.mp4")
    outcomes, rss, t0 = [], {}, time.perf_counter()
    for i, case in enumerate(cases, 1):
        outcomes.append(run_case(runner, case, folder / "runner" / f"{i}.mp4"))
        for f in (folder / "runner").glob(f"{i}.*"):
            f.unlink()  # the videos are hashed: keep the disk flat too
        if i in (1, 100, args.runs):
            release_memory()
            rss[i] = psutil.Process().memory_info().rss
            print(f"after run {i:4d}: RSS {rss[i] / 2**20:7.1f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    fresh = fresh_outcomes(cases, folder / "fresh", env)
    differ = [i for i, (a, b) in enumerate(zip(outcomes, fresh)) if a != b]
    left = [i for i, o in enumerate(outcomes) if o.leftovers]
    statuses = {s: sum(o.status == s for o in outcomes) for s in ("done", "stopped", "refused", "failed")}
    print(f"outcomes: {statuses}")
    print(f"RSS ratio run {args.runs} / run 1: {rss[args.runs] / rss[1]:.3f} (target <= 1.02); "
          f"run 100 / run 1: {rss[min(100, args.runs)] / rss[1]:.3f}")
    print(f"differ from a fresh process: {len(differ)} of {args.runs}; left something on the model: {len(left)}")
    if differ:
        i = differ[0]

        def reproduces(seq):
            r = Runner(PipelineCache(max_size=2), outputs_dir=folder / f"shrink{random.randrange(10**9)}")
            return [run_case(r, c, r.outputs_dir / f"{j}.mp4") for j, c in enumerate(seq)][-1] != fresh[i]

        print(f"first difference, run {i + 1}: {outcomes[i]} vs {fresh[i]}; shortest sequence:")
        print(describe(shrink(cases[:i + 1], reproduces)))
    return 1 if differ or left or rss[args.runs] > 1.02 * rss[1] else 0


if __name__ == "__main__":
    sys.exit(main())
