"""Static checks of subtasks against the built-in toolset (numpy, geopy guide, geocode, llm)."""

from __future__ import annotations

import ast
import textwrap

import pytest

from agent_core.checks import CheckError, CheckedSubtask, check_subtask
from agent_core.plan import Subtask
from tools.registry import build_toolset


@pytest.fixture(scope="module")
def toolset():
    return build_toolset(None)


def make(name: str, code: str, input_from_tool: str = "", imports: list[str] | None = None) -> Subtask:
    return Subtask(tool_name=name, code=textwrap.dedent(code), input_from_tool=input_from_tool, imports=imports or [])


def defined_functions(code: str) -> list[str]:
    return [n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_builtin_toolset_shape(toolset):
    assert toolset.trusted_names == ["geocode", "llm"]
    assert toolset.libraries == ["numpy", "pandas", "matplotlib", "openpyxl", "geopy"]  # the data tools of issue 13 too


# ---------------------------------------------------------------- signatures and order


def test_valid_first_subtask(toolset):
    code = "def load():\n    return {'n': 1}\n"
    checked = check_subtask(make("load", code), [], toolset)
    assert isinstance(checked, CheckedSubtask)
    assert checked.input_from is None
    assert checked.code == code  # untouched when nothing was dropped
    assert checked.notes == []


def test_first_subtask_with_optional_argument_is_fine(toolset):
    checked = check_subtask(make("load", "def load(x=None):\n    return {}\n"), [], toolset)
    assert checked.input_from is None


def test_valid_later_subtask_defaults_to_previous(toolset):
    code = "def total(previous_output):\n    return {'t': previous_output['n']}\n"
    checked = check_subtask(make("total", code), ["load", "clean"], toolset)
    assert checked.input_from == "clean"
    assert checked.notes == []


def test_later_subtask_with_explicit_earlier_input(toolset):
    code = "def total(data):\n    return {}\n"
    checked = check_subtask(make("total", code, input_from_tool="load"), ["load", "clean"], toolset)
    assert checked.input_from == "load"


def test_later_subtask_with_optional_argument_is_fine(toolset):
    checked = check_subtask(make("total", "def total(data=None):\n    return {}\n"), ["load"], toolset)
    assert checked.input_from == "load"


def test_first_subtask_with_argument(toolset):
    with pytest.raises(CheckError, match="first subtask and must take no arguments"):
        check_subtask(make("load", "def load(previous_output):\n    return {}\n"), [], toolset)


def test_first_subtask_with_input_from_tool(toolset):
    with pytest.raises(CheckError, match="input_from_tool must be empty"):
        check_subtask(make("load", "def load():\n    return {}\n", input_from_tool="other"), [], toolset)


def test_later_subtask_with_zero_arguments(toolset):
    with pytest.raises(CheckError, match=r"exactly one argument, previous_output \(it takes 0\)"):
        check_subtask(make("total", "def total():\n    return {}\n"), ["load"], toolset)


def test_later_subtask_with_two_arguments(toolset):
    with pytest.raises(CheckError, match=r"exactly one argument, previous_output \(it takes 2\)"):
        check_subtask(make("total", "def total(a, b):\n    return {}\n"), ["load"], toolset)


def test_required_keyword_only_argument(toolset):
    with pytest.raises(CheckError, match="keyword-only"):
        check_subtask(make("total", "def total(a, *, b):\n    return {}\n"), ["load"], toolset)


def test_async_function_rejected(toolset):
    with pytest.raises(CheckError, match="plain def"):
        check_subtask(make("load", "async def load():\n    return {}\n"), [], toolset)


def test_missing_function_name(toolset):
    code = "def helper():\n    return {}\n"
    with pytest.raises(CheckError, match="does not define a function named load"):
        check_subtask(make("load", code), [], toolset)


def test_function_only_nested_is_missing(toolset):
    code = "class Box:\n    def load(self):\n        return {}\n"
    with pytest.raises(CheckError, match="does not define a function named load"):
        check_subtask(make("load", code), [], toolset)


def test_syntax_error_mentions_line(toolset):
    code = "def load():\n    x = 1\n    return {'x': x\n\n"
    with pytest.raises(CheckError) as info:
        check_subtask(make("load", code), [], toolset)
    message = str(info.value)
    assert message.startswith("SyntaxError:")
    assert "(line 3)" in message


def test_input_from_unknown_subtask(toolset):
    with pytest.raises(CheckError) as info:
        check_subtask(make("c", "def c(x):\n    return {}\n", input_from_tool="nope"), ["a", "b"], toolset)
    assert "'nope' is not an earlier subtask" in str(info.value)
    assert "earlier: a, b" in str(info.value)


def test_input_from_later_subtask(toolset):
    # plan order a, b, c, d; checking b, which names d (after it) as its input
    with pytest.raises(CheckError, match="'d' is not an earlier subtask"):
        check_subtask(make("b", "def b(x):\n    return {}\n", input_from_tool="d"), ["a"], toolset)


def test_input_from_itself(toolset):
    with pytest.raises(CheckError, match="'b' is not an earlier subtask"):
        check_subtask(make("b", "def b(x):\n    return {}\n", input_from_tool="b"), ["a"], toolset)


# ---------------------------------------------------------------- imports


@pytest.mark.parametrize(
    "imports",
    [
        "import json, os.path",
        "from collections import Counter",
        "import numpy as np",
        "from geopy.distance import geodesic",
        "import collections.abc\nfrom datetime import datetime as dt",
        "from __future__ import annotations",
    ],
)
def test_allowed_imports(toolset, imports):
    code = f"{imports}\n\ndef load():\n    return {{}}\n"
    checked = check_subtask(make("load", code), [], toolset)
    assert checked.code == code


def test_import_inside_function_allowed(toolset):
    code = "def load():\n    import numpy\n    return {'x': int(numpy.int64(3))}\n"
    assert check_subtask(make("load", code), [], toolset).code == code


@pytest.mark.parametrize(
    "imports, module",
    [
        ("import requests", "requests"),
        ("from requests.adapters import HTTPAdapter", "requests.adapters"),
        ("import json, pydantic", "pydantic"),
        ("import openai", "openai"),
    ],
)
def test_undeclared_import_rejected(toolset, imports, module):
    code = f"{imports}\n\ndef load():\n    return {{}}\n"
    with pytest.raises(CheckError) as info:
        check_subtask(make("load", code), [], toolset)
    message = str(info.value)
    assert f"import of {module!r} is not allowed" in message
    assert "numpy, pandas, matplotlib, openpyxl, geopy" in message


def test_undeclared_import_inside_function_rejected(toolset):
    code = "def load():\n    import requests\n    return {}\n"
    with pytest.raises(CheckError, match="'requests' is not allowed"):
        check_subtask(make("load", code), [], toolset)


@pytest.mark.parametrize("entry", ["import requests", "requests", "from requests import get", "requests>=2"])
def test_imports_field_is_checked(toolset, entry):
    code = "def load():\n    return {}\n"
    with pytest.raises(CheckError, match="import of 'requests[^']*' is not allowed"):
        check_subtask(make("load", code, imports=[entry]), [], toolset)


@pytest.mark.parametrize("entry", ["numpy", "import numpy as np", "from geopy.distance import geodesic", "json", ""])
def test_imports_field_allowed_entries(toolset, entry):
    checked = check_subtask(make("load", "def load():\n    return {}\n", imports=[entry]), [], toolset)
    assert checked.input_from is None


@pytest.mark.parametrize("statement", ["from . import sibling", "from ..pkg import thing", "from .mod import x"])
def test_relative_import_rejected(toolset, statement):
    code = f"{statement}\n\ndef load():\n    return {{}}\n"
    with pytest.raises(CheckError, match="relative imports are not allowed"):
        check_subtask(make("load", code), [], toolset)


# ---------------------------------------------------------------- trusted tools


def test_redefinition_of_geocode_is_dropped(toolset):
    code = """
    def geocode(address):
        return {"latitude": 0.0, "longitude": 0.0}

    def locate():
        return {"where": geocode("Paris")}
    """
    checked = check_subtask(make("locate", code), [], toolset)
    assert defined_functions(checked.code) == ["locate"]
    assert 'geocode("Paris")' in checked.code or "geocode('Paris')" in checked.code
    assert len(checked.notes) == 1
    assert "geocode" in checked.notes[0]
    compile(checked.code, "<locate>", "exec")


def test_redefinition_of_llm_and_class_is_dropped(toolset):
    code = """
    import json

    class llm:
        pass

    def llm(prompt, system=""):
        return "fake"

    def summarize(previous_output):
        return {"summary": llm("summarize: " + json.dumps(previous_output))}
    """
    checked = check_subtask(make("summarize", code), ["load"], toolset)
    tree = ast.parse(checked.code)
    assert [type(n).__name__ for n in tree.body] == ["Import", "FunctionDef"]
    assert defined_functions(checked.code) == ["summarize"]
    assert len(checked.notes) == 2
    assert all("llm" in note for note in checked.notes)
    assert checked.input_from == "load"


@pytest.mark.parametrize("name", ["geocode", "llm"])
def test_subtask_named_after_trusted_tool(toolset, name):
    code = f"def {name}():\n    return {{}}\n"
    with pytest.raises(CheckError, match=f"'{name}' is the name of a trusted tool"):
        check_subtask(make(name, code), [], toolset)
