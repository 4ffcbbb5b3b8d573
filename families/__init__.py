"""Model families: one module each (families/cogvideox.py, families/wan.py) that every layer asks.

The bottom of the house: imports nothing of FitVideo's, loads nothing at import. Adding a family is one
module here (with its VAE's streaming decoder beside it in <name>_vae.py when its VAE is a new class) plus its
entries in configs/models.yaml.
"""
from __future__ import annotations

from families import cogvideox, wan
from families.base import (  # noqa: F401
    ModelArch,
    ModelFamily,
    TextEncoderArch,
    TransformerArch,
    VaeArch,
    VaeProfile,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (cogvideox.FAMILY, wan.FAMILY)}
# Every transformer component name any family's pipelines have, in running order ("transformer", then a second
# expert's): what quantization, the disk rung and the estimator treat as the denoiser, without naming a family.
DENOISERS: tuple[str, ...] = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.denoisers))


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"family={name!r} is not allowed; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(class_name: str) -> ModelFamily | None:
    """The family of a diffusers pipeline class name (model_index.json's `_class_name`), or None."""
    return next((f for f in FAMILIES.values() if f.serves(class_name)), None)


def family_of_vae(vae) -> ModelFamily:
    """The family whose VAE class `vae` is (or derives from)."""
    names = {cls.__name__ for cls in type(vae).__mro__}
    for family in FAMILIES.values():
        if family.vae_class in names:
            return family
    raise TypeError(f"{type(vae).__name__} is not a VAE of a known family ({', '.join(f.vae_class for f in FAMILIES.values())})")
