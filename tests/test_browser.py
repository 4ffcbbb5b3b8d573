"""The page in a real Chromium: Debian's /usr/bin/chromium driven by Playwright from PyPI (no browser download).

The app runs in-process on a free port with a temp outputs folder and the tiny models. Screenshots are kept
under test-artifacts/ (git-ignored) for people to look at.
"""
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, read_video

import app

pytestmark = pytest.mark.browser


def _chromium_candidates() -> tuple[str | None, ...]:
    """The browsers to try, in order. `./run.sh test` installs Debian's or Playwright's."""
    chosen = os.environ.get("FITVIDEO_CHROMIUM")
    if chosen:
        return (chosen,)  # a browser someone chose is not quietly replaced by another
    debian = [c for c in (shutil.which("chromium"), "/usr/bin/chromium") if c and Path(c).is_file()]
    return (*dict.fromkeys(debian), None)  # None: Playwright's own build, launched without an executable path


CHROMIUM_CANDIDATES = _chromium_candidates()
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 120_000  # a tiny run is about a second; a busy 2-core CI machine gets headroom
UI_TIMEOUT_MS = 15_000  # a tab switch or a panel update


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    from engine.cache import PipelineCache
    from engine.runner import Runner

    outputs = tmp_path_factory.mktemp("outputs")
    runner = Runner(PipelineCache(max_size=2), outputs_dir=outputs)
    ui = app.build_app(runner)
    url = app.serve(ui)
    runner.test_ui = ui  # for the tests that set the app's state directly
    yield url, outputs, runner
    ui.demo.close()


def _launch(playwright):
    """The first candidate browser that starts; the test fails (never skips) naming each tried when none does."""
    from playwright.sync_api import Error as PlaywrightError

    errors = []
    for path in CHROMIUM_CANDIDATES:
        try:
            return playwright.chromium.launch(
                headless=True, args=["--no-sandbox"], **({"executable_path": path} if path else {})
            )
        except PlaywrightError as exc:
            errors.append(f"{path or 'Playwright chromium'}: {str(exc).strip().splitlines()[0]}")
    pytest.fail(
        "no Chromium starts (" + "; ".join(errors) + "). Install one: `./run.sh test` does it; by hand, as root on "
        "Debian `apt-get install -y chromium`, elsewhere `.venv/bin/python -m playwright install chromium`; "
        "or point FITVIDEO_CHROMIUM at a Chromium binary",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def page(server):
    # No skip: a missing browser is a failure, not a pass.
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server[0])
        yield page
        browser.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def wait_text(page, elem_id: str, text: str) -> None:
    page.wait_for_function(f"document.querySelector('#{elem_id}').innerText.includes({text!r})")


def test_t2v_generate_plays_the_video_in_the_page(page, server, tmp_path):
    _, outputs, _ = server
    open_tab(page, "T2V")
    prompt = page.locator("#t2v-prompt textarea")
    prompt.fill("a small boat on a blue sea")
    # The plan is there before Generate is pressed.
    wait_text(page, "t2v-plan", "offload")
    page.locator("#t2v-generate").click()
    video = page.locator("#t2v-result video")
    video.wait_for(state="attached")
    wait_text(page, "t2v-info", "Saved")
    # It plays: time moves on, and the duration is the 9 frames at the model's 8 fps.
    page.wait_for_function(
        """async () => { const v = document.querySelector('#t2v-result video');
                         if (v.readyState < 1) return false;
                         if (v.paused) { try { await v.play(); } catch (e) { return false; } }
                         return v.currentTime > 0; }"""
    )
    duration = page.wait_for_function(  # NaN until the element (re-rendered after the run) has its metadata again
        "() => { const d = document.querySelector('#t2v-result video').duration; return isFinite(d) && d > 0 && d; }"
    ).json_value()
    assert duration == pytest.approx(9 / 8, abs=0.15)
    # The file the element plays has the right frame count.
    src = page.evaluate("document.querySelector('#t2v-result video').currentSrc")
    played = tmp_path / "played.mp4"
    played.write_bytes(page.request.get(src).body())
    assert read_video(played).shape == (9, 32, 32, 3)
    info = page.locator("#t2v-info").inner_text()
    seed = int(re.search(r"seed (\d+)", info).group(1))
    [saved] = list(outputs.glob(f"*_t2v_{seed}.mp4"))
    assert saved.with_suffix(".json").is_file()
    assert page.locator("#t2v-result").get_by_role("button", name=re.compile("download", re.I)).count() >= 1
    page.screenshot(path=str(ARTIFACTS / "browser_t2v_result.png"), full_page=True)


