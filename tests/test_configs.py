"""Registry, presets and request validation."""
from __future__ import annotations

import diffusers
import pytest

from configs.schema import PRESETS, TASKS, DecodeSettings, GenerationRequest, RequestError
from configs.registry import get_model_spec, load_presets, load_registry, models_for_task
from configs.validate import resolve_request

HUB_MODELS = [
    "THUDM/CogVideoX-2b",
    "THUDM/CogVideoX-5b",
    "THUDM/CogVideoX-5b-I2V",
    "THUDM/CogVideoX1.5-5B",
    "THUDM/CogVideoX1.5-5B-I2V",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
]


def test_registry_has_every_required_model_and_the_tiny_family():
    registry = load_registry()
    assert set(HUB_MODELS) | {"tiny-cogvideox", "tiny-wan", "tiny-wan-moe"} == set(registry)


@pytest.mark.parametrize("model", list(load_registry()))
def test_every_entry_names_pipelines_that_exist_in_installed_diffusers(model):
    spec = load_registry()[model]
    assert spec.tasks, model
    for task, task_spec in spec.tasks.items():
        cls = getattr(diffusers, task_spec.pipeline)  # AttributeError if the class does not exist
        assert cls.__name__.lower().startswith(("cogvideox", "wan")), task_spec.pipeline
        assert task in TASKS
    assert spec.family in ("cogvideox", "wan")
    assert spec.frames_ok(spec.default_frames), (model, spec.default_frames)
    assert spec.default_frames <= spec.max_frames
    h, w = spec.default_resolution
    assert h % spec.size_multiple == 0 and w % spec.size_multiple == 0
    if not spec.tiny:
        assert spec.params["transformer"] > 1e9 and spec.params["vae"] > 1e8 and spec.params["text_encoder"] > 4e9
        assert spec.download_gb > 1


def test_published_vram_figures_from_seed_003():
    assert get_model_spec("THUDM/CogVideoX-2b").published_vram_gb == {"t2v": 8, "i2v": 9}
    assert get_model_spec("THUDM/CogVideoX-5b").published_vram_gb == {"t2v": 17, "i2v": 18}
    assert get_model_spec("THUDM/CogVideoX1.5-5B").published_vram_gb == {"t2v": 20, "i2v": 21}


def test_frame_rules_per_family():
    cog, wan = get_model_spec("THUDM/CogVideoX-5b"), get_model_spec("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    assert [f for f in range(1, 50) if cog.frames_ok(f)] == [1, 9, 17, 25, 33, 41, 49]
    assert [f for f in range(1, 22) if wan.frames_ok(f)] == [1, 5, 9, 13, 17, 21]
    assert cog.snap_frames(12) == 9 and cog.snap_frames(14) == 17 and cog.snap_frames(500) == 49
    assert wan.snap_frames(12) == 13 and wan.snap_frames(0) == 1


def test_presets_are_fast_balanced_quality_with_rising_steps():
    presets = load_presets()
    assert tuple(presets) == PRESETS == ("fast", "balanced", "quality")
    assert presets["fast"].steps < presets["balanced"].steps < presets["quality"].steps


def test_models_for_task_lists_only_models_with_that_pipeline():
    i2v = models_for_task("i2v")
    assert "THUDM/CogVideoX-5b-I2V" in i2v and "THUDM/CogVideoX-5b" not in i2v
    assert "THUDM/CogVideoX-5b-I2V" not in models_for_task("t2v")


def test_resolve_request_fills_defaults_from_model_and_preset():
    req = resolve_request(GenerationRequest(model="THUDM/CogVideoX-5b", task="t2v", prompt="  a cat  ", preset="fast"))
    assert (req.frames, req.height, req.width, req.fps) == (49, 480, 720, 8)
    assert (req.steps, req.guidance) == (load_presets()["fast"].steps, load_presets()["fast"].guidance)
    assert req.prompt == "a cat"


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"model": "nope/model"}, "unknown model 'nope/model'"),
        ({"task": "i2v", "model": "THUDM/CogVideoX-5b"}, "has no i2v pipeline"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"frames": 10}, "frames=10 is not allowed"),
        ({"frames": 0}, "frames=0 is not allowed"),
        ({"height": 40}, "height=40 is not allowed"),
        ({"width": 0}, "width=0 is not allowed"),
        ({"width": -16}, "width=-16 is not allowed"),
        ({"height": 100_000}, "height=100000 is not allowed"),
        ({"steps": 0}, "steps=0 is not allowed"),
        ({"guidance": float("nan")}, "guidance=nan is not allowed"),
        ({"guidance": -1.0}, "guidance=-1.0 is not allowed"),
        ({"seed": -1}, "seed=-1 is not allowed"),
        ({"seed": 2**32}, "seed=4294967296 is not allowed"),
        ({"task": "v2v", "video": None}, "video is missing"),
        ({"task": "v2v", "video": "/nonexistent.mp4"}, "does not exist"),
        ({"preset": "turbo"}, "preset='turbo' is not allowed"),
        ({"decode": DecodeSettings(tile_x=64, tile_stride_x=128)}, "would leave gaps"),
    ],
)
def test_bad_requests_name_the_value(changes, fragment):
    base = GenerationRequest(model="tiny-cogvideox", task="t2v", prompt="a cat", frames=9, height=32, width=32)
    with pytest.raises(RequestError, match=None) as info:
        resolve_request(base.replace(**changes))
    assert fragment in str(info.value)


def test_strength_outside_0_1_is_refused(sample_video):
    req = GenerationRequest(model="tiny-cogvideox", task="v2v", prompt="a cat", frames=9, height=32, width=32,
                            video=str(sample_video), strength=1.5)
    with pytest.raises(RequestError, match=r"strength=1.5 is not allowed"):
        resolve_request(req)


def test_fixed_size_i2v_models_refuse_other_sizes(sample_image):
    req = GenerationRequest(model="tiny-cogvideox", task="i2v", prompt="a cat", frames=9, height=48, width=64,
                            image=str(sample_image))
    with pytest.raises(RequestError, match="fix the size at 32x32"):
        resolve_request(req)


def test_request_round_trips_through_dict():
    req = GenerationRequest(model="tiny-wan", task="t2v", prompt="x", decode=DecodeSettings(tile_x=128))
    assert GenerationRequest.from_dict(req.to_dict()) == req
