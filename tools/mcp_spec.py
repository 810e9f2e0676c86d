"""Kind 5 of the tools file: an MCP server whose tools generated code may call, and how its entry is read.

    {"mcp": "github", "command": ["github-mcp-server", "stdio"], "env": {"GITHUB_TOKEN": "…"}}      stdio
    {"mcp": "sentry", "url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer …"}}  HTTP

Optional keys: `"tools": [...]` (only these of the server's tools), `"confirm"` (True: every call waits for a
person's approval; a list: these tools do, besides the default), `"no_confirm": [...]` (these tools never wait),
`"trusted": True` (believe the server's annotations: a tool it marks read-only needs no approval), `"cwd"`.
By default every call waits for approval: a server's annotations are only believed when the operator says so.

`env` and `headers` are secrets: they are kept out of `repr`, and only tools/mcp_host.py reads them, to start the
server or open its connection on the trusted side.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_KNOWN_KEYS = {"mcp", "command", "env", "url", "headers", "tools", "confirm", "no_confirm", "trusted", "cwd"}


class McpSpecError(ValueError):
    """An MCP entry of the tools file that cannot be used; the message names the entry and what is wrong."""


def python_name(name: str) -> str:
    """`name` as a Python identifier (what generated code writes): other characters become `_`, a leading digit or
    a keyword gets a `_` prefix or suffix. "list-issues" -> "list_issues", "2fa" -> "_2fa"."""
    text = re.sub(r"\W", "_", name, flags=re.ASCII) or "_"
    if text[0].isdigit():
        text = "_" + text
    if keyword.iskeyword(text):
        text += "_"
    return text


@dataclass(frozen=True)
class McpServerSpec:
    """One MCP server as the operator declared it."""

    name: str  # as declared ("github"); `attribute` is how generated code names it
    command: tuple[str, ...] = ()  # stdio: the program and its arguments
    url: str = ""  # streamable HTTP
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # secret
    headers: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # secret
    allow: tuple[str, ...] | None = None  # "tools": only these; None: all the server offers
    confirm_all: bool = False
    confirm: tuple[str, ...] = ()
    no_confirm: tuple[str, ...] = ()
    trusted: bool = False
    cwd: str | None = None

    @property
    def attribute(self) -> str:
        return python_name(self.name)

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "streamable HTTP"

    @property
    def where(self) -> str:
        """Where the server is, for the operator (no secrets): the program, or the URL without credentials, query
        and fragment."""
        if self.command:
            return self.command[0]
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.hostname or "", "", "", "")) + (
            f":{parts.port}" if parts.port else "") + parts.path if parts.hostname else "(a URL)"


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise McpSpecError(f"{what} must be a list of tool names")
    return tuple(v.strip() for v in value)


def _strings(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise McpSpecError(f"{what} must be a dict of strings")
    return dict(value)


def spec_from_dict(spec: dict[str, Any], where: str = "tool") -> McpServerSpec:
    """Validate one `{"mcp": …}` entry; McpSpecError names the entry and what is wrong (never a secret's value)."""
    name = spec.get("mcp")
    if not isinstance(name, str) or not name.strip():
        raise McpSpecError(f"{where}: mcp must be the server's name, e.g. \"github\"")
    name = name.strip()
    where = f"{where} (MCP server {name!r})"
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
        raise McpSpecError(f"{where}: unknown keys {sorted(unknown)}; an MCP entry has {sorted(_KNOWN_KEYS)}")
    command, url = spec.get("command"), spec.get("url")
    if (command is None) == (url is None):
        raise McpSpecError(f"{where}: give either command (a stdio server) or url (a streamable HTTP server)")
    if command is not None:
        if isinstance(command, str):
            command = [command]
        if not isinstance(command, (list, tuple)) or not command or \
                not all(isinstance(c, str) and c for c in command):
            raise McpSpecError(f"{where}: command must be a list of strings, the program first")
        if spec.get("headers"):
            raise McpSpecError(f"{where}: headers apply to a url server; a stdio server gets env")
    else:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise McpSpecError(f"{where}: url must be an http:// or https:// address")
        if spec.get("env"):
            raise McpSpecError(f"{where}: env applies to a stdio server (command); a url server gets headers")
    confirm = spec.get("confirm", ())
    if not isinstance(confirm, bool):
        confirm = _names(confirm, f"{where}: confirm")
    allow = spec.get("tools")
    trusted = spec.get("trusted", False)
    if not isinstance(trusted, bool):
        raise McpSpecError(f"{where}: trusted must be true or false")
    cwd = spec.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise McpSpecError(f"{where}: cwd must be a directory path")
    return McpServerSpec(
        name=name, command=tuple(command or ()), url=url or "", env=_strings(spec.get("env"), f"{where}: env"),
        headers=_strings(spec.get("headers"), f"{where}: headers"),
        allow=None if allow is None else _names(allow, f"{where}: tools"),
        confirm_all=confirm is True, confirm=() if isinstance(confirm, bool) else confirm,
        no_confirm=_names(spec.get("no_confirm", []), f"{where}: no_confirm"), trusted=trusted, cwd=cwd,
    )


__all__ = ["McpServerSpec", "McpSpecError", "python_name", "spec_from_dict"]
