"""`python app.py generate ...`: a real subprocess, the file read back, exit 2 with one line on bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline_utils.cli import main
from tests.conftest import ROOT, read_video, video_fps


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("model, fps", [("tiny-cogvideox", 8), ("tiny-wan", 16)])
def test_generate_writes_a_playable_mp4_with_exact_frames(tmp_path, tiny_models, model, fps):
    out = tmp_path / "out.mp4"
    proc = _run_cli("generate", "--model", model, "--task", "t2v", "--prompt", "a cat", "--frames", "9",
                    "--height", "32", "--width", "32", "--steps", "2", "--seed", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("out.mp4")
    assert read_video(out).shape == (9, 32, 32, 3)
    assert video_fps(out) == pytest.approx(fps)
    assert out.with_suffix(".json").is_file() and out.with_suffix(".latents.pt").is_file()


def test_generate_i2v_and_v2v_with_preset(tmp_path, tiny_models, sample_image, sample_video):
    i2v = tmp_path / "i2v.mp4"
    assert main(["generate", "--model", "tiny-wan", "--task", "i2v", "--image", str(sample_image), "--prompt", "a cat",
                 "--frames", "9", "--height", "32", "--width", "32", "--preset", "fast", "--steps", "2",
                 "--out", str(i2v)]) == 0
    v2v = tmp_path / "v2v.mp4"
    assert main(["generate", "--model", "tiny-cogvideox", "--task", "v2v", "--video", str(sample_video),
                 "--strength", "0.7", "--prompt", "a cat", "--frames", "9", "--height", "32", "--width", "32",
                 "--steps", "2", "--out", str(v2v)]) == 0
    assert read_video(i2v).shape == read_video(v2v).shape == (9, 32, 32, 3)


def test_bad_input_exits_2_in_a_subprocess(tmp_path, tiny_models):
    proc = _run_cli("generate", "--model", "no/such-model", "--prompt", "a cat")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown model 'no/such-model'")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "no/such-model"], "unknown model 'no/such-model'"),
        (["--model", "THUDM/CogVideoX-5b-I2V", "--task", "t2v"], "has no t2v pipeline"),
        (["--frames", "10"], "frames=10 is not allowed for cogvideox models; use 8k+1"),
        (["--model", "tiny-wan", "--frames", "8"], "frames=8 is not allowed for wan models; use 4k+1"),
        (["--height", "40"], "height=40 is not allowed; use a positive multiple of 16"),
        (["--width", "0"], "width=0 is not allowed"),
        (["--task", "i2v"], "image is missing"),
        (["--task", "i2v", "--image", "/no/such.png"], "image file '/no/such.png' does not exist"),
        (["--task", "v2v", "--video", "/no/such.mp4"], "video file '/no/such.mp4' does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_the_value(args, fragment, capsys, tiny_models):
    base = ["generate", "--prompt", "a cat", "--frames", "9", "--height", "32", "--width", "32", "--steps", "2"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and fragment in err[-1], err[-1]


def test_unreadable_image_exits_2(tmp_path, capsys, tiny_models):
    bogus = tmp_path / "not-an-image.png"
    bogus.write_text("this is text")
    code = main(["generate", "--task", "i2v", "--image", str(bogus), "--prompt", "a cat", "--frames", "9",
                 "--height", "32", "--width", "32", "--steps", "2", "--out", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "is not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
