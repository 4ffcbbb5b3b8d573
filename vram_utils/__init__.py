"""Memory engine: device probe, estimator and planner (pure), applying offload, the leak sentinel.

Public API:
  probe() -> DeviceInfo, PeakMeter                     what the machine has; measured peaks
  plan(request, spec, device=None) -> Plan             the fastest rung that fits, with reasons
  Ladder(cuda, own_chunk, frame_px)                    every rung below a position (offload, tiles, chunks)
  apply_plan(pipe, plan)                               idempotent placement (offload rung, disk rung, VAE tiling)
  offload_root(), disk_folder_of(module)               where the disk rung keeps weight files
  tensor_bytes(t), module_bytes(m)                     storage bytes, torchao subclasses included
  seed 003: get_gpu_memory_info, log_vram_status, check_vram_availability,
            get_recommended_offload_strategy, apply_offload_strategy, configure_vae_tiling

Nothing here touches a GPU or loads a model at import time.
"""
from vram_utils.estimate import LADDER, Estimate, StageEstimate, Workload, workload_for  # noqa: F401
from vram_utils.ladder import OFFLOAD_RUNGS, TILE_FLOOR_PX, DecodeStep, Ladder, decode_change  # noqa: F401
from vram_utils.offload import (  # noqa: F401
    apply_offload_strategy,
    apply_plan,
    configure_vae_tiling,
    disk_folder_of,
    execution_device,
    offload_root,
    placed_as,
    remove_all_offload,
)
from vram_utils.planner import (  # noqa: F401
    check_vram_availability,
    get_recommended_offload_strategy,
    plan,
    plan_for,
)
from vram_utils.probe import (  # noqa: F401
    DeviceInfo,
    GpuInfo,
    PeakMeter,
    get_gpu_memory_info,
    log_vram_status,
    probe,
)
from vram_utils.sizes import (  # noqa: F401
    is_out_of_memory,
    module_bytes,
    release_memory,
    tensor_bytes,
    trim_host_heap,
)
