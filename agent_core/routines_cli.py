"""`autocode routines …` (agent_core/routines.py): add, list, show, pause, resume, rm, and run (fire now).

Routines live in the database, which serve's clock reads on every tick: add/pause/resume/rm change it directly.
`run` asks the serve that owns the database (POST /api/routines/ID/run, as `autocode cancel` does) so the run is
queued with the others; with no serve answering it runs here, in this process. Stored text is printed through
agent_core.terminal like every other command's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from agent_core import routines
from agent_core.config import ConfigError, Settings
from agent_core.routines import RoutineError
from agent_core.terminal import json_for_terminal, safe_for_terminal

EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("routines", help="tasks that run on their own schedule, re-using the code that worked")
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a routine from a run that succeeded (--from-run) or with a task")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-run", metavar="RUN_ID", help="repeat this run: its task, conversation and code")
    source.add_argument("--conversation", help="with a TASK: the conversation its runs post to")
    add.add_argument("--cron", required=True, metavar="EXPR", help='when: a cron expression, e.g. "0 9 * * 1"')
    add.add_argument("--tz", help="the IANA time zone the cron is read in (default $AUTOCODE_ROUTINE_TZ or UTC)")
    add.add_argument("--owner", default="", help="with a TASK: whose budget its runs spend")
    add.add_argument("--json", action="store_true")
    add.add_argument("task", nargs="?", help="with --conversation: the task (its first run plans it)")
    listing = actions.add_parser("list", help="every routine: schedule, next firing, state, plan version, last result")
    listing.add_argument("--json", action="store_true")
    for name, text in (("show", "one routine and its latest firings"), ("pause", "stop firing it"),
                       ("resume", "fire it again (from now on)"), ("rm", "remove it (its runs stay)"),
                       ("run", "fire it now (through serve when it runs, else here)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("routine_id")
        action.add_argument("--json", action="store_true")


def main(args: argparse.Namespace, settings: Settings) -> int:
    from storage.db import Storage

    if args.action == "run":
        return _run(args, settings)
    if (args.action != "add" or args.from_run) and not settings.db_path.exists():
        raise ConfigError(f"no database at {settings.db_path} (no routine yet, or set AUTOCODE_DB)")
    storage = Storage(settings.db_path)
    try:
        if args.action == "add":
            if args.from_run:
                routine = routines.create_from_run(storage, settings, args.from_run, args.cron, args.tz)
            else:
                if not args.task:
                    raise RoutineError('Give the task after the options: autocode routines add --conversation KEY '
                                       '--cron "0 9 * * *" "TASK".')
                routine = routines.create_with_task(storage, settings, args.conversation, args.task, args.cron,
                                                    args.tz, owner=args.owner)
            return _print(args, routines.describe(storage, routine), "added")
        if args.action == "list":
            listed = [routines.describe(storage, r) for r in storage.routines()]
            if args.json:
                print(json_for_terminal({"routines": listed}, indent=2))
            elif not listed:
                print("No routines.")
            for item in [] if args.json else listed:
                print(_line(item))
            return EXIT_OK
        if args.action == "show":
            from agent_core.routines_api import details

            routine = storage.get_routine(args.routine_id)
            if routine is None:
                raise RoutineError(f"There is no routine {args.routine_id}.")
            shown = details(storage, routine)
            if args.json:
                print(json_for_terminal(shown, indent=2))
                return EXIT_OK
            print(_line(shown))
            print(f"  task: {_field(shown['task'])}")
            print(f"  conversation {_field(shown['conversation'])}, owner {_field(shown['owner']) or '-'}, "
                  f"{shown['failures']} failed run(s) in a row")
            for firing in shown["firings"]:
                what = f"run {firing['run_id']} {firing['run_status']} (plan v{firing['plan_version'] or '-'})" \
                    if firing["run_id"] else f"skipped ({firing['outcome']}): {_field(firing['note'])}"
                print(f"  {(firing['fired_at'] or '')[:19]}  {what}")
            return EXIT_OK
        if args.action == "rm":
            routines.remove(storage, args.routine_id)
            if args.json:
                print(json_for_terminal({"id": args.routine_id, "removed": True}))
            else:
                print(f"routine {_field(args.routine_id)} removed")
            return EXIT_OK
        change = routines.pause if args.action == "pause" else routines.resume
        return _print(args, routines.describe(storage, change(storage, args.routine_id)), args.action + "d")
    except RoutineError as exc:
        print(f"autocode: {_field(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        storage.close()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Fire now: through serve when one answers at AUTOCODE_SERVER_URL (or 127.0.0.1:PORT), else in this process."""
    import httpx

    base = settings.server_url or f"http://127.0.0.1:{settings.port}"
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    try:
        response = httpx.post(f"{base}/api/routines/{args.routine_id}/run", headers=headers, timeout=30)
    except httpx.ConnectError:
        return asyncio.run(_run_here(args, settings))
    except httpx.HTTPError as exc:
        print(f"autocode: the server at {base} did not answer ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILED
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if args.json:
        print(json_for_terminal(body))
    elif response.status_code == 202:
        print(f"routine {_field(args.routine_id)}: run {_field(body.get('run_id'))} queued on the server")
    else:
        print(f"autocode: {_field(body.get('message') or body.get('error') or response.text[:200])}", file=sys.stderr)
    return EXIT_OK if response.status_code == 202 else EXIT_FAILED


async def _run_here(args: argparse.Namespace, settings: Settings) -> int:
    from agent_core.app import build_agent
    from agent_core.routine_clock import RoutineClock
    from agent_core.scheduler import RunScheduler

    if not settings.db_path.exists():
        raise ConfigError(f"no database at {settings.db_path} (no routine yet, or set AUTOCODE_DB)")
    settings.require_llm()
    agent = build_agent(settings)
    try:
        routine = agent.storage.get_routine(args.routine_id)
        if routine is None:
            print(f"autocode: There is no routine {_field(args.routine_id)}.", file=sys.stderr)
            return EXIT_FAILED

        # Submitted as serve's clock does (the owner's budgets), but run here: nothing dispatches it but us.
        scheduler = RunScheduler(agent)
        scheduler.accepting = True
        firing = routines.fire(agent.storage, routine, RoutineClock(scheduler).submit)
        if firing.run_id is None:
            print(f"autocode: {_field(firing.message)}", file=sys.stderr)
            return EXIT_FAILED
        result = await agent.execute(firing.run_id)
    finally:
        await agent.close()  # its MCP servers too
    if args.json:
        print(json_for_terminal(result.to_json(), ensure_ascii=False, indent=2))
    elif result.status == "succeeded":
        print(safe_for_terminal(result.answer))
    else:
        print(f"Run {result.run_id} {result.status}: {_field(result.error)}", file=sys.stderr)
    return EXIT_OK if result.status == "succeeded" else EXIT_FAILED


def _print(args: argparse.Namespace, item: dict[str, Any], verb: str) -> int:
    if args.json:
        print(json_for_terminal(item, indent=2))
    else:
        print(f"routine {verb}: {_line(item)}")
    return EXIT_OK


def _line(item: dict[str, Any]) -> str:
    last = item["last_result"]
    result = "-" if last is None else (f"run {last['run_id']} {last['status']}" if last["run_id"]
                                       else f"skipped ({last['outcome']})")
    version = f"plan v{item['plan_version']}" if item["plan_version"] else "no plan yet"
    return (f"{item['id']}  {item['state']:<6}  {_field(item['cron'])} ({_field(item['tz'])})  next "
            f"{_field(item['next_fire_local']) or '-'}  {version}  last: {_field(result)}  "
            f"{_field(item['task'])[:60]}")


def _field(text: object) -> str:
    return safe_for_terminal(text, single_line=True)
