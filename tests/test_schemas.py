"""The plan and evaluation schemas sent as response_format: they carry the rules the parser enforces (a non-empty
`subtasks`, identifier names), stay within what OpenAI's strict mode accepts, and use patterns llama.cpp's
json-schema-to-grammar can turn into a grammar.

The strict-mode rules below are OpenAI's "Supported schemas" (Structured Outputs guide): the supported types and
per-type keywords, the string formats, every object with `additionalProperties: false` and all of its properties
`required`, a root that is an object and not `anyOf`, the unsupported composition keywords, and the size limits
(5000 object properties, 120,000 characters of names and enum/const values, 1000 enum values; nesting: 10 levels
in the current guide, 5 in earlier versions — the stricter one is checked).

llama.cpp's converter (common/json-schema-to-grammar.cpp, grammars/README.md) rejects a pattern not anchored by ^
and $, skips lookarounds, and copies any other backslash escape (\\d, \\w...) into a GBNF literal, where it is no
valid escape; it translates literals, `.`, [classes], (groups), (?:groups), |, ? * + and {m,n}.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import jsonschema
import pytest
from pydantic import ValidationError

from agent_core.plan import EVALUATION_SCHEMA, IDENTIFIER_PATTERN, PLAN_SCHEMA, Evaluation, Plan, Subtask

from tests.conftest import STEP_NUMBERS, STEP_TOTAL, plan, subtask, verdict

# ---------------------------------------------------------------- a checker of OpenAI's strict-mode rules

TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
COMMON_KEYWORDS = {"type", "description", "enum", "const", "anyOf", "$ref"}
KEYWORDS_BY_TYPE = {
    "string": {"pattern", "format"},
    "number": {"multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"},
    "integer": {"multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"},
    "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties"},
    "boolean": set(),
    "null": set(),
}
FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
MAX_DEPTH = 5  # object/array levels from the root, the root included
MAX_PROPERTIES = 5000
MAX_STRING_CHARS = 120_000
MAX_ENUM_VALUES = 1000


def strict_mode_problems(schema: dict[str, Any]) -> list[str]:
    """What OpenAI's strict mode would refuse in `schema` (empty: accepted)."""
    problems: list[str] = []
    if schema.get("type") != "object" or "anyOf" in schema:
        problems.append("$: the root must be an object, not anyOf")
    totals = {"properties": 0, "chars": 0, "enum": 0}
    for name in schema.get("$defs", {}):
        totals["chars"] += len(name)
    _check(schema, "$", 1, problems, totals, root=True)
    if totals["properties"] > MAX_PROPERTIES:
        problems.append(f"{totals['properties']} object properties (at most {MAX_PROPERTIES})")
    if totals["chars"] > MAX_STRING_CHARS:
        problems.append(f"{totals['chars']} characters of names and enum values (at most {MAX_STRING_CHARS})")
    if totals["enum"] > MAX_ENUM_VALUES:
        problems.append(f"{totals['enum']} enum values (at most {MAX_ENUM_VALUES})")
    return problems


