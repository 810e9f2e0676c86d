"""Routines (agent_core/routines.py) from a chat: Slack's `/autocode routines [pause|resume|rm ID]` and Telegram's
`/routines [pause|resume|rm ID]`, one platform-neutral reply each.

A channel's or chat's routines are those whose conversation belongs to its scope (agent_core/channel_settings.py's
`scope_of`). Everyone there may list them; only a routine's owner or an AutoCode admin (SLACK_ADMIN_USERS,
TELEGRAM_ADMIN_USERS, bots/permissions.py) may pause, resume or remove one. Task text is the user's: the adapter
passes its own `escape` for its markup.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from agent_core import routines
from agent_core.channel_settings import scope_of
from agent_core.routines import RoutineError
from bots.permissions import may_act_on_run
from storage.db import Storage

ACTIONS = ("pause", "resume", "rm")
LIST_MAX = 20  # lines of a listing (AUTOCODE_ROUTINES_PER_CHANNEL is 20 by default)


def is_routines_command(words: list[str]) -> bool:
    """`routines`, `routines list`, `routines pause|resume|rm …` (anything else is a task)."""
    return bool(words) and words[0].lower() == "routines" and (
        len(words) == 1 or words[1].lower() in ("list", *ACTIONS))


def reply(storage: Storage, scope: str, words: list[str], *, actor: str, actor_id: str, admins: Collection[str],
          command: str, escape: Callable[[str], str] = lambda text: text) -> str:
    """The reply to `routines …` (words as `is_routines_command` accepted them) in `scope`, by `actor` (the user key
    runs store, e.g. "slack:T1:U1") whose platform id is `actor_id`."""
    if len(words) < 2 or words[1].lower() == "list":
        return listing(storage, scope, command, escape)
    if len(words) != 3:
        return f"Give one routine's id: {command} {words[1].lower()} ID ({command} lists them)."
    action, routine_id = words[1].lower(), words[2]
    routine = storage.get_routine(routine_id)
    if routine is None or scope_of(routine["conversation"]) != scope:
        return f"There is no routine {escape(routine_id)} here; {command} lists this channel's routines."
    if not may_act_on_run(routine["owner"], actor, actor_id, admins):
        return f"Only the routine's owner or an AutoCode admin can {'remove' if action == 'rm' else action} it."
    try:
        if action == "rm":
            routines.remove(storage, routine_id)
            return f"Routine {escape(routine_id)} removed; its runs stay in the history."
        changed = (routines.pause if action == "pause" else routines.resume)(storage, routine_id)
    except RoutineError as exc:
        return escape(str(exc))
    return f"Routine {action}d: {_line(storage, changed, escape)}"


def listing(storage: Storage, scope: str, command: str, escape: Callable[[str], str]) -> str:
    here = [r for r in storage.routines() if scope_of(r["conversation"]) == scope]
    if not here:
        return ("No routines here. Make one from a finished run with `autocode routines add --from-run RUN_ID "
                "--cron \"0 9 * * 1\"`.")
    lines = [_line(storage, r, escape) for r in here[:LIST_MAX]]
    if len(here) > LIST_MAX:
        lines.append(f"… and {len(here) - LIST_MAX} more.")
    return (f"Routines here ({len(here)}):\n" + "\n".join(lines)
            + f"\n{command} pause|resume|rm ID (the routine's owner or an admin).")


def _line(storage: Storage, routine: dict, escape: Callable[[str], str]) -> str:
    item = routines.describe(storage, routine)
    last = item["last_result"]
    result = "-" if last is None else (f"{last['status']}" if last["run_id"] else f"skipped ({last['outcome']})")
    version = f"plan v{item['plan_version']}" if item["plan_version"] else "no plan yet"
    task = " ".join(item["task"].split())
    task = task if len(task) <= 80 else task[:79] + "…"
    return (f"• {item['id']} · {item['state']} · {escape(item['cron'])} ({escape(item['tz'])}) · next "
            f"{escape(item['next_fire_local'] or '-')} · {version} · last: {result} · {escape(task)}")
