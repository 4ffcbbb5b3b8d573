"""Text for people: the plan, live memory, the leak sentinel, the cache, a result. Markdown, which reads as
plain text too (the CLI prints the same plan as the page). Bytes inside, human units only here."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from configs.schema import GenerationRequest, Plan
    from engine.results import PastResult
    from engine.runner import Runner, RunResult
    from vram_utils import DeviceInfo

UI_DETAILS = "details in the Optimization tab"  # where plan_line points the person by default


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _host_rung_text(plan: "Plan") -> str:
    """The host-RAM rung and what it does, e.g. "`one-expert` (text encoder first, 1 expert in RAM)"."""
    does = [("text encoder first" if plan.release_text_encoder else ""),
            (f"{plan.experts_in_ram} expert{'s' if plan.experts_in_ram > 1 else ''} in RAM" if plan.experts_in_ram else ""),
            ("weights from disk" if plan.disk_offload else "")]
    does = [d for d in does if d]
    return f"`{getattr(plan, 'host_rung', 'ram')}`" + (f" ({', '.join(does)})" if does else "")


def plan_markdown(req: "GenerationRequest", plan: "Plan") -> str:
    """The pre-flight plan: rungs (GPU and host RAM), precision, decode, both budgets, peaks per stage, and why."""
    on_gpu = plan.device.startswith("cuda")
    d = plan.decode
    tiling = "off"
    if d.enable_vae_tiling:
        tiling = f"on ({d.tile_x}x{d.tile_y} px tiles, stride {d.tile_stride_x}x{d.tile_stride_y})"
    verdict = "fits" if plan.fits else "**does not fit**"
    host_budget = plan.host_budget_bytes or (plan.budget_bytes if not on_gpu else 0)
    gpu = (f"GPU {fmt_bytes(plan.predicted_peak_gpu_bytes)} of {fmt_bytes(plan.budget_bytes)}" if on_gpu
           else "GPU - (no GPU used)")
    lines = [
        f"**{req.task.upper()} · {req.model}** · {req.frames} frames · {req.height}x{req.width} · "
        f"{req.steps} steps · runs on `{plan.device}`",
        "",
        f"**Rung:** offload `{plan.offload}` · host RAM {_host_rung_text(plan)} · precision `{plan.quant}` · "
        f"VAE tiling {tiling}",
        "",
        f"**Predicted peak:** {gpu} · RAM {fmt_bytes(plan.predicted_peak_host_bytes)} of {fmt_bytes(host_budget)} · "
        f"{verdict} (budgets: free memory after the safety margins)",
        "",
        f"**Host RAM:** budget from the {plan.host_limit or 'machine'} · anonymous "
        f"{fmt_bytes(plan.predicted_anon_host_bytes)} + memory-mapped weights {fmt_bytes(plan.predicted_mapped_host_bytes)}"
        f" (file pages the kernel can drop and read again) · must stay resident {fmt_bytes(plan.host_need_bytes)}",
    ]
    if plan.stages:
        lines += ["", "| stage | predicted peak GPU | predicted peak RAM |", "|---|---|---|"]
        for stage, peak in plan.stages.items():
            # GPU backend: `stages` are GPU peaks and `host_stages` RAM peaks; CPU: `stages` are RAM peaks.
            host = plan.host_stages.get(stage, plan.predicted_peak_host_bytes) if on_gpu else peak
            name = f"**{stage}** (peak)" if stage == plan.peak_stage else stage
            lines.append(f"| {name} | {fmt_bytes(peak) if on_gpu else '-'} | {fmt_bytes(host)} |")
    if plan.reasons:
        lines += ["", "**Why:**"] + [f"- {reason}" for reason in plan.reasons]
    return "\n".join(lines)


def plan_line(plan: "Plan", details: str = UI_DETAILS) -> str:
    """The plan in one line, with what would fit when it does not; `details` says where the full plan is."""
    hints = [f"{plan.suggested_frames} frames" if plan.suggested_frames else "", plan.suggested_model or ""]
    hints = [h for h in hints if h]
    warn = "" if plan.fits else " · **does not fit**" + (f": try {' or '.join(hints)}" if hints else "")
    return f"**Plan:** {plan.summary}{warn} ({details})"


def memory_markdown(info: "DeviceInfo") -> str:
    """The live memory table from a `vram_utils.probe()` DeviceInfo."""
    lines = [f"**{info.summary()}**", "", "| memory | used | free | total |", "|---|---|---|---|"]
    for gpu in info.gpus:
        lines.append(
            f"| GPU {gpu.index}: {gpu.name} | {fmt_bytes(gpu.used_bytes)} | {fmt_bytes(gpu.free_bytes)} | "
            f"{fmt_bytes(gpu.total_bytes)} |"
        )
    if not info.cuda:
        lines.append("| GPU | no CUDA GPU | | |")
    host_used, host_free = info.host_total_bytes - info.host_available_bytes, info.host_available_bytes
    label = "host RAM" if info.host_limit_kind == "machine" else f"host RAM: {info.host_limit_text}"
    lines.append(f"| {label} | {fmt_bytes(host_used)} | {fmt_bytes(host_free)} | {fmt_bytes(info.host_total_bytes)} |")
    lines.append(f"| this process (RSS) | {fmt_bytes(info.process_rss_bytes)} | | |")
    return "\n".join(lines)


def measured_text(measured: dict) -> str:
    """Measured peaks from the sidecar; '+N' is what this run added above the app's baseline (the planner's figure)."""
    parts = []
    for kind, label in (("gpu", "GPU"), ("host", "RAM")):
        peak, base = measured.get(f"peak_{kind}_bytes"), measured.get(f"baseline_{kind}_bytes")
        if peak:
            parts.append(f"peak {label} {fmt_bytes(peak)}" + (f" (+{fmt_bytes(peak - base)} this run)" if base else ""))
    return " · ".join(parts)


def leak_markdown(runner: "Runner", last: int = 8) -> str:
    """The leak sentinel's last reports, newest first: what each run left behind after its cleanup."""
    reports = list(runner.sentinel.history)[-last:][::-1]
    if not reports:
        return "No run yet: after each run, memory is compared with its baseline here."
    lines = ["| run | measured | after − before | verdict | largest live tensors |", "|---|---|---|---|---|"]
    for r in reports:
        verdict = "**LEAK**" if r.leaked else "ok" if r.judged else "warm-up (a model loaded; not judged)"
        metric = "GPU allocated" if r.metric == "gpu_allocated" else "process RSS"
        holders = "; ".join(r.holders) if r.leaked else ""
        lines.append(f"| {r.label} | {metric} | {r.delta_bytes / 2**20:+.1f} MiB | {verdict} | {holders} |")
    threshold = reports[0].threshold_bytes / 2**20
    lines.append(f"\nA run leaks when it leaves more than {threshold:.0f} MiB above its baseline (weights the cache holds excluded).")
    return "\n".join(lines)


