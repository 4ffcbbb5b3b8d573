"""One video over several devices: diffusers' context parallel (`ContextParallelConfig`, Ulysses) for the denoise.

A request with `context_parallel=N` (CLI `--context-parallel N`, the server's default from its launch flag) runs its
denoise in N processes that split each step's token sequence: this process is rank 0 and runs the whole run as
usual (plan, modifiers, progress, stop, save, decode); N - 1 helper processes (`Group`, started by the first such
run and kept for the next) load the same pipeline, apply the same modifiers and call the same pipeline with the same
arguments, in lockstep. Attention swaps sequence shards for head shards (all-to-all), so N must divide the
transformer's heads (Wan 2.1: 12 / 40, Wan 2.2 5B: 24). NCCL and one GPU per rank on CUDA (rank r on cuda:r); gloo
on the CPU, where diffusers' `_resolve_parallel_config` divides by `torch.accelerator.device_count()` (0 without
an accelerator): it reads 1 while the parallelism is applied.

The video equals a one-process run's (tests/test_parallel.py: bitwise, tiny Wan T2V and I2V). At the end of each
step every rank learns whether rank 0 goes on (`Group.agree`): a Stop, or any failure on rank 0, ends the
helpers' call at the same step instead of leaving them in a collective. Step caches decide per rank on their own
shard, so a run with one is refused (an explicit step cache) or runs without it (the preset's, with a note).
CogVideoX declares no context-parallel plan (`_cp_plan`): refused with that reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch

logger = logging.getLogger(__name__)

MAX_DEGREE = 16
TIMEOUT = timedelta(minutes=10)  # a collective waiting this long ends with an error instead of hanging


def problem(spec, task: str, degree: int) -> str:
    """Why `degree` processes cannot share a denoise of this model ('' when they can)."""
    if degree == 1:
        return ""
    family = spec.family_module
    if not family.context_parallel:
        with_plan = ", ".join(f.name for f in _families() if f.context_parallel)
        return (f"{spec.label}'s transformer declares no context-parallel plan (diffusers' `_cp_plan`); "
                f"families with one: {with_plan}")
    heads = family.attention_heads(spec.config.get("transformer", {}))
    if heads % degree:
        divisors = [d for d in range(2, min(heads, MAX_DEGREE) + 1) if heads % d == 0]
        return (f"{spec.label} has {heads} attention heads, which {degree} processes cannot share (Ulysses gives each "
                f"a whole number of heads); use {' or '.join(map(str, divisors)) or '1'}")
    return ""


def _families():
    from families import FAMILIES

    return FAMILIES.values()


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers computes `rank % torch.accelerator.device_count()`: 0 on a CPU-only machine. 1 while it does."""
    if torch.accelerator.is_available():
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


@dataclass(eq=False)
class ContextParallel:
    """Modifier: each loaded denoiser split over the group's ranks (`enable_parallelism`); `remove` takes diffusers'
    hooks off by their names (`remove_context_parallel`) and forgets the config on the model and its processors."""

    degree: int
    device: str = "cpu"  # rank 0's device: the helpers start on it (engine/parallel.py `group_for`)
    name: str = "context_parallel"
    _on: list[torch.nn.Module] = field(default_factory=list)

    def added_bytes(self) -> int:
        return 0

    def apply(self, pipe) -> None:
        from diffusers import ContextParallelConfig

        from engine.stepcache import denoisers_of

        if not _IN_HELPER:  # rank 0: the helpers and the process group first (started once, kept)
            group_for(self.degree, self.device)
        for _, module in denoisers_of(pipe):
            if any(m is module for m in self._on):
                continue
            with _cpu_device_count():
                module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=self.degree))
            self._on.append(module)

    def remove(self, pipe) -> None:
        from diffusers.hooks.context_parallel import remove_context_parallel

        for module in self._on:
            remove_context_parallel(module, module._cp_plan)
            for sub in module.modules():
                processor = getattr(sub, "processor", None)
                if getattr(processor, "_parallel_config", None) is not None:
                    processor._parallel_config = None
            module._parallel_config = None
        self._on = []


# =========================================================================== the helper ranks


@dataclass
class Work:
    """What a helper needs to make the same call as rank 0: the run, its plan, the pipeline's arguments (no
    generator, no callback: each rank makes its own from `seed`), the scheduler shift."""

    run: object  # engine.resolve.ResolvedRun
    plan: object  # configs.schema.Plan (rank 0's; a helper moves it to its own device)
    kwargs: dict
    seed: int
    shift: float | None


