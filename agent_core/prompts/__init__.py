"""Prompt templates, kept as text files beside this module and filled with `string.Template`."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from string import Template

_DIR = Path(__file__).parent


@cache
def _template(name: str) -> Template:
    return Template((_DIR / f"{name}.txt").read_text(encoding="utf-8"))


def render(name: str, **values: object) -> str:
    """Fill template `name`; lines left empty by a missing section are dropped."""
    text = _template(name).substitute({k: "" if v is None else str(v) for k, v in values.items()})
    return "\n".join(line for line in text.splitlines() if line.strip()).strip()
