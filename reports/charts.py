"""Memory as pictures: pandas DataFrames for Gradio's native plots (`gr.BarPlot`, `gr.LinePlot`).

Pure functions of a Plan or a run's `memory_timeline` (vram_utils/timeline.py `MemoryTimeline.to_dict()`),
plus `LIVE`, a small ring buffer for the live memory panel. Values are GiB (2**30 bytes), named so in the
column; nothing is invented: a series the machine does not have (GPU without CUDA) is left out, and empty
input gives an empty frame with the right columns.

    gr.BarPlot(plan_chart(plan), **PLAN_PLOT, sort=list(plan_chart(plan)["bar"]))
    gr.LinePlot(timeline_chart(tl), **TIMELINE_PLOT, caption=marks_caption(tl))
    gr.LinePlot(LIVE.frame(), **LIVE_PLOT)
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Any, Iterable

import pandas as pd

GIB = 2**30

PLAN_COLUMNS = ["bar", "stage", "series", "GiB"]
TIMELINE_COLUMNS = ["t_s", "GiB", "series", "stage"]
MARK_COLUMNS = ["t_s", "stage"]
LIVE_COLUMNS = ["t_s", "GiB", "series"]

GPU_PEAK, RAM_PEAK, GPU_BUDGET, RAM_BUDGET = "GPU peak", "RAM peak", "GPU budget", "RAM budget"
RSS, GPU_ALLOCATED, GPU_RESERVED = "RAM (process RSS)", "GPU allocated", "GPU reserved"

# Keyword arguments for the plots. The plan chart's x is one label per bar ("denoise · GPU peak"): Gradio's
# BarPlot stacks bars that share an x, and a peak stacked on its budget would lie.
PLAN_PLOT = dict(x="bar", y="GiB", color="series", x_title="stage", y_title="GiB", x_label_angle=-30)
TIMELINE_PLOT = dict(x="t_s", y="GiB", color="series", x_title="seconds", y_title="GiB",
                     tooltip=["t_s", "GiB", "series", "stage"])
LIVE_PLOT = dict(x="t_s", y="GiB", color="series", x_title="seconds (0 = now)", y_title="GiB")


def _gib(n: float | int | None) -> float:
    return round(float(n or 0) / GIB, 3)


def _empty(columns: list[str]) -> pd.DataFrame:
    numeric = {"GiB", "t_s"}
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in numeric else "str") for c in columns})


# --------------------------------------------------------------------------- the pre-flight plan


def plan_chart(plan: Any) -> pd.DataFrame:
    """Predicted peak per stage against its budget, GiB, long format: one row per (stage, series).

    Series "GPU peak"/"GPU budget" from `plan.stages`/`plan.budget_bytes` (only when the plan computes on a
    GPU), "RAM peak"/"RAM budget" from `plan.host_stages`/`plan.host_budget_bytes`. On a CPU plan `stages`
    is host RAM already (the same as `host_stages`), so only the RAM series are shown.
    """
    if plan is None:
        return _empty(PLAN_COLUMNS)
    on_gpu = str(getattr(plan, "device", "cpu")).startswith("cuda")
    host_stages = dict(getattr(plan, "host_stages", None) or {})
    gpu_stages = dict(getattr(plan, "stages", None) or {}) if on_gpu else {}
    if not on_gpu and not host_stages:  # an older plan without host numbers: its stages are host RAM
        host_stages = dict(getattr(plan, "stages", None) or {})
    rows = []
    for stage in list(dict.fromkeys([*gpu_stages, *host_stages])):
        if stage in gpu_stages:
            rows.append((stage, GPU_PEAK, gpu_stages[stage]))
            if plan.budget_bytes:
                rows.append((stage, GPU_BUDGET, plan.budget_bytes))
        if stage in host_stages:
            rows.append((stage, RAM_PEAK, host_stages[stage]))
            if getattr(plan, "host_budget_bytes", 0):
                rows.append((stage, RAM_BUDGET, plan.host_budget_bytes))
    if not rows:
        return _empty(PLAN_COLUMNS)
    return pd.DataFrame(
        [(f"{stage} · {series}", stage, series, _gib(n)) for stage, series, n in rows], columns=PLAN_COLUMNS
    )


# --------------------------------------------------------------------------- a run's timeline


def _stage_at(marks: list[dict], times: list[float]) -> list[str]:
    """The stage in effect at each time: the last mark at or before it ("" before the first). A stage that
    lasts at least one interval_s holds at least one sample's start time, so it shows."""
    mark_t = [float(m["t"]) for m in marks]
    out = []
    for t in times:
        i = bisect.bisect_right(mark_t, t + 1e-9)
        out.append(str(marks[i - 1]["stage"]) if i else "")
    return out


