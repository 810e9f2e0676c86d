"""Numbers of a final answer that no step produced (issue 20).

The evaluator words the answer from the steps' outputs, and a model may still write a number that no step
computed: a wrong rounding, a figure from its training data, one made up. A run is not failed for it (a mean
of two outputs, a unit conversion are legitimate), but the number is flagged on the run's log and page as "not
found in any step's output", so nobody takes it on trust. A number counts as found when the task, a step's output
or its stdout holds it: as written, rounded to the answer's decimals, or as a percentage of a ratio (0.414 → 41.4%).
Small integers (below 10) are not checked: counts and ordinals ("3 regions", "step 2") would only add noise.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Iterable

# 1,375 / 1375 / 264.3 / .5 — not digits inside a word (a run id, H2O) or after a decimal point.
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\w])")
SMALL = Decimal(10)
MAX_FLAGGED = 20


def _numbers(text: str) -> list[tuple[str, Decimal]]:
    found = []
    for match in _NUMBER.finditer(text or ""):
        written = match.group(1)
        try:
            found.append((written, Decimal(written.replace(",", ""))))
        except InvalidOperation:
            continue
    return found


def _decimals(written: str) -> int:
    return len(written.split(".", 1)[1]) if "." in written else 0


def _matches(value: Decimal, places: int, known: set[Decimal]) -> bool:
    quantum = Decimal(1).scaleb(-places)
    for source in known:
        for candidate in (source, source * 100, source / 100):
            for rounding in (ROUND_HALF_UP, ROUND_HALF_EVEN):
                try:
                    if candidate.quantize(quantum, rounding=rounding) == value:
                        return True
                except InvalidOperation:  # too many digits for the context
                    continue
    return False


def stored_unsupported(run: dict) -> list[str]:
    """The flagged numbers a run row keeps (`unsupported_json`), for its log and page; [] when none or unreadable."""
    try:
        found = json.loads(run.get("unsupported_json") or "[]")
    except ValueError:
        return []
    return [str(n) for n in found] if isinstance(found, list) else []


def unsupported_numbers(answer: str, sources: Iterable[str]) -> list[str]:
    """The numbers of `answer` (as written) found in none of `sources`, at most MAX_FLAGGED, in order."""
    known: set[Decimal] = {value for text in sources for _, value in _numbers(text)}
    flagged: list[str] = []
    for written, value in _numbers(answer):
        if value < SMALL and "." not in written:
            continue
        if value in known or _matches(value, _decimals(written), known):
            continue
        if written not in flagged:
            flagged.append(written)
        if len(flagged) == MAX_FLAGGED:
            break
    return flagged


__all__ = ["stored_unsupported", "unsupported_numbers"]