def test_every_tab_renders_and_is_screenshotted(page):
    expected = {
        "T2V": ["Prompt", "Motion preset", "Frames", "random weights"],
        "I2V": ["Input image", "Resolution"],
        "V2V": ["Input video", "Strength"],
        "Gallery": ["Reuse settings", "a small boat on a blue sea"],
        "Optimization": ["Memory (live)", "host RAM", "Pipeline cache", "MAX_CACHE_SIZE", "VAE tiling", "Rung"],
    }
    for name, texts in expected.items():
        open_tab(page, name)
        for text in texts:
            page.get_by_text(text).filter(visible=True).first.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
        page.screenshot(path=str(ARTIFACTS / f"tab_{name.lower()}.png"), full_page=True)
    # The pre-flight plan is the one of the last generation tab visited (V2V), before anything is pressed.
    assert "V2V · tiny-cogvideox" in page.locator("#plan-panel").inner_text()
    # The live memory panel: "no CUDA GPU" here, the GPU's name on a GPU machine.
    import vram_utils

    info = vram_utils.probe()
    panel = page.locator("#memory-panel").inner_text()
    assert (info.gpus[0].name if info.cuda else "no CUDA GPU") in panel


def test_reuse_settings_from_the_gallery_fills_the_tab(page):
    # The first test left this very prompt in the T2V tab: change it, so that only Reuse can bring it back.
    open_tab(page, "T2V")
    page.locator("#t2v-prompt textarea").fill("something else")
    open_tab(page, "Gallery")
    page.locator("#gallery .thumbnail-item").first.click()
    wait_text(page, "gallery-details", "a small boat")
    page.get_by_role("button", name="Reuse settings").click()
    page.wait_for_function("document.querySelector('#t2v-prompt textarea').value === 'a small boat on a blue sea'")
    page.locator("[role=tab][aria-selected=true]", has_text="T2V").wait_for(timeout=UI_TIMEOUT_MS)
    assert page.get_by_role("tab", name="T2V", exact=True).get_attribute("aria-selected") == "true"


def test_stop_button_ends_the_run_and_shows_where(page, server, monkeypatch):
    _, outputs, runner = server
    # A tiny step takes milliseconds: on a fast machine 100 of them end before the click lands (CI did).
    # Each step is slowed to 0.3 s here, so the run is still denoising when Stop arrives.
    monkeypatch.setattr(runner, "fault_hook", lambda stage, index: time.sleep(0.3) if stage == "denoising" else None)
    open_tab(page, "T2V")
    before = set(outputs.glob("*.mp4"))
    page.locator("#t2v-prompt textarea").fill("a long run to stop")
    set_slider(page, "t2v-steps", 100)
    set_slider(page, "t2v-frames", 33)
    # The plan follows the settings before Generate is pressed.
    open_tab(page, "Optimization")
    wait_text(page, "plan-panel", "T2V · tiny-cogvideox · 33 frames")
    open_tab(page, "T2V")
    page.locator("#t2v-generate").click()
    # Progress with the stage name shows in the page while it runs.
    page.get_by_text(re.compile(r"denoising step \d+/100")).first.wait_for(state="visible")
    page.locator("#t2v-stop").click()
    page.wait_for_function("/Stopped.*denoising step \\d+\\/100/.test(document.querySelector('#t2v-info').innerText)")
    assert set(outputs.glob("*.mp4")) == before  # nothing saved
    monkeypatch.setattr(runner, "fault_hook", None)
    page.screenshot(path=str(ARTIFACTS / "browser_t2v_stopped.png"), full_page=True)
    # Ready again right away: the next Generate runs (9 frames, 2 steps).
    set_slider(page, "t2v-steps", 2)
    set_slider(page, "t2v-frames", 9)
    page.locator("#t2v-generate").click()
    wait_text(page, "t2v-info", "Saved")
    assert len(set(outputs.glob("*.mp4")) - before) == 1


