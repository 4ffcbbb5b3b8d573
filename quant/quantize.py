"""Weight precision for a loaded component: INT8 / FP8 (torchao) and FP8 storage (diffusers layerwise casting).

    apply(module, "int8")         torchao int8 weight-only, per-row scales; runs on CPU and CUDA
    apply(module, "fp8")          torchao float8 weight-only where the GPU has fp8 (compute capability >= 8.9),
                                  otherwise falls back to "fp8-storage" and says so
    apply(module, "fp8-storage")  weights stored as float8_e4m3fn, cast back to the module's dtype layer by layer
                                  for each forward (diffusers layerwise casting); any CUDA GPU, and the CPU

A module is quantized once, in place, when the pipeline cache loads it; the
result (bytes before and after, measured from the real storage) is returned and
kept on the module so a second call is a no-op and the planner can use the
measured bytes instead of guessing.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from enum import Enum

import torch

from families import FAMILIES

from configs.schema import QUANTS, RequestError
from quant.memory import param_count, release_memory, weight_bytes

logger = logging.getLogger(__name__)


class Mode(str, Enum):
    NONE = "none"
    INT8 = "int8"
    FP8 = "fp8"
    FP8_STORAGE = "fp8-storage"


assert {m.value for m in Mode} == set(QUANTS), "quant.Mode and configs.schema.Quant must list the same modes"

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have float8 tensor cores
FP8_STORAGE_DTYPE = torch.float8_e4m3fn  # 3 mantissa bits: more precision than e5m2 for weights

# Layers kept in the loaded dtype whatever the mode. They are small (0.6 % of
# CogVideoX-2b's transformer, 1.6 % of Wan 2.1 14B's) and they are where an
# error reaches everything after it: the input projections, the timestep /
# text conditioning that every block's modulation is computed from, and the
# final projection back to latent channels. Norm layers and nn.Embedding are
# never touched (neither torchao's Linear filter nor layerwise casting selects them).
# Each family names its own (families/: `quant_keep`; e.g. CogVideoX keeps its AdaLN modulation Linears out of
# the list on purpose); the final AdaLN and the output projection are kept for every family.
KEEP_PATTERNS: tuple[str, ...] = (
    *dict.fromkeys(p for f in FAMILIES.values() for p in f.quant_keep),
    r"(^|\.)norm_out(\.|$)",  # final AdaLN before the output projection
    r"(^|\.)proj_out$",
)
# int8 stores a float32 scale and an int8 zero point per output row: 5 bytes. A
# Linear with fewer inputs than this saves little or costs bytes (in_features=2:
# 7 bytes int8 vs 4 bytes bf16 per row). torchao 0.18 itself accepts any shape.
INT8_MIN_IN_FEATURES = 16
_FP8_STORAGE_SKIP_CLASSES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm)

_RESULT_ATTR = "_fitvideo_quant"  # where the QuantResult is kept on the module


@dataclass(frozen=True)
class QuantOptions:
    keep_patterns: tuple[str, ...] = KEEP_PATTERNS  # regexes searched in module names
    int8_min_in_features: int = INT8_MIN_IN_FEATURES


@dataclass(frozen=True)
class QuantResult:
    """What `apply` did to one module, measured from the real storage."""

    requested: str
    applied: str  # differs from `requested` when fp8 fell back to fp8-storage
    bytes_before: int
    bytes_after: int
    params: int  # logical parameter count (unchanged by quantization)
    layers: int  # layers quantized or cast
    seconds: float
    reason: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def bytes_per_param(self) -> float:
        """Measured storage per parameter after quantization (2.0 for an untouched bf16 module)."""
        return self.bytes_after / self.params if self.params else 0.0


def fp8_compute_supported() -> tuple[bool, str]:
    """Whether torchao's float8 path applies here, with the reason (asked at call time, never at import)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        return False, f"{torch.cuda.get_device_name()} has compute capability {major}.{minor} < {need}"
    return True, f"compute capability {major}.{minor}"


def resolve_mode(mode: str) -> tuple[str, str]:
    """The mode that will really run, and why (fp8 falls back to fp8-storage without fp8 hardware)."""
    if mode not in QUANTS:
        raise RequestError(f"quant={mode!r} is not allowed; choose one of {QUANTS}")
    if mode != Mode.FP8:
        return mode, ""
    ok, why = fp8_compute_supported()
    if ok:
        return mode, f"torchao float8 weight-only ({why})"
    return Mode.FP8_STORAGE.value, f"fp8 falls back to fp8-storage: {why}"


def applied_mode(module: torch.nn.Module) -> str:
    """The mode a module was quantized with ('none' if never)."""
    result = getattr(module, _RESULT_ATTR, None)
    return result.applied if result is not None else Mode.NONE.value


def last_result(module: torch.nn.Module) -> QuantResult | None:
    return getattr(module, _RESULT_ATTR, None)


