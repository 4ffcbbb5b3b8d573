"""The Jobs panel's text: the running and waiting jobs and the last few finished ones, one short row each.

Kept short on purpose: the panel sits above the tabs, so 20 finished jobs must not push the Generate button off the
screen; the rest are in the Gallery. Cells are short words (no file names: a long unbroken word would squeeze the
other columns until their headers break mid-word).
"""
from __future__ import annotations

SHOWN_FINISHED = 3  # finished jobs listed; older ones: a count, and the Gallery
PROMPT_CHARS = 28


def _prompt(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1].rstrip() + "…"


def _eta(view: dict, state: str) -> str:
    """A running job's time left: the denoise's (the decode follows it), then the decode's own."""
    if state != "running" or view["eta_s"] is None:
        return ""
    eta = f"{view['eta_s']:.0f} s"
    return f"{eta} + decode" if view["stage"] == "denoising" else eta


def _row(job) -> str:
    v = job.view()
    progress = ""
    if job.state == "running":
        progress = f"{v['stage']} {v['step']}/{v['total']}" if v["total"] else v["stage"]
    state = job.state + (f" ({job.resumed.split(' (')[0]})" if job.resumed else "")
    if job.error:
        state += f": {job.error[:60]}…" if len(job.error) > 60 else f": {job.error}"
    what = f"{job.task.upper()} · {v['model'].split('/')[-1][:20]}"
    return (f"| `{job.id[:6]}` | {what} | {_prompt(v['prompt'])} | {v['seed']} | {state} | {progress} | "
            f"{_eta(v, job.state)} |")


def jobs_markdown(jobs: list, memory: str = "") -> str:
    """Running, waiting, then the last SHOWN_FINISHED finished jobs; `memory`: the running job's memory line."""
    if not jobs:
        return "No jobs yet: Generate in any tab queues one here."
    live = [j for j in jobs if j.state in ("running", "waiting")]
    ended = [j for j in jobs if j.state not in ("running", "waiting")]
    lines = [memory, ""] if memory else []
    lines += ["| job | what | prompt | seed | state | progress | ETA |", "|---|---|---|---|---|---|---|"]
    lines += [_row(j) for j in (*live, *ended[:SHOWN_FINISHED])]
    if len(ended) > SHOWN_FINISHED:
        lines += ["", f"{len(ended) - SHOWN_FINISHED} more finished job{'s' if len(ended) - SHOWN_FINISHED > 1 else ''}: "
                      "their videos are in the Gallery."]
    return "\n".join(lines)


def running_memory_line(rss_bytes: int, limit_text: str, budget_bytes: int = 0) -> str:
    """"Running job: this process 1.4 GiB · host budget 2.0 GiB (container limit, cgroup v1 /x)"."""
    gib = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"  # noqa: E731
    plan = f" · its plan: {gib(budget_bytes)} of host RAM" if budget_bytes else ""
    return f"**Running job:** this process {gib(rss_bytes)} of RAM · host {limit_text}{plan}"
