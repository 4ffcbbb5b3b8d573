"""The HTTP job API (ui/http_api.py) on a served app, through `curl` and Python's urllib as a program would call it:
submit, poll, download, stop, refusals with their reason, and the login."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import read_video

JOB = {"task": "t2v", "model": "tiny-wan", "prompt": "a cat walks on the beach", "frames": 9, "resolution": "32x32",
       "steps": 2, "seed": 7}


def _serve(folder: Path, login=None):
    import app
    from engine.cache import PipelineCache
    from engine.runner import Runner

    runner = Runner(PipelineCache(max_size=1), outputs_dir=folder)
    runner.previews = False
    ui = app.build_app(runner, queue_size=2)
    return ui, app.serve(ui, auth=login).rstrip("/")


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    ui, url = _serve(tmp_path_factory.mktemp("http"))
    yield ui, url
    ui.demo.close()


def call(url: str, method: str, path: str, body=None, login: tuple[str, str] | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait(url: str, job_id: str, login=None, timeout_s: float = 120) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = json.loads(call(url, "GET", f"/v1/videos/{job_id}", login=login)[1])
        if status["status"] in ("done", "failed", "stopped"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {status['status']} after {timeout_s} s")


def test_submit_poll_and_download_with_urllib_give_the_jobs_video(served, tmp_path):
    ui, url = served
    code, body = call(url, "POST", "/v1/videos", JOB)
    assert code == 202, body
    job = json.loads(body)
    assert job["status"] == "waiting" and job["seed"] == 7 and job["content"] == ""
    assert ui.ctx.queue.get(job["id"]) is not None  # the page's own queue: the Jobs panel lists it
    done = wait(url, job["id"])
    assert done["status"] == "done" and done["error"] == "" and done["content"] == f"/v1/videos/{job['id']}/content"
    code, mp4 = call(url, "GET", done["content"])
    assert code == 200 and mp4[4:8] == b"ftyp"
    kept = ui.ctx.queue.get(job["id"]).result.final_path
    assert mp4 == Path(kept).read_bytes() and done["video"] == Path(kept).name
    (tmp_path / "got.mp4").write_bytes(mp4)
    assert read_video(tmp_path / "got.mp4").shape[:3] == (9, 32, 32)
    listed = json.loads(call(url, "GET", "/v1/videos")[1])["videos"]
    assert job["id"] in [v["id"] for v in listed]


def test_curl_submits_an_i2v_job_with_its_image_inline_and_downloads_it(served, tmp_path):
    _, url = served
    from PIL import Image

    Image.new("RGB", (40, 48), (200, 30, 30)).save(tmp_path / "in.png")
    body = dict(JOB, task="i2v", image="data:image/png;base64," + base64.b64encode((tmp_path / "in.png").read_bytes()).decode())
    curl = shutil.which("curl")
    assert curl, "curl is missing: ./run.sh test installs it with apt-get"
    out = subprocess.run([curl, "-s", "-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body),
                          f"{url}/v1/videos"], capture_output=True, text=True, timeout=60, check=True).stdout
    job = json.loads(out)
    assert job["status"] == "waiting" and job["task"] == "i2v", out
    assert wait(url, job["id"])["status"] == "done"
    subprocess.run([curl, "-s", "-f", "-o", str(tmp_path / "v.mp4"), f"{url}/v1/videos/{job['id']}/content"],
                   check=True, timeout=60)
    assert read_video(tmp_path / "v.mp4").shape[0] == 9


def test_refusals_name_the_value_and_what_is_allowed_and_queue_nothing(served):
    ui, url = served
    before = len(ui.ctx.queue.jobs())
    cases = [
        (dict(JOB, colour="red"), "'colour' is not a field of t2v; allowed: model, prompt"),
        (dict(JOB, task="t3v"), "task='t3v' is not allowed; choose one of t2v, i2v, v2v"),
        (dict(JOB, steps=0), "steps"),
        (dict(JOB, resolution="33x33"), "33"),
        (dict(JOB, task="i2v", image="data:text/plain;base64,aGk="), "image: a data URL must be base64 of one of"),
        (dict(JOB, task="i2v", image="/no/such/picture.png"), "picture.png"),
        ([1, 2], "the body must be a JSON object"),
    ]
    for body, words in cases:
        code, answer = call(url, "POST", "/v1/videos", body)
        assert code == 400 and words in json.loads(answer)["error"], (body, answer)
    assert len(ui.ctx.queue.jobs()) == before
    code, answer = call(url, "GET", "/v1/videos/0123456789ab")
    assert code == 404 and "no job '0123456789ab'" in json.loads(answer)["error"]


def test_delete_stops_a_running_job_and_its_content_is_refused(served):
    _, url = served
    job = json.loads(call(url, "POST", "/v1/videos", dict(JOB, steps=60, seed=11))[1])
    end = time.monotonic() + 60
    while json.loads(call(url, "GET", f"/v1/videos/{job['id']}")[1])["progress"]["stage"] != "denoising":
        assert time.monotonic() < end, "the job never started denoising"
        time.sleep(0.05)
    code, answer = call(url, "DELETE", f"/v1/videos/{job['id']}")
    assert code == 200 and json.loads(answer)["id"] == job["id"]
    stopped = wait(url, job["id"])
    assert stopped["status"] == "stopped" and stopped["progress"]["step"] < 60
    code, answer = call(url, "GET", f"/v1/videos/{job['id']}/content")
    assert code == 409 and "is stopped" in json.loads(answer)["error"]


def test_with_a_login_every_route_needs_it_and_each_login_sees_its_own_jobs(tiny_models, tmp_path):
    ui, url = _serve(tmp_path, login=("ana", "s3cret"))
    try:
        for method, path in (("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/x"),
                             ("DELETE", "/v1/videos/x")):
            for login in (None, ("ana", "wrong"), ("bob", "s3cret")):
                code, answer = call(url, method, path, JOB if method == "POST" else None, login=login)
                assert code == 401 and "needs its login" in json.loads(answer)["error"], (method, path, login)
        out = subprocess.run(["curl", "-s", "-u", "ana:s3cret", "-H", "Content-Type: application/json", "-d",
                              json.dumps(JOB), f"{url}/v1/videos"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        job = json.loads(out)
        assert job["status"] == "waiting" and ui.ctx.queue.get(job["id"]).owner == "ana"
        assert wait(url, job["id"], login=("ana", "s3cret"))["status"] == "done"
        ui.ctx.queue.get(job["id"]).owner = "someone else"  # a job another login queued from the page
        code, _ = call(url, "GET", f"/v1/videos/{job['id']}", login=("ana", "s3cret"))
        assert code == 404
        assert json.loads(call(url, "GET", "/v1/videos", login=("ana", "s3cret"))[1])["videos"] == []
    finally:
        ui.demo.close()


def test_the_login_is_checked_as_gradio_takes_it_one_pair_several_or_a_function():
    from ui.http_api import ApiError, check_login

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    for login in (("ann", "pw-a"), [("bob", "pw-b"), ("ann", "pw-a")], lambda u, p: (u, p) == ("ann", "pw-a")):
        assert check_login(basic("ann", "pw-a"), login) == "ann"
        for header in (basic("ann", "pw-b"), basic("eve", "pw-a"), "Bearer x", "Basic ###", None):
            with pytest.raises(ApiError) as info:
                check_login(header, login)
            assert info.value.status == 401
    assert check_login(None, None) == ""  # no --auth: open, as the page is