def _check(node: Any, path: str, depth: int, problems: list[str], totals: dict[str, int], root: bool = False) -> None:
    if not isinstance(node, dict):
        problems.append(f"{path}: a schema must be an object")
        return
    for value in node.get("enum", []) + ([node["const"]] if "const" in node else []):
        totals["chars"] += len(value) if isinstance(value, str) else 0
    totals["enum"] += len(node.get("enum", []))
    if "anyOf" in node:
        for i, branch in enumerate(node["anyOf"]):
            _check(branch, f"{path}.anyOf[{i}]", depth, problems, totals)
    if "$ref" in node:
        return
    types = node.get("type")
    types = types if isinstance(types, list) else [types] if types is not None else []
    if not types and "anyOf" not in node and "enum" not in node and "const" not in node:
        problems.append(f"{path}: no type")
    allowed = COMMON_KEYWORDS | ({"$defs"} if root else set())
    for kind in types:
        if kind not in TYPES:
            problems.append(f"{path}: unsupported type {kind!r}")
        allowed |= KEYWORDS_BY_TYPE.get(kind, set())
    for keyword in sorted(set(node) - allowed):
        problems.append(f"{path}: keyword {keyword!r} is not supported here")
    if "format" in node and node["format"] not in FORMATS:
        problems.append(f"{path}: format {node['format']!r} is not supported")
    if "object" in types or "array" in types:
        if depth > MAX_DEPTH:
            problems.append(f"{path}: nested {depth} levels deep (at most {MAX_DEPTH})")
    if "object" in types:
        properties = node.get("properties", {})
        totals["properties"] += len(properties)
        totals["chars"] += sum(len(name) for name in properties)
        if node.get("additionalProperties") is not False:
            problems.append(f"{path}: additionalProperties must be false")
        required = node.get("required", [])
        if sorted(required) != sorted(properties) or len(set(required)) != len(required):
            problems.append(f"{path}: every property must be required, once")
        for name, sub in properties.items():
            _check(sub, f"{path}.{name}", depth + 1, problems, totals)
    if "array" in types and "items" in node:
        _check(node["items"], f"{path}[]", depth + 1, problems, totals)
    for name, sub in node.get("$defs", {}).items():
        _check(sub, f"{path}.$defs.{name}", 1, problems, totals)


