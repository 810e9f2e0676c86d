"""Tolerant parsing of LLM replies into Plan / Evaluation, their validation, and the strict JSON schemas."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent_core.plan import (
    EVALUATION_SCHEMA,
    PLAN_SCHEMA,
    Evaluation,
    Plan,
    ReplyError,
    Subtask,
    extract_json_object,
    parse_reply,
    split_reasoning,
)

FIRST_CODE = "def get_numbers():\n    return {'numbers': [1, 2, 3]}\n"
SECOND_CODE = "def add_up(previous_output):\n    return {'total': sum(previous_output['numbers'])}\n"


def subtask(name: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "tool_name": name,
        "input_from_tool": extra.pop("input_from_tool", ""),
        "description": f"does {name}",
        "imports": [],
        "thought": "",
        "code": code if code is not None else f"def {name}(previous_output=None):\n    return {{}}\n",
        **extra,
    }


def plan_dict(*subtasks: dict[str, Any]) -> dict[str, Any]:
    return {"main_task": "add numbers", "main_task_thought": "simple", "subtasks": list(subtasks)}


TWO_STEP = plan_dict(subtask("get_numbers", FIRST_CODE), subtask("add_up", SECOND_CODE, input_from_tool="get_numbers"))


def make_plan(*names: str) -> Plan:
    return Plan.model_validate(plan_dict(*(subtask(n) for n in names)))


# ---------------------------------------------------------------- extract_json_object / parse_reply: shapes


def test_plain_json_plan():
    plan = parse_reply(json.dumps(TWO_STEP), Plan)  # with the main_task older replies echo: ignored
    assert plan.main_task_thought == "simple" and not plan.direct
    assert [s.tool_name for s in plan.subtasks] == ["get_numbers", "add_up"]
    assert plan.subtasks[0].code == FIRST_CODE
    assert plan.subtasks[1].input_from_tool == "get_numbers"


def test_json_fence_with_language_tag():
    text = "```json\n" + json.dumps(TWO_STEP, indent=2) + "\n```"
    plan = parse_reply(text, Plan)
    assert [s.code for s in plan.subtasks] == [FIRST_CODE, SECOND_CODE]


def test_fence_without_language_tag():
    text = "```\n" + json.dumps(TWO_STEP) + "\n```"
    assert extract_json_object(text) == TWO_STEP


def test_prose_before_and_after():
    text = "Sure! Here is the plan you asked for:\n\n" + json.dumps(TWO_STEP) + "\n\nLet me know if it works."
    assert extract_json_object(text) == TWO_STEP


def test_fenced_with_prose_before_and_after():
    text = "Here is the plan:\n```json\n" + json.dumps(TWO_STEP) + "\n```\nHope this helps."
    assert extract_json_object(text) == TWO_STEP


def test_python_literals_true_false_none():
    text = "{'satisfactory': True, 'final_answer': 'done', 'flag': False, 'extra': None, 'new_subtasks': []}"
    assert extract_json_object(text) == {
        "satisfactory": True, "final_answer": "done", "flag": False, "extra": None, "new_subtasks": [],
    }
    evaluation = parse_reply('{"satisfactory": False, "thoughts": "x", "new_subtasks": []}', Evaluation)
    assert evaluation.satisfactory is False
    assert evaluation.thoughts == "x"


def test_trailing_commas():
    text = '{"subtasks": [{"tool_name": "a", "code": "def a():\\n    return {}",},],}'
    plan = parse_reply(text, Plan)
    assert [(s.tool_name, s.code) for s in plan.subtasks] == [("a", "def a():\n    return {}")]


def test_raw_newlines_inside_code_string():
    # Many models put literal newlines in the JSON string instead of \n escapes.
    text = '{"subtasks": [{"tool_name": "a", "code": "def a():\n    x = {\'k\': 1}\n    return x"}]}'
    plan = parse_reply(text, Plan)
    assert plan.subtasks[0].code == "def a():\n    x = {'k': 1}\n    return x"


def test_raw_newlines_in_fenced_reply_with_prose():
    text = 'Here you go:\n```\n{"subtasks": [{"tool_name": "a", "code": "def a():\n    return {\'n\': 1}"}]}\n```\nDone.'
    plan = parse_reply(text, Plan)
    assert plan.subtasks[0].code == "def a():\n    return {'n': 1}"


CODE_WITH_FENCES = (
    "def report():\n"
    "    md = '```python\\nprint({1: 2})\\n```'\n"
    "    data = {'a': {'b': [1, 2]}}\n"
    "    return {'markdown': md, 'data': data, 'brace': '}'}\n"
)


def test_code_containing_fences_and_braces_fenced_reply():
    reply = plan_dict(subtask("report", CODE_WITH_FENCES))
    text = "```json\n" + json.dumps(reply) + "\n```"
    plan = parse_reply(text, Plan)
    assert plan.subtasks[0].code == CODE_WITH_FENCES
    compile(plan.subtasks[0].code, "<report>", "exec")


def test_code_containing_fences_and_braces_with_prose_around():
    reply = plan_dict(subtask("report", CODE_WITH_FENCES))
    text = "Plan below.\n```json\n" + json.dumps(reply) + "\n```\nThat is all."
    plan = parse_reply(text, Plan)
    assert plan.subtasks[0].code == CODE_WITH_FENCES


def test_code_containing_fence_with_brace_in_trailing_prose():
    code = "def a():\n    s = '```'\n    return {'s': s}\n"
    text = "```json\n" + json.dumps(plan_dict(subtask("a", code))) + "\n```\nTell me if you need {more}."
    try:
        plan = parse_reply(text, Plan)
    except ReplyError:
        pytest.fail("a complete JSON object was in the reply")
    assert plan.subtasks[0].code == code


def test_input_from_tool_null_means_empty():
    text = json.dumps(plan_dict(subtask("a", input_from_tool=None)))
    plan = parse_reply(text, Plan)
    assert plan.subtasks[0].input_from_tool == ""


# ---------------------------------------------------------------- extract_json_object / parse_reply: errors


@pytest.mark.parametrize("text", ["", "   \n\t  ", None])
def test_empty_reply(text):
    with pytest.raises(ReplyError, match="empty"):
        extract_json_object(text)


def test_prose_without_json():
    with pytest.raises(ReplyError, match="no JSON object"):
        parse_reply("I am sorry, I cannot help with that.", Plan)


def test_prose_with_braces_but_no_json():
    with pytest.raises(ReplyError, match="no JSON object"):
        extract_json_object("use {braces} wisely")


def test_json_list_of_numbers():
    with pytest.raises(ReplyError, match="JSON object"):
        extract_json_object("[1, 2, 3]")


def test_json_list_of_subtasks_is_not_a_plan():
    text = json.dumps([subtask("a"), subtask("b")])
    with pytest.raises(ReplyError, match="one JSON object"):
        parse_reply(text, Plan)


def test_json_list_of_one_subtask_is_not_a_plan():
    with pytest.raises(ReplyError, match="is a JSON list"):
        parse_reply(json.dumps([subtask("a")]), Plan)


def test_missing_code_names_the_field():
    bad = plan_dict(subtask("a"))
    del bad["subtasks"][0]["code"]
    with pytest.raises(ReplyError) as info:
        parse_reply(json.dumps(bad), Plan)
    message = str(info.value)
    assert "subtasks.0.code" in message
    assert "required" in message.lower()


def test_missing_subtasks():
    with pytest.raises(ReplyError, match="subtasks"):
        parse_reply('{"main_task": "x"}', Plan)


def test_empty_subtasks_list():
    with pytest.raises(ReplyError, match="subtasks is empty and so is direct_answer"):
        parse_reply('{"main_task": "x", "subtasks": []}', Plan)
    with pytest.raises(ReplyError, match="direct_answer"):
        parse_reply('{"direct_answer": "  ", "subtasks": []}', Plan)


def test_direct_answer_without_subtasks():
    plan = parse_reply('{"main_task_thought": "a greeting", "direct_answer": "You are welcome!", "subtasks": []}', Plan)
    assert plan.direct and plan.direct_answer == "You are welcome!"


def test_subtasks_win_over_a_direct_answer():
    reply = {**TWO_STEP, "direct_answer": "It is 3."}
    plan = parse_reply(json.dumps(reply), Plan)
    assert not plan.direct and len(plan.subtasks) == 2


def test_duplicate_tool_name():
    text = json.dumps(plan_dict(subtask("step"), subtask("step")))
    with pytest.raises(ReplyError, match="two subtasks are named 'step'"):
        parse_reply(text, Plan)


@pytest.mark.parametrize("name", ["get data", "1st", "fetch-data", "", "a.b"])
def test_tool_name_not_an_identifier(name):
    text = json.dumps(plan_dict(subtask(name, code="def x(): return {}")))
    with pytest.raises(ReplyError) as info:
        parse_reply(text, Plan)
    assert "not a Python identifier" in str(info.value)
    assert "tool_name" in str(info.value)


def test_tool_name_and_input_from_tool_are_stripped():
    text = json.dumps(plan_dict(subtask("a"), subtask("  b \n", input_from_tool=" a ")))
    plan = parse_reply(text, Plan)
    assert [(s.tool_name, s.input_from_tool) for s in plan.subtasks] == [("a", ""), ("b", "a")]


def test_evaluation_missing_satisfactory():
    with pytest.raises(ReplyError, match="satisfactory"):
        parse_reply('{"thoughts": "hmm", "final_answer": "x"}', Evaluation)


# ---------------------------------------------------------------- Evaluation.check_against


def test_satisfactory_with_final_answer_passes():
    evaluation = parse_reply('{"satisfactory": true, "final_answer": "The total is 6."}', Evaluation)
    evaluation.check_against(make_plan("a", "b"))  # no exception
    assert evaluation.final_answer == "The total is 6."


@pytest.mark.parametrize("answer", ["", "   \n"])
def test_satisfactory_with_empty_final_answer(answer):
    evaluation = Evaluation(satisfactory=True, final_answer=answer)
    with pytest.raises(ReplyError, match="final_answer is empty"):
        evaluation.check_against(make_plan("a"))


def test_unsatisfactory_without_new_subtasks_gives_up_cleanly():
    evaluation = Evaluation(satisfactory=False, thoughts="impossible", retry_from="nonsense")
    evaluation.check_against(make_plan("a"))  # nothing to apply, so nothing to reject


def test_unknown_retry_from_lists_subtasks():
    evaluation = Evaluation(satisfactory=False, retry_from="fetch", new_subtasks=[Subtask(**subtask("fetch2"))])
    with pytest.raises(ReplyError) as info:
        evaluation.check_against(make_plan("load", "clean", "report"))
    message = str(info.value)
    assert "'fetch'" in message
    assert "load, clean, report" in message


def test_valid_repair_passes_and_repaired_keeps_prefix():
    plan = make_plan("load", "clean", "report")
    new = [Subtask(**subtask("clean_v2", input_from_tool="load")), Subtask(**subtask("report_v2"))]
    evaluation = Evaluation(satisfactory=False, retry_from=" clean ", new_subtasks=new)
    evaluation.check_against(plan)

    repaired = plan.repaired("clean", new)
    assert [s.tool_name for s in repaired.subtasks] == ["load", "clean_v2", "report_v2"]
    assert repaired.subtasks[0] == plan.subtasks[0]
    assert repaired.main_task_thought == plan.main_task_thought
    # the original plan is untouched
    assert [s.tool_name for s in plan.subtasks] == ["load", "clean", "report"]


def test_repair_from_first_subtask_replaces_everything():
    plan = make_plan("load", "clean")
    repaired = plan.repaired("load", [Subtask(**subtask("only"))])
    assert [s.tool_name for s in repaired.subtasks] == ["only"]


def test_repair_reusing_a_kept_name_is_a_reply_error():
    plan = make_plan("load", "clean", "report")
    evaluation = Evaluation(
        satisfactory=False, retry_from="clean", new_subtasks=[Subtask(**subtask("load")), Subtask(**subtask("x"))]
    )
    with pytest.raises(ReplyError, match="two subtasks are named 'load'"):
        evaluation.check_against(plan)


# ---------------------------------------------------------------- strict-mode schemas


def _walk_objects(schema: Any, path: str = "$"):
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            yield path, schema
        for key, value in schema.items():
            yield from _walk_objects(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _walk_objects(value, f"{path}[{i}]")


@pytest.mark.parametrize("schema", [PLAN_SCHEMA, EVALUATION_SCHEMA], ids=["plan", "evaluation"])
def test_schema_is_strict_mode_valid(schema):
    objects = list(_walk_objects(schema))
    # the top object and the subtask items; a plan's reply also has its two branches (direct answer, subtasks)
    assert len(objects) == (4 if schema is PLAN_SCHEMA else 2)
    for path, obj in objects:
        assert obj.get("additionalProperties") is False, path
        assert sorted(obj["required"]) == sorted(obj["properties"]), path
        assert len(obj["required"]) == len(set(obj["required"])), path


@pytest.mark.parametrize(
    "schema, model", [(PLAN_SCHEMA, Plan), (EVALUATION_SCHEMA, Evaluation)], ids=["plan", "evaluation"]
)
def test_schema_properties_match_models(schema, model):
    properties = dict(schema["properties"])
    if model is Plan:  # the reply's branches hold the plan's direct_answer and subtasks
        for branch in properties.pop("reply")["anyOf"]:
            properties.update(branch["properties"])
    assert set(properties) == set(model.model_fields)
    items = properties["subtasks" if model is Plan else "new_subtasks"]["items"]
    assert set(items["properties"]) == set(Subtask.model_fields)


# ---------------------------------------------------------------- replies of reasoning models

DRAFT = plan_dict(subtask("draft_step"))  # a valid plan the model drafts while reasoning, then improves on
DRAFT_JSON, FINAL_JSON = json.dumps(DRAFT), json.dumps(TWO_STEP)


def _names(plan: Plan) -> list[str]:
    return [s.tool_name for s in plan.subtasks]


def test_think_preamble_before_the_plan():
    text = "<think>\nThe user wants a sum {of numbers}. Two steps.\n</think>\n\n" + FINAL_JSON
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_json_drafted_while_thinking_is_not_the_answer():
    text = f"<think>First idea: {DRAFT_JSON}\nNo, better split it in two.</think>\n{FINAL_JSON}"
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_only_the_closing_tag_when_the_template_opened_the_block():
    # DeepSeek-R1 and QwQ chat templates put <think> into the prompt, so the reply starts inside the block.
    text = f"Okay, a plan. Maybe {DRAFT_JSON}? Two steps are clearer.\n</think>\n\n{FINAL_JSON}"
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_unterminated_think_uses_the_last_object_in_it():
    text = f"<think>Let me draft: {DRAFT_JSON}\nBetter, in two steps: {FINAL_JSON}"
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_unterminated_think_without_json_says_so():
    with pytest.raises(ReplyError) as info:
        parse_reply("<think>The user wants numbers. I should first", Plan)
    assert "only reasoning" in str(info.value)
    assert "no JSON object" in str(info.value)


def test_think_with_an_evaluation():
    text = '<think>{"satisfactory": false} was my first thought, but the total is right.</think>' \
           '{"satisfactory": true, "thoughts": "ok", "final_answer": "6", "retry_from": "", "new_subtasks": []}'
    evaluation = parse_reply(text, Evaluation)
    assert evaluation.satisfactory is True and evaluation.final_answer == "6"


def test_harmony_channels_take_the_final_one():
    text = (f"<|channel|>analysis<|message|>Draft {DRAFT_JSON}, then two steps.<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{FINAL_JSON}<|return|>")
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_the_answers_error_is_quoted_not_the_reasonings():
    text = f"<think>{DRAFT_JSON}</think>" + json.dumps(plan_dict(subtask("bad name")))
    with pytest.raises(ReplyError, match="'bad name' is not a Python identifier"):
        parse_reply(text, Plan)


def test_reasoning_with_an_unusable_answer_falls_back_to_the_reasoning():
    text = f"<think>The plan: {FINAL_JSON}</think>\nI have written the plan above."
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_think_tags_inside_the_json_are_code_not_reasoning():
    code = "def strip_tags():\n    return {'text': '<think>x</think>'.replace('</think>', '')}\n"
    reply = json.dumps(plan_dict(subtask("strip_tags", code)))
    assert parse_reply(reply, Plan).subtasks[0].code == code
    assert parse_reply(f"Here it is: {reply}", Plan).subtasks[0].code == code


def test_reasoning_field_text_without_tags():
    # What llm.py hands over when `content` was empty and the reply sat in reasoning_content / reasoning.
    text = f"We need the numbers, then the sum.\n\n{FINAL_JSON}"
    assert _names(parse_reply(text, Plan)) == ["get_numbers", "add_up"]


def test_split_reasoning_shapes():
    assert split_reasoning("<think>a</think>b") == ("a", "b")
    assert split_reasoning("<THINKING>a</THINKING>b") == ("a", "b")
    assert split_reasoning("<think>a") == ("a", "")
    assert split_reasoning("a</think>b") == ("a", "b")
    assert split_reasoning('{"k": "</think>"}') == ("", '{"k": "</think>"}')
    assert split_reasoning("<|channel|>analysis<|message|>a<|end|>") == ("<|channel|>analysis<|message|>a<|end|>", "")
    assert split_reasoning("plain") == ("", "plain")
