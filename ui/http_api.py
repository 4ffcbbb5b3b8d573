"""The HTTP job API: the page's job queue for programs and agents, in plain JSON over HTTP (no Gradio client).

    POST   /v1/videos               {"task": "t2v", "prompt": "a cat", "model": "tiny-wan", ...}
                                    -> 202 {"id", "status": "waiting", ...}
    GET    /v1/videos               -> {"videos": [...]}: the caller's jobs (running, waiting, then finished)
    GET    /v1/videos/{id}          -> {"id", "status", "progress": {"stage", "step", "total", "message", "eta_s"},
                                        "error", "seed", "model", "prompt", "video", "content"}
    GET    /v1/videos/{id}/content  -> the mp4 once the job is done (409 before, saying its status)
    DELETE /v1/videos/{id}          -> {"id", "status"}: a waiting job is stopped at once, a running one at its
                                       next step (poll until "stopped")

The fields are the API's (ui/api.py `API_FIELDS`: resolution "HxW", loras ["style:0.8"], ...), checked once by
engine/resolve.py with the same words as the page and the CLI; a refusal is a 400 with {"error": why}, before a job
is queued. `image` / `video`: a path on the server, or the file itself as a data URL ("data:image/png;base64,...").
It is the same queue as the page's: the Jobs panel shows these jobs, a restart recovers them, one runs at a time.

Auth: a server started with --auth takes the same login as HTTP Basic (`curl -u user:pass`); without it every
route answers 401. Each login sees and stops only its own jobs. The routes are added to the FastAPI app Gradio
serves (`mount`), so they share its host, port and share link. Only app.serve imports this module.
"""
from __future__ import annotations

import base64
import binascii
import logging
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request  # at module level: FastAPI resolves the routes' annotations in this module's names

if TYPE_CHECKING:
    from engine.jobs import Job
    from ui.context import AppContext, FitVideoApp

logger = logging.getLogger(__name__)

PREFIX = "/v1/videos"
SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4",
            "video/webm": ".webm", "video/quicktime": ".mov"}