class Group:
    """N - 1 helper processes and the process group that joins them to this one (rank 0)."""

    def __init__(self, degree: int, device: str = "cpu"):
        import torch.multiprocessing as mp

        self.degree, self.device = degree, device
        self.aborted = False  # rank 0 told the helpers it stops (at a step's end) in the current call
        self.backend = "nccl" if device.startswith("cuda") else "gloo"
        ctx = mp.get_context("spawn")
        self.jobs = [ctx.Queue() for _ in range(degree - 1)]
        self.results = ctx.Queue()
        address = f"tcp://127.0.0.1:{_free_port()}"
        self.processes = [ctx.Process(target=helper_main, args=(r, degree, address, self.jobs[r - 1], self.results,
                                                                    torch.get_num_threads()),
                                      daemon=True, name=f"fitvideo-cp-rank{r}") for r in range(1, degree)]
        for p in self.processes:
            p.start()
        torch.distributed.init_process_group(self.backend, init_method=address, rank=0, world_size=degree,
                                             timeout=TIMEOUT)
        logger.info("context parallel: %d processes over %s", degree, self.backend)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def submit(self, work: Work) -> None:
        for q in self.jobs:
            q.put(work)

    def agree(self, abort: bool) -> bool:
        """Every rank calls this at the end of each step: True (on every rank) when rank 0 does not go on."""
        flag = torch.tensor([1 if abort else 0], device=self._tensor_device())
        torch.distributed.broadcast(flag, src=0)
        self.aborted = self.aborted or abort
        return bool(flag.item())

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for every helper's call to end; a helper's failure is raised here with its words."""
        errors = []
        for _ in self.processes:
            state, rank, message = self.results.get(timeout=TIMEOUT.total_seconds())
            if state == "failed":
                errors.append(f"rank {rank}: {message}")
        if errors and raise_errors:
            raise RuntimeError("context parallel: " + "; ".join(errors))

    def close(self, kill: bool = False) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.processes:
            if kill:
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _tensor_device(self) -> str:
        return f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"


@contextlib.contextmanager
def denoise_together(run, kwargs: dict):
    """Around rank 0's pipeline call of `run` (engine/run.py Run): the helpers make the same call (yields the
    Group, which the step callback asks `agree`; None for a one-process run). A failure on rank 0 that the helpers
    learned of at a step's end waits for them; one before the first step's end (they are inside a collective)
    ends them, and the next run starts new ones."""
    req = run.request
    if req.context_parallel == 1:
        yield None
        return
    group = group_for(req.context_parallel, str(run.plan.device))
    group.aborted = False
    sent = {k: v for k, v in kwargs.items() if k not in ("generator", "callback_on_step_end")}
    group.submit(Work(run.resolved, run.plan, sent, req.seed, req.shift))
    try:
        yield group
    except BaseException:
        if group.aborted:
            group.finish(raise_errors=False)
        else:
            close_group(kill=True)
        raise
    group.finish()


_IN_HELPER = False  # set in a helper process: its group is the one it joined
_GROUP: Group | None = None  # one default process group per process: the group of the last degree asked for


def group_for(degree: int, device: str) -> Group:
    """The helpers for `degree` processes on `device` (started on first use; a different degree restarts them)."""
    global _GROUP
    if _GROUP is not None and (_GROUP.degree, _GROUP.device) == (degree, device) and _GROUP.alive():
        return _GROUP
    close_group()
    _GROUP = Group(degree, device)
    return _GROUP


def close_group(kill: bool = False) -> None:
    """End the helpers (`kill`: at once, when they may be inside a collective) and the process group."""
    global _GROUP
    if _GROUP is not None:
        _GROUP.close(kill)
        _GROUP = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =========================================================================== inside a helper


def helper_main(rank: int, degree: int, address: str, jobs, results, threads: int) -> None:
    """A helper rank: join the group, then make rank 0's calls until told to stop (None). `threads`: rank 0's
    torch thread count."""
    from engine.cache import PipelineCache

    global _IN_HELPER
    _IN_HELPER = True
    torch.set_num_threads(threads)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        backend = "nccl"
    torch.distributed.init_process_group(backend, init_method=address, rank=rank, world_size=degree, timeout=TIMEOUT)
    cache = PipelineCache(max_size=1)
    while (work := jobs.get()) is not None:
        try:
            _follow(rank, cache, work)
            results.put(("done", rank, ""))
        except _Stopped:
            results.put(("stopped", rank, ""))
        except Exception as exc:  # noqa: BLE001  (rank 0 raises it with its words)
            logger.exception("context parallel rank %d failed", rank)
            results.put(("failed", rank, f"{type(exc).__name__}: {exc}"))
    torch.distributed.destroy_process_group()


class _Stopped(Exception):
    """Rank 0 did not go on after a step (Stop pressed, or it failed)."""


def _follow(rank: int, cache, work: Work) -> None:
    """The same pipeline call as rank 0's, with the same modifiers, on this rank's device."""
    from engine import modifiers
    from engine.lora import scheduler_shift

    req = work.run.request
    device = f"cuda:{rank}" if torch.distributed.get_backend() == "nccl" else "cpu"
    plan = dataclasses.replace(work.plan, device=device)
    pipe = cache.get(req.model, req.task, req.quant)
    mods = modifiers.for_run(work.run, plan)  # its ContextParallel included

    def after_step(pipe, i, t, callback_kwargs):
        flag = torch.zeros(1, dtype=torch.int64, device=device)
        torch.distributed.broadcast(flag, src=0)
        if flag.item():
            raise _Stopped()
        return callback_kwargs

    modifiers.apply_all(pipe, mods)
    try:
        kwargs = dict(work.kwargs, generator=torch.Generator("cpu").manual_seed(work.seed),
                      callback_on_step_end=after_step)
        with torch.inference_mode(), scheduler_shift(pipe, work.shift):
            pipe(**kwargs)
    finally:
        modifiers.remove_all(pipe, mods)
