"""Jobs that outlive the page and the process: one worker, a queue on disk, progress kept on the server.

A Generate press (or an API call) becomes a `Job`, written at once to `<outputs>/.queue/<id>.json` (atomically:
a temporary name renamed when complete) and run by the one worker thread, oldest first. The page only waits
for it: a closed or refreshed page loses nothing, and any page can see the job (`JobQueue.jobs`), its stage,
progress, ETA and latest preview, and stop it. With a login, each person sees and stops only their own jobs.

After a restart (clean or a crash) `recover()` reads the folder back: waiting jobs run in their order; the job
that was running resumes from its saved latents when its denoise had finished (only the decode runs again)
and starts over otherwise. A job whose result is already complete on disk is not run again; a damaged queue
file is reported and moved aside (`*.bad`), never fatal. A job's file is removed once its result is written.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from configs.schema import GenerationRequest

logger = logging.getLogger(__name__)

JobState = Literal["waiting", "running", "done", "failed", "stopped"]
QUEUE_SUBDIR = ".queue"
KEEP_FINISHED = 20  # finished jobs still listed (their results are in the gallery for good)
_ORDER = itertools.count()


class QueueFull(RuntimeError):
    """More jobs are waiting than the queue takes; the message says how many."""


@dataclass(eq=False)
class Job:
    """One generation from the moment it is queued. The first fields are what the queue file keeps."""

    id: str
    task: str
    request: GenerationRequest
    out_path: str
    owner: str = ""  # the login that queued it ("" without --auth)
    session: str = ""  # the browser session that queued it (its tab's Stop reaches it)
    state: JobState = "waiting"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str = ""
    resumed: str = ""  # after a restart: how it went on
    order: int = field(default_factory=lambda: next(_ORDER))
    oom_kills: int = 0  # the memory cgroup's OOM-kill count when it started (a restart compares: killed for memory?)
    worker: str = ""  # the worker running it (engine/ray_workers.py names them; "local" without Ray)
    # Kept in memory only:
    run: Any = None  # the ResolvedRun it was queued as (after a restart: resolved again from `request`)
    last: Any = None  # the runner's last ProgressEvent
    stages: list = field(default_factory=list)  # the first ProgressEvent of each stage, in order (a page shows each)
    preview: Any = None  # the latest latent preview (uint8 H x W x 3), while denoising
    preview_n: int = 0  # previews made so far (a page sends a preview again only when this moves)
    result: Any = None  # the RunResult (or RedecodeResult) once done
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def to_record(self) -> dict:
        return {"id": self.id, "task": self.task, "request": self.request.to_dict(), "out_path": self.out_path,
                "owner": self.owner, "session": self.session, "state": self.state, "created": self.created,
                "started": self.started, "resumed": self.resumed, "oom_kills": self.oom_kills}

    @classmethod
    def from_record(cls, data: dict) -> "Job":
        request = GenerationRequest.from_dict(data["request"])
        job = cls(str(data["id"]), str(data["task"]), request, str(data["out_path"]), str(data.get("owner", "")),
                  str(data.get("session", "")), data.get("state", "waiting"), float(data.get("created", 0)))
        job.started = data.get("started")
        job.oom_kills = int(data.get("oom_kills") or 0)
        return job

    def record(self, event) -> None:
        """A progress event of this job (the runner's, or one polled from a Ray worker): the latest, each stage's
        first (a page shows every stage), a new preview, counted once however often the same step is seen."""
        before, self.last = self.last, event
        if not self.stages or self.stages[-1].stage != event.stage:
            self.stages.append(dataclasses.replace(event, preview=None))  # no pixels kept for the list
        again = before is not None and (before.stage, before.step) == (event.stage, event.step)
        if getattr(event, "preview", None) is not None and not again:
            self.preview, self.preview_n = event.preview, self.preview_n + 1

    def view(self) -> dict:
        """What a page or an API client sees of the job (no preview pixels, no result object)."""
        last = self.last
        return {
            "id": self.id, "task": self.task, "model": self.request.model, "prompt": self.request.prompt,
            "seed": self.request.seed,
            "owner": self.owner, "state": self.state, "stage": getattr(last, "stage", "") if last else "",
            "step": getattr(last, "step", 0) if last else 0, "total": getattr(last, "total", 0) if last else 0,
            "message": getattr(last, "message", "") if last else "", "eta_s": getattr(last, "eta_s", None)
            if last else None, "video": str(getattr(self.result, "final_path", None) or getattr(self.result, "video_path",
                                                                                               "")) if self.result else "",
            "error": self.error, "resumed": self.resumed, "created": self.created, "worker": self.worker,
        }


class WorkerLost(RuntimeError):
    """The process running a job went away (a Ray worker killed or its machine gone): the job runs again."""


class LocalWorker:
    """This process's runner: the default worker, one job at a time."""

    name = "local"

    def __init__(self, run_job: Callable[[Job], Any]):
        self.run_job = run_job  # runs one job (the runner, with the job's progress and stop); returns its result

    def run(self, job: Job) -> Any:
        return self.run_job(job)

    def holds(self, model: str) -> bool:
        return False

    def fits(self, job: Job) -> bool:
        return True

    def alive(self) -> bool:
        return True


class JobQueue:
    """The app's jobs: queued to disk, run by one thread per worker (`LocalWorker(run_job)` unless `workers` are
    given: engine/ray_workers.py), each taking the oldest waiting job, one whose model it already holds first."""

    def __init__(self, folder: str | Path, run_job: Callable[[Job], Any] | None = None, max_waiting: int = 16,
                 workers: list | None = None):
        self.folder = Path(folder)
        self.workers = list(workers) if workers else [LocalWorker(run_job)]
        self.max_waiting = max_waiting
        self._jobs: dict[str, Job] = {}
        self._cv = threading.Condition()
        self._threads: dict[str, threading.Thread] = {}
        self._closed = False
        self.notes: list[str] = []  # what recover() found after a restart, in words

    # ---------------------------------------------------------------- queueing
    def submit(self, run, out_path: str | Path, owner: str = "", session: str = "") -> Job:
        """Queue a run (an engine.resolve.ResolvedRun; a GenerationRequest is resolved here: every refusal before it
        is queued); on disk before this returns. QueueFull when `max_waiting` are waiting."""
        from engine.resolve import resolve

        run = resolve(run)
        with self._cv:
            waiting = sum(j.state == "waiting" for j in self._jobs.values())
            if waiting >= self.max_waiting:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting); try again when one has finished")
            job = Job(uuid.uuid4().hex[:12], run.request.task, run.request, self._free_name(Path(out_path)), owner,
                      session)
            job.run = run
            self._write(job)
            self._jobs[job.id] = job
            self._cv.notify_all()
        self.start()
        return job

    def _free_name(self, out: Path) -> str:
        """`out`, or `<name>-N` when a job in the queue will already write there (same task, seed and second)."""
        import re

        taken = {j.out_path for j in self._jobs.values()}
        base, candidate, n = re.sub(r"-\d+$", "", out.stem), out, 1
        while str(candidate) in taken or candidate.exists():
            candidate = out.with_name(f"{base}-{n}{out.suffix}")
            n += 1
        return str(candidate)

    def ahead(self, job: Job) -> int:
        """Jobs that run before this waiting one (the running one included); 0 once it runs."""
        if job.state != "waiting":
            return 0
        with self._cv:
            return sum(j.state == "running" or (j.state == "waiting" and (j.created, j.order) < (job.created, job.order))
                       for j in self._jobs.values())

    def start(self) -> None:
        with self._cv:
            self._closed = False
            for worker in self.workers:
                thread = self._threads.get(worker.name)
                if thread is None or not thread.is_alive():
                    self._threads[worker.name] = thread = threading.Thread(
                        target=self._work, args=(worker,), name=f"fitvideo-jobs-{worker.name}", daemon=True)
                    thread.start()

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads.values():
            thread.join(timeout)

    # ---------------------------------------------------------------- looking and stopping
    def jobs(self, owner: str | None = None) -> list[Job]:
        """Running, then waiting (in order), then recently finished (newest first); only `owner`'s if given."""
        with self._cv:
            mine = [j for j in self._jobs.values() if owner is None or j.owner == owner]
        rank = {"running": 0, "waiting": 1}
        live = sorted((j for j in mine if j.state in rank), key=lambda j: (rank[j.state], j.order))
        ended = sorted((j for j in mine if j.state not in rank), key=lambda j: -(j.finished or 0))
        return live + ended

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            return self._jobs.get(job_id)

    def find(self, session: str, task: str) -> Job | None:
        """The live job a browser session queued from a tab (its Stop button's)."""
        live = [j for j in self.jobs() if j.session == session and j.task == task and j.state in ("running", "waiting")]
        return live[0] if live else None

    def stop(self, job_id: str, owner: str | None = None) -> Job | None:
        """Stop a job: a waiting one never runs, a running one ends at its next step. None: not yours / unknown."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or (owner is not None and job.owner != owner):
                return None
            job.stop.set()
            if job.state == "waiting":
                self._end(job, "stopped", "")
        return job

    # ---------------------------------------------------------------- after a restart
    def recover(self, is_complete: Callable[[Job], bool], can_resume: Callable[[Job], bool]) -> list[str]:
        """Read the queue folder back (before the worker starts): what happened to each job, in words."""
        notes = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                job = Job.from_record(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                bad = path.with_suffix(".bad")
                path.replace(bad)
                notes.append(f"queue file {path.name} is damaged ({type(exc).__name__}: {exc}); moved to {bad.name}")
                continue
            if is_complete(job):  # its result was written just before the app stopped: never run twice
                path.unlink(missing_ok=True)
                notes.append(f"job {job.id} had finished ({Path(job.out_path).name}); not run again")
                continue
            if job.state == "running" and self._killed_for_memory(job, path, notes):
                continue
            if job.state == "running":
                job.resumed = "resumed from its saved latents (decode only)" if can_resume(job) else \
                    "started over (it was interrupted before its latents were saved)"
                notes.append(f"job {job.id} was running when the app stopped: {job.resumed}")
            else:
                notes.append(f"job {job.id} was waiting: it runs again")
            job.state = "waiting"
            self._write(job)
            self._jobs[job.id] = job
        for note in notes:
            logger.info("queue: %s", note)
        return notes

    def _killed_for_memory(self, job: Job, path: Path, notes: list[str]) -> bool:
        """A job the kernel's OOM killer ended (its memory cgroup counted a kill since it started): not run again by
        itself, which would end the same way; kept in the list as failed, with what happened."""
        from vram_utils.host_budget import host_limit, oom_kills

        now = oom_kills()
        if now <= job.oom_kills:
            return False
        job.state, job.finished = "failed", time.time()
        job.error = (f"the app was killed by the out-of-memory killer while this job ran (the memory cgroup counted "
                     f"{now - job.oom_kills} kill{'s' if now - job.oom_kills > 1 else ''}; host {host_limit().text()}); "
                     "it is not run again by itself: choose smaller settings or free memory, then Generate again")
        job.done.set()
        path.unlink(missing_ok=True)
        self._jobs[job.id] = job
        notes.append(f"job {job.id}: {job.error}")
        return True

    # ---------------------------------------------------------------- the worker
    def _next(self, worker) -> Job | None:
        with self._cv:
            while not self._closed:
                job = self._pick(worker)
                if job is not None:
                    from vram_utils.host_budget import oom_kills

                    job.state, job.started, job.oom_kills, job.worker = "running", time.time(), oom_kills(), worker.name
                    self._write(job)
                    return job
                self._cv.wait(1.0)
        return None

    def _pick(self, worker) -> Job | None:
        """Of the waiting jobs `worker`'s own plan fits (or that no other worker's does), the oldest whose model it
        holds; else the oldest one no other idle worker holds."""
        waiting = sorted((j for j in self._jobs.values() if j.state == "waiting"), key=lambda j: (j.created, j.order))
        if len(self.workers) > 1:
            others = [w for w in self.workers if w is not worker]
            waiting = [j for j in waiting if worker.fits(j) or not any(w.fits(j) for w in others)]
        held = [j for j in waiting if worker.holds(j.request.model)]
        if held or len(self.workers) == 1:
            return (held or waiting or [None])[0]
        busy = {j.worker for j in self._jobs.values() if j.state == "running"}
        idle = [w for w in self.workers if w is not worker and w.name not in busy]
        return next((j for j in waiting if not any(w.holds(j.request.model) for w in idle)), None)

    def _work(self, worker) -> None:
        while (job := self._next(worker)) is not None:
            try:
                job.result = worker.run(job)
                state, error = ("stopped", "") if job.result is None else ("done", "")
            except WorkerLost as exc:  # its process went away: the job waits again, from its latents if saved
                self._requeue(job, exc)
                if not worker.alive():  # gone for good (Ray gave up restarting it): the others take the jobs
                    self._retire(worker)
                    return
                continue
            except Exception as exc:  # noqa: BLE001  (the job ends; the worker and the app go on)
                state, error = self._failure(job, exc)
            with self._cv:
                self._end(job, state, error)

    def _retire(self, worker) -> None:
        with self._cv:
            self.workers = [w for w in self.workers if w is not worker]
            logger.error("worker %s is gone and was not restarted; %d worker%s left", worker.name, len(self.workers),
                         "" if len(self.workers) == 1 else "s")
            self._cv.notify_all()

    def _requeue(self, job: Job, exc: Exception) -> None:
        with self._cv:
            job.resumed = ("resumed from its saved latents (decode only)" if latents_saved(job) else
                           "started over (its worker was lost before its latents were saved)")
            logger.warning("job %s: worker %s lost (%s); %s", job.id, job.worker, exc, job.resumed)
            job.state, job.worker, job.last = "waiting", "", None
            self._write(job)
            self._cv.notify_all()

    @staticmethod
    def _failure(job: Job, exc: Exception) -> tuple[JobState, str]:
        """A job's end by an exception: stopped, or failed with a message written for the person."""
        from configs.schema import RequestError
        from engine.runner import Cancelled, RunFailed

        if isinstance(exc, Cancelled):
            return "stopped", ""
        if isinstance(exc, (RequestError, RunFailed)):  # messages that name the value and say what to do
            logger.info("job %s: %s", job.id, exc)
            return "failed", str(exc)
        logger.error("job %s failed", job.id, exc_info=exc)
        return "failed", f"generation failed: {type(exc).__name__}: {exc}"

    def _end(self, job: Job, state: JobState, error: str) -> None:
        """Under the lock: the job is over; its file goes, it stays listed a while."""
        job.state, job.error, job.finished, job.preview = state, error, time.time(), None
        (self.folder / f"{job.id}.json").unlink(missing_ok=True)
        job.done.set()
        ended = sorted((j for j in self._jobs.values() if j.done.is_set()), key=lambda j: j.finished or 0)
        for old in ended[:-KEEP_FINISHED]:
            del self._jobs[old.id]
        self._cv.notify_all()

    def _write(self, job: Job) -> None:
        from decode.writer import write_json_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / f"{job.id}.json", job.to_record())