def apply(module: torch.nn.Module, mode: str, options: QuantOptions = QuantOptions()) -> QuantResult:
    """Quantize `module` in place (where it lies: CPU or GPU) and return what was measured.

    Quantizing twice with the same mode is a no-op that returns the first result;
    a different mode on an already quantized module is refused (its original
    weights are gone).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"quant.apply needs a torch.nn.Module, got {type(module).__name__}")
    effective, reason = resolve_mode(mode)
    previous = last_result(module)
    if previous is not None:
        if previous.requested == mode:
            logger.debug("%s already quantized (%s); nothing to do", type(module).__name__, previous.applied)
            return previous
        raise RequestError(
            f"this {type(module).__name__} is already quantized as {previous.applied!r}; "
            f"load it again to use quant={mode!r}"
        )
    if reason and effective != mode:
        logger.warning("%s", reason)
    if effective == Mode.NONE:
        size = weight_bytes(module)
        return QuantResult(mode, effective, size, size, param_count(module), 0, 0.0, reason)

    before = weight_bytes(module)
    t0 = time.perf_counter()
    with torch.no_grad():
        if effective == Mode.INT8:
            layers = _apply_int8(module, options)
        elif effective == Mode.FP8:
            layers = _apply_fp8(module, options)
        else:
            layers = _apply_fp8_storage(module, options)
    seconds = time.perf_counter() - t0
    # The full-precision weights each layer replaced are garbage now: give them back before the next step loads.
    release_memory()
    result = QuantResult(mode, effective, before, weight_bytes(module), param_count(module), layers, seconds, reason)
    setattr(module, _RESULT_ATTR, result)
    logger.info(
        "%s -> %s: %d layers, weights %s -> %s (x%.2f, %.2f bytes/param) in %.1f s",
        type(module).__name__,
        effective,
        layers,
        _human(before),
        _human(result.bytes_after),
        result.ratio,
        result.bytes_per_param,
        seconds,
    )
    if layers == 0:
        logger.warning("quant=%s selected no layer of %s; its weights are unchanged", mode, type(module).__name__)
    return result


def _human(n_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes} B"


def _kept(name: str, options: QuantOptions) -> bool:
    return any(re.search(p, name) for p in options.keep_patterns)


def int8_filter(options: QuantOptions = QuantOptions()):
    """torchao filter: Linear layers with enough inputs for per-row scales to pay, outside the kept layers."""

    def wanted(layer: torch.nn.Module, name: str) -> bool:
        return (
            isinstance(layer, torch.nn.Linear)
            and layer.in_features >= options.int8_min_in_features
            and not _kept(name, options)
            and not hasattr(layer.weight, "__tensor_flatten__")  # already a torchao tensor
        )

    return wanted


def _count(module: torch.nn.Module, wanted) -> int:
    return sum(wanted(layer, name) for name, layer in module.named_modules())


def _apply_int8(module: torch.nn.Module, options: QuantOptions) -> int:
    with _quiet_torchao_import():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    wanted = int8_filter(options)
    layers = _count(module, wanted)
    # set_inductor_config=False: torchao would otherwise change global torch._inductor settings
    # for every later torch.compile in this process, a side effect nobody asked for.
    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=wanted)
    return layers


def _apply_fp8(module: torch.nn.Module, options: QuantOptions) -> int:
    with _quiet_torchao_import():
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

    def wanted(layer: torch.nn.Module, name: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and not _kept(name, options)

    layers = _count(module, wanted)
    quantize_(module, Float8WeightOnlyConfig(set_inductor_config=False), filter_fn=wanted)
    return layers


def _apply_fp8_storage(module: torch.nn.Module, options: QuantOptions) -> int:
    from diffusers.hooks import apply_layerwise_casting

    # Compute in the dtype the module was loaded in: the pipeline feeds it inputs of
    # that dtype (bf16 for the real models, float32 for the tiny ones), and a Linear
    # whose weight dtype differs from its input's raises.
    compute_dtype = _floating_dtype(module)
    apply_layerwise_casting(
        module,
        storage_dtype=FP8_STORAGE_DTYPE,
        compute_dtype=compute_dtype,
        skip_modules_pattern=options.keep_patterns,
        skip_modules_classes=_FP8_STORAGE_SKIP_CLASSES,
        non_blocking=False,
    )
    return sum(
        1
        for layer in module.modules()
        if any(p.dtype == FP8_STORAGE_DTYPE for p in layer.parameters(recurse=False))
    )


def _floating_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of the module's floating-point weights are in (its compute dtype). Not the first
    parameter's: a Wan transformer loaded in bf16 keeps `scale_shift_table` in float32, and computing the
    cast-back layers in float32 against bf16 activations fails ("mat1 and mat2 must have the same dtype")."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        raise RequestError(f"{type(module).__name__} has no floating-point weights to store in fp8")
    return max(counts, key=counts.get)


@contextlib.contextmanager
def _quiet_torchao_import():
    """torchao 0.18 warns at import that it cannot load CUDA extension libraries (mxfp8, cutlass, triton)
    the weight-only paths here never use, and torch warns that torchao registers an Enum the old way.
    Keep that noise out of the user's log; with DEBUG logging on it stays visible."""
    names = ("torchao", "torch.utils._pytree")
    levels = {name: logging.getLogger(name).level for name in names}
    if not logger.isEnabledFor(logging.DEBUG):
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
