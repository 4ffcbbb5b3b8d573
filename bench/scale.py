"""Scaling past one process, side by side on the same machine and the same cores:

  jobs      jobs per minute through the job queue with 1 and 2 Ray workers (engine/ray_workers.py, a local Ray,
            CPU workers sharing the cores), after a warm-up job per worker (the model loaded in each)
  context   one video's denoise shared by N processes (context parallel, engine/parallel.py) vs one process

Each row is a fresh process with a Runner making the same tiny request twice: the first run loads the model (and
starts the helper processes, which load it too); the second is timed (its wall time and its denoise time per step). On
a CPU the N processes share the cores (each gets cores / N torch threads, so both rows use every core): context
parallel is expected to be slower here (two processes, all-to-all through gloo, each process holding all the
weights); the point is that the video is the same. Prints the CPU model, the cores, and whether each row's
latents equal the one-process row's bitwise (they do when each rank runs one thread: the same kernels).

    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/scale.py                # tiny-wan and the wider model
    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/scale.py --models tiny-wan --steps 10 --parts jobs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.overhead import cpu_model, folder, spawn  # noqa: E402


RUN = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from configs.schema import GenerationRequest
from engine.cache import PipelineCache
from engine.parallel import close_group
from engine.runner import Runner
torch.set_num_threads(int(sys.argv[5]))
model, degree, steps, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6]
size = 32 if model == "tiny-wan" else 64
runner = Runner(PipelineCache(max_size=1), outputs_dir=out)
runner.previews = False
req = GenerationRequest(model=model, task="t2v", prompt="a cat walks on the beach", frames=5, height=size,
                        width=size, steps=steps, seed=0, step_cache="off", context_parallel=degree)
t0 = time.perf_counter()
runner.generate(req)  # warm-up: loads (and starts the helpers)
t1 = time.perf_counter()
result = runner.generate(req)
t2 = time.perf_counter()
z = torch.load(result.latents_path, weights_only=False)["latents"]
import hashlib
close_group()
print("ROW " + json.dumps({"first_s": t1 - t0, "run_s": t2 - t1, "step_s": result.timings["denoise_s"] / steps,
                           "latents": hashlib.sha256(z.float().numpy().tobytes()).hexdigest()[:16]}))
'''


def generate(model: str, degree: int, threads: int, steps: int, out: Path) -> dict:
    """Two runs in a fresh process (the first loads the model and starts the helpers; the second is timed)."""
    out.mkdir(parents=True, exist_ok=True)
    wall, code, peak, stdout, stderr = spawn([sys.executable, "-c", RUN, str(ROOT), model, str(degree), str(steps),
                                              str(threads), str(out)], threads)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("ROW ")), None)
    if code != 0 or line is None:
        raise SystemExit(f"context_parallel={degree} failed: {stderr[-2000:]}")
    return {**json.loads(line[4:]), "peak": peak}


JOBS = r'''
import json, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from configs.schema import GenerationRequest
from engine.jobs import QUEUE_SUBDIR, JobQueue
from engine.ray_workers import start_workers, stop_workers
model, workers_n, steps, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
size = 32 if model == "tiny-wan" else 64
out = Path(tempfile.mkdtemp())
workers = start_workers("local", workers_n, out)
queue = JobQueue(out / QUEUE_SUBDIR, workers=workers)
queue.start()
def batch(n, first_seed):
    jobs = [queue.submit(GenerationRequest(model=model, task="t2v", prompt="a cat", frames=5, height=size, width=size,
                                           steps=steps, seed=first_seed + i, step_cache="off"), out / f"{first_seed + i}.mp4")
            for i in range(n)]
    for j in jobs:
        j.done.wait()
    assert all(j.state == "done" for j in jobs), [j.error for j in jobs]
    return jobs
batch(workers_n, 0)  # warm-up: each worker loads the model
t0 = time.perf_counter()
jobs = batch(count, 100)
elapsed = time.perf_counter() - t0
queue.close()
stop_workers(workers)
print("ROW " + json.dumps({"elapsed_s": elapsed, "per_min": count / elapsed * 60,
                           "workers_used": len({j.result.sidecar.worker["name"] for j in jobs})}))
'''


def jobs_per_minute(model: str, workers: int, steps: int, count: int) -> dict:
    wall, code, _, stdout, stderr = spawn([sys.executable, "-c", JOBS, str(ROOT), model, str(workers), str(steps),
                                           str(count)], max(1, (os.cpu_count() or 2) // workers))
    line = next((ln for ln in stdout.splitlines() if ln.startswith("ROW ")), None)
    if code != 0 or line is None:
        raise SystemExit(f"{workers} Ray workers failed: {stderr[-2000:]}")
    return json.loads(line[4:])


def jobs_rows(names: list[str], steps: int, count: int) -> None:
    print(f"{'model':<10} {'Ray workers':>11} {'jobs':>5} {'s':>7} {'jobs / min':>10} {'vs 1':>6} {'workers used':>12}")
    for name in names:
        model = str(folder()) if name == "wide" else name
        one = None
        for n in (1, 2):
            r = jobs_per_minute(model, n, steps, count)
            one = one or r
            print(f"{name:<10} {n:>11} {count:>5} {r['elapsed_s']:>7.1f} {r['per_min']:>10.1f} "
                  f"{r['per_min'] / one['per_min']:>6.2f} {r['workers_used']:>12}")


def context_rows(names: list[str], steps: int, cores: int) -> None:
    """One process vs two sharing the denoise: with the cores split between them, then one thread each."""
    out_dir = ROOT / ".cache" / "bench-scale"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'model':<10} {'processes':>9} {'threads each':>12} {'first run s':>11} {'run s':>7} {'s / step':>9} "
          f"{'vs 1':>6}  latents")
    for name in names:
        model = str(folder()) if name == "wide" else name
        rows = {}
        for degree in (1, 2):
            rows[degree] = r = generate(model, degree, max(1, cores // degree), steps, out_dir / f"{name}_{degree}")
            same = "reference" if degree == 1 else ("equal" if r["latents"] == rows[1]["latents"] else "differ")
            print(f"{name:<10} {degree:>9} {max(1, cores // degree):>12} {r['first_s']:>11.1f} {r['run_s']:>7.1f} "
                  f"{r['step_s']:>9.3f} {r['step_s'] / rows[1]['step_s']:>6.2f}  {same}")
        # one thread in every rank: the same kernels in both rows, so the latents must be bitwise equal
        one = {d: generate(model, d, 1, steps, out_dir / f"{name}_{d}_t1") for d in (1, 2)}
        ratio = one[2]["step_s"] / one[1]["step_s"]
        same = "equal" if one[1]["latents"] == one[2]["latents"] else "DIFFER"
        print(f"{name:<10} one thread per process: 1 -> {one[1]['step_s']:.3f} s/step, 2 -> {one[2]['step_s']:.3f} "
              f"s/step ({ratio:.2f}x); latents {same}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny-wan,wide", help="tiny-wan and/or wide (a 4-block Wan-14B-width folder)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--parts", default="jobs,context", help="jobs (Ray workers) and/or context (context parallel)")
    p.add_argument("--jobs", type=int, default=8, help="jobs timed per row (after one warm-up job per worker)")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}, {args.cores} cores; {args.steps} steps, 5 frames; fresh process per row")
    if "jobs" in args.parts:
        jobs_rows(args.models.split(","), args.steps, args.jobs)
    if "context" not in args.parts:
        return 0
    context_rows(args.models.split(","), args.steps, args.cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
