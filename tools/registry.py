"""Tool declarations in the original AutoCodeAgent dict format, and the set of tools a run may use.

Kinds:
  library  {"lib_name": ["numpy"]}                                   generated code may import it
  guide    {"lib_name": [...], "instructions": ..., "code_example": ...}   advice, not binding
  exact    {..., "use_exactly_code_example": True, "code_example": "def f(...)"}  trusted operator code,
           run by the tool host outside the sandbox and called by name from generated code
  llm      the built-in `llm()` helper, answered by the tool host with the server's LLM client
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import re
import runpy
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

Kind = Literal["library", "guide", "exact", "llm"]
_KNOWN_KEYS = {
    "lib_name", "lib_names", "instructions", "code_example", "use_exactly_code_example", "use_exaclty_code_example",
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
        return Tool("exact", [x.strip() for x in libs], instructions, code, functions)
    if not libs:
        raise ToolError(f"{where}: declares no library (lib_name)")
    kind: Kind = "guide" if (instructions or code) else "library"
    return Tool(kind, [x.strip() for x in libs], instructions, code)


LLM_HELPER = Tool(
    "llm",
    instructions="One-shot text work by an LLM (summarize, classify, extract, translate, write). Returns the text.",
    functions={"llm": "llm(prompt: str, system: str = '') -> str"},
)


@dataclass
class ToolSet:
    """The tools one run may use, plus where each trusted function lives."""

    tools: list[Tool]
    _callables: dict[str, Callable[..., Any]] = field(default_factory=dict, repr=False)

    @property
    def libraries(self) -> list[str]:
        seen: dict[str, None] = {}
        for tool in self.tools:
            if tool.kind in ("library", "guide"):
                seen.update(dict.fromkeys(tool.lib_names))
        return list(seen)

    @property
    def trusted_names(self) -> list[str]:
        return [name for tool in self.tools if tool.kind in ("exact", "llm") for name in tool.functions]

    def exact_function(self, name: str) -> Callable[..., Any]:
        """The operator's function, defined once from its code_example in the trusted host."""
        if name not in self._callables:
            tool = next((t for t in self.tools if t.kind == "exact" and name in t.functions), None)
            if tool is None:
                raise KeyError(f"no trusted tool named {name!r}")
            namespace: dict[str, Any] = {"__name__": f"autocode_tool_{name}"}
            exec(compile(tool.code_example, f"<tool {name}>", "exec"), namespace)  # trusted operator code
            for fn_name in tool.functions:
                self._callables[fn_name] = namespace[fn_name]
        return self._callables[name]

    def allows_import(self, module: str) -> bool:
        top = module.split(".")[0]
        if top in sys.stdlib_module_names:
            return True
        declared = {_normalize(lib) for lib in self.libraries}
        if _normalize(top) in declared:
            return True
        return any(_normalize(dist) in declared for dist in _distributions_of(top))


@lru_cache(maxsize=1)
def _import_to_distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _distributions_of(module: str) -> list[str]:
    return _import_to_distributions().get(module, [])


def load_tools_file(path: Path) -> tuple[list[Tool], bool]:
    """Read `TOOLS = [...]` (and optional `INCLUDE_BUILTINS = False`) from an operator's Python file."""
    if not path.is_file():
        raise ToolError(f"tools file {path} does not exist")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:
        raise ToolError(f"tools file {path} failed to load: {type(exc).__name__}: {exc}") from None
    specs = namespace.get("TOOLS")
    if not isinstance(specs, list):
        raise ToolError(f"tools file {path} must define TOOLS = [ {{...}}, ... ]")
    tools = [tool_from_dict(spec, f"{path.name} TOOLS[{i}]") for i, spec in enumerate(specs)]
    return tools, bool(namespace.get("INCLUDE_BUILTINS", True))


def build_toolset(tools_file: Path | None = None) -> ToolSet:
    from tools.builtin import builtin_tools

    extra, include_builtins = load_tools_file(tools_file) if tools_file else ([], True)
    tools = [*(builtin_tools() if include_builtins else [LLM_HELPER]), *extra]
    names: dict[str, int] = {}
    for tool in tools:
        for name in tool.functions:
            names[name] = names.get(name, 0) + 1
    duplicated = [name for name, count in names.items() if count > 1]
    if duplicated:
        raise ToolError(f"trusted function names declared twice: {', '.join(duplicated)}")
    for lib in {lib for tool in tools for lib in tool.lib_names}:
        if importlib.util.find_spec(lib.replace("-", "_")) is None and not _known_distribution(lib):
            log.warning("tool library %r is not installed; steps importing it will fail", lib)
    return ToolSet(tools)


def _known_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def describe_guides(toolset: ToolSet) -> str:
    """Compact prompt lines for guide tools: instructions and example."""
    lines = []
    for tool in toolset.tools:
        if tool.kind == "guide":
            lines.append(f"{', '.join(tool.lib_names)}: {tool.instructions}".rstrip(": "))
            if tool.code_example:
                lines.append("  e.g. " + tool.code_example.replace("\n", "\n  "))
    return "\n".join(lines)


def describe_functions(toolset: ToolSet, with_instructions: bool = True) -> str:
    """One line per trusted function: signature, and the operator's instructions when asked."""
    lines = []
    for tool in toolset.tools:
        for signature in tool.functions.values():
            note = f": {tool.instructions}" if with_instructions and tool.instructions else ""
            lines.append(f"- {signature}{note}")
    return "\n".join(lines) or "(none)"
