"""Tool declarations (original AutoCodeAgent dict format), tools files, toolsets and the trusted tool host."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from agent_core.budget import BudgetExceeded, BudgetLimits, CountedUsage, RunBudget
from tools.builtin import GEOCODE_CODE
from tools.host import ToolHost
from tools.registry import (
    LLM_HELPER,
    Tool,
    ToolError,
    ToolSet,
    build_toolset,
    describe_functions,
    describe_guides,
    load_tools_file,
    tool_from_dict,
)

SEND_EMAIL = "def send_email(to: str, body: str) -> dict:\n    return {'to': to, 'sent': True}\n"


def write_tools_file(tmp_path: Path, source: str, name: str = "my_tools.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# ---------------------------------------------------------------- tool_from_dict


def test_library_declaration():
    tool = tool_from_dict({"lib_name": ["numpy"]})
    assert tool == Tool("library", ["numpy"])
    assert tool.functions == {}


def test_library_declaration_with_string_and_whitespace():
    tool = tool_from_dict({"lib_names": " pandas "})
    assert (tool.kind, tool.lib_names) == ("library", ["pandas"])


@pytest.mark.parametrize(
    "spec",
    [
        {"lib_name": ["geopy"], "instructions": "Use geodesic for distances."},
        {"lib_name": ["geopy"], "code_example": "from geopy.distance import geodesic"},
        {"lib_name": ["geopy"], "instructions": "x", "code_example": "y", "use_exactly_code_example": False},
    ],
)
def test_guide_declaration(spec):
    tool = tool_from_dict(spec)
    assert tool.kind == "guide"
    assert tool.lib_names == ["geopy"]
    assert tool.instructions == spec.get("instructions", "")
    assert tool.code_example == spec.get("code_example", "")
    assert tool.functions == {}


@pytest.mark.parametrize("flag", ["use_exactly_code_example", "use_exaclty_code_example"])
def test_exact_declaration(flag):
    spec = {
        "lib_names": ["smtplib"],
        "instructions": "Send an email.",
        flag: True,
        "code_example": SEND_EMAIL,
    }
    tool = tool_from_dict(spec)
    assert tool.kind == "exact"
    assert tool.functions == {"send_email": "send_email(to: str, body: str) -> dict"}
    assert tool.lib_names == ["smtplib"]
    assert tool.instructions == "Send an email."
    assert tool.code_example == SEND_EMAIL.strip()


def test_exact_declaration_lists_only_public_top_level_functions():
    code = (
        "import os\n\ndef _helper():\n    pass\n\ndef a(x, *args, y=1, **kw):\n    def inner():\n        pass\n"
        "    return x\n\ndef b():\n    return 1\n"
    )
    tool = tool_from_dict({"use_exactly_code_example": True, "code_example": code})
    assert tool.functions == {"a": "a(x, *args, y=1, **kw)", "b": "b()"}
    assert tool.lib_names == []


def test_exact_without_code_example():
    with pytest.raises(ToolError, match="mytool: use_exactly_code_example needs a code_example"):
        tool_from_dict({"lib_name": ["x"], "use_exactly_code_example": True}, "mytool")


def test_exact_code_that_does_not_parse():
    with pytest.raises(ToolError) as info:
        tool_from_dict({"use_exactly_code_example": True, "code_example": "def broken(:\n    pass"}, "TOOLS[3]")
    assert str(info.value).startswith("TOOLS[3]: code_example does not parse:")


def test_exact_code_without_public_function():
    with pytest.raises(ToolError, match="defines no public function"):
        tool_from_dict({"use_exactly_code_example": True, "code_example": "def _private():\n    pass\nX = 1"})


@pytest.mark.parametrize("spec, kind", [(["numpy"], "list"), ("numpy", "str"), (None, "NoneType")])
def test_non_dict_declaration(spec, kind):
    with pytest.raises(ToolError, match=f"TOOLS\\[0\\]: expected a dict, got {kind}"):
        tool_from_dict(spec, "TOOLS[0]")


@pytest.mark.parametrize("spec", [{}, {"instructions": "use it"}, {"lib_name": []}])
def test_declaration_without_library(spec):
    with pytest.raises(ToolError, match="declares no library"):
        tool_from_dict(spec)


@pytest.mark.parametrize("libs", [[""], [3], {"numpy": 1}])
def test_bad_library_names(libs):
    with pytest.raises(ToolError, match="lib_name/lib_names must be a list of library names"):
        tool_from_dict({"lib_name": libs})


# ---------------------------------------------------------------- load_tools_file / build_toolset


def test_load_tools_file(tmp_path):
    path = write_tools_file(
        tmp_path,
        f'''
        EMAIL = {SEND_EMAIL!r}
        TOOLS = [
            {{"lib_name": ["numpy"]}},
            {{"lib_names": ["smtplib"], "instructions": "mail", "use_exaclty_code_example": True, "code_example": EMAIL}},
        ]
        ''',
    )
    tools, include_builtins = load_tools_file(path)
    assert include_builtins is True
    assert [t.kind for t in tools] == ["library", "exact"]
    assert tools[1].functions == {"send_email": "send_email(to: str, body: str) -> dict"}


def test_tools_file_without_tools(tmp_path):
    path = write_tools_file(tmp_path, "TOOL = []\n")
    with pytest.raises(ToolError, match="must define TOOLS"):
        load_tools_file(path)


def test_tools_file_tools_not_a_list(tmp_path):
    path = write_tools_file(tmp_path, "TOOLS = {'lib_name': ['numpy']}\n")
    with pytest.raises(ToolError, match="must define TOOLS"):
        load_tools_file(path)


def test_tools_file_that_raises(tmp_path):
    path = write_tools_file(tmp_path, "import json\nraise RuntimeError('no config here')\nTOOLS = []\n")
    with pytest.raises(ToolError) as info:
        load_tools_file(path)
    message = str(info.value)
    assert "failed to load" in message
    assert "RuntimeError: no config here" in message
    assert str(path) in message


def test_tools_file_with_syntax_error(tmp_path):
    path = write_tools_file(tmp_path, "TOOLS = [\n")
    with pytest.raises(ToolError, match="failed to load: SyntaxError"):
        load_tools_file(path)


def test_tools_file_missing(tmp_path):
    path = tmp_path / "nope.py"
    with pytest.raises(ToolError, match="does not exist"):
        load_tools_file(path)


def test_tools_file_bad_entry_is_located(tmp_path):
    path = write_tools_file(tmp_path, "TOOLS = [{'lib_name': ['numpy']}, {'use_exactly_code_example': True}]\n")
    with pytest.raises(ToolError, match=r"my_tools.py TOOLS\[1\]: use_exactly_code_example needs a code_example"):
        load_tools_file(path)


def test_builtin_toolset():
    toolset = build_toolset(None)
    assert [t.kind for t in toolset.tools] == ["library", "library", "library", "library", "guide", "exact", "llm"]
    assert toolset.trusted_names == ["geocode", "llm"]
    assert toolset.libraries == ["numpy", "pandas", "matplotlib", "openpyxl", "geopy"]


def test_tools_file_extends_builtins(tmp_path):
    path = write_tools_file(
        tmp_path, f"TOOLS = [{{'use_exactly_code_example': True, 'code_example': {SEND_EMAIL!r}}}]\n"
    )
    toolset = build_toolset(path)
    assert toolset.trusted_names == ["geocode", "llm", "send_email"]


def test_include_builtins_false(tmp_path):
    path = write_tools_file(
        tmp_path,
        f"""
        INCLUDE_BUILTINS = False
        TOOLS = [
            {{"lib_name": ["pandas"]}},
            {{"use_exactly_code_example": True, "code_example": {SEND_EMAIL!r}}},
        ]
        """,
    )
    toolset = build_toolset(path)
    assert toolset.tools[0] is LLM_HELPER
    assert [t.kind for t in toolset.tools] == ["llm", "library", "exact"]
    assert toolset.trusted_names == ["llm", "send_email"]
    assert toolset.libraries == ["pandas"]
    assert not toolset.allows_import("numpy")  # the built-in numpy declaration is gone
    assert toolset.allows_import("pandas.io")
    assert toolset.allows_import("json")


def test_duplicate_function_names_in_file(tmp_path):
    path = write_tools_file(
        tmp_path,
        f"""
        TOOLS = [
            {{"use_exactly_code_example": True, "code_example": {SEND_EMAIL!r}}},
            {{"use_exactly_code_example": True, "code_example": "def send_email(x):\\n    return x"}},
        ]
        """,
    )
    with pytest.raises(ToolError, match="trusted function names declared twice: send_email"):
        build_toolset(path)


def test_function_name_clashing_with_builtin(tmp_path):
    path = write_tools_file(
        tmp_path, "TOOLS = [{'use_exactly_code_example': True, 'code_example': 'def geocode(a):\\n    return a'}]\n"
    )
    with pytest.raises(ToolError, match="declared twice: geocode"):
        build_toolset(path)


def test_allows_import_by_distribution_name(tmp_path):
    # python-dotenv installs the import name `dotenv`; declaring the distribution name is enough
    path = write_tools_file(tmp_path, "INCLUDE_BUILTINS = False\nTOOLS = [{'lib_name': ['python-dotenv']}]\n")
    toolset = build_toolset(path)
    assert toolset.allows_import("dotenv")
    assert not toolset.allows_import("requests")


# ---------------------------------------------------------------- describe_*


def test_describe_functions_and_guides(tmp_path):
    toolset = build_toolset(None)
    functions = describe_functions(toolset)
    assert "- geocode(address: str) -> dict | None: Returns {address, latitude, longitude} or None" in functions
    assert "- llm(prompt: str, system: str = '') -> str: One-shot text work" in functions
    bare = describe_functions(toolset, with_instructions=False)
    assert bare.splitlines() == ["- geocode(address: str) -> dict | None", "- llm(prompt: str, system: str = '') -> str"]

    guides = describe_guides(toolset)
    assert guides.startswith("geopy: Distances: geopy.distance.geodesic((lat, lon), (lat, lon)).km.")
    assert "never a geocoder directly" in guides
    assert "numpy" not in guides and "pandas" not in guides  # a plain library has nothing to describe

    path = write_tools_file(tmp_path, "TOOLS = [{'lib_name': ['shapely'], 'instructions': 'Geometry.', "
                                      "'code_example': 'from shapely import Point\\np = Point(0, 0)'}]\n")
    guides = describe_guides(build_toolset(path))
    assert "shapely: Geometry.\n  e.g. from shapely import Point\n  p = Point(0, 0)" in guides


def test_describe_functions_empty():
    assert describe_functions(ToolSet([Tool("library", ["numpy"])])) == "(none)"


# ---------------------------------------------------------------- ToolHost


def exact_toolset(code: str) -> ToolSet:
    return ToolSet([tool_from_dict({"use_exactly_code_example": True, "code_example": code}), LLM_HELPER])


async def no_llm(prompt: str, system: str) -> str:
    raise AssertionError("the LLM helper should not be called")


async def test_exact_tool_runs_in_host_with_its_environment(monkeypatch):
    monkeypatch.setenv("AUTOCODE_TEST_TOOL_SECRET", "host-only-value")
    code = """
