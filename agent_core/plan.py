"""The plan and evaluation objects the LLM returns: schemas, tolerant parsing and validation."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, TypeVar

import json_repair
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
        if not IDENTIFIER.match(value):
            raise ValueError(f"tool_name {value!r} is not a Python identifier")
        return value

    @field_validator("input_from_tool", mode="before")
    @classmethod
    def _strip(cls, value: str | None) -> str:
        return (value or "").strip()


class Plan(BaseModel):
    model_config = ConfigDict(extra="ignore")

    main_task: str = ""
    main_task_thought: str = ""
    subtasks: list[Subtask] = Field(min_length=1)

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
            main_task=self.main_task,
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


# Strict JSON schemas sent as response_format; kept compact since they travel with every call.
_SUBTASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tool_name": {"type": "string"},
        "input_from_tool": {"type": "string"},
        "description": {"type": "string"},
        "imports": {"type": "array", "items": {"type": "string"}},
        "thought": {"type": "string"},
        "code": {"type": "string"},
    },
    "required": ["tool_name", "input_from_tool", "description", "imports", "thought", "code"],
    "additionalProperties": False,
}

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "main_task": {"type": "string"},
        "main_task_thought": {"type": "string"},
        "subtasks": {"type": "array", "items": _SUBTASK_SCHEMA},
    },
    "required": ["main_task", "main_task_thought", "subtasks"],
    "additionalProperties": False,
}

EVALUATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "satisfactory": {"type": "boolean"},
        "thoughts": {"type": "string"},
        "final_answer": {"type": "string"},
        "retry_from": {"type": "string"},
        "new_subtasks": {"type": "array", "items": _SUBTASK_SCHEMA},
    },
    "required": ["satisfactory", "thoughts", "final_answer", "retry_from", "new_subtasks"],
    "additionalProperties": False,
}

_DECODER = json.JSONDecoder(strict=False)  # strict=False: raw newlines inside strings are common


def _first_object(candidate: Any) -> dict[str, Any] | None:
    if isinstance(candidate, list):
        candidate = next((item for item in candidate if isinstance(item, dict)), None)
    return candidate if isinstance(candidate, dict) and candidate else None


def json_candidates(text: str) -> Iterator[dict[str, Any]]:
    """JSON objects an LLM reply may mean, most plausible first: the object at the first brace as written,
    then repaired (Python literals, trailing commas, unquoted keys), then any later complete object."""
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
        repaired = _first_object(json_repair.loads(text[start:]))
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


Model = TypeVar("Model", bound=BaseModel)


def parse_reply(text: str, model: type[Model]) -> Model:
    """Parse and validate one reply, raising ReplyError with a message fit to quote back to the LLM.

    Every plausible object in the reply is tried; the error quoted is the most plausible one's."""
    text = (text or "").strip()
    extract_json_object(text)  # raises the clear errors: empty reply, a list, no object at all
    first_error: ValidationError | None = None
    for candidate in json_candidates(text):
        try:
            return model.model_validate(candidate)
        except ValidationError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise ReplyError(f"the JSON does not match the expected object: {describe_validation_error(first_error)}") from None
