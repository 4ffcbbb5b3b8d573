"""Bad input and faults: a clear message naming the value, nothing half-written, the next run served."""
from __future__ import annotations

import errno

import pytest

import decode
from configs.schema import GenerationRequest, RequestError
from pipeline_utils.runner import RunFailed
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
    assert "full.latents.pt" in str(info.value) and "app.py decode" in str(info.value)
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
