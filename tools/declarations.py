"""Tool declarations in the original AutoCodeAgent dict format: what one tool is, and how a dict becomes one.

Kinds:
  library  {"lib_name": ["numpy"]}                                   generated code may import it
  guide    {"lib_name": [...], "instructions": ..., "code_example": ...}   advice, not binding
  exact    {..., "use_exactly_code_example": True, "code_example": "def f(...)"}  trusted operator code,
           run by the tool host outside the sandbox and called by name from generated code
           (the misspelling `use_exaclty_code_example` found in the wild is accepted too); with
           `"confirm": True` each call waits for the requester's Approve/Deny (agent_core/approvals.py)
  llm      the built-in `llm()` helper, answered by the tool host with the server's LLM client
  mcp      {"mcp": "github", "command": [...], "env": {...}} or {"mcp": "sentry", "url": ..., "headers": {...}}:
           an MCP server whose tools generated code calls as `github.list_issues(...)` (tools/mcp_spec.py,
           tools/mcp_host.py)

The built-in tools (tools/builtin.py) and an operator's tools file are both made of these; tools/registry.py puts
them together into the set a run may use.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tools.mcp_spec import McpServerSpec, McpSpecError, spec_from_dict

log = logging.getLogger(__name__)

Kind = Literal["library", "guide", "exact", "llm", "mcp"]
_KNOWN_KEYS = {
    "lib_name", "lib_names", "instructions", "code_example", "use_exactly_code_example", "use_exaclty_code_example",
    "confirm",
}


class ToolError(Exception):
    """A tool declaration that cannot be used (the CLI exits with code 2)."""


@dataclass
class Tool:
    kind: Kind
    lib_names: list[str] = field(default_factory=list)
    instructions: str = ""
    code_example: str = ""
    functions: dict[str, str] = field(default_factory=dict)  # exact/llm: name -> "name(signature)" for prompts
    confirm: bool = False  # exact: every call waits for a person's approval (a side effect: email, payment, …)
    mcp: McpServerSpec | None = None  # mcp: the server (its env and headers are secrets)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _function_signatures(code: str) -> dict[str, str]:
    tree = ast.parse(code)
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            found[node.name] = f"{node.name}({ast.unparse(node.args)}){returns}"
    return found


def tool_from_dict(spec: dict[str, Any], where: str = "tool") -> Tool:
    """Validate one declaration; the error names the declaration and what is wrong."""
    if not isinstance(spec, dict):
        raise ToolError(f"{where}: expected a dict, got {type(spec).__name__}")
    if "mcp" in spec:
        try:
            return Tool("mcp", mcp=spec_from_dict(spec, where))
        except McpSpecError as exc:
            raise ToolError(str(exc)) from None
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
        log.warning("%s: ignoring unknown keys %s", where, sorted(unknown))
    libs = spec.get("lib_names", spec.get("lib_name", []))
    if isinstance(libs, str):
        libs = [libs]
    if not isinstance(libs, list) or not all(isinstance(x, str) and x.strip() for x in libs):
        raise ToolError(f"{where}: lib_name/lib_names must be a list of library names")
    instructions = str(spec.get("instructions") or "").strip()
    code = str(spec.get("code_example") or "").strip()
    exact = bool(spec.get("use_exactly_code_example", spec.get("use_exaclty_code_example", False)))
    if exact:
        if not code:
            raise ToolError(f"{where}: use_exactly_code_example needs a code_example")
        try:
            functions = _function_signatures(code)
        except SyntaxError as exc:
            raise ToolError(f"{where}: code_example does not parse: {exc}") from None
        if not functions:
            raise ToolError(f"{where}: code_example defines no public function to call")
        confirm = spec.get("confirm", False)
        if not isinstance(confirm, bool):
            raise ToolError(f"{where}: confirm must be true or false")
        return Tool("exact", [x.strip() for x in libs], instructions, code, functions, confirm)
    if not libs:
        raise ToolError(f"{where}: declares no library (lib_name)")
    if spec.get("confirm"):
        raise ToolError(f"{where}: confirm applies to exact tools (use_exactly_code_example) only")
    kind: Kind = "guide" if (instructions or code) else "library"
    return Tool(kind, [x.strip() for x in libs], instructions, code)


LLM_HELPER = Tool(
    "llm",
    instructions="One-shot text work by an LLM (summarize, classify, extract, translate, write).",
    functions={"llm": "llm(prompt: str, system: str = '') -> str"},
)


__all__ = ["LLM_HELPER", "Kind", "Tool", "ToolError", "tool_from_dict"]
