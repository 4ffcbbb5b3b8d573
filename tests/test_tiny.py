"""The tiny offline family: built in code, written with save_pretrained, loaded with from_pretrained."""
from __future__ import annotations

import json

import torch

from engine.loaders import load_pipeline
from engine.tiny import build_tiny_pipelines


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].to(sb[key].dtype), sb[key]), key  # a float64 buffer loads as float32


def test_same_seed_builds_the_same_weights():
    first, second = build_tiny_pipelines("tiny-wan"), build_tiny_pipelines("tiny-wan")
    for folder in ("t2v", "i2v"):
        for comp in ("transformer", "vae", "text_encoder"):
            _assert_same_weights(getattr(first[folder], comp), getattr(second[folder], comp))


def test_tiny_models_round_trip_through_save_and_from_pretrained(tiny_models):
    for name, folder in tiny_models.items():
        built = build_tiny_pipelines(name)
        for sub, pipe in built.items():
            index = json.loads((folder / sub / "model_index.json").read_text())
            assert index["_class_name"] == type(pipe).__name__
            task = "i2v" if sub == "i2v" else "t2v"
            loaded = load_pipeline(name, task)
            assert type(loaded).__name__ == type(pipe).__name__
            for comp in ("transformer", "vae", "text_encoder"):
                _assert_same_weights(getattr(pipe, comp), getattr(loaded, comp))
            assert loaded.tokenizer("a cat walks").input_ids == pipe.tokenizer("a cat walks").input_ids
            assert type(loaded.scheduler).__name__ == type(pipe.scheduler).__name__


def test_i2v_folder_holds_the_same_vae_and_text_encoder_as_t2v(tiny_models):
    for name in tiny_models:
        t2v, i2v = load_pipeline(name, "t2v"), load_pipeline(name, "i2v")
        _assert_same_weights(t2v.vae, i2v.vae)
        _assert_same_weights(t2v.text_encoder, i2v.text_encoder)
        assert t2v.transformer.config.in_channels != i2v.transformer.config.in_channels


def test_tokenizer_is_built_without_files_and_knows_prompt_words():
    from engine.tiny import make_tokenizer

    tok = make_tokenizer(16)
    ids = tok("a cat walks on the beach").input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
    assert len(tok("x " * 100, truncation=True, max_length=16).input_ids) == 16
