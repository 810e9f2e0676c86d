"""The plan and evaluation objects the LLM returns: schemas, tolerant parsing and validation."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, TypeVar

import json_repair
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# A tool_name; also in the schemas below. Bounded (64 characters): a small model under constrained decoding otherwise
# writes "This_is_a_tutorial_for_you_here_and_…" until the reply cap cuts it (issue 20).
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


class ReplyError(ValueError):
    """An LLM reply that could not be turned into a valid object; the message is quoted back to the LLM."""


class Subtask(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tool_name: str
    input_from_tool: str = ""
    description: str = ""
    imports: list[str] = Field(default_factory=list)
    thought: str = ""
    code: str

    @field_validator("tool_name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        value = value.strip()
        if not IDENTIFIER.fullmatch(value):
            raise ValueError(f"tool_name {value!r} is not a Python identifier")
        return value

    @field_validator("input_from_tool", mode="before")
    @classmethod
    def _strip(cls, value: str | None) -> str:
        return (value or "").strip()


class Plan(BaseModel):
    """The planner's reply: subtasks to run, or — when the task needs no code (a greeting, a question about AutoCode,
    one the conversation or its files' manifest answers) — a `direct_answer` and no subtasks (issue 14)."""

    model_config = ConfigDict(extra="ignore")

    # Older replies also echo the task as main_task: ignored, and no longer asked for (it cost each plan the task twice).
    main_task_thought: str = ""
    direct_answer: str = ""
    subtasks: list[Subtask] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _flatten_reply(cls, data: Any) -> Any:
        """The schema's `reply` (a direct answer or subtasks, PLAN_SCHEMA) read as the flat fields; a flat reply
        (json_object and text modes, older prompts) is read as it is."""
        if isinstance(data, dict) and isinstance(data.get("reply"), dict):
            data = {**{k: v for k, v in data.items() if k != "reply"}, **data["reply"]}
        return data

    @model_validator(mode="after")
    def _code_or_answer(self) -> "Plan":
        if not self.subtasks and not self.direct_answer.strip():
            raise ValueError("subtasks is empty and so is direct_answer: give subtasks, or the reply in direct_answer")
        return self

    @property
    def direct(self) -> bool:
        """Answered without code: no sandbox, no evaluator. The schema makes the two exclusive (PLAN_SCHEMA's
        `reply`); a server that does not follow it and sends both gets the subtasks run (an answer without code
        may be made up; one from code is checked)."""
        return not self.subtasks

    @field_validator("subtasks")
    @classmethod
    def _unique_names(cls, subtasks: list[Subtask]) -> list[Subtask]:
        seen: set[str] = set()
        for subtask in subtasks:
            if subtask.tool_name in seen:
                raise ValueError(f"two subtasks are named {subtask.tool_name!r}; names must be unique")
            seen.add(subtask.tool_name)
        return subtasks

    def index_of(self, tool_name: str) -> int | None:
        for i, subtask in enumerate(self.subtasks):
            if subtask.tool_name == tool_name:
                return i
        return None

    def repaired(self, retry_from: str, new_subtasks: list[Subtask]) -> "Plan":
        """The plan with everything from `retry_from` on replaced by `new_subtasks`."""
        index = self.index_of(retry_from)
        assert index is not None
        return Plan(
            main_task_thought=self.main_task_thought,
            subtasks=[*self.subtasks[:index], *new_subtasks],
        )


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    satisfactory: bool
    thoughts: str = ""
    final_answer: str = ""
    retry_from: str = ""
    new_subtasks: list[Subtask] = Field(default_factory=list)

    def check_against(self, plan: Plan) -> None:
        """Reject a repair that cannot be applied to `plan` (quoted back to the LLM)."""
        if self.satisfactory:
            if not self.final_answer.strip():
                raise ReplyError("satisfactory is true but final_answer is empty")
            return
        if not self.new_subtasks:
            return  # gives up: nothing to retry
        if plan.index_of(self.retry_from.strip()) is None:
            names = ", ".join(s.tool_name for s in plan.subtasks)
            raise ReplyError(f"retry_from {self.retry_from!r} is not a subtask of the plan ({names})")
        try:
            plan.repaired(self.retry_from.strip(), self.new_subtasks)  # validates, e.g. duplicate names
        except ValidationError as exc:
            raise ReplyError(describe_validation_error(exc)) from None


