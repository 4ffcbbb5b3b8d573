"""The runner end to end on the tiny family: frame counts, sizes, fps, determinism, outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from configs.schema import GenerationRequest
from engine.runner import ProgressEvent
from tests.conftest import read_video, video_fps


def _request(model, task, **kw):
    base = dict(model=model, task=task, prompt="a cat walks on the beach", frames=9, height=32, width=32, steps=2, seed=0)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-wan"])
@pytest.mark.parametrize("task", ["t2v", "i2v", "v2v"])
def test_each_task_gives_the_right_frames_size_and_fps(runner, model, task, sample_image, sample_video, tmp_path):
    extra = {"image": str(sample_image)} if task == "i2v" else {"video": str(sample_video)} if task == "v2v" else {}
    result = runner.generate(_request(model, task, **extra), out_path=tmp_path / f"{model}-{task}.mp4")
    frames = read_video(result.video_path)
    assert frames.shape == (9, 32, 32, 3)
    assert result.frames == 9
    expected_fps = 8 if model == "tiny-cogvideox" else 16
    assert video_fps(result.video_path) == pytest.approx(expected_fps)
    assert frames.std() > 1.0  # not a blank video


def test_other_sizes_and_frame_counts(runner, tmp_path):
    cog = runner.generate(_request("tiny-cogvideox", "t2v", frames=17, height=48, width=64), out_path=tmp_path / "c.mp4")
    wan = runner.generate(_request("tiny-wan", "t2v", frames=13, height=64, width=48), out_path=tmp_path / "w.mp4")
    assert read_video(cog.video_path).shape == (17, 48, 64, 3)
    assert read_video(wan.video_path).shape == (13, 64, 48, 3)


def test_same_seed_gives_identical_frames_and_other_seed_differs(runner, tmp_path):
    a = runner.generate(_request("tiny-wan", "t2v", seed=7), out_path=tmp_path / "a.mp4")
    b = runner.generate(_request("tiny-wan", "t2v", seed=7), out_path=tmp_path / "b.mp4")
    c = runner.generate(_request("tiny-wan", "t2v", seed=8), out_path=tmp_path / "c.mp4")
    la, lb, lc = (torch.load(r.latents_path)["latents"] for r in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)
    assert np.array_equal(read_video(a.video_path), read_video(b.video_path))
    assert not np.array_equal(read_video(a.video_path), read_video(c.video_path))


def test_outputs_sidecar_latents_and_progress(runner):
    events: list[ProgressEvent] = []
    result = runner.generate(_request("tiny-cogvideox", "t2v", steps=3, seed=42), on_progress=events.append)
    assert result.video_path.parent == runner.outputs_dir
    assert result.video_path.name.endswith("_t2v_42.mp4")
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["frames"] == 9 and sidecar["request"]["seed"] == 42 and sidecar["request"]["steps"] == 3
    assert sidecar["versions"]["diffusers"] == "0.42.1"
    assert set(sidecar["timings"]) >= {"load_s", "denoise_s", "decode_s", "total_s"}
    saved = torch.load(result.latents_path)
    assert saved["latents"].shape == (1, 4, 3, 4, 4)  # (B, C, F_latent, H/8, W/8)
    assert saved["request"]["model"] == "tiny-cogvideox"
    stages = [e.stage for e in events]
    assert stages[0] == "loading" and stages[-1] == "done"
    assert [e.step for e in events if e.stage == "denoising"] == [1, 2, 3]
    assert "decoding" in stages and "saving" in stages
    assert not list(runner.outputs_dir.glob(".*partial*"))  # nothing left under a temporary name


def test_cached_pipeline_is_reused_across_runs(runner, tmp_path):
    runner.generate(_request("tiny-wan", "t2v"), out_path=tmp_path / "1.mp4")
    runner.generate(_request("tiny-wan", "t2v", seed=3), out_path=tmp_path / "2.mp4")
    runner.generate(_request("tiny-wan", "v2v", video=str(tmp_path / "1.mp4")), out_path=tmp_path / "3.mp4")
    assert runner.cache.loads == 2  # t2v once, v2v once (sharing the t2v weights)
    t2v = runner.cache.get("tiny-wan", "t2v")
    v2v = runner.cache.get("tiny-wan", "v2v")
    assert v2v.transformer is t2v.transformer and v2v.vae is t2v.vae


def test_stop_flag_cancels_within_a_step(runner):
    import threading

    from engine.runner import Cancelled

    stop = threading.Event()
    steps: list[int] = []

    def on_progress(event):
        if event.stage == "denoising":
            steps.append(event.step)
            if event.step == 2:
                stop.set()

    with pytest.raises(Cancelled):
        runner.generate(_request("tiny-cogvideox", "t2v", steps=10), on_progress=on_progress, stop=stop)
    assert steps == [1, 2]
    assert not list(runner.outputs_dir.glob("*.mp4"))


def test_a_long_prompt_is_warned_about_even_when_the_plan_already_made_suggestions(runner, tmp_path, monkeypatch):
    planned = runner.plan

    def does_not_fit(request, device=None):  # the planner's answer on a machine too small for the request
        plan = planned(request, device)
        return plan.replace(fits=False, reasons=plan.reasons + ("suggestion: 5 frames fit (CPU, predicted 9 MiB)",))

    monkeypatch.setattr(runner, "plan", does_not_fit)
    long_prompt = " ".join(["a cat walks on the beach at sunset"] * 10)  # ~80 tokens; tiny CogVideoX reads 16
    result = runner.generate(_request("tiny-cogvideox", "t2v", prompt=long_prompt), out_path=tmp_path / "long.mp4")
    assert result.warnings[0] == "suggestion: 5 frames fit (CPU, predicted 9 MiB)"
    assert len(result.warnings) == 2 and "the text encoder reads 16" in result.warnings[1]
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["warnings"] == result.warnings and sidecar["version"] == 2 and sidecar["kind"] == "generate"
