"""The operator's view of the MCP servers of the tools file: `autocode doctor` (and `autocode mcp show`) lists each
server — connected or not and why, the tools offered and which need approval, what is new or changed since it was
pinned — and `autocode mcp accept SERVER` pins what a server offers now (tools/mcp_host.py).

What a server says (names, descriptions, errors) is untrusted: it is printed cleaned and clipped.
"""

from __future__ import annotations

import json
from typing import Any

from tools.mcp_host import McpHost, clean_text, fingerprint
from tools.registry import ToolSet


async def mcp_report(toolset: ToolSet) -> list[dict[str, Any]]:
    """One entry per declared server (connected for the report, then left running: the caller closes the host)."""
    host = toolset.mcp_host
    if host is None:
        return []
    await host.start()
    pinned_all = host.pins.load()
    report = []
    for server in host.servers.values():
        spec = server.spec
        review = server.review() if server.state == "connected" else {}
        offered = server.offered() if server.state == "connected" else []
        pinned = pinned_all.get(spec.name) or {}
        listed = {tool.name: tool for tool in server.listing}
        changes = []
        for name in review.get("changed", []):
            old, new = pinned.get(name) or {}, fingerprint(listed[name])
            what = [part for part in ("description", "input_schema", "annotations") if old.get(part) != new.get(part)]
            changes.append({"tool": name, "changed": what,
                            "was": clean_text(old.get("description"), 200),
                            "now": clean_text(new.get("description"), 200)})
        report.append({
            "server": spec.name, "call_as": spec.attribute, "transport": spec.transport, "where": spec.where,
            "trusted": spec.trusted, "connected": server.state == "connected",
            "error": server.error if server.state != "connected" else "",
            "offered": [{"tool": tool.call_name, "needs_approval": tool.needs_approval} for tool in offered],
            "new": [clean_text(n, 80) for n in review.get("new", [])], "changed": changes,
            "removed": [clean_text(n, 80) for n in review.get("removed", [])],
            "pinned": bool(pinned), "pin_file": str(host.pins.path) if host.pins.path else None,
        })
    return report


def print_report(report: list[dict[str, Any]]) -> bool:
    """The report as text; True when every server is connected and offers all it lists."""
    all_ok = True
    for entry in report:
        name = entry["server"]
        head = f"MCP server {name} ({entry['transport']}: {clean_text(entry['where'], 120)}"
        head += ", trusted annotations)" if entry["trusted"] else ")"
        if not entry["connected"]:
            print(f"{head}: NOT connected — {clean_text(entry['error'], 300)}")
            all_ok = False
            continue
        print(f"{head}: connected")
        if entry["offered"]:
            tools = ", ".join(f"{t['tool']}{' (needs approval)' if t['needs_approval'] else ''}"
                              for t in entry["offered"])
            print(f"  + offered: {tools}")
        else:
            print("  ! offers no tool yet")
        if entry["new"]:
            print(f"  ! not offered, new (never accepted): {', '.join(entry['new'])}")
        for change in entry["changed"]:
            print(f"  ! not offered, changed since accepted: {clean_text(change['tool'], 80)} "
                  f"({', '.join(change['changed'])})")
            if "description" in change["changed"]:
                print(f"      was: {json.dumps(change['was'], ensure_ascii=False)}")
                print(f"      now: {json.dumps(change['now'], ensure_ascii=False)}")
        if entry["removed"]:
            print(f"  - accepted but no longer listed: {', '.join(entry['removed'])}")
        if entry["new"] or entry["changed"]:
            all_ok = False
            print(f"  To offer them, review the above, then: autocode mcp accept {name}")
    return all_ok


async def accept(host: McpHost, name: str) -> tuple[bool, str]:
    """Pin what server `name` offers now; (done, a sentence for the operator)."""
    server = next((s for s in host.servers.values() if name in (s.spec.name, s.spec.attribute)), None)
    if server is None:
        known = ", ".join(s.spec.name for s in host.servers.values()) or "none"
        return False, f"There is no MCP server {name!r} in the tools file (servers: {known})."
    await server.ready()
    if server.state != "connected":
        return False, f"The MCP server {server.spec.name} is not connected, so nothing was accepted: {server.error}"
    accepted = server.accept()
    return True, (f"Accepted {len(accepted)} tool{'' if len(accepted) == 1 else 's'} of {server.spec.name} "
                  f"({', '.join(clean_text(n, 80) for n in accepted) or 'none'}) into {host.pins.path}.")


__all__ = ["accept", "mcp_report", "print_report"]
