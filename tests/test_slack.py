"""The Slack adapter end to end: signed requests POSTed over HTTP to a running `autocode serve`, whose Slack
clients (Bolt's and ours) talk to a fake Slack Web API on 127.0.0.1 (tests/fakes/slack_server.py), while a
scripted OpenAI-compatible server plays the LLM (tests/server_helpers.ScriptedLLM: "job tag=A sleep=0.5"; with
files in its prompt's manifest, a step that reads the first line of each inputs/NAME).

Files users send (issue 13) are shared on the fake (`add_file`), which serves their bytes only to the bot token;
serve runs with AUTOCODE_INPUT_MAX_MB=1 so that the limits are cheap to cross."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

import httpx
import pytest
from slack_sdk.signature import SignatureVerifier

from bots.slack import FILES_TASK
from tests.conftest import png_step_code, user_prompt
from tests.fakes.slack_server import BOT_USER_ID, EPHEMERAL_PARAMS, TEAM_ID, FakeSlack, SlackCall, message_text
from tests.server_helpers import ScriptedLLM, Serve, db_rows, serve_env, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

SECRET = "test-signing-secret"
ALICE, BOB, MALLORY = "UALICE", "UBOB", "UMALLORY"  # Mallory is not on the allowlist
ADMIN = "UADMIN"  # on SLACK_ADMIN_USERS
_ids = itertools.count(1)

TOKEN = "xoxb-test-token-never-logged"
PNG_CODE = png_step_code("work", "outputs/plot.png", then='    print("wrote the plot")\n', returns='{"tag": "PNG"}')
_LISTED = re.compile(r"^- inputs/(?!results/)(\S+) \(", re.MULTILINE)
# The first line of each file the manifest lists, read from inputs/ by the step: "tag a.csv: x,y; b.txt: hello".
READ_HEADS = (
    "    heads = []\n"
    "    for name in NAMES:\n"
    "        with open('inputs/' + name, 'rb') as handle:\n"
    "            heads.append(name + ': ' + handle.readline().decode('utf-8', 'replace').strip())\n"
)


# A tool that needs an approval (issue 14): it appends to a host file, the side effect the tests look for.
MAIL_TOOLS = '''
TOOLS = [{
    "lib_names": [],
    "instructions": "Send an email.",
    "use_exactly_code_example": True,
    "confirm": True,
    "code_example": """
def send_email(to: str, subject: str) -> dict:
    import json
    with open(SENT, "a") as out:
        out.write(json.dumps({"to": to, "subject": subject}) + "\\\\n")
    return {"sent": True}
""".replace("SENT", repr(SENT)),
}]
'''
MAIL_CODE = (
    "def work():\n"
    "    try:\n"
    "        send_email('boss@example.com', subject='SUBJECT <@UEVERYONE> & ```')\n"
    "    except ToolDenied as exc:\n"
    "        return {'tag': 'denied: ' + str(exc)}\n"
    "    return {'tag': 'mail sent'}\n"
)

# Issue 21, item 8: a long first argument, the recipient last (the approval text once ended before `to`).
HIDDEN_TO_CODE = (
    "def work():\n"
    "    try:\n"
    "        send_email(subject='Dear team, ' + 'B' * 5000 + ' END-OF-BODY', to='attacker@evil.example')\n"
    "    except ToolDenied as exc:\n"
    "        return {'tag': 'denied: ' + str(exc)}\n"
    "    return {'tag': 'mail sent'}\n"
)

# A final answer long enough to stream in several appends, with text that must not become Slack syntax.
LONG_ANSWER = "\n\n".join(f"Part {i}: " + "the quick brown fox <@UEVERYONE> & jumps " * 8 + f"end{i}."
                            for i in range(10))


class PlottingLLM(ScriptedLLM):
    """ScriptedLLM, plus: a task containing "png" gets a step that writes outputs/plot.png; a planner prompt with
    files in its manifest gets a step that reads each file's first line from inputs/ (and, when the task says
    "chart", writes outputs/chart.png too)."""

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = super()._respond(body)
        plan = spec.get("json") or {}
        prompt = "\n".join(str(m.get("content")) for m in body.get("messages", []) if m.get("role") != "system")
        if "final_answer" in plan and "longanswer" in "".join(re.findall(r"^Task: (.*)$", prompt, re.M)[-1:]):
            plan["final_answer"] = LONG_ANSWER
        if "subtasks" not in plan:
            return spec
        if "thanks" in plan["main_task"]:  # no code needed: the planner answers directly
            plan["subtasks"], plan["direct_answer"] = [], "You're welcome <@UEVERYONE>!"
            return spec
        names = _LISTED.findall(prompt)
        if names:
            then, returns = f"    NAMES = {names!r}\n" + READ_HEADS, '{"tag": "; ".join(heads)}'
            plan["subtasks"][0]["code"] = (
                png_step_code("work", "outputs/chart.png", then=then, returns=returns) if "chart" in plan["main_task"]
                else f"def work():\n{then}    return {returns}\n")
        elif "png" in plan["main_task"]:
            plan["subtasks"][0]["code"] = PNG_CODE
        elif "hiddento" in plan["main_task"]:
            plan["subtasks"][0]["code"] = HIDDEN_TO_CODE
        elif "mail" in plan["main_task"]:
            plan["subtasks"][0]["code"] = MAIL_CODE.replace("SUBJECT", plan["main_task"])
        return spec


# ------------------------------------------------------------------------------------------ fixtures


# The scripted LLM's model, priced so that costs are money (USD per 1M tokens).
PRICES = '[models]\n"fake-model" = { prompt = 2.5, completion = 10.0 }\n'


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


@pytest.fixture(scope="module")
def llm():
    with PlottingLLM() as scripted:
        yield scripted


def start_slack_serve(slack: FakeSlack, llm: ScriptedLLM, directory: Path, name: str = "serve", **env: str) -> Serve:
    """A started `autocode serve` (its own SQLite file in `directory`) with the Slack adapter in HTTP mode on the
    fake Web API; the caller closes it (a restart test stops and starts them)."""
    serve = Serve(serve_env(llm, directory / "autocode.db", SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET,
                            SLACK_API_URL=slack.api_url, **env), directory / f"{name}.log", directory)
    try:
        serve.wait_ready()
    except BaseException:
        serve.close()
        raise
    serve.db = directory / "autocode.db"
    return serve


@contextlib.contextmanager
def slack_server(slack: FakeSlack, llm: ScriptedLLM, directory: Path, **env: str) -> Iterator[Serve]:
    """`start_slack_serve`, closed after; its log never holds the bot token."""
    serve = start_slack_serve(slack, llm, directory, **env)
    try:
        yield serve
    finally:
        serve.close()
        assert TOKEN not in serve.log_tail(10**7)


@pytest.fixture(scope="module")
def server(slack, llm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("slack-serve")
    (directory / "tools.py").write_text(f"SENT = {str(directory / 'sent.jsonl')!r}\n" + MAIL_TOOLS)
    (directory / "prices.toml").write_text(PRICES)
    with slack_server(slack, llm, directory, AUTOCODE_INPUT_MAX_MB="1",
                      SLACK_ALLOWED_USERS=f"{ALICE},{BOB},{ADMIN}", SLACK_ADMIN_USERS=ADMIN,
                      AUTOCODE_PUBLIC_URL="https://autocode.test", AUTOCODE_TOOLS=str(directory / "tools.py"),
                      AUTOCODE_SANDBOX_UID_BASE="80000", AUTOCODE_SANDBOX_MAX_WORKERS="64",
                      AUTOCODE_PRICES_FILE=str(directory / "prices.toml")) as serve:
        yield serve


# ------------------------------------------------------------------------------------------ helpers


def signed(body: bytes, timestamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}


def post(server: Serve, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    return server.http.post("/slack/events", content=body,
                            headers={"Content-Type": content_type, **signed(body), **headers})


def slash(server: Serve, text: str, channel: str, user: str = ALICE) -> tuple[httpx.Response, str]:
    trigger = f"trigger.{next(_ids)}.{time.time_ns()}"
    body = urlencode({
        "token": "legacy", "team_id": TEAM_ID, "team_domain": "fake", "channel_id": channel, "channel_name": "general",
        "user_id": user, "user_name": user.lower(), "command": "/autocode", "text": text, "api_app_id": "AAUTOCODE",
        "response_url": "https://hooks.slack.test/commands/1", "trigger_id": trigger,
    }).encode()
    return post(server, body, "application/x-www-form-urlencoded"), trigger


def event_body(event: dict[str, Any], event_id: str | None = None) -> bytes:
    return json.dumps({
        "token": "legacy", "team_id": TEAM_ID, "api_app_id": "AAUTOCODE", "type": "event_callback",
        "event_id": event_id or f"Ev{next(_ids):08d}", "event_time": int(time.time()), "event": event,
        "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True}],
    }).encode()


def mention(channel: str, text: str, user: str = ALICE, thread_ts: str | None = None) -> dict[str, Any]:
    ts = f"{1600000000 + next(_ids)}.000200"
    event = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER_ID}> {text}", "ts": ts, "channel": channel,
             "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def send_event(server: Serve, event: dict[str, Any], event_id: str | None = None, **headers: str) -> httpx.Response:
    return post(server, event_body(event, event_id), "application/json", **headers)


def action(server: Serve, action_id: str, run_id: str, channel: str, user: str = ALICE) -> httpx.Response:
    payload = {
        "type": "block_actions", "user": {"id": user, "team_id": TEAM_ID}, "team": {"id": TEAM_ID},
        "api_app_id": "AAUTOCODE", "channel": {"id": channel}, "trigger_id": f"trigger.{next(_ids)}",
        "container": {"type": "message", "channel_id": channel}, "response_url": "https://hooks.slack.test/a/1",
        "actions": [{"type": "button", "action_id": action_id, "value": run_id, "block_id": "b",
                     "action_ts": str(time.time())}],
    }
    return post(server, urlencode({"payload": json.dumps(payload)}).encode(), "application/x-www-form-urlencoded")


def press(server: Serve, action_id: str, value: str, channel: str, user: str, thread_ts: str) -> httpx.Response:
    """A click on a button of a message in a thread."""
    payload = {
        "type": "block_actions", "user": {"id": user, "team_id": TEAM_ID}, "team": {"id": TEAM_ID},
        "api_app_id": "AAUTOCODE", "channel": {"id": channel}, "trigger_id": f"trigger.{next(_ids)}",
        "container": {"type": "message", "channel_id": channel, "thread_ts": thread_ts},
        "response_url": "https://hooks.slack.test/a/1",
        "actions": [{"type": "button", "action_id": action_id, "value": value, "block_id": "b",
                     "action_ts": str(time.time())}],
    }
    return post(server, urlencode({"payload": json.dumps(payload)}).encode(), "application/x-www-form-urlencoded")


def in_channel(slack: FakeSlack, method: str, channel: str) -> list[SlackCall]:
    key = "channel_id" if method == "files.completeUploadExternal" else "channel"
    return [c for c in slack.calls_of(method) if c.params.get(key) == channel]


def runs_in(server: Serve, channel: str) -> list[dict[str, Any]]:
    return db_rows(server.db, "SELECT * FROM runs WHERE conversation LIKE ? ORDER BY seq", (f"slack:%:{channel}:%",))


def wait_run(server: Serve, channel: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    statuses = statuses or ("succeeded", "failed", "cancelled")

    def done() -> dict[str, Any] | None:
        runs = runs_in(server, channel)
        return runs[-1] if runs and runs[-1]["status"] in statuses else None

    try:
        return wait_for(done, timeout, what=f"a run in {channel} to be {'/'.join(statuses)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log_tail()}") from None


def delivered(server: Serve, run_id: str, timeout: float = 30) -> dict[str, Any]:
    """The run's routing once its answer was posted (the adapter records that in reply_to)."""
    def check() -> dict[str, Any] | None:
        route = json.loads(db_rows(server.db, "SELECT reply_to_json FROM runs WHERE id = ?", (run_id,))[0]
                           ["reply_to_json"] or "{}")
        return route if route.get("delivered") else None

    return wait_for(check, timeout, what=f"run {run_id} to be delivered")


