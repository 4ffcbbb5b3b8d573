"""`python app.py generate ...`: a real subprocess, the file read back, exit 2 with one line on bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ui.cli import main
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


# --------------------------------------------------------------------------- --plan and the plan line


GENERATE = ["generate", "--prompt", "a cat", "--frames", "9", "--height", "32", "--width", "32", "--steps", "2"]


def test_generate_plan_prints_the_pages_plan_and_loads_nothing(tmp_path, capsys, monkeypatch, tiny_models):
    from configs.schema import GenerationRequest
    from configs.validate import resolve_request
    from engine.cache import PipelineCache
    from reports.text import fmt_bytes
    from engine.runner import Runner

    def no_load(*args, **kwargs):
        raise AssertionError("--plan must not load a pipeline")

    monkeypatch.setattr(PipelineCache, "get", no_load)
    outputs = tmp_path / "outputs"
    assert main([*GENERATE, "--offload", "model", "--plan", "--outputs-dir", str(outputs)]) == 0
    out = capsys.readouterr().out
    # The page's plan text for the same request (free memory moves between two calls: the budget words are
    # left out of the comparison; rung, stages and their bytes are not).
    req = resolve_request(GenerationRequest(model="tiny-cogvideox", task="t2v", prompt="a cat", frames=9, height=32,
                                            width=32, steps=2, offload="model"))
    plan = Runner(PipelineCache(), outputs_dir=outputs).plan(req)
    assert out.startswith(f"**T2V · tiny-cogvideox** · 9 frames · 32x32 · 2 steps · runs on `{plan.device}`")
    assert "offload `model`" in out and "offload model: as requested" in out
    for stage, peak in plan.stages.items():
        assert re.search(rf"\| (\*\*)?{stage}(\*\*)?( \(peak\))? \|.*{re.escape(fmt_bytes(peak))}", out), (stage, out)
    assert f"**{plan.peak_stage}** (peak)" in out
    assert out.count("\n- ") == len(plan.reasons)
    assert not outputs.exists()  # nothing written either


def test_generate_plan_refuses_bad_input_like_a_run(capsys, tiny_models):
    assert main([*GENERATE, "--frames", "10", "--plan"]) == 2
    assert "frames=10 is not allowed" in capsys.readouterr().err


def test_a_run_logs_the_one_line_plan_first(tmp_path, caplog, tiny_models):
    with caplog.at_level("INFO", logger="ui.cli"):
        assert main([*GENERATE, "--seed", "5", "--out", str(tmp_path / "o.mp4")]) == 0
    [line] = [r.getMessage() for r in caplog.records if r.name == "ui.cli" and "Plan:" in r.getMessage()]
    assert line.startswith("**Plan:** ") and line.endswith("(app.py generate --plan shows the full plan)")
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["plan"]["summary"] in line


# --------------------------------------------------------------------------- flags and fields: one conversion


def test_generate_flags_become_the_same_request_as_the_pages_fields():
    from configs.schema import DecodeSettings, GenerationRequest, LoraChoice
    from ui.cli import build_parser, request_from_args
    from ui.fields import fields_from_request, request_from_fields

    args = build_parser().parse_args([
        "generate", "--model", "tiny-wan", "--task", "v2v", "--prompt", "a cat", "--negative-prompt", "blur",
        "--frames", "17", "--height", "64", "--width", "48", "--fps", "12", "--steps", "3", "--guidance", "4.5",
        "--preset", "fast", "--seed", "9", "--video", "in.gif", "--strength", "0.4", "--offload", "group", "--int8",
        "--tile-x", "192", "--tile-stride-x", "96", "--no-vae-tiling", "--chunk-frames", "1",
        "--lora", "style:0.5", "--lora", "/loras/x.safetensors", "--context-parallel", "2",
    ])
    expected = GenerationRequest(
        model="tiny-wan", task="v2v", prompt="a cat", negative_prompt="blur", frames=17, height=64, width=48, fps=12,
        steps=3, guidance=4.5, preset="fast", seed=9, video="in.gif", strength=0.4, offload="group", quant="int8",
        decode=DecodeSettings(enable_vae_tiling=False, tile_x=192, tile_stride_x=96, chunk_frames=1, fixed_tiles=True),
        loras=(LoraChoice("style", 0.5), LoraChoice("/loras/x.safetensors")), context_parallel=2,
    )
    req = request_from_args(args)
    assert req == expected
    # The page's fields for it (API parameter names), and back: the same request but for the CLI-only chunking.
    fields = fields_from_request(req)
    assert fields["resolution"] == "64x48" and fields["vae_tiling"] is False and fields["quant"] == "int8"
    assert set(fields) == {
        "model", "prompt", "negative_prompt", "seed", "preset", "steps", "guidance", "guidance_2", "frames", "fps",
        "resolution", "image", "video", "strength", "offload", "quant", "vae_tiling", "tile_x", "tile_y",
        "tile_stride_x", "tile_stride_y", "upscale", "interpolate", "loras", "shift", "step_cache", "attention",
        "compile", "fixed_tiles", "context_parallel",
    }
    assert fields["loras"] == [["style", 0.5, None], ["/loras/x.safetensors", 1.0, None]]
    assert request_from_fields("v2v", fields) == expected.replace(decode=DecodeSettings(
        enable_vae_tiling=False, tile_x=192, tile_stride_x=96, fixed_tiles=True))
    # Left-out flags are the model's and the preset's defaults (None), as before.
    bare = request_from_args(build_parser().parse_args(["generate", "--prompt", "a cat"]))
    assert bare == GenerationRequest(model="tiny-cogvideox", task="t2v", prompt="a cat")
    # A tile flag given, even at the default value, keeps the tiles as set (the planner sizes them otherwise).
    same = request_from_args(build_parser().parse_args(["generate", "--prompt", "a cat", "--tile-x", "272"]))
    assert same.decode == DecodeSettings(fixed_tiles=True) and bare.decode == DecodeSettings()


def test_page_values_arrive_as_floats_and_pass_on_as_whole_numbers():
    from configs.schema import DecodeSettings, RequestError
    from ui.fields import request_from_fields

    values = {"model": "tiny-cogvideox", "prompt": "a cat", "seed": 3.0, "preset": "balanced", "steps": 2.0,
              "guidance": 6, "frames": 9.0, "fps": 8.0, "resolution": "32x32", "offload": "auto", "quant": "none",
              "vae_tiling": True, "tile_x": 256.0, "tile_y": 272, "tile_stride_x": 128.0, "tile_stride_y": 128}
    req = request_from_fields("t2v", values, seed=77)
    assert (req.seed, req.steps, req.frames, req.fps, req.height, req.width) == (77, 2, 9, 8, 32, 32)
    assert type(req.steps) is int and type(req.guidance) is float and req.guidance == 6.0
    assert req.decode == DecodeSettings(tile_x=256, tile_stride_x=128, tile_stride_y=128)
    assert request_from_fields("t2v", {**values, "steps": 2.5}).steps == 2.5  # passed on for the check to name
    with pytest.raises(RequestError, match=r"resolution='480' is not allowed; use HEIGHTxWIDTH such as 480x720"):
        request_from_fields("t2v", {**values, "resolution": "480"})


def test_decode_flags_left_out_keep_the_runs_settings():
    from configs.schema import DecodeSettings
    from ui.cli import build_parser
    from ui.fields import decode_from_fields, decode_overrides

    args = build_parser().parse_args(["decode", "--latents", "x.latents.pt", "--out", "y.mp4", "--tile-x", "192",
                                      "--no-vae-tiling"])
    assert decode_overrides(vars(args)) == {"tile_x": 192, "enable_vae_tiling": False}
    base = DecodeSettings(tile_y=200, tile_stride_y=100, chunk_frames=2)
    assert decode_from_fields(vars(args), base) == DecodeSettings(
        enable_vae_tiling=False, tile_x=192, tile_y=200, tile_stride_y=100, chunk_frames=2)
    bare = build_parser().parse_args(["decode", "--latents", "x.latents.pt", "--out", "y.mp4"])
    assert decode_overrides(vars(bare)) == {} and decode_from_fields(vars(bare), base) == base


def test_generate_two_expert_model_t2v_in_a_subprocess_and_i2v(tmp_path, tiny_models, sample_image):
    """tiny-wan-moe through the CLI: --guidance-2 reaches the sidecar with the step where the experts switched."""
    out = tmp_path / "moe.mp4"
    proc = _run_cli("generate", "--model", "tiny-wan-moe", "--prompt", "a cat", "--frames", "9", "--height", "32",
                    "--width", "32", "--steps", "4", "--guidance", "5", "--guidance-2", "2.5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_video(out).shape == (9, 32, 32, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["request"]["guidance_2"] == 2.5
    assert sidecar["experts"] == {"boundary_ratio": 0.875, "switch_step": 2, "guidance": 5.0, "guidance_2": 2.5,
                                  "experts_in_ram": 2}
    i2v = tmp_path / "moe-i2v.mp4"
    assert main(["generate", "--model", "tiny-wan-moe", "--task", "i2v", "--image", str(sample_image), "--prompt",
                 "a cat", "--frames", "9", "--height", "32", "--width", "32", "--steps", "4", "--out", str(i2v)]) == 0
    assert read_video(i2v).shape == (9, 32, 32, 3)
    sidecar = json.loads(i2v.with_suffix(".json").read_text())
    assert sidecar["experts"]["switch_step"] == 2 and sidecar["experts"]["guidance_2"] == sidecar["request"]["guidance"]


def test_guidance_2_for_a_one_transformer_model_exits_2(capsys, tiny_models):
    assert main(["generate", "--model", "tiny-wan", "--prompt", "a cat", "--guidance-2", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: guidance_2=3.0 is not allowed for tiny-wan t2v: it runs one transformer")


def test_generate_then_upscale_then_interpolate_through_the_cli(tmp_path, tiny_models, monkeypatch):
    """Offline on a fresh machine: upscale uses Lanczos (no weights) and says so; interpolate uses minterpolate;
    with --weights a random-weight Real-ESRGAN file spandrel recognises is used instead."""
    from tests.test_postprocess import write_random_esrgan

    gen = tmp_path / "gen.mp4"
    assert main(["generate", "--model", "tiny-cogvideox", "--prompt", "a cat", "--frames", "9", "--height", "32",
                 "--width", "48", "--steps", "2", "--out", str(gen)]) == 0
    up = tmp_path / "up.mp4"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # the subprocess sees an empty hub cache: a fresh machine
    proc = _run_cli("upscale", "--video", str(gen), "--scale", "2", "--out", str(up), "--offline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "method: lanczos (no model)" in proc.stderr and "hf download ai-forever/Real-ESRGAN" in proc.stderr
    assert read_video(up).shape == (9, 64, 96, 3)
    proc = _run_cli("interpolate", "--video", str(up), "--factor", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "up_int2.mp4"
    assert proc.stdout.strip() == str(out) and "minterpolate" in proc.stderr
    assert read_video(out).shape == (17, 64, 96, 3) and video_fps(out) == pytest.approx(16)
    assert json.loads(out.with_suffix(".json").read_text())["finishing"][-1]["frames_out"] == 17
    weights = write_random_esrgan(tmp_path / "x4.safetensors", 4)
    learned = tmp_path / "learned.mp4"
    assert main(["upscale", "--video", str(gen), "--scale", "4", "--weights", str(weights), "--tile", "0",
                 "--out", str(learned)]) == 0
    assert read_video(learned).shape == (9, 128, 192, 3)
    assert "x4.safetensors (ESRGAN x4, learned)" in json.loads(learned.with_suffix(".json").read_text())["finishing"][0]["method"]


def test_generate_with_finishing_flags_keeps_every_video(tmp_path, tiny_models, capsys):
    out = tmp_path / "run.mp4"
    assert main(["generate", "--model", "tiny-wan", "--prompt", "a cat", "--frames", "9", "--height", "32",
                 "--width", "32", "--steps", "2", "--out", str(out), "--upscale", "2", "--interpolate", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == ["run.mp4", "run_up2.mp4", "run_up2_int2.mp4"]
    assert read_video(tmp_path / "run_up2_int2.mp4").shape == (17, 64, 64, 3)
    assert video_fps(tmp_path / "run_up2_int2.mp4") == pytest.approx(32)


@pytest.mark.parametrize("args, message", [
    (["upscale", "--scale", "3"], "error: scale=3 is not allowed; use one of 2, 4"),
    (["interpolate", "--factor", "8"], "error: factor=8 is not allowed; use one of 2, 4"),
    (["upscale", "--weights", "missing.pth"], "error: weights file 'missing.pth' does not exist"),
    (["interpolate"], "has 1 frame; interpolation needs at least 2"),
    (["upscale", "--method", "realesrgan"], "hf download ai-forever/Real-ESRGAN RealESRGAN_x2.pth"),
])
def test_finishing_commands_refuse_bad_input_with_one_line(tmp_path, capsys, args, message, monkeypatch):
    from tests.test_postprocess import write_video

    monkeypatch.setattr("postprocess.upscale.cached_weights", lambda spec: None)
    one = write_video(tmp_path / "one.mp4", 1, 32, 48)
    assert main([args[0], "--video", str(one), *args[1:], "--out", str(tmp_path / "o.mp4")]
                + (["--offline"] if args[0] == "upscale" else [])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_a_file_that_is_not_a_video_is_refused(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["upscale", "--video", str(notes)]) == 2
    assert "error: 'notes.txt' is not a video ffmpeg can read" in capsys.readouterr().err
