"""An MCP server made with the SDK's MCPServer (FastMCP in mcp 1.x) for the error paths of tools/mcp_host.py.

    python -m tests.fakes.mcp_server                # stdio
    python -m tests.fakes.mcp_server http PORT      # streamable HTTP on 127.0.0.1:PORT/mcp

Tools: echo (read-only), fail (a tool error), hang (never returns), crash (the process exits), huge (a long text),
image (a PNG), note (writes a line to $FAKE_MCP_NOTES: not read-only). FAKE_MCP_ECHO_DESCRIPTION changes echo's
description (a "rug pull"); FAKE_MCP_REQUIRE_HEADER=NAME:VALUE makes the HTTP server refuse requests without it.
"""

from __future__ import annotations

import base64
import os
import sys
import time

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

READ_ONLY = ToolAnnotations(read_only_hint=True)
# A 1x1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

server = MCPServer("fake-mcp")


@server.tool(description=os.environ.get("FAKE_MCP_ECHO_DESCRIPTION", "Echo the text back."), annotations=READ_ONLY)
def echo(text: str, times: int = 1) -> str:
    return " ".join([text] * times)


@server.tool(description="Always fails with the reason.", annotations=READ_ONLY)
def fail(reason: str) -> str:
    raise ToolError(f"failed on purpose: {reason}")


@server.tool(description="Never returns.", annotations=READ_ONLY)
def hang() -> str:
    time.sleep(3600)
    return "late"


@server.tool(description="Ends the server's process.", annotations=READ_ONLY)
def crash() -> str:
    os._exit(3)


@server.tool(description="Returns n characters.", annotations=READ_ONLY)
def huge(n: int) -> str:
    return "x" * n


@server.tool(description="Returns a 1x1 PNG.", annotations=READ_ONLY)
def image() -> Image:
    return Image(data=PNG, format="png")


@server.tool(name="add-note", description="Appends a line to the notes file.")
def note(text: str) -> str:
    with open(os.environ["FAKE_MCP_NOTES"], "a", encoding="utf-8") as out:
        out.write(text + "\n")
    return "noted"


@server.tool(description="The process id of this server.", annotations=READ_ONLY)
def pid() -> int:
    return os.getpid()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        import uvicorn

        app = server.streamable_http_app(host="127.0.0.1")
        required = os.environ.get("FAKE_MCP_REQUIRE_HEADER", "")
        if required:  # a server behind a token: requests without the header are refused with 401
            name, _, value = required.partition(":")
            inner = app

            async def app(scope, receive, send):  # noqa: F811
                headers = dict(scope.get("headers") or [])
                if scope["type"] == "http" and headers.get(name.lower().encode()) != value.encode():
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": b"missing or wrong token"})
                    return
                await inner(scope, receive, send)

        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    else:
        server.run()
