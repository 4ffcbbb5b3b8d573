"""What FitVideo's engine costs on top of the diffusers call a person would write for the same job.

Both run in fresh processes, alternating, on a local folder with a wider random-weight model (tests' wan_pipeline:
a 4-block Wan-14B-width transformer, 3.05 GiB of bf16 weights, a tiny VAE and text encoder), 5 frames at 64x64,
4 steps, seed 0, on the CPU:

  ours   `python app.py generate --model FOLDER ...` (resolve, plan, the pipeline cache, modifiers on and off, the
         run's memory sampler, latents saved before the decode, the streaming decode into the mp4, the sidecar)
  raw    `WanPipeline.from_pretrained(FOLDER, torch_dtype=bfloat16)`, `pipe(..., output_type="latent")`, the VAE's
         own decode, `export_to_video`: what the diffusers docs show, with the same settings as ours (the balanced
         preset's guidance 6.0, and the text length the folder's tokenizer holds: 32 tokens; diffusers' default
         of 512 would pad the prompt to 512 tokens and be another job)

Prints the median wall time of each (imports included: a person waits for them too), the ratio, each process's
peak RSS, that the latents are bitwise equal, and where our extra time goes (from our sidecar's timings and the
phases around them).

    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/overhead.py            # 3 pairs
    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/overhead.py --pairs 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE, STEPS = 5, 64, 4
RAW = r'''
import sys, time, json
t0 = time.perf_counter()
import torch
from diffusers import WanPipeline
from diffusers.utils import export_to_video
torch.set_num_threads(int(sys.argv[4]))
t1 = time.perf_counter()
pipe = WanPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
t2 = time.perf_counter()
with torch.inference_mode():
    latents = pipe(prompt="a cat walks on the beach", num_frames=%d, height=%d, width=%d, num_inference_steps=%d,
                   guidance_scale=6.0, max_sequence_length=pipe.tokenizer.model_max_length,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="latent").frames
    t3 = time.perf_counter()
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.dtype)
    z = latents * std + mean
    video = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
export_to_video(frames, sys.argv[2], fps=16)
t4 = time.perf_counter()
torch.save(z, sys.argv[3])
print("RAW " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "denoise_s": t3 - t2, "decode_s": t4 - t3}))
''' % (FRAMES, SIZE, SIZE, STEPS)


def spawn(cmd: list[str], threads: int) -> tuple[float, int, int, str, str]:
    """Run `cmd` in a fresh process: (wall s, exit code, its own peak RSS in bytes, stdout, stderr). The peak is the
    kernel's for that one child (`os.wait4`'s ru_maxrss), not the largest of all children so far."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return wall, proc.returncode, usage.ru_maxrss * 1024, out.read(), err.read()


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def folder() -> Path:
    """The wider model: tests/conftest.py's wan_pipeline folder (built here the same way when missing)."""
    f = ROOT / ".cache" / "wan14b-pipeline-4"
    if not (f / "done").is_file():
        sys.path.insert(0, str(ROOT))
        from bench.host_ram import build_pipeline

        (f / "done").parent.mkdir(parents=True, exist_ok=True)
        (f / "done").write_text(str(build_pipeline(f, 4)))
    return f


def run_ours(model: Path, out: Path, threads: int) -> tuple[float, int, dict]:
    cmd = [sys.executable, str(ROOT / "app.py"), "generate", "--model", str(model), "--prompt", "a cat walks on the beach",
           "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS), "--seed", "0",
           "--out", str(out), "--progress", "off"]
    wall, code, peak, _, stderr = spawn(cmd, threads)
    if code != 0:
        raise SystemExit(f"app.py generate failed: {stderr[-2000:]}")
    return wall, peak, json.loads(out.with_suffix(".json").read_text())


def run_raw(model: Path, out: Path, threads: int) -> tuple[float, int, dict]:
    wall, code, peak, stdout, stderr = spawn(
        [sys.executable, "-c", RAW, str(model), str(out), str(out.with_suffix(".pt")), str(threads)], threads)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RAW ")), None)
    if code != 0 or line is None:
        raise SystemExit(f"the raw diffusers run failed: {stderr[-2000:]}")
    return wall, peak, json.loads(line[4:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    import torch

    model, work = folder(), Path(tempfile.mkdtemp(prefix="fitvideo-overhead-"))
    os.environ.setdefault("FITVIDEO_HOME", str(work / "home"))
    ours, raw, sidecar, raw_phases, peaks = [], [], {}, {}, {"ours": [], "raw": []}
    run_ours(model, work / "warm.mp4", args.threads)  # the file's pages in the page cache for both, alike
    for i in range(args.pairs):
        wall, peak, sidecar = run_ours(model, work / f"ours{i}.mp4", args.threads)
        ours.append(wall), peaks["ours"].append(peak)
        wall, peak, raw_phases = run_raw(model, work / f"raw{i}.mp4", args.threads)
        raw.append(wall), peaks["raw"].append(peak)
        print(f"pair {i + 1}: ours {ours[-1]:.2f} s, raw {raw[-1]:.2f} s", file=sys.stderr, flush=True)
    z_ours = torch.load(work / f"ours{args.pairs - 1}.latents.pt", weights_only=False)["latents"]
    z_raw = torch.load(work / f"raw{args.pairs - 1}.pt", weights_only=False)
    mo, mr = statistics.median(ours), statistics.median(raw)
    t = sidecar["timings"]
    print(f"CPU: {cpu_model()}; {args.threads} threads; {model.name}: 4 blocks at Wan 14B width (3.05 GiB bf16), "
          f"{FRAMES} frames {SIZE}x{SIZE}, {STEPS} steps; median of {args.pairs} pairs, fresh processes")
    print(f"| | wall s | ratio |\n|---|---|---|\n| raw diffusers | {mr:.2f} | 1.00 |\n| app.py generate | {mo:.2f} | "
          f"{mo / mr:.3f} |")
    ratios = sorted(o / r for o, r in zip(ours, raw))
    print(f"per-pair ratios: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    po, pr = (statistics.median(peaks[k]) / 2**30 for k in ("ours", "raw"))
    print(f"peak RSS (median, the process's own): ours {po:.2f} GiB, raw {pr:.2f} GiB, ratio {po / pr:.3f}")
    print(f"latents bitwise equal: {torch.equal(z_ours.to(z_raw.dtype), z_raw)} "
          f"(max |diff| {(z_ours.float() - z_raw.float()).abs().max().item():.3g})")
    print("raw phases (last pair): " + ", ".join(f"{k} {v:.2f} s" for k, v in raw_phases.items()))
    inside = t.get("total_s", 0.0)
    print(f"ours (last pair): load {t.get('load_s', 0):.2f} s, denoise {t.get('denoise_s', 0):.2f} s, decode "
          f"{t.get('decode_s', 0):.2f} s, run total {inside:.2f} s; outside the run (imports, resolve, plan, sidecar "
          f"write): {ours[-1] - inside:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
