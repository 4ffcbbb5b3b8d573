"""The CLI shows the runner's progress: a bar redrawn in place on a terminal (step k/N, decode chunk j/M, ETA),
one line per stage without `\\r` when piped. Two real `app.py generate` runs, one under a pseudo-terminal and
one piped, started together (each is mostly imports); then the renderer alone on a StringIO."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from reports.progress import ProgressRenderer, format_duration
from engine.runner import ProgressEvent
from tests.conftest import ROOT

GENERATE = ["generate", "--model", "tiny-wan", "--prompt", "a cat", "--frames", "9", "--height", "32",
            "--width", "32", "--steps", "3"]
STAGES = ("loading", "encoding", "denoising", "decoding", "saving")


def _start(out, stdout, stderr) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # two runs side by side on a few cores
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), *GENERATE, "--out", str(out)],
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)


def _read_all(fd: int, into: list[bytes]) -> None:
    """Everything the terminal side shows, until the child closes it (EIO on Linux, b"" elsewhere)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        into.append(chunk)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """{"tty": (output, sidecar), "pipe": (stdout + stderr, sidecar)} of two runs made side by side."""
    pty = pytest.importorskip("pty")
    tmp = tmp_path_factory.mktemp("progress")
    leader, follower = pty.openpty()
    try:
        tty_proc = _start(tmp / "tty.mp4", follower, follower)
    finally:
        os.close(follower)  # the child holds it now: its exit ends the reads
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(leader, chunks), daemon=True)
    reader.start()
    pipe_proc = _start(tmp / "pipe.mp4", subprocess.PIPE, subprocess.PIPE)
    out, err = pipe_proc.communicate(timeout=300)
    tty_proc.wait(timeout=300)
    reader.join(timeout=30)
    os.close(leader)
    tty_text = b"".join(chunks).decode("utf-8", "replace")
    assert tty_proc.returncode == 0, tty_text[-2000:]
    assert pipe_proc.returncode == 0, err.decode()[-2000:]
    sidecar = {name: json.loads((tmp / f"{name}.json").read_text()) for name in ("tty", "pipe")}
    return {"tty": (tty_text, sidecar["tty"]), "pipe": (out.decode() + err.decode(), sidecar["pipe"])}


def _bar_frames(text: str, stage: str) -> list[str]:
    """The bar's drawings of a stage: the pieces between carriage returns / newlines that start with it."""
    pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [p.strip() for p in pieces if p.startswith(stage + " ")]


def test_terminal_shows_a_bar_reaching_the_last_step_and_chunk(runs):
    text, sidecar = runs["tty"]
    chunks = sidecar["decode"]["chunks"]
    assert chunks >= 1
    denoise, decode = _bar_frames(text, "denoising"), _bar_frames(text, "decoding")
    assert any("] 3/3 " in f for f in denoise), denoise
    assert any(f"] {chunks}/{chunks} " in f for f in decode), decode
    assert any("ETA" in f for f in denoise + decode)
    assert denoise[-1].endswith("s") and "] 3/3 in " in denoise[-1]  # the stage ends with its final count and time
    assert "\r" in text  # redrawn in place
    # a log record never shares a line with the bar: every line that has a log level starts with the time
    for line in text.replace("\r\n", "\n").split("\n"):
        for piece in line.split("\r"):
            if " INFO " in piece:
                assert piece.lstrip()[:2].isdigit(), repr(line)


def test_piped_output_has_one_line_per_stage_and_no_carriage_returns(runs):
    text, sidecar = runs["pipe"]
    assert "\r" not in text
    lines = text.splitlines()
    for stage in STAGES:
        starts = [line for line in lines if f" {stage}: " in line and " INFO " not in line]
        assert starts, f"no line for {stage}:\n{text}"
        assert len(starts) <= 2, starts  # its start, and where it counts, its final count
    denoise = [line for line in lines if " denoising: " in line]
    assert denoise[0].endswith("denoising step 1/3") and "denoising step 3/3 (" in denoise[-1]
    chunks = sidecar["decode"]["chunks"]
    assert any(f"decoding chunk {chunks}/{chunks} (" in line for line in lines), text
    stages = [s for line in lines for s in STAGES if f" {s}: " in line and " INFO " not in line]
    assert stages == sorted(stages, key=STAGES.index)  # in the run's order


# ---------------------------------------------------------------- the renderer alone


class FakeTTY(io.StringIO):
    def __init__(self, encoding: str | None = None):
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self):
        return self._encoding

    def isatty(self) -> bool:
        return True


