"""The out-of-memory ladder: recognising OOM and stepping down one rung at a time."""
from __future__ import annotations

import pytest
import torch

from configs.schema import DecodeSettings, Plan
from pipeline_utils.recovery import TILE_FLOOR_PX, is_oom, step_down


def test_is_oom_recognises_cuda_cpu_and_python_oom_only():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 123456 bytes. Error code 12 (Cannot allocate memory)"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))  # only runtime/allocator errors count


def test_decode_ladder_on_gpu_walks_offload_then_tiling_then_tiles_then_chunks():
    plan = Plan(offload="none", decode=DecodeSettings(enable_vae_tiling=False, tile_x=256, tile_y=256,
                                                      tile_stride_x=128, tile_stride_y=128))
    changes = []
    while (nxt := step_down(plan, "decoding", cuda=True)) is not None:
        plan, change = nxt
        changes.append(change)
        assert plan.decode.tile_stride_x <= plan.decode.tile_x and plan.decode.tile_stride_y <= plan.decode.tile_y
    assert changes == [
        "offload none -> model", "offload model -> group", "offload group -> sequential",
        "VAE tiling on (256x256 px tiles)", "tiles 256x256 -> 128x128 px", "tiles 128x128 -> 64x64 px",
        "decode chunks 2 -> 1 latent frames",
    ]
    assert min(plan.decode.tile_x, plan.decode.tile_y) >= TILE_FLOOR_PX and plan.decode.chunk_frames == 1


def test_decode_without_gpu_skips_offload_rungs():
    plan, change = step_down(Plan(offload="none", decode=DecodeSettings(enable_vae_tiling=False)), "decoding", cuda=False)
    assert change.startswith("VAE tiling on") and plan.offload == "none"


@pytest.mark.parametrize("stage", ["encoding", "denoising"])
def test_denoise_ladder_is_offload_only(stage):
    plan = Plan(offload="group")
    plan, change = step_down(plan, stage, cuda=False)
    assert (plan.offload, change) == ("sequential", "offload group -> sequential")
    assert step_down(plan, stage, cuda=False) is None


# --------------------------------------------------------------------------- the ladder inside a real run
import json  # noqa: E402

import numpy as np  # noqa: E402

from configs.schema import GenerationRequest  # noqa: E402
from pipeline_utils.runner import RunFailed  # noqa: E402
from tests.conftest import read_video  # noqa: E402


def _request(**kw):
    base = dict(model="tiny-wan", task="t2v", prompt="a cat", frames=9, height=32, width=32, steps=3, seed=11)
    base.update(kw)
    return GenerationRequest(**base)


def _oom_once_at(stage: str, index: int):
    fired = []

    def hook(at_stage, at_index):
        if (at_stage, at_index) == (stage, index) and not fired:
            fired.append(at_index)
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {stage} {index})")

    return hook, fired


@pytest.mark.parametrize("stage, index, rung", [
    ("encoding", 0, "offload none -> model"),
    ("denoising", 2, "offload none -> model"),
    ("decoding", 1, "tiles 272x272 -> 136x136 px"),
])
def test_injected_oom_recovers_with_the_same_output_and_the_sidecar_says_so(runner, tmp_path, stage, index, rung):
    clean = runner.generate(_request(), out_path=tmp_path / "clean.mp4")
    hook, fired = _oom_once_at(stage, index)
    runner.fault_hook = hook
    recovered = runner.generate(_request(), out_path=tmp_path / "recovered.mp4")
    runner.fault_hook = None
    assert fired == [index]
    # Equal up to float32 round-off: once offload has re-placed the weights, oneDNN may pick other SIMD
    # paths for them (measured: 8e-6 max abs on these latents, the same after going back to "none").
    torch.testing.assert_close(torch.load(recovered.latents_path)["latents"], torch.load(clean.latents_path)["latents"],
                               rtol=1e-4, atol=1e-4)
    diff = np.abs(read_video(clean.video_path).astype(int) - read_video(recovered.video_path).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    sidecar = json.loads(recovered.sidecar_path.read_text())
    assert [s["change"] for s in sidecar["step_downs"]] == [rung]
    assert sidecar["step_downs"][0]["stage"] == stage and "injected" in sidecar["step_downs"][0]["error"]
    assert not runner.last_leak.leaked, runner.last_leak.line()


def test_oom_at_every_rung_fails_with_what_was_tried_and_memory_returns(runner, tmp_path):
    runner.generate(_request(), out_path=tmp_path / "warm.mp4")  # the model is cached: the baseline includes it

    def always(stage, index):
        if stage == "denoising":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    runner.fault_hook = always
    with pytest.raises(RunFailed) as info:
        runner.generate(_request(), out_path=tmp_path / "never.mp4")
    runner.fault_hook = None
    message = str(info.value)
    assert "Tried: offload none -> model; offload model -> group; offload group -> sequential" in message
    assert "fewer frames (e.g. --frames 5)" in message
    assert not (tmp_path / "never.mp4").exists()
    assert not runner.last_leak.leaked, runner.last_leak.line()
    after = runner.generate(_request(), out_path=tmp_path / "after.mp4")  # the app keeps serving
    assert read_video(after.video_path).shape == (9, 32, 32, 3)