def patterns(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            yield schema["pattern"]
        for value in schema.values():
            yield from patterns(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from patterns(value)


# llama.cpp translates a backslash only before these (the escaped character becomes a literal).
_LLAMA_ESCAPABLE = set("^$.[]()|{}*+?")


def llama_cpp_pattern_problems(pattern: str) -> list[str]:
    """What llama.cpp's json-schema-to-grammar would refuse, skip or mistranslate in `pattern`."""
    problems = []
    if not (pattern.startswith("^") and pattern.endswith("$")):
        problems.append("not anchored by ^ and $")
    body = pattern[1:-1]
    for match in re.finditer(r"\\(.)", body):
        if match.group(1) not in _LLAMA_ESCAPABLE:
            problems.append(f"escape \\{match.group(1)} has no GBNF equivalent")
    if re.search(r"\(\?(?!:)", body):
        problems.append("lookaround or inline flag (skipped)")
    if re.search(r"[*+?}]\?", body):
        problems.append("lazy quantifier")
    for quantifier in re.findall(r"\{[^}]*\}", re.sub(r"\[[^\]]*\]", "", body)):
        if not re.fullmatch(r"\{\d+(,\d*)?\}", quantifier):
            problems.append(f"quantifier {quantifier}")
    unescaped = re.sub(r"\\.", "", body)
    if unescaped.count("(") != unescaped.count(")") or unescaped.count("[") != unescaped.count("]"):
        problems.append("unbalanced brackets")
    if "^" in re.sub(r"\[\^", "[", unescaped) or "$" in unescaped:
        problems.append("an anchor inside the pattern")
    return problems


# ---------------------------------------------------------------- the checkers themselves catch what they must


def test_strict_checker_flags_what_strict_mode_refuses():
    good = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    assert strict_mode_problems(good) == []
    assert strict_mode_problems({**good, "additionalProperties": True})
    assert strict_mode_problems({**good, "required": []})
    assert strict_mode_problems({**good, "properties": {"a": {"type": "string", "minLength": 1}}})
    assert strict_mode_problems({**good, "properties": {"a": {"type": "string", "default": ""}}})
    assert strict_mode_problems({**good, "properties": {"a": {"type": "string", "format": "uri"}}})
    assert strict_mode_problems({**good, "properties": {"a": {"allOf": [{"type": "string"}]}}})
    assert strict_mode_problems({**good, "properties": {"a": {"type": "array", "items": {"type": "string"},
                                                               "uniqueItems": True}}})
    assert strict_mode_problems({"anyOf": [good]})
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_DEPTH):
        deep = {"type": "array", "items": deep}
    assert strict_mode_problems({**good, "properties": {"a": deep}})
    assert not strict_mode_problems({**good, "properties": {"a": deep["items"]}})


@pytest.mark.parametrize("pattern", [
    r"[a-z]+", r"^\w+$", r"^\d{2}$", r"^(?=a)a$", r"^a+?$", r"^a{x}$", r"^(a$", r"^a^b$",
])
def test_llama_cpp_checker_flags_patterns_it_cannot_translate(pattern):
    assert llama_cpp_pattern_problems(pattern)


@pytest.mark.parametrize("pattern", [r"^[A-Za-z_][A-Za-z0-9_]*$", r"^(ab|c)?[^x]{1,3}\.$", r"^(?:a)$"])
def test_llama_cpp_checker_accepts_the_translated_subset(pattern):
    assert llama_cpp_pattern_problems(pattern) == []


# ---------------------------------------------------------------- the schemas as sent


def _sent_schemas(llm_server) -> dict[str, dict[str, Any]]:
    sent = {}
    for body in llm_server.chat_requests():
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            sent[fmt["json_schema"]["name"]] = fmt["json_schema"]
    return sent


async def test_schemas_sent_carry_the_parsers_rules_within_strict_mode(make_agent, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL))
    llm_server.reply_json(verdict("The total is 6."))
    agent = make_agent()

    result = await agent.run("Add 1, 2 and 3")

    assert result.status == "succeeded", result.error
    sent = _sent_schemas(llm_server)
    assert set(sent) == {"plan", "evaluation"}
    assert all(s["strict"] is True for s in sent.values())
    plan_schema, evaluation_schema = sent["plan"]["schema"], sent["evaluation"]["schema"]

    # A reply is a direct answer or subtasks, never both (issue 20): one branch each, the model picks one.
    direct_branch, code_branch = plan_schema["properties"]["reply"]["anyOf"]
    assert direct_branch["properties"] == {"direct_answer": {"type": "string"}}
    subtasks = code_branch["properties"]["subtasks"]
    assert subtasks["minItems"] == 1 and list(code_branch["properties"]) == ["subtasks"]
    for items in (subtasks["items"], evaluation_schema["properties"]["new_subtasks"]["items"]):
        assert items["properties"]["tool_name"]["pattern"] == "^[A-Za-z_][A-Za-z0-9_]{0,63}$"
        assert items["properties"]["input_from_tool"]["pattern"] == "^([A-Za-z_][A-Za-z0-9_]{0,63})?$"
        # Bounded lists and names (issue 20): a small model otherwise repeats one until the reply cap.
        assert items["properties"]["imports"]["maxItems"] == 12
        assert items["properties"]["imports"]["items"]["pattern"] == "^[A-Za-z_][A-Za-z0-9_.]{0,63}$"
    assert "minItems" not in evaluation_schema["properties"]["new_subtasks"]  # [] is how the evaluator gives up
    assert evaluation_schema["properties"]["retry_from"]["pattern"] == "^([A-Za-z_][A-Za-z0-9_]{0,63})?$"
    assert subtasks["maxItems"] == evaluation_schema["properties"]["new_subtasks"]["maxItems"] == 10

    for name, schema in (("plan", plan_schema), ("evaluation", evaluation_schema)):
        assert strict_mode_problems(schema) == [], name
        found = list(patterns(schema))
        assert found, name
        for pattern in found:
            assert llama_cpp_pattern_problems(pattern) == [], pattern
    assert sent["plan"]["schema"] == PLAN_SCHEMA and sent["evaluation"]["schema"] == EVALUATION_SCHEMA


# ---------------------------------------------------------------- the schemas say what the parser demands