def toast(page, text: str):
    """The toast (error / warning popup) that says `text`, once it shows."""
    found = page.locator(".toast-body").filter(has_text=text).first
    found.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    return found


def write_gif(path: Path, frames: int, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    images = [Image.fromarray(((x * 8 + y * 4 + t * 20) % 256).astype("uint8")).convert("RGB") for t in range(frames)]
    images[0].save(path, save_all=frames > 1, append_images=images[1:], duration=125, loop=0)
    return path


def test_a_non_image_upload_shows_what_is_wrong_in_a_toast(page, server, tmp_path):
    _, outputs, _ = server
    fake = tmp_path / "x.png"
    fake.write_text("this is a text file, not a picture")
    open_tab(page, "I2V")
    page.locator("#i2v-image input[type=file]").set_input_files(str(fake))
    # The upload is checked as it arrives, and the page says at once what is wrong with it (before this was
    # gradio's "...has not enabled verbose error reporting").
    message = "image file 'x.png' is not a readable image (cannot identify image file 'x.png'); use PNG, JPEG or WebP"
    found = toast(page, message)
    assert "Error" in found.inner_text()
    found.locator(".toast-close").click()
    found.wait_for(state="detached", timeout=UI_TIMEOUT_MS)
    # Generate says the same, and saves nothing.
    before = set(outputs.glob("*_i2v_*.mp4"))
    page.locator("#i2v-generate").click()
    assert "Error" in toast(page, message).inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser_i2v_not_an_image.png"), full_page=True)
    assert set(outputs.glob("*_i2v_*.mp4")) == before
    # The app stays up: the page still plans (the Optimization tab's memory panel still refreshes).
    open_tab(page, "Optimization")
    wait_text(page, "memory-panel", "host RAM")


def test_v2v_upload_takes_animated_and_one_frame_gifs(page, server, tmp_path):
    _, outputs, _ = server
    open_tab(page, "V2V")
    upload = page.locator("#v2v-video input[type=file]")
    accept = upload.get_attribute("accept") or ""
    assert "video/*" in accept and "image/*" in accept, accept  # the file picker offers GIFs too
    set_slider(page, "v2v-steps", 2)
    for frames, name in ((9, "anim.gif"), (1, "still.gif")):
        before = set(outputs.glob("[0-9]*_v2v_*.mp4"))  # finished videos, not the hidden partial one
        upload.set_input_files(str(write_gif(tmp_path / name, frames)))
        page.locator(f"#v2v-video td[aria-label='{name}']").wait_for(state="visible", timeout=UI_TIMEOUT_MS)
        page.locator("#v2v-generate").click()
        still = f"'{name}' has a single frame (a still image); it is held for all 9 frames"
        if frames == 1:  # the warning shows as the run starts (a toast lasts seconds: looked at right away)
            assert "Warning" in toast(page, still).inner_text()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not set(outputs.glob("[0-9]*_v2v_*.mp4")) - before and time.monotonic() < deadline:
            time.sleep(0.1)
        [made] = set(outputs.glob("[0-9]*_v2v_*.mp4")) - before
        wait_text(page, "v2v-info", made.name)
        assert read_video(made).shape == (9, 32, 32, 3)
        assert (still in page.locator("#v2v-info").inner_text()) == (frames == 1)
        page.locator("#v2v-video").get_by_role("button", name="Clear").click()
    page.screenshot(path=str(ARTIFACTS / "browser_v2v_gif.png"), full_page=True)


def _pick_loras(page, names) -> None:
    pick = page.locator("#t2v-lora-pick input")
    for name in names:
        pick.click()
        pick.fill(name)
        page.keyboard.press("Enter")


def _set_cell(page, cells, index: int, value: str) -> None:
    """Edit one table cell: its editor must be open before typing (on a loaded machine a double click can take a
    moment to open it; typing earlier would append to the old value)."""
    cells.nth(index).dblclick()
    editor = cells.nth(index).locator("input, textarea").first
    editor.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    editor.fill(value)
    assert editor.input_value() == value
    page.keyboard.press("Enter")


def test_two_loras_with_strengths_generate_list_in_the_details_and_reuse_restores_them(page, server, tmp_path,
                                                                                      monkeypatch):
    import json

    from lora_files import make_lora
    from engine.loaders import load_pipeline

    monkeypatch.setenv("FITVIDEO_LORAS_DIR", str(tmp_path / "loras"))  # the server reads it per request
    transformer = load_pipeline("tiny-cogvideox", "t2v").transformer
    make_lora(transformer, tmp_path / "loras" / "style_a.safetensors", seed=1)
    make_lora(transformer, tmp_path / "loras" / "fast_b.safetensors", seed=2)
    (tmp_path / "loras" / "fast_b.json").write_text(json.dumps({"steps": 3, "guidance": 1.0}))
    page.reload()  # the picker lists the folder's files that fit the model when the page loads
    open_tab(page, "T2V")
    page.locator("#t2v-model input").first.wait_for()
    _pick_loras(page, ["style_a", "fast_b"])
    cells = page.locator("#t2v-loras .body-cell")
    page.wait_for_function("document.querySelectorAll('#t2v-loras .body-cell').length === 6")
    _set_cell(page, cells, 1, "0.5")
    _set_cell(page, cells, 4, "0.25")
    page.locator("#t2v-prompt textarea").fill("a red kite over a green hill")
    preset = page.locator("#t2v-lora-preset")
    assert "3 steps, guidance 1, from fast_b" in preset.inner_text()
    preset.click()
    page.wait_for_function("document.querySelector('#t2v-steps input[type=number]').value === '3'")
    wait_text(page, "t2v-plan", "offload")
    page.locator("#t2v-generate").click()
    wait_text(page, "t2v-info", "Saved")
    page.screenshot(path=str(ARTIFACTS / "browser_t2v_loras.png"), full_page=True)
    name = re.search(r"Saved \S*?([^/\s]+\.mp4)", page.locator("#t2v-info").inner_text()).group(1)
    sidecar = json.loads((server[1] / name).with_suffix(".json").read_text())
    assert [(r["name"], r["strength"]) for r in sidecar["loras"]] == [("style_a", 0.5), ("fast_b", 0.25)]
    assert sidecar["request"]["steps"] == 3 and sidecar["request"]["guidance"] == 1.0
    # The gallery's details list them; Reuse puts them back after they were cleared.
    page.locator("#t2v-lora-pick").get_by_role("button", name=re.compile("remove|clear", re.I)).last.click()
    open_tab(page, "Gallery")
    page.locator("#gallery .thumbnail-item").first.click()
    wait_text(page, "gallery-details", "LoRAs: style_a x0.5, fast_b x0.25")
    page.get_by_role("button", name="Reuse settings").click()
    page.wait_for_function("document.querySelectorAll('#t2v-loras .body-cell').length === 6")
    assert [cells.nth(i).inner_text() for i in (0, 1, 3, 4)] == ["style_a", "0.5", "fast_b", "0.25"]
    assert "style_a" in page.locator("#t2v-lora-pick").inner_text()
    # Leave the tab without LoRAs (their folder goes with this test)
    page.locator("#t2v-lora-pick").get_by_role("button", name=re.compile("remove|clear", re.I)).last.click()
    page.wait_for_function("document.querySelectorAll('#t2v-loras .body-cell').length <= 3")


def _img_src(page, elem_id: str) -> str:
    return page.evaluate(f"(document.querySelector('#{elem_id} img') || {{}}).src || ''")


def test_previews_change_a_reloaded_page_follows_the_job_and_the_charts_have_data(page, server, monkeypatch):
    _, outputs, runner = server
    # Each step slowed to 0.15 s (a tiny step takes milliseconds), and the run held at step 40 until the reloaded
    # page has shown it running: however slow the machine is, the run is still denoising after two previews and a
    # page reload.
    reloaded = threading.Event()

    def slow(stage: str, index: int) -> None:
        if stage == "denoising":
            time.sleep(0.15)
            if index == 40:
                reloaded.wait(UI_TIMEOUT_MS / 1000)

    monkeypatch.setattr(runner, "fault_hook", slow)
    open_tab(page, "T2V")
    page.locator("#t2v-prompt textarea").fill("a slow green river")
    set_slider(page, "t2v-steps", 60)
    page.locator("#t2v-generate").click()
    # The preview shows while it denoises, and moves on from one step to a later one.
    page.wait_for_function("(document.querySelector('#t2v-preview img') || {}).src", timeout=UI_TIMEOUT_MS)
    first = _img_src(page, "t2v-preview")
    page.wait_for_function(f"(document.querySelector('#t2v-preview img') || {{}}).src !== {first!r}",
                           timeout=UI_TIMEOUT_MS)
    assert _img_src(page, "t2v-preview") not in ("", first)
    page.screenshot(path=str(ARTIFACTS / "browser_t2v_preview.png"), full_page=True)
    # A reload mid-run: the Jobs panel shows the running job from the server (its stage), then its video.
    page.reload()
    page.locator("#jobs-table").wait_for()
    wait_text(page, "jobs-table", "running")
    assert re.search(r"denoising \d+/60", page.locator("#jobs-table").inner_text())  # its stage and step
    page.screenshot(path=str(ARTIFACTS / "browser_jobs_reloaded.png"), full_page=True)
    reloaded.set()
    page.wait_for_function("!document.querySelector('#jobs-table').innerText.includes('running')")
    page.locator("#jobs-result video").wait_for(state="attached")
    [made] = [p for p in outputs.glob("*_t2v_*.json") if "a slow green river" in p.read_text()]
    assert made.with_suffix(".mp4").name in page.evaluate("document.querySelector('#jobs-result video').currentSrc")
    # The run's memory over time (gallery) and the plan per stage (Optimization) are drawn with data.
    open_tab(page, "Gallery")
    page.locator("#gallery .thumbnail-item").first.click()
    wait_text(page, "gallery-details", "a slow green river")
    page.wait_for_function("[...document.querySelectorAll('#gallery-run-chart .mark-line path')]"
                           ".some(p => (p.getAttribute('d') || '').length > 20)", timeout=UI_TIMEOUT_MS)
    open_tab(page, "Optimization")
    page.wait_for_function("document.querySelectorAll('#plan-chart .mark-rect path').length >= 2",
                           timeout=UI_TIMEOUT_MS)
    page.screenshot(path=str(ARTIFACTS / "browser_charts.png"), full_page=True)


def test_with_thirty_finished_jobs_the_generate_button_stays_on_the_first_screen(page, server):
    """The Jobs panel above the tabs lists the running and waiting jobs and the last few finished ones (the rest
    are counted: the Gallery has them), each with the start of its prompt and its seed; on a 1280x900 window the
    T2V form's Generate button is visible without scrolling."""
    from configs.schema import GenerationRequest
    from engine.jobs import Job
    from reports.jobs import SHOWN_FINISHED

    url, outputs, runner = server
    queue = runner.test_ui.ctx.queue
    for i in range(30):  # what 30 finished runs leave in the queue's memory
        request = GenerationRequest(model="tiny-wan", task="t2v", prompt=f"a long prompt number {i} about a slow "
                                    "green river under a cloudy sky", seed=1000 + i)
        job = Job(f"done{i:02d}xyzabc", "t2v", request, str(outputs / f"x{i}.mp4"), state="done")
        job.finished, job.started = time.time() + i, time.time() - 10 + i  # the newest finished
        job.done.set()
        queue._jobs[job.id] = job
    size = page.viewport_size
    try:
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_function("document.querySelector('#jobs-table') && "
                               "document.querySelector('#jobs-table').innerText.includes('more finished jobs')",
                               timeout=UI_TIMEOUT_MS)
        text = page.locator("#jobs-table").inner_text()
        finished = sum(j.state not in ("running", "waiting") for j in queue.jobs())  # 30, and earlier tests'
        assert f"{finished - SHOWN_FINISHED} more finished jobs" in text and finished >= 30, text
        assert text.count("\tdone\t") == SHOWN_FINISHED, text
        assert "a long prompt number 29 abo…" in text and "1029" in text, text  # the newest: prompt and seed
        box = page.locator("#t2v-generate").bounding_box()
        page.screenshot(path=str(ARTIFACTS / "browser_jobs_30_finished.png"))
        assert box is not None and box["y"] + box["height"] <= 900, f"Generate at {box} on a 900 px high window"
    finally:
        for job_id in [j for j in queue._jobs if j.startswith("done")]:
            del queue._jobs[job_id]
        page.set_viewport_size(size)
        page.goto(url)
