"""serve's routines API (agent_core/routines.py): `GET/POST /api/routines`, `GET/DELETE /api/routines/{id}` and
`POST /api/routines/{id}/pause|resume|run` (run: fire now, through the run scheduler). A request the routines
module refuses (a bad cron, an unknown zone, a run that did not succeed) gets 400 and its sentence."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent_core import routines
from agent_core.routine_clock import RoutineClock
from agent_core.routines import RoutineError

Guard = Callable[[Callable[[Request], Awaitable[JSONResponse]]], Any]


def details(storage: Any, routine: dict[str, Any]) -> dict[str, Any]:
    """A routine as `show` tells it: its description and latest firings."""
    return {**routines.describe(storage, routine),
            "firings": [{k: f[k] for k in ("run_id", "outcome", "run_status", "plan_version", "scheduled_for",
                                           "fired_at", "note")} for f in storage.routine_runs(routine["id"])]}


class RoutinesAPI:
    def __init__(self, clock: RoutineClock):
        self.clock = clock
        self.storage = clock.storage
        self.settings = clock.settings

    def routes(self, guarded: Guard) -> list[Route]:
        return [
            Route("/api/routines", guarded(self.list), methods=["GET"]),
            Route("/api/routines", guarded(self.create), methods=["POST"]),
            Route("/api/routines/{routine_id}", guarded(self.show), methods=["GET"]),
            Route("/api/routines/{routine_id}", guarded(self.remove), methods=["DELETE"]),
            Route("/api/routines/{routine_id}/{action:str}", guarded(self.act), methods=["POST"]),
        ]

    async def list(self, request: Request) -> JSONResponse:
        return JSONResponse({"routines": [routines.describe(self.storage, r) for r in self.storage.routines()]})

    async def create(self, request: Request) -> JSONResponse:
        """{"from_run": ID, "cron": "0 9 * * 1", "tz": "Europe/Rome"} or {"conversation": KEY, "task": TEXT,
        "cron": …, "tz": …, "owner": …}."""
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("cron"), str) or not all(
                isinstance(body.get(k), (str, type(None))) for k in ("from_run", "conversation", "task", "tz", "owner")):
            return _error('send {"from_run": RUN_ID, "cron": "0 9 * * *", "tz": "Europe/Rome"} or '
                          '{"conversation": KEY, "task": TEXT, "cron": …}')
        try:
            if body.get("from_run"):
                routine = routines.create_from_run(self.storage, self.settings, body["from_run"], body["cron"],
                                                   body.get("tz"))
            else:
                routine = routines.create_with_task(self.storage, self.settings, body.get("conversation") or "",
                                                    body.get("task") or "", body["cron"], body.get("tz"),
                                                    owner=body.get("owner") or "", adapter="api")
        except RoutineError as exc:
            return _error(str(exc))
        return JSONResponse(routines.describe(self.storage, routine), status_code=201)

    async def show(self, request: Request) -> JSONResponse:
        routine = self.storage.get_routine(request.path_params["routine_id"])
        if routine is None:
            return JSONResponse({"error": "no such routine"}, status_code=404)
        return JSONResponse(details(self.storage, routine))

    async def remove(self, request: Request) -> JSONResponse:
        if not self.storage.delete_routine(request.path_params["routine_id"]):
            return JSONResponse({"error": "no such routine"}, status_code=404)
        return JSONResponse({"id": request.path_params["routine_id"], "removed": True})

    async def act(self, request: Request) -> JSONResponse:
        routine_id, action = request.path_params["routine_id"], request.path_params["action"]
        routine = self.storage.get_routine(routine_id)
        if routine is None:
            return JSONResponse({"error": "no such routine"}, status_code=404)
        if action == "pause":
            return JSONResponse(routines.describe(self.storage, routines.pause(self.storage, routine_id)))
        if action == "resume":
            return JSONResponse(routines.describe(self.storage, routines.resume(self.storage, routine_id)))
        if action == "run":
            firing = routines.fire(self.storage, routine, self.clock.submit)
            code = {"started": 202, "overlap": 409}.get(firing.outcome, 429)
            return JSONResponse({"id": routine_id, "run_id": firing.run_id, "outcome": firing.outcome,
                                 "message": firing.message}, status_code=code)
        return JSONResponse({"error": f"unknown action {action!r}: pause, resume or run"}, status_code=404)


def _error(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)