# --------------------------------------------------------------------------- running a job with the runner


def run_job(runner, job: Job, lock: threading.Lock | None = None):
    """One job through the runner (holding `lock`): its progress into the job (`Job.record`), its stop flag, and
    after a restart the decode alone when its latents were saved."""
    with lock or threading.Lock():
        if job.resumed.startswith("resumed") and latents_saved(job):
            return _resume_decode(job, job.record)
        return runner.generate(job.run or job.request, out_path=job.out_path, on_progress=job.record, stop=job.stop)


def _resume_decode(job: Job, on_progress):
    """The interrupted job's saved latents decoded into its video (the redecode path, with its own sidecar)."""
    from engine.redecode import redecode
    from engine.results import latents_path
    from engine.runner import ProgressEvent

    on_progress(ProgressEvent("decoding", message="decoding the saved latents (resumed after a restart)"))
    return redecode(latents_path(Path(job.out_path)), job.out_path, on_progress=on_progress)


def is_complete(job: Job) -> bool:
    """The job's video and its sidecar are both on disk: it finished (sidecars are written last, atomically)."""
    from engine.results import sidecar_path

    out = Path(job.out_path)
    return out.is_file() and sidecar_path(out).is_file()


def latents_saved(job: Job) -> bool:
    """The job's denoise finished before the app stopped: its latents file is complete (written atomically)."""
    from engine.results import latents_path

    return latents_path(Path(job.out_path)).is_file()
