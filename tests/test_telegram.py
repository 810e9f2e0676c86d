"""The Telegram adapter end to end: `autocode serve` as a subprocess, python-telegram-bot's own HTTP client talking
to a fake Bot API server (tests/fakes/telegram_server.py) over real HTTP, and a scripted OpenAI-compatible LLM that
plans from the task text (the mini-language of tests/server_helpers.py, plus `answer=KEY` for a scripted final
answer and `plot` for a step that writes outputs/plot.png)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.conftest import plan, png_step_code, subtask, verdict
from tests.fakes.telegram_server import Call, FakeTelegram, visible_text
from tests.server_helpers import ScriptedLLM, Serve, db_rows, free_port, serve_env, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

TOKEN = "123456:TEST-secret-token-never-logged"
BOT = "AutoCodeTestBot"
PUBLIC_URL = "http://autocode.example"
UID_BASE = 84000
# Chats on the polling server's allowlist; every test uses its own chat, so conversations never mix.
ALLOWED = [7001, 7002, 7003, 7004, 7005, 7006, 7007, 7008, 7009, 7010, 7011, -1001001, -1001002, -1001003,
           7101, 7102, 7103, 7104, 7105, 7106, 7107, 7108, 7109, 7110, -1001101,  # 71xx, -10011xx: files
           -1001201, 7012, -1001202, 7013]  # settings, drafts
STRANGER = 7666
ADMIN_ID = 7999  # on TELEGRAM_ADMIN_USERS
WAIT = 60
MODELS = "fake-model,gpt-4o"  # AUTOCODE_MODELS: what a chat's admin may choose
# The scripted LLM's model, priced so that costs are money (USD per 1M tokens).
PRICES = '[models]\n"fake-model" = { prompt = 2.5, completion = 10.0 }\n"gpt-4o" = { prompt = 2.5, completion = 10.0 }\n'

LONG_ANSWER = "\n".join(f"line {i:03d}: a < b && c > d — {'x' * (i % 50)}" for i in range(300))[:10_000].rstrip()
HUGE_ANSWER = "\n".join(f"row {i:04d} & more <data>" for i in range(1000))
TRICKY_ANSWER = ("If a < b && c > d then print('<b>not bold</b>') — **stars**, _underscores_, `ticks`, "
                 "[a link](http://example.com) & &amp; stays literal.")
STORY_ANSWER = "\n\n".join(f"Paragraph {i}: the north region sold {10 + i} units & the south <{i}> fewer." * 2
                           for i in range(6))
ANSWERS = {"long": LONG_ANSWER, "huge": HUGE_ANSWER, "tricky": TRICKY_ANSWER, "story": STORY_ANSWER}

PLOT_STEP = subtask("draw", png_step_code("draw", "outputs/plot.png",
                                          returns='{"plot": "outputs/plot.png", "bytes": len(png)}'))


_LISTED = re.compile(r"^- inputs/(?!results/)(\S+) \(", re.MULTILINE)
READ_HEADS = (
    "    heads = []\n"
    "    for name in NAMES:\n"
    "        with open('inputs/' + name, 'rb') as handle:\n"
    "            heads.append(name + ': ' + handle.readline()[:40].decode('utf-8', 'replace').strip())\n"
)

# ------------------------------------------------------------------------------------------ fixtures


def scripted_llm() -> ScriptedLLM:
    """ScriptedLLM, plus `answer=KEY` (the evaluator answers ANSWERS[KEY]) and `plot` (a step that draws a PNG)."""
    llm = ScriptedLLM()
    fallback = llm._respond

    def respond(body: dict[str, Any]) -> dict[str, Any]:
        kind = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
        prompt = "\n".join(str(m.get("content")) for m in body.get("messages", []) if m.get("role") != "system")
        tasks = re.findall(r"^Task: (.*)$", prompt, re.MULTILINE)
        task = tasks[-1] if tasks else ""
        key = re.search(r"\banswer=(\w+)", task)
        if kind == "evaluation" and key:
            return {"json": verdict(ANSWERS[key.group(1)])}
        listed = _LISTED.findall(prompt)
        if kind == "plan" and listed:  # files in the manifest: a step reads each one's first line from inputs/
            then, returns = f"    NAMES = {listed!r}\n" + READ_HEADS, '{"heads": "; ".join(heads)}'
            code = (png_step_code("work", "outputs/chart.png", then=then, returns=returns) if "chart" in task
                    else f"def work():\n{then}    return {returns}\n")
            return {"json": plan(subtask("work", code))}
        if kind == "evaluation" and listed:
            found = re.search(r"^output: (.*)$", prompt, re.MULTILINE)
            return {"json": verdict("Read: " + (found.group(1) if found else "nothing"))}
        if kind == "plan" and "email" in task.split():
            from tests.test_approvals import ATTACK, SEND
            return {"json": plan(ATTACK if "attack" in task.split() else SEND)}
        if kind == "evaluation" and "email" in task.split():
            found = re.search(r"^output: (.*)$", prompt, re.MULTILINE)
            return {"json": verdict("Result: " + (found.group(1) if found else "none"))}
        if kind == "plan" and "plot" in task.split():
            return {"json": plan(PLOT_STEP)}
        if kind == "evaluation" and "plot" in task.split():
            return {"json": verdict("Here is the plot.")}
        return fallback(body)

    llm.fake.responder(respond)
    return llm


@pytest.fixture(scope="module")
def llm():
    with scripted_llm() as scripted:
        yield scripted


@pytest.fixture(scope="module")
def tg():
    with FakeTelegram(TOKEN, BOT) as fake:
        yield fake


def telegram_env(llm: ScriptedLLM, db: Path, api_url: str, uid_base: int, **extra: str) -> dict[str, str]:
    return serve_env(llm, db, TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_URL=api_url, AUTOCODE_PUBLIC_URL=PUBLIC_URL,
                     AUTOCODE_SANDBOX_UID_BASE=str(uid_base), AUTOCODE_SANDBOX_MAX_WORKERS="64", **extra)


@pytest.fixture(scope="module")
def bot(llm, tg, tmp_path_factory):
    """One long-polling `autocode serve` for the tests that share its configuration."""
    directory = tmp_path_factory.mktemp("telegram-serve")
    (directory / "prices.toml").write_text(PRICES)
    env = telegram_env(llm, directory / "autocode.db", tg.api_url, UID_BASE,
                       TELEGRAM_ALLOWED_CHATS=",".join(str(c) for c in ALLOWED), TELEGRAM_ADMIN_USERS=str(ADMIN_ID),
                       AUTOCODE_MODELS=MODELS, AUTOCODE_PRICES_FILE=str(directory / "prices.toml"),
                       # The evaluator words LONG_ANSWER and HUGE_ANSWER (10,000 and 26,000 characters): past the
                       # default reply cap of an evaluation (1,200 tokens), which would cut them (issue 20).
                       AUTOCODE_LLM_MAX_TOKENS_EVALUATE="8000")
    server = Serve(env, directory / "serve.log", directory)
    try:
        server.wait_ready()
        server.db = directory / "autocode.db"
        wait_for(lambda: tg.calls_of("deleteWebhook") and tg.calls_of("setMyCommands"), WAIT, what="bot start-up")
        yield server
    finally:
        server.close()


# ------------------------------------------------------------------------------------------ helpers


def wait_calls(tg: FakeTelegram, predicate: Callable[[Call], bool], what: str, server: Serve | None = None,
               count: int = 1) -> list[Call]:
    def found() -> list[Call]:
        calls = [c for c in list(tg.calls) if c.ok and predicate(c)]
        return calls if len(calls) >= count else []

    try:
        return wait_for(found, WAIT, interval=0.1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log_tail() if server else ''}") from None


def runs_where(db: Path, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    return db_rows(db, f"SELECT * FROM runs WHERE {sql} ORDER BY seq", params)


def delivery(tg: FakeTelegram, update: dict[str, Any]) -> str:
    return f"telegram:{tg.bot_id}:{update['update_id']}"


def finished_run(server: Serve, tg: FakeTelegram, update: dict[str, Any]) -> dict[str, Any]:
    """The run of an update, once it is finished."""
    run = wait_for(lambda: runs_where(server.db, "delivery_id = ?", (delivery(tg, update),)), WAIT,
                   what="the run of the update")[0]
    return server.wait_status(run["id"], timeout=WAIT)


def progress_call(tg: FakeTelegram, chat_id: int, task_message_id: int) -> Call:
    (call,) = [c for c in tg.calls_of("sendMessage", chat_id) if c.reply_to == task_message_id
               and c.params.get("reply_markup")]
    return call


def final_edit(tg: FakeTelegram, server: Serve, chat_id: int, message_id: int) -> Call:
    """The progress message's last edit (the one without the Cancel button): the answer, or what ended the run."""
    return wait_calls(tg, lambda c: c.method == "editMessageText" and c.chat_id == chat_id
                      and c.params["message_id"] == message_id and not c.params.get("reply_markup"),
                      "the final progress edit", server)[-1]


