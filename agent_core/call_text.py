"""The call of a `confirm` tool as text: whole for the run page and the API, fitted for a chat message.

The person deciding must see everything that will run (issue 21): a long first argument must not push a later one
(`to="attacker@evil.example"`) out of an approval message. So a call is kept as its parts — (name, value as JSON),
the name None for a positional argument — and `fit` makes it as long as a platform allows by clipping each long
value in its middle: every argument's name stays, and the start and end of each value, with
"…[1,320 characters hidden]…" where the middle was. Short values are never clipped to make room: the space is
shared equally among the long ones (max-min fair). Only a call with more arguments than a message can name at all
says so instead ("…[12 more arguments not shown: see the whole call on the run page]").

Values are generated code's choice, so untrusted: characters that are not printable show as "?", and renderers
escape the text for their platform; `cost` counts a character as the escaped text will hold it, so that the
escaped text fits.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Sequence

Part = tuple["str | None", str]
Cost = Callable[[str], int]

NAME_CHARS = 64  # an argument's name in a fitted call (a keyword can be any string: `**{"x" * 5000: 1}`)
KEEP_CHARS = 12  # of a clipped value's start and of its end, at the least


def parts_of(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Part]:
    """The call's arguments in order: positional ones unnamed, then keywords as the code passed them."""
    parts: list[Part] = [(None, _json(a)) for a in args]
    parts += [(_printable(str(name)), _json(value)) for name, value in kwargs.items()]
    return parts


def whole(tool: str, parts: Iterable[Part]) -> str:
    """The whole call, e.g. `send_email("boss@example.com", subject="Q3")`: what the run page and the API show."""
    return f"{tool}({', '.join(_part(name, value) for name, value in parts)})"


def fit(tool: str, parts: Sequence[Part], limit: int, cost: Cost = len) -> str:
    """The call in at most `limit` (by `cost`): every name, and each long value's start and end."""
    parts = [(None if name is None else clip_middle(name, NAME_CHARS), value) for name, value in parts]
    text = whole(tool, parts)
    if cost(text) <= limit:
        return text
    fixed = cost(whole(tool, [(name, "") for name, _ in parts]))
    shares = _shares([cost(value) for _, value in parts], limit - fixed)
    if shares is None:  # more arguments than the message can even name: say how many are left out
        return _some(tool, parts, limit, cost)
    return whole(tool, [(name, clip_middle(value, share, cost)) for (name, value), share in zip(parts, shares)])


def clip_middle(text: str, budget: int, cost: Cost = len) -> str:
    """`text` within `budget` (by `cost`): its start and end around "…[N characters hidden]…"."""
    if cost(text) <= budget:
        return text
    keep = max(budget - cost(_hidden(len(text))), 2 * KEEP_CHARS)
    head, tail = _take(text, (keep + 1) // 2, cost), _take(text[::-1], keep // 2, cost)[::-1]
    tail = tail[len(tail) - min(len(tail), len(text) - len(head)):] if tail else ""
    return f"{head}{_hidden(len(text) - len(head) - len(tail))}{tail}"


def encode(parts: Iterable[Part]) -> str:
    """The parts as stored (approvals.call_json)."""
    return json.dumps([[name, value] for name, value in parts], ensure_ascii=False)


def decode(text: str | None) -> list[Part] | None:
    try:
        data = json.loads(text or "")
    except ValueError:
        return None
    if not isinstance(data, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], str)
                                             and isinstance(p[0], (str, type(None))) for p in data):
        return None
    return [(name, value) for name, value in data]


def fit_stored(tool: str, call_json: str | None, arguments: str, limit: int, cost: Cost = len) -> str:
    """An approval as stored, fitted: from its parts, or (a row from before they were stored) its text clipped in
    the middle."""
    parts = decode(call_json)
    if parts is not None:
        return fit(tool, parts, limit, cost)
    return clip_middle(arguments, limit, cost)


def escaped_cost(escape: Callable[[str], str]) -> Cost:
    """A `cost` counting each character as `escape` writes it (Slack's &lt;, HTML's &quot;…)."""
    sizes: dict[str, int] = {}

    def cost(text: str) -> int:
        total = 0
        for ch in text:
            size = sizes.get(ch)
            if size is None:
                size = sizes[ch] = len(escape(ch))
            total += size
        return total

    return cost


# --- helpers ---------------------------------------------------------------------------------------------------
def _json(value: Any) -> str:
    return _printable(json.dumps(value, ensure_ascii=False, default=str))


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in text)


def _part(name: str | None, value: str) -> str:
    return value if name is None else f"{name}={value}"


def _hidden(count: int) -> str:
    return f"…[{count:,} characters hidden]…"


def _take(text: str, budget: int, cost: Cost) -> str:
    """The longest start of `text` costing at most `budget`."""
    used = 0
    for i, ch in enumerate(text):
        used += cost(ch)
        if used > budget:
            return text[:i]
    return text


def _shares(sizes: list[int], available: int) -> list[int] | None:
    """What each value may cost: whole when short, the rest shared equally by the long ones; None when even the
    smallest clipped value (its start, its end and the note) does not fit."""
    shares = list(sizes)
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    left = available
    for position, index in enumerate(order):
        share = left // (len(order) - position)
        if sizes[index] <= share:
            left -= sizes[index]
            continue
        smallest = 2 * KEEP_CHARS + len(_hidden(max(sizes)))
        if share < smallest:
            return None
        for later in order[position:]:
            shares[later] = share
        return shares
    return shares


def _some(tool: str, parts: list[Part], limit: int, cost: Cost) -> str:
    """As many arguments as fit, each clipped hard, then how many are not shown."""
    pieces = [_part(name, clip_middle(value, 2 * KEEP_CHARS + len(_hidden(len(value))), cost)) for name, value in parts]
    used, shown, comma = cost(f"{tool}()"), [], cost(", ")
    for piece in pieces:
        more = _more(len(parts) - len(shown) - 1)
        if used + cost(piece) + comma + cost(more) > limit:
            break
        shown.append(piece)
        used += cost(piece) + comma
    return f"{tool}({', '.join([*shown, _more(len(parts) - len(shown))])})"


def _more(count: int) -> str:
    return f"…[{count} more arguments not shown: see the whole call on the run page]"
