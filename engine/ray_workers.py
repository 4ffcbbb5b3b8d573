"""Many GPUs, many machines: the job queue's workers as Ray actors (`./run.sh --ray local`, `--ray auto`,
`--ray ADDRESS`), one per GPU (`--ray-workers N` where there is none: CPU machines, tests).

The queue on disk stays the record (engine/jobs.py): the app keeps it and one dispatching thread per worker; each
worker is a Ray actor that owns one GPU (Ray's `num_gpus=1`: CUDA_VISIBLE_DEVICES is its GPU), its own pipeline
cache, runner and device probe, and writes into the same outputs folder (on a cluster: a folder every node mounts
at the same path, and the FitVideo checkout at the same path). A job goes to the worker that already holds its
model when one is free (`JobQueue._pick`); its progress, preview and Stop pass through the actor while it runs.

A worker that dies mid-job (its process killed, its machine gone): Ray restarts the actor, and the job waits again
(`WorkerLost`), then runs on whichever worker is free: from its saved latents when its denoise had finished (the
decode only), from the start otherwise; never twice, since it runs again only once its worker is known dead, and
never lost, since its queue file stays until its result is written. The sidecar records the worker (name, node,
device, pid). Without --ray none of this is imported: one in-process worker, no Ray.

Ray is an optional dependency (`pip install "ray==2.60.0"`; `./run.sh test` installs it for the tests).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.25  # a running job's progress and Stop are passed this often
RESTARTS = 3  # times Ray restarts a worker that died before it is given up
# the environment a worker needs from the app (where models, LoRAs and caches are; offline or not)
PASSED_ENV = ("FITVIDEO_HOME", "FITVIDEO_LORAS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED",
              "OMP_NUM_THREADS")


class RayWorkerActor:
    """Inside a worker process: a runner of its own, one job at a time; `progress` and `stop` answer meanwhile
    (a threaded actor: max_concurrency 2)."""

    def __init__(self, name: str, outputs_dir: str, max_cache_size: int | None, threads: int = 0):
        import torch

        from engine.cache import PipelineCache
        from engine.runner import Runner

        if threads:
            torch.set_num_threads(threads)
        self.runner = Runner(PipelineCache(max_cache_size), outputs_dir=outputs_dir)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        self.runner.worker = {"name": name, "node": socket.gethostname(), "device": device, "pid": os.getpid()}
        self.job = None

    def run(self, record: dict) -> dict:
        """One job (its queue record, `resumed` included) through the runner; the result's files."""
        from engine.jobs import Job, run_job

        job = Job.from_record(record)
        job.resumed = record.get("resumed", "")
        self.job = job
        result = run_job(self.runner, job)
        return {"video": str(result.video_path), "sidecar": str(result.sidecar_path)}

    def progress(self) -> Any:
        return getattr(self.job, "last", None)

    def stop(self) -> None:
        if self.job is not None:
            self.job.stop.set()

    def fits(self, request: dict) -> bool:
        """Whether this worker's own plan fits the request (its GPU, its RAM, what its cache holds)."""
        from configs.schema import GenerationRequest

        try:
            return bool(self.runner.plan(GenerationRequest.from_dict(request)).fits)
        except Exception:  # noqa: BLE001  (a request that cannot even plan: the run says why, on any worker)
            return True

    def held(self) -> list[str]:
        return sorted({key[0] for key in self.runner.cache.keys()})

    def info(self) -> dict:
        return dict(self.runner.worker)


class RayWorker:
    """In the app: one worker as the job queue sees it (engine/jobs.py `LocalWorker`'s shape)."""

    def __init__(self, name: str, actor):
        self.name, self.actor = name, actor
        self._held: set[str] = set()
        self._fits: dict[str, bool] = {}  # job id -> whether this worker's plan fits it (asked once per job)

    def holds(self, model: str) -> bool:
        return model in self._held

    def alive(self) -> bool:
        """Whether the actor answers (after Ray restarted it); False once Ray gave up on it."""
        import ray

        return _quiet(lambda: bool(ray.get(self.actor.info.remote(), timeout=120)), False)

    def fits(self, job) -> bool:
        if job.id not in self._fits:
            import ray

            ask = lambda: ray.get(self.actor.fits.remote(job.request.to_dict()), timeout=60)  # noqa: E731
            self._fits[job.id] = bool(_quiet(ask, True))
        return self._fits[job.id]

    def run(self, job) -> Any:
        """The job on this worker: its progress and Stop passed while it runs; its RunResult, read from the
        sidecar the worker wrote. WorkerLost when the worker's process went away."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from engine.jobs import WorkerLost

        record = {**job.to_record(), "resumed": job.resumed}
        ref, stop_sent = self.actor.run.remote(record), False
        while not ray.wait([ref], timeout=POLL_S)[0]:
            if job.stop.is_set() and not stop_sent:
                self.actor.stop.remote()
                stop_sent = True
            event = _quiet(lambda: ray.get(self.actor.progress.remote(), timeout=5), None)
            if event is not None:
                job.record(event)  # as in-process: the latest, each stage's first, a new preview
        try:
            files = ray.get(ref)
        except RayActorError as exc:  # the actor died (its process killed, its node lost) while running the job
            raise WorkerLost(f"{self.name}: {exc}") from None
        except RayTaskError as exc:  # the job's own error (a refusal, Stop, a failure), as its own type
            raise exc.as_instanceof_cause() from None
        self._held = set(_quiet(lambda: ray.get(self.actor.held.remote(), timeout=30), []))
        return _result(files)


def _quiet(call, default):
    """`call()`, or `default` when the actor cannot answer now (restarting, busy past the timeout)."""
    try:
        return call()
    except Exception:  # noqa: BLE001  (a progress poll must never end the job)
        return default


def _result(files: dict):
    from engine.results import Sidecar, latents_path
    from engine.run import RunResult

    video = Path(files["video"])
    latents = latents_path(video)
    return RunResult(video, Path(files["sidecar"]), latents if latents.is_file() else None,
                     Sidecar.read(files["sidecar"]))


# =========================================================================== starting them


def start_workers(address: str, count: int | None, outputs_dir: str | Path,
                  max_cache_size: int | None = None) -> list[RayWorker]:
    """Connect to Ray (`local`: start one here; `auto` / an address: join a cluster started with `ray start`) and
    start the workers: `count`, or one per GPU the cluster has. ValueError naming what is missing."""
    import ray

    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": env}
    if address == "local":  # a new instance here, even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=max(count or 0, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = count or gpus
    if count < 1:
        raise ValueError(f"--ray {address}: the cluster has no GPU; give --ray-workers N to run N workers on CPUs")
    per_worker = {"num_gpus": 1} if gpus >= count else {"num_cpus": 1}
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // count)
    actor_cls = ray.remote(max_restarts=RESTARTS, max_task_retries=0, max_concurrency=2, **per_worker)(RayWorkerActor)
    workers = [RayWorker(f"ray-{i}", actor_cls.options(name=f"fitvideo-{os.getpid()}-{i}").remote(
        f"ray-{i}", str(Path(outputs_dir).resolve()), max_cache_size, threads)) for i in range(count)]
    infos = ray.get([w.actor.info.remote() for w in workers], timeout=600)
    logger.info("Ray workers: %s", "; ".join(f"{i['name']} on {i['node']} ({i['device']})" for i in infos))
    return workers


def stop_workers(workers: list[RayWorker]) -> None:
    import ray

    for w in workers:
        try:
            ray.kill(w.actor, no_restart=True)
        except Exception:  # noqa: BLE001  (already gone)
            pass
    ray.shutdown()
