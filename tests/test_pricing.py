"""Cost in money (agent_core/pricing.py) and budgets in money (agent_core/budget.py): real runs against the scripted
OpenAI server (each reply states its token counts), real SQLite, the scheduler's submission, `autocode usage` and
`autocode show` as subprocesses, `GET /api/usage` of a real `autocode serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_core.config import ConfigError, Settings
from agent_core.pricing import DEFAULT_PRICES_FILE, PriceTable, format_usd, prices_for, spend
from agent_core.scheduler import RunScheduler
from tests.conftest import direct, plan, subtask, verdict

SLACK_THREAD = "slack:T1:C1:1700000000.000100"


def test_shipped_table_prices_common_openai_models_and_says_where_from():
    table = PriceTable.load(DEFAULT_PRICES_FILE)
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3-mini", "o4-mini",
                  "gpt-5", "gpt-5-mini"):
        assert table.price_of(model) is not None, model
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert table.price_of("gpt-4o-2024-08-06") == table.price_of("gpt-4o")  # a dated snapshot: its base's price
    assert table.price_of("gpt-4o-mini-2024-07-18") == table.price_of("gpt-4o-mini")
    for local in ("qwen2.5-coder:7b", "llama3.1:8b", "gpt-oss-20b.gguf", "fake-model"):
        assert table.price_of(local) is None and table.cost(local, 10**6, 10**6) == 0
    header = DEFAULT_PRICES_FILE.read_text()
    assert "https://openai.com/api/pricing" in header and "2026-12-03" in header


async def test_cost_of_a_run_is_its_tokens_times_the_models_price(make_agent, llm_server):
    agent = make_agent(model="gpt-4o")
    llm_server.reply_json(plan(subtask("ask", "def ask():\n    return {'r': llm('hi')}")), prompt_tokens=1200,
                          completion_tokens=300)
    llm_server.reply("hello", prompt_tokens=40, completion_tokens=10)
    llm_server.reply_json(verdict("hello"), prompt_tokens=900, completion_tokens=150)

    result = await agent.run("greet", "c1")

    assert result.status == "succeeded", result.error
    cost = spend(agent.storage, prices_for(agent.settings), run_id=result.run_id)
    prompt, completion = 1200 + 40 + 900, 300 + 10 + 150
    assert (cost.prompt_tokens, cost.completion_tokens, cost.llm_calls) == (prompt, completion, 3)
    assert cost.usd == pytest.approx((prompt * 2.50 + completion * 10.00) / 1_000_000)
    assert cost.unpriced_models == [] and cost.describe() == format_usd(cost.usd)


async def test_a_local_model_costs_nothing_and_says_no_price(make_agent, llm_server):
    agent = make_agent(model="qwen2.5-coder:7b")
    llm_server.reply_json(direct("4"), prompt_tokens=5000, completion_tokens=2000)

    result = await agent.run("2+2?", "c1")

    cost = spend(agent.storage, prices_for(agent.settings), run_id=result.run_id)
    assert cost.usd == 0 and cost.prompt_tokens == 5000
    assert cost.unpriced_models == ["qwen2.5-coder:7b"]
    assert cost.describe() == "no price (qwen2.5-coder:7b)"
    assert cost.to_json()["by_model"][0]["priced"] is False


def test_the_operator_s_price_file_replaces_the_table(tmp_path):
    mine = tmp_path / "prices.toml"
    mine.write_text('[models]\n"my-deployment" = { prompt = 1.0, completion = 2.0 }\n')
    table = prices_for(Settings(prices_file=mine))
    assert table.cost("my-deployment", 1_000_000, 500_000) == pytest.approx(2.0)
    assert table.price_of("gpt-4o") is None  # the file replaces the shipped table

    env = Settings.from_env({"AUTOCODE_PRICES_FILE": str(mine), "AUTOCODE_MONTHLY_BUDGET_PER_USER": "$12.50",
                             "AUTOCODE_MODELS": "gpt-4o, gpt-4o-mini,gpt-4o"})
    assert (env.prices_file, env.monthly_budget_per_user, env.models) == (mine, 12.5, ("gpt-4o", "gpt-4o-mini"))
    with pytest.raises(ConfigError, match="AUTOCODE_MONTHLY_BUDGET_PER_USER must be an amount in USD"):
        Settings.from_env({"AUTOCODE_MONTHLY_BUDGET_PER_USER": "lots"})

    broken = tmp_path / "broken.toml"
    broken.write_text('[models]\n"gpt-4o" = { prompt = -1, completion = 2 }\n')
    with pytest.raises(ConfigError, match=r"broken.toml: the prices of 'gpt-4o' must be numbers of 0 or more"):
        prices_for(Settings(prices_file=broken))
    with pytest.raises(ConfigError, match="cannot read the price table"):
        prices_for(Settings(prices_file=tmp_path / "missing.toml"))


# ------------------------------------------------------------------------------------------ budgets in money


async def test_a_user_over_the_money_budget_is_refused_at_submission(make_agent, llm_server):
    # gpt-4o-mini: 10,000 prompt + 5,000 completion tokens = $0.0015 + $0.0030 = $0.0045, over a $0.004 budget.
    agent = make_agent(model="gpt-4o-mini", monthly_budget_per_user=0.004)
    llm_server.reply_json(direct("done"), prompt_tokens=10_000, completion_tokens=5_000)
    first = await agent.run("first", "c1", user="slack:T1:U1")
    # checked after each LLM call of a run too: the plan's reply went past the budget
    assert first.status == "failed" and first.error.startswith("Stopped: you have spent $0.0045 of your $0.004 ")

    scheduler = RunScheduler(agent)
    await scheduler.start()
    try:
        refused = scheduler.submit("second", "c1", user="slack:T1:U1")
        other = scheduler.submit("for bob", "c2", user="slack:T1:U2")
    finally:
        await scheduler.stop(grace=0)
    assert (refused.status, refused.reason, refused.run_id) == ("refused", "budget", None)
    assert refused.message.startswith("You have spent $0.0045 of your $0.004 LLM budget for this month "
                                      "(AUTOCODE_MONTHLY_BUDGET_PER_USER); it renews on ")
    assert [r["task"] for r in agent.storage.list_runs("c1")] == ["first"]
    assert other.status == "queued"  # another user's month is their own


async def test_a_channel_over_its_budget_is_refused_and_a_running_run_stopped(make_agent, llm_server):
    agent = make_agent(model="gpt-4o")
    agent.channel_settings.set("slack:T1:C1", "budget", "0.01")
    # The plan alone costs 4,000 × $2.50/M = $0.01: the evaluator's call is not made.
    llm_server.reply_json(plan(subtask("one", "def one():\n    return {'x': 1}")), prompt_tokens=4_000,
                          completion_tokens=0)

    stopped = await agent.run("count", SLACK_THREAD, user="slack:T1:U1")

    assert stopped.status == "failed"
    assert stopped.error.startswith("Stopped: this channel has spent $0.01 of its $0.01 LLM budget for this "
                                    "month (its settings); it renews on ")
    assert len(llm_server.chat_requests()) == 1

    scheduler = RunScheduler(agent)
    await scheduler.start()
    try:
        thread = scheduler.submit("again", "slack:T1:C1:1700000000.000999", user="slack:T1:U2")
        elsewhere = scheduler.submit("again", "slack:T1:C2:1700000000.000999", user="slack:T1:U2")
    finally:
        await scheduler.stop(grace=0)
    assert thread.status == "refused" and thread.reason == "budget"
    assert thread.message.startswith("This channel has spent $0.01 of its $0.01 LLM budget for this month")
    assert elsewhere.status == "queued"


async def test_llm_helper_calls_are_refused_once_the_month_is_spent(make_agent, llm_server):
    agent = make_agent(model="gpt-4o", monthly_budget_per_user=0.02)
    asks = subtask("ask", "def ask():\n    out = []\n    for i in range(3):\n"
                          "        try:\n            out.append(llm(f'q{i}'))\n"
                          "        except Exception as exc:\n            out.append(str(exc))\n"
                          "    return {'out': out}")
    llm_server.reply_json(plan(asks), prompt_tokens=1_000, completion_tokens=0)  # $0.0025
    llm_server.reply("a", prompt_tokens=0, completion_tokens=2_000)  # $0.02 more: the month is spent

    result = await agent.run("ask thrice", "c1", user="telegram:7")

    outputs = result.steps[0].output["out"]
    assert outputs[0] == "a"
    assert outputs[1].startswith("llm: BudgetExceeded: llm(): the user has spent $0.0225 of their $0.02 LLM budget")
    assert result.status == "failed" and result.error.startswith("Stopped: you have spent $0.0225 of your $0.02")
    assert len(llm_server.chat_requests()) == 2  # the plan and one llm(): nothing after the budget was spent


# ------------------------------------------------------------------------------------------ CLI and API


def cli(tmp_path: Path, llm_base_url: str, *args: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    environ.update(AUTOCODE_DB=str(tmp_path / "cli.db"), OPENAI_BASE_URL=llm_base_url, OPENAI_API_KEY="sk-cli",
                   AUTOCODE_MODEL="gpt-4o-mini", AUTOCODE_LLM_MAX_RETRIES="0")
    environ.update(env or {})
    return subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_autocode_usage_and_show_print_the_cost(tmp_path, llm_server):
    llm_server.reply_json(direct("4"), prompt_tokens=100_000, completion_tokens=20_000)
    ran = cli(tmp_path, llm_server.base_url, "run", "2+2?", "--json", "--conversation", "k1")
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["run_id"]
    llm_server.reply_json(direct("5"), prompt_tokens=1_000, completion_tokens=1_000)
    assert cli(tmp_path, llm_server.base_url, "run", "2+3?", "--conversation", "k2",
               env={"AUTOCODE_MODEL": "llama3.1:8b"}).returncode == 0

    # gpt-4o-mini: 100,000 × $0.15/M + 20,000 × $0.60/M = $0.015 + $0.012
    text = cli(tmp_path, llm_server.base_url, "usage", "--conversation", "k1").stdout
    assert "conversation k1: 1 runs, 1 LLM calls, 100000 prompt + 20000 completion tokens; cost $0.027" in text
    everything = cli(tmp_path, llm_server.base_url, "usage", "--month").stdout
    assert "cost $0.027 (no price: llama3.1:8b)" in everything
    assert "gpt-4o-mini: 1 calls, 100000 prompt + 20000 completion tokens, $0.027" in everything
    assert "llama3.1:8b: 1 calls, 1000 prompt + 1000 completion tokens, no price" in everything
    as_json = json.loads(cli(tmp_path, llm_server.base_url, "usage", "--json").stdout)
    assert as_json["cost_usd"] == pytest.approx(0.027) and as_json["no_price_models"] == ["llama3.1:8b"]
    assert as_json["prompt_tokens"] == 101_000
    by = cli(tmp_path, llm_server.base_url, "usage", "--by", "conversation").stdout
    assert by.index("k1: 1 LLM calls") < by.index("k2: 1 LLM calls")
    assert "no price (llama3.1:8b)" in by
    assert cli(tmp_path, llm_server.base_url, "usage", "--month", "2020-01").stdout.startswith(
        "all users, 2020-01: 0 runs")

    shown = cli(tmp_path, llm_server.base_url, "show", run_id).stdout
    assert "Total: 1 calls, 100000 prompt + 20000 completion tokens; cost $0.027" in shown
    assert "Settings: model gpt-4o-mini · 3 iterations · tools: all · network off · no budget" in shown
    details = json.loads(cli(tmp_path, llm_server.base_url, "show", run_id, "--json").stdout)
    assert details["cost"]["cost_usd"] == pytest.approx(0.027) and details["settings"]["model"] == "gpt-4o-mini"


@pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")
def test_usage_api_has_the_cost_and_refuses_over_budget(tmp_path):
    from tests.server_helpers import ScriptedLLM, Serve, serve_env

    with ScriptedLLM() as llm:
        env = serve_env(llm, tmp_path / "autocode.db", AUTOCODE_MODEL="gpt-4o",
                        AUTOCODE_MONTHLY_BUDGET_PER_USER="0.0001")
        server = Serve(env, tmp_path / "serve.log", tmp_path)
        try:
            server.wait_ready()
            # tokens=40: each call 40 prompt + 40 completion tokens of gpt-4o = $0.0005
            run_id = server.submit_ok("job tag=M1 tokens=40", "money", user="alice")
            run = server.wait_status(run_id)
            assert run["cost"]["cost_usd"] == pytest.approx(0.0005)  # the plan; the evaluator was refused
            assert run["error"].startswith("Stopped: you have spent $0.0005 of your $0.0001 LLM budget")
            assert run["settings"]["model"] == "gpt-4o"

            usage = server.http.get("/api/usage", params={"user": "alice"}).json()
            assert usage["cost_usd"] == pytest.approx(0.0005) and usage["prompt_tokens"] == 40
            assert usage["month_budget"]["budget_usd"] == 0.0001 and usage["month_budget"]["exceeded"] is True
            assert server.http.get("/api/usage", params={"month": "2020-01"}).json()["cost_usd"] == 0
            assert server.http.get("/api/usage", params={"month": "January"}).status_code == 400

            refused = server.submit("job tag=M2", "money", user="alice")
            assert refused.status_code == 429
            assert "You have spent $0.0005 of your $0.0001 LLM budget for this month" in refused.json()["message"]
        finally:
            server.close()
