"""The tiny offline models on disk: each family's tiny twin (families/: `build_tiny`), written once with
`save_pretrained` into $FITVIDEO_HOME/tiny and loaded with `from_pretrained`, so the real loading path is what runs.

Layout on disk: <home>/tiny/v<TINY_VERSION>/<name>/<t2v|i2v>/ (a diffusers pipeline folder). T2V and V2V share the
t2v folder; the i2v folder holds the same VAE and text encoder weights (so sharing them across tasks is truthful)
and its own transformer.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from configs.paths import fitvideo_home  # noqa: F401  (re-exported: the one definition lives in configs/paths.py)
from families import FAMILIES
from families.cogvideox import TINY_I2V_SIZE as TINY_COG_I2V_SIZE  # noqa: F401
from families.cogvideox import TINY_TEXT_LEN as COGVIDEOX_TEXT_LEN  # noqa: F401
from families.tiny import TEXT_DIM, TINY_SEED, make_tokenizer  # noqa: F401
from families.wan import TINY_TEXT_LEN as WAN_TEXT_LEN  # noqa: F401

logger = logging.getLogger(__name__)

TINY_VERSION = 2
TINY_NAMES: tuple[str, ...] = tuple(name for f in FAMILIES.values() for name in f.tiny_twins)


def tiny_root() -> Path:
    return fitvideo_home() / "tiny" / f"v{TINY_VERSION}"


def build_tiny_pipelines(name: str) -> dict[str, object]:
    """Build the in-memory pipelines of a tiny model (no disk), keyed by folder ('t2v', 'i2v')."""
    family = next((f for f in FAMILIES.values() if name in f.tiny_twins), None)
    if family is None:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_NAMES)}")
    return family.build_tiny(name)


def ensure_tiny_model(name: str) -> Path:
    """Write the tiny model's folders once (atomically) and return <root>/<name>."""
    target = tiny_root() / name
    if (target / "t2v" / "model_index.json").is_file() and (target / "i2v" / "model_index.json").is_file():
        return target
    pipes = build_tiny_pipelines(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for folder, pipe in pipes.items():
            pipe.save_pretrained(staging / folder)
        try:
            os.rename(staging, target)  # atomic: a reader never sees a half-written model
            logger.info("wrote tiny model %s to %s", name, target)
        except OSError:
            if not (target / "t2v" / "model_index.json").is_file():  # lost a race to a twin: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
