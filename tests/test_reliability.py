"""Bad input and faults: a clear message naming the value, nothing half-written, the next run served."""
from __future__ import annotations

import errno

import torch

import pytest

import decode
from configs.schema import GenerationRequest, RequestError
from engine.runner import RunFailed
from tests.conftest import read_video


def _request(**kw):
    base = dict(model="tiny-cogvideox", task="t2v", prompt="a cat", frames=9, height=32, width=32, steps=2, seed=0)
    base.update(kw)
    return GenerationRequest(**base)


def _next_run_works(runner, tmp_path, name="next.mp4"):
    result = runner.generate(_request(), out_path=tmp_path / name)
    assert read_video(result.video_path).shape == (9, 32, 32, 3)


def test_unwritable_outputs_folder_is_refused_before_any_work(runner, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(RequestError, match=r"outputs folder '.*a-file' is not writable"):
        runner.generate(_request(), out_path=blocker / "out.mp4")
    assert runner.cache.loads == 0  # refused before loading anything
    _next_run_works(runner, tmp_path)


def test_disk_full_while_writing_keeps_latents_and_no_half_video(runner, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = decode.VideoWriter.write

    def full_disk(self, frames):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decode.VideoWriter, "write", full_disk)
    out = tmp_path / "full.mp4"
    with pytest.raises(RunFailed, match="No space left on device") as info:
        runner.generate(_request(), out_path=out)
    assert "full.latents.pt" in str(info.value) and "decode them again" in str(info.value)
    assert calls["n"] == 1
    assert not out.exists() and not decode.partial_path(out).exists()
    assert out.with_suffix(".latents.pt").is_file()
    monkeypatch.setattr(decode.VideoWriter, "write", original)
    _next_run_works(runner, tmp_path)


def test_prompt_past_the_token_limit_warns_and_still_generates(runner, tmp_path):
    long_prompt = " ".join(["a cat walks on the beach at sunset"] * 10)  # ~80 tokens; tiny CogVideoX reads 16
    result = runner.generate(_request(prompt=long_prompt), out_path=tmp_path / "long.mp4")
    assert len(result.warnings) == 1
    assert "the text encoder reads 16" in result.warnings[0]
    assert read_video(result.video_path).shape[0] == 9


def test_a_failing_progress_callback_does_not_cost_the_run(runner, tmp_path):
    def broken(event):
        raise ValueError("display went away")

    result = runner.generate(_request(), out_path=tmp_path / "cb.mp4", on_progress=broken)
    assert read_video(result.video_path).shape == (9, 32, 32, 3)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("corrupt", "is not a readable video"),
        ("empty", "is empty (0 bytes)"),
        ("short", "has 9 frames, fewer than the 17 asked for"),
    ],
)
def test_bad_v2v_videos_name_the_file(runner, tmp_path, sample_video, kind, fragment):
    if kind == "corrupt":
        path = tmp_path / "corrupt.mp4"
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
        frames = 9
    elif kind == "empty":
        path = tmp_path / "empty.mp4"
        path.touch()
        frames = 9
    else:
        path, frames = sample_video, 17
    with pytest.raises(RequestError) as info:
        runner.generate(_request(task="v2v", video=str(path), frames=frames), out_path=tmp_path / "v.mp4")
    assert fragment in str(info.value) and path.name in str(info.value)
    _next_run_works(runner, tmp_path)


