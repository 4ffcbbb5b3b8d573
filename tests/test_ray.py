"""Jobs on Ray workers (engine/ray_workers.py): a local Ray with two CPU workers runs the queue's jobs on both; a
worker killed mid-job leaves every job done exactly once; a queue a crashed app left is recovered onto them."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

REQUEST = dict(model="tiny-wan", task="t2v", prompt="a cat walks on the beach", frames=9, height=32, width=32,
               steps=3, preset="balanced")


@pytest.fixture(scope="module")
def workers(tiny_models, tmp_path_factory):
    from engine.ray_workers import start_workers, stop_workers

    out = tmp_path_factory.mktemp("ray")
    started = start_workers("local", 2, out)
    yield out, started
    stop_workers(started)


def _queue(out: Path, workers):
    from engine.jobs import QUEUE_SUBDIR, JobQueue, is_complete, latents_saved

    queue = JobQueue(out / QUEUE_SUBDIR, workers=workers)
    queue.notes = queue.recover(is_complete, latents_saved)
    queue.start()
    return queue


def _request(**changes):
    from configs.schema import GenerationRequest

    return GenerationRequest(**{**REQUEST, **changes})


def _wait(jobs, timeout_s: float = 180) -> None:
    end = time.monotonic() + timeout_s
    for job in jobs:
        assert job.done.wait(max(0.0, end - time.monotonic())), f"job {job.id} still {job.state}"


def test_four_jobs_run_on_both_workers_and_each_sidecar_names_its_worker(workers):
    from conftest import read_video

    out, started = workers
    queue = _queue(out / "four", started)
    try:
        jobs = [queue.submit(_request(seed=i, steps=8), out / "four" / f"v{i}.mp4") for i in range(4)]
        _wait(jobs)
    finally:
        queue.close()
    assert [j.state for j in jobs] == ["done"] * 4, [j.error for j in jobs]
    names = {j.result.sidecar.worker["name"] for j in jobs}
    assert names == {"ray-0", "ray-1"}, names
    for job in jobs:
        assert job.worker == job.result.sidecar.worker["name"] and job.result.sidecar.worker["pid"] != os.getpid()
        assert read_video(job.result.video_path).shape[0] == 9


def test_a_worker_killed_mid_job_leaves_every_job_done_exactly_once(workers):
    import ray

    out, started = workers
    folder = out / "killed"
    queue = _queue(folder, started)
    try:
        jobs = [queue.submit(_request(seed=10 + i, steps=400 if i == 0 else 4), folder / f"v{i}.mp4") for i in range(3)]
        victim = jobs[0]
        end = time.monotonic() + 120
        while not (victim.last is not None and victim.last.stage == "denoising" and victim.last.step >= 3):
            assert time.monotonic() < end and not victim.done.is_set(), victim.last
            time.sleep(0.05)
        worker = next(w for w in started if w.name == victim.worker)
        pid = ray.get(worker.actor.info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)  # the worker's process dies mid-denoise
        _wait(jobs, 300)
    finally:
        queue.close()
    assert [j.state for j in jobs] == ["done"] * 3, [(j.state, j.error) for j in jobs]
    assert victim.resumed == "started over (its worker was lost before its latents were saved)"
    assert "denoising" in [e.stage for e in victim.stages]  # the actor's progress reached the app's job
    assert victim.result.sidecar.worker["pid"] != pid  # run again by a live process (the restarted actor or the other)
    assert sorted(p.name for p in folder.glob("*.mp4")) == ["v0.mp4", "v1.mp4", "v2.mp4"]  # one video each
    assert sorted(p.name for p in folder.glob("*.json")) == ["v0.json", "v1.json", "v2.json"]
    assert not list((folder / ".queue").glob("*.json"))  # every queue record written off once its result was


def test_a_queue_a_crashed_app_left_is_recovered_onto_the_workers(workers):
    from engine.jobs import QUEUE_SUBDIR, Job
    from engine.results import latents_path
    from decode.writer import write_json_atomic

    out, started = workers
    first = out / "first"
    queue = _queue(first, started)
    try:
        done = queue.submit(_request(seed=21), first / "a.mp4")
        _wait([done])
    finally:
        queue.close()
    # What a crash leaves: a job that had saved its latents (its video not yet written), one that had not.
    crashed = out / "crashed"
    (crashed / QUEUE_SUBDIR).mkdir(parents=True)
    shutil.copy(latents_path(first / "a.mp4"), latents_path(crashed / "a.mp4"))
    for name, seed in (("a", 21), ("b", 22)):
        job = Job(f"job{name}", "t2v", _request(seed=seed), str(crashed / f"{name}.mp4"), state="running")
        write_json_atomic(crashed / QUEUE_SUBDIR / f"{job.id}.json", job.to_record())
    queue = _queue(crashed, started)
    try:
        recovered = [queue.get("joba"), queue.get("jobb")]
        _wait(recovered)
    finally:
        queue.close()
    assert [j.state for j in recovered] == ["done", "done"], [j.error for j in recovered]
    assert recovered[0].resumed == "resumed from its saved latents (decode only)"
    assert recovered[0].result.sidecar.kind == "decode" and recovered[1].result.sidecar.kind == "generate"
    assert {j.result.sidecar.worker.get("name", "") for j in recovered[1:]} <= {"ray-0", "ray-1"}


JOIN = r'''
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from configs.schema import GenerationRequest
from engine.jobs import QUEUE_SUBDIR, JobQueue
from engine.ray_workers import start_workers, stop_workers
out = Path(sys.argv[3])
workers = start_workers(sys.argv[2], 1, out)
queue = JobQueue(out / QUEUE_SUBDIR, workers=workers)
queue.start()
job = queue.submit(GenerationRequest(model="tiny-wan", task="t2v", prompt="a cat", frames=5, height=32, width=32,
                                     steps=2, seed=1), out / "joined.mp4")
job.done.wait(300)
queue.close()
print("JOINED", job.state, job.error, job.result.sidecar.worker["name"] if job.result else "")
stop_workers(workers)
'''


def test_an_app_joins_a_cluster_started_with_ray_start(tiny_models, tmp_path):
    """`--ray auto`: a head started by `ray start` (as a person starts one on each machine), the app's worker on it.
    (`auto` finds it as a person's would on the head machine; a bare address is the same call, `ray.init(address)`,
    which this sandbox's node address does not route.) `ray stop` at the end ends every Ray here: this test runs
    last in this file, whose module Ray is then shut down anyway."""
    import socket
    import subprocess
    import sys

    ray_cli = Path(sys.executable).parent / "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": ""}
    subprocess.run([str(ray_cli), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120, env=env)
    try:
        out = subprocess.run([sys.executable, "-c", JOIN, str(Path(__file__).resolve().parents[1]), "auto",
                              str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("JOINED")), out.stderr[-2000:])
        assert line == "JOINED done  ray-0", line
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120, env=env)