def answer_parts(tg: FakeTelegram, server: Serve, chat_id: int, update: dict[str, Any], count: int = 1) -> list[Call]:
    """The answer: the progress message edited into its first part — or, after drafts in a private chat, the
    first part sent as a new reply to the task (the progress message then deleted) — then the further parts
    replying to the first."""
    task_id = update["message"]["message_id"]
    progress = wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == chat_id and c.reply_to == task_id
                          and c.params.get("reply_markup"), "the progress message", server)[0]

    def first() -> list[Call]:
        sent = [c for c in tg.calls_of("sendMessage", chat_id) if c.reply_to == task_id and c is not progress]
        return sent or [c for c in tg.calls_of("editMessageText", chat_id)
                        if c.params["message_id"] == progress.result["message_id"] and not c.params.get("reply_markup")]

    head = wait_for(first, WAIT, interval=0.1, what="the answer")[0]
    head_id = head.result["message_id"]
    if count > 1:
        wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == chat_id and c.reply_to == head_id,
                   "the further answer parts", server, count=count - 1)
    return [head] + [c for c in tg.calls_of("sendMessage", chat_id) if c.reply_to == head_id]


def log_documents(tg: FakeTelegram, server: Serve, chat_id: int, reply_to: int) -> list[Call]:
    """The run's log: sendDocument of run-<id>-log.md replying to the answer (waited for)."""
    return wait_calls(tg, lambda c: c.method == "sendDocument" and c.chat_id == chat_id and c.reply_to == reply_to
                      and c.files["document"][0].endswith("-log.md"), "the log document", server)


def without_footer(text: str) -> str:
    return re.sub(r"\n\nFull log(: \S+)?$", "", text)


def ask(tg: FakeTelegram, chat: dict[str, Any], user: dict[str, Any], text: str, **kw: Any) -> dict[str, Any]:
    update = tg.update(message=tg.message(chat, user, text, **kw))
    tg.queue(update)
    return update


