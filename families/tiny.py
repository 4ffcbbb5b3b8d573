"""What every tiny twin shares: a T5 / UMT5 text encoder config and a tokenizer made in memory.

A family's tiny twin (`ModelFamily.build_tiny`) is a random-weight miniature built in code with the same diffusers /
transformers classes as the real models (recipes after diffusers' own pipeline tests, with a T5 / UMT5 encoder and
a tokenizer made in memory instead of the hub's tiny T5). engine/tiny.py writes it once with `save_pretrained` and
loads it with `from_pretrained`, so the real loading path is what runs. The same seed builds the same weights.
"""
from __future__ import annotations

import string

TINY_SEED = 0
TEXT_DIM = 32  # the tiny text encoders' width, which the tiny transformers read

_WORDS = (
    "a an the of and with in on at to from by over under near "
    "cat dog bird fish horse person man woman child car boat train city street forest beach "
    "sea ocean river mountain sky cloud sun moon sunset sunrise night rain snow fire light "
    "red blue green yellow white black golden bright dark slow fast small big old new "
    "walks runs flies swims jumps dances sits moves turns rolls falls plays looks camera "
    "video scene shot view close wide aerial cinematic realistic"
).split()


def make_tokenizer(max_length: int):
    """A Unigram T5 tokenizer built in memory (no files, no hub)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    vocab += [("▁" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def t5_config(config_cls, vocab_size: int):
    """A 2-layer encoder config of width TEXT_DIM (`T5Config` or `UMT5Config`)."""
    return config_cls(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
