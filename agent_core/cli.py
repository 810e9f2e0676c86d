"""The `autocode` command line: run, chat, history, show, serve, worker, cancel, usage, settings, routines, doctor.

What a run produced (answers, errors, tracebacks, stdout/stderr, outputs, tool and artifact names, evaluator
text) is untrusted: it is printed through `agent_core.terminal` (`_field` for text inside one of our lines,
`_block` for multi-line text, `json_for_terminal` for --json), never raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from agent_core.config import ConfigError, Settings, load_dotenv_file
from agent_core.routines_cli import add_parser as add_routines_parser
from agent_core.sandbox import SandboxUnavailable
from agent_core.terminal import json_for_terminal, safe_for_terminal
from storage.db import StorageRefused
from tools.registry import ToolError

EXIT_OK, EXIT_UNSATISFACTORY, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autocode", description="AutoCode: an AI code agent for teams.")
    parser.add_argument("--db", type=Path, help="SQLite file (default $AUTOCODE_DB or ./autocode.db)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one task and print the answer")
    run.add_argument("task")
    run.add_argument("--conversation", help="conversation key: follow-ups given the same key see its history and "
                     "files (default: a new conversation each run)")
    run.add_argument("--tools", type=Path, help="Python file defining TOOLS = [...] (default $AUTOCODE_TOOLS)")
    run.add_argument("--max-iterations", type=int, help="plan/repair iterations (default 3)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.add_argument("--yes", action="store_true",
                     help='approve every call of a "confirm" tool (otherwise each is asked for on the terminal)')
    run.add_argument("--file", type=Path, action="append", default=[], metavar="PATH",
                     help="a file for the task (repeatable): the steps read it as inputs/NAME")
    run.add_argument("--save-to", type=Path, metavar="DIR", help="save the files the run made into DIR")

    chat = sub.add_parser("chat", help="a console conversation with live progress")
    chat.add_argument("--conversation", default="console")
    chat.add_argument("--tools", type=Path)
    chat.add_argument("--max-iterations", type=int)

    history = sub.add_parser("history", help="recent runs, or one conversation's messages")
    history.add_argument("--conversation")
    history.add_argument("--limit", type=int, default=20)

    show = sub.add_parser("show", help="everything about one run")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--save-artifacts", type=Path, metavar="DIR", help="write the run's files into DIR")

    serve = sub.add_parser("serve", help="run the server: chat adapters, run scheduler and sandbox pool")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, help="default $PORT or 3000")
    serve.add_argument("--tools", type=Path)

    worker = sub.add_parser("worker", help="run sandboxed steps for `autocode serve` (needs AUTOCODE_REDIS_URL)")
    worker.add_argument("--concurrency", type=int, help="jobs at once (default AUTOCODE_SANDBOX_SLOTS)")
    worker.add_argument("--name", help="worker name shown in logs and step records (default autocode<pid>@host)")
    worker.add_argument("--tools", type=Path)

    cancel = sub.add_parser("cancel", help="cancel a queued or running run (asks the running server)")
    cancel.add_argument("run_id")

    usage = sub.add_parser("usage", help="LLM token usage and its cost per user, conversation or channel")
    usage.add_argument("--user")
    usage.add_argument("--conversation")
    usage.add_argument("--scope", help="a channel or chat (e.g. slack:T1:C1), see `autocode settings`")
    period = usage.add_mutually_exclusive_group()
    period.add_argument("--days", type=float, help="only the last N days")
    period.add_argument("--month", nargs="?", const="", metavar="YYYY-MM",
                        help="only one calendar month (UTC), this one without a value")
    usage.add_argument("--by", choices=("user", "scope", "conversation"), help="one line per user, scope or "
                       "conversation, most expensive first")
    usage.add_argument("--json", action="store_true")

    channel = sub.add_parser("settings", help="a channel's or chat's settings: model, iterations, tools, network, "
                             "monthly budget")
    where = channel.add_mutually_exclusive_group()
    where.add_argument("--conversation", help="a conversation key: the settings of its channel or chat")
    where.add_argument("--scope", help="a scope (slack:TEAM:CHANNEL, telegram:CHAT, or a conversation key)")
    channel.add_argument("--tools", type=Path, help="the tools file (default $AUTOCODE_TOOLS): the tool names")
    channel.add_argument("--json", action="store_true")
    channel.add_argument("action", nargs="?", choices=("show", "set", "reset"), default="show")
    channel.add_argument("name", nargs="?", help="set/reset: model, max_iterations, tools, network, budget or instructions")
    channel.add_argument("value", nargs="?", help="set: the value, e.g. gpt-4o, 5, off, 12.50, none, all, numpy,llm "
                         "(only these tools), or changes after --: set tools -- -geocode,+pandas")

    add_routines_parser(sub)  # agent_core/routines_cli.py

    doctor = sub.add_parser("doctor", help="check the configuration and which sandbox protections are active")
    doctor.add_argument("--tools", type=Path)
    doctor.add_argument("--json", action="store_true")

    mcp = sub.add_parser("mcp", help="the MCP servers of the tools file: show them, accept what a server offers")
    mcp.add_argument("action", choices=["show", "accept"])
    mcp.add_argument("server", nargs="?", help="accept: the server whose tools to pin (review `show` first)")
    mcp.add_argument("--tools", type=Path, help="the tools file (default $AUTOCODE_TOOLS)")
    mcp.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `autocode` command. Output cut short by its reader (`autocode show RUN | head -2`) ends quietly, with
    the status a program killed by SIGPIPE has, not a BrokenPipeError traceback."""
    try:
        code = _command(argv)
        sys.stdout.flush()  # inside the try: a pipe closed under buffered output fails here, not at exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 128 + 13