def private(tg: FakeTelegram, user_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    user = tg.user(user_id, name=f"User{user_id}")
    return tg.private_chat(user), user


# ------------------------------------------------------------------------------------------ tests


def test_start_registers_commands_and_polls(bot, tg):
    (commands,) = tg.calls_of("setMyCommands")
    names = {c["command"] for c in commands.params["commands"]}
    assert {"run", "cancel", "history", "usage", "settings", "reset", "help"} <= names
    assert tg.calls_of("deleteWebhook"), "long polling starts by removing any webhook"


def test_private_task_progress_becomes_the_answer_with_one_log_document(bot, tg):
    chat, user = private(tg, 7001)
    update = ask(tg, chat, user, "job tag=P1 sleep=3")
    task_id = update["message"]["message_id"]

    run = finished_run(bot, tg, update)
    assert run["status"] == "succeeded" and run["conversation"] == "telegram:7001"
    progress = progress_call(tg, 7001, task_id)
    button = progress.params["reply_markup"]["inline_keyboard"][0][0]
    assert button["text"] == "Cancel" and button["callback_data"] == f"cancel:{run['id']}"
    progress_id = progress.result["message_id"]
    edits = [c for c in tg.calls_of("editMessageText", 7001) if c.params["message_id"] == progress_id]
    assert any("1/1 work" in c.params["text"] and c.params.get("reply_markup") for c in edits), \
        "a step shows up in the progress message while the run is going"

    # The progress message becomes the answer (HTML, the Cancel button gone): no separate answer message.
    (answer,) = answer_parts(tg, bot, 7001, update)
    assert answer.params["message_id"] == progress_id and answer.params["parse_mode"] == "HTML"
    assert visible_text(answer).startswith("tag P1")
    assert f'<a href="{PUBLIC_URL}/runs/' in answer.params["text"]
    assert not [c for c in tg.calls_of("sendMessage", 7001) if c.reply_to == task_id and c is not progress]
    assert not tg.calls_of("sendMessageDraft", 7001, ok=None), "a short answer is not streamed"

    # The log: exactly one reply, one .md document with the whole detail, a caption summing the run up.
    (log,) = log_documents(tg, bot, 7001, progress_id)
    assert log.files["document"][0] == f"run-{run['id']}-log.md"
    document = log.files["document"][1].decode()
    assert document.startswith(f"# Execution log of run {run['id']}") and "def work" in document
    assert "### Step 1.1 work — ok" in document
    caption = visible_text(log)
    assert log.params["parse_mode"] == "HTML" and caption.startswith("Execution log · succeeded")
    assert re.search(r"✅ 1\.1 work · ok, \d+\.\d s", caption), caption
    assert "☑️ iteration 1: satisfactory" in caption and "2 LLM calls · " in caption and "tokens" in caption
    assert "Settings: model fake-model · " in caption
    replies = [c for c in tg.sent_to(7001) if c.method.startswith("send") and c.reply_to == progress_id]
    assert replies == [log], "the answer's only reply is the log document"


def test_group_run_for_this_bot_only(bot, tg):
    group, user = tg.group_chat(-1001001), tg.user(7101, "Grace")
    other = ask(tg, group, user, "/run@OtherBot job tag=G0")
    chatter = ask(tg, group, user, "good morning, team")
    mine = ask(tg, group, user, f"/run@{BOT} job tag=G1")
    assert finished_run(bot, tg, mine)["status"] == "succeeded"
    (answer,) = answer_parts(tg, bot, -1001001, mine)
    assert "tag G1" in visible_text(answer)

    text = f"@{BOT} job tag=G2"
    mention = ask(tg, group, user, text, entities=[{"type": "mention", "offset": 0, "length": len(BOT) + 1}])
    run = finished_run(bot, tg, mention)
    assert run["task"] == "job tag=G2"
    reply = ask(tg, group, user, "job tag=G3", reply_to=answer.result)
    assert finished_run(bot, tg, reply)["status"] == "succeeded"

    tasks = [r["task"] for r in runs_where(bot.db, "conversation = ?", ("telegram:-1001001",))]
    assert tasks == ["job tag=G1", "job tag=G2", "job tag=G3"]
    for ignored in (other, chatter):
        assert not runs_where(bot.db, "delivery_id = ?", (delivery(tg, ignored),))
        assert not [c for c in tg.sent_to(-1001001) if c.reply_to == ignored["message"]["message_id"]]


def test_topic_replies_carry_the_thread_id(bot, tg):
    forum, user = tg.group_chat(-1001002, "Forum", forum=True), tg.user(7102, "Tess")
    first = ask(tg, forum, user, "/run job tag=T1", thread_id=77)
    second = ask(tg, forum, user, "/run job tag=T2", thread_id=78)
    runs = [finished_run(bot, tg, first), finished_run(bot, tg, second)]
    assert [r["conversation"] for r in runs] == ["telegram:-1001002:77", "telegram:-1001002:78"]
    for update, thread in ((first, 77), (second, 78)):
        task_id = update["message"]["message_id"]
        (answer,) = answer_parts(tg, bot, -1001002, update)
        assert visible_text(answer).startswith(f"tag T{thread - 76}")
        log_documents(tg, bot, -1001002, answer.params["message_id"])
        mine = [c for c in tg.sent_to(-1001002) if c.method.startswith("send")
                and c.reply_to in (task_id, answer.params["message_id"])]
        assert len(mine) == 2 and all(c.params.get("message_thread_id") == thread for c in mine), mine


def test_follow_up_sees_the_history(bot, tg, llm):
    chat, user = private(tg, 7002)
    assert finished_run(bot, tg, ask(tg, chat, user, "job tag=H1"))["answer"] == "tag H1"
    assert finished_run(bot, tg, ask(tg, chat, user, "job tag=H2"))["answer"] == "tag H2"
    plans = [r for r in llm.fake.chat_requests() if "Task: job tag=H2" in json.dumps(r)
             and (r.get("response_format") or {}).get("json_schema", {}).get("name") == "plan"]
    assert plans and "tag H1" in json.dumps(plans[-1]), "the follow-up's planner sees the first answer"


def test_long_answer_is_split_at_lines_and_nothing_is_lost(bot, tg):
    chat, user = private(tg, 7003)
    assert len(LONG_ANSWER) >= 9_900
    update = ask(tg, chat, user, "job answer=long")
    finished_run(bot, tg, update)
    head = answer_parts(tg, bot, 7003, update)[0]
    log_documents(tg, bot, 7003, head.result["message_id"])  # sent after every part of the answer
    parts = answer_parts(tg, bot, 7003, update)
    assert all(c.reply_to == parts[0].result["message_id"] for c in parts[1:]), "further parts reply to the first"
    assert 3 <= len(parts) <= 4 and all(c.params["parse_mode"] == "HTML" for c in parts)
    texts = [visible_text(c) for c in parts]
    assert all(len(t) <= 4096 for t in texts)
    assert without_footer("\n".join(texts)) == LONG_ANSWER
    assert all(re.match(r"line \d{3}: ", t) for t in texts), "every part starts at a line boundary"


def test_huge_answer_goes_out_as_a_document(bot, tg):
    chat, user = private(tg, 7004)
    update = ask(tg, chat, user, "job answer=huge")
    finished_run(bot, tg, update)
    (document,) = wait_calls(tg, lambda c: c.method == "sendDocument" and c.chat_id == 7004
                             and c.files["document"][0] == "answer.md", "answer.md", bot)
    assert document.files["document"][1].decode() == HUGE_ANSWER
    (preview,) = answer_parts(tg, bot, 7004, update)
    assert document.reply_to == preview.result["message_id"]
    assert "answer.md" in visible_text(preview) and visible_text(preview).startswith("row 0000 & more <data>")


def test_markup_in_answers_is_rendered_literally(bot, tg):
    chat, user = private(tg, 7005)
    update = ask(tg, chat, user, "job answer=tricky")
    finished_run(bot, tg, update)
    (answer,) = answer_parts(tg, bot, 7005, update)
    assert answer.params["parse_mode"] == "HTML" and "&lt;b&gt;not bold&lt;/b&gt;" in answer.params["text"]
    assert without_footer(visible_text(answer)) == TRICKY_ANSWER

    # When Telegram rejects the markup anyway, the same answer goes out as plain text.
    tg.fail_next("editMessageText", code=400, description="Bad Request: can't parse entities: unsupported start tag",
                 when=lambda params: params.get("parse_mode") == "HTML" and params.get("chat_id") == 7005)
    again = ask(tg, chat, user, "job answer=tricky again")
    finished_run(bot, tg, again)
    (plain,) = answer_parts(tg, bot, 7005, again)
    assert "parse_mode" not in plain.params and [c for c in tg.calls_of("editMessageText", 7005, ok=False)
                                                 if c.params["message_id"] == plain.params["message_id"]]
    assert without_footer(plain.params["text"]) == TRICKY_ANSWER


def _drafts(tg: FakeTelegram, chat_id: int) -> list[Call]:
    return tg.calls_of("sendMessageDraft", chat_id, ok=None)


def test_a_private_answer_is_streamed_as_drafts_then_sent_complete(bot, tg):
    chat, user = private(tg, 7012)
    update = ask(tg, chat, user, "job answer=story")
    run = finished_run(bot, tg, update)
    (answer,) = answer_parts(tg, bot, 7012, update)
    log_documents(tg, bot, 7012, answer.result["message_id"])
    drafts = _drafts(tg, 7012)
    assert len(drafts) >= 2 and all(d.ok for d in drafts), drafts
    texts = [d.params["text"] for d in drafts]
    assert all(STORY_ANSWER.startswith(t) for t in texts) and texts == sorted(texts, key=len)
    assert len(set(texts)) == len(texts) and len(texts[-1]) < len(STORY_ANSWER)  # growing, never the whole answer
    assert len({d.params["draft_id"] for d in drafts}) == 1 and drafts[0].params["draft_id"] != 0
    # Then the complete answer as one normal message (the Bot API persists a draft only so), after every draft;
    # the progress message is removed rather than left beside it.
    assert answer.method == "sendMessage" and answer.reply_to == update["message"]["message_id"]
    assert without_footer(visible_text(answer)) == STORY_ANSWER and answer.params["parse_mode"] == "HTML"
    assert answer.at >= drafts[-1].at
    progress = progress_call(tg, 7012, update["message"]["message_id"])
    assert tg.deleted(7012, progress.result["message_id"]) and run["answer"] == STORY_ANSWER


def test_drafts_that_fail_mid_way_end_in_the_complete_answer(bot, tg):
    chat, user = private(tg, 7013)
    seen: list[int] = []

    def second_draft(params: dict[str, Any]) -> bool:
        seen.append(1)
        return params.get("chat_id") == 7013 and len(seen) == 2

    tg.fail_next("sendMessageDraft", code=500, description="Internal Server Error", when=second_draft)
    update = ask(tg, chat, user, "job answer=story")
    finished_run(bot, tg, update)
    (answer,) = answer_parts(tg, bot, 7013, update)
    assert [d.status for d in _drafts(tg, 7013)] == [200, 500]  # the stream stopped at the failure …
    assert answer.method == "sendMessage" and without_footer(visible_text(answer)) == STORY_ANSWER  # … never half


def test_no_drafts_in_a_group(bot, tg):
    group, user = tg.group_chat(-1001202), tg.user(7103, "Gus")
    update = ask(tg, group, user, "/run job answer=story")
    finished_run(bot, tg, update)
    (answer,) = answer_parts(tg, bot, -1001202, update)
    assert answer.method == "editMessageText" and without_footer(visible_text(answer)) == STORY_ANSWER
    assert not _drafts(tg, -1001202)


def test_a_server_without_drafts_still_sends_the_complete_answer(llm, tmp_path):
    with FakeTelegram(TOKEN, BOT) as fake:
        fake.drafts_supported = False  # a Bot API server from before sendMessageDraft: 404 for the method
        env = telegram_env(llm, tmp_path / "autocode.db", fake.api_url, UID_BASE + 832)
        server = Serve(env, tmp_path / "serve.log", tmp_path)
        try:
            server.wait_ready()
            server.db = tmp_path / "autocode.db"
            chat, user = private(fake, 7701)
            first = ask(fake, chat, user, "job answer=story")
            finished_run(server, fake, first)
            (answer,) = answer_parts(fake, server, 7701, first)
            assert without_footer(visible_text(answer)) == STORY_ANSWER
            assert [d.status for d in _drafts(fake, 7701)] == [404]  # tried once, refused
            # The answer was never drafted, so the progress message became it; the next answer does not try.
            assert answer.method == "editMessageText"
            second = ask(fake, chat, user, "job answer=story 2")
            finished_run(server, fake, second)
            (again,) = answer_parts(fake, server, 7701, second)
            assert without_footer(visible_text(again)) == STORY_ANSWER and len(_drafts(fake, 7701)) == 1
        finally:
            server.close()


def test_same_update_twice_starts_one_run(bot, tg):
    chat, user = private(tg, 7006)
    update = tg.update(message=tg.message(chat, user, "job tag=D1"))
    tg.queue(update, update)  # delivered twice in one batch, as after a crash between fetch and confirm
    finished_run(bot, tg, update)
    wait_calls(tg, lambda c: c.chat_id == 7006 and "tag D1" in visible_text(c), "the answer", bot)
    assert len(runs_where(bot.db, "conversation = ?", ("telegram:7006",))) == 1
    assert len([c for c in tg.calls_of("sendMessage", 7006) if c.params.get("reply_markup")]) == 1

    command = tg.update(message=tg.message(chat, user, "/history"))
    marker = tg.update(message=tg.message(chat, user, "/help"))
    tg.queue(command, command, marker)  # the marker's reply comes after any second /history reply would
    for update, what in ((marker, "the marker reply"), (command, "the /history reply")):
        wait_calls(tg, lambda c: c.chat_id == 7006 and c.reply_to == update["message"]["message_id"], what, bot)
    assert len([c for c in tg.sent_to(7006) if c.reply_to == command["message"]["message_id"]]) == 1


def test_disallowed_chat_is_refused(bot, tg):
    chat, user = private(tg, STRANGER)
    update = ask(tg, chat, user, "job tag=NO")
    (refusal,) = wait_calls(tg, lambda c: c.chat_id == STRANGER, "the refusal", bot)
    assert refusal.reply_to == update["message"]["message_id"] and "not enabled" in refusal.params["text"]
    assert not runs_where(bot.db, "conversation = ?", (f"telegram:{STRANGER}",))


def test_cancel_button_cancels_the_run(bot, tg):
    chat, user = private(tg, 7007)
    update = ask(tg, chat, user, "job tag=C1 sleep=60")
    run = wait_for(lambda: runs_where(bot.db, "delivery_id = ? AND status = 'running'", (delivery(tg, update),)),
                   WAIT, what="the run to start")[0]
    progress = wait_calls(tg, lambda c: c.chat_id == 7007 and c.params.get("reply_markup"), "progress", bot)[0]
    wait_for(lambda: db_rows(bot.db, "SELECT 1 FROM steps WHERE run_id = ?", (run["id"],)) or
             [c for c in tg.calls_of("editMessageText", 7007) if "1/1 work" in c.params["text"]], WAIT,
             what="the step to start")
    query = tg.callback(user, progress.result, f"cancel:{run['id']}")
    tg.queue(tg.update(callback_query=query))
    assert bot.wait_status(run["id"], timeout=WAIT)["status"] == "cancelled"
    (answered,) = wait_calls(tg, lambda c: c.method == "answerCallbackQuery", "answerCallbackQuery", bot)
    assert answered.params["callback_query_id"] == query["id"]
    last = final_edit(tg, bot, 7007, progress.result["message_id"])
    assert last.params["text"].startswith("Cancelled")  # the progress message says so: no other message
    log_documents(tg, bot, 7007, progress.result["message_id"])  # a step ran: its log
    assert [c.method for c in tg.sent_to(7007) if c.method.startswith("send")] == ["sendMessage", "sendDocument"]


def test_only_the_asker_or_an_admin_may_cancel_in_a_group(bot, tg):
    group = tg.group_chat(-1001003)
    asker, other, admin = tg.user(7301, "Asker"), tg.user(7302, "Other"), tg.user(ADMIN_ID, "Admin")

    def started(text: str) -> tuple[dict[str, Any], Call]:
        update = ask(tg, group, asker, text)
        run = wait_for(lambda: runs_where(bot.db, "delivery_id = ? AND status = 'running'", (delivery(tg, update),)),
                       WAIT, what="the run to start")[0]
        return run, progress_call_when_sent(update)

    def progress_call_when_sent(update: dict[str, Any]) -> Call:
        return wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == -1001003
                          and c.reply_to == update["message"]["message_id"] and c.params.get("reply_markup"),
                          "the progress message", bot)[0]

    def press(user: dict[str, Any], run: dict[str, Any], progress: Call) -> Call:
        query = tg.callback(user, progress.result, f"cancel:{run['id']}")
        tg.queue(tg.update(callback_query=query))
        return wait_calls(tg, lambda c: c.method == "answerCallbackQuery"
                          and c.params["callback_query_id"] == query["id"], "answerCallbackQuery", bot)[0]

    run, progress = started("/run job tag=G1 sleep=60")
    # Someone else in the group presses the Cancel button: an alert says who can, the run goes on.
    answered = press(other, run, progress)
    assert answered.params["text"] == "Only the person who asked or an AutoCode admin can cancel this task."
    assert answered.params.get("show_alert") is True
    # ... and their /cancel touches only their own tasks (none).
    command = ask(tg, group, other, "/cancel")
    (reply,) = wait_calls(tg, lambda c: c.chat_id == -1001003 and c.reply_to == command["message"]["message_id"],
                          "/cancel reply", bot)
    assert reply.params["text"] == "Nothing of yours is running here."
    assert bot.run(run["id"])["status"] == "running"
    # An admin may cancel anyone's task.
    assert press(admin, run, progress).params["text"] == "Cancelling…"
    assert bot.wait_status(run["id"], timeout=WAIT)["status"] == "cancelled"
    # The asker may cancel their own.
    run, progress = started("/run job tag=G2 sleep=60")
    assert press(asker, run, progress).params["text"] == "Cancelling…"
    assert bot.wait_status(run["id"], timeout=WAIT)["status"] == "cancelled"


