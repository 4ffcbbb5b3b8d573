"""Device probe, memory planner and offload application.

Starting point from the "Runnable base" issue: the real planner, probe and
offload ladder land with the "Memory engine" issue. Nothing here touches a GPU
at import time.
"""
from __future__ import annotations

import logging

import torch

from configs.schema import GenerationRequest, ModelSpec, Plan

logger = logging.getLogger(__name__)


def tensor_bytes(t: torch.Tensor) -> int:
    """Real storage bytes of a tensor (quantized tensor subclasses report their own)."""
    return t.numel() * t.element_size()


def plan(request: GenerationRequest, spec: ModelSpec, device=None) -> Plan:
    offload = "none" if request.offload == "auto" else request.offload
    return Plan(
        offload=offload,
        quant=request.quant,
        decode=request.decode,
        reasons=(f"offload {offload}: as requested" if request.offload != "auto" else "offload none: default",),
        summary=f"offload {offload}, tiling {'on' if request.decode.enable_vae_tiling else 'off'}",
    )


def execution_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def apply_plan(pipe, plan: Plan) -> None:
    """Put the pipeline where the plan says (only 'none' in this starting point)."""
    if plan.offload != "none":
        raise NotImplementedError(f"offload {plan.offload!r} lands with the memory engine")
    pipe.to(execution_device())