# The JSON schemas sent as response_format (strict mode). They carry every rule of the models above that a schema
# can say, so a server that constrains decoding by the schema (llama.cpp, vLLM, OpenAI) cannot produce a reply the
# parser rejects for them: `tool_name` a Python identifier, `input_from_tool` empty or one.
# What a schema cannot say stays with the models and Evaluation.check_against (unique names, subtasks or a
# direct_answer, retry_from naming a subtask of the plan, a final_answer when satisfactory) and with agent_core/checks.py (the code itself).
#
# Only keywords OpenAI's strict mode documents are used (type, properties, required, additionalProperties, items,
# minItems, pattern; tests/test_schemas.py checks them), and patterns only in the regex subset llama.cpp's
# json-schema-to-grammar translates: anchored by ^ and $, character classes, groups, ? * + (no \w, no lookaround).
# Kept compact since they travel with every call.
EMPTY_OR_IDENTIFIER_PATTERN = r"^([A-Za-z_][A-Za-z0-9_]{0,63})?$"
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$"  # an import: a module's dotted name
# Lists are bounded too: SmolLM2 on llama-server repeated one string in `imports` until the cap (bench/RESULTS.md).
MAX_IMPORTS = 12
MAX_SUBTASKS = 10


def strict_object(properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An object schema as strict mode wants it: every property required, no other property allowed.

    Adding a field to a reply (e.g. a direct answer) is one more entry in `properties`."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SUBTASK_SCHEMA: dict[str, Any] = strict_object({
    "tool_name": {"type": "string", "pattern": IDENTIFIER_PATTERN},
    "input_from_tool": {"type": "string", "pattern": EMPTY_OR_IDENTIFIER_PATTERN},
    "description": {"type": "string"},
    "imports": {"type": "array", "items": {"type": "string", "pattern": MODULE_PATTERN}, "maxItems": MAX_IMPORTS},
    "thought": {"type": "string"},
    "code": {"type": "string"},
})


def subtask_list() -> dict[str, Any]:
    """An array of subtasks, at most MAX_SUBTASKS; empty is allowed (an evaluator giving up)."""
    return {"type": "array", "items": SUBTASK_SCHEMA, "maxItems": MAX_SUBTASKS}


_DIRECT_BRANCH = strict_object({"direct_answer": {"type": "string"}})  # no code needed
_CODE_BRANCH = strict_object({"subtasks": {**subtask_list(), "minItems": 1}})

# A plan's reply is a direct answer OR subtasks, never both: `anyOf` of two objects (OpenAI's strict mode accepts
# anyOf below the root; llama.cpp, Ollama and vLLM constrain decoding by it), so the model chooses one at the
# reply's first key. With both fields in one object, SmolLM2 on llama-server filled both in every plan
# (bench/RESULTS.md, "Real model"), and no greeting got a direct answer.
PLAN_SCHEMA: dict[str, Any] = strict_object({
    "main_task_thought": {"type": "string"},
    "reply": {"anyOf": [_DIRECT_BRANCH, _CODE_BRANCH]},
})
# The same shape with subtasks only: asked for when a direct answer stated numbers nothing computed.
PLAN_CODE_SCHEMA: dict[str, Any] = strict_object({
    "main_task_thought": {"type": "string"},
    "reply": {"anyOf": [_CODE_BRANCH]},
})

EVALUATION_SCHEMA: dict[str, Any] = strict_object({
    "satisfactory": {"type": "boolean"},
    "thoughts": {"type": "string"},
    "final_answer": {"type": "string"},
    "retry_from": {"type": "string", "pattern": EMPTY_OR_IDENTIFIER_PATTERN},
    "new_subtasks": subtask_list(),  # empty: the evaluator gives up
})

_DECODER = json.JSONDecoder(strict=False)  # strict=False: raw newlines inside strings are common


def _first_object(candidate: Any) -> dict[str, Any] | None:
    if isinstance(candidate, list):
        candidate = next((item for item in candidate if isinstance(item, dict)), None)
    return candidate if isinstance(candidate, dict) and candidate else None


def json_candidates(text: str, *, repair: bool = True) -> Iterator[dict[str, Any]]:
    """JSON objects an LLM reply may mean, most plausible first: the object at the first brace as written,
    then repaired (Python literals, trailing commas, unquoted keys; unless `repair` is false), then any later
    complete object."""
    start = text.find("{")
    if start == -1:
        return
    positions = [m.start() for m in re.finditer(r"\{", text)]
    try:
        value, _ = _DECODER.raw_decode(text, start)
        if isinstance(value, dict) and value:
            yield value
    except ValueError:
        pass
    try:
        repaired = _first_object(json_repair.loads(text[start:])) if repair else None
    except Exception:  # the repair library raises on some hopeless inputs
        repaired = None
    if repaired is not None:
        yield repaired
    for position in positions[1:]:
        try:
            value, _ = _DECODER.raw_decode(text, position)
        except ValueError:
            continue
        if isinstance(value, dict) and value:
            yield value


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(_DECODER.decode(text), list)
    except ValueError:
        return False


