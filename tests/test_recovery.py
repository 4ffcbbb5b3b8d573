"""The out-of-memory ladder: recognising OOM and stepping down one rung at a time (vram_utils/ladder.py)."""
from __future__ import annotations

import pytest
import torch

from configs.schema import DecodeSettings, Plan
from engine.recovery import is_oom
from vram_utils.ladder import TILE_FLOOR_PX, Ladder

GPU = Ladder(cuda=True, own_chunk=2)  # CogVideoX's own decode chunk: 2 latent frames
CPU = Ladder(cuda=False, own_chunk=2)


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
    while (nxt := GPU.step(plan, "decoding")) is not None:
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
    plan, change = CPU.step(Plan(offload="none", decode=DecodeSettings(enable_vae_tiling=False)), "decoding")
    assert change.startswith("VAE tiling on") and plan.offload == "none"


@pytest.mark.parametrize("stage", ["encoding", "denoising"])
def test_denoise_ladder_is_offload_only(stage):
    plan = Plan(offload="group")
    plan, change = GPU.step(plan, stage)
    assert (plan.offload, change) == ("sequential", "offload group -> sequential")
    assert GPU.step(plan, stage) is None


@pytest.mark.parametrize("stage", ["loading", "encoding", "denoising"])
@pytest.mark.parametrize("offload", ["none", "model", "group"])
def test_without_a_gpu_a_denoise_has_no_rung(stage, offload):
    # Every offload rung onloads to the CPU there: the weights stay in the same RAM, nothing is freed.
    assert CPU.step(Plan(offload=offload), stage) is None
    assert CPU.offload_rungs() == ("none",) and GPU.offload_rungs() == ("none", "model", "group", "sequential")


def test_wan_has_no_chunk_rung_and_no_rung_is_a_no_op():
    wan = Ladder(cuda=False, own_chunk=1, frame_px=(480, 832))
    settings = DecodeSettings(enable_vae_tiling=False, tile_x=272, tile_y=272, tile_stride_x=144, tile_stride_y=128)
    rungs = wan.decode_rungs(settings)
    assert [(d.enable_vae_tiling, d.tile_y, d.tile_x) for d in rungs] == [
        (False, 272, 272), (True, 272, 272), (True, 136, 136), (True, 64, 64),
    ]
    assert all(d.chunk_frames == 0 for d in rungs) and wan.next_decode(rungs[-1]) is None
    assert len(set(rungs)) == len(rungs)  # every rung differs from the one above it
    # CogVideoX at the same settings: the same tile rungs, then its own 2-latent-frame chunk halved.
    cog = Ladder(cuda=False, own_chunk=2, frame_px=(480, 832)).decode_rungs(settings)
    assert cog[:-1] == rungs and cog[-1].chunk_frames == 1


def test_tile_rungs_that_would_not_change_the_decode_are_skipped():
    small = Ladder(cuda=False, own_chunk=1, frame_px=(32, 32))  # below the tile floor: no tile rung at all
    assert small.decode_rungs(DecodeSettings(enable_vae_tiling=False)) == [DecodeSettings(enable_vae_tiling=False)]
    # Tiles as large as the frame decode what untiled does: tiling on starts at half the frame instead.
    frame = Ladder(cuda=False, own_chunk=1, frame_px=(128, 96))
    step = frame.next_decode(DecodeSettings(enable_vae_tiling=False))
    assert (step.kind, step.settings.tile_y, step.settings.tile_x) == ("tiling", 64, 64)
    assert (step.settings.tile_stride_y, step.settings.tile_stride_x) == (48, 48)  # a quarter overlaps
    assert frame.next_decode(step.settings) is None


def test_the_planner_searches_the_same_decode_rungs():
    from configs.schema import GenerationRequest
    from configs.registry import get_model_spec
    from vram_utils.archs import arch_for
    from vram_utils.estimate import workload_for
    from vram_utils.planner import _decode_options

    spec = get_model_spec("tiny-cogvideox")
    req = GenerationRequest(model=spec.id, task="t2v", prompt="x", frames=9, height=240, width=360,
                            decode=DecodeSettings(enable_vae_tiling=False))
    options = _decode_options(arch_for(spec), workload_for(req, spec))
    assert options == Ladder(cuda=False, own_chunk=2, frame_px=(240, 360)).decode_rungs(req.decode)
    assert min(min(d.tile_x, d.tile_y) for d in options) == TILE_FLOOR_PX and options[-1].chunk_frames == 1


# --------------------------------------------------------------------------- the ladder inside a real run
import json  # noqa: E402

import numpy as np  # noqa: E402

