"""The run's host-RAM watch (vram_utils/host_budget.py HostWatch, polled by the run's one memory sampler): when the
room under the binding limit falls below its reserve, the run steps down a host rung at the next step, or stops
with a message naming both numbers; a job the OOM killer ended says so after a restart. The limit is simulated here
(`pressure_room` replaced), so these run anywhere; tests/test_container.py runs real caps."""
from __future__ import annotations

import json
import time

import pytest

from configs.schema import GenerationRequest
from engine.runner import RunFailed
from vram_utils import host_budget

MIB = 2**20


def request(**kw) -> GenerationRequest:
    return GenerationRequest(model="tiny-wan", task="t2v", prompt="a red car", frames=5, height=32, width=32, steps=6,
                             seed=3, **kw)


@pytest.fixture
def tight(monkeypatch, runner):
    """A simulated 2 GiB container limit: the room reads `state["low"]` for the next `state["trips"]` polls, plenty
    after them; the room is read at every sampler tick, and steps are slowed so the sampler ticks during the run."""
    state = {"trips": 0, "low": 10 * MIB, "polls": 0}
    limit = host_budget.HostLimit(0, 2 * 2**30, "container limit", "cgroup v1 /simulated")

    def pressure_room():
        state["polls"] += 1
        room = state["low"] if state["trips"] > 0 else 4 * 2**30
        state["trips"] -= 1
        return room, host_budget.HostLimit(room, limit.limit_bytes, limit.kind, limit.where)

    monkeypatch.setattr(host_budget, "pressure_room", pressure_room)
    monkeypatch.setattr(host_budget.HostWatch, "every_s", 0.0)
    monkeypatch.setattr(runner, "fault_hook", lambda stage, i: time.sleep(0.06) if stage == "denoising" else None)
    return state


def test_a_run_nearing_the_limit_steps_down_a_host_rung_and_finishes(runner, tight):
    baseline = runner.generate(request())
    tight["trips"] = 1  # one reading under the reserve (5 % of 2 GiB): the next step stops, one host rung down
    result = runner.generate(request())
    side = json.loads(result.sidecar_path.read_text())
    host_steps = [s for s in side["step_downs"] if s["error"].startswith("host RAM")]
    assert len(host_steps) == 1 and host_steps[0]["change"] == "host ram -> text-encoder-first", side["step_downs"]
    assert "container limit 2.0 GiB (cgroup v1 /simulated): 10 MiB left" in host_steps[0]["error"]
    assert result.plan.release_text_encoder and result.frames == baseline.frames == 5
    assert runner.last_leftovers == []


def test_with_no_host_rung_left_the_run_stops_naming_both_numbers(runner, tight):
    tight["trips"] = 10**6  # and it stays low: the text encoder first, then weights from disk, then nothing left
    with pytest.raises(RunFailed) as info:
        runner.generate(request())
    text = str(info.value)
    assert "stopped before the memory limit ended the run while denoising" in text, text
    assert "host RAM 2.0 GiB of the container limit 2.0 GiB (cgroup v1 /simulated): 10 MiB left" in text, text
    assert "no host rung below disk is left" in text and "nothing was saved" in text, text
    assert tight["polls"] >= 3 and runner.last_leftovers == []


def test_a_job_the_oom_killer_ended_is_recorded_and_not_run_again(tmp_path, monkeypatch):
    from engine.jobs import Job, JobQueue, QUEUE_SUBDIR

    folder = tmp_path / QUEUE_SUBDIR
    folder.mkdir()
    job = Job("abc123", "t2v", request(), str(tmp_path / "v.mp4"), state="running")
    job.oom_kills = 2
    (folder / "abc123.json").write_text(json.dumps(job.to_record()))
    monkeypatch.setattr(host_budget, "oom_kills", lambda: 3)  # the cgroup counted one more kill since it started
    queue = JobQueue(folder, lambda job: None)
    notes = queue.recover(lambda job: False, lambda job: False)
    again = queue.get("abc123")
    assert again.state == "failed" and "killed by the out-of-memory killer" in again.error, again.error
    assert "not run again by itself" in again.error and any("out-of-memory killer" in n for n in notes)
    assert not (folder / "abc123.json").exists()
    monkeypatch.setattr(host_budget, "oom_kills", lambda: 2)  # no kill counted: it runs again as before
    (folder / "abc123.json").write_text(json.dumps(job.to_record()))
    queue = JobQueue(folder, lambda job: None)
    queue.recover(lambda job: False, lambda job: False)
    assert queue.get("abc123").state == "waiting"
