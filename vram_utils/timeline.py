"""Memory over a run's time: a few samples a second of process RSS and GPU allocated/reserved, with stage marks.

`MemoryTimeline` is the PeakMeter's companion (issue "Memory as pictures"). A daemon thread reads memory every
`tick_s` (25 ms) and keeps, per `interval_s` bucket (0.25 s), the *highest* reading of the bucket, so a short
spike between two chart points is not lost. Sample i covers [t[i], t[i] + interval_s). When `max_samples`
buckets are full the resolution halves (pairs of buckets merge, keeping their max): a long run keeps at most
`max_samples` samples and its peak.

It never creates a CUDA context: GPU numbers are read only once torch has initialised CUDA (0 before, which
is true: nothing of ours is allocated); without CUDA the GPU series are absent from `to_dict()`.

    with MemoryTimeline(gpu_index=0) as tl:
        tl.mark("loading"); ...; tl.mark("denoising"); ...
    sidecar["memory_timeline"] = tl.to_dict()
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import psutil
import torch

from vram_utils.host_budget import process_anon_bytes

if TYPE_CHECKING:
    from vram_utils.probe import PeakMeter

DEFAULT_INTERVAL_S = 0.25
DEFAULT_MAX_SAMPLES = 2000
DEFAULT_TICK_S = 0.025
MAX_MARKS = 1000


def gpu_index_of(device: str | int | None) -> int | None:
    """The GPU index of a plan's device ("cuda:1" -> 1, "cpu"/"cuda"/None -> None, 2 -> 2)."""
    if device is None or isinstance(device, int):
        return device
    head, _, tail = str(device).partition(":")
    return int(tail) if head == "cuda" and tail.isdigit() else None


def read_memory(gpu_index: int | None = None, proc: psutil.Process | None = None) -> tuple[int, int, int]:
    """(process RSS, GPU allocated, GPU reserved) in bytes now; GPU 0, 0 until torch has initialised CUDA."""
    rss = int((proc or psutil.Process()).memory_info().rss)
    if not torch.cuda.is_initialized():
        return rss, 0, 0
    index = torch.cuda.current_device() if gpu_index is None else gpu_index
    stats = torch.cuda.memory_stats(index)
    return rss, int(stats.get("allocated_bytes.all.current", 0)), int(stats.get("reserved_bytes.all.current", 0))