def test_cancel_command_cancels_running_and_queued_tasks(bot, tg):
    chat, user = private(tg, 7010)
    running = ask(tg, chat, user, "job tag=Q1 sleep=60")
    queued = ask(tg, chat, user, "job tag=Q2")
    wait_for(lambda: runs_where(bot.db, "delivery_id = ? AND status = 'running'", (delivery(tg, running),)), WAIT,
             what="the first run to start")
    progress = [wait_calls(tg, lambda c: c.chat_id == 7010 and c.params.get("reply_markup")
                           and c.reply_to == u["message"]["message_id"], "progress", bot)[0] for u in (running, queued)]
    assert progress[1].params["text"].startswith("🕒 Queued")
    command = ask(tg, chat, user, "/cancel")
    (reply,) = wait_calls(tg, lambda c: c.chat_id == 7010 and c.reply_to == command["message"]["message_id"],
                          "/cancel reply", bot)
    assert reply.params["text"] == "Cancelling 2 tasks."
    for update, call in zip((running, queued), progress):
        assert finished_run(bot, tg, update)["status"] == "cancelled"
        assert final_edit(tg, bot, 7010, call.result["message_id"]).params["text"].startswith("Cancelled")
    # The queued one never ran: no log for it.
    assert not [c for c in tg.calls_of("sendDocument", 7010) if c.reply_to == progress[1].result["message_id"]]


def test_plot_artifact_is_sent_as_a_photo(bot, tg):
    chat, user = private(tg, 7008)
    update = ask(tg, chat, user, "plot please")
    assert finished_run(bot, tg, update)["status"] == "succeeded"
    (photo,) = wait_calls(tg, lambda c: c.method == "sendPhoto" and c.chat_id == 7008, "sendPhoto", bot)
    name, data = photo.files["photo"]
    assert name == "plot.png" and data.startswith(b"\x89PNG") and photo.params["caption"] == "plot.png"
    (answer,) = answer_parts(tg, bot, 7008, update)
    assert photo.reply_to == answer.params["message_id"]


def test_rate_limits_are_waited_out(bot, tg):
    chat, user = private(tg, 7009)
    tg.fail_next("sendMessage", retry_after=1, when=lambda params: params.get("chat_id") == 7009)
    tg.fail_next("editMessageText", retry_after=1, when=lambda params: params.get("chat_id") == 7009)
    update = ask(tg, chat, user, "job tag=R1 sleep=2")
    finished_run(bot, tg, update)
    (answer,) = wait_calls(tg, lambda c: c.chat_id == 7009 and "tag R1" in visible_text(c), "the answer", bot)
    progress = progress_call(tg, 7009, update["message"]["message_id"])
    final_edit(tg, bot, 7009, progress.result["message_id"])
    for method in ("sendMessage", "editMessageText"):
        limited = [c for c in tg.calls_of(method, 7009, ok=None) if c.status == 429]
        assert len(limited) == 1, method
        assert [c for c in tg.calls_of(method, 7009) if c.at >= limited[0].at + 1.0], f"{method} retried"


def test_the_progress_message_shows_a_slow_llm_and_clears_it_once_it_answers(bot, tg):
    chat, user = private(tg, 7011)
    update = ask(tg, chat, user, "job tag=SLOW llmdelay=6.5")  # the planner answers after 6.5 s
    assert finished_run(bot, tg, update)["status"] == "succeeded"
    progress_id = progress_call(tg, 7011, update["message"]["message_id"]).result["message_id"]
    final_edit(tg, bot, 7011, progress_id)
    texts = [c.params["text"] for c in tg.calls_of("editMessageText", 7011) if c.params["message_id"] == progress_id]
    waiting = [t for t in texts if "⏳ waiting for the LLM (planner)… 5 s" in t]
    assert waiting and waiting[0].startswith("⏳ Working"), texts  # after 5 s of waiting, the progress line says so
    later = texts[texts.index(waiting[0]) + 1:]
    assert later and all("waiting for the LLM" not in t for t in later), texts  # gone once the plan came
    assert later[-1].startswith("tag SLOW")  # the progress message became the answer


def test_the_progress_message_shows_the_model_writing_its_plan(bot, tg):
    """A slow model streaming its plan (issue 20): the progress line says it is writing, with tokens and pace."""
    chat, user = private(tg, 7012)
    update = ask(tg, chat, user, "job tag=WRITING llmwrite=7")  # the planner's reply is written over ~7 s
    assert finished_run(bot, tg, update)["status"] == "succeeded"
    progress_id = progress_call(tg, 7012, update["message"]["message_id"]).result["message_id"]
    final_edit(tg, bot, 7012, progress_id)
    texts = [c.params["text"] for c in tg.calls_of("editMessageText", 7012) if c.params["message_id"] == progress_id]
    writing = [t for t in texts if re.search(r"⏳ the LLM is writing \(planner\)… \d+ tokens at \d+ tokens/s", t)]
    assert writing, texts
    assert texts[-1].startswith("tag WRITING")  # the progress message became the answer


def test_commands(bot, tg):
    chat, user = private(tg, 7001)
    replies: dict[str, str] = {}
    for command in ("/help", "/history", "/usage", "/reset", "/cancel"):
        update = ask(tg, chat, user, command)
        (reply,) = wait_calls(tg, lambda c: c.chat_id == 7001 and c.reply_to == update["message"]["message_id"],
                              command, bot)
        replies[command] = reply.params["text"]
    assert "/run" in replies["/help"] and "/settings" in replies["/help"]
    assert "job tag=P1" in replies["/history"]
    usage = replies["/usage"]
    mine = re.search(r"^You: (\$[\d.]+) this month \(no budget\)\.$", usage, re.MULTILINE)
    here = re.search(r"^This chat: (\$[\d.]+) this month \(no budget\)\.$", usage, re.MULTILINE)
    totals = re.search(r"^This conversation: 1 tasks, 2 LLM calls, [\d,]+ tokens, (\$[\d.]+)\.$", usage, re.MULTILINE)
    assert mine and here and totals, usage
    assert float(here.group(1)[1:]) > 0 and here.group(1) == totals.group(1)  # the model has a price: money
    assert replies["/reset"].startswith("History and files cleared (2 messages)")
    assert replies["/cancel"].startswith("Nothing")


