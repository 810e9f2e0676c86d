"""One step, inside the sandbox: imports nothing from AutoCode (it runs under `python -I`).

`run_job(fd)` is called in a freshly forked, already confined process. FD is a Unix socket to the server
carrying newline-delimited JSON: server -> step: the job, then replies to tool calls; step -> server: tool
calls, then the result.
"""

import builtins
import itertools
import json
import linecache
import os
import socket
import sys
import traceback

_HERE = os.path.abspath(__file__)


class ToolCallError(Exception):
    """A trusted tool reported an error."""


class ToolDenied(ToolCallError):
    """A tool that needs a person's approval was not approved (denied, or no decision in time): nothing was done.
    Generated code may catch it by this name (it is a builtin of the step)."""


class ToolError(ToolCallError):
    """A tool of an MCP server failed (its own error, bad arguments, its server unavailable): nothing to rely on.
    Generated code may catch it by this name (it is a builtin of the step)."""


class _McpServer:
    """An MCP server as generated code sees it: `server.tool(**arguments)`."""

    def __init__(self, name, stubs):
        self._name = name
        self.__dict__.update(stubs)

    def __getattr__(self, attribute):
        tools = ", ".join(sorted(k for k in self.__dict__ if not k.startswith("_"))) or "none"
        raise AttributeError(f"the MCP server {self._name} offers no tool {attribute!r} to this run; its tools: {tools}")

    def __repr__(self):
        return f"<MCP server {self._name}>"


def _save_files(value):
    """An MCP result with images: the images written under outputs/, their paths in the value."""
    if not (isinstance(value, dict) and isinstance(value.get("__mcp_files__"), list)):
        return value
    import base64

    os.makedirs("outputs", exist_ok=True)
    paths = []
    for item in value["__mcp_files__"]:
        name = os.path.basename(str(item.get("name") or "image.bin"))
        with open(os.path.join("outputs", name), "wb") as out:
            out.write(base64.b64decode(item.get("data") or ""))
        paths.append(f"outputs/{name}")
    return {"content": value.get("content"), "images": paths}


def _jsonable(value):
    # numpy scalars and arrays are common in generated code; everything else must already be JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _is_nan_error(exc):
    """Whether json.dumps(allow_nan=False) refused a NaN or an Infinity (then the error says so plainly)."""
    return isinstance(exc, ValueError) and str(exc).startswith("Out of range float")


def _format_traceback(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) != _HERE]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _flush_logs():
    # Before any message: the parent kills the process group once the result arrives.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a log pipe the server closed (EPIPE) or a closed stream
            pass


def run_job(fd):
    """Run the job read from socket FD and exit the process."""
    sock = socket.socket(fileno=fd)
    rfile, wfile = sock.makefile("rb"), sock.makefile("wb")

    def send(message):
        _flush_logs()
        wfile.write(json.dumps(message, default=_jsonable, allow_nan=False).encode() + b"\n")
        wfile.flush()

    job = json.loads(rfile.readline())
    ids = itertools.count(1)

    def make_stub(name):
        def stub(*args, **kwargs):
            call_id = next(ids)
            try:
                send({"op": "call", "id": call_id, "name": name, "args": list(args), "kwargs": kwargs})
            except ValueError as exc:
                if _is_nan_error(exc):
                    raise ValueError(f"the arguments of {name}() contain NaN or Infinity, which JSON does not "
                                     "allow") from None
                raise
            line = rfile.readline()
            if not line:
                raise ToolCallError(f"{name}: the tool host closed the connection")
            reply = json.loads(line)
            if not reply.get("ok"):
                if reply.get("raise_as") == "ToolDenied":
                    raise ToolDenied(reply.get("error"))
                if reply.get("raise_as") == "ToolError":
                    raise ToolError(reply.get("error"))
                raise ToolCallError(f"{name}: {reply.get('error')}")
            return _save_files(reply.get("value"))

        stub.__name__ = stub.__qualname__ = name.rpartition(".")[2]
        return stub

    filename = f"<{job['function']}>"
    source = job["code"]
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__autocode_step__", "__builtins__": builtins}
    servers = {}
    for name in job["tools"]:
        if "." in name:  # an MCP tool, "server.tool"
            server, _, tool = name.partition(".")
            servers.setdefault(server, {})[tool] = make_stub(name)
        else:
            namespace[name] = make_stub(name)
    for server, stubs in servers.items():
        namespace[server] = _McpServer(server, stubs)
    namespace["ToolDenied"] = ToolDenied
    namespace["ToolError"] = ToolError

    try:
        exec(compile(source, filename, "exec"), namespace)
        function = namespace[job["function"]]
        result = function(job["input"]) if job["has_input"] else function()
        if not isinstance(result, dict):
            raise TypeError(f"{job['function']} returned {type(result).__name__}, not a dict")
        try:
            payload = json.dumps({"op": "result", "output": result}, default=_jsonable, allow_nan=False)
        except (TypeError, ValueError) as exc:
            why = "it contains NaN or Infinity, which JSON does not allow" if _is_nan_error(exc) else exc
            raise TypeError(f"{job['function']} returned a dict that is not JSON: {why}") from None
        _flush_logs()
        wfile.write(payload.encode() + b"\n")
        wfile.flush()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are step errors too
        send({"op": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": _format_traceback(exc)})
    os._exit(0)  # skip the step's atexit hooks and finalizers: the result is already sent

