"""The Gradio app end to end through its API (gradio_client), started in-process on the tiny models.

One server per module (build_app + serve on a free port, outputs in a temp folder); every
generation runs the real runner on tiny-cogvideox / tiny-wan (9 frames, 32x32, a few steps).
"""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import read_video

import app
from reports.catalog import default_model, model_status, model_statuses
from reports.text import fmt_bytes
from ui.context import FitVideoApp, two_experts, with_upload_paths

SEED_MAX = 2**32 - 1


@dataclass
class Served:
    ui: FitVideoApp
    url: str
    outputs: Path

    @property
    def runner(self):
        return self.ui.ctx.runner


def start(outputs: Path, **build) -> Served:
    from engine.cache import PipelineCache
    from engine.runner import Runner

    ui = app.build_app(Runner(PipelineCache(max_size=2), outputs_dir=outputs), **build)
    return Served(ui, app.serve(ui, max_file_size="1mb"), outputs)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    s = start(tmp_path_factory.mktemp("outputs"), queue_size=4)
    yield s
    s.ui.demo.close()


def connect(served: Served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


@pytest.fixture
def client(served):
    return connect(served)


def tiny(**overrides) -> dict:
    """Keyword arguments for a fast tiny run (the API parameter names are the request fields)."""
    run = {"model": "tiny-cogvideox", "prompt": "a red car on a street", "steps": 2, "frames": 9, "resolution": "32x32"}
    return {**run, **overrides}


def long_run(**overrides) -> dict:
    """A run that takes seconds with `slow_steps` (100 steps on 33 frames at 64x64), long enough to stop or queue
    behind."""
    return tiny(steps=100, frames=33, resolution="64x64", **overrides)


@pytest.fixture
def slow_steps(served, monkeypatch):
    """Each denoising step slowed to 30 ms: a tiny step can be faster than the page's progress updates (one every
    PROGRESS_EVERY_S), and a 100-step run could end before a client sees step 3 of it."""
    monkeypatch.setattr(served.runner, "fault_hook", lambda stage, i: time.sleep(0.03) if stage == "denoising" else None)


def outputs_for(folder: Path, task: str, seed: int) -> list[Path]:
    pattern = re.compile(rf"\d{{8}}-\d{{6}}_{task}_{seed}(-\d+)?\.mp4")  # {time}_{task}_{seed}.mp4
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


def wait_for(job, predicate, timeout_s: float = 60.0):
    """Poll a gradio_client job until predicate(status) holds; return that status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job.status()
        if predicate(status):
            return status
        if job.done():
            raise AssertionError(f"job finished before the condition held: {status}")
        time.sleep(0.01)
    raise AssertionError(f"condition not met in {timeout_s} s; last status {job.status()}")


def denoise_step(status) -> int:
    for unit in status.progress_data or []:
        m = re.match(r"denoising step (\d+)/", unit.desc or "")
        if m:
            return int(m.group(1))
    return 0


def check_result(served: Served, task: str, video: str, seed: int, frames: int = 9, size: int = 32) -> dict:
    """The returned video has the frames asked for, and the outputs folder holds it with its sidecar."""
    assert 0 <= seed <= SEED_MAX
    assert read_video(video).shape == (frames, size, size, 3)
    [saved] = outputs_for(served.outputs, task, seed)
    assert read_video(saved).shape == (frames, size, size, 3)
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    assert sidecar["video"] == saved.name
    assert sidecar["request"]["task"] == task and sidecar["request"]["seed"] == seed
    assert sidecar["frames"] == frames
    assert set(sidecar) >= {"plan", "versions", "timings", "predicted", "measured"}
    assert sidecar["versions"]["gradio"] == __import__("gradio").__version__
    assert sidecar["timings"]["total_s"] > 0 and sidecar["measured"]["peak_host_bytes"] > 0
    assert set(sidecar["predicted"]) >= {"peak_gpu_bytes", "peak_host_bytes"}
    return sidecar


# --------------------------------------------------------------------------- launch flags


def test_listen_or_share_without_auth_refuses_to_start(capsys):
    for flags in (["--listen"], ["--share"], ["--listen", "--share"]):
        assert app.main(flags) == 2
        err = capsys.readouterr().err
        assert "--auth user:pass" in err and "--insecure" in err, err
    args = app.build_launch_parser().parse_args(["--listen", "--insecure"])
    assert app.check_launch_args(args) is None
    args = app.build_launch_parser().parse_args(["--listen", "--auth", "ann:secret"])
    assert app.check_launch_args(args) is None


def test_bad_auth_is_refused(capsys):
    for value in ("annsecret", ":secret", "ann:"):
        assert app.main(["--auth", value]) == 2
        assert "use --auth user:pass" in capsys.readouterr().err


def test_busy_port_gives_a_clear_message(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert app.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} is already in use" in err and f"--port {port + 1}" in err


def test_cli_subcommands_still_route_to_the_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        app.main(["generate", "--help"])
    assert exc.value.code == 0
    assert "--prompt" in capsys.readouterr().out


# --------------------------------------------------------------------------- first start


def fake_hub_snapshot(cache: Path, repo: str) -> Path:
    """A complete-looking hub snapshot of a diffusers pipeline (config + weights per component)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "X"]}))
    (snap / "vae").mkdir()
    (snap / "vae" / "config.json").write_text("{}")
    (snap / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"0")
    return snap