def cache_markdown(runner: "Runner") -> str:
    cache = runner.cache
    rows = cache.info()
    head = f"**{len(rows)} of {cache.max_size} loaded** · {fmt_bytes(cache.total_bytes())} (shared parts counted once)"
    if not rows:
        return head + "\n\nNothing loaded: models load when Generate is pressed."
    lines = [head, "", "| model | task | precision | bytes | shared with others |", "|---|---|---|---|---|"]
    for r in rows:
        shared = ", ".join(r["shared"]) or "-"
        lines.append(f"| {r['model']} | {r['task']} | {r['quant']} | {fmt_bytes(r['bytes'])} | {shared} |")
    return "\n".join(lines)


def result_markdown(result: "RunResult", outputs_dir: Path, extra_warnings: tuple[str, ...] = ()) -> str:
    """A finished run: where it was saved, the seed, sizes, time, measured peaks, the plan and any warnings."""
    req, t = result.request, result.timings
    where = result.video_path
    try:
        where = result.video_path.relative_to(outputs_dir.parent)
    except ValueError:
        pass
    timing = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items() if k != "total_s")
    peak = measured_text(result.measured)
    lines = [
        f"**Saved** `{where}` (+ `{result.sidecar_path.name}`)",
        "",
        f"seed **{req.seed}** · {result.frames} frames · {req.height}x{req.width} @ {req.fps} fps · "
        f"{t.get('total_s', 0):.1f} s ({timing})" + (f" · {peak}" if peak else ""),
        "",
        f"plan: {result.plan.summary}",
    ]
    lines += [f"- out of memory while {s['stage']}: retried with {s['change']}" for s in result.step_downs]
    lines += [f"- warning: {w}" for w in (*extra_warnings, *_not_said(result.warnings, extra_warnings))]
    return "\n".join(lines)


def _not_said(warnings: list[str], said: tuple[str, ...]) -> list[str]:
    """The run's warnings that the caller's notes do not already give. An input note says the same as the
    runner's about the same file, which the caller names as uploaded and the runner as kept
    (outputs/inputs/<hash>): compare what follows the quoted file name."""
    def gist(w: str) -> str:
        return w.split("' ", 1)[-1]

    told = {gist(w) for w in said}
    return [w for w in warnings if gist(w) not in told]


def lora_text(loras: list[dict]) -> str:
    """`name x0.8` per LoRA (`x1/0.5`: high-noise / low-noise expert), from a sidecar's `loras`."""
    def strengths(r: dict) -> str:
        s = f"{r.get('strength', 1):g}"
        return s + (f"/{r['strength_2']:g}" if r.get("strength_2") is not None else "")

    return ", ".join(f"{r.get('name', '?')} x{strengths(r)}" for r in loras)


def result_details(result: "PastResult") -> str:
    """A past result from its sidecar: the request, the plan, predicted and measured peaks, timings."""
    req, d = result.request, result.data
    predicted = d.get("predicted") or {}
    lines = [
        f"**{result.name}** · {req.task.upper()} · `{req.model}` · created {d.get('created', '?')}",
        "",
        f"> {req.prompt}",
        "",
        f"seed {req.seed} · {d.get('frames', req.frames)} frames · {req.height}x{req.width} @ "
        f"{req.fps} fps · {req.steps} steps · guidance {req.guidance} · preset {req.preset}",
        "",
        f"plan: {(d.get('plan') or {}).get('summary', '')}",
        "",
        *([f"LoRAs: {lora_text(d['loras'])}", ""] if d.get("loras") else []),
        f"predicted peak: GPU {fmt_bytes(predicted.get('peak_gpu_bytes'))} · "
        f"RAM {fmt_bytes(predicted.get('peak_host_bytes'))}",
        "",
        f"measured: {measured_text(d.get('measured') or {}) or '-'}",
        "",
        "timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in (d.get("timings") or {}).items()),
    ]
    return "\n".join(lines)
