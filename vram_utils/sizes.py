"""Bytes of tensors and modules as stored (quantized tensor subclasses included), and giving memory back."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    """Real storage bytes of a tensor.

    A torchao quantized weight is a tensor subclass whose `dtype` is the compute dtype (bf16) while
    its data lives in inner tensors (int8 data, scales, ...): `numel() * element_size()` would count
    it at full precision. Subclasses that implement `__tensor_flatten__` are counted from the inner
    tensors they name, recursively (an inner tensor may itself be a subclass).
    """
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(inner) for name in names if (inner := getattr(t, name, None)) is not None)
    return t.numel() * t.element_size()


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as stored (a tensor shared inside it counted once);
    0 for non-modules such as tokenizers."""
    if not isinstance(module, torch.nn.Module):
        return 0
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def release_memory(run_only: bool = False) -> None:
    """Return freed memory: Python garbage first (it may hold the last references), then the CUDA
    cache, then the host heap.

    `run_only`: leave out what `objects_of_this_run` set aside (everything alive when the run began), so
    the collection walks only what the run made. A full collection walks every object torch, transformers,
    diffusers and gradio keep: 0.26-0.30 s a call in the CLI, two calls a run, 6% of a small run
    (bench/overhead.py). Without a run going it is the full collection.
    """
    if not run_only:
        gc.unfreeze()  # an unload or an out-of-memory retry must reach the pipelines alive before the run too
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_host_heap()


@contextlib.contextmanager
def objects_of_this_run():
    """While a run goes, the objects alive at its start are moved out of the garbage collector's walk
    (`gc.freeze`): `release_memory(run_only=True)` and Python's own collections then look only at what the
    run made, and garbage the run made is still found. Handed back afterwards (`gc.unfreeze`), so anything
    of before that became garbage meanwhile is collected as usual; a full `release_memory()` in between
    (a pipeline unloaded, an out-of-memory retry) hands them back early."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def trim_host_heap() -> bool:
    """Hand freed heap pages back to the OS (glibc only); False where there is no malloc_trim.

    Why: glibc keeps freed memory in its arenas. Quantizing CogVideoX-2b's transformer on the CPU
    frees ~3 GiB of bf16 weights in pieces; without a trim the process stayed at 4.7 GiB RSS for
    1.7 GiB of int8 weights, with it 2.0 GiB (bench/quant_memory.py). On a 16-32 GB machine that is
    the difference between loading the VAE next or swapping.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",  # CPU allocator (DefaultCPUAllocator), e.g. under RLIMIT_AS
    "cannot allocate memory",
    "failed to allocate",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM, the CPU/MPS allocators' failures (plain RuntimeErrors) and MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)