def settled(slack: FakeSlack, channel: str, quiet: float = 1.5, timeout: float = 30) -> None:
    """Wait until no call for `channel` arrived for `quiet` seconds (uploads and logs come last)."""
    def calm() -> bool:
        mine = [c for c in slack.calls if channel in (c.params.get("channel"), c.params.get("channel_id"))]
        return not mine or time.monotonic() - mine[-1].at > quiet

    wait_for(calm, timeout, what=f"Slack calls for {channel} to settle")


# ------------------------------------------------------------------------------------------ tests


def thread_messages(slack: FakeSlack, channel: str, root: str) -> list[SlackCall]:
    """Every message AutoCode added to a thread, in order: posts, streams and file uploads (each is a message)."""
    return [c for c in slack.calls if c.status == 200 and c.response.get("ok") and (
        (c.method in ("chat.postMessage", "chat.startStream") and c.params.get("channel") == channel)
        or (c.method == "files.completeUploadExternal" and c.params.get("channel_id") == channel))
        and c.params.get("thread_ts") == root]


def uploaded_files(slack: FakeSlack, call: SlackCall) -> dict[str, bytes]:
    """The files of one files.completeUploadExternal call: name -> bytes."""
    data = slack.uploads()
    return {slack.uploaded(f["id"])["filename"]: data[f["id"]] for f in call.json_param("files")}


def test_slash_command_ends_as_the_answer_with_its_image_and_the_thread_holds_one_log_message_plus_files(
        server, slack):
    channel = "CSLASH"
    response, _ = slash(server, "job tag=png sleep=0.3 png", channel)

    assert response.status_code == 200, response.text
    assert response.json()["response_type"] == "ephemeral" and "Queued" in response.json()["text"]
    run = wait_run(server, channel)
    assert run["status"] == "succeeded", run
    route = delivered(server, run["id"])
    settled(slack, channel)

    (progress,) = in_channel(slack, "chat.postMessage", channel)  # the only post: everything else is an update
    assert progress.params.get("thread_ts") is None  # a slash command's progress message starts the thread
    root = progress.response["ts"]
    assert route["thread_ts"] == root and route["progress_ts"] == root and route["answer_ts"] == root
    assert "Cancel" in message_text(progress)
    updates = [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == root]
    final = message_text(updates[-1])
    # The channel message is the answer: who asked what, the answer, how it ended, Re-run and the Full log link.
    assert "job tag=png" in final and "tag PNG" in final and "Succeeded after 1 iteration" in final
    assert "Re-run" in final and "Full log" in final and "Cancel" not in final
    assert not [u for u in updates if "Succeeded" in message_text(u) and "tag PNG" not in message_text(u)]
    (image,) = [b for b in updates[-1].json_param("blocks") if b["type"] == "image"]  # the plot, shown in it
    assert slack.uploaded(image["slack_file"]["id"])["filename"] == "plot.png"
    assert slack.uploads()[image["slack_file"]["id"]].startswith(b"\x89PNG")

    # The thread: exactly one log message (the summary, its detail as one .md file), then the run's files.
    log_message, files_message = thread_messages(slack, channel, root)
    assert log_message.method == files_message.method == "files.completeUploadExternal"
    summary = log_message.params["initial_comment"]
    assert summary.startswith(f"*Execution log* · :white_check_mark: succeeded · run `{run['id']}`")
    assert ":white_check_mark: 1. `work` ·" in summary
    assert "Evaluator: :white_check_mark: satisfied — fine" in summary
    assert "Tokens: 2 LLM calls ·" in summary and "Settings: " in summary
    assert "<https://autocode.test/runs/" in summary and f"`run-{run['id']}-log.md` (attached)" in summary
    (document,) = uploaded_files(slack, log_message).items()
    assert document[0] == f"run-{run['id']}-log.md"
    assert b"### Step 1.1 work" in document[1] and b"wrote the plot" in document[1] and b"def work" in document[1]
    assert list(uploaded_files(slack, files_message)) == ["plot.png"] and not files_message.params.get(
        "initial_comment")
    assert [f["id"] for f in files_message.json_param("files")] == [image["slack_file"]["id"]]


def test_a_channel_answer_slack_finds_too_long_is_sent_shorter_and_the_whole_is_in_the_thread(server, slack):
    from bots import slack_render as render

    channel = "CTOOLONG"
    slack.limit_messages(channel, 3000)  # Slack's msg_too_long, well under its documented limit
    slash(server, "job tag=LONGONE longanswer", channel)
    run = wait_run(server, channel)
    assert run["answer"] == LONG_ANSWER, run
    delivered(server, run["id"])
    settled(slack, channel)

    root = in_channel(slack, "chat.postMessage", channel)[0].response["ts"]
    updates = [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == root]
    assert [c for c in updates if c.response.get("error") == "msg_too_long"]  # the whole answer was refused
    final = [c for c in updates if c.response["ok"]][-1]
    text = message_text(final)
    assert "Part 0" in text and "end9." not in text and render.REST_NOTE in text and "Re-run" in text
    _, files_message = thread_messages(slack, channel, root)
    assert uploaded_files(slack, files_message) == {"answer.md": LONG_ANSWER.encode()}


def test_an_image_slack_cannot_show_yet_is_shown_on_a_later_try(server, slack):
    channel = "CIMGLATE"
    slack.delay_images(channel, 1)  # a file uploaded a moment ago: Slack refuses the image block once
    slash(server, "job tag=png png", channel)
    run = wait_run(server, channel)
    delivered(server, run["id"])
    settled(slack, channel, quiet=2.5)

    root = in_channel(slack, "chat.postMessage", channel)[0].response["ts"]
    updates = [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == root]
    assert [c.response.get("error") for c in updates if not c.response["ok"]] == ["invalid_blocks"]
    assert updates[-1].response["ok"] and "tag PNG" in message_text(updates[-1])
    (image,) = [b for b in updates[-1].json_param("blocks") if b["type"] == "image"]
    assert slack.uploaded(image["slack_file"]["id"])["filename"] == "plot.png"