from configs.schema import GenerationRequest  # noqa: E402
from engine.runner import RunFailed  # noqa: E402
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
    ("decoding", 1, "offload none -> model"),
])
def test_injected_oom_recovers_with_the_same_output_and_the_sidecar_says_so(runner, tmp_path, stage, index, rung):
    clean = runner.generate(_request(), out_path=tmp_path / "clean.mp4")
    runner.ladder_backend = "cuda"  # the GPU ladder: its offload rungs run on the CPU too (onloading to it)
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
    runner.ladder_backend = "cuda"
    with pytest.raises(RunFailed) as info:
        runner.generate(_request(), out_path=tmp_path / "never.mp4")
    runner.fault_hook = None
    runner.ladder_backend = None
    message = str(info.value)
    assert "Tried: offload none -> model; offload model -> group; offload group -> sequential" in message
    assert "fewer frames (e.g. --frames 5)" in message
    assert not (tmp_path / "never.mp4").exists()
    assert not runner.last_leak.leaked, runner.last_leak.line()
    after = runner.generate(_request(), out_path=tmp_path / "after.mp4")  # the app keeps serving
    assert read_video(after.video_path).shape == (9, 32, 32, 3)


# --------------------------------------------------------------------------- one ladder, no rung twice


def _decode_always_out_of_memory(runner, events):
    """Every decode runs out of memory in the VAE's first layer; returns the latent (h, w) of each tile tried,
    and the number of decode attempts (the runner announces each with a "decoding" event at step 0)."""
    vae = runner.cache.get("tiny-wan", "t2v").vae
    tiles: list[tuple[int, int]] = []

    def hook(module, args):
        tiles.append(tuple(args[0].shape[-2:]))
        raise torch.OutOfMemoryError("CUDA out of memory (injected in the VAE)")

    handle = vae.decoder.conv_in.register_forward_pre_hook(hook)
    attempts = lambda: sum(e.stage == "decoding" and e.message == "decoding" for e in events)  # noqa: E731
    return handle, tiles, attempts


def test_a_decode_oom_at_the_tile_floor_is_not_retried_at_a_tile_size_already_tried(runner, tmp_path):
    events: list = []
    handle, tiles, attempts = _decode_always_out_of_memory(runner, events)
    try:
        with pytest.raises(RunFailed) as info:
            runner.generate(_request(height=256, width=256), out_path=tmp_path / "never.mp4", on_progress=events.append)
    finally:
        handle.remove()
    # One decode: the stream halves 256 px (one tile, the whole frame) to 128 and 64 px, the floor, then gives
    # up; on the CPU nothing is left, so the runner does not decode again at a size the stream already tried.
    assert attempts() == 1
    # Latent tiles as decoded: the whole frame; 128 px tiles (stride 96) laid out as three of 14 latent
    # pixels, keeping their overlap; 64 px tiles (stride 48) as five of 8.
    assert tiles == [(32, 32), (14, 14), (8, 8)]
    message = str(info.value)
    assert "tiles 256x256 -> 128x128 px" in message and "tiles 128x128 -> 64x64 px" in message
    assert "fewer frames (e.g. --frames 5)" in message
    assert not (tmp_path / "never.mp4").exists() and (tmp_path / "never.latents.pt").is_file()
    assert not runner.last_leak.leaked, runner.last_leak.line()


def test_on_the_gpu_ladder_offload_comes_first_and_the_decode_rungs_are_walked_once(runner, tmp_path):
    events: list = []
    handle, tiles, attempts = _decode_always_out_of_memory(runner, events)
    runner.ladder_backend = "cuda"
    try:
        with pytest.raises(RunFailed) as info:
            runner.generate(_request(height=256, width=256), out_path=tmp_path / "never.mp4", on_progress=events.append)
    finally:
        handle.remove()
    # none, model, group: the planned decode once each (the decode leaves its own rungs to after offload);
    # sequential: the decode walks its rungs down to the floor, once.
    assert attempts() == 4
    assert tiles == [(32, 32)] * 4 + [(14, 14), (8, 8)]
    tried = str(info.value).split("Tried: ")[1].split(". To fit")[0].split("; ")
    assert tried[:3] == ["offload none -> model", "offload model -> group", "offload group -> sequential"]
    assert [t.split(", ")[0] for t in tried[3:]] == [
        "decode chunk 1: tiles 256x256 -> 128x128 px", "decode chunk 1: tiles 128x128 -> 64x64 px",
    ]
    assert not runner.last_leak.leaked, runner.last_leak.line()


def test_a_cpu_denoise_oom_is_not_retried_on_offload_rungs(runner, tmp_path):
    calls = []

    def always(stage, index):
        if stage == "denoising":
            calls.append(index)
            raise torch.OutOfMemoryError("out of memory (injected)")

    runner.fault_hook = always
    with pytest.raises(RunFailed) as info:
        runner.generate(_request(), out_path=tmp_path / "never.mp4")
    runner.fault_hook = None
    assert calls == [1]  # one denoise, stopped at its first step; no offload rung was tried
    message = str(info.value)
    assert "out of memory while denoising" in message and "no lower rung frees host RAM" in message
    assert "fewer frames (e.g. --frames 5)" in message and "a smaller size than 32x32" in message
    assert not runner.last_leak.leaked, runner.last_leak.line()