def timeline_chart(memory_timeline: dict | None) -> pd.DataFrame:
    """A run's sidecar `memory_timeline` as GiB over seconds, long format (series: RSS, GPU allocated, GPU
    reserved where recorded), with the stage each sample falls in (`stage`, for the tooltip)."""
    tl = memory_timeline or {}
    times = [float(t) for t in tl.get("t") or []]
    if not times:
        return _empty(TIMELINE_COLUMNS)
    marks = sorted(tl.get("marks") or [], key=lambda m: float(m["t"]))
    stages = _stage_at(marks, times)
    frames = []
    for key, series in (("rss", RSS), ("gpu_allocated", GPU_ALLOCATED), ("gpu_reserved", GPU_RESERVED)):
        values = tl.get(key)
        if not values:
            continue
        n = min(len(values), len(times))
        frames.append(pd.DataFrame({
            "t_s": times[:n], "GiB": [_gib(v) for v in values[:n]], "series": series, "stage": stages[:n],
        }))
    return pd.concat(frames, ignore_index=True)[TIMELINE_COLUMNS] if frames else _empty(TIMELINE_COLUMNS)


def marks_frame(memory_timeline: dict | None) -> pd.DataFrame:
    """The stage boundaries: one row per mark, in time order (t_s, stage)."""
    marks = (memory_timeline or {}).get("marks") or []
    if not marks:
        return _empty(MARK_COLUMNS)
    rows = sorted(((float(m["t"]), str(m["stage"])) for m in marks), key=lambda r: r[0])
    return pd.DataFrame(rows, columns=MARK_COLUMNS)


def marks_caption(memory_timeline: dict | None) -> str:
    """The stage boundaries as one line for a plot's caption: "loading 0.0 s · encoding 3.2 s · …"."""
    marks = marks_frame(memory_timeline)
    return " · ".join(f"{r.stage} {r.t_s:.1f} s" for r in marks.itertuples())


# --------------------------------------------------------------------------- the live panel


def live_chart(samples: Iterable[tuple], window_s: float = 60.0, now: float | None = None) -> pd.DataFrame:
    """Samples (t, rss_bytes, gpu_allocated_bytes or None) of the last `window_s` seconds, t relative to
    `now` (the latest sample by default: 0 = now, earlier ones negative). GPU rows only where measured."""
    rows = [s for s in samples if s is not None]
    if not rows:
        return _empty(LIVE_COLUMNS)
    end = max(r[0] for r in rows) if now is None else now
    out = []
    for t, rss, gpu in rows:
        if end - t > window_s:
            continue
        out.append((round(t - end, 2), _gib(rss), RSS))
        if gpu is not None:
            out.append((round(t - end, 2), _gib(gpu), GPU_ALLOCATED))
    return pd.DataFrame(out, columns=LIVE_COLUMNS) if out else _empty(LIVE_COLUMNS)


class LiveMemory:
    """A rolling window of this process's memory for the live panel: call `sample()` on each timer tick,
    show `frame()`. Thread-safe (Gradio handlers run in worker threads)."""

    def __init__(self, window_s: float = 60.0, maxlen: int = 600, gpu_index: int | None = None):
        self.window_s = window_s
        self.gpu_index = gpu_index
        self._ring: deque[tuple[float, int, int | None]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._has_cuda: bool | None = None

    def sample(self, now: float | None = None) -> tuple[float, int, int | None]:
        """Append (monotonic t, process RSS, GPU allocated or None without CUDA) and return it."""
        from vram_utils.timeline import read_memory

        if self._has_cuda is None:
            import torch

            self._has_cuda = torch.cuda.is_available()
        rss, alloc, _ = read_memory(self.gpu_index)
        row = (time.monotonic() if now is None else now, rss, alloc if self._has_cuda else None)
        with self._lock:
            self._ring.append(row)
        return row

    def samples(self) -> list[tuple[float, int, int | None]]:
        with self._lock:
            return list(self._ring)

    def frame(self, now: float | None = None) -> pd.DataFrame:
        return live_chart(self.samples(), self.window_s, now)

    def clear(self) -> None:
        with self._lock:
            self._ring.clear()


LIVE = LiveMemory()  # the app's one live buffer (module level: every session's timer feeds the same window)