def test_a_direct_answer_ends_the_channel_message_and_posts_no_log(server, slack, llm):
    channel = "CTHANKS"
    slash(server, "thanks!", channel)
    run = wait_run(server, channel)
    assert run["status"] == "succeeded" and run["answer"] == "You're welcome <@UEVERYONE>!", run
    delivered(server, run["id"])
    settled(slack, channel)

    root = in_channel(slack, "chat.postMessage", channel)[0].response["ts"]
    final = [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == root][-1]
    assert "You're welcome &lt;@UEVERYONE&gt;!" in message_text(final)
    assert thread_messages(slack, channel, root) == []  # one planner call, no code: nothing to log
    assert len([r for r in llm.fake.requests if r.body and "Task: thanks!" in json.dumps(r.body)]) == 1


def test_mention_replies_stay_in_its_thread(server, slack):
    channel = "CMENTION"
    event = mention(channel, "job tag=M")
    assert send_event(server, event).status_code == 200
    run = wait_run(server, channel)
    delivered(server, run["id"])
    settled(slack, channel)

    assert run["conversation"] == f"slack:{TEAM_ID}:{channel}:{event['ts']}"
    # In the mention's thread: the progress message, which ends as the answer, then the one log message.
    progress, log_message = thread_messages(slack, channel, event["ts"])
    assert "job tag=M" in message_text(progress) and log_message.method == "files.completeUploadExternal"
    final = [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == progress.response["ts"]][-1]
    assert "tag M" in message_text(final) and "Re-run" in message_text(final)
    assert "Execution log" in log_message.params["initial_comment"]
    assert slack.streams(channel) == {}  # a channel's run is answered in place, not streamed


def test_follow_up_in_the_thread_sees_the_first_answer(server, slack, llm):
    channel = "CFOLLOW"
    first = mention(channel, "job tag=FIRST")
    send_event(server, first)
    delivered(server, wait_run(server, channel)["id"])

    follow_up = {"type": "message", "channel_type": "channel", "user": ALICE, "text": "job tag=SECOND",
                 "ts": f"{1600000000 + next(_ids)}.000300", "thread_ts": first["ts"], "channel": channel}
    assert send_event(server, follow_up).status_code == 200
    second = wait_for(lambda: [r for r in runs_in(server, channel) if r["task"] == "job tag=SECOND"], 20,
                      what="the follow-up run")[0]
    assert second["conversation"] == f"slack:{TEAM_ID}:{channel}:{first['ts']}"
    delivered(server, second["id"])

    plans = [json.dumps(r.body) for r in llm.fake.requests if r.body and "Task: job tag=SECOND" in json.dumps(r.body)]
    assert plans and "tag FIRST" in plans[0]  # the history in the planner request holds the first answer
    settled(slack, channel)
    assert all(c.params.get("thread_ts") == first["ts"] for c in in_channel(slack, "chat.postMessage", channel))


def direct_message(channel: str, text: str, user: str = ALICE) -> dict[str, Any]:
    return {"type": "message", "channel_type": "im", "user": user, "text": text,
            "ts": f"{1600000000 + next(_ids)}.000600", "channel": channel}


def test_a_direct_message_gets_its_answer_streamed_into_its_thread(server, slack):
    from bots import slack_render as render

    channel = "DSTREAM"
    event = direct_message(channel, "job tag=S longanswer")
    send_event(server, event)
    run = wait_run(server, channel)
    assert run["status"] == "succeeded" and run["answer"] == LONG_ANSWER, run
    route = delivered(server, run["id"])
    settled(slack, channel)

    ((ts, stream),) = slack.streams(channel).items()
    assert route["answer_ts"] == ts and stream["thread_ts"] == event["ts"] and stream["state"] == "stopped"
    assert stream["appends"] >= 2  # the answer arrived in pieces, and whole
    assert stream["text"] == render.stream_text(LONG_ANSWER)[0] and "end9." in stream["text"]
    assert "&lt;@UEVERYONE&gt; &amp;" in stream["text"] and "<@UEVERYONE>" not in stream["text"]
    assert "https://autocode.test/runs/" in json.dumps(stream["blocks"])  # the Full log link under it
    (start,) = in_channel(slack, "chat.startStream", channel)
    assert start.params["recipient_user_id"] == ALICE and start.params["recipient_team_id"] == TEAM_ID
    # The thread: the progress message (ending as the run's status), the streamed answer, the one log message.
    progress, answer, log_message = thread_messages(slack, channel, event["ts"])
    assert (progress.method, answer.method, log_message.method) == (
        "chat.postMessage", "chat.startStream", "files.completeUploadExternal")
    final = [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == progress.response["ts"]][-1]
    assert "Succeeded" in message_text(final) and "Re-run" in message_text(final)
    assert "Part 0" not in message_text(final)  # the answer is in its own message, once
    assert "Execution log" in log_message.params["initial_comment"]


def test_a_stream_that_breaks_off_mid_answer_ends_as_the_complete_answer(server, slack):
    channel = "CSTREAMFAIL"
    first = mention(channel, "job tag=FIRST")
    send_event(server, first)
    delivered(server, wait_run(server, channel)["id"])
    settled(slack, channel)
    slack.fail_stream(channel, after=1)  # the second append fails, as a stream Slack dropped

    send_event(server, reply(channel, first["ts"], "job tag=BROKEN longanswer"))
    second = wait_for(lambda: [r for r in runs_in(server, channel)[1:] if r["status"] == "succeeded"], 60,
                      what="the follow-up run")[0]
    route = delivered(server, second["id"])
    settled(slack, channel)

    ((ts, stream),) = slack.streams(channel).items()  # the first run was answered in place
    assert stream["appends"] == 1 and stream["updated"] and route["answer_ts"] == ts
    assert [c.response["error"] for c in in_channel(slack, "chat.appendStream", channel) if not c.response["ok"]]
    (start,) = in_channel(slack, "chat.startStream", channel)  # streaming in a channel names its recipient
    assert start.params["recipient_user_id"] == ALICE and start.params["recipient_team_id"] == TEAM_ID
    # The streamed message was replaced by the whole answer, in mrkdwn, with the Full log link.
    complete = message_text([c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == ts][-1])
    assert all(f"end{i}." in complete for i in range(10)) and "Full log" in complete
    assert "&lt;@UEVERYONE&gt;" in complete and "<@UEVERYONE>" not in complete
    assert not [c for c in in_channel(slack, "chat.postMessage", channel) if "Part 0" in message_text(c)]


def test_without_streaming_the_answer_is_one_message(server, slack):
    channel = "DNOSTREAM"
    slack.no_streaming(channel)
    event = direct_message(channel, "job tag=PLAIN longanswer")
    send_event(server, event)
    run = wait_run(server, channel)
    route = delivered(server, run["id"])
    settled(slack, channel)

    assert slack.streams(channel) == {}
    (answer,) = [c for c in in_channel(slack, "chat.postMessage", channel) if "Part 0" in message_text(c)]
    assert route["answer_ts"] == answer.response["ts"] and answer.params["thread_ts"] == event["ts"]
    assert all(f"end{i}." in message_text(answer) for i in range(10))


def reply(channel: str, thread_ts: str, text: str, user: str = ALICE) -> dict[str, Any]:
    """A `message` event: a reply in a thread."""
    return {"type": "message", "channel_type": "channel", "user": user, "text": text,
            "ts": f"{1600000000 + next(_ids)}.000500", "thread_ts": thread_ts, "channel": channel}


def llm_saw(llm: PlottingLLM, task: str) -> bool:
    return any(f"Task: {task}" in json.dumps(r.body) for r in llm.fake.requests if r.body)


def test_a_reply_for_a_teammate_starts_no_run_one_for_autocode_does(server, slack, llm):
    channel = "CADDRESS"
    first = mention(channel, "job tag=START")
    send_event(server, first)
    delivered(server, wait_run(server, channel)["id"])
    settled(slack, channel)

    # Alice asks Bob in AutoCode's thread: not for AutoCode, no run, no LLM request.
    send_event(server, reply(channel, first["ts"], f"<@{BOB}> job tag=FORBOB, can you check?"))
    # Bob answers Alice, mentioning nobody: another person spoke after AutoCode, so it is not for AutoCode either.
    send_event(server, reply(channel, first["ts"], "job tag=BOBSAYS looks fine to me", user=BOB))
    # Alice again, plain: Bob spoke after AutoCode's last message, so this is the team talking.
    send_event(server, reply(channel, first["ts"], "job tag=TEAMTALK"))
    time.sleep(1.5)
    assert [r["task"] for r in runs_in(server, channel)] == ["job tag=START"]
    assert not any(llm_saw(llm, f"job tag={t}") for t in ("FORBOB", "BOBSAYS", "TEAMTALK"))

    # Mentioning AutoCode (the message event and its app_mention twin) starts one run.
    addressed = reply(channel, first["ts"], f"<@{BOT_USER_ID}> job tag=FORAUTOCODE")
    send_event(server, addressed)
    send_event(server, {**addressed, "type": "app_mention"})
    run = wait_for(lambda: [r for r in runs_in(server, channel) if r["task"] == "job tag=FORAUTOCODE"], 20,
                   what="the addressed run")[0]
    delivered(server, run["id"])
    settled(slack, channel)
    assert len(runs_in(server, channel)) == 2

    # Right after AutoCode's answer, a plain reply (mentioning nobody) is for AutoCode.
    send_event(server, reply(channel, first["ts"], "job tag=RIGHTAFTER", user=BOB))
    run = wait_for(lambda: [r for r in runs_in(server, channel) if r["task"] == "job tag=RIGHTAFTER"], 20,
                   what="the follow-up run")[0]
    delivered(server, run["id"])


