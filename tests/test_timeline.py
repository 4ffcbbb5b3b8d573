"""Memory as pictures: the run's memory timeline (vram_utils/timeline.py) and the charts (reports/charts.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import gradio as gr
import pandas as pd
import pytest

from configs.schema import GenerationRequest
from configs.registry import get_model_spec
from reports import charts
from tests.conftest import ROOT
from vram_utils import plan_for
from vram_utils.probe import GIB
from vram_utils.timeline import MemoryTimeline, gpu_index_of

sys.path.insert(0, str(ROOT / "bench"))
import plan_table  # noqa: E402

MIB = 2**20
WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

# A ~1.8 s run in a process of its own (threads of other tests must not move this process's RSS): 400 MiB
# held for 1.2 s inside a PeakMeter and a MemoryTimeline, entered in that order (the meter resets the kernel's
# high-water mark first, so every timeline sample is one the meter could see).
_CHILD = """
import json, time, torch, vram_utils
from vram_utils.timeline import MemoryTimeline
with vram_utils.PeakMeter() as meter, MemoryTimeline() as tl:
    tl.mark("loading"); time.sleep(0.3)
    tl.mark("denoising")
    block = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    time.sleep(1.2)
    tl.mark("denoising")  # a repeated stage is no boundary
    del block
    tl.mark("decoding"); time.sleep(0.3)
