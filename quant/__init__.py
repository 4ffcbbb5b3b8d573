"""Weight precision (INT8 / FP8 / FP8 storage) and the memory hygiene that keeps runs flat.

`apply(module, mode)` quantizes a loaded component once, in place, and returns a
`QuantResult` with the bytes measured before and after. `weight_bytes(module)`
counts the real storage (torchao tensor subclasses included). `drop_run_state(pipe)`
drops the latent-shaped tensors a finished run leaves in a pipeline. Nothing here
touches a GPU or imports torchao at import time.
"""
from __future__ import annotations

from quant.memory import (
    StateTensor,
    drop_run_state,
    param_count,
    release_memory,
    state_tensors,
    tensor_bytes,
    trim_host_heap,
    weight_bytes,
)
from quant.quantize import (
    FP8_MIN_CAPABILITY,
    FP8_STORAGE_DTYPE,
    INT8_MIN_IN_FEATURES,
    KEEP_PATTERNS,
    Mode,
    QuantOptions,
    QuantResult,
    applied_mode,
    apply,
    fp8_compute_supported,
    int8_filter,
    last_result,
    resolve_mode,
)

__all__ = [
    "FP8_MIN_CAPABILITY",
    "FP8_STORAGE_DTYPE",
    "INT8_MIN_IN_FEATURES",
    "KEEP_PATTERNS",
    "Mode",
    "QuantOptions",
    "QuantResult",
    "StateTensor",
    "applied_mode",
    "apply",
    "drop_run_state",
    "fp8_compute_supported",
    "int8_filter",
    "last_result",
    "param_count",
    "release_memory",
    "resolve_mode",
    "state_tensors",
    "tensor_bytes",
    "trim_host_heap",
    "weight_bytes",
]
