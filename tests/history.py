"""History independence: a seeded generator of request sequences, a way to run one case, and a fresh process per
case to compare with. Used by tests/test_history.py and bench/sequence.py.

The property (DESIGN.md): a run's output depends on its request alone, never on what ran before in the same
server. A case is a request plus what happens to it (a Stop at a denoising step, an out-of-memory forced at a
stage); its outcome (done with its latents and frames, stopped, refused or failed with its message) must be the
same whether it runs after any other cases through one runner, or alone in a new process with an empty
FitVideo home (no MagCache ratios, nothing cached).

The generator leans toward consecutive runs that share components (the same model with another task, preset,
step cache, LoRAs, offload rung, precision or attention backend), where modifiers left behind would show.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

MODELS = {"tiny-cogvideox": ("t2v", "i2v", "v2v"), "tiny-wan": ("t2v", "i2v", "v2v"), "tiny-wan-moe": ("t2v", "i2v")}
STEP_CACHES = (None, "off", "first-block", "taylorseer", "magcache", "pab", "fastercache", "taylorseer:2",
               "first-block:0.2")
OFFLOADS = ("auto", "none", "model", "group", "sequential")
QUANTS = ("none", "int8", "fp8-storage")
LORAS = {"cogvideox": ("cog_a", "cog_b"), "wan": ("wan_a", "wan_b")}
FAULTS = ("", "", "", "", "", "", "", "", "stop@2", "oom@decoding:1", "oom@denoising:1")


@dataclass(frozen=True)
class Case:
    """One request (GenerationRequest fields) and what happens to it: "" (nothing), "stop@K" (Stop pressed at
    denoising step K), "oom@STAGE:K" (one out-of-memory error at that stage's K-th step or chunk)."""

    fields: dict
    fault: str = ""

    def short(self) -> str:
        f = self.fields
        mods = [f"{k}={f[k]}" for k in ("preset", "step_cache", "offload", "quant", "attention") if f.get(k)]
        loras = ",".join(f"{n}:{s}" for n, s, _ in f.get("loras", ()))
        return (f"{f['model']} {f['task']} seed {f['seed']} steps {f['steps']} {' '.join(mods)}"
                f"{' loras ' + loras if loras else ''}{' FAULT ' + self.fault if self.fault else ''}")


@dataclass(frozen=True)
class Outcome:
    status: str  # done / stopped / refused / failed
    message: str = ""
    latents: str = ""  # sha256 of the saved latents tensor's bytes
    frames: str = ""  # sha256 of the decoded video's frames
    count: int = 0
    leftovers: tuple[str, ...] = field(default=(), compare=False)  # what the run left on the model (must be none)


def draw(rng: random.Random, n: int, inputs: dict[str, str]) -> list[Case]:
    """`n` cases; after the first, 3 in 4 keep the previous case's model (another task or other modifiers)."""
    cases: list[Case] = []
    for _ in range(n):
        model = cases[-1].fields["model"] if cases and rng.random() < 0.75 else rng.choice(list(MODELS))
        cases.append(Case(_fields(rng, model, inputs), rng.choice(FAULTS)))
    return cases


def _fields(rng: random.Random, model: str, inputs: dict[str, str]) -> dict:
    task = rng.choice(MODELS[model])
    family = "cogvideox" if "cogvideox" in model else "wan"
    frames = 9 if family == "cogvideox" else rng.choice((5, 9))
    names = rng.sample(LORAS[family], rng.choice((0, 0, 1, 2)))
    fields = dict(model=model, task=task, prompt=rng.choice(("a red car on a street", "a cat walks on the beach")),
                  frames=frames, height=32, width=32, steps=rng.choice((2, 3, 4)), seed=rng.randrange(1000),
                  preset=rng.choice(("fast", "balanced", "quality")), step_cache=rng.choice(STEP_CACHES),
                  offload=rng.choice(OFFLOADS), quant=rng.choice(QUANTS), attention=rng.choice(("auto", "native")),
                  loras=tuple((nm, rng.choice((0.0, 0.5, 1.0)), None) for nm in names))
    if rng.random() < 0.3:
        fields["guidance"] = 3.0
    if task == "i2v":
        fields["image"] = inputs["image"]
    if task == "v2v":
        fields.update(video=inputs["video"], strength=rng.choice((0.5, 0.8)))
    return fields


def make_world(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What the cases use: two random LoRAs per family in `folder`/loras, an input image and an input video.
    Returns (inputs for `draw`, the environment a process needs to find the LoRAs)."""
    import numpy as np
    from lora_files import make_lora
    from PIL import Image

    from decode.writer import VideoWriter
    from engine.loaders import load_pipeline

    loras = folder / "loras"
    for model, names, first_seed in (("tiny-wan", LORAS["wan"], 1), ("tiny-cogvideox", LORAS["cogvideox"], 3)):
        transformer = load_pipeline(model, "t2v").transformer
        for i, name in enumerate(names):
            make_lora(transformer, loras / f"{name}.safetensors", seed=first_seed + i, scale=0.5)
    image, video = folder / "in.png", folder / "in.mp4"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(image)
    t, y, x = np.arange(9)[:, None, None, None], np.arange(32)[None, :, None, None], np.arange(32)[None, None, :, None]
    with VideoWriter(video, fps=8) as w:
        w.write(((x * 8 + y * 4 + t * 20 + np.arange(3) * 60) % 256).astype("uint8"))
    return {"image": str(image), "video": str(video)}, {"FITVIDEO_LORAS_DIR": str(loras)}


def request_of(case: Case):
    from configs.schema import GenerationRequest, LoraChoice

    f = dict(case.fields)
    f["loras"] = tuple(LoraChoice(*row) for row in f.get("loras", ()))
    return GenerationRequest(**f)


# --------------------------------------------------------------------------- running one case


def fault_hook(case: Case, stop: threading.Event):
    """The runner's fault hook for a case (Stop pressed at a step, or one injected out-of-memory)."""
    import torch

    kind, _, where = case.fault.partition("@")
    fired: list[bool] = []

    def hook(stage: str, index: int) -> None:
        if kind == "stop" and stage == "denoising" and index == int(where):
            stop.set()
        elif kind == "oom" and not fired and (stage, index) == (where.split(":")[0], int(where.split(":")[1])):
            fired.append(True)
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {stage} {index})")

    return hook


def run_case(runner, case: Case, out: Path) -> Outcome:
    """One case through `runner`; its outcome. Forced out-of-memory errors walk the GPU ladder (its offload rungs
    run on the CPU too), as they would on a GPU."""
    from configs.schema import RequestError
    from engine.runner import Cancelled, RunFailed

    stop = threading.Event()
    runner.fault_hook = fault_hook(case, stop) if case.fault else None
    runner.ladder_backend = "cuda" if case.fault.startswith("oom") else None
    try:
        result = runner.generate(request_of(case), out_path=out, stop=stop)
    except Cancelled:
        return Outcome("stopped", leftovers=tuple(runner.last_leftovers))
    except RequestError as exc:
        return Outcome("refused", str(exc), leftovers=tuple(runner.last_leftovers))
    except RunFailed as exc:
        return Outcome("failed", str(exc), leftovers=tuple(runner.last_leftovers))
    finally:
        runner.fault_hook, runner.ladder_backend = None, None
    return outcome_of(result.video_path, result.latents_path, tuple(runner.last_leftovers))


def outcome_of(video: Path, latents: Path, leftovers: tuple[str, ...] = ()) -> Outcome:
    import numpy as np
    import torch
    from conftest import read_video

    z = torch.load(latents, weights_only=False)["latents"]
    frames = read_video(video)
    return Outcome("done", latents=hashlib.sha256(z.float().numpy().tobytes()).hexdigest()[:16],
                   frames=hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()[:16],
                   count=int(frames.shape[0]), leftovers=leftovers)


# --------------------------------------------------------------------------- a fresh process per case


def _fresh_child(case_json: str, out: str, env: dict) -> dict:
    """In a process of its own (forked from a server that only imported the modules): a new runner with an empty
    home of its own (the tiny models linked in), one case, its outcome."""
    import torch

    os.environ.update(env)
    torch.set_num_threads(1)
    home = Path(out).parent / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "tiny").symlink_to(Path(env["FITVIDEO_SHARED_HOME"]) / "tiny")
    os.environ["FITVIDEO_HOME"] = str(home)
    from engine.cache import PipelineCache
    from engine.runner import Runner

    runner = Runner(PipelineCache(max_size=1), outputs_dir=Path(out).parent)
    runner.previews = False
    return dataclasses.asdict(run_case(runner, Case(**json.loads(case_json)), Path(out)))