def test_who_a_thread_reply_is_for_by_mode():
    from bots.slack import addressed

    bot = BOT_USER_ID
    assert addressed("auto", f"<@{bot}> hi", bot, ALICE, {BOB})
    assert addressed("auto", "hi", bot, ALICE, set()) and addressed("auto", "hi", bot, ALICE, {ALICE})
    assert not addressed("auto", "hi", bot, ALICE, {BOB})
    assert not addressed("auto", f"<@{BOB}|bob> hi", bot, ALICE, set())
    for other in ("<!here>", "<!channel>", "<!subteam^S0TEAM|@devs>"):
        assert not addressed("auto", f"{other} anyone?", bot, ALICE, set())
    assert addressed("mention", f"<@{BOB}> and <@{bot}>", bot, ALICE, {BOB})
    assert not addressed("mention", "hi", bot, ALICE, set())
    assert addressed("all", f"<@{BOB}> hi", bot, ALICE, {BOB})


def test_usage_says_the_month_in_money_for_the_user_and_the_channel(server, slack):
    channel = "CUSAGE"
    slash(server, "job tag=cost", channel)
    assert wait_run(server, channel)["status"] == "succeeded"
    response, _ = slash(server, "usage", channel)
    text = response.json()["text"]
    assert "LLM tokens in" in text
    mine = re.search(r"^You: (\$[\d.]+) this month \(no budget\)\.$", text, re.MULTILINE)
    here = re.search(r"^This channel: (\$[\d.]+) this month \(no budget\)\.$", text, re.MULTILINE)
    assert mine and here, text
    assert float(here.group(1)[1:]) > 0  # the model has a price (PRICES): the run cost something
    assert float(mine.group(1)[1:]) >= float(here.group(1)[1:])  # Alice's month holds this channel's run and more


def test_bad_signature_and_stale_timestamp_are_rejected(server, slack):
    channel = "CFORGED"
    body = event_body(mention(channel, "job tag=X"))
    forged = server.http.post("/slack/events", content=body, headers={
        "Content-Type": "application/json", **signed(body, secret="not-the-secret")})
    stale = server.http.post("/slack/events", content=body, headers={
        "Content-Type": "application/json", **signed(body, timestamp=int(time.time()) - 6 * 60)})

    assert forged.status_code == 401 and stale.status_code == 401
    time.sleep(1)
    assert runs_in(server, channel) == []
    assert in_channel(slack, "chat.postMessage", channel) == []


def test_retried_event_and_its_message_twin_start_one_run(server, slack):
    channel = "CRETRY"
    event = mention(channel, "job tag=ONCE sleep=0.5")
    for attempt in range(3):
        retry = {"X-Slack-Retry-Num": str(attempt), "X-Slack-Retry-Reason": "http_timeout"} if attempt else {}
        assert send_event(server, event, event_id="EvRETRY0001", **retry).status_code == 200
    twin = {**event, "type": "message", "channel_type": "channel"}  # `message` fires for the same post
    send_event(server, twin)
    run = wait_run(server, channel)
    delivered(server, run["id"])
    settled(slack, channel)

    assert len(runs_in(server, channel)) == 1
    progress = [c for c in in_channel(slack, "chat.postMessage", channel) if "Cancel" in message_text(c)]
    assert len(progress) == 1


def test_disallowed_user_is_refused_and_nothing_runs(server, slack):
    channel = "CREFUSE"
    response, _ = slash(server, "job tag=NO", channel, user=MALLORY)
    assert response.status_code == 200 and "not on AutoCode's list" in response.json()["text"]
    send_event(server, mention(channel, "job tag=NO", user=MALLORY))
    refusal = wait_for(lambda: in_channel(slack, "chat.postEphemeral", channel), 10, what="the refusal")
    assert refusal[0].params["user"] == MALLORY and "allowed" in refusal[0].params["text"]
    time.sleep(1)
    assert runs_in(server, channel) == []
    assert in_channel(slack, "chat.postMessage", channel) == []


def test_cancel_button_cancels_the_run(server, slack):
    channel = "CCANCEL"
    slash(server, "job tag=LONG sleep=60", channel)
    run = wait_run(server, channel, "running")
    wait_for(lambda: in_channel(slack, "chat.postMessage", channel), 10, what="the progress message")

    assert action(server, "autocode_cancel", run["id"], channel).status_code == 200
    assert wait_run(server, channel, "cancelled", timeout=30)["id"] == run["id"]
    delivered(server, run["id"])
    wait_for(lambda: any("Cancelled" in message_text(c) and "Re-run" in message_text(c)
                         for c in in_channel(slack, "chat.update", channel)), 10, what="the cancelled progress")


def test_only_the_requester_or_an_admin_may_cancel_or_rerun(server, slack):
    channel = "COTHERS"
    slash(server, "job tag=ALICES sleep=60", channel, user=ALICE)
    run = wait_run(server, channel, "running")
    progress = wait_for(lambda: in_channel(slack, "chat.postMessage", channel), 10, what="the progress message")[0]

    def told(user: str, count: int) -> SlackCall:
        ephemeral = wait_for(lambda: [c for c in in_channel(slack, "chat.postEphemeral", channel)
                                      if c.params["user"] == user][count - 1:], 10, what=f"an ephemeral to {user}")
        assert ephemeral[0].response["ok"], ephemeral[0].response  # arguments as Slack takes them
        return ephemeral[0]

    # Bob, in the same channel, presses Alice's Cancel and Re-run: he is told who can, nothing happens.
    assert action(server, "autocode_cancel", run["id"], channel, user=BOB).status_code == 200
    assert told(BOB, 1).params["text"] == f"Only <@{ALICE}> (who asked) or an AutoCode admin can cancel this run."
    assert action(server, "autocode_rerun", run["id"], channel, user=BOB).status_code == 200
    assert told(BOB, 2).params["text"] == f"Only <@{ALICE}> (who asked) or an AutoCode admin can re-run this run."
    # ... and saying "cancel" to AutoCode in her thread cancels only his own runs there (none).
    send_event(server, mention(channel, "cancel", user=BOB, thread_ts=progress.response["ts"]))
    wait_for(lambda: [c for c in in_channel(slack, "chat.postMessage", channel)
                      if "Nothing of yours is running" in message_text(c)], 10, what="the thread command's reply")
    time.sleep(0.5)
    assert [(r["id"], r["status"]) for r in runs_in(server, channel)] == [(run["id"], "running")]

    # An admin may cancel anyone's run.
    assert action(server, "autocode_cancel", run["id"], channel, user=ADMIN).status_code == 200
    assert wait_run(server, channel, "cancelled", timeout=30)["id"] == run["id"]
    assert not [c for c in in_channel(slack, "chat.postEphemeral", channel) if c.params["user"] == ADMIN]
    delivered(server, run["id"])

    # Alice may re-run her own run, and cancel the new one.
    assert action(server, "autocode_rerun", run["id"], channel, user=ALICE).status_code == 200
    again = wait_for(lambda: [r for r in runs_in(server, channel) if r["id"] != run["id"]], 10, what="the re-run")[0]
    assert again["user"] == f"slack:{TEAM_ID}:{ALICE}"
    assert action(server, "autocode_cancel", again["id"], channel, user=ALICE).status_code == 200
    assert server.wait_status(again["id"], timeout=30)["status"] == "cancelled"
    assert not [c for c in in_channel(slack, "chat.postEphemeral", channel) if c.params["user"] == ALICE]


def test_the_fake_checks_post_ephemeral_as_slack_sdk_sends_it():
    import inspect

    from slack_sdk.web.async_client import AsyncWebClient

    assert set(inspect.signature(AsyncWebClient.chat_postEphemeral).parameters) - {"self", "kwargs"} == \
        EPHEMERAL_PARAMS


def test_the_fake_checks_stream_calls_against_slack_sdk_signatures():
    from tests.fakes.slack_server import signature_problem

    assert signature_problem("chat.appendStream", {"channel": "C1", "ts": "1.2", "markdown_text": "x"}) is None
    assert signature_problem("chat.stopStream", {"channel": "C1", "ts": "1.2", "blocks": "[]", "chunks": []}) is None
    assert "text" in signature_problem("chat.appendStream", {"channel": "C1", "ts": "1", "text": "x"})
    assert "thread_ts" in signature_problem("chat.startStream", {"channel": "C1"})