d = tl.to_dict()
print(json.dumps({"meter": meter.to_dict(), "timeline": d, "json_ok": json.loads(json.dumps(d)) == d}))
"""


@pytest.fixture(scope="module")
def child():
    proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_timeline_samples_at_least_every_half_second_with_ordered_marks(child):
    tl = child["timeline"]
    assert child["json_ok"]
    assert tl["interval_s"] == 0.25 and tl["unit"] == "bytes"
    t = tl["t"]
    assert t[0] == 0.0 and tl["duration_s"] >= 1.5
    assert len(t) >= 1.5 / 0.5 and all(0 < b - a <= 0.5 for a, b in zip(t, t[1:]))
    assert t[-1] >= tl["duration_s"] - 0.5  # covers the whole block
    assert len(tl["rss"]) == len(t)
    assert [m["stage"] for m in tl["marks"]] == ["loading", "denoising", "decoding"]
    times = [m["t"] for m in tl["marks"]]
    assert times == sorted(times) and times[1] - times[0] >= 0.25 and times[2] - times[1] >= 1.1
    if "gpu_allocated" in tl:  # only where CUDA is available (never invented without it)
        assert len(tl["gpu_allocated"]) == len(tl["gpu_reserved"]) == len(t)


def test_timeline_peak_matches_the_peak_meter(child):
    # The meter's host peak is exact (the kernel's VmHWM, plus its 5 ms sampling); the timeline keeps the max of
    # its 25 ms readings per bucket. Fair: never above the exact peak, and a 1.2 s plateau is not missed.
    meter, tl = child["meter"], child["timeline"]
    peak = meter["peak_host_bytes"]
    assert max(tl["rss"]) <= peak
    assert max(tl["rss"]) >= 0.9 * peak
    assert max(tl["rss"]) - meter["baseline_host_bytes"] >= 0.9 * 400 * MIB
    plateau = [r for r in tl["rss"] if r >= 0.9 * peak]
    assert len(plateau) >= 4  # ~1.2 s of samples at 0.25 s, not one lucky point


def test_decimation_keeps_the_peak_and_stays_under_the_cap():
    tl = MemoryTimeline(interval_s=0.25, max_samples=100)
    spike_k = 3333
    for k in range(10_000):  # 2500 s of readings, one per base bucket
        tl.record(k * 0.25 + 0.01, GIB + (5 * GIB if k == spike_k else k), k, 2 * k)
    d = tl.to_dict()
    assert 50 <= len(d["t"]) <= 100
    assert d["interval_s"] == 0.25 * 2 ** 7  # 10000 buckets -> 100 after halving 7 times (78 kept)
    assert max(d["rss"]) == 6 * GIB  # the spike survives every merge
    assert tl.peak_rss_bytes == 6 * GIB and len(tl) == len(d["t"])
    assert d["t"] == sorted(d["t"]) and all(b - a == d["interval_s"] for a, b in zip(d["t"], d["t"][1:]))
    spike_t = d["t"][d["rss"].index(6 * GIB)]
    assert spike_t <= spike_k * 0.25 < spike_t + d["interval_s"]  # the bucket that covers the spike's time


def test_gpu_index_of_a_plan_device_and_a_tap_marks_stages():
    assert [gpu_index_of(d) for d in ("cuda:1", "cuda", "cpu", None, 2)] == [1, None, None, None, 2]
    tl, seen = MemoryTimeline(), []
    emit = tl.tap(seen.append)

    class Event:
        def __init__(self, stage):
            self.stage = stage

    for stage in ("loading", "denoising", "denoising", "decoding"):
        emit(Event(stage))
    assert [e.stage for e in seen] == ["loading", "denoising", "denoising", "decoding"]
    assert [m["stage"] for m in tl.to_dict()["marks"]] == ["loading", "denoising", "decoding"]


# --------------------------------------------------------------------------- charts


def _plan(gpu_gb):
    spec = get_model_spec(WAN_1_3B)
    request = GenerationRequest(model=WAN_1_3B, task="t2v", prompt="a cat on a beach")
    return plan_for(request, spec, plan_table.machine(gpu_gb, 32))


def test_plan_chart_one_row_per_stage_and_series_in_gib():
    plan = _plan(24)
    df = charts.plan_chart(plan)
    assert list(df.columns) == charts.PLAN_COLUMNS
    assert not df.duplicated(["stage", "series"]).any() and df["bar"].is_unique
    stages = list(dict.fromkeys([*plan.stages, *plan.host_stages]))
    assert len(df) == 4 * len(stages) and list(dict.fromkeys(df["stage"])) == stages
    got = {(r.stage, r.series): r.GiB for r in df.itertuples()}
    for stage in stages:
        assert got[(stage, "GPU peak")] == pytest.approx(plan.stages[stage] / 2**30, abs=1e-3)
        assert got[(stage, "RAM peak")] == pytest.approx(plan.host_stages[stage] / 2**30, abs=1e-3)
        assert got[(stage, "GPU budget")] == pytest.approx(plan.budget_bytes / 2**30, abs=1e-3)
        assert got[(stage, "RAM budget")] == pytest.approx(plan.host_budget_bytes / 2**30, abs=1e-3)
    cpu = charts.plan_chart(_plan(None))  # no GPU: only RAM, never a "GPU" series
    assert set(cpu["series"]) == {"RAM peak", "RAM budget"} and len(cpu) == 2 * len(_plan(None).host_stages)
    empty = charts.plan_chart(None)
    assert empty.empty and list(empty.columns) == charts.PLAN_COLUMNS
    for value in (df, empty):
        data = gr.BarPlot(value=value, **charts.PLAN_PLOT, sort=list(value["bar"])).postprocess(value)
        assert data.columns == charts.PLAN_COLUMNS and data.datatypes["GiB"] == "quantitative"
        assert len(data.data) == len(value)


def test_timeline_chart_from_a_sidecar_dict(child):
    tl = child["timeline"]
    df = charts.timeline_chart(tl)
    assert list(df.columns) == charts.TIMELINE_COLUMNS
    rss = df[df["series"] == charts.RSS]
    assert list(rss["t_s"]) == tl["t"]
    assert list(rss["GiB"]) == pytest.approx([v / 2**30 for v in tl["rss"]], abs=1e-3)
    assert set(df["series"]) == ({charts.RSS, charts.GPU_ALLOCATED, charts.GPU_RESERVED} if "gpu_allocated" in tl
                                 else {charts.RSS})
    # each sample carries the stage it falls in; stages appear in the order they were marked
    assert list(dict.fromkeys(s for s in rss["stage"] if s)) == ["loading", "denoising", "decoding"]
    marks = charts.marks_frame(tl)
    assert list(marks.columns) == charts.MARK_COLUMNS and list(marks["stage"]) == ["loading", "denoising", "decoding"]
    assert charts.marks_caption(tl).startswith("loading 0.0 s · denoising 0.3 s")
    for value in (df, charts.timeline_chart(None), charts.timeline_chart({"t": [], "rss": []})):
        assert list(value.columns) == charts.TIMELINE_COLUMNS
        data = gr.LinePlot(value=value, **charts.TIMELINE_PLOT).postprocess(value)
        assert data.mark == "line" and len(data.data) == len(value)
    assert charts.marks_frame({}).empty and charts.marks_caption(None) == ""


def test_live_chart_keeps_a_rolling_window():
    live = charts.LiveMemory(window_s=60.0, maxlen=50)
    for i in range(100):
        live.sample(now=1000.0 + i)  # one a second for 100 s; the ring keeps the last 50
    assert len(live.samples()) == 50
    df = live.frame()
    assert list(df.columns) == charts.LIVE_COLUMNS
    rss = df[df["series"] == charts.RSS]
    assert rss["t_s"].min() == -49 and rss["t_s"].max() == 0 and (rss["GiB"] > 0).all()
    assert len(charts.live_chart(live.samples(), window_s=10)) in (11, 22)  # RSS (+ GPU where CUDA is)
    no_gpu = charts.live_chart([(0.0, GIB, None), (1.0, 2 * GIB, None)])
    assert list(no_gpu["series"]) == [charts.RSS] * 2 and list(no_gpu["GiB"]) == [1.0, 2.0]
    empty = charts.live_chart([])
    assert empty.empty and list(empty.columns) == charts.LIVE_COLUMNS
    for value in (df, empty):
        assert gr.LinePlot(value=value, **charts.LIVE_PLOT).postprocess(value).columns == charts.LIVE_COLUMNS
    assert isinstance(charts.LIVE, charts.LiveMemory) and isinstance(charts.LIVE.frame(), pd.DataFrame)