class ApiError(Exception):
    """An HTTP status and the words a client reads in {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# =========================================================================== what a client sends and reads


def status_of(job: Job) -> dict[str, Any]:
    """A job as a client reads it (engine/jobs.py `Job.view`, with its progress grouped and its links)."""
    v = job.view()
    return {"id": job.id, "status": job.state, "task": job.task, "model": v["model"], "prompt": v["prompt"],
            "seed": v["seed"], "progress": {k: v[k] for k in ("stage", "step", "total", "message", "eta_s")},
            "error": v["error"], "resumed": v["resumed"], "created": v["created"],
            "video": Path(v["video"]).name if v["video"] else "",
            "content": f"{PREFIX}/{job.id}/content" if job.state == "done" else ""}


def request_values(body: Any) -> tuple[str, dict[str, Any]]:
    """(task, the API's field values) from a POST body; ApiError(400) naming what is wrong and what is allowed."""
    from configs.schema import TASKS
    from ui.api import fields_for

    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object of request fields, got {type(body).__name__}")
    values = dict(body)
    task = values.pop("task", None)
    if task not in TASKS:
        raise ApiError(400, f"task={task!r} is not allowed; choose one of {', '.join(TASKS)}")
    allowed = fields_for(task)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ApiError(400, f"{', '.join(map(repr, unknown))} {'is not a field' if len(unknown) == 1 else 'are not fields'}"
                            f" of {task}; allowed: {', '.join(allowed)}")
    return task, values


def materialize(value: Any, field: str, folder: Path) -> Any:
    """A data URL ("data:image/png;base64,...") as a file in `folder`; anything else as it came."""
    if not isinstance(value, str) or not value.startswith("data:"):
        return value
    head, sep, payload = value.partition(",")
    mime = head[5:].split(";")[0]
    if not sep or ";base64" not in head or mime not in SUFFIXES:
        raise ApiError(400, f"{field}: a data URL must be base64 of one of {', '.join(SUFFIXES)} "
                            f"(data:image/png;base64,...), got {head[:40]!r}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: the data URL's payload is not valid base64") from None
    fd, path = tempfile.mkstemp(suffix=SUFFIXES[mime], prefix=f"{field}_", dir=folder)
    with open(fd, "wb") as f:
        f.write(data)
    return path


# =========================================================================== the routes' work


def submit(ctx: AppContext, body: Any, owner: str) -> Job:
    """Resolve and queue a job, as the page's Generate does (ui/context.py): ApiError(400 / 429) when refused."""
    from configs.schema import RequestError
    from engine.jobs import QueueFull
    from reports.catalog import default_model, model_statuses
    from ui.api import with_defaults
    from ui.context import prepare_request

    task, values = request_values(body)
    values = with_defaults(values, task, default_model(model_statuses(task, ctx.models_dir)), ctx.default_quant)
    with tempfile.TemporaryDirectory(prefix="fitvideo-upload-") as folder:
        for name in ("image", "video"):
            if name in values:
                values[name] = materialize(values[name], name, Path(folder))
        try:
            run = prepare_request(ctx, task, values)  # an upload is kept next to the outputs from here
        except (RequestError, OSError, ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None
    try:
        return ctx.queue.submit(run, ctx.runner.default_output(run), owner=owner)
    except QueueFull as exc:
        raise ApiError(429, str(exc)) from None


def find(ctx: AppContext, job_id: str, owner: str) -> Job:
    job = ctx.queue.get(job_id)
    if job is None or (owner and job.owner != owner):
        raise ApiError(404, f"no job {job_id!r}" + (f" of {owner!r}" if owner else "") + f"; GET {PREFIX} lists them")
    return job


def content_path(job: Job) -> Path:
    """The finished job's video (its last finishing step's, when it has one); ApiError(409) before."""
    if job.state != "done":
        raise ApiError(409, f"job {job.id} is {job.state}" + (f": {job.error}" if job.error else "") +
                       "; its video is served once the status is done")
    return Path(getattr(job.result, "final_path", None) or job.result.video_path)


def check_login(header: str | None, login: Any) -> str:
    """The user an Authorization header proves ('' when the server has no login); ApiError(401) otherwise.
    `login` as Gradio takes it: (user, password), a list of them, or a function (user, password) -> bool."""
    if not login:
        return ""
    scheme, _, token = (header or "").partition(" ")
    try:
        user, _, password = base64.b64decode(token).decode().partition(":") if scheme.lower() == "basic" else ("", "", "")
    except (binascii.Error, UnicodeDecodeError):
        user, password = "", ""
    if callable(login):
        ok = bool(user) and bool(login(user, password))
    else:
        pairs = [login] if isinstance(login[0], str) else list(login)
        ok = any(secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
                 for u, p in pairs)
    if ok:
        return user
    raise ApiError(401, "this server needs its login: HTTP Basic with the --auth user and password (curl -u user:pass)")


# =========================================================================== the routes


def mount(app: FitVideoApp, login: Any = None) -> None:
    """Add the /v1/videos routes to the FastAPI app Gradio serves (after `launch`: `app.demo.app`)."""
    from fastapi import APIRouter
    from fastapi.responses import FileResponse, JSONResponse

    ctx, router = app.ctx, APIRouter(prefix=PREFIX)

    def answer(request: Request, work) -> Any:
        try:
            owner = check_login(request.headers.get("authorization"), login)
            return work(owner)
        except ApiError as exc:
            headers = {"WWW-Authenticate": 'Basic realm="FitVideo"'} if exc.status == 401 else None
            return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @router.post("")
    async def create(request: Request):
        try:
            body = await request.json()
        except ValueError:
            body = ApiError(400, "the body is not JSON; send the request fields as a JSON object")

        def work(owner: str):
            if isinstance(body, ApiError):
                raise body
            return JSONResponse(status_of(submit(ctx, body, owner)), status_code=202)
        return answer(request, work)

    @router.get("")
    def listing(request: Request):
        return answer(request, lambda owner: {"videos": [status_of(j) for j in ctx.queue.jobs(owner or None)]})

    @router.get("/{job_id}")
    def status(job_id: str, request: Request):
        return answer(request, lambda owner: status_of(find(ctx, job_id, owner)))

    @router.get("/{job_id}/content")
    def content(job_id: str, request: Request):
        return answer(request, lambda owner: FileResponse(content_path(find(ctx, job_id, owner)),
                                                          media_type="video/mp4"))

    @router.delete("/{job_id}")
    def stop(job_id: str, request: Request):
        def work(owner: str):
            job = find(ctx, job_id, owner)
            ctx.queue.stop(job.id)
            return {"id": job.id, "status": job.state}
        return answer(request, work)

    app.demo.app.include_router(router)
    logger.info("HTTP job API at %s", PREFIX)