def test_rate_limited_updates_are_retried_and_nothing_is_lost(server, slack):
    channel = "CLIMIT"
    slack.rate_limit("chat.update", times=2, retry_after=1)
    slash(server, "job tag=LIMITED sleep=0.5", channel)
    run = wait_run(server, channel)
    delivered(server, run["id"], timeout=40)
    settled(slack, channel)

    limited = [c for c in slack.calls_of("chat.update", status=429) if c.params.get("channel") == channel]
    assert len(limited) == 2
    updates = in_channel(slack, "chat.update", channel)
    assert updates and "Succeeded" in message_text(updates[-1])  # the final state made it, as the answer
    assert "tag LIMITED" in message_text(updates[-1])


def test_updates_of_one_message_are_spaced_about_a_second_apart(server, slack):
    channel = "CPACE"
    slash(server, "job tag=PACE sleep=2.5", channel)
    run = wait_run(server, channel)
    delivered(server, run["id"])
    settled(slack, channel)

    updates = in_channel(slack, "chat.update", channel)
    assert len(updates) >= 2 and "Succeeded" in message_text(updates[-1])
    gaps = [b.at - a.at for a, b in zip(updates, updates[1:])]
    assert min(gaps) >= 0.9, gaps  # a lower bound only: a slow machine spaces them further


def test_the_progress_message_shows_a_slow_llm_and_clears_it_once_it_answers(server, slack):
    channel = "CSLOWLLM"
    slash(server, "job tag=SLOW llmdelay=6.5", channel)  # the planner answers after 6.5 s
    run = wait_run(server, channel)
    assert run["status"] == "succeeded", run
    delivered(server, run["id"])
    settled(slack, channel)

    root = in_channel(slack, "chat.postMessage", channel)[0].response["ts"]
    texts = [message_text(c) for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == root]
    shown = [i for i, text in enumerate(texts) if ":hourglass: waiting for the LLM (planner)… 5 s" in text]
    assert shown, texts  # after 5 s of waiting, the progress line says so
    assert "Plan: work" in texts[-2] and "waiting for the LLM" not in texts[-2]  # gone once the plan came
    assert "Succeeded" in texts[-1] and "waiting for the LLM" not in texts[-1]


def test_the_progress_message_shows_the_model_writing_its_plan(server, slack):
    """A slow model streaming its plan (issue 20): the progress line says it is writing, with tokens and pace."""
    channel = "CWRITING"
    slash(server, "job tag=WRITING llmwrite=7", channel)  # the planner's reply is written over ~7 s
    run = wait_run(server, channel)
    assert run["status"] == "succeeded", run
    delivered(server, run["id"])
    settled(slack, channel)

    root = in_channel(slack, "chat.postMessage", channel)[0].response["ts"]
    texts = [message_text(c) for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == root]
    writing = [t for t in texts if re.search(r":hourglass: the LLM is writing \(planner\)… \d+ tokens at \d+ tokens/s", t)]
    assert writing, texts
    assert "Succeeded" in texts[-1] and "the LLM is writing" not in texts[-1]


def test_a_long_answer_fits_one_message_within_block_kit_limits_and_the_rest_is_attached():
    from bots import slack_render as render

    paragraphs = [f"Paragraph {i}: " + "word " * 150 + f"end{i}." for i in range(60)]  # ~46,000 characters
    code = "```\n" + "\n".join(f"line_{i} = {i} < {i + 1}" for i in range(400)) + "\n```"
    answer = "\n\n".join(paragraphs[:5] + [code] + paragraphs[5:])
    progress = render.Progress("r1", "a <@UEVERYONE> task", user=ALICE, status="succeeded", iteration=1,
                               url="https://autocode.test/runs/x")
    for room in (render.MESSAGE_CHARS, render.SHORT_ANSWER_CHARS):
        rendered = render.final_blocks(progress, answer, [("F1", "plot.png")], room=room)
        blocks = rendered.blocks
        assert len(blocks) <= render.MAX_BLOCKS and len(json.dumps(blocks)) <= room
        sections = [b["text"]["text"] for b in blocks if b["type"] == "section"]
        assert all(len(text) <= render.SECTION_CHARS and text.count("```") % 2 == 0 for text in sections)
        # the start of the answer, then what is not shown is attached whole, and the message says so
        assert "end0." in sections[0] and sections[-1] == render.REST_NOTE
        assert [f.filename for f in rendered.files] == ["answer.md"] and rendered.files[0].data == answer.encode()
        assert blocks[0]["elements"][0]["text"] == f"*AutoCode* for <@{ALICE}>: a &lt;@UEVERYONE&gt; task"
        assert [b["type"] for b in blocks[-3:]] == ["image", "context", "actions"]
        assert blocks[-3]["slack_file"] == {"id": "F1"}
    whole = render.final_blocks(progress, "\n\n".join(paragraphs[:10]))
    shown = "\n".join(b["text"]["text"] for b in whole.blocks if b["type"] == "section")
    assert not whole.files and all(f"end{i}." in shown for i in range(10))
    failed = render.final_blocks(render.Progress("r2", "t", status="failed", error="boom <!here>"), "")
    assert ":x: Sorry, that did not work: boom &lt;!here&gt;" in failed.blocks[1]["text"]["text"]

    # A streamed answer: escaped Markdown (no mention, no link syntax), pieces that join to exactly it, and a long
    # one cut with the note, the whole attached.
    text, files = render.stream_text("**bold** <@UEVERYONE> & `a < b`")
    assert text == "**bold** &lt;@UEVERYONE&gt; &amp; `a &lt; b`" and files == []
    assert "".join(render.stream_pieces(answer)) == answer
    assert all(len(piece) <= render.STREAM_PIECE for piece in render.stream_pieces(answer))
    text, files = render.stream_text(answer)
    assert len(text) <= render.STREAM_CHARS and text.endswith(render.REST_NOTE) and text.count("```") % 2 == 0
    assert [f.filename for f in files] == ["answer.md"]


def test_the_log_summary_is_short_escaped_and_points_to_the_document():
    from bots import slack_render as render
    from bots.run_log import ApprovalSummary, RunLog, StepSummary, VerdictSummary

    steps = [StepSummary(1, 1, "load", "ok", 1200), StepSummary(1, 2, "chart", "failed", 30, "Boom <!channel>")]
    steps += [StepSummary(2, i, f"step{i}", "ok", i) for i in range(1, 200)]
    log = RunLog("r9", "t", "failed", steps=steps,
                 verdicts=[VerdictSummary(1, False, "chart <@U1> broke", "chart"), VerdictSummary(2, True, "ok")],
                 approvals=[ApprovalSummary(1, "send_email", "denied", f"slack:{TEAM_ID}:{ALICE}")],
                 llm_calls=3, prompt_tokens=1000, completion_tokens=200, cost="$0.0004",
                 settings="model gpt-4o-mini · 3 iterations")
    summary = render.log_summary(log, "https://autocode.test/runs/x")
    assert len(summary) <= render.LOG_CHARS
    assert summary.startswith("*Execution log* · :x: failed · run `r9`\n*Iteration 1*\n")
    assert ":white_check_mark: 1. `load` · 1,200 ms" in summary
    assert ":x: 2. `chart` · 30 ms · failed: Boom &lt;!channel&gt;" in summary
    assert "Evaluator: :x: not yet (retry from `chart`) — chart &lt;@U1&gt; broke" in summary
    assert "more lines in the attached log_" in summary  # 200 steps do not fit: cut, and said so
    assert summary.endswith("Tokens: 3 LLM calls · 1,000 + 200 tokens · $0.0004\n"
                            "Settings: model gpt-4o-mini · 3 iterations\n"
                            "Code, outputs, stdout and stderr of every step: `run-r9-log.md` (attached) · "
                            "<https://autocode.test/runs/x|Full log>")
    short = render.log_summary(RunLog("r8", "t", "succeeded", steps=steps[:1], approvals=log.approvals), None)
    assert f":raised_hand: `send_email`: denied by <@{ALICE}>" in short and "Full log" not in short


def test_manifest_declares_what_the_adapter_needs():
    yaml = pytest.importorskip("yaml")
    from bots.slack import BOT_SCOPES

    manifest = yaml.safe_load((Path(__file__).resolve().parent.parent / "slack" / "manifest.yml").read_text())
    assert sorted(manifest["oauth_config"]["scopes"]["bot"]) == sorted(BOT_SCOPES)
    assert {"app_mention", "message.channels", "message.im"} <= set(manifest["settings"]["event_subscriptions"]
                                                                    ["bot_events"])
    assert manifest["features"]["slash_commands"][0]["command"] == "/autocode"
    assert manifest["settings"]["interactivity"]["request_url"].endswith("/slack/events")


# ------------------------------------------------------------------------------------------ files users send

CSV = b"region,month,amount\n" + b"".join(b"%s,2024-%02d,%d\n" % (b"north" if i % 2 else b"south", i % 12 + 1, i + 1)
                                          for i in range(30))
