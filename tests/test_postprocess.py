"""postprocess/: upscale x2 / x4 (spandrel, tiled) and interpolate x2 / x4 (minterpolate), streamed.

The learned upscaler is a random-weight Real-ESRGAN architecture built with spandrel's own RRDBNet class and
saved with safetensors in its real key layout; spandrel's ModelLoader must recognise it from the state dict.
"""
from __future__ import annotations

import numpy as np
import pytest

from configs.schema import RequestError
from postprocess import interpolate_video, probe_video, upscale_video
from postprocess.upscale import Lanczos, TileState, load_upscaler, open_upscaler, resolve_upscaler
from tests.conftest import read_video, video_fps


def write_random_esrgan(path, scale: int, num_blocks: int = 1, num_filters: int = 16, gain: float = 30.0):
    """A random-weight Real-ESRGAN file: x4 is RRDBNet(3 -> 3, scale 4); x2 is Real-ESRGAN's x2 layout
    (pixel-unshuffle by 2 in front of a x4 net: 12 input channels), as RealESRGAN_x2plus ships."""
    import torch
    from safetensors.torch import save_file

    from postprocess.spandrel_import import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    in_nc, shuffle = (12, 2) if scale == 2 else (3, None)
    model = ESRGAN(in_nc=in_nc, out_nc=3, num_filters=num_filters, num_blocks=num_blocks, scale=4,
                   shuffle_factor=shuffle)
    # A short random net's output sits near 0 (clamped flat to black): scale the last conv so it spans the
    # pixel range and tiles have something to disagree on.
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(gain)
        last.bias.fill_(0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_video(path, frames: int, height: int, width: int, fps: int = 8):
    """A moving gradient, so interpolation and upscaling have structure to work on."""
    from decode.writer import VideoWriter

    y, x = np.mgrid[0:height, 0:width]
    with VideoWriter(path, fps) as w:
        for t in range(frames):
            w.write(np.stack([(x * 4 + t * 6) % 256, (y * 5) % 256, ((x + y) * 2 + t * 3) % 256], -1).astype(np.uint8))
    return path


@pytest.fixture
def clip(tmp_path):
    return write_video(tmp_path / "clip.mp4", 9, 32, 48)


@pytest.mark.parametrize("scale", [2, 4])
def test_spandrel_recognises_the_random_realesrgan_and_upscales_9_frames(tmp_path, clip, scale):
    weights = write_random_esrgan(tmp_path / f"esrgan_x{scale}.safetensors", scale)
    up = load_upscaler(weights, "cpu")
    assert up.scale == scale and "ESRGAN" in up.label
    out = tmp_path / "up.mp4"
    result = upscale_video(clip, out, up, TileState(64 if scale == 2 else None, 48))
    video = read_video(out)
    assert video.shape == (9, 32 * scale, 48 * scale, 3)
    assert result.frames_out == 9 and result.size_out == (48 * scale, 32 * scale)
    assert video_fps(out) == pytest.approx(8)
    assert not list(tmp_path.glob(".*partial*"))


def test_tiled_equals_untiled_within_40db_on_a_full_width_model(tmp_path):
    """64 features (Real-ESRGAN's width), 4 blocks; 32x48 -> 128x192 in 6 tiles of 96 px, 48 px of overlap."""
    up = load_upscaler(write_random_esrgan(tmp_path / "w.safetensors", 4, num_blocks=4, num_filters=64), "cpu")
    y, x = np.mgrid[0:32, 0:48]
    frame = np.stack([(x * 5) % 256, (y * 7) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    tiles = TileState(96, 48)
    assert tiles.layout(32, 48, 4).count == 6  # 2 x 3 tiles of 24 input px, at least 12 px of overlap
    whole = up.upscale(frame, TileState(None)).astype(np.float64)
    tiled = up.upscale(frame, tiles).astype(np.float64)
    assert whole.std() > 20  # the model's output has structure to compare, not a flat clamp
    psnr = 10 * np.log10(255**2 / ((whole - tiled) ** 2).mean())
    assert psnr >= 40, psnr


def test_out_of_memory_halves_the_tile_on_the_ladder(tmp_path, clip):
    """x2 on 32x48: the whole frame fails, then the ladder's tiles (64 px at its floor) fit; no rung twice."""
    up = load_upscaler(write_random_esrgan(tmp_path / "w.safetensors", 2), "cpu")
    real, sizes = up.model, []

    def fake(x):
        sizes.append(tuple(x.shape[-2:]))
        if x.shape[-1] > 32:  # input tiles wider than 32 px (64 output px) "run out of memory"
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    up.model = fake
    tiles = TileState(None)
    frame = read_video(clip)[0]
    out = up.upscale(frame, tiles)
    assert out.shape == (64, 96, 3)
    assert sizes[0] == (32, 48) and all(s[1] <= 32 for s in sizes[1:])
    assert tiles.oom_steps == ["tiles untiled (64x96 px) -> 1x2 tiles of 64x56 px over 64x96 px"]
    up.model = lambda x: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):  # at the floor: the error, not a loop
        up.upscale(frame, tiles)


def test_lanczos_without_weights_is_labelled(tmp_path, clip, monkeypatch):
    monkeypatch.setattr("postprocess.upscale.cached_weights", lambda spec: None)
    choice = resolve_upscaler(4, "auto")
    assert choice.path is None and choice.label == "lanczos (no model)"
    assert "hf download ai-forever/Real-ESRGAN RealESRGAN_x4.pth" in choice.notes[0]
    result = upscale_video(clip, tmp_path / "l.mp4", open_upscaler(choice))
    assert read_video(tmp_path / "l.mp4").shape == (9, 128, 192, 3) and result.method == "lanczos (no model)"


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolation_gives_2n_minus_1_frames_at_twice_the_fps(tmp_path, clip, factor):
    out = tmp_path / "i.mp4"
    seen = []
    result = interpolate_video(clip, out, factor, on_frame=lambda i, n: seen.append((i, n)))
    video, src = read_video(out), read_video(clip)
    assert video.shape == ((9 - 1) * factor + 1, 32, 48, 3)
    assert video_fps(out) == pytest.approx(8 * factor)
    assert seen[-1] == (len(video), len(video)) and "no model" in result.method
    # every original frame sits at its own time (up to the mp4's loss)
    err = np.abs(video[::factor].astype(int) - src.astype(int)).mean()
    assert err < 4, err


def test_bad_input_names_the_value(tmp_path, clip):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(RequestError, match="notes.mp4.*not a video"):
        probe_video(text)
    with pytest.raises(RequestError, match="does not exist"):
        probe_video(tmp_path / "absent.mp4")
    one = write_video(tmp_path / "one.mp4", 1, 32, 48)
    with pytest.raises(RequestError, match="1 frame; interpolation needs at least 2"):
        interpolate_video(one, tmp_path / "x.mp4")
    with pytest.raises(RequestError, match="scale=3 is not allowed; use one of 2, 4"):
        resolve_upscaler(3)
    with pytest.raises(RequestError, match="factor=3 is not allowed"):
        interpolate_video(clip, tmp_path / "x.mp4", 3)
    with pytest.raises(RequestError, match="weights file .*missing.pth.* does not exist"):
        resolve_upscaler(2, weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RequestError, match="junk.safetensors.*not an upscaler model spandrel recognises"):
        load_upscaler(junk, "cpu")
    assert not (tmp_path / "x.mp4").exists()


def test_offline_learned_method_names_the_fetch_command(monkeypatch):
    monkeypatch.setattr("postprocess.upscale.cached_weights", lambda spec: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RequestError, match="hf download ai-forever/Real-ESRGAN RealESRGAN_x2.pth"):
        resolve_upscaler(2, "realesrgan")


def test_upscaler_is_held_and_evicted_by_the_pipeline_cache(tmp_path, clip):
    from engine.cache import PipelineCache
    from engine.finishing import FinishStep, get_upscaler, run_step

    cache = PipelineCache(max_size=1)
    x2 = FinishStep("upscale", 2, weights=str(write_random_esrgan(tmp_path / "x2.safetensors", 2)))
    first, _ = get_upscaler(cache, x2)
    again, _ = get_upscaler(cache, x2)
    assert again is first and cache.loads == 1
    [row] = cache.info()
    assert row["model"] == "upscaler:x2.safetensors" and row["bytes"] == first.weight_bytes() > 0
    x4 = FinishStep("upscale", 4, weights=str(write_random_esrgan(tmp_path / "x4.safetensors", 4)))
    seen = []
    done = run_step(clip, x4, cache, on_frame=lambda i, n, message: seen.append(message))
    assert cache.keys() == [("upscaler:x4.safetensors", "upscale", "none")] and cache.loads == 2  # x2 evicted
    assert seen[-1] == "upscaling frame 9/9" and done.frames_out == 9
    assert "MiB of weights + one tile's activations" in done.notes[0]


def test_spandrel_import_leaves_no_stand_in_torchvision_behind():
    """diffusers probes torchvision with importlib.util.find_spec after spandrel may have been imported."""
    import importlib.util
    import sys

    from postprocess.spandrel_import import import_spandrel

    assert import_spandrel().ModelLoader is not None
    module = sys.modules.get("torchvision")
    assert module is None or module.__spec__ is not None
    importlib.util.find_spec("torchvision")  # raises ValueError on a stand-in without a spec


def test_the_plan_counts_the_upscaler_as_a_stage(tmp_path, monkeypatch, tiny_models):
    import json

    import postprocess.upscale as up
    from configs.schema import GenerationRequest, Plan
    from configs.validate import resolve_request
    from engine.cache import PipelineCache
    from engine.finishing import with_finishing
    from engine.runner import Runner

    req = resolve_request(GenerationRequest(model="tiny-cogvideox", task="t2v", prompt="a cat", frames=9, height=32,
                                            width=32, steps=2, upscale=2))
    # No weights here: Lanczos, no weights in the stage; with the Real-ESRGAN file found, its weights count.
    lanczos = with_finishing(Plan(device="cpu", stages={"denoise": 1}), req)
    assert lanczos.stages["upscale x2"] == up.predicted_peak_bytes(0, up.DEFAULT_TILE_PX, (32, 32), 2)
    assert "lanczos (no model)" in lanczos.reasons[-1]
    monkeypatch.setattr(up, "cached_weights", lambda spec: write_random_esrgan(tmp_path / "x2.safetensors", 2))
    learned = with_finishing(Plan(device="cuda:0", stages={"denoise": 1}), req)
    weights_fp16 = up.UPSCALERS[2].params * 2
    assert learned.stages["upscale x2"] == up.predicted_peak_bytes(weights_fp16, up.DEFAULT_TILE_PX, (32, 32), 2)
    assert with_finishing(Plan(), req.replace(upscale=0)) == Plan()  # no upscale, no stage
    # A run's sidecar keeps the stage (Lanczos here: the random file is not what `auto` finds offline)
    monkeypatch.undo()
    result = Runner(PipelineCache(max_size=2), outputs_dir=tmp_path / "out").generate(req)
    assert "upscale x2" in json.loads(result.sidecar_path.read_text())["plan"]["stages"]
