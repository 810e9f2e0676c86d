"""What a step may send the server on its channel, checked before anything else relies on it.

The step's code holds the channel's fd and can write anything to it, bypassing child.py's own checks: each line is
parsed and checked here (`read_message`), and whatever fails is a failed step with a clear ProtocolError.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_MESSAGE_DEPTH = 100  # levels of nesting in a step's result or a tool call's arguments


class ProtocolError(Exception):
    """A message on a step's channel that the server will not pass on; the text says what is wrong with it."""


GARBAGE = "the step wrote garbage to its result channel"
_SUBJECTS = {"result": "the step's result", "call": "a tool call", "error": "the step's error report"}
_KINDS = {dict: "a dict", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
          type(None): "null"}
_OP = re.compile(r'"op"\s*:\s*"(\w+)"')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_message(line: bytes) -> dict[str, Any]:
    """One message from a step's channel, parsed and checked, or ProtocolError.

    The step's code holds the channel's fd and can write anything to it, bypassing child.py's own checks, so
    everything the rest of the server relies on is checked here: strict UTF-8 and JSON (no NaN or Infinity, which
    `run --json` and the API would print as invalid JSON), at most MAX_MESSAGE_DEPTH levels of nesting (deeper
    values end whatever recurses over them, the JSON parser and encoder first), no lone surrogates (they cannot be
    stored or sent as text), and the shape of each op: a result's `output` is a dict (its keys are strings, as
    in any JSON object), a tool call's `name` a string, `args` a list and `kwargs` a dict, an error report text.
    Cheap for ordinary messages: the parse is C, the depth walk visits containers' items once, and the lone
    surrogate check runs only when the text has a surrogate escape at all.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(GARBAGE) from None
    constants: list[str] = []  # NaN, Infinity, -Infinity: noted (and read as None), the message then refused
    try:
        message = json.loads(text, parse_constant=constants.append)
    except RecursionError:  # deeper than the parser goes (around 1,000 levels); the op only words the error
        op = _OP.search(text)
        raise ProtocolError(f"{_subject(op and op.group(1))} is nested deeper than {MAX_MESSAGE_DEPTH} levels"
                            ) from None
    except ValueError:
        raise ProtocolError(GARBAGE) from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError(GARBAGE)
    subject = _subject(message["op"])
    if constants:
        raise ProtocolError(f"{subject} contains NaN or Infinity, which JSON does not allow")
    if not _nests_within(message, MAX_MESSAGE_DEPTH + 1):  # the message object itself is one level
        raise ProtocolError(f"{subject} is nested deeper than {MAX_MESSAGE_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(message):
        raise ProtocolError(f"{subject} contains a lone surrogate, which is not valid text")
    _check_shape(message)
    return message


def _subject(op: str | None) -> str:
    return _SUBJECTS.get(op or "", "a message of the step")


def _nests_within(value: Any, limit: int) -> bool:
    """Whether lists and dicts in `value` nest at most `limit` levels deep; iterative, so depth costs no stack."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        for item in node.values() if type(node) is dict else node:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
    return True


def _has_lone_surrogate(message: dict[str, Any]) -> bool:
    """Whether a string in the message holds half of a UTF-16 pair (a valid pair, e.g. an emoji, is fine)."""
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_shape(message: dict[str, Any]) -> None:
    op = message["op"]
    if op == "result":
        _expect(message.get("output"), dict, "the step's output")
    elif op == "call":
        _expect(message.get("name"), str, "a tool call's name")
        _expect(message.get("args", []), list, "a tool call's args")
        _expect(message.get("kwargs", {}), dict, "a tool call's kwargs")
    elif op == "error":
        _expect(message.get("error"), str, "the step's error report")
        if message.get("traceback") is not None:
            _expect(message["traceback"], str, "the step's traceback")


def _expect(value: Any, kind: type, what: str) -> None:
    if type(value) is not kind:
        raise ProtocolError(f"{what} is {_KINDS.get(type(value), 'something else')}, not {_KINDS[kind]}")


__all__ = ["MAX_MESSAGE_DEPTH", "ProtocolError", "read_message"]