class MemoryTimeline:
    """Sampled memory of this process over time, with stage boundaries. Thread-safe; a `with` block runs it."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        gpu_index: int | str | None = None,
        tick_s: float | None = None,
        peaks: bool = False,
        watch=None,
    ):
        if interval_s <= 0 or max_samples < 2:
            raise ValueError("interval_s must be > 0 and max_samples >= 2")
        self.interval_s = float(interval_s)  # the current resolution: doubles each time the buffer halves
        self.max_samples = int(max_samples)
        self.gpu_index = gpu_index_of(gpu_index)
        self.tick_s = float(tick_s) if tick_s else min(DEFAULT_TICK_S, self.interval_s / 4)
        self._k: list[int] = []  # bucket index: the sample covers [k * interval_s, (k + 1) * interval_s)
        self._rss: list[int] = []
        self._alloc: list[int] = []
        self._reserved: list[int] = []
        self._marks: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()
        self._cuda = False  # whether GPU series are reported (CUDA available or seen initialised)
        self._t0 = time.perf_counter()
        self._t_end: float | None = None
        # peaks=True: the run's one sampler also gives its measured peaks (PeakMeter without a thread of its own:
        # the kernel's exact high-water mark and CUDA's peak statistics, with these samples where VmHWM is missing)
        self.watch = watch  # a vram_utils.host_budget.HostWatch polled from the same thread (one sampler per run)
        self.meter: PeakMeter | None = None
        if peaks:
            from vram_utils.probe import PeakMeter

            self.meter = PeakMeter(interval_s=None, gpu_index=self.gpu_index)

    # ------------------------------------------------------------------ running

    def __enter__(self) -> "MemoryTimeline":
        if self.meter is not None:
            self.meter.__enter__()
        self._t0, self._t_end = time.perf_counter(), None
        self._cuda = torch.cuda.is_available()
        if self.gpu_index is None and torch.cuda.is_initialized():
            self.gpu_index = torch.cuda.current_device()  # the caller's device, not the sampling thread's
        self.observe()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="MemoryTimeline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.observe()
        self._t_end = time.perf_counter() - self._t0
        if self.meter is not None:
            self.meter.__exit__(*exc)

    def measured(self) -> dict[str, int]:
        """The peaks so far of a `peaks=True` timeline (PeakMeter.to_dict's fields): the kernel's high-water mark,
        CUDA's peak statistics, and these samples' highest RSS."""
        if self.meter is None:
            return {}
        self.meter.read()._note_host(self.peak_rss_bytes)
        return self.meter.to_dict()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.observe()
            if self.meter is not None:
                self.meter.note_anon(process_anon_bytes())
            if self.watch is not None:
                self.watch.poll(self.elapsed())

    def elapsed(self) -> float:
        """Seconds since the timeline started."""
        return time.perf_counter() - self._t0

    def observe(self) -> None:
        """Read memory now and fold it into the current bucket (the sampling thread calls this every tick)."""
        rss, alloc, reserved = read_memory(self.gpu_index, self._proc)
        self.record(self.elapsed(), rss, alloc, reserved)

    def record(self, t: float, rss: int, alloc: int = 0, reserved: int = 0) -> None:
        """Fold one reading taken `t` seconds after the start into its bucket (at the current resolution)."""
        with self._lock:
            self._cuda = self._cuda or torch.cuda.is_initialized()
            self._add(int(t // self.interval_s), int(rss), int(alloc), int(reserved))

    def _add(self, k: int, rss: int, alloc: int, reserved: int) -> None:
        if self._k and self._k[-1] >= k:  # same bucket (or a late reading): keep the max
            self._rss[-1] = max(self._rss[-1], rss)
            self._alloc[-1] = max(self._alloc[-1], alloc)
            self._reserved[-1] = max(self._reserved[-1], reserved)
            return
        self._k.append(k)
        self._rss.append(rss)
        self._alloc.append(alloc)
        self._reserved.append(reserved)
        while len(self._k) > self.max_samples:
            self._halve()

    def _halve(self) -> None:
        """Half the resolution: buckets k and k+1 (k even) merge into one, keeping the max of each series."""
        ks, cols = [], ([], [], [])
        for i, k in enumerate(self._k):
            values = (self._rss[i], self._alloc[i], self._reserved[i])
            if ks and ks[-1] == k // 2:
                for col, v in zip(cols, values):
                    col[-1] = max(col[-1], v)
            else:
                ks.append(k // 2)
                for col, v in zip(cols, values):
                    col.append(v)
        self._k, (self._rss, self._alloc, self._reserved) = ks, cols
        self.interval_s *= 2

    # ------------------------------------------------------------------ stages

    def mark(self, stage: str) -> None:
        """A stage boundary now. Repeating the current stage (progress events of one stage) records nothing."""
        stage = str(stage)
        with self._lock:
            if (self._marks and self._marks[-1]["stage"] == stage) or len(self._marks) >= MAX_MARKS:
                return
            self._marks.append({"t": round(self.elapsed(), 3), "stage": stage})
        if self._thread is not None:
            self.observe()  # the memory at the boundary, in the bucket it opens

    def tap(self, emit: Callable[[Any], None]) -> Callable[[Any], None]:
        """`emit` wrapped to mark each event's `.stage` first: `run.emit = timeline.tap(run.emit)`."""

        def emit_and_mark(event: Any) -> None:
            stage = getattr(event, "stage", None)
            if stage:
                self.mark(stage)
            emit(event)

        return emit_and_mark

    # ------------------------------------------------------------------ results

    @property
    def peak_rss_bytes(self) -> int:
        with self._lock:
            return max(self._rss, default=0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._k)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able snapshot (safe while running). Bytes; `t` in s from the start; each value is the max of
        its [t, t + interval_s) bucket. `gpu_allocated`/`gpu_reserved` only where CUDA is available."""
        with self._lock:
            out: dict[str, Any] = {
                "interval_s": self.interval_s,
                "unit": "bytes",
                "duration_s": round(self._t_end if self._t_end is not None else self.elapsed(), 3),
                "t": [round(k * self.interval_s, 3) for k in self._k],
                "rss": list(self._rss),
                "marks": [dict(m) for m in self._marks],
            }
            if self._cuda:
                out["gpu_allocated"] = list(self._alloc)
                out["gpu_reserved"] = list(self._reserved)
        return out