def test_settings_are_shown_changed_by_an_admin_and_refused_to_others(bot, tg, llm):
    group = tg.group_chat(-1001201, "Settings")
    member, admin = tg.user(7601, "Member"), tg.user(ADMIN_ID, "Admin")

    def reply(user: dict[str, Any], text: str) -> str:
        update = ask(tg, group, user, text)
        return wait_calls(tg, lambda c: c.chat_id == -1001201 and c.reply_to == update["message"]["message_id"],
                          text, bot)[0].params["text"]

    def models_of(tag: str) -> set[str]:
        update = ask(tg, group, member, f"/run job tag={tag}")
        assert finished_run(bot, tg, update)["status"] == "succeeded"
        return {r["model"] for r in llm.fake.chat_requests() if f"Task: job tag={tag}" in json.dumps(r)}

    shown = reply(member, "/settings")
    assert shown.startswith("Settings of this chat:\n• model: fake-model\n• max_iterations: ")
    assert "Models: fake-model, gpt-4o" in shown and "Only an AutoCode admin (TELEGRAM_ADMIN_USERS)" in shown
    refused = reply(member, "/settings set model gpt-4o")
    assert refused.startswith("Only an AutoCode admin (TELEGRAM_ADMIN_USERS) can change this chat's settings")
    assert models_of("S0") == {"fake-model"}
    assert "'gpt-5' is not one of the models this server offers: fake-model, gpt-4o" in \
        reply(admin, "/settings set model gpt-5")
    changed = reply(admin, "/settings set model gpt-4o")
    assert changed.startswith("Set model for this chat.") and "• model: gpt-4o (set here)" in changed
    assert "Change them with /settings set NAME VALUE" in changed
    assert "• model: gpt-4o (set here)" in reply(member, "/settings")
    assert models_of("S1") == {"gpt-4o"}  # the chat's model reaches every LLM request of its runs
    assert "• model: fake-model\n" in reply(admin, "/settings reset model")
    assert models_of("S2") == {"fake-model"}
    assert reply(admin, "/settings frobnicate").startswith("/settings shows this chat's settings")


def test_token_never_logged(bot, tg, llm, tmp_path):
    secret = TOKEN.split(":", 1)[1]
    assert secret not in bot.log_tail(10**7)

    # Not even with `autocode -v`, where httpx and python-telegram-bot log at DEBUG.
    with FakeTelegram(TOKEN, BOT) as fake:
        env = telegram_env(llm, tmp_path / "autocode.db", fake.api_url, UID_BASE + 256)
        log_path = tmp_path / "verbose.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-P", "-m", "agent_core.cli", "-v", "serve", "--host",
                                     "127.0.0.1", "--port", str(free_port())], cwd=tmp_path, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: fake.calls_of("deleteWebhook"), WAIT, what="polling to start")
                chat, user = private(fake, 7501)
                ask(fake, chat, user, "job tag=V1")
                wait_for(lambda: [c for c in fake.calls if c.method == "editMessageText"
                                  and not c.params.get("reply_markup")], WAIT, what="the run to be shown")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        text = log_path.read_text(errors="replace")
        assert "DEBUG telegram" in text and "editMessageText" in text  # it did log the traffic
        assert secret not in text


# ------------------------------------------------------------------------------------------ webhook mode


def test_webhook_checks_the_secret_and_ignores_redeliveries(llm, tmp_path):
    with FakeTelegram(TOKEN, BOT) as fake:
        env = telegram_env(llm, tmp_path / "autocode.db", fake.api_url, UID_BASE + 64,
                           TELEGRAM_WEBHOOK_URL="https://bot.example/telegram/webhook",
                           TELEGRAM_WEBHOOK_SECRET="s3cret-value")
        server = Serve(env, tmp_path / "serve.log", tmp_path)
        try:
            server.wait_ready()
            server.db = tmp_path / "autocode.db"
            assert fake.webhook["url"] == "https://bot.example/telegram/webhook"
            assert fake.webhook["secret_token"] == "s3cret-value"
            assert not fake.calls_of("getUpdates", ok=None)
            chat, user = private(fake, 7301)
            update = fake.update(message=fake.message(chat, user, "job tag=W1"))
            url = f"{server.url}/telegram/webhook"

            for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
                assert httpx.post(url, json=update, headers=headers, timeout=30).status_code == 403
            assert not runs_where(server.db, "1 = 1") and not fake.calls_of("sendMessage", ok=None)

            good = {"X-Telegram-Bot-Api-Secret-Token": "s3cret-value"}
            assert httpx.post(url, json=update, headers=good, timeout=30).status_code == 200
            assert runs_where(server.db, "delivery_id = ?", (delivery(fake, update),)), "stored before the 200"
            assert httpx.post(url, json=update, headers=good, timeout=30).status_code == 200  # Telegram retried
            assert finished_run(server, fake, update)["answer"] == "tag W1"
            wait_calls(fake, lambda c: c.chat_id == 7301 and "tag W1" in visible_text(c), "the answer", server)
            assert len(runs_where(server.db, "1 = 1")) == 1
            assert len([c for c in fake.calls_of("sendMessage", 7301) if c.params.get("reply_markup")]) == 1
        finally:
            server.close()


# ------------------------------------------------------------------------------------------ restarts


def test_a_restart_tells_the_chat_its_run_was_interrupted(llm, tmp_path):
    with FakeTelegram(TOKEN, BOT) as fake:
        db = tmp_path / "autocode.db"
        first = Serve(telegram_env(llm, db, fake.api_url, UID_BASE + 128), tmp_path / "serve-1.log", tmp_path)
        try:
            first.wait_ready()
            first.db = db
            chat, user = private(fake, 7401)
            update = ask(fake, chat, user, "job tag=K1 sleep=60")
            run = wait_for(lambda: runs_where(db, "delivery_id = ? AND status = 'running'", (delivery(fake, update),)),
                           WAIT, what="the run to start")[0]
            progress = wait_calls(fake, lambda c: c.chat_id == 7401 and c.params.get("reply_markup"), "progress",
                                  first)[0]
            # The server stores the progress message's id once Telegram answered; crash only after that.
            wait_for(lambda: "progress_message_id" in (runs_where(db, "id = ?", (run["id"],))[0]["reply_to_json"] or ""),
                     WAIT, what="the progress message id to be stored")
            first.proc.kill()  # a crash: nothing gets to say goodbye
            first.proc.wait(timeout=30)
        finally:
            first.close()
        second = Serve(telegram_env(llm, db, fake.api_url, UID_BASE + 192), tmp_path / "serve-2.log", tmp_path)
        try:
            second.wait_ready()
            second.db = db
            assert second.run(run["id"])["status"] == "interrupted"
            last = final_edit(fake, second, 7401, progress.result["message_id"])
            assert "restarted" in last.params["text"]  # the progress message tells it
            assert not [c for c in fake.calls_of("sendMessage", 7401) if c.reply_to == update["message"]["message_id"]
                        and c is not progress]
        finally:
            second.close()


def test_a_stop_while_a_file_arrives_says_it_never_arrived_and_a_redelivery_does_not_download(llm, tmp_path):
    with FakeTelegram(TOKEN, BOT) as fake:
        db = tmp_path / "autocode.db"
        first = Serve(telegram_env(llm, db, fake.api_url, UID_BASE + 704), tmp_path / "serve-1.log", tmp_path)
        try:
            first.wait_ready()
            first.db = db
            chat, user = private(fake, 7402)
            update = _send_document(fake, chat, user, CSV * 4000, "slow.csv", "sum it tag=held7402", stall=True)
            run = wait_for(lambda: runs_where(db, "delivery_id = ? AND status = 'held'", (delivery(fake, update),)),
                           WAIT, what="the held run")[0]
            wait_for(lambda: _file_path(update) in fake.downloads, WAIT, what="the download to start")
            wait_for(lambda: "progress_message_id" in (runs_where(db, "id = ?", (run["id"],))[0]["reply_to_json"]
                                                       or ""), WAIT, what="the progress message id to be stored")
        finally:
            first.close()  # SIGTERM: a graceful stop while the download is stalled
        assert runs_where(db, "id = ?", (run["id"],))[0]["status"] == "interrupted"
        progress = progress_call(fake, 7402, update["message"]["message_id"])
        last = final_edit(fake, first, 7402, progress.result["message_id"])
        assert "files were being received" in last.params["text"] and "nothing was run" in last.params["text"]
        fake.release()

        second = Serve(telegram_env(llm, db, fake.api_url, UID_BASE + 768), tmp_path / "serve-2.log", tmp_path)
        try:
            second.wait_ready()
            second.db = db
            marker = fake.update(message=fake.message(chat, user, "/help"))
            fake.queue(update, marker)  # Telegram delivers the unconfirmed update again; the marker comes after it
            wait_calls(fake, lambda c: c.chat_id == 7402 and c.reply_to == marker["message"]["message_id"],
                       "the marker reply", second)
            assert fake.downloads.count(_file_path(update)) == 1  # the duplicate is not downloaded again
            assert len(runs_where(db, "delivery_id = ?", (delivery(fake, update),))) == 1
            assert runs_where(db, "id = ?", (run["id"],))[0]["status"] == "interrupted"
        finally:
            second.close()


