"""The set of tools a run may use: the built-in tools plus an operator's tools file, and how prompts describe them.

What one declaration is (the five kinds, the original AutoCodeAgent dict format plus MCP servers) lives in
tools/declarations.py; MCP servers are kept connected by tools/mcp_host.py, whose offered tools join the set.
"""

from __future__ import annotations

import builtins
import importlib.metadata
import importlib.util
import logging
import runpy
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from tools.builtin import builtin_tools
from tools.declarations import LLM_HELPER, Tool, ToolError, _normalize, tool_from_dict
from tools.mcp_host import McpHost, OfferedTool, describe_tools, pins_path

log = logging.getLogger(__name__)


@dataclass
class ToolSet:
    """The tools one run may use, plus where each trusted function lives."""

    tools: list[Tool]
    _callables: dict[str, Callable[..., Any]] = field(default_factory=dict, repr=False)
    mcp_host: McpHost | None = field(default=None, repr=False)  # the process's MCP servers (kind 5), if any

    @property
    def mcp_servers(self) -> set[str]:
        """The declared names of the MCP servers this set may use."""
        return {tool.mcp.name for tool in self.tools if tool.kind == "mcp" and tool.mcp is not None}

    def mcp_tools(self) -> list[OfferedTool]:
        """The MCP tools offered now (accepted, of this set's servers); none before the servers are started."""
        if self.mcp_host is None or not self.mcp_servers:
            return []
        return self.mcp_host.offered(self.mcp_servers)

    def mcp_tool(self, name: str) -> OfferedTool | None:
        return next((tool for tool in self.mcp_tools() if tool.call_name == name), None)

    @property
    def libraries(self) -> list[str]:
        seen: dict[str, None] = {}
        for tool in self.tools:
            if tool.kind in ("library", "guide"):
                seen.update(dict.fromkeys(tool.lib_names))
        return list(seen)

    @property
    def trusted_names(self) -> list[str]:
        """Exact tools and llm() by name, MCP tools as "server.tool" (see `mcp_tools`)."""
        names = [name for tool in self.tools if tool.kind in ("exact", "llm") for name in tool.functions]
        return names + [tool.call_name for tool in self.mcp_tools()]

    @property
    def reserved_names(self) -> set[str]:
        """Names generated code must not define: trusted functions and the MCP servers' objects."""
        names = {name for tool in self.tools if tool.kind in ("exact", "llm") for name in tool.functions}
        return names | {tool.mcp.attribute for tool in self.tools if tool.kind == "mcp" and tool.mcp is not None}

    def needs_confirmation(self, name: str) -> bool:
        """Whether a call of trusted function `name` waits for a person's approval (its tool says `confirm`; an
        MCP tool unless its trusted server marks it read-only or the operator opted it out)."""
        if "." in name:
            tool = self.mcp_tool(name)
            return tool is None or tool.needs_approval
        return any(t.kind == "exact" and t.confirm and name in t.functions for t in self.tools)

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


def build_toolset(tools_file: Path | None = None, mcp_result_kb: int = 256) -> ToolSet:
    extra, include_builtins = load_tools_file(tools_file) if tools_file else ([], True)
    tools = [*(builtin_tools() if include_builtins else [LLM_HELPER]), *extra]
    names: dict[str, int] = {}
    for tool in tools:
        for name in [*tool.functions, *([tool.mcp.attribute] if tool.mcp is not None else [])]:
            names[name] = names.get(name, 0) + 1
    duplicated = [name for name, count in names.items() if count > 1]
    if duplicated:
        raise ToolError(f"trusted function names declared twice: {', '.join(duplicated)}")
    for lib in {lib for tool in tools for lib in tool.lib_names}:
        if importlib.util.find_spec(lib.replace("-", "_")) is None and not _known_distribution(lib):
            log.warning("tool library %r is not installed; steps importing it will fail", lib)
    specs = [tool.mcp for tool in tools if tool.mcp is not None]
    for spec in specs:  # the server's object in a step must not hide a module or a builtin the step may use
        hidden = "a standard library module" if spec.attribute in sys.stdlib_module_names else \
            "a Python builtin" if hasattr(builtins, spec.attribute) else \
            "a declared library" if any(_normalize(spec.attribute) == _normalize(lib) for tool in tools
                                        for lib in tool.lib_names) else None
        if hidden:
            raise ToolError(f"MCP server name {spec.name!r} is also {hidden}'s name, which steps could not use "
                            f"beside the server; name it otherwise, e.g. \"{spec.attribute}_server\"")
    host = McpHost(specs, pins_path(tools_file), mcp_result_kb) if specs else None
    return ToolSet(tools, mcp_host=host)


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
            if tool.confirm:  # the plan should expect a refusal, and catch it where it can go on without
                note += " (the user approves each call first; raises ToolDenied if not approved)"
            lines.append(f"- {signature}{note}")
    if toolset.mcp_host is not None and toolset.mcp_servers:
        mcp = describe_tools(toolset.mcp_host, toolset.mcp_servers)
        if mcp:
            lines.append(mcp)
    return "\n".join(lines) or "(none)"
