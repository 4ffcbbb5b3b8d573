"""load_pipeline / load_shared_pipeline (seed 003 API) and clear errors when weights are absent."""
from __future__ import annotations

import shutil
import time

import pytest

from configs.schema import RequestError
from pipeline_utils import ModelUnavailableError, load_pipeline, load_shared_pipeline
from engine.loaders import missing_files


def test_load_pipeline_by_tiny_name_and_by_local_folder(tiny_models):
    by_name = load_pipeline("tiny-cogvideox", "t2v")
    by_folder = load_pipeline(str(tiny_models["tiny-cogvideox"] / "t2v"), "v2v")
    assert type(by_name).__name__ == "CogVideoXPipeline"
    assert type(by_folder).__name__ == "CogVideoXVideoToVideoPipeline"


def test_load_shared_pipeline_reuses_the_given_objects(tiny_models):
    t2v = load_pipeline("tiny-wan", "t2v")
    v2v = load_shared_pipeline(
        "tiny-wan", "v2v", shared_components={"transformer": t2v.transformer, "vae": t2v.vae,
                                              "text_encoder": t2v.text_encoder, "tokenizer": t2v.tokenizer},
    )
    assert type(v2v).__name__ == "WanVideoToVideoPipeline"
    assert v2v.transformer is t2v.transformer and v2v.vae is t2v.vae and v2v.text_encoder is t2v.text_encoder
    assert v2v.scheduler is not t2v.scheduler  # schedulers hold per-run state


def test_hub_model_without_local_copy_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline("THUDM/CogVideoX-5b", "t2v")
    assert time.monotonic() - start < 10  # no hang waiting for a network
    message = str(info.value)
    assert "hf download THUDM/CogVideoX-5b" in message
    assert "about 22 GB" in message and "not on this machine" in message


def test_incomplete_model_folder_lists_the_missing_files(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["tiny-wan"] / "t2v", broken)
    shutil.rmtree(broken / "vae")
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    assert sorted(missing_files(broken)) == ["transformer/ (weights: *.safetensors)", "vae/"]
    with pytest.raises(ModelUnavailableError, match=r"incomplete; missing: .*vae/"):
        load_pipeline(str(broken), "t2v")


def test_unknown_model_and_missing_task_are_request_errors():
    with pytest.raises(RequestError, match="unknown model 'no/such'"):
        load_pipeline("no/such", "t2v")
    with pytest.raises(RequestError, match="has no t2v pipeline"):
        load_pipeline("THUDM/CogVideoX-5b-I2V", "t2v")