# ------------------------------------------------------------------------------------------ rendering rules


def test_split_keeps_every_character_and_respects_the_escaped_limit():
    from bots.telegram_render import escaped_length, split_text

    text = "<&>" * 3000 + "\n" + "word " * 2000 + "\n\n\n" + "short line"
    chunks = split_text(text, 4096, escaped_length)
    assert all(escaped_length(c) <= 4096 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")
    assert chunks[-1].endswith("word \n\n\nshort line")  # lines stay whole where they fit


def test_the_log_caption_is_escaped_and_clipped_to_telegrams_caption_limit(tmp_path):
    from bots.run_log import run_log
    from bots.telegram_render import html_to_plain, log_caption, utf16_length
    from storage.db import Storage

    storage = Storage(tmp_path / "autocode.db")
    run_id = storage.create_run("telegram:1", "many steps")
    for i in range(40):
        storage.add_step({"run_id": run_id, "iteration": 1, "position": i, "tool_name": f"step_{i}", "code": "x = 1",
                          "status": "ok" if i % 2 else "failed", "error": "<b>bad</b> & 🔥" * 3, "duration_ms": 1500})
    storage.add_evaluation({"run_id": run_id, "iteration": 1, "satisfactory": 0, "thoughts": "a < b", "retry_from": None})
    storage.add_llm_call({"run_id": run_id, "iteration": 1, "purpose": "planner", "model": "m", "prompt_tokens": 10,
                          "completion_tokens": 5, "duration_ms": 1})
    storage.finish_run(run_id, "failed", None, "x", 1)
    caption, plain = log_caption(run_log(storage, run_id))
    assert html_to_plain(caption) == plain and utf16_length(plain) <= 1024
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; 🔥" in caption and "<b>bad</b>" not in caption
    assert plain.startswith("Execution log · failed\n❌ 1.1 step_0 · failed, 1.5 s: <b>bad</b>")
    assert re.search(r"\n… \d+ more in the file\n1 LLM call · 10 \+ 5 tokens", plain), plain
    # A short run keeps every line.
    short = run_log(storage, storage.create_run("telegram:1", "one"))
    assert log_caption(short)[1] == "Execution log · running\n0 LLM calls · 0 + 0 tokens"


def test_drafts_grow_at_paragraph_and_line_boundaries():
    from bots.telegram_render import draft_texts

    drafts = draft_texts(STORY_ANSWER, 160)
    assert len(drafts) == 3 and all(STORY_ANSWER.startswith(d) for d in drafts)
    assert all(len(a) < len(b) for a, b in zip(drafts, drafts[1:])) and len(drafts[-1]) < len(STORY_ANSWER)
    assert all(STORY_ANSWER[len(d):].startswith("\n\n") for d in drafts)  # each ends where a paragraph does
    assert draft_texts("a short answer", 160) == []
    rows = "\n".join(f"row {i}" for i in range(100))
    assert all(rows[len(d)] == "\n" for d in draft_texts(rows, 160))  # no paragraphs: whole lines
    assert all(len(d) <= 4096 for d in draft_texts("word " * 3000, 160))


def test_an_unreachable_bot_api_does_not_take_the_server_down(llm, tmp_path):
    """The Bot API is down at start: serve keeps serving (the API, other adapters) and says why in one line."""
    server = Serve(telegram_env(llm, tmp_path / "autocode.db", f"http://127.0.0.1:{free_port()}", UID_BASE + 320),
                   tmp_path / "serve.log", tmp_path)
    try:
        assert server.wait_ready(timeout=60)["status"] == "ok"
        run_id = server.submit_ok("job tag=UP")
        assert server.wait_status(run_id)["status"] == "succeeded"
        log = server.log_tail(20000)
        assert "the Bot API is not reachable" in log and "retrying" in log
        assert "Traceback" not in log and TOKEN not in log
    finally:
        server.close()


def test_a_rejected_bot_token_is_one_line_and_the_rest_serves(llm, tmp_path):
    """Telegram answers 401 to the token: one line says so, Telegram is off (not named as up), the rest serves."""
    with FakeTelegram("999999:ANOTHER-bot-token", BOT) as fake:
        server = Serve(telegram_env(llm, tmp_path / "autocode.db", fake.api_url, UID_BASE + 896),
                       tmp_path / "serve.log", tmp_path)
        try:
            assert server.wait_ready(timeout=60)["status"] == "ok"
            run_id = server.submit_ok("job tag=UP")
            assert server.wait_status(run_id)["status"] == "succeeded"
            wait_for(lambda: "autocode serve ready" in server.log_tail(10**6), 10, what="the ready line")
        finally:
            server.close()
    log = server.log_tail(10**6)
    said = [line for line in log.splitlines() if "Telegram rejected TELEGRAM_BOT_TOKEN" in line]
    assert len(said) == 2 and "retrying" not in log, said  # one error line; the ready line names why it is off
    assert said[0].startswith("ERROR") and "adapters: none; off: telegram (Telegram rejected" in said[1]
    ready = [line for line in log.splitlines() if "autocode serve ready" in line][0]
    assert "adapters: none; off: telegram" in ready
    assert "Traceback" not in log and TOKEN not in log


# ------------------------------------------------------------------------------------------ files (issue 13)
CSV = b"region,month,amount\nnorth,2024-01,10\nsouth,2024-01,12\nnorth,2024-02,14\n"


def _png(width: int, height: int) -> bytes:
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header
            + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + b"\x00" * 64)


def _texts(tg: FakeTelegram, chat_id: int) -> list[str]:
    return [visible_text(c) for c in tg.sent_to(chat_id) if c.method in ("sendMessage", "editMessageText")]


def _planner_prompts(llm: ScriptedLLM, needle: str) -> list[str]:
    bodies = [b for b in llm.fake.chat_requests()
              if ((b.get("response_format") or {}).get("json_schema") or {}).get("name") == "plan"]
    prompts = ["\n".join(str(m.get("content")) for m in b["messages"] if m.get("role") != "system") for b in bodies]
    return [p for p in prompts if needle in p]


def _send_document(tg, chat, user, data: bytes, name: str, caption: str | None, **kw):
    options = ("size", "too_big", "missing", "stall", "local", "local_path")
    file = tg.add_file(data, **{k: kw.pop(k) for k in options if k in kw})
    update = tg.update(message=tg.document(chat, user, file, name, caption=caption, **kw))
    tg.queue(update)
    return update


def _answer(tg: FakeTelegram, server: Serve, chat_id: int, update: dict[str, Any]) -> Call:
    """The answer to an update (the run can be stored finished a moment before its answer is sent)."""
    return answer_parts(tg, server, chat_id, update)[0]


def _file_path(update: dict[str, Any]) -> str:
    """Where the fake serves an update's document (see FakeTelegram.add_file)."""
    return f"documents/file_{int(update['message']['document']['file_id'][6:])}.bin"


def test_a_document_with_a_caption_is_a_task_on_the_file(bot, tg, llm):
    chat, user = private(tg, 7101)
    update = _send_document(tg, chat, user, CSV, "sales.csv", "which region sold most? tag=doc7101")
    run = finished_run(bot, tg, update)
    assert run["status"] == "succeeded", (run, bot.log_tail())
    assert run["task"] == "which region sold most? tag=doc7101"
    prompt = _planner_prompts(llm, "tag=doc7101")[0]
    assert "inputs/sales.csv" in prompt and "region | month | amount" in prompt  # the manifest, not the bytes
    answer = _answer(tg, bot, 7101, update)
    assert "sales.csv: region,month,amount" in visible_text(answer)  # the step read inputs/sales.csv
    assert tg.downloads.count(_file_path(update)) == 1
    assert answer_parts(tg, bot, 7101, update) == [answer]
    # The fake serves the bytes only with the bot's token, as Telegram does.
    url = f"{tg.origin}/file/bot{{}}/{_file_path(update)}"
    assert httpx.get(url.format(TOKEN), timeout=10).content == CSV
    assert httpx.get(url.format("123456:wrong-token"), timeout=10).status_code == 404


