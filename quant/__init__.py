"""Weight quantization (INT8 / FP8). Starting point: only 'none' until the Quantization issue lands."""
from __future__ import annotations

from configs.schema import QUANTS, RequestError


def apply(module, mode: str):
    if mode not in QUANTS:
        raise RequestError(f"quant={mode!r} is not allowed; choose one of {QUANTS}")
    if mode != "none":
        raise RequestError(f"quant={mode!r} is not available yet in this build")
    return module
