"""Settings per channel or chat (agent_core/channel_settings.py): stored in real SQLite, applied to real runs (the
scripted OpenAI server records every request's body, the steps run in real sandboxes), set through the API of the
module, `autocode settings` and `POST /api/settings` of a real `autocode serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent_core.channel_settings import SettingError, scope_of
from tests.conftest import STEP_NUMBERS, direct, plan, subtask, user_prompt, verdict
from tests.server_helpers import db_rows
from tests.system_packages import requires
from tests.test_scaleout import cluster, redis_url  # noqa: F401 (fixtures: redis-server, serve and a worker)

SLACK_THREAD = "slack:T1:C1:1700000000.000100"
SLACK_CHANNEL = "slack:T1:C1"
MODELS = ("fake-model", "gpt-4o", "gpt-4o-mini")


def system_prompt(body: dict) -> str:
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "system")


def test_scope_of_the_conversation_keys_of_the_adapters():
    # bots/slack.py: slack:{team}:{channel}:{thread_ts} and slack:{team}:{channel}:cmd-{trigger}
    assert scope_of("slack:T1:C1:1700000000.000100") == "slack:T1:C1"
    assert scope_of("slack:T1:D9:cmd-123.456") == "slack:T1:D9"
    # bots/telegram.py: telegram:{chat} and telegram:{chat}:{topic}
    assert scope_of("telegram:-1001234:77") == "telegram:-1001234"
    assert scope_of("telegram:42") == "telegram:42"
    assert scope_of("console") == "console" and scope_of("api") == "api"


async def test_a_channels_model_reaches_planner_evaluator_and_llm_helper(make_agent, llm_server):
    agent = make_agent(models=MODELS)
    agent.channel_settings.set(SLACK_CHANNEL, "model", "gpt-4o", by="admin")
    asks = subtask("ask", "def ask():\n    return {'reply': llm('Say hi.')}")
    llm_server.reply_json(plan(asks))
    llm_server.reply("hi")
    llm_server.reply_json(verdict("hi"))

    result = await agent.run("greet", SLACK_THREAD, user="slack:T1:U1")

    assert result.status == "succeeded", result.error
    requests = llm_server.chat_requests()
    assert [r.get("response_format", {}).get("json_schema", {}).get("name") for r in requests] == [
        "plan", None, "evaluation"]
    assert [r["model"] for r in requests] == ["gpt-4o", "gpt-4o", "gpt-4o"]
    calls = agent.storage.llm_calls(result.run_id)
    assert [(c["purpose"], c["model"]) for c in calls] == [("plan", "gpt-4o"), ("helper", "gpt-4o"),
                                                           ("evaluate", "gpt-4o")]
    run = agent.storage.get_run(result.run_id)
    stored = json.loads(run["settings_json"])
    assert (run["scope"], stored["model"], stored["overridden"]) == (SLACK_CHANNEL, "gpt-4o", ["model"])

    # Another channel, and the same channel after a reset, use the operator's model.
    llm_server.reply_json(direct("hello"))
    await agent.run("greet", "slack:T1:C2:1700000000.000200")
    agent.channel_settings.reset(SLACK_CHANNEL)
    llm_server.reply_json(direct("hello"))
    await agent.run("greet", SLACK_THREAD)
    assert [r["model"] for r in llm_server.chat_requests()[3:]] == ["fake-model", "fake-model"]


async def test_a_model_the_operator_does_not_offer_is_refused(make_agent):
    agent = make_agent(models=("gpt-4o-mini", "gpt-4o"))
    with pytest.raises(SettingError) as refused:
        agent.channel_settings.set(SLACK_CHANNEL, "model", "gpt-4.5-preview")
    message = str(refused.value)
    assert "'gpt-4.5-preview' is not one of the models this server offers" in message
    assert "fake-model, gpt-4o-mini, gpt-4o" in message and "AUTOCODE_MODELS" in message
    assert agent.storage.channel_settings(SLACK_CHANNEL) == {}  # nothing stored
    assert agent.channel_settings.effective(SLACK_THREAD).model == "fake-model"

    # A model the operator stops offering is no longer used by the channel: the default applies.
    agent.channel_settings.set(SLACK_CHANNEL, "model", "gpt-4o")
    narrower = make_agent(models=("gpt-4o-mini",))
    assert narrower.channel_settings.effective(SLACK_THREAD).model == "fake-model"


async def test_max_iterations_of_a_channel_bounds_the_repairs(make_agent, llm_server):
    agent = make_agent(max_iterations=3)
    effective = agent.channel_settings.set("telegram:-100", "max_iterations", "1")
    assert effective.max_iterations == 1
    broken = subtask("add_up", "def add_up():\n    return {'total': 1 / 0}")
    llm_server.reply_json(plan(broken))
    llm_server.reply_json(verdict(ok=False, retry_from="add_up", new=[STEP_NUMBERS], thoughts="divides by zero"))

    result = await agent.run("add", "telegram:-100:5")

    assert result.status == "failed" and result.iterations == 1
    assert result.error == "No satisfactory result after 1 iterations: step add_up failed: ZeroDivisionError: division by zero"
    assert len(llm_server.chat_requests()) == 2  # plan, one evaluation: no repair was run
    assert "1 of 1" in user_prompt(llm_server.chat_requests()[1])
    for bad in ("0", "11", "two"):
        with pytest.raises(SettingError, match="max_iterations is a whole number from 1 to 10"):
            agent.channel_settings.set("telegram:-100", "max_iterations", bad)


# A step that calls a tool the run does not have, as an attacker would: without the stub the sandbox leaves out,
# it takes the message channel from the closure of a stub it does have (llm) and sends the call itself.
RAW_CALL = textwrap.dedent("""
    def sneak():
        import json
        cells = {name: cell.cell_contents for name, cell in zip(llm.__code__.co_freevars, llm.__closure__)}
        cells['send']({'op': 'call', 'id': 99, 'name': 'geocode', 'args': ['Paris'], 'kwargs': {}})
        reply = json.loads(cells['rfile'].readline())
        try:
            geocode('Paris')
            stub = 'callable'
        except NameError as exc:
            stub = str(exc)
        return {'reply': reply, 'stub': stub}
