"""Shared test setup: an isolated FitVideo home (tiny models built once per checkout), offline hub."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Under pytest-xdist (`./run.sh test` runs two workers, a test file each at a time) every worker gets its own home,
# its own range of ports for the servers it starts and one torch thread (two workers share the two cores).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER:
    index = int(WORKER.removeprefix("gw") or 0)
    os.environ.setdefault("GRADIO_SERVER_PORT", str(7860 + 200 * index))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FITVIDEO_HOME", str(ROOT / ".cache" / f"test-home{'-' + WORKER if WORKER else ''}"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def read_video(path) -> "np.ndarray":
    """All frames of a video file as (T, H, W, 3) uint8."""
    import imageio.v2 as imageio
    import numpy as np

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([frame for frame in reader])
    finally:
        reader.close()


def video_fps(path) -> float:
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return float(reader.get_meta_data()["fps"])
    finally:
        reader.close()


@pytest.fixture(scope="session")
def tiny_models():
    """Both tiny models written to disk once (save_pretrained), returned as name -> folder."""
    from engine.tiny import TINY_NAMES, ensure_tiny_model

    return {name: ensure_tiny_model(name) for name in TINY_NAMES}


@pytest.fixture
def runner(tmp_path, tiny_models):
    from engine.cache import PipelineCache
    from engine.runner import Runner

    return Runner(PipelineCache(max_size=2), outputs_dir=tmp_path / "outputs")


@pytest.fixture
def sample_image(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "input.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture
def sample_video(tmp_path):
    """A 9-frame 32x32 mp4 (moving gradient)."""
    import numpy as np

    from decode.writer import VideoWriter

    path = tmp_path / "input.mp4"
    t = np.arange(9)[:, None, None, None]
    y = np.arange(32)[None, :, None, None]
    x = np.arange(32)[None, None, :, None]
    frames = ((x * 8 + y * 4 + t * 20 + np.arange(3) * 60) % 256).astype("uint8")
    with VideoWriter(path, fps=8) as writer:
        writer.write(frames)
    return path


@pytest.fixture(scope="session")
def wan_pipeline():
    """A Wan T2V pipeline folder around a 4-block Wan-14B-width transformer (bench/host_ram.py `build_pipeline`: 3.05
    GiB of random bf16 weights, a tiny VAE, a 4096-wide two-layer text encoder, all bf16). Built once per checkout
    under .cache/ in a child process (so no test process holds it), under a lock: two test workers share it."""
    import fcntl
    import subprocess

    folder = ROOT / ".cache" / "wan14b-pipeline-4"
    ROOT.joinpath(".cache").mkdir(exist_ok=True)
    with open(ROOT / ".cache" / "wan14b-pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").is_file():
            code = ("import sys, shutil; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                    "from bench.host_ram import build_pipeline; f = Path(sys.argv[2]); shutil.rmtree(f, True); "
                    "n = build_pipeline(f, 4); (f / 'done').write_text(str(n))")
            proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(folder)], capture_output=True,
                                  text=True, check=False)
            assert proc.returncode == 0, f"building the 14B-width stack failed: {proc.stderr[-2000:]}"
    return folder, int((folder / "done").read_text())
