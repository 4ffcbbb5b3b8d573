"""A run's video depends on its request alone (tests/history.py): seeded sequences of requests through one runner
and through one served app (gradio_client) each give what a fresh process gives for the same request alone, the
cached pipelines are left as they were loaded after every run, and every tab takes every preset and step cache in
sequence on one server. On a difference the shortest sequence that reproduces it is printed."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from history import Case, describe, draw, fresh_outcomes, make_world, outcome_of, run_case, shrink

SEED = 20261207
# The sequences the issue found, first: a step cache left on a transformer T2V and V2V share; the same for three
# CogVideoX pipelines and two offload rungs; MagCache at 7 then 6 steps (ratios calibrated by whichever came first).
TARGETED = [
    ("tiny-wan", "t2v", {"preset": "fast"}), ("tiny-wan", "v2v", {"preset": "balanced"}),
    ("tiny-cogvideox", "t2v", {"preset": "fast"}), ("tiny-cogvideox", "i2v", {"preset": "fast"}),
    ("tiny-cogvideox", "v2v", {"preset": "fast"}),
    ("tiny-cogvideox", "t2v", {"preset": "fast", "step_cache": "taylorseer", "offload": "model"}),
    ("tiny-cogvideox", "v2v", {"step_cache": "taylorseer", "offload": "sequential"}),
    ("tiny-cogvideox", "i2v", {"step_cache": "magcache", "offload": "group", "steps": 7}),
    ("tiny-cogvideox", "i2v", {"step_cache": "magcache", "offload": "group", "steps": 6}),
]


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """LoRA files for both families, an input image and video, and the environment a fresh process needs."""
    root = tmp_path_factory.mktemp("history")
    inputs, env = make_world(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("FITVIDEO_LORAS_DIR", env["FITVIDEO_LORAS_DIR"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fresh processes run on one thread: the same kernels, the same sums
    yield {"root": root, "inputs": inputs, "env": env}
    torch.set_num_threads(threads)
    mp.undo()


def targeted(inputs: dict) -> list[Case]:
    cases = []
    for i, (model, task, extra) in enumerate(TARGETED):
        fields = dict(model=model, task=task, prompt="a red car on a street", frames=9, height=32, width=32,
                      steps=4, seed=100 + i, loras=())
        fields.update(extra)
        if task == "i2v":
            fields["image"] = inputs["image"]
        if task == "v2v":
            fields.update(video=inputs["video"], strength=0.7)
        cases.append(Case(fields))
    return cases


def new_runner(folder: Path):
    from engine.cache import PipelineCache
    from engine.runner import Runner

    runner = Runner(PipelineCache(max_size=2), outputs_dir=folder)
    runner.previews = False
    return runner


def check_against_fresh(cases, outcomes, fresh, folder: Path) -> None:
    """Every outcome equals the fresh one and left nothing on the model; else the shortest reproducing sequence."""
    for i, (got, want) in enumerate(zip(outcomes, fresh)):
        assert got.leftovers == (), f"run {i + 1} left this on a cached pipeline: {got.leftovers}\n{describe(cases[:i + 1])}"
        if got == want:
            continue

        def reproduces(seq: list[Case]) -> bool:
            runner = new_runner(folder / f"shrink{random.randrange(10**9)}")
            return [run_case(runner, c, runner.outputs_dir / f"{j}.mp4") for j, c in enumerate(seq)][-1] != want

        shortest = shrink(cases[:i + 1], reproduces)
        raise AssertionError(f"run {i + 1} differs from a fresh process ({got} vs {want}); the shortest sequence "
                             f"that reproduces it:\n{describe(shortest)}")


def test_forty_runs_through_one_runner_equal_a_fresh_process_each(world):
    cases = targeted(world["inputs"]) + draw(random.Random(SEED), 40, world["inputs"])
    folder = world["root"] / "runner"
    runner = new_runner(folder)
    outcomes = [run_case(runner, c, folder / f"{i}.mp4") for i, c in enumerate(cases)]
    fresh = fresh_outcomes(cases, world["root"] / "fresh", world["env"])
    statuses = [o.status for o in outcomes]
    # the generator reaches every kind of outcome (refusals: step caches a model or task does not take)
    assert {"done", "stopped", "refused"} <= set(statuses), statuses
    assert sum(s == "done" for s in statuses) >= 25, statuses
    assert any(c.fault.startswith("oom") and o.status == "done" for c, o in zip(cases, outcomes))
    check_against_fresh(cases, outcomes, fresh, folder)


# --------------------------------------------------------------------------- through a served app


@pytest.fixture(scope="module")
def served(world):
    import app

    runner = new_runner(world["root"] / "served")
    ui = app.build_app(runner, queue_size=4)
    url = app.serve(ui, max_file_size="5mb")
    yield ui, url
    ui.demo.close()


def api_call(client, runner, case: Case, outputs: Path):
    """One case through the API (Stop is the runner test's; a forced out-of-memory is set on the server's runner)."""
    import threading

    from gradio_client import handle_file
    from history import fault_hook

    from engine.results import latents_path

    f = {k: v for k, v in case.fields.items() if k not in ("task", "height", "width")}
    f["resolution"] = f"{case.fields['height']}x{case.fields['width']}"
    f["loras"] = [list(row) for row in f["loras"]]
    for name in ("image", "video"):
        if name in f:
            f[name] = handle_file(f[name])
    runner.fault_hook = fault_hook(case, threading.Event()) if case.fault else None
    runner.ladder_backend = "cuda" if case.fault else None
    try:
        video, seed, info, job = client.predict(**f, api_name=f"/{case.fields['task']}")
    except Exception as exc:  # noqa: BLE001  (a refusal reaches the client as the app's error text)
        return str(exc)
    finally:
        runner.fault_hook = runner.ladder_backend = None
    assert job and f"job `{job}`" in info
    return outcome_of(Path(video), latents_path(outputs / Path(video).name), tuple(runner.last_leftovers))


def test_fifteen_api_runs_on_one_server_equal_a_fresh_process_each(world, served):
    from gradio_client import Client

    ui, url = served
    client, runner = Client(url, verbose=False), ui.ctx.runner
    rng = random.Random(SEED + 1)
    cases = [c if not c.fault.startswith("stop") else Case(c.fields) for c in draw(rng, 15, world["inputs"])]
    outcomes = [api_call(client, runner, c, runner.outputs_dir) for c in cases]
    fresh = fresh_outcomes(cases, world["root"] / "fresh_api", world["env"])
    for i, (got, want) in enumerate(zip(outcomes, fresh)):
        if want.status == "done":
            assert got == want and got.leftovers == (), f"API run {i + 1}: {got} vs {want}\n{describe(cases[:i + 1])}"
        else:  # refused / failed: the same words reach the client
            assert isinstance(got, str) and want.message in got, f"API run {i + 1}: {got!r} vs {want}"


def test_every_tab_takes_every_preset_and_step_cache_in_sequence_on_one_server(world, served):
    """The client matrix: each tab with each preset, then each step cache (refused, with the reason, where the model
    or task does not take it); nothing one run does breaks the next."""
    from gradio_client import Client, handle_file

    from configs.registry import get_model_spec
    from engine.stepcache import STEP_CACHES, support

    ui, url = served
    client = Client(url, verbose=False)
    done = refused = expected_refusals = 0
    for task, model in (("t2v", "tiny-wan"), ("i2v", "tiny-cogvideox"), ("v2v", "tiny-wan"), ("t2v", "tiny-cogvideox"),
                        ("v2v", "tiny-cogvideox"), ("i2v", "tiny-wan-moe")):
        inputs = {"image": handle_file(world["inputs"]["image"])} if task == "i2v" else \
            {"video": handle_file(world["inputs"]["video"])} if task == "v2v" else {}
        allowed = support(get_model_spec(model), task)
        expected_refusals += sum(bool(reason) for reason in allowed.values())
        runs = [("fast", None), ("balanced", None), ("quality", None)] + [("balanced", c) for c in STEP_CACHES[1:]]
        for preset, cache in runs:
            kw = dict(model=model, prompt="a cat", steps=3, frames=9, resolution="32x32", preset=preset,
                      step_cache=cache, **inputs)
            if cache is not None and allowed[cache]:
                with pytest.raises(Exception, match=f"step cache '{cache}' does not apply"):
                    client.predict(**kw, api_name=f"/{task}")
                refused += 1
                continue
            video, _, info, job = client.predict(**kw, api_name=f"/{task}")
            assert Path(video).is_file() and job, (task, model, preset, cache, info)
            assert ui.ctx.runner.last_leftovers == [], (task, model, preset, cache)
            done += 1
    # every combination ran or was refused, as the support table says (13 refusals: Wan's PAB / FasterCache, its V2V,
    # tiny CogVideoX's single block for first-block, MagCache on two experts)
    assert (done, refused) == (6 * 8 - expected_refusals, expected_refusals) and refused >= 10, (done, refused)