def test_model_list_says_what_is_here_and_what_a_download_costs(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # Nothing downloaded: the tiny demo model is the default, labelled as random weights.
    statuses = model_statuses("t2v")
    assert default_model(statuses) == "tiny-cogvideox"
    by_model = {s.model: s for s in statuses}
    assert "random weights" in by_model["tiny-cogvideox"].label and by_model["tiny-cogvideox"].ready
    five_b = by_model["THUDM/CogVideoX-5b"]
    assert not five_b.ready and "22 GB" in five_b.label  # offline (conftest): not on this machine
    assert "`hf download THUDM/CogVideoX-5b`" in five_b.note and "21.7 GB" in five_b.note
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = model_status("THUDM/CogVideoX-5b", "t2v")
    assert online.label.endswith("download 22 GB on first run") and "about 7 min" in online.note
    # Weights in the hub cache: labelled as here, and chosen by default over the demo.
    snap = fake_hub_snapshot(tmp_path, "THUDM/CogVideoX-2b")
    here = model_status("THUDM/CogVideoX-2b", "t2v")
    assert here.ready and here.label == "CogVideoX 2B · on this machine" and str(snap) in here.note
    assert default_model(model_statuses("t2v")) == "THUDM/CogVideoX-2b"
    # Only models that serve the task are listed.
    assert {s.model for s in model_statuses("i2v")} == {
        "THUDM/CogVideoX-5b-I2V", "THUDM/CogVideoX1.5-5B-I2V", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "tiny-cogvideox", "tiny-wan", "tiny-wan-moe",
    }


def test_first_start_loads_no_model_and_serves_the_page(monkeypatch, tmp_path, tiny_models):
    import httpx
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    leftover = tmp_path / "outputs" / ".20260101-000000_t2v_1.partial.mp4"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a video")
    s = start(tmp_path / "outputs")
    try:
        page = httpx.get(s.url, timeout=30)
        assert page.status_code == 200 and "FitVideo" in page.text
        assert len(s.runner.cache) == 0 and s.runner.cache.loads == 0  # lazy: nothing loaded
        assert not leftover.exists()  # a killed run's partial file is cleaned at start
        for task, tab in s.ui.task_tabs.items():
            assert tab.model.value == "tiny-cogvideox", task
            assert tab.prompt.value.strip(), "the first click needs a prompt"
        api = connect(s).view_api(return_format="dict")["named_endpoints"]
        assert {"/t2v", "/i2v", "/v2v", "/stop_t2v", "/plan_t2v", "/memory", "/gallery", "/reuse"} <= set(api)
        v2v_params = {p["parameter_name"] for p in api["/v2v"]["parameters"]}
        assert v2v_params >= {"prompt", "video", "strength", "seed", "frames", "offload", "vae_tiling"}
        # Files are served from the outputs folder only.
        assert s.ui.demo.allowed_paths == [str((tmp_path / "outputs").resolve())]
    finally:
        s.ui.demo.close()


# --------------------------------------------------------------------------- the three tabs


def test_t2v_end_to_end_with_a_random_seed(served, client):
    video, seed, info, _job = client.predict(**tiny(seed=-1), api_name="/t2v")
    sidecar = check_result(served, "t2v", video, seed)
    assert f"seed **{seed}**" in info and "9 frames" in info
    assert sidecar["request"]["prompt"] == "a red car on a street"
    assert sidecar["request"]["steps"] == 2


def test_i2v_end_to_end_keeps_its_input(served, client, sample_image):
    from gradio_client import handle_file

    video, seed, _, _job = client.predict(
        **tiny(model="tiny-wan", seed=7), image=handle_file(str(sample_image)), api_name="/i2v"
    )
    assert seed == 7
    sidecar = check_result(served, "i2v", video, seed)
    kept = Path(sidecar["request"]["image"])
    assert kept.parent == served.outputs / "inputs" and kept.read_bytes() == sample_image.read_bytes()


def test_v2v_end_to_end(served, client, sample_video):
    from gradio_client import handle_file

    video, seed, _, _job = client.predict(
        **tiny(seed=11), video=handle_file(str(sample_video)), strength=0.5, api_name="/v2v"
    )
    sidecar = check_result(served, "v2v", video, seed)
    assert sidecar["request"]["strength"] == 0.5


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_two_expert_model_end_to_end_with_its_second_guidance(served, client, sample_image, task):
    from gradio_client import handle_file

    image = {"image": handle_file(str(sample_image))} if task == "i2v" else {}
    video, seed, _, _job = client.predict(
        **tiny(model="tiny-wan-moe", steps=4, guidance=5.0, guidance_2=2.5, seed=91), **image, api_name=f"/{task}"
    )
    assert seed == 91
    sidecar = check_result(served, task, video, seed)
    assert sidecar["request"]["guidance_2"] == 2.5
    # tiny-wan-moe at 4 steps: timesteps 999, 900 | 750, 500 around the boundary 875
    assert sidecar["experts"]["switch_step"] == 2 and sidecar["experts"]["guidance_2"] == 2.5
    # a one-transformer model ignores the page's hidden second-guidance slider
    video, seed, _, _job = client.predict(**tiny(seed=92 if task == "t2v" else 93), guidance_2=2.5, api_name="/t2v")
    assert check_result(served, "t2v", video, seed)["request"]["guidance_2"] is None


def test_second_guidance_slider_shows_for_two_expert_pipelines_only(served):
    assert two_experts("tiny-wan-moe", "t2v") and two_experts("tiny-wan-moe", "i2v")
    assert not two_experts("tiny-wan", "t2v") and not two_experts("tiny-cogvideox", "i2v")
    assert not two_experts("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "v2v")  # diffusers' V2V has one transformer
    assert not two_experts("no-such-model", "t2v")
    tabs = served.ui.task_tabs
    assert {task: tab.guidance_2.visible for task, tab in tabs.items()} == {
        task: two_experts(tab.model.value, task) for task, tab in tabs.items()}
    # the page's hidden slider value does not reach a one-transformer model's request
    values = {"model": "tiny-wan", "guidance_2": 4.0}
    assert with_upload_paths(values, "t2v")["guidance_2"] is None
    assert with_upload_paths({**values, "model": "tiny-wan-moe"}, "t2v")["guidance_2"] == 4.0


def test_reused_settings_are_among_the_choices_of_their_radio_and_dropdown(served):
    # A value a Dropdown does not offer (None where the choice is "") makes its frontend emit change after change:
    # each one re-planned all three tabs and kept a 2-core machine's browser busy after every Reuse.
    import gradio as gr

    from configs.schema import GenerationRequest
    from ui.fields import fields_from_request

    ui = served.ui
    for task, tab in ui.task_tabs.items():
        req = GenerationRequest(model=tab.model.value, task=task, prompt="x")
        values = fields_from_request(req)
        for name, component in {**ui.optimization.fields(), **tab.fields()}.items():
            if isinstance(component, (gr.Dropdown, gr.Radio)) and not getattr(component, "multiselect", False):
                offered = [value for _, value in component.choices]
                if name not in ("model", "resolution", "frames"):  # those follow the model (set by Reuse itself)
                    assert values[name] in offered, (task, name, values[name], offered)


def test_bad_input_names_the_value_and_the_app_stays_up(served, client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="prompt is empty"):
        client.predict(**tiny(prompt="   "), api_name="/t2v")
    with pytest.raises(AppError, match=r"frames=10 is not allowed.*nearest: 9"):
        client.predict(**tiny(frames=10), api_name="/t2v")
    video, seed, _, _job = client.predict(**tiny(seed=3), api_name="/t2v")
    assert read_video(video).shape[0] == 9


def write_gif(path: Path, frames: int, size: int = 32) -> Path:
    """A GIF of `frames` frames (a moving gradient); one frame is a still."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    images = [Image.fromarray(((x * 8 + y * 4 + t * 20) % 256).astype("uint8")).convert("RGB") for t in range(frames)]
    images[0].save(path, save_all=frames > 1, append_images=images[1:], duration=125, loop=0)
    return path


def test_a_non_image_upload_is_refused_naming_the_file_and_the_app_stays_up(served, client, tmp_path, sample_image):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "x.png"
    fake.write_text("this is a text file, not a picture")
    # gradio opens an image upload with Pillow before our function runs; what it cannot read is named, with
    # what is allowed (it used to come back as gradio's "has not enabled verbose error reporting").
    expected = r"image file 'x\.png' is not a readable image \(cannot identify image file.*\); use PNG, JPEG or WebP"
    with pytest.raises(AppError, match=expected):
        client.predict(**tiny(model="tiny-wan"), image=handle_file(str(fake)), api_name="/i2v")
    # The plan preview does not judge the file (it does not change the plan): it still plans.
    line, _ = client.predict(**tiny(model="tiny-wan"), image=handle_file(str(fake)), api_name="/plan_i2v")
    assert line.startswith("**Plan:**")
    video, seed, _, _job = client.predict(
        **tiny(model="tiny-wan", seed=13), image=handle_file(str(sample_image)), api_name="/i2v"
    )
    check_result(served, "i2v", video, seed)


@pytest.mark.parametrize("frames_in_gif, seed", [(9, 81), (1, 82)])
def test_v2v_takes_an_animated_or_a_one_frame_gif(served, client, tmp_path, frames_in_gif, seed):
    from gradio_client import handle_file

    gif = write_gif(tmp_path / f"in{frames_in_gif}.gif", frames_in_gif)
    video, used, info, _job = client.predict(**tiny(seed=seed), video=handle_file(str(gif)), api_name="/v2v")
    sidecar = check_result(served, "v2v", video, used)
    kept = Path(sidecar["request"]["video"])
    assert kept.suffix == ".gif" and kept.read_bytes() == gif.read_bytes()
    still = "in1.gif' has a single frame (a still image); it is held for all 9 frames"
    assert (still in info) == (frames_in_gif == 1), info


def test_v2v_refuses_a_short_gif_and_files_that_are_not_videos(served, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    short = write_gif(tmp_path / "short.gif", 5)
    with pytest.raises(AppError, match=r"video file '.*short\.gif' has 5 frames, fewer than the 9 asked for"):
        client.predict(**tiny(seed=83), video=handle_file(str(short)), api_name="/v2v")
    text = tmp_path / "clip.mp4"
    text.write_text("this is a text file, not a video")
    with pytest.raises(AppError, match=r"video file '.*clip\.mp4' is not a readable video \(ffmpeg: .*; Pillow: .*\); use MP4"):
        client.predict(**tiny(seed=84), video=handle_file(str(text)), api_name="/v2v")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video either")
    with pytest.raises(AppError, match=r"video file 'notes\.txt' is not a readable video .*; use MP4, WebM, MOV, an animated GIF"):
        client.predict(**tiny(seed=85), video=handle_file(str(notes)), api_name="/v2v")
    assert outputs_for(served.outputs, "v2v", 83) == outputs_for(served.outputs, "v2v", 84) == []


def test_uploads_over_the_cap_are_refused(served, client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))  # the test server caps uploads at 1 MB
    with pytest.raises(Exception, match="413|too large|exceeds"):
        client.predict(**tiny(), image=handle_file(str(big)), api_name="/i2v")


# --------------------------------------------------------------------------- progress, stop, queue


def test_progress_reports_stage_names_to_api_clients(served, client, slow_steps):
    client.predict(api_name="/unload_all")  # a cold start shows the loading stage
    # A run of seconds (slow_steps): the client samples the latest status and sees several steps.
    job = client.submit(**tiny(steps=100, frames=17, resolution="64x64", seed=21), api_name="/t2v")
    seen: list[str] = []
    while not job.done():
        for unit in job.status().progress_data or []:
            if unit.desc and (not seen or seen[-1] != unit.desc):
                seen.append(unit.desc)
        time.sleep(0.005)
    job.result()
    stages = [d.split(" ")[0] for d in seen]
    assert "loading" in stages and "denoising" in stages, seen
    assert stages.index("loading") < stages.index("denoising")
    steps = sorted({int(m.group(1)) for d in seen if (m := re.match(r"denoising step (\d+)/100", d))})
    assert len(steps) >= 3 and steps[-1] <= 100, seen
    assert any("ETA" in d for d in seen), seen


def test_stop_ends_a_running_generation_within_a_step(served, client, slow_steps):
    job = client.submit(**long_run(seed=31), api_name="/t2v")
    wait_for(job, lambda s: denoise_step(s) >= 3)
    t0 = time.monotonic()
    message = client.predict(api_name="/stop_t2v")  # same client: same session, same tab
    video, seed, info, _job = job.result(timeout=30)
    stopped_s = time.monotonic() - t0
    m = re.search(r"Stopped\*\* at denoising step (\d+)/100", message)
    assert m, message
    assert 3 <= int(m.group(1)) < 100 and stopped_s < 10
    assert video is None and seed == 31 and "Stopped" in info
    assert outputs_for(served.outputs, "t2v", 31) == []
    assert not list(served.outputs.glob(".*partial*"))
    # Ready again: the next run goes through at once.
    video, _, _, _job = client.predict(**tiny(seed=32), api_name="/t2v")
    assert read_video(video).shape[0] == 9


def test_cancelling_a_running_job_stops_it_and_frees_the_gpu_queue(served, slow_steps):
    first, second = connect(served), connect(served)
    job = first.submit(**long_run(seed=41), api_name="/t2v")
    wait_for(job, lambda s: denoise_step(s) >= 2)
    job.cancel()  # gradio_client's cancel: the server raises the run's stop flag
    video, seed, _, _job = second.predict(**tiny(seed=42), api_name="/t2v")
    assert seed == 42 and read_video(video).shape[0] == 9
    assert outputs_for(served.outputs, "t2v", 41) == []  # the cancelled run ended early: nothing saved


def test_waiting_jobs_see_their_position_and_cancelling_one_removes_it(served, sample_video, slow_steps):
    from gradio_client import handle_file
    from gradio_client.utils import Status

    first, second = connect(served), connect(served)
    running = first.submit(**long_run(seed=51), api_name="/t2v")
    wait_for(running, lambda s: denoise_step(s) >= 1)
    # Another tab: its job waits in the server's queue behind the T2V run and is told where it stands.
    queued = second.submit(**tiny(model="tiny-wan", seed=52), video=handle_file(str(sample_video)), api_name="/v2v")
    status = wait_for(queued, lambda s: any("waiting in the queue" in (u.desc or "") for u in s.progress_data or []))
    assert any("1 job ahead" in (u.desc or "") for u in status.progress_data)
    listed = {j["task"]: j for j in second.predict(api_name="/jobs") if j["state"] in ("running", "waiting")}
    assert listed["t2v"]["state"] == "running" and listed["v2v"]["state"] == "waiting"
    queued.cancel()
    wait_for_done = time.monotonic() + 10
    while queued.status().code != Status.CANCELLED and time.monotonic() < wait_for_done:
        time.sleep(0.02)
    assert queued.status().code == Status.CANCELLED
    assert "Stopped" in first.predict(api_name="/stop_t2v")
    running.result(timeout=30)
    time.sleep(0.5)
    assert outputs_for(served.outputs, "v2v", 52) == []  # the cancelled job never ran
    states = {j["id"]: j["state"] for j in second.predict(api_name="/jobs")}
    assert "waiting" not in states.values() and "running" not in states.values()


# --------------------------------------------------------------------------- optimization tab


def test_memory_panel_reports_gpu_and_host(served, client):
    import vram_utils

    panel, line, leaks = client.predict(api_name="/memory")
    info = vram_utils.probe()
    if info.cuda:
        assert info.gpus[0].name in panel
    else:
        assert "no CUDA GPU" in panel and "no CUDA GPU" in line
    assert "host RAM" in panel and "this process" in panel
    # The leak sentinel's last deltas: the runs above are listed, newest first, with the sentinel's own figure.
    history = list(served.ui.ctx.runner.sentinel.history)
    assert len(history) >= 3
    newest = history[-1]
    rows = [r for r in leaks.splitlines() if r.startswith("| ") and "MiB" in r]
    assert len(rows) == min(8, len(history))
    assert rows[0].startswith(f"| {newest.label} |") and f"{newest.delta_bytes / 2**20:+.1f} MiB" in rows[0]
    assert "LEAK" not in leaks


def test_plan_is_shown_before_generate_and_follows_the_settings(served, client):
    import vram_utils
    from configs.schema import DecodeSettings, GenerationRequest
    from configs.registry import get_model_spec
    from configs.validate import resolve_request

    def planned(**changes):
        req = resolve_request(GenerationRequest(**{
            "model": "tiny-cogvideox", "task": "t2v", "prompt": "a red car on a street", "steps": 2,
            "frames": 9, "height": 32, "width": 32, **changes,
        }))
        return vram_utils.plan(req, get_model_spec(req.model))

    # The page shows the planner's own plan for the tab's settings. Free memory moves between two calls, so the
    # budget-dependent words are left out of the comparison; rung, stages and their bytes are not.
    line, full = client.predict(**tiny(frames=17), api_name="/plan_t2v")
    expected = planned(frames=17)
    assert "17 frames" in full and f"offload `{expected.offload}`" in full and f"runs on `{expected.device}`" in full
    assert expected.summary.split(" of ")[0] in line
    assert expected.stages, "the planner predicts a peak per stage"
    for stage, peak in expected.stages.items():
        row = rf"\| (\*\*)?{stage}(\*\*)?( \(peak\))? \|.*{re.escape(fmt_bytes(peak))}"
        assert re.search(row, full), (stage, full)
    assert f"**{expected.peak_stage}** (peak)" in full
    assert full.count("\n- ") == len(expected.reasons)
    line, full = client.predict(**tiny(), offload="model", vae_tiling=False, tile_x=256, api_name="/plan_t2v")
    expected = planned(offload="model", decode=DecodeSettings(enable_vae_tiling=False, tile_x=256))
    assert expected.offload == "model" and "offload `model`" in full and "VAE tiling off" in full
    assert any(r.startswith("offload model: as requested") for r in expected.reasons)
    assert "offload model: as requested" in full
    # Settings that cannot run say why, before anything is pressed.
    line, _ = client.predict(**tiny(frames=10), api_name="/plan_t2v")
    assert "frames=10 is not allowed" in line
    # I2V plans before an image is uploaded (the image does not change the plan).
    line, _ = client.predict(**tiny(), image=None, api_name="/plan_i2v")
    assert line.startswith("**Plan:**") and "offload" in line


def test_cache_panel_lists_unloads_and_resizes(served, client):
    client.predict(**tiny(seed=61), api_name="/t2v")
    client.predict(**tiny(model="tiny-wan", seed=62), api_name="/t2v")
    panel, choices = client.predict(api_name="/cache")
    assert "2 of 2 loaded" in panel and "tiny-wan" in panel and "tiny-cogvideox" in panel
    keys = [value for _, value in choices["choices"]]
    assert "tiny-wan|t2v|none" in keys and "tiny-cogvideox|t2v|none" in keys
    panel, _ = client.predict("tiny-wan|t2v|none", api_name="/unload")
    assert ("tiny-wan", "t2v", "none") not in served.runner.cache.keys() and "1 of 2 loaded" in panel
    client.predict(**tiny(model="tiny-wan", seed=63), api_name="/t2v")
    panel, _ = client.predict(1, api_name="/set_max_cache_size")
    assert served.runner.cache.max_size == 1 and served.runner.cache.keys() == [("tiny-wan", "t2v", "none")]
    assert "1 of 1 loaded" in panel
    panel, _ = client.predict(api_name="/unload_all")
    assert len(served.runner.cache) == 0 and "Nothing loaded" in panel
    client.predict(2, api_name="/set_max_cache_size")
    assert served.runner.cache.max_size == 2


# --------------------------------------------------------------------------- outputs that last


def test_gallery_lists_results_after_a_restart_and_reuses_their_settings(served, client, tmp_path):
    video, seed, _, _job = client.predict(**tiny(seed=71, prompt="a golden horse runs", frames=17, fps=12), api_name="/t2v")
    [saved] = outputs_for(served.outputs, "t2v", 71)
    # A restart: a new server (new runner, empty cache) on the same outputs folder.
    again = start(served.outputs)
    try:
        fresh = connect(again)
        items, pick = fresh.predict(api_name="/gallery")
        names = [name for name, _ in pick["choices"]]
        assert names[0] == saved.name  # newest first
        assert items[0]["caption"].startswith("T2V · seed 71 · a golden horse runs")
        assert read_video(items[0]["video"]).shape[0] == 17
        details = fresh.predict(saved.name, api_name="/result_details")
        assert "seed 71" in details and "17 frames" in details
        reused = [v.get("value") if isinstance(v, dict) else v for v in fresh.predict(saved.name, api_name="/reuse")]
        task, reused = reused[0], reused[1:]
        assert task == "t2v"  # the tab the page opens (a hidden box that SELECT_TAB_JS reads)
        n = len(again.ui.optimization.fields())  # the Optimization settings come first
        # as resolved: the step cache that ran ("off": the balanced preset has none), the backend that ran
        assert reused[:n] == ["auto", "none", True, 272, 272, 144, 128, "off", "native", False, False]
        reused = reused[n:]  # then the T2V tab's fields, then I2V's, V2V's
        assert reused[:10] == ["tiny-cogvideox", "a golden horse runs", "", 71, "balanced", 2, 6.0, 17, 12, "32x32"]
        # then guidance_2 (one transformer: left as it is) and the finishing steps (off)
        assert reused[10:13] == [None, 0, 0]
        # then no LoRA (an empty table), the model's shift, and the LoRA picker emptied
        table, shift, picked = reused[13:16]
        assert not (table or {}).get("data") if isinstance(table, dict) or table is None else table == []
        assert shift in (None, 0)
        assert picked == []
        assert all(v is None for v in reused[16:])  # the other tabs are left as they are
        # A result deleted after the gallery listed it is refused with a message, not a crash.
        saved.unlink()
        with pytest.raises(Exception, match=f"no saved result named '{saved.name}'"):
            fresh.predict(saved.name, api_name="/reuse")
    finally:
        again.ui.demo.close()


def test_model_folders_under_models_dir_are_listed_and_generate(tmp_path, tiny_models):
    import shutil

    from gradio_client import Client

    models = tmp_path / "models"
    mine = models / "my-cogvideox"
    shutil.copytree(tiny_models["tiny-cogvideox"] / "t2v", mine)  # a T2V folder: serves T2V and V2V, not I2V
    assert str(mine) in {s.model for s in model_statuses("t2v", models)}
    assert str(mine) not in {s.model for s in model_statuses("i2v", models)}
    s = start(tmp_path / "outputs", models_dir=models)
    try:
        choices = {value for _, value in s.ui.task_tabs["t2v"].model.choices}
        assert str(mine) in choices and str(mine) in {v for _, v in s.ui.task_tabs["v2v"].model.choices}
        assert str(mine) not in {v for _, v in s.ui.task_tabs["i2v"].model.choices}
        label = model_status(str(mine), "t2v").label
        assert label == "my-cogvideox (local folder) · on this machine"
        video, seed, info, _job = Client(s.url, verbose=False).predict(**tiny(model=str(mine)), api_name="/t2v")
        assert read_video(video).shape == (9, 32, 32, 3)
        sidecar = json.loads((s.outputs / Path(video).name).with_suffix(".json").read_text())
        assert sidecar["request"]["model"] == str(mine)
    finally:
        s.ui.demo.close()


def test_finishing_steps_chained_after_a_run_and_from_the_gallery(served, client, monkeypatch):
    """generate -> upscale x2 -> interpolate x2 through the API; the un-finished videos are kept, each with a
    sidecar; the Gallery's buttons run a step on a past result; a 1-frame video is refused and the app stays up."""
    monkeypatch.setattr("postprocess.upscale.cached_weights", lambda spec: None)  # a fresh machine: no weights
    video, seed, info, _job = client.predict(**tiny(seed=83, upscale=2, interpolate=2), api_name="/t2v")
    [saved] = outputs_for(served.outputs, "t2v", 83)
    up, both = saved.with_name(f"{saved.stem}_up2.mp4"), saved.with_name(f"{saved.stem}_up2_int2.mp4")
    assert read_video(saved).shape == (9, 32, 32, 3)
    assert read_video(up).shape == (9, 64, 64, 3)
    assert read_video(video).shape == (17, 64, 64, 3) and Path(video).name == both.name
    assert "upscale x2 with lanczos (no model)" in info and "interpolate x2 with minterpolate" in info
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    assert [s["step"] for s in sidecar["finishing"]] == ["upscale", "interpolate"]
    assert sidecar["request"]["upscale"] == 2 and sidecar["request"]["interpolate"] == 2
    assert json.loads(both.with_suffix(".json").read_text())["kind"] == "interpolate"
    client.predict(api_name="/gallery")  # the Gallery lists the new results (the pick's choices)
    details = client.predict(saved.name, api_name="/interpolate_result")
    assert "9 -> 17 frames" in details and "minterpolate" in details
    assert read_video(saved.with_name(f"{saved.stem}_int2.mp4")).shape == (17, 32, 32, 3)
    with pytest.raises(Exception, match="upscale=3 is not allowed; use 0 \\(off\\), 2 or 4"):
        client.predict(**tiny(upscale=3), api_name="/t2v")
    one, *_ = client.predict(**tiny(seed=84, frames=1), api_name="/t2v")
    client.predict(api_name="/gallery")
    with pytest.raises(Exception, match="1 frame; interpolation needs at least 2"):
        client.predict(Path(one).name, api_name="/interpolate_result")
    assert client.predict(api_name="/gallery")  # still up