import os
import datetime
import numpy as np

def lookup(key, scale=1):
    return {
        "secret": os.environ["AUTOCODE_TEST_TOOL_SECRET"],
        "key": key,
        "values": np.arange(3) * scale,
        "when": datetime.date(2024, 1, 2),
        "pair": (1, 2),
    }
"""
    host = ToolHost(exact_toolset(code), no_llm, timeout_s=5)
    assert host.names == ["lookup", "llm"]
    value = await host.call("lookup", ["k"], {"scale": 2})
    assert value == {"secret": "host-only-value", "key": "k", "values": [0, 2, 4], "when": "2024-01-02", "pair": [1, 2]}
    assert json.loads(json.dumps(value)) == value


async def test_exact_tool_defined_once(monkeypatch):
    code = "import itertools\nCOUNTER = itertools.count(1)\n\ndef tick():\n    return next(COUNTER)\n"
    host = ToolHost(exact_toolset(code), no_llm, timeout_s=5)
    assert [await host.call("tick", [], {}) for _ in range(3)] == [1, 2, 3]


async def test_exact_tool_error_propagates():
    host = ToolHost(exact_toolset("def boom(x):\n    raise LookupError(f'no {x}')\n"), no_llm, timeout_s=5)
    with pytest.raises(LookupError, match="no thing"):
        await host.call("boom", ["thing"], {})


async def test_exact_tool_timeout():
    host = ToolHost(exact_toolset("import time\n\ndef slow():\n    time.sleep(0.8)\n    return 1\n"), no_llm, timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="slow did not return within 0.2s"):
        await host.call("slow", [], {})
    assert time.monotonic() - started < 0.6


async def test_llm_calls_go_to_the_helper():
    seen: list[tuple[str, str]] = []

    async def helper(prompt: str, system: str) -> str:
        seen.append((prompt, system))
        return f"answer {len(seen)}"

    host = ToolHost(build_toolset(None), helper, timeout_s=5)
    assert await host.call("llm", ["Summarize this"], {"system": "Be brief"}) == "answer 1"
    assert await host.call("llm", [], {"prompt": "Only prompt"}) == "answer 2"
    assert await host.call("llm", ["Positional", "Sys positional"], {}) == "answer 3"
    assert await host.call("llm", ["None system"], {"system": None}) == "answer 4"
    assert seen == [
        ("Summarize this", "Be brief"),
        ("Only prompt", ""),
        ("Positional", "Sys positional"),
        ("None system", ""),
    ]


@pytest.mark.parametrize("args, kwargs", [([""], {}), (["   "], {}), ([], {}), ([42], {}), ([], {"prompt": None})])
async def test_llm_requires_a_prompt(args, kwargs):
    host = ToolHost(build_toolset(None), no_llm, timeout_s=5)
    with pytest.raises(ValueError, match="non-empty prompt"):
        await host.call("llm", args, kwargs)


async def test_llm_unexpected_argument():
    host = ToolHost(build_toolset(None), no_llm, timeout_s=5)
    with pytest.raises(TypeError, match=r"unexpected arguments \['temperature'\]"):
        await host.call("llm", ["hi"], {"temperature": 0.2})


async def test_llm_helper_timeout():
    async def slow(prompt: str, system: str) -> str:
        import asyncio

        await asyncio.sleep(5)
        return "late"

    host = ToolHost(build_toolset(None), slow, timeout_s=0.2)
    with pytest.raises(TimeoutError):
        await host.call("llm", ["hi"], {})


async def counting_helper(prompt: str, system: str) -> str:
    return f"answer to {prompt}"


async def test_llm_calls_are_capped_per_step_and_the_cap_restarts_with_each_step():
    budget = RunBudget(BudgetLimits(calls_per_step=3), CountedUsage())
    host = ToolHost(build_toolset(None), counting_helper, timeout_s=5, budget=budget)
    budget.new_step()
    assert [await host.call("llm", [f"q{i}"], {}) for i in range(3)] == ["answer to q0", "answer to q1", "answer to q2"]
    with pytest.raises(BudgetExceeded, match=r"llm\(\): this step already made 3 calls \(AUTOCODE_LLM_CALLS_PER_STEP\)"):
        await host.call("llm", ["q3"], {})
    with pytest.raises(ValueError):  # a malformed call is refused for what it is, and not counted
        await host.call("llm", [""], {})
    budget.new_step()
    assert await host.call("llm", ["next step"], {}) == "answer to next step"


async def test_llm_prompt_size_cap_counts_the_system_text():
    host = ToolHost(build_toolset(None), no_llm, timeout_s=5,
                    budget=RunBudget(BudgetLimits(prompt_max_chars=100), CountedUsage()))
    for args in (["p" * 101], ["p" * 60, "s" * 41]):
        with pytest.raises(BudgetExceeded, match=r"have 101 characters, over the limit of 100 \(AUTOCODE_LLM_PROMPT_MAX_CHARS\)"):
            await host.call("llm", args, {})


async def test_llm_token_budgets_are_checked_before_each_call():
    usage = CountedUsage(run_tokens=90, daily_tokens=0)
    budget = RunBudget(BudgetLimits(run_tokens=100, daily_tokens=1000), usage)
    host = ToolHost(build_toolset(None), counting_helper, timeout_s=5, budget=budget)
    assert await host.call("llm", ["x" * 40], {}) == "answer to " + "x" * 40  # ~10 tokens: 100 is not passed
    budget.spent(10)
    with pytest.raises(BudgetExceeded, match=r"used 100 of its 100 LLM tokens.*AUTOCODE_MAX_TOKENS_PER_RUN"):
        await host.call("llm", ["x"], {})
    with pytest.raises(BudgetExceeded, match="AUTOCODE_MAX_TOKENS_PER_RUN"):
        budget.check_run_call()

    daily = RunBudget(BudgetLimits(run_tokens=0, daily_tokens=50), CountedUsage(daily_tokens=45))
    host = ToolHost(build_toolset(None), counting_helper, timeout_s=5, budget=daily)
    with pytest.raises(BudgetExceeded, match=r"used 45 of their 50 LLM tokens for today.*AUTOCODE_DAILY_TOKENS_PER_USER"):
        await host.call("llm", ["x" * 40], {})  # ~10 tokens would go past the day's 50
    assert await host.call("llm", ["x" * 20], {}) == "answer to " + "x" * 20
    daily.spent(5)
    with pytest.raises(BudgetExceeded, match="AUTOCODE_DAILY_TOKENS_PER_USER"):
        daily.check_run_call()


def test_a_budget_travels_with_a_job_as_json():
    budget = RunBudget(BudgetLimits(run_tokens=500, daily_tokens=900, calls_per_step=7, prompt_max_chars=300),
                       CountedUsage(run_tokens=120, daily_tokens=400))
    copy = RunBudget.from_snapshot(json.loads(json.dumps(budget.snapshot())))
    assert copy.limits == budget.limits
    assert (copy.usage.run_tokens(), copy.usage.daily_tokens()) == (120, 400)
    copy.spent(30)
    assert (copy.usage.run_tokens(), copy.usage.daily_tokens()) == (150, 430)


def test_geocode_code_defines_its_signature():
    assert "def geocode(address: str) -> dict | None:" in GEOCODE_CODE
