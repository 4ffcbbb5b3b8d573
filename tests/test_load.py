"""Load: 20 jobs from 5 threads through gradio_client on the tiny model, against a small queue.

Each job either finishes with its own output file or is refused cleanly because the queue is full;
no two outputs collide; memory after the burst is within 5% of before. Bounded in count and time,
loopback only.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import app
from tests.conftest import read_video
from vram_utils import release_memory

JOBS, THREADS, QUEUE_SIZE, DEADLINE_S = 20, 5, 3, 600


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    from engine.cache import PipelineCache
    from engine.runner import Runner

    outputs = tmp_path_factory.mktemp("load-outputs")
    ui = app.build_app(Runner(PipelineCache(max_size=2), outputs_dir=outputs), queue_size=QUEUE_SIZE)
    url = app.serve(ui, max_file_size="1mb")
    yield ui, url, outputs
    ui.demo.close()


def _rss_after_release() -> int:
    release_memory()
    return psutil.Process().memory_info().rss


def test_twenty_jobs_from_five_threads_finish_or_are_refused_cleanly(served):
    from gradio_client import Client

    ui, url, outputs = served
    kwargs = dict(model="tiny-cogvideox", prompt="a red car on a street", steps=2, frames=9, resolution="32x32")
    warm = Client(url, verbose=False)
    warm.predict(**kwargs, seed=0, api_name="/t2v")  # the model is cached: the baseline includes it
    local = threading.local()
    results: list[tuple[int, str, object]] = []
    lock = threading.Lock()

    def job(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        seed = i % 3  # same seeds within the same second: output names must still not collide
        try:
            video, used_seed, _, _job = local.client.predict(**kwargs, seed=seed, api_name="/t2v")
            outcome = ("done", video, used_seed)
        except Exception as exc:  # the only acceptable failure is a full queue
            outcome = ("refused", str(exc), None)
        with lock:
            results.append((i, *outcome))

    with ThreadPoolExecutor(THREADS) as pool:
        # A first round from the same threads: their clients, and the heap each server and client thread keeps
        # (glibc gives each thread an arena of its own), are in the baseline; what the burst adds must not be.
        list(pool.map(job, range(-THREADS, 0)))
        rss_before = _rss_after_release()
        first = sum(r[1] == "done" for r in results)  # the first round's videos
        results.clear()
        start = time.monotonic()
        list(pool.map(job, range(JOBS)))
    elapsed = time.monotonic() - start
    assert elapsed < DEADLINE_S

    done = [r for r in results if r[1] == "done"]
    refused = [r for r in results if r[1] == "refused"]
    assert len(results) == JOBS
    for _, _, message, _ in refused:
        assert "queue" in message.lower() and "full" in message.lower(), message
    assert done, "no job finished"
    names = [str(video).rsplit("/", 1)[-1] for _, _, video, _ in done]
    saved = sorted(p.name for p in outputs.glob("*_t2v_*.mp4"))
    assert len(saved) == len(done) + 1 + first  # + the warm-ups; every finished job has its own file
    assert len(set(saved)) == len(saved)
    for _, _, video, seed in done:
        assert read_video(video).shape == (9, 32, 32, 3)
    assert not list(outputs.glob(".*partial*"))
    rss_after = _rss_after_release()
    assert rss_after / rss_before <= 1.05, (rss_before, rss_after)
    leaks = [r for r in ui.ctx.runner.sentinel.history if r.leaked]
    assert not leaks, [r.line() for r in leaks]
    print(f"load: {len(done)} done, {len(refused)} refused in {elapsed:.1f} s; RSS {rss_after / rss_before:.3f}x; "
          f"names unique: {len(set(names)) == len(names)}")