def _command(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    load_dotenv_file()
    try:
        settings = Settings.from_env().with_overrides(
            db_path=args.db,
            tools_file=getattr(args, "tools", None),
            max_iterations=getattr(args, "max_iterations", None),
        )
        if args.command in ("run", "chat"):
            return asyncio.run(_run_or_chat(args, settings))
        if args.command == "doctor":
            return asyncio.run(_doctor(args, settings))
        if args.command == "mcp":
            return asyncio.run(_mcp(args, settings))
        if args.command == "serve":
            from agent_core.server import serve

            settings.require_llm()
            serve(settings, args.host, args.port or settings.port)
            return EXIT_OK
        if args.command == "worker":
            from agent_core.jobs import run_worker

            if not settings.redis_url:
                raise ConfigError("`autocode worker` needs AUTOCODE_REDIS_URL (e.g. redis://localhost:6379/0), the "
                                  "same as `autocode serve` uses")
            logging.getLogger("agent_core").setLevel(logging.INFO)
            run_worker(settings, args.concurrency, args.name)
            return EXIT_OK
        if args.command == "cancel":
            return _cancel(args, settings)
        if args.command == "usage":
            return _usage(args, settings)
        if args.command == "settings":
            return _settings(args, settings)
        if args.command == "routines":
            from agent_core.routines_cli import main as routines_main

            return routines_main(args, settings)
        return _history(args, settings) if args.command == "history" else _show(args, settings)
    except (ConfigError, ToolError, SandboxUnavailable, StorageRefused) as exc:
        print(f"autocode: {_block(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


async def _run_or_chat(args: argparse.Namespace, settings: Settings) -> int:
    from agent_core.app import build_agent
    from agent_core.outputs import files_report, run_link, save_files
    from bots.console import ConsoleApprovals, ConsoleRenderer, chat

    from agent_core.workspace import InputRefused, Workspace, run_with_files

    if args.command == "run" and not args.task.strip():  # before anything starts: no run, no LLM call
        print('autocode: the task is empty; say what to do, e.g. autocode run "Plot sales.csv by month"',
              file=sys.stderr)
        return EXIT_CONFIG
    settings.require_llm()
    agent = build_agent(settings)
    try:
        if args.command == "chat":
            return await chat(agent, args.conversation)
        if args.conversation is None:  # a one-off task: nothing of earlier runs leaks into it, nor it into them
            args.conversation = f"console:run-{secrets.token_hex(4)}"
        files = getattr(args, "file", None) or []
        if files:  # over a limit: the user is told, and nothing runs
            try:
                Workspace(agent.storage, settings).admit(args.conversation, files)
            except InputRefused as exc:
                print(f"autocode: {_field(exc)}", file=sys.stderr)
                return EXIT_CONFIG
        if args.yes:
            agent.approvals.approve_all_as = "console (--yes)"
        else:  # before the renderer: a prompt left unanswered ends its line before the decision is printed
            agent.events.subscribe(ConsoleApprovals(agent))
        if not args.json:
            agent.events.subscribe(ConsoleRenderer(sys.stderr))
        if files:
            result = await run_with_files(agent, args.task, args.conversation, files)
        else:
            result = await agent.run(args.task, args.conversation)
        saved, unsaved = None, None
        if args.save_to:
            try:
                saved = save_files(agent.storage, result.run_id, args.save_to)
            except OSError as exc:  # the run's files stay stored with it: say so, and where to get them later
                unsaved = f"could not save the run's files into {args.save_to}: {exc.strerror or exc}"
        link = run_link(settings, agent.storage, result.run_id)
    finally:
        await agent.close()
    if args.json:
        print(json_for_terminal({**result.to_json(), "url": link,
                                 **({"saved": [str(path) for path in saved]} if saved is not None else {})},
                                ensure_ascii=False, indent=2))
    elif result.status == "succeeded":
        print(_block(result.answer))
        if result.unsupported:
            print(f"· warning: not found in any step's output: {_field(', '.join(result.unsupported))}",
                  file=sys.stderr)
    else:
        print(f"Run {result.run_id} {result.status}: {_field(result.error)}", file=sys.stderr)
        if result.answer:
            print(_block(result.answer))
    if not args.json:  # after the answer: what the run made and where it is
        for line in files_report(result.run_id, result.artifacts, saved, link):
            print(line, file=sys.stderr)
    if unsaved:
        print(f"autocode: {_field(unsaved)}", file=sys.stderr)
        return EXIT_UNSATISFACTORY
    return EXIT_OK if result.status == "succeeded" else EXIT_UNSATISFACTORY


def _open_storage(settings: Settings):
    from storage.db import Storage

    if not settings.db_path.exists():
        raise ConfigError(f"no database at {settings.db_path} (nothing has run yet, or set AUTOCODE_DB)")
    return Storage(settings.db_path)


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    base = settings.server_url or f"http://127.0.0.1:{settings.port}"
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    try:
        response = httpx.post(f"{base}/api/runs/{args.run_id}/cancel", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"autocode: cannot reach the server at {base} ({type(exc).__name__}); is `autocode serve` running? "
              "(AUTOCODE_SERVER_URL)", file=sys.stderr)
        return EXIT_CONFIG
    if response.status_code == 404:
        print(f"autocode: no run {args.run_id}", file=sys.stderr)
        return EXIT_UNSATISFACTORY
    if response.status_code != 200:
        print(f"autocode: the server answered {response.status_code}: {_field(response.text[:200])}",
              file=sys.stderr)
        return EXIT_UNSATISFACTORY
    print(f"run {_field(args.run_id)}: {_field(response.json()['status'])}")
    return EXIT_OK


def _usage(args: argparse.Namespace, settings: Settings) -> int:
    """Tokens and their cost (agent_core/pricing.py) of the runs that match, in a period; with --by, per group."""
    from datetime import datetime, timedelta, timezone

    from agent_core.budget import monthly_status
    from agent_core.pricing import format_usd, month_bounds, prices_for, spend, spend_by

    since = until = None
    period = ""
    if args.days:
        since = (datetime.now(timezone.utc) - timedelta(days=args.days)).isoformat(timespec="milliseconds")
        period = f", last {args.days:g} days"
    elif args.month is not None:
        try:
            since, until = month_bounds(args.month or None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        period = f", {since[:7]}"
    storage, prices = _open_storage(settings), prices_for(settings)
    if args.by:
        groups = spend_by(storage, prices, args.by, since=since, until=until)
        if args.json:
            print(json_for_terminal({key: {"llm_calls": cost.llm_calls, "prompt_tokens": cost.prompt_tokens,
                                           "completion_tokens": cost.completion_tokens, **cost.to_json()}
                                     for key, cost in groups.items()}))
            return EXIT_OK
        print(f"LLM use by {args.by}{period}:" if groups else f"No LLM use{period}.")
        for key, cost in groups.items():
            print(f"  {_field(key) or '-'}: {cost.llm_calls} LLM calls, {cost.prompt_tokens} prompt + "
                  f"{cost.completion_tokens} completion tokens, cost {_field(cost.describe())}")
        return EXIT_OK
    filters = {"user": args.user, "conversation": args.conversation, "scope": args.scope}
    usage = storage.tokens_used(**filters, since=since, until=until)
    cost = spend(storage, prices, **filters, since=since, until=until)
    if args.json:
        print(json_for_terminal({**usage, **cost.to_json()}))
        return EXIT_OK
    scope = " ".join(f"{k} {v}" for k, v in filters.items() if v)
    scope = _field(scope) or "all users"
    print(f"{scope}{period}: {usage['runs']} runs, "
          f"{usage['llm_calls']} LLM calls, {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
          f"completion tokens; cost {_field(cost.describe())}")
    for model in cost.by_model:
        print(f"  {_field(model.model) or '-'}: {model.llm_calls} calls, {model.prompt_tokens} prompt + "
              f"{model.completion_tokens} completion tokens, {format_usd(model.usd) if model.priced else 'no price'}")
    if args.user and settings.monthly_budget_per_user:
        print(f"This month: {_field(monthly_status(storage, settings, user=args.user).describe())} "
              "(AUTOCODE_MONTHLY_BUDGET_PER_USER)")
    return EXIT_OK


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    """Show, set or reset a scope's settings (agent_core/channel_settings.py); a bad value exits 1 with the reason."""
    import tempfile

    from agent_core.channel_settings import ChannelSettings, scope_of
    from storage.db import Storage
    from tools.registry import build_toolset

    scope = args.scope or scope_of(args.conversation or "console")
    if args.action == "set" and (args.name is None or args.value is None):
        raise ConfigError("give the setting and its value: autocode settings [--scope S | --conversation K] set "
                          "NAME VALUE, e.g. set model gpt-4o")
    toolset = build_toolset(settings.tools_file)
    with tempfile.TemporaryDirectory(prefix="autocode-settings-") as empty:
        # Nothing stored yet: `show` prints the server's defaults without making a database file.
        fresh = args.action == "show" and not settings.db_path.exists()
        storage = Storage(Path(empty, "none.db") if fresh else settings.db_path)
        return _settings_in(args, ChannelSettings(storage, settings, toolset), scope)


def _settings_in(args: argparse.Namespace, store: Any, scope: str) -> int:
    """`autocode settings` on an open store (a ChannelSettings); closes its database."""
    from agent_core.channel_settings import SettingError

    storage = store.storage
    try:
        if args.action == "set":
            effective = store.set(scope, args.name, args.value, by="cli")
        elif args.action == "reset":
            effective = store.reset(scope, args.name, by="cli")
        else:
            effective = store.effective_for_scope(scope)
    except SettingError as exc:
        print(f"autocode: {_field(exc)}", file=sys.stderr)
        return EXIT_UNSATISFACTORY
    finally:
        storage.close()
    if args.json:
        print(json_for_terminal({"settings": effective.to_json(), "text": effective.describe(),
                                 "choices": store.choices().to_json()}, indent=2))
        return EXIT_OK
    print(f"Settings of {_field(scope)}: {_field(effective.describe())}")
    if effective.overridden:
        print(f"  set here: {', '.join(effective.overridden)} (the others are the server's defaults)")
    choices = store.choices()
    print(f"  models: {_field(', '.join(choices.models))}; tools: {_field(', '.join(choices.tools))}; "
          f"iterations {choices.max_iterations[0]}-{choices.max_iterations[1]}; network "
          f"{'may be on' if choices.network_allowed else 'off for all runs (AUTOCODE_SANDBOX_NETWORK)'}")
    return EXIT_OK


def _history(args: argparse.Namespace, settings: Settings) -> int:
    storage = _open_storage(settings)
    if args.conversation:
        messages = storage.recent_messages(args.conversation, max_chars=10**9)[-args.limit:]
        if not messages:
            print(f"No messages in conversation {_field(args.conversation)} (it is new, or was cleared with /reset).")
        for message in messages:
            who = "you" if message["role"] == "user" else "autocode"
            print(f"{message['created_at'][:19]}  {who:>8}  [{message['run_id']}]  {_block(message['text'])}")
        _print_workspace(storage, settings, args.conversation)
    else:
        for run in storage.list_runs(limit=args.limit):
            print(f"{run['id']}  {run['created_at'][:19]}  {run['status']:<9}  {_field(run['conversation']):<16}  "
                  f"{_one_line(run['task'], 70)}")
    return EXIT_OK


def _print_workspace(storage: Any, settings: Settings, conversation: str) -> None:
    """The conversation's files (its workspace): name, size, where each came from."""
    from agent_core.workspace import Workspace

    workspace = Workspace(storage, settings)
    files = workspace.listing(conversation)
    if not files:
        return
    print(f"Files ({workspace.usage(conversation)} bytes of {settings.workspace_mb} MB; the next run finds them "
          "under inputs/):")
    for row in files:
        print(f"  inputs/{_field(row['name'])}  {row['size']} bytes  {_field(row['origin'])}  {row['created_at'][:19]}")


def _one_line(text: str | None, limit: int) -> str:
    text = " ".join(_field(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_details(storage: Any, run_id: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """Everything stored about a run; with `settings`, its cost too (priced by the operator's price table)."""
    from agent_core.channel_settings import run_settings
    from agent_core.pricing import prices_for, spend

    run = storage.get_run(run_id)
    if run is None:
        return None
    decode = lambda text: None if text is None else json.loads(text)  # noqa: E731
    ran_with = run_settings(run)
    return {
        "run": {**{k: v for k, v in run.items() if k not in ("plan_json", "settings_json")},
                "plan": decode(run["plan_json"])},
        "settings": ran_with.to_json() if ran_with else None,
        "cost": spend(storage, prices_for(settings), run_id=run_id).to_json() if settings else None,
        "steps": [{**{k: v for k, v in s.items() if k != "output_json"}, "output": decode(s["output_json"])}
                  for s in storage.steps(run_id)],
        "evaluations": [{**{k: v for k, v in e.items() if k != "evaluation_json"},
                         "evaluation": decode(e["evaluation_json"])} for e in storage.evaluations(run_id)],
        "llm_calls": storage.llm_calls(run_id),
        "usage": storage.usage(run_id),
        "artifacts": storage.artifacts(run_id),
        "approvals": storage.approvals(run_id),
        "mcp_calls": storage.mcp_calls(run_id),
    }


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from agent_core.channel_settings import EffectiveSettings
    from agent_core.pricing import prices_for, spend

    from agent_core.answer_check import stored_unsupported
    from agent_core.outputs import run_link, save_files

    storage = _open_storage(settings)
    details = run_details(storage, args.run_id, settings)
    if details is None:
        print(f"autocode: no run {args.run_id}", file=sys.stderr)
        return EXIT_UNSATISFACTORY
    details["url"] = run_link(settings, storage, args.run_id)  # the run page (AUTOCODE_PUBLIC_URL), or None
    if args.json:
        print(json_for_terminal(details, ensure_ascii=False, indent=2))
        return EXIT_OK
    run = details["run"]
    print(f"Run {run['id']} · {run['status']} · conversation {_field(run['conversation'])} · "
          f"{run['iterations']} iteration(s)")
    if run.get("routine_id"):
        print(f"Routine {_field(run['routine_id'])}, plan version {run['plan_version'] or '- (planned)'}")
    if details["settings"] is not None:  # what the run ran with (its channel's settings)
        print(f"Settings: {_field(EffectiveSettings.from_json(details['settings']).describe())}")
    print(f"Task: {_block(run['task'])}")
    if run["answer"]:
        print(f"Answer: {_block(run['answer'])}")
    unsupported = stored_unsupported(run)
    if unsupported:
        print(f"Warning: numbers of the answer not found in any step's output: {_field(', '.join(unsupported))}")
    if run["error"]:
        print(f"Error: {_field(run['error'])}")
    if details["url"]:
        print(f"Run page: {_field(details['url'])}")
    for iteration in sorted({s["iteration"] for s in details["steps"]} | {e["iteration"] for e in details["evaluations"]}):
        print(f"\n=== Iteration {iteration}")
        for step in (s for s in details["steps"] if s["iteration"] == iteration):
            print(f"--- [{step['position'] + 1}] {_field(step['tool_name'])}: {step['status']} "
                  f"({step['duration_ms']} ms)")
            print(_indent(step["code"]))
            if step["output"] is not None:
                print("  output: " + _one_line(json.dumps(step["output"], ensure_ascii=False), 500))
            for name in ("stdout", "stderr"):
                if (step[name] or "").strip():
                    print(f"  {name}:\n" + _indent(step[name].rstrip(), 4))
            if step["error"]:
                print(f"  error: {_field(step['error'])}")
            if step["traceback"]:
                print(_indent(step["traceback"].rstrip(), 4))
        for evaluation in (e for e in details["evaluations"] if e["iteration"] == iteration):
            verdict = "satisfactory" if evaluation["satisfactory"] else f"retry from {evaluation['retry_from'] or '-'}"
            print(f"--- evaluator: {_field(verdict)}. {_field(evaluation['thoughts'])}")
    if details["approvals"]:
        print("\nApprovals:")
        for approval in details["approvals"]:
            who = f" by {_field(approval['decided_by'])}" if approval["decided_by"] else ""
            print(f"  #{approval['number']} {_field(approval['arguments'])}: {approval['status']}{who} "
                  f"({approval['decided_at'] or 'waiting'})")
    print("\nLLM calls:")
    for call in details["llm_calls"]:
        error = f"  error: {_field(call['error'])}" if call["error"] else ""
        print(f"  {call['purpose']:<9} it={call['iteration'] or '-'}  {_field(call['model'])}  "
              f"{call['response_format']:<11} "
              f"{call['duration_ms']:>6} ms  {call['prompt_tokens']}+{call['completion_tokens']} tokens{error}")
    usage = details["usage"]
    print(f"Total: {usage['llm_calls']} calls, {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
          f"completion tokens; cost {_field(spend(storage, prices_for(settings), run_id=run['id']).describe())}")
    helper_calls = [c for c in details["llm_calls"] if c["purpose"] == "helper"]
    if helper_calls:  # what generated code sent out through llm(); stored clipped, in full in --json
        print("\nllm() calls (prompt, system text and reply as stored; --json has the stored text):")
        for number, call in enumerate(helper_calls, 1):
            print(f"  [{number}] it={call['iteration'] or '-'}  prompt ({call['prompt_chars'] or 0} chars): "
                  f"{_field(_one_line(call['prompt_text'], 160))}")
            if call["system_chars"]:
                print(f"      system ({call['system_chars']} chars): {_field(_one_line(call['system_text'], 160))}")
            print(f"      reply ({call['response_chars'] or 0} chars): {_field(_one_line(call['reply_text'], 160))}")
    if details["mcp_calls"]:  # what steps sent to MCP servers and got back; stored clipped, in full in --json
        print("\nMCP tool calls (arguments and result as stored; --json has the stored text):")
        for number, call in enumerate(details["mcp_calls"], 1):
            outcome = "ok" if call["ok"] else f"error: {_field(_one_line(call['error'] or '', 160))}"
            print(f"  [{number}] it={call['iteration'] or '-'}  {_field(call['server'])}.{_field(call['tool'])}  "
                  f"{call['duration_ms']} ms  {outcome}")
            print(f"      arguments ({call['arguments_chars'] or 0} chars): "
                  f"{_field(_one_line(call['arguments'] or '', 160))}")
            if call["ok"]:
                print(f"      result ({call['result_chars'] or 0} chars): "
                      f"{_field(_one_line(call['result_text'] or '', 160))}")
    if details["artifacts"]:
        print("Artifacts: " + ", ".join(f"{_field(a['name'])} ({_field(a['mime'])}, {a['size']} bytes)"
                                        for a in details["artifacts"]))
    if args.save_artifacts:
        expired: list[str] = []
        for path in save_files(storage, run["id"], args.save_artifacts, expired):
            print(f"saved {_field(path)}")
        for name in expired:
            print(f"not kept any more (AUTOCODE_WORKSPACE_DAYS): {_field(name)}")
    return EXIT_OK


async def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Configuration, LLM and sandbox report: asks the LLM endpoint (reachability, the model, the structured-output
    mode; agent_core.llm_probe), then starts one sandbox and runs a trivial step to prove it works. Exit 1 when
    either would not work."""
    from agent_core.llm_probe import probe_llm
    from agent_core.sandbox.pool import SandboxExecutor
    from agent_core.sandbox import Limits, StepRequest
    from tools.registry import build_toolset

    llm_check = await probe_llm(settings)
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "database": str(settings.db_path.resolve()),
        "llm": {"configured": settings.llm_configured, "api_key": "set" if settings.openai_api_key else "not set",
                **llm_check.to_json()},
    }
    from agent_core.mcp_doctor import mcp_report, print_report

    toolset = build_toolset(settings.tools_file, settings.mcp_result_kb)
    try:
        report["mcp"] = await mcp_report(toolset)
    finally:
        if toolset.mcp_host is not None:
            await toolset.mcp_host.close()
    report["tools"] = {"libraries": toolset.libraries, "trusted functions": toolset.trusted_names}
    executor = SandboxExecutor.from_settings(settings)
    ok = True
    try:
        sandbox = await executor.open("doctor")
        try:
            probe = await sandbox.run_step(StepRequest(
                code="def check():\n    import os\n    return {'uid': os.getuid(), 'cwd': os.getcwd()}",
                function="check", input=None, limits=Limits(timeout_s=20)))
        finally:
            await sandbox.close()
        ok = probe.ok and probe.output is not None and (probe.output["uid"] != 0 or os.geteuid() != 0)
        report["sandbox_check"] = probe.output if probe.ok else probe.error
    except SandboxUnavailable as exc:
        ok, report["sandbox_check"] = False, str(exc)
    finally:
        await executor.stop()
    report["sandbox"] = executor.describe()
    verdict = EXIT_OK if ok and llm_check.ok else EXIT_UNSATISFACTORY
    if args.json:
        print(json_for_terminal(report, indent=2))
        return verdict
    sandbox_info = report["sandbox"]
    print(f"Python {report['python']}; database {report['database']}")
    _print_llm_check(llm_check, report["llm"]["api_key"])
    print(f"Tools: libraries {', '.join(toolset.libraries) or '-'}; trusted functions {', '.join(toolset.trusted_names)}")
    print_report(report["mcp"])
    print(f"Sandbox backend: {sandbox_info['backend']}"
          + (f" (fallback: {sandbox_info['fallback_reason']})" if sandbox_info["fallback_reason"] else ""))
    for protection in sandbox_info["protections"]:
        print(f"  {'!' if protection.startswith('NO ') else '+'} {protection}")  # "!": missing on this host
    print(f"Sandbox check: {'ok' if ok else 'FAILED'} — {report['sandbox_check']}")
    return verdict


async def _mcp(args: argparse.Namespace, settings: Settings) -> int:
    """`autocode mcp show` (the servers as doctor lists them) and `autocode mcp accept SERVER` (pin its tools)."""
    from agent_core.mcp_doctor import accept, mcp_report, print_report
    from tools.registry import build_toolset

    toolset = build_toolset(settings.tools_file, settings.mcp_result_kb)
    host = toolset.mcp_host
    if host is None:
        print("autocode: the tools file declares no MCP server (an entry {\"mcp\": NAME, \"command\": [...]} or "
              "{\"mcp\": NAME, \"url\": ...}; see the README's Tools section)", file=sys.stderr)
        return EXIT_UNSATISFACTORY
    try:
        if args.action == "accept":
            if not args.server:
                raise ConfigError("give the server to accept: autocode mcp accept SERVER")
            done, sentence = await accept(host, args.server)
            print(_field(sentence), file=sys.stdout if done else sys.stderr)
            return EXIT_OK if done else EXIT_UNSATISFACTORY
        report = await mcp_report(toolset)
        if args.json:
            print(json_for_terminal(report, indent=2))
            return EXIT_OK if all(entry["connected"] for entry in report) else EXIT_UNSATISFACTORY
        return EXIT_OK if print_report(report) else EXIT_UNSATISFACTORY
    finally:
        await host.close()


def _print_llm_check(check: Any, api_key: str) -> None:
    """The doctor's LLM lines (an agent_core.llm_probe.ProbeResult). Server messages are untrusted text."""
    print(f"LLM: {_field(check.base_url)}, model {_field(check.model)}, API key {api_key}")
    if check.latency_ms is not None:
        print(f"  + reachable: the server answered in {check.latency_ms} ms")
    if check.model_listed:
        print(f"  + model {_field(check.model)} is listed by the server")
    elif check.model_listed is False and check.ok:
        print(f"  ! model {_field(check.model)} is not listed by the server")
    if check.structured_output:
        print(f"  {'+' if check.structured_output != 'text' else '!'} structured output: {check.structured_output} "
              f"(a test request took {check.request_ms} ms)")
    for note in check.notes:
        print(f"  ! {_field(note)}")
    print("LLM check: ok" if check.ok else f"LLM check: FAILED — {_field(check.problem)}")


def _indent(text: str | None, spaces: int = 4) -> str:
    """Untrusted multi-line text (code, stdout, a traceback), made safe, every line indented under its heading."""
    pad = " " * spaces
    return "\n".join(pad + line for line in _block(text).splitlines())


def _field(text: object) -> str:
    """Untrusted text placed inside one of our lines: no control characters, no line breaks."""
    return safe_for_terminal(text, single_line=True)


def _block(text: object) -> str:
    """Untrusted text printed as lines of its own (an answer, a message): no control characters."""
    return safe_for_terminal(text)


if __name__ == "__main__":
    sys.exit(main())
