"""Who may act on a run (cancel it, re-run it) from a chat: the person who asked for it, or an admin.

Chat buttons are seen by everyone in a channel or group, so a press says nothing about the right to act: the
adapters ask `may_act_on_run` before they cancel or re-run, and tell everyone else who can.
"""

from __future__ import annotations

from collections.abc import Collection


def may_act_on_run(requester: str | None, actor: str, actor_id: str, admins: Collection[str]) -> bool:
    """True when `actor` asked for the run, or the operator listed `actor_id` as an admin.

    `requester` and `actor` are user keys as runs store them (`runs.user`, e.g. "slack:T1:U1", so a user of one
    workspace never matches another's); `actor_id` is the platform's user id, as operators list admins
    (SLACK_ADMIN_USERS, TELEGRAM_ADMIN_USERS). An empty key or id never matches.
    """
    return (bool(actor) and actor == requester) or (bool(actor_id) and actor_id in admins)


def refusal_text(action: str, requester_mention: str | None, thing: str = "run") -> str:
    """What someone else who pressed the button is told, e.g. "Only <@U1> (who asked) or an AutoCode admin can
    cancel this run." (`requester_mention` is how the platform names the requester; None when unknown)."""
    who = f"{requester_mention} (who asked)" if requester_mention else "the person who asked"
    return f"Only {who} or an AutoCode admin can {action} this {thing}."


def may_change_settings(actor_id: str, admins: Collection[str]) -> bool:
    """Whether `actor_id` may change a channel's or chat's settings (agent_core/channel_settings.py): only the
    operator's admins (SLACK_ADMIN_USERS, TELEGRAM_ADMIN_USERS); everyone may read them."""
    return bool(actor_id) and actor_id in admins
