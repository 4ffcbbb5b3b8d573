"""The page in a real Chromium: Debian's /usr/bin/chromium driven by Playwright from PyPI (no browser download).

The app runs in-process on a free port with a temp outputs folder and the tiny models. Screenshots are kept
under test-artifacts/ (git-ignored) for people to look at.
"""
import os
import re
import time
from pathlib import Path

import pytest
from conftest import ROOT, read_video

import app

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("FITVIDEO_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 120_000  # a tiny run is about a second; a busy 2-core CI machine gets headroom
UI_TIMEOUT_MS = 15_000  # a tab switch or a panel update


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    from pipeline_utils.cache import PipelineCache
    from pipeline_utils.runner import Runner

    outputs = tmp_path_factory.mktemp("outputs")
    runner = Runner(PipelineCache(max_size=2), outputs_dir=outputs)
    ui = app.build_app(runner)
    url = app.serve(ui)
    yield url, outputs, runner
    ui.demo.close()


@pytest.fixture(scope="module")
def page(server):
    # No skip: CI installs chromium (.ci/run); a missing browser is a failure, not a pass.
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium (or set FITVIDEO_CHROMIUM)"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
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
    duration = page.evaluate("document.querySelector('#t2v-result video').duration")
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
    open_tab(page, "Gallery")
    page.locator("#gallery .thumbnail-item").first.click()
    wait_text(page, "gallery-details", "a small boat")
    page.get_by_role("button", name="Reuse settings").click()
    page.wait_for_function("document.querySelector('#t2v-prompt textarea').value === 'a small boat on a blue sea'")
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