def test_a_file_alone_in_a_private_chat_is_a_task(bot, tg, llm):
    chat, user = private(tg, 7102)
    update = _send_document(tg, chat, user, b"hello from a note\n", "note.txt", None)
    run = finished_run(bot, tg, update)
    assert run["status"] == "succeeded" and run["task"].startswith("Analyse the attached file")
    assert "note.txt: hello from a note" in visible_text(_answer(tg, bot, 7102, update))


def test_a_photo_downloads_its_largest_size(bot, tg, llm):
    chat, user = private(tg, 7103)
    small, large = tg.add_file(_png(90, 60)), tg.add_file(_png(1280, 853))
    update = tg.update(message=tg.photo(chat, user, [(small, 90, 60), (large, 1280, 853)],
                                        caption="what is in this picture? tag=photo7103"))
    tg.queue(update)
    run = finished_run(bot, tg, update)
    assert run["status"] == "succeeded", (run, bot.log_tail())
    prompt = _planner_prompts(llm, "tag=photo7103")[0]
    assert f"inputs/photo-{large['file_unique_id']}.jpg" in prompt and "PNG image 1280x853" in prompt
    assert tg.downloads.count(f"documents/file_{int(large['file_id'][6:])}.bin") == 1
    assert f"documents/file_{int(small['file_id'][6:])}.bin" not in tg.downloads


def test_group_documents_need_run_a_mention_or_a_reply(bot, tg, llm):
    group, user = tg.group_chat(-1001101), tg.user(7104, name="Grace")
    ignored = _send_document(tg, group, user, CSV, "chatter.csv", "look at this, team")
    bare = _send_document(tg, group, user, CSV, "bare.csv", None)
    ran = _send_document(tg, group, user, CSV, "sales.csv", "/run count the rows tag=grp7104")
    assert finished_run(bot, tg, ran)["status"] == "succeeded"
    answer = _answer(tg, bot, -1001101, ran)

    file = tg.add_file(CSV)
    mention = tg.document(group, user, file, "mentioned.csv", caption=f"@{BOT} sum it tag=grp7104m")
    mention["caption_entities"] = [{"type": "mention", "offset": 0, "length": len(BOT) + 1}]
    mentioned = tg.update(message=mention)
    tg.queue(mentioned)
    run = finished_run(bot, tg, mentioned)
    assert run["status"] == "succeeded" and run["task"] == "sum it tag=grp7104m"
    replied = _send_document(tg, group, user, CSV, "replied.csv", None, reply_to=answer.result)
    run = finished_run(bot, tg, replied)
    assert run["status"] == "succeeded" and run["task"].startswith("Analyse the attached file")

    for update in (ignored, bare):  # chatter: no run, no download, no reply
        assert not runs_where(bot.db, "delivery_id = ?", (delivery(tg, update),))
        assert _file_path(update) not in tg.downloads
        assert not [c for c in tg.sent_to(-1001101) if c.reply_to == update["message"]["message_id"]]


def test_over_the_limits_gets_a_reply_and_nothing_runs(bot, tg):
    chat, user = private(tg, 7105)
    big = _send_document(tg, chat, user, b"x", "huge.csv", "sum it", size=60 * 1024 * 1024)
    wait_for(lambda: any("over the limit of 50 MB" in t for t in _texts(tg, 7105)), WAIT, what="the limit reply")
    assert not runs_where(bot.db, "delivery_id = ?", (delivery(tg, big),))
    # 25 MB: Telegram's getFile answers "file is too big" (the public Bot API, or a local one without --local).
    too_big = _send_document(tg, chat, user, b"y" * 10, "export.csv", "sum it", size=25 * 1024 * 1024)
    run = finished_run(bot, tg, too_big)
    assert run["status"] == "failed" and "up to 20 MB" in run["error"] and "local Bot API server" in run["error"]
    wait_for(lambda: any("export.csv is too big to download" in t and "up to 20 MB" in t
                         for t in _texts(tg, 7105)), WAIT, what="the 20 MB reply")
    assert not db_rows(bot.db, "SELECT * FROM steps WHERE run_id = ?", (run["id"],))
    assert _file_path(too_big) not in tg.downloads and _file_path(big) not in tg.downloads


def test_the_public_bot_api_limit_is_told_before_anything_is_fetched():
    """With api.telegram.org (TELEGRAM_API_URL unset), a file Telegram states is over 20 MB is refused at once."""
    from bots.telegram import size_refusal

    files = [("export.csv", "F1", 25 * 1024 * 1024)]
    told = size_refusal(files, 50, 10, public_api=True)
    assert told.startswith("export.csv is 25.0 MB. Telegram's public Bot API serves bots files up to 20 MB")
    assert "local Bot API server in --local mode" in told and "docs/telegram.md" in told
    assert size_refusal(files, 50, 10, public_api=False) is None  # a local Bot API server: getFile decides
    assert "over the limit of 20 MB" in size_refusal(files, 20, 10, public_api=False)
    assert size_refusal([("a.csv", "F2", None)], 50, 10, public_api=True) is None  # no size stated: streaming caps


def test_a_failed_download_gets_a_clear_reply(bot, tg):
    chat, user = private(tg, 7106)
    update = _send_document(tg, chat, user, CSV, "gone.csv", "sum it", missing=True)
    run = finished_run(bot, tg, update)
    assert run["status"] == "failed" and run["error"].startswith("gone.csv could not be downloaded (HTTP 404)")
    wait_for(lambda: any("gone.csv could not be downloaded" in t for t in _texts(tg, 7106)), WAIT,
             what="the failure reply")
    assert not db_rows(bot.db, "SELECT * FROM steps WHERE run_id = ?", (run["id"],))


def test_two_turns_reuse_the_file_and_reset_clears_it(bot, tg, llm):
    chat, user = private(tg, 7107)
    first = _send_document(tg, chat, user, CSV + b"west,2024-03,7\n", "sales.csv", "total by region tag=t7107a")
    assert finished_run(bot, tg, first)["status"] == "succeeded"
    downloads = len(tg.downloads)
    second = ask(tg, chat, user, "now chart it tag=t7107b")
    run = finished_run(bot, tg, second)
    assert run["status"] == "succeeded", (run, bot.log_tail())
    assert len(tg.downloads) == downloads  # no new upload
    assert "sales.csv: region,month,amount" in visible_text(_answer(tg, bot, 7107, second))
    wait_calls(tg, lambda c: c.method == "sendPhoto" and c.chat_id == 7107
               and c.files["photo"][0] == "chart.png", "the chart", bot)
    conversation = runs_where(bot.db, "id = ?", (run["id"],))[0]["conversation"]
    assert db_rows(bot.db, "SELECT * FROM workspace_files WHERE conversation = ?", (conversation,))
    ask(tg, chat, user, "/reset")
    wait_for(lambda: any(t.startswith("History and files cleared") for t in _texts(tg, 7107)), WAIT,
             what="the reset reply")
    assert not db_rows(bot.db, "SELECT * FROM workspace_files WHERE conversation = ?", (conversation,))


def test_a_retried_update_with_a_file_downloads_once(bot, tg, llm):
    chat, user = private(tg, 7108)
    file = tg.add_file(CSV)
    update = tg.update(message=tg.document(chat, user, file, "once.csv", caption="count rows tag=once7108"))
    tg.queue(update, update)  # delivered twice, as after a crash between fetch and confirm
    assert finished_run(bot, tg, update)["status"] == "succeeded"
    _answer(tg, bot, 7108, update)
    assert len(runs_where(bot.db, "conversation = ?", ("telegram:7108",))) == 1
    assert tg.downloads.count(_file_path(update)) == 1
    assert len(tg.calls_of("getFile")) == len({c.params["file_id"] for c in tg.calls_of("getFile")})


def test_a_local_bot_api_server_file_is_read_from_its_directory(bot, tg, llm, tmp_path):
    """--local mode: getFile gives a path on the server's disk (shared with serve) and no 20 MB limit."""
    chat, user = private(tg, 7109)
    update = _send_document(tg, chat, user, CSV, "big.csv", "sum it tag=local7109", local=True,
                            size=25 * 1024 * 1024)
    run = finished_run(bot, tg, update)
    assert run["status"] == "succeeded", (run, bot.log_tail())
    assert "big.csv: region,month,amount" in visible_text(_answer(tg, bot, 7109, update))
    assert not [d for d in tg.downloads if d.endswith(_file_path(update))]  # read from disk, not over HTTP

    # A path outside the server's directory for this bot is never read (serve's own files stay out of chats).
    secret = tmp_path / "serve-secrets" / "file.bin"
    outside = _send_document(tg, chat, user, b"OPENAI_API_KEY=sk-not-for-chats\n", "x.csv", "show it",
                             local=True, local_path=str(secret))
    run = finished_run(bot, tg, outside)
    assert run["status"] == "failed" and "outside its directory" in run["error"]
    assert not db_rows(bot.db, "SELECT * FROM steps WHERE run_id = ?", (run["id"],))
    wait_for(lambda: any("x.csv: the Bot API server gave a local path outside" in t for t in _texts(tg, 7109)),
             WAIT, what="the refusal")


