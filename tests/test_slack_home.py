"""App Home and channel settings in Slack (bots/slack_home.py, bots/slack_settings.py), end to end: signed events,
button presses and view submissions POSTed to a running `autocode serve`, whose Bolt app answers through the fake
Slack Web API (every call checked against slack_sdk's signatures); the scripted LLM's requests show which model a
run used. The scripted model is priced, so runs cost money."""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from bots.slack_home import OPEN_SETTINGS_ACTION
from bots.slack_settings import NOT_ADMIN, SETTINGS_VIEW
from tests.fakes.slack_server import TEAM_ID, FakeSlack, view_text
from tests.server_helpers import ScriptedLLM, Serve, db_rows, wait_for
from tests.test_slack import ADMIN, ALICE, post, send_event, slack_server, slash, wait_run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

PRICES = '[models]\n"fake-model" = { prompt = 2.5, completion = 10.0 }\n"gpt-4o" = { prompt = 2.5, completion = 10.0 }\n'
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


@pytest.fixture(scope="module")
def llm():
    with ScriptedLLM() as scripted:
        yield scripted


@pytest.fixture(scope="module")
def server(slack, llm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("slack-home")
    (directory / "prices.toml").write_text(PRICES)
    with slack_server(slack, llm, directory, SLACK_ALLOWED_USERS=f"{ALICE},{ADMIN}", SLACK_ADMIN_USERS=ADMIN,
                      AUTOCODE_PUBLIC_URL="https://autocode.test", AUTOCODE_MODELS="gpt-4o",
                      AUTOCODE_MONTHLY_BUDGET_PER_USER="5", AUTOCODE_PRICES_FILE=str(directory / "prices.toml"),
                      AUTOCODE_SANDBOX_UID_BASE="87000", AUTOCODE_SANDBOX_MAX_WORKERS="64") as serve:
        yield serve


# ------------------------------------------------------------------------------------------ helpers


def open_home(server: Serve, user: str) -> httpx.Response:
    ts = f"{1700000000 + next(_ids)}.000700"
    return send_event(server, {"type": "app_home_opened", "user": user, "channel": f"D{user}", "tab": "home",
                               "event_ts": ts})


def published(slack: FakeSlack, user: str, after: int = 0) -> dict[str, Any]:
    """The home view published for `user` after the first `after` publications of it."""
    def found() -> dict[str, Any] | None:
        calls = [c for c in slack.calls_of("views.publish") if c.params.get("user_id") == user]
        return calls[-1].json_param("view") if len(calls) > after else None

    return wait_for(found, 20, what=f"a home view for {user}")


def publications(slack: FakeSlack, user: str) -> int:
    return len([c for c in slack.calls_of("views.publish") if c.params.get("user_id") == user])


def interaction(server: Serve, payload: dict[str, Any]) -> httpx.Response:
    return post(server, urlencode({"payload": json.dumps(payload)}).encode(), "application/x-www-form-urlencoded")


def press_on_home(server: Serve, user: str, value: str) -> tuple[httpx.Response, str]:
    trigger = f"trigger.home.{next(_ids)}"
    response = interaction(server, {
        "type": "block_actions", "user": {"id": user, "team_id": TEAM_ID}, "team": {"id": TEAM_ID},
        "api_app_id": "AAUTOCODE", "trigger_id": trigger, "container": {"type": "view", "view_id": "VHOME"},
        "view": {"id": "VHOME", "type": "home"},
        "actions": [{"type": "button", "action_id": OPEN_SETTINGS_ACTION, "value": value, "block_id": "b",
                     "action_ts": str(time.time())}],
    })
    return response, trigger


def state_of(modal: dict[str, Any], **chosen: Any) -> dict[str, Any]:
    """The `state.values` Slack sends for the modal: each input's initial value, or the one given in `chosen`."""
    values: dict[str, Any] = {}
    for block in modal["blocks"]:
        if block.get("type") != "input":
            continue
        element, name = block["element"], block["block_id"]
        kind = element["type"]
        if kind in ("static_select", "radio_buttons"):
            value = chosen.get(name, (element.get("initial_option") or {}).get("value"))
            state = {"type": kind, "selected_option": {"text": {"type": "plain_text", "text": value}, "value": value}}
        elif kind == "multi_static_select":
            picked = chosen.get(name, [o["value"] for o in element.get("initial_options", [])])
            state = {"type": kind, "selected_options": [{"value": v} for v in picked]}
        else:
            state = {"type": kind, "value": chosen.get(name, element.get("initial_value"))}
        values[name] = {"value": state}
    return values


def submit(server: Serve, user: str, modal: dict[str, Any], scope: str | None = None, **chosen: Any) -> httpx.Response:
    return interaction(server, {
        "type": "view_submission", "team": {"id": TEAM_ID}, "user": {"id": user, "team_id": TEAM_ID},
        "api_app_id": "AAUTOCODE", "trigger_id": f"trigger.submit.{next(_ids)}",
        "view": {"id": "VMODAL", "type": "modal", "callback_id": SETTINGS_VIEW, "team_id": TEAM_ID,
                 "private_metadata": scope or modal["private_metadata"], "blocks": modal["blocks"],
                 "state": {"values": state_of(modal, **chosen)}},
    })


def stored_settings(server: Serve, scope: str) -> dict[str, Any]:
    rows = db_rows(server.db, "SELECT settings_json FROM channel_settings WHERE scope = ?", (scope,))
    return json.loads(rows[0]["settings_json"]) if rows else {}


def models_of_run(llm: ScriptedLLM, task: str) -> list[str]:
    return [body["model"] for body in llm.fake.chat_requests()
            if any(f"Task: {task}" in str(m.get("content")) for m in body.get("messages", []))]


# ------------------------------------------------------------------------------------------ tests


def test_the_home_shows_a_users_runs_with_cost_and_the_month_against_the_budget(server, slack):
    channel = "CHOME"
    slash(server, "job tag=HOME tokens=1000", channel)
    run = wait_run(server, channel)
    assert run["status"] == "succeeded"
    hostile = "job tag=X tokens=1 <!channel> & *bold* <@UEVERYONE>"
    slash(server, hostile, channel)
    wait_for(lambda: len([r for r in db_rows(server.db, "SELECT status FROM runs WHERE conversation LIKE ?",
                                             (f"slack:%:{channel}:%",)) if r["status"] == "succeeded"]) == 2,
             60, what="the second run")

    assert open_home(server, ALICE).status_code == 200
    view = published(slack, ALICE)
    text = view_text(view)
    # Two LLM calls of 1,000 + 1,000 tokens at $2.50 / $10 per 1M: $0.025, and 4,000 tokens.
    assert ":white_check_mark: *<https://autocode.test/runs/" in text and "|job tag=HOME tokens=1000>*" in text
    assert "4,000 tokens · $0.025" in text
    assert "This month:* $0.025" in text and "of $5.00 this month (renews " in text
    assert "&lt;!channel&gt; &amp; *bold* &lt;@UEVERYONE&gt;" in text and "<!channel>" not in text
    assert "Channel settings" not in text  # not an admin
    assert len(view["blocks"]) <= 100

    # A run of hers that finishes later refreshes her Home without her opening it again.
    before = publications(slack, ALICE)
    slash(server, "job tag=LATER", channel)
    later = wait_for(lambda: publications(slack, ALICE) > before and published(slack, ALICE, before), 60,
                     what="the refreshed home")
    assert "job tag=LATER" in view_text(later)


def test_an_admin_changes_a_channels_model_in_the_home_modal_and_the_next_run_uses_it(server, slack, llm):
    channel, scope = "CMODEL", f"slack:{TEAM_ID}:CMODEL"
    slash(server, "job tag=BEFORE", channel)
    assert wait_run(server, channel)["status"] == "succeeded"
    assert models_of_run(llm, "job tag=BEFORE") == ["fake-model", "fake-model"]

    assert open_home(server, ADMIN).status_code == 200
    home = wait_for(lambda: (v := published(slack, ADMIN)) and scope in json.dumps(v) and v, 20,
                    what="the channel on the admin's home")
    assert "Channel settings" in view_text(home) and f"<#{channel}>: model fake-model" in view_text(home)
    button = next(b["accessory"] for b in home["blocks"] if (b.get("accessory") or {}).get("value") == scope)
    assert button["action_id"] == OPEN_SETTINGS_ACTION

    response, trigger = press_on_home(server, ADMIN, scope)
    assert response.status_code == 200
    opened = wait_for(lambda: [c for c in slack.calls_of("views.open") if c.params.get("trigger_id") == trigger],
                      20, what="the settings modal")
    modal = opened[0].json_param("view")
    model_block = next(b for b in modal["blocks"] if b.get("block_id") == "model")
    assert [o["value"] for o in model_block["element"]["options"]] == ["fake-model", "gpt-4o"]

    # A refused value is shown under its field, and nothing of that submission is kept.
    refused = submit(server, ADMIN, modal, model="gpt-4o", budget="lots")
    assert refused.status_code == 200
    assert refused.json()["response_action"] == "errors"
    assert "budget is an amount in USD" in refused.json()["errors"]["budget"]
    assert stored_settings(server, scope) == {}

    before = publications(slack, ADMIN)
    saved = submit(server, ADMIN, modal, model="gpt-4o", budget="2.50")
    assert saved.status_code == 200 and saved.text == ""
    assert stored_settings(server, scope) == {"model": "gpt-4o", "budget": 2.5}
    refreshed = published(slack, ADMIN, before)
    assert f"<#{channel}>: model gpt-4o" in view_text(refreshed) and "budget $2.50/month" in view_text(refreshed)

    slash(server, "job tag=AFTER", channel)
    after = wait_run(server, channel)
    assert after["status"] == "succeeded"
    wait_for(lambda: models_of_run(llm, "job tag=AFTER") == ["gpt-4o", "gpt-4o"], 10, what="the run's requests")
    # Another channel still uses the server's model.
    slash(server, "job tag=ELSEWHERE", "COTHER")
    wait_run(server, "COTHER")
    assert models_of_run(llm, "job tag=ELSEWHERE") == ["fake-model", "fake-model"]


def test_settings_by_slash_command_show_for_all_and_change_for_admins(server, slack, llm):
    channel, scope = "CCMD", f"slack:{TEAM_ID}:CCMD"
    shown = slash(server, "settings", channel, user=ALICE)[0].json()
    assert shown["response_type"] == "ephemeral"
    assert f"*Settings of <#{channel}>:* model fake-model · 3 iterations" in shown["text"]
    assert "Only AutoCode admins can change them." in shown["text"]

    refused = slash(server, "settings set model gpt-4o", channel, user=ALICE)[0].json()
    assert refused["text"] == NOT_ADMIN and stored_settings(server, scope) == {}

    wrong = slash(server, "settings set model <!here> & co", channel, user=ADMIN)[0].json()["text"]
    assert "is not one of the models this server offers: fake-model, gpt-4o" in wrong
    assert "&lt;!here&gt; &amp; co" in wrong and "<!here>" not in wrong

    ok = slash(server, "settings set model gpt-4o", channel, user=ADMIN)[0].json()["text"]
    assert ok.startswith(f"Set model of <#{channel}>: model gpt-4o")
    assert stored_settings(server, scope) == {"model": "gpt-4o"}
    slash(server, "job tag=VIA_SLASH", channel)
    assert wait_run(server, channel)["status"] == "succeeded"
    assert models_of_run(llm, "job tag=VIA_SLASH") == ["gpt-4o", "gpt-4o"]

    reset = slash(server, "settings reset", channel, user=ADMIN)[0].json()["text"]
    assert reset.startswith(f"Reset all settings of <#{channel}>: model fake-model") and "server's defaults" in reset
    assert stored_settings(server, scope) == {}
    # Not a settings command: a task that starts with the word.
    slash(server, "settings tag=TASK", channel)
    wait_for(lambda: models_of_run(llm, "settings tag=TASK"), 30, what="the task starting with 'settings'")


def test_a_non_admin_can_neither_open_nor_submit_the_settings_modal(server, slack):
    scope = f"slack:{TEAM_ID}:CHOME"
    opened_before = len(slack.calls_of("views.open"))
    response, _ = press_on_home(server, ALICE, scope)
    assert response.status_code == 200
    modal = {"private_metadata": scope, "blocks": [
        {"type": "input", "block_id": "model", "element": {"type": "static_select", "action_id": "value",
                                                          "initial_option": {"value": "gpt-4o"}}}]}
    forged = submit(server, ALICE, modal)
    assert forged.json() == {"response_action": "errors", "errors": {"model": NOT_ADMIN}}
    other_team = submit(server, ADMIN, modal, scope="slack:TOTHER:C1")
    assert other_team.json()["response_action"] == "errors"
    assert stored_settings(server, scope) == {} and stored_settings(server, "slack:TOTHER:C1") == {}
    # The press was acknowledged and opened nothing (checked after the submissions, which came later).
    assert len(slack.calls_of("views.open")) == opened_before
    assert slack.rejected == []


def test_the_manifest_turns_the_home_tab_on_with_its_event():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    manifest = yaml.safe_load((Path(__file__).resolve().parent.parent / "slack" / "manifest.yml").read_text())
    home = manifest["features"]["app_home"]
    assert home["home_tab_enabled"] is True and home["messages_tab_enabled"] is True
    assert "app_home_opened" in manifest["settings"]["event_subscriptions"]["bot_events"]


def test_the_settings_modal_keeps_within_block_kit_and_submits_only_what_changed(tmp_path):
    from agent_core.channel_settings import ChannelSettings, tool_names
    from agent_core.config import Settings
    from bots.slack_settings import changes, settings_modal, submitted_values
    from storage.db import Storage
    from tests.fakes.slack_server import view_problem
    from tools.registry import build_toolset

    models = tuple(f"model-{i}-" + "x" * 90 for i in range(120))
    channels = ChannelSettings(Storage(tmp_path / "a.db"), Settings(models=models), build_toolset())
    scope = "slack:T1:C1"
    modal = settings_modal(scope, channels.effective_for_scope(scope), channels)
    assert view_problem(modal, "modal") is None
    options = next(b for b in modal["blocks"] if b.get("block_id") == "model")["element"]["options"]
    assert len(options) == 100 and all(len(o["text"]["text"]) <= 75 and len(o["value"]) <= 150 for o in options)
    assert not any(b.get("block_id") == "network" for b in modal["blocks"])  # the operator's network is off

    tools = tool_names(channels.toolset)
    current = channels.effective_for_scope(scope)
    values = submitted_values({"state": {"values": state_of(modal)}})
    assert changes(values, current, tools) == []  # the initial values change nothing
    values = submitted_values({"state": {"values": state_of(modal, tools=tools[:1], budget="3", max_iterations="2")}})
    assert changes(values, current, tools) == [("max_iterations", "2"), ("tools", tools[0]), ("budget", "3")]
    values = submitted_values({"state": {"values": state_of(modal, tools=[])}})
    assert changes(values, current, tools) == [("tools", "none")]