def nested(*subtasks: dict[str, Any], direct_answer: str | None = None) -> dict[str, Any]:
    """A plan as PLAN_SCHEMA shapes it: {"main_task_thought", "reply": {"subtasks": [...]} or {"direct_answer"}}."""
    reply = {"direct_answer": direct_answer} if direct_answer is not None else {"subtasks": list(subtasks)}
    return {"main_task_thought": "simple", "reply": reply}


GOOD_PLAN = nested(STEP_NUMBERS, STEP_TOTAL)


def _plan_with(**changes: Any) -> dict[str, Any]:
    return nested({**STEP_NUMBERS, **changes}, STEP_TOTAL)


PARSER_REJECTS = {
    "subtasks missing": {"main_task_thought": "simple", "reply": {}},
    "tool_name prose": _plan_with(tool_name="The alien yourself!"),
    "tool_name starts with a digit": _plan_with(tool_name="1st"),
    "tool_name with a dash": _plan_with(tool_name="fetch-data"),
    "tool_name empty": _plan_with(tool_name=""),
    "code missing": nested({k: v for k, v in STEP_NUMBERS.items() if k != "code"}),
}


@pytest.mark.parametrize("case", sorted(PARSER_REJECTS))
def test_what_the_parser_rejects_the_plan_schema_rules_out(case):
    reply = PARSER_REJECTS[case]
    with pytest.raises(ValidationError):
        Plan.model_validate(reply)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(reply, PLAN_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_a_good_plan_and_evaluations_pass_the_schemas():
    jsonschema.validate(GOOD_PLAN, PLAN_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert not Plan.model_validate(GOOD_PLAN).direct
    direct = nested(direct_answer="You're welcome!")
    jsonschema.validate(direct, PLAN_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert Plan.model_validate(direct).direct and Plan.model_validate(direct).direct_answer == "You're welcome!"
    # Both at once, or an empty list of subtasks, the schema rules out (the model must choose):
    both = {"main_task_thought": "", "reply": {"direct_answer": "Hi!", "subtasks": [STEP_NUMBERS]}}
    for reply in (both, nested()):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(reply, PLAN_SCHEMA, cls=jsonschema.Draft202012Validator)
    # What the schema cannot say (a non-empty direct answer) the model says, and the reply is asked again:
    neither = nested(direct_answer="")
    jsonschema.validate(neither, PLAN_SCHEMA, cls=jsonschema.Draft202012Validator)
    with pytest.raises(ValidationError):
        Plan.model_validate(neither)
    for evaluation in (verdict("done"), verdict(ok=False, thoughts="impossible"),
                       verdict(ok=False, retry_from="add_up", new=[STEP_TOTAL])):
        jsonschema.validate(evaluation, EVALUATION_SCHEMA, cls=jsonschema.Draft202012Validator)
        Evaluation.model_validate(evaluation)


def test_evaluation_schema_rules_out_bad_repair_names():
    bad = verdict(ok=False, retry_from="add up", new=[subtask("The alien yourself!", "def x(): pass")])
    errors = list(jsonschema.Draft202012Validator(EVALUATION_SCHEMA).iter_errors(bad))
    assert {tuple(e.absolute_path) for e in errors} == {("retry_from",), ("new_subtasks", 0, "tool_name")}


@pytest.mark.parametrize("name", ["a", "_x", "get_numbers", "Step2", "x" * 80, "get data", "1st", "fetch-data",
                                  "", "a.b", "é", "The alien yourself!", "tab\tname"])
def test_identifier_pattern_agrees_with_the_validator(name):
    try:
        Subtask(tool_name=name, code="")
        accepted = True
    except ValidationError:
        accepted = False
    # ECMA-262 and Python agree on this pattern: ASCII classes, anchors, no flags.
    assert (re.fullmatch(IDENTIFIER_PATTERN[1:-1], name) is not None) == accepted


def test_schemas_are_compact():
    # They travel with every planner and evaluator call.
    assert len(json.dumps(PLAN_SCHEMA)) < 1200 and len(json.dumps(EVALUATION_SCHEMA)) < 1200
