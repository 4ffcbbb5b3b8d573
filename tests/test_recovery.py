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
