"""Jobs that outlive the page and the process (engine/jobs.py, the app's Jobs panel).

The queue on its own with a stand-in runner (order, files on disk, stop, damaged files, nothing run twice); a
real interrupted job resumed from its latents; two logins that see only their own jobs; and the app killed
with SIGKILL mid-run and started again on the same outputs folder.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, read_video

import app
from configs.schema import GenerationRequest
from engine.jobs import QUEUE_SUBDIR, Job, JobQueue, QueueFull, is_complete, latents_saved, run_job
from engine.results import latents_path, list_results, sidecar_path


def _request(seed: int, **kw) -> GenerationRequest:
    return GenerationRequest(model="tiny-cogvideox", task="t2v", prompt="a red car", frames=9, height=32, width=32,
                             steps=2, seed=seed, **kw)


class _Gate:
    """A stand-in runner: each job waits for the gate, records its order, returns a fake result."""

    def __init__(self):
        self.open, self.ran = threading.Event(), []

    def __call__(self, job: Job):
        self.ran.append(job.request.seed)
        self.open.wait(10)
        if job.stop.is_set():
            from engine.runner import Cancelled

            raise Cancelled("stopped by request")
        return {"seed": job.request.seed}


def test_jobs_are_written_before_they_run_run_in_order_and_their_files_go_when_done(tmp_path):
    gate = _Gate()
    queue = JobQueue(tmp_path / QUEUE_SUBDIR, gate, max_waiting=2)
    first = queue.submit(_request(1), tmp_path / "a.mp4", owner="ann")
    deadline = time.monotonic() + 5
    while first.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    second = queue.submit(_request(2), tmp_path / "a.mp4")  # the same name as a queued job: another one
    third = queue.submit(_request(3), tmp_path / "b.mp4")
    assert second.out_path != first.out_path and Path(second.out_path).name == "a-1.mp4"
    with pytest.raises(QueueFull, match="queue is full"):
        queue.submit(_request(4), tmp_path / "c.mp4")
    files = {p.stem: json.loads(p.read_text()) for p in (tmp_path / QUEUE_SUBDIR).glob("*.json")}
    assert files[first.id]["state"] == "running" and files[second.id]["state"] == "waiting"
    from engine.resolve import resolve

    assert GenerationRequest.from_dict(files[third.id]["request"]) == resolve(_request(3)).request  # as resolved
    assert queue.ahead(third) == 2 and queue.ahead(second) == 1
    assert [j.id for j in queue.jobs()] == [first.id, second.id, third.id]
    assert [j.id for j in queue.jobs(owner="ann")] == [first.id]
    assert queue.stop(second.id, owner="ann") is None  # not hers
    assert queue.stop(second.id).state == "stopped"  # waiting: never runs
    gate.open.set()
    assert third.done.wait(10) and first.done.wait(10)
    queue.close()
    assert gate.ran == [1, 3] and first.state == third.state == "done" and third.result == {"seed": 3}
    assert list((tmp_path / QUEUE_SUBDIR).glob("*.json")) == []


def test_recovery_reruns_waiting_jobs_skips_finished_ones_and_sets_damaged_files_aside(tmp_path):
    folder = tmp_path / QUEUE_SUBDIR
    folder.mkdir()
    finished = Job("done1", "t2v", _request(1), str(tmp_path / "done.mp4"), state="running")
    waiting = Job("wait1", "t2v", _request(2), str(tmp_path / "wait.mp4"))
    for job in (finished, waiting):
        (folder / f"{job.id}.json").write_text(json.dumps(job.to_record()))
    (folder / "broken.json").write_text('{"id": "broken", "task"')
    (tmp_path / "done.mp4").write_bytes(b"video")
    sidecar_path(tmp_path / "done.mp4").write_text("{}")
    gate = _Gate()
    gate.open.set()
    queue = JobQueue(folder, gate)
    notes = queue.recover(is_complete, latents_saved)
    assert any("broken.json is damaged" in n for n in notes) and (folder / "broken.bad").is_file()
    assert any("done1 had finished" in n for n in notes) and any("wait1 was waiting" in n for n in notes)
    queue.start()
    assert queue.get("wait1").done.wait(10)
    queue.close()
    assert gate.ran == [2]  # the finished job never ran again


def test_an_interrupted_job_with_saved_latents_resumes_with_the_decode_only(tmp_path, tiny_models):
    from engine.cache import PipelineCache
    from engine.runner import Runner

    runner = Runner(PipelineCache(max_size=1), outputs_dir=tmp_path)
    done = runner.generate(_request(7), out_path=tmp_path / "x.mp4")
    frames = read_video(done.video_path)
    done.video_path.unlink()  # as if the app died after saving the latents, during the decode
    done.sidecar_path.unlink()
    (tmp_path / QUEUE_SUBDIR).mkdir()
    record = Job("cut1", "t2v", done.request, str(tmp_path / "x.mp4"), state="running").to_record()
    (tmp_path / QUEUE_SUBDIR / "cut1.json").write_text(json.dumps(record))
    loads_before = runner.cache.loads
    queue = JobQueue(tmp_path / QUEUE_SUBDIR, lambda job: run_job(runner, job))
    [note] = queue.recover(is_complete, latents_saved)
    assert "resumed from its saved latents" in note
    queue.start()
    job = queue.get("cut1")
    assert job.done.wait(60) and job.state == "done", job.error
    queue.close()
    assert runner.cache.loads == loads_before  # no pipeline loaded: the decode alone ran
    again = read_video(tmp_path / "x.mp4")
    assert again.shape == frames.shape and abs(again.astype(int) - frames.astype(int)).max() <= 2  # same latents
    assert json.loads(sidecar_path(tmp_path / "x.mp4").read_text())["kind"] == "decode"
    assert latents_path(tmp_path / "x.mp4").is_file()


# --------------------------------------------------------------------------- two logins


@pytest.fixture(scope="module")
def two_users(tmp_path_factory, tiny_models):
    from engine.cache import PipelineCache
    from engine.runner import Runner

    outputs = tmp_path_factory.mktemp("auth-outputs")
    ui = app.build_app(Runner(PipelineCache(max_size=1), outputs_dir=outputs), queue_size=4)
    url = app.serve(ui, auth=[("ann", "pw-a"), ("bob", "pw-b")], max_file_size="1mb")
    yield ui, url
    ui.demo.close()
    ui.ctx.queue.close()


def test_each_login_sees_and_stops_only_its_own_jobs(two_users):
    from gradio_client import Client

    ui, url = two_users
    ann, bob = Client(url, auth=("ann", "pw-a"), verbose=False), Client(url, auth=("bob", "pw-b"), verbose=False)
    slow = dict(model="tiny-cogvideox", prompt="a slow boat", steps=100, frames=33, resolution="64x64", seed=5)
    running = ann.submit(**slow, api_name="/t2v")
    deadline = time.monotonic() + 60
    while not [j for j in ann.predict(api_name="/jobs") if j["state"] == "running"]:
        assert time.monotonic() < deadline, "ann's job never started"
        time.sleep(0.1)
    [mine] = [j for j in ann.predict(api_name="/jobs") if j["state"] == "running"]
    assert mine["owner"] == "ann" and mine["prompt"] == "a slow boat"
    assert bob.predict(api_name="/jobs") == []  # nothing of ann's
    with pytest.raises(Exception, match="no job"):
        bob.predict(mine["id"], api_name="/stop_job")
    assert ui.ctx.queue.get(mine["id"]).state == "running"
    ann.predict(mine["id"], api_name="/stop_job")
    running.result(timeout=60)
    assert ui.ctx.queue.get(mine["id"]).state == "stopped"


# --------------------------------------------------------------------------- killed and started again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(outputs: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--outputs-dir", str(outputs)],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_up(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> str:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the app did not start: {log.read_text()[-2000:]}")


def _queue_states(outputs: Path) -> dict[str, str]:
    states = {}
    for p in (outputs / QUEUE_SUBDIR).glob("*.json"):
        try:
            states[p.stem] = json.loads(p.read_text())["state"]
        except (OSError, ValueError):
            pass
    return states


def test_a_killed_app_runs_its_queue_after_a_restart_and_nothing_runs_twice(tmp_path, tiny_models):
    from gradio_client import Client

    outputs, port = tmp_path / "outputs", _free_port()
    proc = _launch(outputs, port, tmp_path / "first.log")
    try:
        client = Client(_wait_up(port, proc, tmp_path / "first.log"), verbose=False)
        slow = dict(model="tiny-cogvideox", prompt="a slow train", frames=17, resolution="64x64", steps=100)
        for seed in (11, 12, 13):  # queued from a page that goes away with the app
            client.submit(**slow, seed=seed, api_name="/t2v")
        deadline = time.monotonic() + 60
        while sorted(_queue_states(outputs).values()) != ["running", "waiting", "waiting"]:
            assert time.monotonic() < deadline, _queue_states(outputs)
            time.sleep(0.05)
        time.sleep(1.0)  # mid-denoise
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(_queue_states(outputs).values()) == ["running", "waiting", "waiting"]
    again = _launch(outputs, port, tmp_path / "second.log")
    try:
        _wait_up(port, again, tmp_path / "second.log")
        deadline = time.monotonic() + 240
        while _queue_states(outputs) or len(list_results(outputs)) < 3:
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()[-2000:]
            time.sleep(0.2)
    finally:
        again.terminate()
        again.wait(30)
    log = (tmp_path / "second.log").read_text()
    assert "was running when the app stopped" in log and log.count("was waiting: it runs again") == 2
    results = list_results(outputs)
    seeds = sorted(r.data["request"]["seed"] for r in results)
    assert seeds == [11, 12, 13]  # each job once: no duplicate, none lost
    for r in results:
        assert read_video(r.video).shape[0] == 17
    assert not [p for p in outputs.iterdir() if ".partial" in p.name or p.suffix == ".tmp"]


def test_a_job_goes_to_a_worker_whose_plan_fits_it_and_to_the_one_holding_its_model(tiny_models, tmp_path):
    from configs.schema import GenerationRequest
    from engine.jobs import JobQueue

    class Worker:  # the shape engine/jobs.py asks of a worker (engine/ray_workers.py RayWorker in the app)
        def __init__(self, name, fits, held=()):
            self.name, self._fits, self._held = name, fits, set(held)

        def holds(self, model):
            return model in self._held

        def fits(self, job):
            return self._fits(job)

        def run(self, job):
            raise AssertionError("not started")

    def req(model, seed):
        return GenerationRequest(model=model, task="t2v", prompt="a cat", frames=9, height=32, width=32, seed=seed)

    small = Worker("small", lambda job: job.request.model != "tiny-wan")  # its plan fits no tiny-wan job
    big = Worker("big", lambda job: True, held=("tiny-wan",))
    queue = JobQueue(tmp_path / "q", workers=[small, big])
    queue.start = lambda: None  # no worker threads (submit starts them): _pick is asked directly
    wan = queue.submit(req("tiny-wan", 1), tmp_path / "a.mp4")
    cog = queue.submit(req("tiny-cogvideox", 2), tmp_path / "b.mp4")
    assert queue._pick(small) is cog  # the older job does not fit it
    assert queue._pick(big) is wan  # the oldest, and its model is there
    lonely = JobQueue(tmp_path / "q2", workers=[Worker("only", lambda job: False), Worker("other", lambda job: False)])
    lonely.start = lambda: None
    job = lonely.submit(req("tiny-wan", 3), tmp_path / "c.mp4")
    assert lonely._pick(lonely.workers[0]) is job  # no worker's plan fits: any takes it (the run says why)


def test_a_worker_gone_for_good_hands_its_job_to_the_others_and_leaves_the_queue(tiny_models, tmp_path):
    from configs.schema import GenerationRequest
    from engine.jobs import JobQueue, WorkerLost

    class Gone:  # a Ray worker whose actor Ray gave up restarting: every call fails
        name, runs = "gone", 0

        def holds(self, model):
            return True  # it would be preferred: it must still not keep the job

        def fits(self, job):
            return True

        def alive(self):
            return False

        def run(self, job):
            Gone.runs += 1
            raise WorkerLost("gone: the actor died and was not restarted")

    class Live:
        name = "live"

        def holds(self, model):
            return False

        def fits(self, job):
            return True

        def alive(self):
            return True

        def run(self, job):
            time.sleep(0.3)  # the gone worker asks first
            return "a result"

    queue = JobQueue(tmp_path / "q", workers=[Gone(), Live()])
    job = queue.submit(GenerationRequest(model="tiny-wan", task="t2v", prompt="a cat", frames=5, height=32, width=32),
                       tmp_path / "a.mp4")
    queue.start()
    try:
        assert job.done.wait(30) and job.state == "done" and job.result == "a result"
    finally:
        queue.close()
    assert Gone.runs <= 1 and [w.name for w in queue.workers] == ["live"]
    assert job.resumed.startswith("started over (its worker was lost")