def extract_json_object(text: str) -> dict[str, Any]:
    """The most plausible JSON object in an LLM reply (fenced, wrapped in prose, Python literals, trailing commas)."""
    text = (text or "").strip()
    if not text:
        raise ReplyError("the reply was empty; answer with one JSON object")
    if text.startswith("[") and _is_json_list(text):
        raise ReplyError("the reply is a JSON list; answer with one JSON object, not a list")
    for candidate in json_candidates(text):
        return candidate
    raise ReplyError("the reply contains no JSON object; answer with one JSON object and nothing else")


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "object"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# Reasoning models write their reasoning before the answer: inline in a <think> block (Qwen3, DeepSeek-R1, QwQ
# through llama.cpp or Ollama without a reasoning parser), a block whose opening tag the chat template already put in
# the prompt (only the closing tag arrives), one never closed (the model ran out of tokens, or wrote the answer inside),
# or gpt-oss's harmony channels. Reasoning sent in a separate field reaches parse_reply only when the content was empty
# (agent_core/llm.py), as text without tags.
_THINK_OPEN = re.compile(r"\A\s*<(think|thinking|reasoning)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(think|thinking|reasoning)>", re.IGNORECASE)
_HARMONY_FINAL = "<|channel|>final<|message|>"
_HARMONY_END = re.compile(r"(<\|(return|end|call)\|>\s*)+\Z")


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply; reasoning is "" when the reply has none."""
    text = text or ""
    final = text.rfind(_HARMONY_FINAL)
    if final != -1:
        return text[:final], _HARMONY_END.sub("", text[final + len(_HARMONY_FINAL):])
    if text.lstrip().startswith(("<|channel|>", "<|start|>")):
        return text, ""  # harmony channels, none of them final
    opened = _THINK_OPEN.match(text)
    if opened:
        close = re.compile(rf"</{opened.group(1)}>", re.IGNORECASE).search(text, opened.end())
        if close is None:
            return text[opened.end():], ""  # never closed: everything is reasoning
        return text[opened.end():close.start()], text[close.end():]
    closed = _THINK_CLOSE.search(text)
    if closed and not text.lstrip().startswith(("{", "[", "`")) \
            and not re.search(rf"<{closed.group(1)}>", text[:closed.start()], re.IGNORECASE):
        return text[:closed.start()], text[closed.end():]  # the opening tag was in the prompt
    return "", text


Model = TypeVar("Model", bound=BaseModel)


def _validated(text: str, model: type[Model], *, reasoning: bool = False) -> Model:
    """The first plausible object in `text` that validates as `model`; ReplyError with the most plausible one's
    error otherwise. In `reasoning` only complete objects count (a repaired fragment of a draft is no answer) and
    the last comes first: the final version of a drafted object is written last."""
    extract_json_object(text)  # raises the clear errors: empty reply, a list, no object at all
    candidates = list(json_candidates(text, repair=not reasoning))
    if not candidates:
        raise ReplyError("the reasoning holds no complete JSON object")
    first_error: ValidationError | None = None
    for candidate in reversed(candidates) if reasoning else candidates:
        try:
            return model.model_validate(candidate)
        except ValidationError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise ReplyError(f"the JSON does not match the expected object: {describe_validation_error(first_error)}") from None


def parse_reply(text: str, model: type[Model]) -> Model:
    """Parse and validate one reply, raising ReplyError with a message fit to quote back to the LLM.

    Reasoning before the answer is set aside. Only when the answer holds no JSON object at all (a reasoning-only
    reply, a <think> block never closed, prose) is the object looked for in the reasoning, its last complete one
    first, then in the whole reply (a closing tag that was part of the answer). The error quoted is the answer's,
    or the reasoning's when the reply has no answer."""
    text = (text or "").strip()
    reasoning, answer = (part.strip() for part in split_reasoning(text))
    try:
        return _validated(answer, model)
    except ReplyError as exc:
        if not reasoning or next(json_candidates(answer), None) is not None:
            raise
        error = exc
    for part in (reasoning, text):
        try:
            return _validated(part, model, reasoning=True)
        except ReplyError as exc:
            if part is reasoning and not answer:
                error = ReplyError(f"the reply holds only reasoning and no usable JSON object ({exc}); "
                                   "answer with one JSON object after the reasoning")
    raise error