CSV_HEADER = "header: region | month | amount"  # how the manifest shows the CSV's header line


def file_message(channel: str, files: list[dict[str, Any]], text: str = "", thread_ts: str | None = None,
                 channel_type: str = "channel", user: str = ALICE) -> dict[str, Any]:
    """A `message` event of subtype `file_share`, as Slack sends one for a post with files."""
    ts = f"{1600000000 + next(_ids)}.000400"
    event = {"type": "message", "subtype": "file_share", "channel_type": channel_type, "user": user, "text": text,
             "files": files, "upload": False, "display_as_bot": False, "ts": ts, "channel": channel, "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def planner_prompts(llm: PlottingLLM, task: str) -> list[str]:
    return [user_prompt(r.body) for r in llm.fake.requests if r.body and r.path.endswith("/chat/completions")
            and ((r.body.get("response_format") or {}).get("json_schema") or {}).get("name") == "plan"
            and f"Task: {task}" in user_prompt(r.body)]


def steps_of(server: Serve, run_id: str) -> list[dict[str, Any]]:
    return db_rows(server.db, "SELECT * FROM steps WHERE run_id = ? ORDER BY id", (run_id,))


def workspace_of(server: Serve, conversation: str) -> list[dict[str, Any]]:
    return db_rows(server.db, "SELECT * FROM workspace_files WHERE conversation = ? ORDER BY id", (conversation,))


def answers(slack: FakeSlack, channel: str) -> str:
    """Everything AutoCode wrote in a channel: posts, updates (an answer in place) and streamed answers."""
    texts = [message_text(c) for c in slack.calls_of("chat.postMessage") + slack.calls_of("chat.update")
             if c.params.get("channel") == channel]
    return "\n".join(texts + [stream["text"] for stream in slack.streams(channel).values()])


def test_a_csv_on_a_thread_mention_reaches_the_planner_a_step_reads_it_and_the_answer_is_posted(server, slack, llm):
    channel = "CFILECSV"
    root = f"{1600000000 + next(_ids)}.000100"  # someone's post; the mention is in its thread
    shared = slack.add_file("sales.csv", CSV, token=TOKEN)
    event = {**mention(channel, "what does it say?", thread_ts=root), "files": [shared]}
    assert send_event(server, event).status_code == 200
    send_event(server, {**event, "type": "message", "subtype": "file_share", "channel_type": "channel"})  # its twin

    run = wait_run(server, channel)
    assert run["status"] == "succeeded", (run, server.log_tail())
    delivered(server, run["id"])
    assert run["conversation"] == f"slack:{TEAM_ID}:{channel}:{root}" and run["task"] == "what does it say?"
    (download,) = slack.downloads(shared["id"])  # one post, two events: one run, one download
    assert download.status == 200 and download.headers["authorization"] == f"Bearer {TOKEN}"
    assert download.params["path"].endswith("/download/sales.csv")  # url_private_download, not the page

    prompt = planner_prompts(llm, "what does it say?")[0]
    assert "inputs/sales.csv" in prompt and CSV_HEADER in prompt and "30 data rows" in prompt
    (step,) = steps_of(server, run["id"])
    assert json.loads(step["output_json"]) == {"tag": "sales.csv: region,month,amount"}  # read from inputs/
    settled(slack, channel)
    assert "tag sales.csv: region,month,amount" in answers(slack, channel)
    assert all(c.params.get("thread_ts") == root for c in in_channel(slack, "chat.postMessage", channel))
    progress = in_channel(slack, "chat.postMessage", channel)[0]
    assert "sales.csv" in message_text(progress)  # the progress message names the file


def test_a_direct_message_that_is_only_a_file_is_a_task(server, slack):
    channel = "DFILEONLY"
    shared = slack.add_file("notes.txt", b"quarterly numbers look fine\nsecond line\n", token=TOKEN)
    assert send_event(server, file_message(channel, [shared], channel_type="im")).status_code == 200

    run = wait_run(server, channel)
    assert run["status"] == "succeeded", run
    assert run["task"] == FILES_TASK
    delivered(server, run["id"])
    settled(slack, channel)
    assert "tag notes.txt: quarterly numbers look fine" in answers(slack, channel)


def test_a_top_level_channel_post_with_a_file_and_no_mention_does_nothing(server, slack):
    channel = "CFILEQUIET"
    shared = slack.add_file("quiet.csv", CSV, token=TOKEN)
    assert send_event(server, file_message(channel, [shared], text="our export")).status_code == 200
    time.sleep(1)
    assert runs_in(server, channel) == [] and slack.downloads(shared["id"]) == []
    assert in_channel(slack, "chat.postMessage", channel) == []


def test_a_follow_up_with_a_file_in_an_autocode_thread_sees_both_turns_files(server, slack):
    channel = "CFILEFOLLOW"
    first = {**mention(channel, "summarise our sales"), "files": [slack.add_file("sales.csv", CSV, token=TOKEN)]}
    send_event(server, first)
    delivered(server, wait_run(server, channel)["id"])

    more = slack.add_file("targets.csv", b"region,target\nnorth,500\nsouth,400\n", token=TOKEN)
    send_event(server, file_message(channel, [more], thread_ts=first["ts"]))  # no text: the file is the task
    second = wait_for(lambda: [r for r in runs_in(server, channel)[1:] if r["status"] == "succeeded"], 60,
                      what="the follow-up run")[0]
    assert second["conversation"] == f"slack:{TEAM_ID}:{channel}:{first['ts']}" and second["task"] == FILES_TASK
    (step,) = steps_of(server, second["id"])
    assert json.loads(step["output_json"])["tag"] == "sales.csv: region,month,amount; targets.csv: region,target"
    delivered(server, second["id"])


def test_two_turns_in_a_thread_reuse_the_file_post_the_chart_and_reset_empties_the_workspace(server, slack):
    channel = "CFILETWO"
    own = CSV + b"east,2024-12,999\n"  # bytes no other test shares: their blob is this conversation's alone
    first = {**mention(channel, "look at our sales"), "files": [slack.add_file("sales.csv", own, token=TOKEN)]}
    send_event(server, first)
    delivered(server, wait_run(server, channel)["id"])
    conversation = f"slack:{TEAM_ID}:{channel}:{first['ts']}"

    follow_up = {"type": "message", "channel_type": "channel", "user": ALICE, "text": "now chart it",
                 "ts": f"{1600000000 + next(_ids)}.000300", "thread_ts": first["ts"], "channel": channel}
    asked = time.monotonic()  # the fake records on this process's clock
    send_event(server, follow_up)
    second = wait_for(lambda: [r for r in runs_in(server, channel)[1:] if r["status"] == "succeeded"], 60,
                      what="turn 2")[0]
    assert len(slack.downloads(first["files"][0]["id"])) == 1
    assert [c for c in slack.downloads() if c.at > asked] == []  # turn 2 downloads nothing
    (step,) = steps_of(server, second["id"])
    assert json.loads(step["output_json"])["tag"] == "sales.csv: region,month,amount"  # turn 1's upload
    delivered(server, second["id"])
    settled(slack, channel)
    (complete,) = [c for c in in_channel(slack, "files.completeUploadExternal", channel) if c.at > asked
                   and not c.params.get("initial_comment")]  # turn 2's files (its log is the other upload)
    assert complete.params["thread_ts"] == first["ts"]
    (upload,) = [c for c in slack.calls_of("files.getUploadURLExternal") if c.params.get("filename") == "chart.png"
                 and c.at > asked]
    assert [f["id"] for f in complete.json_param("files")] == [upload.response["file_id"]]
    assert slack.uploads()[upload.response["file_id"]].startswith(b"\x89PNG")
    names = {row["name"] for row in workspace_of(server, conversation)}
    assert {"sales.csv", "chart.png"} <= names
    blobs = {r["sha256"]: server.db.with_name(server.db.name + ".blobs") / r["sha256"][:2] / r["sha256"]
             for r in workspace_of(server, conversation)}
    assert all(blob.is_file() for blob in blobs.values())

    send_event(server, mention(channel, "reset", thread_ts=first["ts"]))
    reply = wait_for(lambda: [c for c in in_channel(slack, "chat.postMessage", channel)
                              if "Forgot this thread's history" in message_text(c)], 10, what="the reset reply")[0]
    assert "and its files (2)" in message_text(reply)
    assert workspace_of(server, conversation) == []
    elsewhere = {r["sha256"] for r in db_rows(server.db, "SELECT sha256 FROM workspace_files")}  # same bytes, kept
    assert [sha for sha, blob in blobs.items() if blob.exists() and sha not in elsewhere] == []
    assert not blobs[hashlib.sha256(own).hexdigest()].exists()  # the upload's bytes are gone


def test_files_slack_will_not_serve_get_a_clear_reply_and_no_step_runs(server, slack, llm):
    elsewhere = FakeSlack().start()  # another host: the bot token must never be sent there
    try:
        cases = {
            "CFILEWRONG": (slack.add_file("secret.csv", CSV, token="xoxb-another-workspace"),
                           "Slack answered a sign-in page instead of secret.csv"),
            "CFILEGONE": ({**slack.add_file("gone.csv", CSV, token=TOKEN),
                           "url_private_download": f"{slack.url}/files-pri/{TEAM_ID}-FNOSUCH/download/gone.csv"},
                          "Could not download gone.csv: HTTP 404"),
            "CFILENOLINK": (slack.add_file("shared.csv", CSV, token=TOKEN, url_private=None,
                                           url_private_download=None),
                            "Slack gave no download link for shared.csv"),
            "CFILEDRIVE": (slack.add_file("budget.xlsx", CSV, token=TOKEN, mode="external", is_external=True,
                                          external_type="gdrive"),
                           "budget.xlsx is a link to a file stored outside Slack (gdrive)"),
            "CFILEHOST": ({**slack.add_file("evil.csv", CSV, token=TOKEN),
                           "url_private_download": f"{elsewhere.url}/files-pri/{TEAM_ID}-F1/download/evil.csv"},
                          "The link of evil.csv does not point to Slack"),
        }
        for channel, (entry, _) in cases.items():
            send_event(server, {**mention(channel, f"sum it {channel}"), "files": [entry]})
        for channel, (entry, told) in cases.items():
            run = wait_run(server, channel, "failed", "succeeded")
            assert run["status"] == "failed" and told in run["error"] and "Nothing was run." in run["error"], run
            assert steps_of(server, run["id"]) == [] and planner_prompts(llm, f"sum it {channel}") == []
            delivered(server, run["id"])
            wait_for(lambda: f"Sorry, that did not work: {told}" in answers(slack, channel), 10,
                     what=f"the reply in {channel}")
        for channel in cases:  # nothing ran and no LLM was asked: no log, no files
            settled(slack, channel)
            assert in_channel(slack, "files.completeUploadExternal", channel) == []
        assert [c.status for c in slack.downloads(cases["CFILEWRONG"][0]["id"])] == [200]  # the sign-in page
        assert elsewhere.calls == []  # nothing, so not the token either, went to the other host
    finally:
        elsewhere.stop()


def test_a_slack_connect_stub_is_completed_with_files_info(server, slack):
    channel = "CFILECONNECT"
    stub = slack.add_file("partner.csv", CSV, token=TOKEN, connect=True)
    assert "url_private" not in stub and stub["file_access"] == "check_file_info"
    send_event(server, {**mention(channel, "what did our partner send?"), "files": [stub]})
    run = wait_run(server, channel)
    assert run["status"] == "succeeded", run
    assert [c.params["file"] for c in slack.calls_of("files.info")][-1] == stub["id"]
    assert json.loads(steps_of(server, run["id"])[0]["output_json"])["tag"] == "partner.csv: region,month,amount"


def test_files_over_the_limits_get_a_reply_and_nothing_runs_or_downloads_whole(server, slack):
    # AUTOCODE_INPUT_MAX_MB=1: Slack states the size, so nothing is stored or downloaded.
    channel = "CFILEBIG"
    big = slack.add_file("big.csv", b"a,b\n" * (600 * 1024), token=TOKEN)  # 2.4 MB
    event = {**mention(channel, "sum it"), "files": [big]}
    send_event(server, event)
    told = wait_for(lambda: [c for c in in_channel(slack, "chat.postMessage", channel)
                             if "big.csv is 2.3 MB, over the limit of 1 MB a file" in message_text(c)], 10,
                    what="the over-limit reply")
    assert told[0].params["thread_ts"] == event["ts"] and "Nothing was run." in message_text(told[0])
    many = [slack.add_file(f"f{i}.txt", b"x", token=TOKEN) for i in range(11)]
    send_event(server, file_message("DFILEMANY", many, channel_type="im"))
    wait_for(lambda: "a task can take at most 10 (AUTOCODE_INPUT_MAX_FILES)" in answers(slack, "DFILEMANY"), 10,
             what="the too-many-files reply")

    # A size Slack understated: the streaming cap stops reading at 1 MB and the run fails with the reason.
    liar = slack.add_file("liar.csv", b"a,b\n" * (5 << 20), token=TOKEN, size=1000)  # 20 MB
    send_event(server, {**mention("CFILELIAR", "sum it"), "files": [liar]})
    run = wait_run(server, "CFILELIAR", "failed", "succeeded")
    assert run["status"] == "failed" and "liar.csv is over the limit of 1 MB a file" in run["error"], run
    assert steps_of(server, run["id"]) == []
    (download,) = slack.downloads(liar["id"])
    wait_for(lambda: download.params["sent"] < (20 << 20), 10, what="the fake to notice the client left")
    time.sleep(1)
    assert download.params["sent"] < (20 << 20), "the whole file was downloaded"
    time.sleep(0.5)
    assert runs_in(server, channel) == [] and runs_in(server, "DFILEMANY") == []
    assert slack.downloads(big["id"]) == [] and not any(slack.downloads(f["id"]) for f in many)


def test_a_retried_file_event_downloads_once(server, slack):
    channel = "CFILERETRY"
    shared = slack.add_file("once.csv", CSV, token=TOKEN)
    event = {**mention(channel, "what is in it?"), "files": [shared]}
    for attempt in range(3):
        retry = {"X-Slack-Retry-Num": str(attempt), "X-Slack-Retry-Reason": "http_timeout"} if attempt else {}
        assert send_event(server, event, event_id="EvFILERETRY1", **retry).status_code == 200
    run = wait_run(server, channel)
    assert run["status"] == "succeeded", run
    send_event(server, event, event_id="EvFILERETRY1", **{"X-Slack-Retry-Num": "3"})  # even after it finished
    delivered(server, run["id"])
    time.sleep(0.5)
    assert len(runs_in(server, channel)) == 1 and len(slack.downloads(shared["id"])) == 1


def test_a_task_whose_files_were_still_arriving_at_shutdown_is_told_so(slack, llm, tmp_path):
    serve = Serve(serve_env(llm, tmp_path / "stop.db", SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET,
                            SLACK_API_URL=slack.api_url, AUTOCODE_SHUTDOWN_GRACE="1"), tmp_path / "serve.log", tmp_path)
    try:
        serve.wait_ready()
        serve.db = tmp_path / "stop.db"
        channel = "CFILESTOP"
        slow = slack.add_file("slow.csv", CSV * 200, token=TOKEN, stall=True)  # sends a chunk, then waits
        send_event(serve, {**mention(channel, "sum it"), "files": [slow]})
        wait_for(lambda: slack.downloads(slow["id"]) and runs_in(serve, channel), 10, what="the download")
        assert runs_in(serve, channel)[0]["status"] == "held"

        serve.proc.terminate()  # while the file is still arriving
        told = wait_for(lambda: [c for c in in_channel(slack, "chat.postMessage", channel)
                                 if "files were being received" in message_text(c)], 20, what="the notice")
        assert "nothing was run" in message_text(told[0]) and told[0].params["thread_ts"]
        slack.release()
        serve.proc.wait(timeout=20)
        (run,) = runs_in(serve, channel)
        assert run["status"] == "interrupted" and steps_of(serve, run["id"]) == []
    finally:
        slack.release()
        serve.close()


# ------------------------------------------------------------------------------------------ approvals (issue 14)


def mails(server: Serve) -> list[dict[str, Any]]:
    sent = server.db.parent / "sent.jsonl"
    return [json.loads(line) for line in sent.read_text().splitlines()] if sent.exists() else []


def approval_request(slack: FakeSlack, channel: str) -> SlackCall:
    return wait_for(lambda: [c for c in in_channel(slack, "chat.postMessage", channel)
                             if "wants to run" in message_text(c)], 30, what="the approval request")[0]


def buttons(call: SlackCall) -> dict[str, str]:
    return {e["action_id"]: e["value"] for b in call.json_param("blocks") if b["type"] == "actions"
            for e in b["elements"]}


def approval_update(slack: FakeSlack, channel: str, ts: str) -> SlackCall:
    return wait_for(lambda: [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == ts], 30,
                    what="the approval message's update")[-1]


def test_an_approved_call_runs_the_tool_once_and_the_message_says_who(server, slack):
    channel = "CAPPROVE"
    slash(server, "mail the numbers APPROVE", channel)
    asked = approval_request(slack, channel)
    text = message_text(asked)
    # The call, escaped (no ping, no broken code block), in a code block, with Approve / Deny for the run.
    assert "send_email(" in text and "boss@example.com" in text and "&lt;@UEVERYONE&gt; &amp;" in text
    assert "<@UEVERYONE>" not in text and "Approve" in text and "Deny" in text and f"<@{ALICE}>" in text
    run = runs_in(server, channel)[-1]
    assert buttons(asked) == {"autocode_approve": f"{run['id']}:1", "autocode_deny": f"{run['id']}:1"}
    assert mails(server) == [] and run["status"] == "running"

    press(server, "autocode_approve", f"{run['id']}:1", channel, ALICE, asked.params["thread_ts"])
    assert wait_run(server, channel)["status"] == "succeeded"
    assert [m["subject"] for m in mails(server)] == ["mail the numbers APPROVE <@UEVERYONE> & ```"]
    updated = approval_update(slack, channel, asked.response["ts"])
    assert f"Approved by <@{ALICE}>" in message_text(updated) and not buttons(updated)
    assert json.loads(steps_of(server, run["id"])[0]["output_json"]) == {"tag": "mail sent"}
    # A second click decides nothing more.
    press(server, "autocode_deny", f"{run['id']}:1", channel, ALICE, asked.params["thread_ts"])
    wait_for(lambda: [c for c in in_channel(slack, "chat.postEphemeral", channel) if "Already approved"
                      in c.params["text"]], 10, what="the already-decided note")
    assert len(mails(server)) == 1


def test_the_approval_message_shows_the_last_argument_after_a_long_first_one(server, slack):
    channel = "CHIDDENTO"
    slash(server, "hiddento mail the team", channel)
    asked = approval_request(slack, channel)
    (section,) = [b for b in asked.json_param("blocks") if b["type"] == "section"]
    text = section["text"]["text"]
    assert len(text) <= 3000 and 'to="attacker@evil.example"' in text
    assert 'subject="Dear team, BBB' in text and 'BBB END-OF-BODY"' in text and "characters hidden]…" in text
    run = runs_in(server, channel)[-1]
    press(server, "autocode_deny", f"{run['id']}:1", channel, ALICE, asked.params["thread_ts"])
    assert wait_run(server, channel)["status"] == "succeeded"
    updated = approval_update(slack, channel, asked.response["ts"])
    assert 'to="attacker@evil.example"' in message_text(updated)
    assert not [m for m in mails(server) if m["to"] == "attacker@evil.example"]
    # The API (and the run page) has the whole call.
    (approval,) = server.run(run["id"])["approvals"]
    assert "B" * 5000 in approval["arguments"] and approval["arguments"].endswith('to="attacker@evil.example")')


def test_a_denied_call_raises_tool_denied_and_sends_nothing(server, slack):
    channel = "CDENY"
    slash(server, "mail the numbers DENY", channel)
    asked = approval_request(slack, channel)
    run = runs_in(server, channel)[-1]
    press(server, "autocode_deny", f"{run['id']}:1", channel, ALICE, asked.params["thread_ts"])
    assert wait_run(server, channel)["status"] == "succeeded"
    (step,) = steps_of(server, run["id"])
    assert json.loads(step["output_json"])["tag"].startswith("denied: send_email was not run")
    assert not [m for m in mails(server) if "DENY" in m["subject"]]
    updated = approval_update(slack, channel, asked.response["ts"])
    assert f"Denied by <@{ALICE}>" in message_text(updated) and not buttons(updated)


def test_cancel_while_a_call_waits_for_approval_ends_the_run_and_sends_nothing(server, slack):
    channel = "CAPPRCANCEL"
    slash(server, "mail the numbers CANCELWAIT", channel)
    asked = approval_request(slack, channel)
    run = runs_in(server, channel)[-1]
    assert action(server, "autocode_cancel", run["id"], channel).status_code == 200
    assert wait_run(server, channel, "cancelled", timeout=30)["id"] == run["id"]
    updated = approval_update(slack, channel, asked.response["ts"])
    assert "The run was cancelled" in message_text(updated) and not buttons(updated)
    assert [a["status"] for a in approvals_of(server, run["id"])] == ["cancelled"]
    assert not [m for m in mails(server) if "CANCELWAIT" in m["subject"]]


def test_another_users_click_is_refused_and_an_admin_may_decide(server, slack):
    channel = "CAPPROTHER"
    slash(server, "mail the numbers OTHERS", channel, user=ALICE)
    asked = approval_request(slack, channel)
    run = runs_in(server, channel)[-1]
    press(server, "autocode_approve", f"{run['id']}:1", channel, BOB, asked.params["thread_ts"])
    told = wait_for(lambda: [c for c in in_channel(slack, "chat.postEphemeral", channel)
                             if c.params["user"] == BOB], 10, what="Bob's refusal")[0]
    assert told.params["text"] == f"Only <@{ALICE}> (who asked) or an AutoCode admin can approve or deny this call."
    assert told.response["ok"]
    time.sleep(1)
    assert runs_in(server, channel)[-1]["status"] == "running"
    assert not [m for m in mails(server) if "OTHERS" in m["subject"]]
    assert not [c for c in in_channel(slack, "chat.update", channel) if c.params["ts"] == asked.response["ts"]]

    press(server, "autocode_deny", f"{run['id']}:1", channel, ADMIN, asked.params["thread_ts"])
    assert wait_run(server, channel)["status"] == "succeeded"
    assert f"Denied by <@{ADMIN}>" in message_text(approval_update(slack, channel, asked.response["ts"]))
    assert not [m for m in mails(server) if "OTHERS" in m["subject"]]


def mail_serve(slack: FakeSlack, llm: PlottingLLM, directory: Path, name: str, **env: str) -> Serve:
    """A server of its own with the mail tool (for settings the module's server does not have, or restarts)."""
    (directory / "tools.py").write_text(f"SENT = {str(directory / 'sent.jsonl')!r}\n" + MAIL_TOOLS)
    return start_slack_serve(slack, llm, directory, name, AUTOCODE_TOOLS=str(directory / "tools.py"),
                             AUTOCODE_PUBLIC_URL="https://autocode.test", **env)


def approvals_of(server: Serve, run_id: str) -> list[dict[str, Any]]:
    return db_rows(server.db, "SELECT * FROM approvals WHERE run_id = ? ORDER BY number", (run_id,))


def test_an_approval_nobody_decides_in_time_is_denied_and_its_message_says_so(slack, llm, tmp_path):
    serve = mail_serve(slack, llm, tmp_path, "serve", AUTOCODE_APPROVAL_TIMEOUT="1")
    try:
        channel = "CAPPRTIMEOUT"
        slash(serve, "mail the numbers TIMEOUT", channel)
        asked = approval_request(slack, channel)
        assert "No decision within 1 s denies it." in message_text(asked) and buttons(asked)
        run = wait_run(serve, channel)
        assert run["status"] == "succeeded", run  # the step caught ToolDenied and went on
        (step,) = steps_of(serve, run["id"])
        assert json.loads(step["output_json"])["tag"] == (
            "denied: send_email was not run: nobody approved it within 1 s")
        assert mails(serve) == []
        updated = approval_update(slack, channel, asked.response["ts"])
        assert "Nobody decided within 1 s: denied, not run" in message_text(updated) and not buttons(updated)
        assert [a["status"] for a in approvals_of(serve, run["id"])] == ["timeout"]
        delivered(serve, run["id"])
        settled(slack, channel)
        (log_message,) = [c for c in in_channel(slack, "files.completeUploadExternal", channel)
                          if c.params.get("initial_comment")]
        assert ":raised_hand: `send_email`: timeout" in log_message.params["initial_comment"]
        # A click after the timeout decides nothing.
        press(serve, "autocode_approve", f"{run['id']}:1", channel, ALICE, asked.params["thread_ts"])
        wait_for(lambda: [c for c in in_channel(slack, "chat.postEphemeral", channel)
                          if "Already timeout" in c.params["text"]], 10, what="the already-decided note")
        assert mails(serve) == []
    finally:
        serve.close()


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_an_approval_pending_at_a_restart_ends_interrupted_and_its_message_says_so(slack, llm, tmp_path, stop):
    channel = f"CAPPRSTOP{stop.upper()}"
    first = mail_serve(slack, llm, tmp_path, "serve-1", AUTOCODE_SHUTDOWN_GRACE="1")
    try:
        slash(first, "mail the numbers RESTART", channel)
        asked = approval_request(slack, channel)
        run = runs_in(first, channel)[-1]
        wait_for(lambda: "approval_1_ts" in (runs_in(first, channel)[-1]["reply_to_json"] or ""), 10,
                 what="the approval message's ts to be stored")
        if stop == "kill":  # a crash: the next start finds the run `running` and the approval pending
            first.proc.kill()
            first.proc.wait(timeout=30)
    finally:
        first.close()  # otherwise a graceful stop (SIGTERM): the grace runs out while the approval waits
    second = mail_serve(slack, llm, tmp_path, "serve-2") if stop == "kill" else None
    try:
        server = second or first
        assert runs_in(server, channel)[-1]["status"] == "interrupted"
        assert [a["status"] for a in approvals_of(server, run["id"])] == ["interrupted"]
        updated = approval_update(slack, channel, asked.response["ts"])
        assert "AutoCode restarted while waiting: not run" in message_text(updated) and not buttons(updated)
        assert "boss@example.com" in message_text(updated)  # the call it was about is still shown
        told = wait_for(lambda: [c for c in in_channel(slack, "chat.postMessage", channel)
                                 if "restarted" in message_text(c)], 10, what="the interrupted note")
        assert told[0].params["thread_ts"] == asked.params["thread_ts"]
        assert mails(server) == []
    finally:
        if second is not None:
            second.close()
