"""Importing spandrel where torchvision's compiled operators do not load.

spandrel imports torchvision at import time, only for two pure-Python helpers of architectures we do not use
(LaMa's `rotate`, RestoreFormer's `normalize`). Where the installed torchvision was built for another torch
build (this house's CPU machines: torch 2.13.0+cpu from the local wheel, torchvision 0.28.0 from the index,
linked against libtorch_cuda), `import torchvision` raises "operator torchvision::nms does not exist" and
spandrel cannot be imported at all. Then, and only then, stand-ins for those two helpers are registered
(they raise, naming the problem, if a LaMa / RestoreFormer model is ever run), and it is logged at WARNING.
The same when torchvision is not installed at all (a venv synced without it).
ESRGAN-family models (Real-ESRGAN) use no torchvision code. The stand-ins live in sys.modules only while
spandrel imports, so diffusers / transformers, which probe for torchvision, never see them.
"""
from __future__ import annotations

import logging
import sys
import types

logger = logging.getLogger(__name__)


def import_spandrel():
    """The spandrel module, with stand-ins for torchvision's two helpers when torchvision is absent or does not
    load with this torch (an ImportError from spandrel itself names the package to install)."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:  # absent, or compiled ops built for another torch
        stand_ins = _register_stand_ins(exc)
        try:
            import spandrel
        finally:
            # spandrel's modules keep the two names they imported; nobody else may see the stand-ins
            # (diffusers and transformers probe torchvision with importlib.util.find_spec).
            for name in stand_ins:
                sys.modules.pop(name, None)
        return spandrel
    import spandrel

    return spandrel


def _register_stand_ins(exc: BaseException) -> list[str]:
    import enum

    logger.warning("torchvision does not load with this torch (%s); spandrel's LaMa / RestoreFormer are "
                   "unavailable, ESRGAN-family upscalers are not affected", str(exc).splitlines()[0][:120])
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    def unavailable(*_args, **_kwargs):
        raise RuntimeError(f"torchvision is not usable with this torch build ({exc}); install the torchvision "
                           "built for your torch to run LaMa / RestoreFormer models")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = enum.Enum("InterpolationMode", {"NEAREST": "nearest", "BILINEAR": "bilinear"})
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    root.__path__ = []  # a package, so that submodule imports look here
    modules = {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    sys.modules.update(modules)
    return list(modules)
