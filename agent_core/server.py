"""`autocode serve`: one asyncio process with the ASGI app, the run scheduler and the local sandbox pool.

Chat adapters mount their routes here (`POST /slack/events`, `POST /telegram/webhook`); the internal API under
`/api` lets the CLI and tests submit, inspect and cancel runs, read usage and its cost, and read or change the
settings of a channel or chat (agent_core/channel_settings.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent_core import retention, viewer
from agent_core.viewer import run_url
from agent_core.app import build_agent
from agent_core.config import Settings
from agent_core.llm_probe import probe_llm
from agent_core.outputs import run_link
from agent_core import uploads
from agent_core.disk import NoRoom, directory_writable, room_refusal
from agent_core.http_guard import BodyGuard, error_response, http_error
from agent_core.budget import monthly_status
from agent_core.channel_settings import EffectiveSettings, SettingError, run_settings, scope_of
from agent_core.pricing import month_bounds, prices_for, spend
from agent_core.routine_clock import RoutineClock
from agent_core.routines_api import RoutinesAPI
from agent_core.scheduler import RunScheduler
from bots import Runtime, build_adapters
from storage.owner import DatabaseOwner

log = logging.getLogger(__name__)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ADAPTER_START_S = 5.0  # serve's start-up waits this long at most for each chat adapter (then it goes on alone)
_REFUSED = {"empty": 400, "budget": 429, "shutting_down": 503, "disk_full": 503}  # a refused submission's status


class RequestGauge:
    """ASGI middleware tracking the POSTs in flight (webhooks, submissions), so that run starts and chat rendering
    wait for a burst of them to be acknowledged instead of delaying it (acks are cheap; the runs they start are
    not). Reads (polling, health checks, run pages) do not count: they must not hold runs back."""

    SETTLE_S = 0.02  # quiet means no request for this long: requests of a burst arrive a few ms apart
    MAX_WAIT_S = 0.2  # never hold back work for longer than this

    def __init__(self, app: Any):
        self.app = app
        self.in_flight = 0
        self._last_done = float("-inf")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self._last_done = time.monotonic()

    async def quiet(self) -> None:
        """Return once no request has been in flight for SETTLE_S, or after MAX_WAIT_S at the most."""
        deadline = time.monotonic() + self.MAX_WAIT_S
        while (now := time.monotonic()) < deadline:
            if not self.in_flight and now - self._last_done >= self.SETTLE_S:
                return
            await asyncio.sleep(0.01)


class FileTooLarge(MultiPartException):
    """A file part went over AUTOCODE_INPUT_MAX_MB while the request was being read (reading stopped there)."""


class CappedMultiPartParser(MultiPartParser):
    """starlette's parser (files spooled to disk past 1 MB, SpooledTemporaryFile) that also stops reading a file
    part at `max_file_bytes`: starlette's own `max_part_size` bounds only the non-file fields."""

    def __init__(self, *args: Any, max_file_bytes: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_file_bytes = max_file_bytes
        self._file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                raise FileTooLarge(f"{self._current_part.file.filename or 'a file'} is over the limit of "
                                   f"{self.max_file_bytes // 1048576} MB a file (AUTOCODE_INPUT_MAX_MB); "
                                   "nothing was run.")
        super().on_part_data(data, start, end)


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


class Server:
    """The pieces `serve` owns; built before the app starts so configuration errors surface first."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # Before anything touches the database: one serve per database (storage/owner.py), DatabaseBusy otherwise.
        self.owner = DatabaseOwner.acquire(settings.db_path)
        try:
            self.agent = build_agent(settings)
        except BaseException:
            self.owner.release()
            raise
        self.scheduler = RunScheduler(self.agent, self.owner)
        self.routine_clock = RoutineClock(self.scheduler)  # fires routines (agent_core/routines.py) on time
        self.runtime = Runtime(settings, self.scheduler, self.agent.storage, self.agent.events)
        self.adapters = build_adapters(self.runtime)
        for adapter in self.adapters:
            self.scheduler.on_interrupted(adapter.name, adapter.notify_interrupted)
        self._llm_check: asyncio.Task[None] | None = None
        self._starting: list[asyncio.Task] = []  # adapter starts that outlasted ADAPTER_START_S
        self._failed: set[str] = set()  # adapters whose start raised
        self._sweeper: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.agent.executor.start()
        await self.scheduler.start()
        started: list[Any] = []
        try:
            for adapter in self.adapters:
                started.append(adapter)  # stopped at the end even when its start failed or is still going on
                await self._start_adapter(adapter)
            await self.scheduler.announce_interrupted()
            self.routine_clock.start()  # after the adapters: a firing missed while down may run at once
            log.info("autocode serve ready (sandbox %s; adapters: %s)", self.agent.executor.name,
                     self._adapters_line())
            self._sweeper = asyncio.create_task(retention.run_periodically(self.agent.storage, self.settings),
                                                name="retention-sweep")  # at start, then hourly
            if self.settings.llm_startup_check:  # in the background: readiness never waits for the LLM
                self._llm_check = asyncio.create_task(self.log_llm_check(), name="llm-startup-check")
            yield
        finally:
            if self._llm_check is not None:
                self._llm_check.cancel()
            for task in self._starting:  # an adapter still starting when serve stops
                task.cancel()
            await asyncio.gather(*self._starting, return_exceptions=True)
            if self._sweeper is not None:
                self._sweeper.cancel()
                await asyncio.gather(self._sweeper, return_exceptions=True)
            await self.routine_clock.stop()
            await self.scheduler.stop()  # adapters stay up meanwhile: runs finishing in the grace are rendered
            for adapter in reversed(started):
                try:
                    await adapter.stop()
                except Exception:
                    log.exception("adapter %s did not stop cleanly", adapter.name)
            await self.agent.close()  # the sandbox pool, the MCP servers, the LLM client, the database
            self.owner.release()

    async def _start_adapter(self, adapter: Any) -> None:
        """Start one chat adapter without letting it hold serve up: after ADAPTER_START_S its start goes on in the
        background, and a start that fails leaves that adapter off (one line) while the rest serves. Adapters retry
        what can be retried themselves (Slack Socket Mode: bots/slack_socket.py; Telegram's Bot API)."""
        task = asyncio.create_task(adapter.start(), name=f"{adapter.name}-start")
        done, _ = await asyncio.wait({task}, timeout=ADAPTER_START_S)
        if not done:
            log.warning("%s: still starting after %g s; serving meanwhile", adapter.name, ADAPTER_START_S)
            self._starting.append(task)
            task.add_done_callback(self._late_start)
        elif task.exception() is not None:
            exc = task.exception()
            log.error("%s: could not start (%s: %s); serving without it", adapter.name, type(exc).__name__, exc,
                      exc_info=exc)
            self._failed.add(adapter.name)

    def _late_start(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name().removesuffix("-start")
            log.error("%s: could not start (%s); serving without it", name, task.exception())
            self._failed.add(name)

    def adapter_status(self, adapter: Any) -> str:
        """"up", "connecting" (retrying or still starting in the background) or "off"."""
        if adapter.name in self._failed:
            return "off"
        if any(t.get_name() == f"{adapter.name}-start" and not t.done() for t in self._starting):
            return "connecting"
        return getattr(adapter, "status", "up")

    def _adapters_line(self) -> str:
        """The adapters for serve's ready line: only those up by name; the others said as what they are, with why
        when the adapter says (its optional `start_problem`)."""
        up, connecting, off = [], [], []
        for adapter in self.adapters:
            status, problem = self.adapter_status(adapter), getattr(adapter, "start_problem", None)
            if status == "up":
                up.append(adapter.name)
            elif status == "connecting":
                connecting.append(f"{adapter.name} (connecting in the background{'; ' + problem if problem else ''})")
            else:
                off.append(f"{adapter.name} ({problem or 'see above'})")
        return (", ".join(up + connecting) or "none") + (f"; off: {', '.join(off)}" if off else "")

    async def log_llm_check(self) -> None:
        """Log what the LLM endpoint answers (agent_core.llm_probe: reachability, latency, the model, the
        structured-output mode): one line, a second for notes. A problem is a warning; serve keeps running."""
        try:
            result = await probe_llm(self.settings)
        except Exception:  # the check reports; it must never take serve down
            log.exception("LLM check: the check itself failed")
            return
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "LLM check %s: %s", "ok" if result.ok else "FAILED", result.summary())
        if result.notes:
            log.log(level, "LLM check notes: %s", "; ".join(result.notes))

    def app(self) -> BodyGuard:
        routes = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/api/runs", self._guarded(self.submit), methods=["POST"]),
            Route("/api/runs/{run_id}", self._guarded(self.get_run), methods=["GET"]),
            Route("/api/runs/{run_id}/cancel", self._guarded(self.cancel), methods=["POST"]),
            Route("/api/runs/{run_id}/approvals/{number:int}", self._guarded(self.decide), methods=["POST"]),
            Route("/api/usage", self._guarded(self.usage), methods=["GET"]),
            Route("/api/settings", self._guarded(self.get_settings), methods=["GET"]),
            Route("/api/settings", self._guarded(self.change_settings), methods=["POST"]),
            *RoutinesAPI(self.routine_clock).routes(self._guarded),
            *viewer.routes(self.settings, self.agent.storage),
        ]
        for adapter in self.adapters:
            routes.extend(adapter.routes)
        app = Starlette(routes=routes, lifespan=self.lifespan,
                        exception_handlers={Exception: error_response, HTTPException: http_error})
        gauge = RequestGauge(app)
        self.scheduler.yield_to = self.runtime.quiet = gauge.quiet
        return BodyGuard(gauge, self.settings)  # outermost: bodies are capped before anything reads them

    # --- routes ----------------------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> JSONResponse:
        """200 "ok"; 503 "degraded" while the database or the data directory cannot be written (a full disk: runs
        cannot end, nothing new can be stored); 503 "unavailable" while shutting down or the workers are
        unreachable."""
        try:
            self.agent.storage.db.execute("SELECT 1").fetchone()
            database = "ok"
        except Exception as exc:  # reported, not raised: this is the health check
            database = f"error: {type(exc).__name__}"
        data = await asyncio.to_thread(directory_writable, self.agent.storage.path.absolute().parent)
        unwritten = self.scheduler.unwritten_ends
        storage: dict[str, Any] = {"writable": data is None and not unwritten}
        if data is not None:
            storage["error"] = f"cannot write {data}"
        if unwritten:
            storage["runs_not_yet_ended"] = unwritten  # their end is written as soon as the database can be
        sandbox = self.agent.executor.describe()
        workers: Any = "in-process"
        if self.settings.redis_url:
            workers = {"mode": "celery", "redis": sandbox["redis"], "status": await self.agent.executor.health()}
        reachable = workers == "in-process" or workers["status"] == "ok"
        available = database == "ok" and self.scheduler.accepting and reachable
        status = "ok" if available and storage["writable"] else "degraded" if available else "unavailable"
        return JSONResponse({
            "status": status,
            "database": database,
            "storage": storage,
            "sandbox": {"backend": sandbox["backend"], "fallback_reason": sandbox["fallback_reason"],
                        "network": sandbox["network"]},
            "workers": workers,
            "runs": {"running": len(self.scheduler.running), "max": self.settings.max_concurrent_runs},
        }, status_code=200 if status == "ok" else 503)

    def _authorized(self, request: Request) -> bool:
        """With AUTOCODE_API_TOKEN set, a matching bearer token; without it, loopback clients only."""
        token = self.settings.api_token
        if token:
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            return hmac.compare_digest(sent.encode(), token.encode())
        return request.client is not None and request.client.host in _LOOPBACK

    def _guarded(self, endpoint: Callable[[Request], Awaitable[JSONResponse]]):
        async def guarded(request: Request) -> JSONResponse:
            if not self._authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            return await endpoint(request)

        return guarded

    async def submit(self, request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self.submit_with_files(request)
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        fields = ("task", "conversation", "user", "adapter", "delivery_id")
        if not isinstance(body, dict) or not isinstance(body.get("task"), str) or not all(
                isinstance(body.get(name), (str, type(None))) for name in fields):
            return JSONResponse({"error": "send a JSON object with a 'task' string (and optional string "
                                 "conversation, user, adapter, delivery_id)"}, status_code=400)
        task, conversation = body["task"], body.get("conversation") or "api"
        submission = self.scheduler.submit(
            task, conversation, user=body.get("user") or "", adapter=body.get("adapter") or "api",
            delivery_id=body.get("delivery_id"),
        )
        code = {"queued": 202, "duplicate": 200}.get(submission.status) or _REFUSED[submission.reason]
        return JSONResponse({"run_id": submission.run_id, "status": submission.status,
                             "message": submission.message, "url": self._link(submission.run_id),
                             **({"error": submission.message} if submission.status == "refused" else {})},
                            status_code=code)

    def _link(self, run_id: str | None) -> str | None:
        """The run's page (AUTOCODE_PUBLIC_URL/runs/…), or None: no run, no public URL, or the viewer is off."""
        return run_link(self.settings, self.agent.storage, run_id) if run_id else None

    async def submit_with_files(self, request: Request) -> JSONResponse:
        """`POST /api/runs` as multipart/form-data: fields task, conversation, user, delivery_id and `file` parts,
        through agent_core.uploads (the run is held while its files are stored). Over AUTOCODE_INPUT_MAX_MB a file
        or AUTOCODE_INPUT_MAX_FILES files: 413 and no run."""
        settings = self.settings
        max_file = settings.input_max_mb * 1024 * 1024
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.input_max_files * max_file + (1 << 20):
            return JSONResponse({"error": f"the request is over {settings.input_max_files} files of "
                                 f"{settings.input_max_mb} MB (AUTOCODE_INPUT_MAX_FILES, AUTOCODE_INPUT_MAX_MB); "
                                 "nothing was run."}, status_code=413)
        refusal = room_refusal(int(length) if length.isdigit() else 0, settings.disk_reserve_mb * 1024 * 1024,
                               {"AutoCode's files": self.agent.storage.blob_dir,
                                "temporary files": Path(tempfile.gettempdir())})
        if refusal:  # before a byte is read (the parser spools files to temporary files)
            return JSONResponse({"error": refusal}, status_code=507)
        parser = CappedMultiPartParser(request.headers, request.stream(), max_files=settings.input_max_files,
                                       max_fields=16, max_part_size=64 * 1024, max_file_bytes=max_file)
        try:
            form = await parser.parse()
        except FileTooLarge as exc:
            return JSONResponse({"error": exc.message}, status_code=413)
        except MultiPartException as exc:
            status = 413 if exc.message.startswith(("Too many", "Part exceeded")) else 400
            return JSONResponse({"error": f"{exc.message} (AUTOCODE_INPUT_MAX_FILES is "
                                 f"{settings.input_max_files}); nothing was run."}, status_code=status)
        try:
            files = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
            text = {name: form.get(name) for name in ("task", "conversation", "user", "delivery_id")}
            if not isinstance(text["task"], str) or not all(isinstance(v, (str, type(None))) for v in text.values()):
                return JSONResponse({"error": "send a 'task' field (and optional conversation, user, delivery_id) "
                                     "with 'file' parts"}, status_code=400)
            submission = self.scheduler.submit(
                text["task"], text["conversation"] or "api", user=text["user"] or "", adapter="api",
                delivery_id=text["delivery_id"] or None, hold=True)
            if submission.status != "held":
                code = {"duplicate": 200}.get(submission.status) or _REFUSED[submission.reason]
                return JSONResponse({"run_id": submission.run_id, "status": submission.status,
                                     "message": submission.message,
                                     **({"error": submission.message} if submission.status == "refused" else {})},
                                    status_code=code)
            async with uploads.receiving(self.scheduler, submission.run_id) as receiver:
                for part in files:
                    await receiver.add(part.filename or "file", _upload_chunks(part))
            if receiver.failure is not None:
                return JSONResponse({"run_id": submission.run_id, "status": "failed",
                                     "error": self.agent.storage.get_run(submission.run_id)["error"]},
                                    status_code=507 if isinstance(receiver.failure, NoRoom) else
                                    413 if isinstance(receiver.failure, uploads.InputRefused) else 500)
            if not receiver.released:  # cancelled or interrupted while its files were being stored
                run = self.agent.storage.get_run(submission.run_id)
                return JSONResponse({"run_id": submission.run_id, "status": run["status"], "error": run["error"]},
                                    status_code=409)
            return JSONResponse({"run_id": submission.run_id, "status": "queued", "message": receiver.note or "",
                                 "files": len(files), "url": self._link(submission.run_id)}, status_code=202)
        finally:
            await form.close()

    async def get_run(self, request: Request) -> JSONResponse:
        run = self.agent.storage.get_run(request.path_params["run_id"])
        if run is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        fields = ("id", "conversation", "task", "status", "answer", "error", "iterations", "user", "created_at",
                  "started_at", "finished_at")
        approvals = [{k: a[k] for k in ("number", "tool", "arguments", "status", "requested_at", "decided_by",
                                         "decided_at")} for a in self.agent.storage.approvals(run["id"])]
        ran_with = run_settings(run)
        cost = spend(self.agent.storage, prices_for(self.settings), run_id=run["id"])
        return JSONResponse({**{k: run[k] for k in fields}, "usage": self.agent.storage.usage(run["id"]),
                             "cost": cost.to_json(), "settings": ran_with.to_json() if ran_with else None,
                             "approvals": approvals, "url": run_url(self.settings, run)})

    async def decide(self, request: Request) -> JSONResponse:
        """Approve or deny a `confirm` tool call: body {"approve": true|false, "by": "who (for the log)"}. The API
        token's holder may decide any run's calls (it is the operator's)."""
        run_id, number = request.path_params["run_id"], request.path_params["number"]
        if self.agent.storage.get_run(run_id) is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("approve"), bool):
            return JSONResponse({"error": 'send {"approve": true} or {"approve": false}'}, status_code=400)
        by = str(body.get("by") or "").strip()[:80]
        decided = self.agent.approvals.decide(run_id, number, body["approve"], f"api:{by}" if by else "api")
        if not decided.ok:
            return JSONResponse({"error": decided.message}, status_code=409 if "Already" in decided.message else 404)
        return JSONResponse({"run_id": run_id, "number": number,
                             "decision": "approved" if body["approve"] else "denied"})

    async def cancel(self, request: Request) -> JSONResponse:
        status = await self.scheduler.cancel(request.path_params["run_id"])
        if status is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return JSONResponse({"run_id": request.path_params["run_id"], "status": status})

    async def usage(self, request: Request) -> JSONResponse:
        """Tokens and their cost of the runs of `user`, `conversation` and/or `scope` (all runs without them), of
        one calendar month with `month=YYYY-MM` (`month=` alone: this one). With `user` or `scope`, `month_budget`
        is this month against its budget (AUTOCODE_MONTHLY_BUDGET_PER_USER, the scope's setting)."""
        params = request.query_params
        filters = {name: params.get(name) for name in ("user", "conversation", "scope")}
        since = until = None
        if "month" in params:
            try:
                since, until = month_bounds(params["month"] or None)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        storage = self.agent.storage
        body: dict[str, Any] = {**storage.tokens_used(**filters, since=since, until=until),
                                **spend(storage, prices_for(self.settings), **filters, since=since,
                                        until=until).to_json()}
        if filters["user"]:
            body["month_budget"] = monthly_status(storage, self.settings, user=filters["user"]).to_json()
        elif filters["scope"]:
            budget = self.agent.channel_settings.effective_for_scope(filters["scope"]).budget_usd
            body["month_budget"] = monthly_status(storage, self.settings, scope=filters["scope"],
                                                  budget_usd=budget).to_json()
        return JSONResponse(body)

    def _scope(self, request: Request) -> str | None:
        """`?scope=` as given, or the scope of `?conversation=`."""
        scope, conversation = request.query_params.get("scope"), request.query_params.get("conversation")
        return scope or (scope_of(conversation) if conversation else None)

    async def get_settings(self, request: Request) -> JSONResponse:
        """`GET /api/settings?scope=…` (or `?conversation=…`): the effective settings, which of them the scope set,
        the text the run log shows, and what may be chosen."""
        scope = self._scope(request)
        if not scope:
            return JSONResponse({"error": "give ?scope=… (e.g. slack:T1:C1) or ?conversation=…"}, status_code=400)
        return self._settings_answer(self.agent.channel_settings.effective_for_scope(scope))

    async def change_settings(self, request: Request) -> JSONResponse:
        """`POST /api/settings?scope=…` with {"name": "model", "value": "gpt-4o"} to set one setting (the value as
        text, or of its type), or {"reset": true} / {"reset": "model"}; "by" names who (for the log). A bad name or
        value: 400 with the sentence for the user."""
        scope = self._scope(request)
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        reset = body.get("reset") if isinstance(body, dict) else None
        resetting = reset is True or isinstance(reset, str)
        if not scope or not isinstance(body, dict) or not (resetting or isinstance(body.get("name"), str)):
            return JSONResponse({"error": 'give ?scope=… and send {"name": "model", "value": "gpt-4o"} or '
                                 '{"reset": true}'}, status_code=400)
        by = f"api:{str(body.get('by') or '').strip()[:80]}".rstrip(":")
        store = self.agent.channel_settings
        try:
            if resetting:
                effective = store.reset(scope, None if reset is True else reset, by=by)
            else:
                effective = store.set(scope, body["name"], body.get("value"), by=by)
        except SettingError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return self._settings_answer(effective)

    def _settings_answer(self, effective: EffectiveSettings) -> JSONResponse:
        return JSONResponse({"scope": effective.scope, "settings": effective.to_json(), "text": effective.describe(),
                             "choices": self.agent.channel_settings.choices().to_json()})


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    for name in ("agent_core", "bots"):  # serve's start-up report (ready, adapters, LLM check) is INFO
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    server = Server(settings)
    uvicorn.run(server.app(), host=host, port=port, log_level="info", timeout_graceful_shutdown=None,
                lifespan="on")