""")


async def test_a_disabled_tool_is_not_offered_to_the_planner_and_its_call_is_refused(make_agent, llm_server):
    agent = make_agent()
    effective = agent.channel_settings.set(SLACK_CHANNEL, "tools", "-geocode,-pandas")
    assert "geocode" not in effective.tools and "pandas" not in effective.tools and "llm" in effective.tools
    llm_server.reply_json(plan(subtask("sneak", RAW_CALL)))
    llm_server.reply_json(verdict("done"))

    result = await agent.run("find Paris", SLACK_THREAD)

    assert result.status == "succeeded", result.error
    planner, evaluator = llm_server.chat_requests()
    # The functions the planner is offered (the geopy guide's own text still names geocode: it is the operator's)
    assert "- geocode(address: str)" not in system_prompt(planner) and "pandas" not in system_prompt(planner)
    assert "- llm(prompt: str" in system_prompt(planner)
    assert "geocode" not in system_prompt(evaluator)
    output = result.steps[0].output
    assert output["reply"] == {"id": 99, "ok": False, "error": "unknown tool 'geocode'"}
    assert output["stub"] == "name 'geocode' is not defined"
    assert not any(c["purpose"] == "helper" for c in agent.storage.llm_calls(result.run_id))

    # A disabled library cannot be imported either; the other channel still has every tool.
    llm_server.reply_json(plan(subtask("table", "def table():\n    import pandas\n    return {}")))
    llm_server.reply_json(verdict(ok=False, thoughts="pandas refused"))
    refused = await agent.run("make a table", SLACK_THREAD)
    assert refused.steps[0].error.startswith("Check failed: import of 'pandas' is not allowed")
    llm_server.reply_json(direct("ok"))
    await agent.run("hello", "slack:T1:C2:1.2")
    assert "- geocode(address: str)" in system_prompt(llm_server.chat_requests()[-1])


async def test_the_tool_host_refuses_a_disabled_llm_helper(make_agent):
    agent = make_agent()
    effective = agent.channel_settings.set("console", "tools", "numpy")
    from tools.host import ToolHost

    async def helper(prompt: str, system: str) -> str:
        raise AssertionError("a disabled llm() must not be sent")

    host = ToolHost(agent.channel_settings.toolset_for(effective), helper, timeout_s=5)
    assert host.names == []
    with pytest.raises(PermissionError, match="llm is not a tool this run may use"):
        await host.call("llm", ["hi"], {})
    with pytest.raises(SettingError, match="There is no tool 'nmupy'; the tools are numpy, pandas"):
        agent.channel_settings.set("console", "tools", "nmupy")


async def test_network_only_when_the_operator_allows_it(make_agent):
    closed = make_agent(sandbox_network=False)
    with pytest.raises(SettingError, match="the operator has it off for all runs"):
        closed.channel_settings.set(SLACK_CHANNEL, "network", "on")
    assert closed.channel_settings.effective(SLACK_THREAD).network is False

    # With the operator's network on, "off" is stored and shown, but the executor sets the network for all runs.
    opened = make_agent(sandbox_network=True)
    effective = opened.channel_settings.set(SLACK_CHANNEL, "network", "off")
    assert (effective.network, effective.network_applied) == (False, True)
    assert "network off (not applied: the sandbox's network is on for all runs)" in effective.describe()
    assert opened.channel_settings.set(SLACK_CHANNEL, "network", True).network is True


async def test_settings_text_budget_and_reset(make_agent):
    agent = make_agent(models=MODELS, max_iterations=3)
    store = agent.channel_settings
    assert store.effective(SLACK_THREAD).describe() == (
        "model fake-model · 3 iterations · tools: all · network off · no budget")
    store.set(SLACK_CHANNEL, "model", "gpt-4o")
    effective = store.set(SLACK_CHANNEL, "budget", "$5")
    assert effective.describe() == "model gpt-4o · 3 iterations · tools: all · network off · budget $5.00/month"
    assert effective.overridden == ("model", "budget")
    for bad in ("five", "-3"):
        with pytest.raises(SettingError, match="The budget is an amount in USD per month"):
            store.set(SLACK_CHANNEL, "budget", bad)
    with pytest.raises(SettingError, match="There is no setting 'colour'; the settings are model, max_iterations"):
        store.set(SLACK_CHANNEL, "colour", "blue")
    assert store.reset(SLACK_CHANNEL, "budget").budget_usd is None
    assert store.set(SLACK_CHANNEL, "tools", "none").describe().count("tools: none") == 1
    assert store.reset(SLACK_CHANNEL).overridden == ()
    assert agent.storage.channel_settings(SLACK_CHANNEL) == {}


# ------------------------------------------------------------------------------------------ the CLI


def cli(tmp_path: Path, llm_base_url: str, *args: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    environ.update(AUTOCODE_DB=str(tmp_path / "cli.db"), OPENAI_BASE_URL=llm_base_url, OPENAI_API_KEY="sk-cli",
                   AUTOCODE_MODEL="fake-model", AUTOCODE_LLM_MAX_RETRIES="0", **(env or {}))
    return subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_autocode_settings_shows_sets_and_refuses(tmp_path, llm_server):
    models = {"AUTOCODE_MODELS": "gpt-4o-mini,gpt-4o"}
    shown = cli(tmp_path, llm_server.base_url, "settings", "--conversation", SLACK_THREAD, env=models)
    assert shown.returncode == 0, shown.stderr
    assert "Settings of slack:T1:C1: model fake-model · 3 iterations · tools: all" in shown.stdout
    assert not (tmp_path / "cli.db").exists()  # showing the defaults makes no database

    changed = cli(tmp_path, llm_server.base_url, "settings", "--scope", SLACK_CHANNEL, "set", "model", "gpt-4o",
                  env=models)
    assert changed.returncode == 0, changed.stderr
    assert "model gpt-4o" in changed.stdout and "set here: model" in changed.stdout
    cli(tmp_path, llm_server.base_url, "settings", "--scope", SLACK_CHANNEL, "set", "tools", "--", "-geocode")

    refused = cli(tmp_path, llm_server.base_url, "settings", "--scope", SLACK_CHANNEL, "set", "model", "gpt-5",
                  env=models)
    assert refused.returncode == 1
    assert "'gpt-5' is not one of the models this server offers: fake-model, gpt-4o-mini, gpt-4o" in refused.stderr

    as_json = json.loads(cli(tmp_path, llm_server.base_url, "settings", "--conversation", SLACK_THREAD, "--json",
                             env=models).stdout)
    assert as_json["settings"]["model"] == "gpt-4o" and "geocode" not in as_json["settings"]["tools"]
    assert as_json["choices"]["models"] == ["fake-model", "gpt-4o-mini", "gpt-4o"]

    llm_server.reply_json(direct("hello"))
    ran = cli(tmp_path, llm_server.base_url, "run", "hi", "--conversation", SLACK_THREAD, "--json", env=models)
    assert ran.returncode == 0, ran.stderr
    assert llm_server.chat_requests()[-1]["model"] == "gpt-4o"
    run_id = json.loads(ran.stdout)["run_id"]
    show = cli(tmp_path, llm_server.base_url, "show", run_id, env=models).stdout
    assert "Settings: model gpt-4o · 3 iterations · tools: numpy, pandas, matplotlib, openpyxl, geopy, llm" in show

    reset = cli(tmp_path, llm_server.base_url, "settings", "--scope", SLACK_CHANNEL, "reset", env=models)
    assert "model fake-model" in reset.stdout and "set here" not in reset.stdout


# ------------------------------------------------------------------------------------------ the HTTP API


@pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")
def test_settings_api_of_autocode_serve(tmp_path):
    from tests.server_helpers import ScriptedLLM, Serve, serve_env

    with ScriptedLLM() as llm:
        server = Serve(serve_env(llm, tmp_path / "autocode.db", AUTOCODE_MODELS="gpt-4o,gpt-4o-mini"),
                       tmp_path / "serve.log", tmp_path)
        try:
            server.wait_ready()
            api = server.http
            assert api.get("/api/settings").status_code == 400
            got = api.get("/api/settings", params={"conversation": SLACK_THREAD})
            assert got.status_code == 200, got.text
            assert got.json()["scope"] == SLACK_CHANNEL and got.json()["settings"]["model"] == "fake-model"

            bad = api.post("/api/settings", params={"scope": SLACK_CHANNEL}, json={"name": "model", "value": "gpt-9"})
            assert bad.status_code == 400
            assert "'gpt-9' is not one of the models this server offers" in bad.json()["error"]
            ok = api.post("/api/settings", params={"scope": SLACK_CHANNEL},
                          json={"name": "model", "value": "gpt-4o", "by": "U1"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["text"].startswith("model gpt-4o · 3 iterations")

            run_id = server.submit_ok("job tag=S1", SLACK_THREAD)
            run = server.wait_status(run_id)
            assert run["status"] == "succeeded", run
            assert run["settings"]["model"] == "gpt-4o"
            assert {r["model"] for r in llm.fake.chat_requests()} == {"gpt-4o"}

            reset = api.post("/api/settings", params={"scope": SLACK_CHANNEL}, json={"reset": True})
            assert reset.json()["settings"]["model"] == "fake-model"
        finally:
            server.close()


# ------------------------------------------------------------------------------------------ on Celery workers


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
@requires("redis-server")
def test_on_a_worker_llm_calls_use_the_channels_model_and_count_against_the_money_budget(cluster, llm_server):
    # gpt-4o: the plan's 1,000 prompt tokens cost $0.0025, each llm() reply's 1,000 completion tokens $0.01.
    llm_server.reply_json(plan(subtask("spend", (
        "def spend():\n"
        "    answered, refused = 0, []\n"
        "    for i in range(6):\n"
        "        try:\n"
        "            llm(f'q{i}')\n"
        "            answered += 1\n"
        "        except Exception as exc:\n"
        "            refused.append(str(exc))\n"
        "    return {'answered': answered, 'refused': refused}\n"))), prompt_tokens=1000, completion_tokens=0)
    llm_server.responder(lambda body: {"json": verdict("spent")} if "response_format" in body
                         else {"content": "a", "prompt_tokens": 0, "completion_tokens": 1000})
    server, _ = cluster(llm_server.base_url, workers=1, AUTOCODE_MODELS="gpt-4o",
                        AUTOCODE_MONTHLY_BUDGET_PER_USER="0.03")
    chosen = server.http.post("/api/settings", params={"scope": SLACK_CHANNEL}, json={"name": "model",
                                                                                       "value": "gpt-4o"})
    assert chosen.status_code == 200, chosen.text

    run_id = server.submit_ok("spend the month", SLACK_THREAD, user="slack:T1:U1")
    run = server.wait_status(run_id, timeout=90)

    output = json.loads(db_rows(server.db, "SELECT output_json FROM steps WHERE run_id = ?",
                                (run_id,))[0]["output_json"])
    assert output["answered"] == 3, output  # $0.0025 + 3 × $0.01 = $0.0325 ≥ $0.03: the fourth is refused
    assert len(output["refused"]) == 3
    assert all("the user has spent $0.0325 of their $0.03 LLM budget for this month" in text
               for text in output["refused"]), output
    assert {body["model"] for body in llm_server.chat_requests()} == {"gpt-4o"}
    assert len(llm_server.chat_requests()) == 4  # the plan and three llm(): the evaluator was refused too
    assert run["status"] == "failed" and run["error"].startswith("Stopped: you have spent $0.0325 of your $0.03")
    assert run["cost"]["cost_usd"] == pytest.approx(0.0325)