def _gif(path, colors, size=32):
    """A GIF whose frame t has its left half colors[t] and its right half grey (exact palette colours, so the
    frames read back are exact; after the first frame Pillow stores only the changed left half)."""
    import numpy as np
    from PIL import Image

    frames = []
    for color in colors:
        a = np.full((size, size, 3), 128, dtype=np.uint8)
        a[:, : size // 2] = color
        frames.append(Image.fromarray(a))
    frames[0].save(path, save_all=len(frames) > 1, append_images=frames[1:], duration=100, loop=0)
    return path


GIF_COLORS = [(25 * t, 255 - 25 * t, 40) for t in range(9)]


def test_an_animated_gif_reads_frame_by_frame(tmp_path):
    import numpy as np

    from engine.media import load_video

    path = _gif(tmp_path / "anim.gif", GIF_COLORS)
    frames = [np.asarray(im) for im in load_video(path, 9, 32, 32)]
    assert len(frames) == 9 and all(f.shape == (32, 32, 3) for f in frames)
    for t, f in enumerate(frames):
        assert (f[:, :16] == GIF_COLORS[t]).all(), t
        assert (f[:, 16:] == 128).all(), t  # the unchanged half is composed from the frames before
    # Fewer frames asked than the GIF has: the first ones, resized to the size asked for.
    first = load_video(path, 5, 64, 48)
    assert len(first) == 5 and first[4].size == (64, 48)
    assert tuple(np.asarray(first[4])[24, 8]) == GIF_COLORS[4]


@pytest.mark.parametrize("kind", ["one-frame gif", "png"])
def test_a_still_is_held_for_every_frame_with_a_warning(tmp_path, caplog, kind):
    import numpy as np
    from PIL import Image

    from engine.media import check_video, load_video, read_video

    path = tmp_path / "still.gif"
    if kind == "png":
        path = tmp_path / "still.png"
        Image.fromarray(np.full((32, 32, 3), (10, 200, 30), dtype=np.uint8)).save(path)
    else:
        _gif(path, [(10, 200, 30)])
    with caplog.at_level("WARNING", logger="engine.media"):
        frames = load_video(path, 9, 32, 32)
    assert len(frames) == 9
    assert all((np.asarray(f)[:, :16] == (10, 200, 30)).all() for f in frames)
    warning = f"video file {str(path)!r} has a single frame (a still image); it is held for all 9 frames"
    assert [r.getMessage() for r in caplog.records] == [warning]
    held, warnings = read_video(path, 5, 16, 16)  # for a caller that reports the warning itself
    assert warnings == [warning.replace("all 9", "all 5")] and len(held) == 5 and held[0].size == (16, 16)
    assert check_video(path, 9, name=path.name) == [warning.replace(str(path), path.name)]
    assert check_video(path, 1) == [] and len(load_video(path, 1, 32, 32)) == 1


def test_a_gif_shorter_than_asked_is_refused_and_a_broken_one_named(tmp_path):
    from engine.media import check_video, load_video

    short = _gif(tmp_path / "short.gif", GIF_COLORS[:5])
    for read in (lambda: load_video(short, 9, 32, 32), lambda: check_video(short, 9)):
        with pytest.raises(RequestError, match=r"short\.gif' has 5 frames, fewer than the 9 asked for"):
            read()
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a-broken")
    with pytest.raises(RequestError) as info:
        load_video(broken, 9, 32, 32)
    message = str(info.value)
    assert message.startswith(f"video file {str(broken)!r} is not a readable video (ffmpeg: ")
    assert "; Pillow: cannot identify image file" in message and message.endswith("use MP4, WebM, MOV, an animated GIF, or a still image (held for every frame)")


def test_a_one_frame_gif_runs_v2v_held_for_every_frame(runner, tmp_path):
    path = _gif(tmp_path / "still.gif", [(10, 200, 30)])
    result = runner.generate(_request(task="v2v", video=str(path)), out_path=tmp_path / "still.mp4")
    assert read_video(result.video_path).shape == (9, 32, 32, 3)


@pytest.mark.parametrize("content, fragment", [(b"", "is empty (0 bytes)"), (b"GIF89a-broken", "is not a readable image")])
def test_bad_i2v_images_name_the_file(runner, tmp_path, content, fragment):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(RequestError) as info:
        runner.generate(_request(task="i2v", image=str(path)), out_path=tmp_path / "i.mp4")
    assert fragment in str(info.value) and "bad.png" in str(info.value)
    _next_run_works(runner, tmp_path)


def test_leftover_partial_files_are_removed(tmp_path):
    (tmp_path / ".20260101_t2v_1.partial.mp4").write_bytes(b"half a video")
    keep = tmp_path / "20260101_t2v_1.mp4"
    keep.write_bytes(b"a whole video")
    removed = decode.remove_partials(tmp_path)
    assert [p.name for p in removed] == [".20260101_t2v_1.partial.mp4"]
    assert keep.exists()


def test_cancel_during_decode_stops_saves_nothing_and_memory_returns(runner, tmp_path):
    import threading

    from engine.runner import Cancelled

    runner.generate(_request(), out_path=tmp_path / "warm.mp4")
    stop = threading.Event()
    seen = []

    def on_progress(event):
        seen.append(event.stage)
        if event.stage == "decoding" and event.step >= 1:
            stop.set()

    out = tmp_path / "cancelled.mp4"
    with pytest.raises(Cancelled):
        runner.generate(_request(frames=17), out_path=out, on_progress=on_progress, stop=stop)
    assert "decoding" in seen and "saving" not in seen
    assert not out.exists() and not decode.partial_path(out).exists() and not out.with_suffix(".json").exists()
    assert out.with_suffix(".latents.pt").is_file()  # the decode can be re-run from these
    assert not runner.last_leak.leaked, runner.last_leak.line()
    _next_run_works(runner, tmp_path)


def test_killed_while_writing_leaves_only_a_temporary_name_that_the_next_start_removes(tmp_path, tiny_models):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    out = tmp_path / "outputs" / "killed.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # A run long enough to catch in its decode (frames are encoded as they come).
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "generate", "--model", "tiny-wan", "--prompt", "a cat", "--frames", "33",
         "--height", "256", "--width", "256", "--steps", "1", "--chunk-frames", "1", "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    partial = decode.partial_path(out)
    deadline = time.monotonic() + 240
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial.exists(), "the run finished before it could be killed mid-write"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists() and not out.with_suffix(".json").exists()  # never a half video under its real name
    assert decode.remove_partials(out.parent) == [partial]
    assert not partial.exists()


def test_same_model_back_to_back_with_different_precisions(runner, tmp_path):
    plain = runner.generate(_request(model="tiny-wan"), out_path=tmp_path / "none.mp4")
    int8 = runner.generate(_request(model="tiny-wan", quant="int8"), out_path=tmp_path / "int8.mp4")
    again = runner.generate(_request(model="tiny-wan"), out_path=tmp_path / "none-again.mp4")
    assert sorted(runner.cache.keys()) == [("tiny-wan", "t2v", "int8"), ("tiny-wan", "t2v", "none")]
    assert runner.cache.loads == 2  # each precision loaded once
    none_pipe = runner.cache.get("tiny-wan", "t2v", "none")
    int8_pipe = runner.cache.get("tiny-wan", "t2v", "int8")
    assert none_pipe.transformer is not int8_pipe.transformer and none_pipe.vae is int8_pipe.vae
    a, b, c = (torch.load(r.latents_path)["latents"] for r in (plain, int8, again))
    assert torch.equal(a, c)  # the int8 run did not touch the bf16 transformer
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_absurd_size_is_refused_by_the_planner_before_anything_loads(runner, tmp_path):
    loads = runner.cache.loads
    big = GenerationRequest(model="Wan-AI/Wan2.1-T2V-14B-Diffusers", task="t2v", prompt="a cat", frames=81,
                            height=4096, width=4096)
    with pytest.raises(RequestError, match=r"4096x4096, 81 frames on Wan-AI/Wan2.1-T2V-14B-Diffusers is too large.*"
                                           r"predicts \d+\.\d GiB.*in all"):
        runner.generate(big, out_path=tmp_path / "big.mp4")
    assert runner.cache.loads == loads and list(tmp_path.iterdir()) == []
    _next_run_works(runner, tmp_path)


def test_a_v2v_run_from_a_still_says_so_in_its_result_and_sidecar(runner, tmp_path):
    import json

    from configs.schema import GenerationRequest

    still = _gif(tmp_path / "still.gif", [(10, 200, 30)])
    result = runner.generate(GenerationRequest(model="tiny-wan", task="v2v", prompt="a cat", video=str(still),
                                               frames=9, height=32, width=32, steps=2))
    warning = f"video file {str(still)!r} has a single frame (a still image); it is held for all 9 frames"
    assert warning in result.warnings
    assert warning in json.loads(result.sidecar_path.read_text())["warnings"]
    assert read_video(result.video_path).shape == (9, 32, 32, 3)
