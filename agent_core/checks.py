"""Static checks of a subtask before it runs. A violation becomes a failed step the evaluator sees."""

from __future__ import annotations

import ast
import logging
import sys
from dataclasses import dataclass, field

from agent_core.plan import Subtask
from tools.registry import ToolSet

log = logging.getLogger(__name__)


class CheckError(Exception):
    """The subtask cannot run as written; the message is shown to the evaluator."""


@dataclass
class CheckedSubtask:
    code: str  # the code to run, with redefinitions of trusted tools removed
    input_from: str | None  # the earlier subtask whose output is the input; None for the first
    notes: list[str] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)  # top-level non-stdlib modules it imports


def _declared_modules(entry: str) -> list[str]:
    """Module names in an `imports` entry: "numpy", "import numpy as np" or "from x import y"."""
    entry = entry.strip()
    if not entry:
        return []
    try:
        tree = ast.parse(entry if entry.startswith(("import ", "from ")) else f"import {entry}")
    except SyntaxError:
        return [entry.split()[0]]
    return _imported_modules(tree)


def _imported_modules(tree: ast.AST) -> list[str]:
    modules: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise CheckError("relative imports are not allowed")
            modules.append(node.module or "")
    return modules


def check_subtask(subtask: Subtask, earlier: list[str], toolset: ToolSet) -> CheckedSubtask:
    """Validate one subtask given the names of the subtasks before it in the plan."""
    name = subtask.tool_name
    trusted = toolset.reserved_names  # trusted functions, and MCP servers' objects (called as server.tool(...))
    if name in trusted:
        raise CheckError(f"{name!r} is the name of a trusted tool; give the subtask another name and call {name}()")
    try:
        tree = ast.parse(subtask.code)
    except SyntaxError as exc:
        raise CheckError(f"SyntaxError: {exc.msg} (line {exc.lineno})") from None

    notes: list[str] = []
    kept = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in trusted:
            notes.append(f"dropped a redefinition of trusted tool {node.name}(); the real one is used")
            log.info("subtask %s: dropped redefinition of trusted tool %s", name, node.name)
            continue
        kept.append(node)
    tree.body = kept

    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    if not functions:
        raise CheckError(f"the code does not define a function named {name}")
    function = functions[-1]
    if isinstance(function, ast.AsyncFunctionDef):
        raise CheckError(f"{name} must be a plain def, not async def")
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    required = len(positional) - len(args.defaults)
    required_kw = [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    if required_kw:
        raise CheckError(f"{name} must not have required keyword-only arguments")

    if not earlier:
        if subtask.input_from_tool:
            raise CheckError(f"{name} is the first subtask, so input_from_tool must be empty")
        if required:
            raise CheckError(f"{name} is the first subtask and must take no arguments")
        input_from = None
    else:
        if required != 1 and not (required == 0 and (positional or args.vararg)):
            raise CheckError(f"{name} must take exactly one argument, previous_output (it takes {required})")
        input_from = subtask.input_from_tool or earlier[-1]
        if input_from not in earlier:
            raise CheckError(
                f"input_from_tool {subtask.input_from_tool!r} is not an earlier subtask (earlier: {', '.join(earlier)})"
            )

    modules = _imported_modules(tree)
    for entry in subtask.imports:
        modules += _declared_modules(entry)
    for module in modules:
        if not toolset.allows_import(module):
            allowed = ", ".join(toolset.libraries) or "none"
            raise CheckError(
                f"import of {module!r} is not allowed: use the standard library or the declared libraries ({allowed})"
            )

    code = ast.unparse(tree) if notes else subtask.code
    libraries = sorted({m.split(".")[0] for m in modules if m and m.split(".")[0] not in sys.stdlib_module_names})
    return CheckedSubtask(code=code, input_from=input_from, notes=notes, libraries=libraries)
