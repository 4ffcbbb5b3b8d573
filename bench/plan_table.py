"""The planner on synthetic machines: models x GPU x RAM -> offload rung, host rung, predicted peaks, fits.

    python bench/plan_table.py            # the markdown table (README, issue 12)
    python bench/plan_table.py --no-disk  # the same with no free disk: the disk rung is not offered

Pure arithmetic (vram_utils.plan_for on synthetic DeviceInfo), no GPU and no model load; a second. The default
T2V request of each model (its default frames and resolution, the balanced preset). A machine of R GiB of RAM
has R - 2 GiB available (the OS and other programs) and the app's 1 GiB RSS; its GPU is empty; the disk under
$FITVIDEO_HOME has 500 GiB free unless --no-disk.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import GenerationRequest, Plan
from configs.registry import get_model_spec  # noqa: E402
from vram_utils import plan_for  # noqa: E402
from vram_utils.probe import GIB, DeviceInfo, GpuInfo  # noqa: E402

MODELS = (
    "THUDM/CogVideoX-5b",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
)
GPUS_GB = (None, 8, 12, 24)  # None: no CUDA GPU
RAMS_GB = (16, 32, 64)
OS_USED_GB = 2  # RAM the OS and other programs hold on the synthetic machines
DISK_FREE_GB = 500


@dataclass(frozen=True)
class Row:
    model: str
    gpu_gb: int | None
    ram_gb: int
    plan: Plan


def machine(gpu_gb: int | None, ram_gb: int) -> DeviceInfo:
    """A synthetic machine: one empty GPU of `gpu_gb` GiB (None: no GPU) and `ram_gb` GiB of RAM."""
    ram, avail = ram_gb * GIB, (ram_gb - OS_USED_GB) * GIB
    if gpu_gb is None:
        return DeviceInfo(False, (), ram, avail, GIB)
    total = gpu_gb * GIB
    return DeviceInfo(True, (GpuInfo(0, f"Synthetic {gpu_gb}GB", total, 0, total, 0, 0),), ram, avail, GIB)


def rows(disk_free: int | None = DISK_FREE_GB * GIB) -> list[Row]:
    out = []
    for model in MODELS:
        spec = get_model_spec(model)
        req = GenerationRequest(model=model, task="t2v", prompt="a cat on a beach")
        for gpu_gb in GPUS_GB:
            for ram_gb in RAMS_GB:
                out.append(Row(model, gpu_gb, ram_gb, plan_for(req, spec, machine(gpu_gb, ram_gb), disk_free=disk_free)))
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def markdown(table: list[Row]) -> str:
    lines = [
        "| model | GPU | RAM | offload | host rung | GPU peak / budget GiB | RAM need / budget GiB | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        p = r.plan
        gpu = "none" if r.gpu_gb is None else f"{r.gpu_gb} GB"
        gpu_peak = "-" if r.gpu_gb is None else f"{_gib(p.predicted_peak_gpu_bytes)} / {_gib(p.budget_bytes)}"
        host = p.host_rung + (" (fp8)" if p.quant == "fp8-storage" else "")
        fits = "yes" if p.fits else ("**refused**" if p.refused else "no")
        mapped = f" (+{_gib(p.predicted_mapped_host_bytes)} mapped, read in place)" if p.host_rung == "in-place" else ""
        lines.append(f"| {get_model_spec(r.model).label} | {gpu} | {r.ram_gb} GB | {p.offload} | {host} | {gpu_peak} | "
                     f"{_gib(p.host_need_bytes)}{mapped} / {_gib(p.host_budget_bytes)} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-disk", action="store_true", help="no free disk: the disk rung is not offered")
    args = ap.parse_args(argv)
    print(markdown(rows(0 if args.no_disk else DISK_FREE_GB * GIB)))


if __name__ == "__main__":
    main()
