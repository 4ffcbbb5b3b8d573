"""One video's denoise shared by two processes (engine/parallel.py, diffusers' context parallel over gloo on the CPU):
the same video as one process, bitwise, for tiny Wan T2V and I2V; Stop ends every rank at the same step; the
refusals name the reason; nothing is left on the cached model."""
from __future__ import annotations

import threading

import pytest

BASE = dict(model="tiny-wan", prompt="a red car on a street", frames=9, height=32, width=32, steps=3, seed=4,
            preset="balanced")


@pytest.fixture(scope="module")
def cp_runner(tiny_models, tmp_path_factory):
    import torch

    from engine.cache import PipelineCache
    from engine.parallel import close_group
    from engine.runner import Runner

    # One torch thread in every rank (the helpers take rank 0's count): a kernel's blocking, and so its sums, can
    # change with the thread count and the rows it gets (half the tokens here), bitwise equality needs the same
    # kernels. With more threads the frames are still equal; the latents differ in the last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = Runner(PipelineCache(max_size=2), outputs_dir=tmp_path_factory.mktemp("cp"))
    runner.previews = False
    yield runner
    close_group()
    torch.set_num_threads(threads)


def _outcome(runner, sample_image, task: str, **extra):
    from history import Case, run_case

    fields = dict(BASE, task=task, **extra)
    if task == "i2v":
        fields["image"] = str(sample_image)
    return run_case(runner, Case(fields), runner.outputs_dir / f"{task}_{len(list(runner.outputs_dir.glob('*.mp4')))}.mp4")


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_two_processes_give_the_one_process_video_bitwise_and_leave_nothing(cp_runner, sample_image, task):
    from engine import parallel

    alone = _outcome(cp_runner, sample_image, task)
    shared = _outcome(cp_runner, sample_image, task, context_parallel=2)
    assert alone.status == shared.status == "done", (alone, shared)
    assert (shared.latents, shared.frames, shared.count) == (alone.latents, alone.frames, 9)
    assert shared.leftovers == () and cp_runner.last_leftovers == []  # diffusers' cp hooks and configs are off
    helpers = [p.pid for p in parallel._GROUP.processes]
    again = _outcome(cp_runner, sample_image, task, context_parallel=2)
    assert again == alone and [p.pid for p in parallel._GROUP.processes] == helpers  # the same helpers, kept
    assert _outcome(cp_runner, sample_image, task) == alone  # and a one-process run after them is unchanged


def test_stop_ends_every_rank_at_the_same_step_and_the_next_run_is_whole(cp_runner, sample_image):
    from configs.schema import GenerationRequest
    from engine import parallel
    from engine.runner import Cancelled

    stop, seen = threading.Event(), []

    def on_progress(event):
        if event.stage == "denoising":
            seen.append(event.step)
            if event.step == 2:
                stop.set()

    request = GenerationRequest(task="t2v", **dict(BASE, steps=6), context_parallel=2)
    with pytest.raises(Cancelled):
        cp_runner.generate(request, on_progress=on_progress, stop=stop)
    assert seen == [1, 2] and parallel._GROUP.alive()
    assert cp_runner.last_leftovers == []
    alone = _outcome(cp_runner, sample_image, "t2v")
    assert _outcome(cp_runner, sample_image, "t2v", context_parallel=2) == alone


def test_what_cannot_be_shared_is_refused_with_the_reason(tiny_models):
    from configs.schema import GenerationRequest, RequestError
    from engine.resolve import resolve

    def refused(**fields) -> str:
        with pytest.raises(RequestError) as info:
            resolve(GenerationRequest(**{**BASE, "task": "t2v", **fields}))
        return str(info.value)

    assert "has 2 attention heads, which 3 processes cannot share" in refused(context_parallel=3)
    assert "declares no context-parallel plan" in refused(model="tiny-cogvideox", context_parallel=2)
    assert "context_parallel=0 is not allowed; use 1 (off) to 16" in refused(context_parallel=0)
    assert "every process must make the same call; choose one of off" in refused(context_parallel=2,
                                                                                 step_cache="first-block")
    fast = resolve(GenerationRequest(**{**BASE, "task": "t2v", "preset": "fast"}, context_parallel=2))
    assert fast.request.step_cache == "off" and any("fast preset's step cache" in n for n in fast.notes)


def test_the_plan_counts_each_processs_share_of_the_activations_and_all_the_weights():
    from configs.registry import get_model_spec
    from configs.schema import GenerationRequest
    from vram_utils.archs import arch_for
    from vram_utils.estimate import denoise_activation_bytes, latent_bytes, step_cache_bytes, workload_for

    model = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    spec = get_model_spec(model)
    request = GenerationRequest(model=model, task="t2v", prompt="a cat", height=720, width=1280, frames=81)
    arch = arch_for(spec, "t2v")
    alone, halves = (workload_for(request.replace(context_parallel=n), spec) for n in (1, 2))
    assert halves.parallel == 2
    # latents and the scheduler's copies are whole on every rank; the forward's activations are per token
    whole = 4 * latent_bytes(arch, alone) + step_cache_bytes(arch, alone)
    act_alone, act_half = (denoise_activation_bytes(arch, w) - whole for w in (alone, halves))
    assert act_half == pytest.approx(act_alone / 2, rel=1e-3), (act_alone, act_half)
