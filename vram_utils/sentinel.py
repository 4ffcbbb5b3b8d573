"""The leak sentinel: memory must return to its baseline after every run, failed or not.

Before a run it notes the "unexplained" bytes — allocated GPU bytes (or process RSS
without a GPU) minus the weights the pipeline cache legitimately holds there — and
after the run, once memory has been released, it compares. Growth past a threshold
is logged as a warning with the largest live tensors that nobody should be holding.
"""
from __future__ import annotations

import collections
import gc
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from vram_utils.sizes import release_memory, trim_host_heap

logger = logging.getLogger(__name__)

GPU_THRESHOLD_BYTES = 32 * 2**20
# RSS moves with the allocator's free lists and ffmpeg/Python caches; growth under this is noise here.
HOST_THRESHOLD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class LeakReport:
    label: str
    metric: str  # "gpu_allocated" or "host_rss"
    before_bytes: int
    after_bytes: int
    threshold_bytes: int
    holders: tuple[str, ...] = ()
    at: float = 0.0
    judged: bool = True  # False for a warm-up run (lazy imports and allocator pools grow once)
    # what the run left on the cached pipelines' modules (engine/modifiers.py: hooks, adapters, processors): a bug
    leftovers: tuple[str, ...] = ()

    @property
    def delta_bytes(self) -> int:
        return self.after_bytes - self.before_bytes

    @property
    def leaked(self) -> bool:
        return self.judged and self.delta_bytes > self.threshold_bytes

    def line(self) -> str:
        mib = self.delta_bytes / 2**20
        verdict = "LEAK" if self.leaked else "ok" if self.judged else "warm-up, not judged"
        left = f"; LEFT ON THE MODEL: {'; '.join(self.leftovers[:3])}" if self.leftovers else ""
        return f"{self.label}: {self.metric} {mib:+.1f} MiB vs baseline ({verdict}){left}"


def _release() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    release_memory(run_only=True)


def _raw_bytes() -> tuple[str, int]:
    if torch.cuda.is_available():
        return "gpu_allocated", torch.cuda.memory_allocated()
    import psutil

    return "host_rss", psutil.Process().memory_info().rss


def largest_live_tensors(device_type: str, exclude_ids: set[int], top: int = 3) -> tuple[str, ...]:
    """The biggest tensors alive on `device_type` that are not cached weights: the likely holders."""
    found = []
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == device_type and id(obj) not in exclude_ids:
                    found.append((obj.numel() * obj.element_size(), tuple(obj.shape), str(obj.dtype)))
            except Exception:  # objects that fail isinstance/attribute access mid-teardown
                continue
    found.sort(reverse=True)
    return tuple(f"{shape} {dtype} ({nbytes / 2**20:.1f} MiB)" for nbytes, shape, dtype in found[:top])


class LeakSentinel:
    """`token = sentinel.before()` ... `report = sentinel.after(token, label)`; `history` keeps the last reports."""

    def __init__(self, held_bytes: Callable[[str], int] | None = None, history: int = 20,
                 gpu_threshold_bytes: int = GPU_THRESHOLD_BYTES, host_threshold_bytes: int = HOST_THRESHOLD_BYTES):
        # held_bytes(device_type) -> bytes of cached weights on that device (legitimately kept between runs)
        self.held_bytes = held_bytes or (lambda device_type: 0)
        self.gpu_threshold_bytes = gpu_threshold_bytes
        self.host_threshold_bytes = host_threshold_bytes
        self.history: collections.deque[LeakReport] = collections.deque(maxlen=history)

    def measure(self, collect: bool = True) -> tuple[str, int]:
        """(metric, bytes not explained by cached weights), after releasing what can be released.

        A full `gc.collect()` costs ~0.3 s in a process holding torch, transformers and gradio, so the
        baseline (`before`, right after the previous run's cleanup) skips it; garbage counted there can
        only hide growth, never invent it.
        """
        if collect:
            _release()
        else:
            trim_host_heap()
        metric, raw = _raw_bytes()
        return metric, raw - self.held_bytes("cuda" if metric == "gpu_allocated" else "cpu")

    def before(self) -> tuple[str, int]:
        return self.measure(collect=False)

    def after(self, token: tuple[str, int], label: str, weight_ids: set[int] | None = None,
              judge: bool = True, leftovers: list[str] | None = None) -> LeakReport:
        """Compare with `token`; `judge=False` records a warm-up run (one that loaded a model) unjudged.
        `leftovers`: what the run left on the cached pipelines (the runner's check), kept in the report."""
        metric, before = token
        _, after = self.measure()
        threshold = self.gpu_threshold_bytes if metric == "gpu_allocated" else self.host_threshold_bytes
        left = tuple(leftovers or ())
        report = LeakReport(label, metric, before, after, threshold, at=time.time(), judged=judge, leftovers=left)
        if report.leaked:
            device_type = "cuda" if metric == "gpu_allocated" else "cpu"
            holders = largest_live_tensors(device_type, weight_ids or set())
            report = LeakReport(label, metric, before, after, threshold, holders, report.at, judge, left)
            logger.warning("%s; largest live tensors: %s", report.line(), "; ".join(holders) or "none found")
        else:
            logger.debug(report.line())
        self.history.append(report)
        return report
