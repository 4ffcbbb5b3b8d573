"""Model families (families/) and local diffusers folders as models (configs/local.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from configs.local import ModelUnavailableError, count_parameters, find_model_folders
from configs.schema import RequestError
from configs.registry import get_model_spec, load_registry
from families import FAMILIES, family_of_pipeline, family_of_vae, get_family
from ui.cli import main
from tests.conftest import read_video
from vram_utils.archs import arch_for


def test_every_registry_model_names_the_pipelines_its_family_knows():
    for spec in load_registry().values():
        family = get_family(spec.family)
        for task, task_spec in spec.tasks.items():
            assert task_spec.pipeline == family.pipelines[task], (spec.id, task)
            assert family_of_pipeline(task_spec.pipeline) is family
        assert spec.frame_step == family.frame_step
    assert {f.frame_step for f in FAMILIES.values()} == {8, 4}


def test_a_vae_finds_its_family_and_an_unknown_one_is_named(tiny_models):
    from diffusers import AutoencoderKL

    from decode.causal import causal_decoder
    from engine.loaders import load_pipeline

    for model, own_chunk in (("tiny-cogvideox", 2), ("tiny-wan", 1)):
        vae = load_pipeline(model, "t2v").vae
        family = family_of_vae(vae)
        assert family.name == get_model_spec(model).family and family.own_decode_chunk == own_chunk
        assert causal_decoder(vae).own_chunk == own_chunk
    with pytest.raises(TypeError, match="streaming decode supports .* not AutoencoderKL"):
        causal_decoder(AutoencoderKL(block_out_channels=(8,), norm_num_groups=2, latent_channels=4))


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-wan"])
def test_a_saved_folder_counts_the_same_parameters_as_the_registry_from_its_headers_alone(tiny_models, model):
    folder = tiny_models[model] / "t2v"
    spec, registered = get_model_spec(str(folder)), get_model_spec(model)
    assert spec.folder == str(folder.resolve()) and spec.family == registered.family
    assert set(spec.tasks) == {"t2v", "v2v"} and spec.default_dtype == "float32"
    for comp in ("transformer", "vae", "text_encoder"):
        assert spec.params[comp] == registered.params[comp], comp
    assert arch_for(spec).transformer == arch_for(registered).transformer
    assert arch_for(spec).note.startswith("sizes read from the local folder")
    i2v = get_model_spec(str(tiny_models[model] / "i2v"))
    assert set(i2v.tasks) == {"i2v"}


def _full_width_cogvideox(folder, tiny_models):
    """A CogVideoX folder whose transformer has CogVideoX-2b's width (30 heads x 64, ff 7680), one block."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from engine.loaders import load_pipeline

    base = load_pipeline("tiny-cogvideox", "t2v")
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=30, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    )
    pipe = CogVideoXPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                             transformer=transformer, scheduler=base.scheduler)
    pipe.save_pretrained(folder)
    return sum(p.numel() for p in transformer.parameters())


def test_generate_from_a_full_width_folder_plans_from_its_own_sizes(tmp_path, tiny_models):
    folder = tmp_path / "my-cogvideox"
    params = _full_width_cogvideox(folder, tiny_models)
    spec = get_model_spec(str(folder))
    arch = arch_for(spec)
    assert spec.params["transformer"] == params > 40_000_000
    assert (arch.transformer.dim, arch.transformer.ff_dim, arch.transformer.layers) == (1920, 7680, 1)
    counts, dtype = count_parameters(folder / "transformer", "transformer_blocks.")
    assert dtype == "float32" and counts["largest_leaf"] == 1920 * 7680 + 7680  # the FF projection
    out = tmp_path / "out.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a cat", "--frames", "9", "--steps", "2",
                 "--out", str(out)]) == 0
    assert read_video(out).shape == (9, 32, 32, 3)  # the folder's own size (sample 4 x 4 latent pixels)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    # The plan counted the folder's 4-byte weights, not a registry model's
    assert sidecar["plan"]["predicted_peak_host_bytes"] > 4 * params
    assert any("sizes read from the local folder" in r for r in sidecar["plan"]["reasons"])


def test_generate_from_a_wan_folder_and_the_list_of_folders(tmp_path, tiny_models):
    models = tmp_path / "models"
    shutil.copytree(tiny_models["tiny-wan"] / "t2v", models / "my-wan")
    shutil.copytree(tiny_models["tiny-wan"] / "t2v", models / "broken")
    shutil.rmtree(models / "broken" / "vae")
    (models / "not-a-model").mkdir()
    assert [s.id for s in find_model_folders(models)] == [str(models / "my-wan")]
    out = tmp_path / "wan.mp4"
    assert main(["generate", "--model", str(models / "my-wan"), "--prompt", "a cat", "--frames", "9",
                 "--height", "32", "--width", "32", "--steps", "2", "--out", str(out)]) == 0
    assert read_video(out).shape == (9, 32, 32, 3)
    with pytest.raises(ModelUnavailableError, match="incomplete; missing: vae/"):
        get_model_spec(str(models / "broken"))


def test_a_folder_of_another_pipeline_or_task_is_refused_by_name(tmp_path, tiny_models, capsys):
    other = tmp_path / "sd"
    shutil.copytree(tiny_models["tiny-wan"] / "t2v", other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(RequestError, match="holds a StableDiffusionPipeline pipeline; FitVideo serves CogVideoX and Wan"):
        get_model_spec(str(other))
    assert main(["generate", "--model", str(tiny_models["tiny-wan"] / "t2v"), "--task", "i2v", "--prompt", "a cat",
                 "--image", str(other / "model_index.json")]) == 2
    assert "has no i2v pipeline; it serves: t2v, v2v" in capsys.readouterr().err


def test_a_two_expert_folder_reads_both_experts_and_its_boundary(tiny_models):
    folder = tiny_models["tiny-wan-moe"] / "t2v"
    spec, registered = get_model_spec(str(folder)), get_model_spec("tiny-wan-moe")
    assert spec.experts == registered.experts == 2
    assert spec.boundary_ratio == registered.boundary_ratio == 0.875
    assert spec.params["transformer_2"] == registered.params["transformer_2"]
    assert arch_for(spec).experts == 2