def fresh_outcomes(cases: list[Case], folder: Path, env: dict, workers: int = 2) -> list[Outcome]:
    """Each case alone in a new process (multiprocessing's forkserver, the modules preloaded once; one task per
    process). `env`: environment for the children (the LoRA folder)."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "diffusers", "engine.runner", "history"])
    child_env = {**env, "FITVIDEO_SHARED_HOME": os.environ["FITVIDEO_HOME"]}
    jobs = [(json.dumps(dataclasses.asdict(c)), str(folder / f"fresh{i}" / "v.mp4"), child_env)
            for i, c in enumerate(cases)]
    for _, out, _ in jobs:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        rows = pool.starmap(_fresh_child, jobs)
    return [Outcome(**{**r, "leftovers": tuple(r["leftovers"])}) for r in rows]


# --------------------------------------------------------------------------- the shortest failing sequence


def shrink(cases: list[Case], reproduces) -> list[Case]:
    """The shortest sub-sequence ending with the last case that still `reproduces` (delta debugging on the cases
    before it: drop halves, then quarters, ... then single cases, while the failure stays)."""
    last, before = cases[-1], list(cases[:-1])
    chunk = max(1, len(before) // 2)
    while before and chunk >= 1:
        i, changed = 0, False
        while i < len(before):
            trial = before[:i] + before[i + chunk:]
            if reproduces(trial + [last]):
                before, changed = trial, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return before + [last]


def describe(cases: list[Case]) -> str:
    return "\n".join(f"  {i + 1}. {c.short()}" for i, c in enumerate(cases))