def _feed(renderer: ProgressRenderer, events) -> None:
    with renderer:
        for event in events:
            renderer(event)


EVENTS = [
    ProgressEvent("loading", message="loading tiny-wan (t2v)"),
    ProgressEvent("denoising", 1, 2, "denoising step 1/2 · high-noise expert"),
    ProgressEvent("denoising", 1, 2, "switching experts: freeing the high-noise expert, loading the low-noise one"),
    ProgressEvent("denoising", 2, 2, "denoising step 2/2 · low-noise expert", 0.0),
    ProgressEvent("decoding", 0, 0, "decoding"),
    ProgressEvent("decoding", 1, 2, "decoding chunk 1/2"),
    ProgressEvent("decoding", 2, 2, "decoding chunk 2/2"),
    ProgressEvent("finishing", 1, 3, "upscaling frame 1/3"),
    ProgressEvent("finishing", 3, 3, "upscaling frame 3/3"),
    ProgressEvent("finishing", 1, 5, "interpolating frame 1/5"),
    ProgressEvent("done", message="/x.mp4"),
]


def test_lines_mode_prints_stage_starts_and_final_counts():
    stream = io.StringIO()
    _feed(ProgressRenderer(stream), EVENTS)  # a StringIO is no terminal: lines
    text = stream.getvalue()
    assert "\r" not in text
    messages = [line.split(" ", 1)[1] for line in text.splitlines()]
    assert messages[:4] == ["loading: loading tiny-wan (t2v)", "denoising: denoising step 1/2 · high-noise expert",
                            "denoising: switching experts: freeing the high-noise expert, loading the low-noise one",
                            "denoising: denoising step 2/2 · low-noise expert"]
    assert messages[4] == "decoding: decoding"
    assert messages[5].startswith("decoding: decoding chunk 2/2 (")
    assert messages[6:] == ["finishing: upscaling frame 1/3", messages[7], "finishing: interpolating frame 1/5"]
    assert messages[7].startswith("finishing: upscaling frame 3/3 (")
    assert not any("/x.mp4" in m for m in messages)  # the path is stdout's


def test_bar_mode_redraws_in_place_and_ends_each_stage_with_a_newline():
    stream = FakeTTY()
    _feed(ProgressRenderer(stream, width=200), EVENTS)
    text = stream.getvalue()
    finished = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n") if line]
    assert finished[0].startswith("loading   loading tiny-wan (t2v) (")
    assert finished[1].startswith("denoising [") and " 1/2 in " in finished[1]
    assert finished[1].endswith("high-noise expert") and finished[2].endswith("loading the low-noise one")
    assert finished[3].startswith("denoising [") and " 2/2 in " in finished[3]
    assert finished[4].startswith("decoding  [") and " 2/2 in " in finished[4]
    assert finished[5].endswith("upscaling") and finished[6].endswith("interpolating") and " 1/5 in " in finished[6]
    assert len(finished) == 7 and text.endswith("\n")


@pytest.mark.parametrize("encoding, fill, empty", [("utf-8", "█", "░"), ("ascii", "#", "-"), (None, "#", "-")])
def test_bar_mode_fits_the_width_with_the_stream_s_characters(encoding, fill, empty):
    stream = FakeTTY(encoding)
    ProgressRenderer(stream, width=40).update("denoising", 5, 10, "denoising step 5/10 · low-noise expert", 75.0)
    drawn = stream.getvalue().split("\r")[-1]
    full = f"denoising [{fill * 10}{empty * 10}] 5/10 ETA 1:15  low-noise expert"
    assert drawn == full[:39]


def test_log_records_clear_the_bar_and_redraw_it():
    stream = FakeTTY()
    log = logging.getLogger("test_cli_progress.hook")
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        with ProgressRenderer(stream, width=200) as renderer:
            renderer.hook_logging(log)
            renderer.update("decoding", 1, 3, "decoding chunk 1/3")
            log.warning("a record")
        log.warning("after")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().split("\n")
    assert lines[0].rsplit("\r", 1)[-1] == "a record"  # on a clean line of its own
    assert lines[1].rsplit("\r", 1)[-1].startswith("decoding  [") and lines[2] == "after"
    assert "emit" not in handler.__dict__  # unhooked on close


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0 s"), (3.21, "3.2 s"), (42, "42 s"), (75, "1:15"),
                                           (3725, "1:02:05")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text