def test_a_file_still_arriving_shows_receiving_and_can_be_cancelled(bot, tg):
    chat, user = private(tg, 7110)
    update = _send_document(tg, chat, user, CSV * 4000, "slow.csv", "sum it tag=slow7110", stall=True)
    task_id = update["message"]["message_id"]
    progress = wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7110 and c.reply_to == task_id
                          and c.params.get("reply_markup"), "the progress message", bot)[0]
    assert progress.params["text"].startswith("📥 Receiving the file: sum it tag=slow7110")
    assert "📎 slow.csv" in progress.params["text"]
    run = runs_where(bot.db, "delivery_id = ?", (delivery(tg, update),))[0]
    assert run["status"] == "held"
    query = tg.callback(user, progress.result, f"cancel:{run['id']}")
    tg.queue(tg.update(callback_query=query))
    assert bot.wait_status(run["id"], timeout=WAIT)["status"] == "cancelled"
    assert final_edit(tg, bot, 7110, progress.result["message_id"]).params["text"].startswith("Cancelled")
    tg.release()
    conversation = run["conversation"]
    assert not db_rows(bot.db, "SELECT * FROM workspace_files WHERE conversation = ?", (conversation,))


# ------------------------------------------------------------------------------------------ approvals (issue 14)
@contextlib.contextmanager
def mail_bot(llm: ScriptedLLM, tmp_path: Path, uid_base: int, **env: str) -> Iterator[tuple[FakeTelegram, Serve]]:
    """A fake Bot API and a server of their own with test_approvals' `confirm` mail tool (sent mails are read
    with test_approvals._sent from tmp_path/sent.jsonl)."""
    from tests.test_approvals import TOOLS

    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS.format(sent=str(tmp_path / "sent.jsonl")))
    with FakeTelegram(TOKEN, BOT) as fake:
        server = Serve(telegram_env(llm, tmp_path / "autocode.db", fake.api_url, uid_base, AUTOCODE_TOOLS=str(tools),
                                    **env), tmp_path / "serve.log", tmp_path)
        try:
            server.wait_ready()
            server.db = tmp_path / "autocode.db"
            yield fake, server
        finally:
            server.close()


def test_approvals_with_an_inline_keyboard(llm, tmp_path):
    from tests.test_approvals import _sent

    sent = tmp_path / "sent.jsonl"
    with mail_bot(llm, tmp_path, UID_BASE + 640, TELEGRAM_ADMIN_USERS=str(ADMIN_ID)) as (fake, server):
        group = fake.group_chat(-1001102)
        asker, other = fake.user(7401, "Asker"), fake.user(7402, "Other")

        def asked(update) -> Call:
            return wait_calls(fake, lambda c: c.method == "sendMessage" and c.chat_id == -1001102
                              and c.reply_to == update["message"]["message_id"]
                              and "approve:" in json.dumps(c.params.get("reply_markup")),
                              "the approval message", server)[0]

        def press(user, message: Call, verb: str) -> Call:
            run_data = json.loads(json.dumps(message.params["reply_markup"]))
            data = [b["callback_data"] for row in run_data["inline_keyboard"] for b in row
                    if b["callback_data"].startswith(verb)][0]
            query = fake.callback(user, message.result, data)
            fake.queue(fake.update(callback_query=query))
            return wait_calls(fake, lambda c: c.method == "answerCallbackQuery"
                              and c.params["callback_query_id"] == query["id"], "the answer", server)[0]

        first = ask(fake, group, asker, "/run email the boss tag=ap1")
        message = asked(first)
        shown = visible_text(message)
        assert "send_email needs your approval" in shown
        assert 'send_email("boss@example.com", subject="Q3 numbers", body="up 4%")' in shown
        refused = press(other, message, "approve:")  # someone else's click decides nothing
        assert refused.params.get("show_alert") is True and "Only the person who asked" in refused.params["text"]
        assert _sent(sent) == []
        assert press(asker, message, "deny:").params["text"] == "send_email: denied."
        run = finished_run(server, fake, first)
        assert run["status"] == "succeeded" and _sent(sent) == []
        output = json.loads(db_rows(server.db, "SELECT output_json FROM steps WHERE run_id = ?",
                                    (run["id"],))[0]["output_json"])
        assert output == {"sent": False, "why": "send_email was not run: telegram:asker denied it"}
        wait_calls(fake, lambda c: c.method == "editMessageText" and c.params["message_id"] ==
                   message.result["message_id"] and "denied by asker" in c.params["text"], "the decision", server)

        second = ask(fake, group, asker, "/run email the boss tag=ap2")
        assert press(asker, asked(second), "approve:").params["text"] == "send_email: approved."
        assert finished_run(server, fake, second)["status"] == "succeeded"
        assert len(_sent(sent)) == 1

        # Cancel while the call waits: the run ends cancelled, the approval message says so, nothing is sent.
        third = ask(fake, group, asker, "/run email the boss tag=ap3")
        waiting = asked(third)
        run = runs_where(server.db, "delivery_id = ?", (delivery(fake, third),))[0]
        progress = [c for c in fake.calls_of("sendMessage", -1001102) if c.reply_to == third["message"]["message_id"]
                    and "cancel:" in json.dumps(c.params.get("reply_markup"))][0]
        fake.queue(fake.update(callback_query=fake.callback(asker, progress.result, f"cancel:{run['id']}")))
        assert server.wait_status(run["id"], timeout=WAIT)["status"] == "cancelled"
        wait_calls(fake, lambda c: c.method == "editMessageText" and c.params["message_id"] ==
                   waiting.result["message_id"] and "the task was cancelled" in c.params["text"]
                   and not c.params.get("reply_markup"), "the approval message's end", server)
        assert [a["status"] for a in db_rows(server.db, "SELECT status FROM approvals WHERE run_id = ?",
                                             (run["id"],))] == ["cancelled"]
        assert len(_sent(sent)) == 1


def test_the_approval_shows_the_last_argument_after_a_long_first_one(llm, tmp_path):
    from tests.test_approvals import _sent, shows_the_whole_shape

    with mail_bot(llm, tmp_path, UID_BASE + 960) as (fake, server):
        chat, user = private(fake, 7420)
        update = ask(fake, chat, user, "email the team attack")
        message = wait_calls(fake, lambda c: c.method == "sendMessage" and c.chat_id == 7420
                             and "approve:" in json.dumps(c.params.get("reply_markup")), "the approval message",
                             server)[0]
        shown = visible_text(message)
        assert len(shown) <= 4096
        shows_the_whole_shape(shown)
        data = [b["callback_data"] for row in message.params["reply_markup"]["inline_keyboard"] for b in row
                if b["callback_data"].startswith("deny:")][0]
        fake.queue(fake.update(callback_query=fake.callback(user, message.result, data)))
        assert finished_run(server, fake, update)["status"] == "succeeded"
        assert _sent(tmp_path / "sent.jsonl") == []


def test_an_approval_nobody_decides_in_time_is_denied_in_telegram(llm, tmp_path):
    from tests.test_approvals import _sent

    sent = tmp_path / "sent.jsonl"
    with mail_bot(llm, tmp_path, UID_BASE + 704, AUTOCODE_APPROVAL_TIMEOUT="1") as (fake, server):
        chat, user = private(fake, 7411)
        update = ask(fake, chat, user, "email the boss tag=ap4")
        message = wait_calls(fake, lambda c: c.method == "sendMessage" and c.chat_id == 7411
                             and "approve:" in json.dumps(c.params.get("reply_markup")), "the approval", server)[0]
        assert "No answer within 1 s denies it." in visible_text(message)
        run = finished_run(server, fake, update)
        assert run["status"] == "succeeded" and _sent(sent) == []
        output = json.loads(db_rows(server.db, "SELECT output_json FROM steps WHERE run_id = ?",
                                    (run["id"],))[0]["output_json"])
        assert output == {"sent": False, "why": "send_email was not run: nobody approved it within 1 s"}
        wait_calls(fake, lambda c: c.method == "editMessageText" and c.params["message_id"] ==
                   message.result["message_id"] and "not approved in time (denied)" in c.params["text"]
                   and not c.params.get("reply_markup"), "the approval message's end", server)
        assert [a["status"] for a in db_rows(server.db, "SELECT status FROM approvals WHERE run_id = ?",
                                             (run["id"],))] == ["timeout"]
