"""The run viewer in a real headless Chromium (Debian's, driven by Playwright) against a real `autocode serve`
subprocess whose LLM is a scripted OpenAI-compatible server: what a finished run's page shows, live updates while
a run runs, hostile step output rendered as inert text, 404s, AUTOCODE_VIEWER=off and the security headers.

Set AUTOCODE_VIEWER_SCREENSHOT=docs/viewer.png to also save the finished run's page there (the README's picture).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from agent_core.config import Settings
from agent_core.viewer import run_url
from tests.fakes.openai_server import FakeOpenAI
from tests.server_helpers import Serve, db_rows, serve_env
from tests.system_packages import requires

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; the `requires` mark skips without it
UID_BASE = 88000  # this file's sandbox uid range: 88000 (shared server), 88064 (viewer off)
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux"),
    requires("chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")


# ------------------------------------------------------------------------------------------ scripted runs


def subtask(name: str, code: str, input_from: str = "", description: str = "") -> dict[str, Any]:
    return {"tool_name": name, "input_from_tool": input_from, "description": description, "imports": [],
            "thought": "", "code": textwrap.dedent(code).strip() + "\n"}


def verdict(answer: str, *, ok: bool = True, thoughts: str = "", retry_from: str = "",
            new: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"satisfactory": ok, "thoughts": thoughts, "final_answer": answer, "retry_from": retry_from,
            "new_subtasks": new or []}


MAKE_NUMBERS = subtask("make_numbers", """
    def make_numbers():
        numbers = list(range(1, 9))
        print(f"made {len(numbers)} numbers")
        return {"numbers": numbers}
""", description="List the numbers 1 to 8")
SQUARES_BROKEN = subtask("squares", """
    def squares(previous_output):
        return {"squares": [n * n for n in previous_output["values"]]}
""", "make_numbers", "Square each number")
SQUARES = subtask("squares", """
    def squares(previous_output):
        return {"squares": [n * n for n in previous_output["numbers"]]}
""", "make_numbers", "Square each number")
# A bar chart as a real PNG, written with zlib/struct (no matplotlib in the sandbox).
DRAW_PLOT = subtask("draw_plot", """
    def draw_plot(previous_output):
        import struct, zlib
        values = previous_output["squares"]
        width, height, bar = 320, 180, 40
        top = max(values)
        rows = []
        for y in range(height):
            row = bytearray(b"\\x00")
            for x in range(width):
                index, inside = divmod(x, bar)
                filled = 6 <= inside < bar - 6 and height - y <= values[index] * (height - 10) // top
                row += bytes((52, 120, 198) if filled else (246, 247, 249))
            rows.append(bytes(row))
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
        with open("outputs/plot.png", "wb") as handle:
            handle.write(png)
        with open("outputs/squares.html", "w") as handle:  # not an image: only ever downloaded
            handle.write("<script>parent.__pwned = 'artifact'</script>" + ",".join(map(str, values)))
        print("wrote outputs/plot.png")
        return {"file": "plot.png", "sum": sum(values), "squares": values}
""", "squares", "Draw the squares as a bar chart")

HOSTILE_TEXT = "<script>window.__pwned = 'script'</script>"
HOSTILE_IMG = "<img src=x onerror=\"window.__pwned = 'img'; alert(1)\">"
HOSTILE = subtask("hostile", f"""
    def hostile():
        import time
        time.sleep(3)
        print({HOSTILE_IMG!r})
        return {{"html": {HOSTILE_TEXT!r}, "img": {HOSTILE_IMG!r}}}
""", description="Return some markup </p><b>bold?</b>")
SLOW = subtask("slow", """
    def slow():
        import time
        time.sleep(6)
        return {"slept": 6}
""", description="Sleep a while")
# Files (issue 13): a step that lists inputs/ and writes a real PNG (zlib/struct) plus a file with a hostile name
# under outputs/; run again, it writes a newer chart.png that replaces the first in the workspace.
LOOK_AT_FILES = subtask("look_at_files", """
    def look_at_files():
        import os, struct, zlib
        names = sorted(os.listdir("inputs"))
        shade = 40 + 10 * len(names)  # another chart's bytes on each run
        rows = b"".join(b"\\x00" + bytes((shade, 120, 198)) * 4 for _ in range(4))
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
        with open("outputs/chart.png", "wb") as handle:
            handle.write(png)
        with open("outputs/<img src=x onerror=alert(1)>.txt", "w") as handle:
            handle.write("made by a step")
        return {"inputs": names}
""", description="List the files and chart them")

# task keyword -> (plans by iteration..., verdicts by iteration); plan replies are [first plan].
SCRIPTS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "squares": (
        {"main_task": "plot squares", "main_task_thought": "numbers, squares, chart",
         "subtasks": [MAKE_NUMBERS, SQUARES_BROKEN, DRAW_PLOT]},
        [verdict("", ok=False, thoughts="squares read the key 'values'; the input key is 'numbers'.",
                 retry_from="squares", new=[SQUARES, DRAW_PLOT]),
         verdict("The squares of 1 to 8 add up to 204; the bar chart is plot.png.",
                 thoughts="Sum is right and the chart was written.")],
    ),
    "hostile": (
        {"main_task": "hostile", "main_task_thought": "markup", "subtasks": [HOSTILE]},
        [verdict(f"Here: {HOSTILE_IMG}", thoughts=f"the output holds {HOSTILE_TEXT}")],
    ),
    "slow": (
        {"main_task": "slow", "main_task_thought": "sleep", "subtasks": [SLOW]},
        [verdict("Slept 6 seconds.", thoughts="done")],
    ),
    "files": (
        {"main_task": "files", "main_task_thought": "list and chart", "subtasks": [LOOK_AT_FILES]},
        [verdict("Charted the files: chart.png.", thoughts="done")],
    ),
}


class ScriptedRuns:
    """A FakeOpenAI whose plan and verdicts come from SCRIPTS, picked by a keyword of the task."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI()
        self.evaluations: dict[str, int] = {}
        self._lock = threading.Lock()
        self.fake.responder(self._respond)

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        kind = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
        prompt = "\n".join(str(m.get("content")) for m in body.get("messages", []) if m.get("role") != "system")
        key = next((k for k in SCRIPTS if f"Task: {k}" in prompt), None)
        if key is None or kind not in ("plan", "evaluation"):
            return {"content": "ok"}
        first_plan, verdicts = SCRIPTS[key]
        if kind == "plan":
            return {"json": first_plan, "prompt_tokens": 812, "completion_tokens": 406}
        with self._lock:
            count = self.evaluations.get(key, 0)
            self.evaluations[key] = count + 1
        return {"json": verdicts[min(count, len(verdicts) - 1)], "prompt_tokens": 655, "completion_tokens": 121}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def llm():
    scripted = ScriptedRuns()
    with scripted.fake:
        yield scripted


def start_serve(llm: ScriptedRuns, directory: Path, uid_base: int, **overrides: str) -> Serve:
    env = serve_env(llm, directory / "autocode.db", AUTOCODE_SANDBOX_UID_BASE=str(uid_base),
                    AUTOCODE_SANDBOX_MAX_WORKERS="64", **overrides)
    server = Serve(env, directory / "serve.log", directory)
    server.db = directory / "autocode.db"
    try:
        server.wait_ready()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    instance = start_serve(llm, tmp_path_factory.mktemp("viewer-serve"), UID_BASE)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Watched:
    """A fresh page with every dialog, console message, page error and navigation recorded."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.errors: list[str] = []
        self.navigations: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("framenavigated", lambda frame: self.navigations.append(frame.url))
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser):
    page = Watched(browser)
    yield page
    page.close()


def token_of(server: Serve, run_id: str) -> str:
    (row,) = db_rows(server.db, "SELECT view_token FROM runs WHERE id = ?", (run_id,))
    return row["view_token"]


def page_url(server: Serve, run_id: str) -> str:
    return f"{server.url}/runs/{token_of(server, run_id)}"


@pytest.fixture(scope="module")
def squares_run(server) -> str:
    run_id = server.submit_ok("squares: plot the squares of 1 to 8 and add them up", "viewer-squares")
    run = server.wait_status(run_id, timeout=60)
    assert run["status"] == "succeeded", (run, server.log_tail())
    return run_id


# ------------------------------------------------------------------------------------------ the page


def test_finished_run_page_shows_everything(server, squares_run, watched, tmp_path):
    response = watched.page.goto(page_url(server, squares_run))
    assert response is not None and response.status == 200
    page = watched.page
    page.wait_for_load_state("load")

    assert page.text_content("#run-status") == "succeeded"
    assert "add up to 204" in page.text_content("#answer")
    assert "squares: plot the squares" in page.text_content("h1.task")
    # Every step of both iterations, in order, with its duration.
    steps = page.locator("article.step").all()
    names = [step.locator("code.tool").text_content() for step in steps]
    assert names == ["make_numbers", "squares", "squares", "draw_plot"]
    assert all(step.locator("h4").text_content().strip().endswith(("ms", " s")) for step in steps)
    assert page.locator("#iteration-1 article.step-error code.tool").text_content() == "squares"
    assert "KeyError" in page.text_content("#iteration-1 article.step-error .error-text")
    assert "previous_output[\"values\"]" in page.text_content("#iteration-1 article.step-error .traceback")
    # Code is highlighted server-side: Pygments tokens (keywords, names) as spans.
    assert all(step.locator(".code .hl span.k", has_text="def").count() >= 1 for step in steps)
    assert page.locator("article.step .code .hl span.nf", has_text="draw_plot").count() == 1
    # Inputs are the previous step's output, pretty JSON; stdout is shown.
    assert "input (output of make_numbers)" in page.text_content("#iteration-2 article.step >> nth=0")
    assert "made 8 numbers" in page.text_content("#iteration-1 article.step >> nth=0")
    # The evaluator's verdicts and thoughts per iteration; token usage per call and in total.
    assert "not satisfactory" in page.text_content("#evaluation-1")
    assert "the input key is 'numbers'" in page.text_content("#evaluation-1")
    assert "satisfactory" in page.text_content("#evaluation-2")
    assert page.locator("#llm-calls tbody tr").count() == 3
    assert page.text_content("#tokens-prompt") == str(812 + 2 * 655)
    assert page.text_content("#tokens-completion") == str(406 + 2 * 121)
    # The plot is an inline image that really loaded; the HTML file is a download link, not an image.
    image = page.locator('img[data-artifact="plot.png"]')
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=10_000)
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [320, 180]
    assert page.locator("a.download", has_text="squares.html").count() == 1
    assert page.locator("img").count() == 1

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("AUTOCODE_VIEWER_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["AUTOCODE_VIEWER_SCREENSHOT"])
    # Our own script and stylesheet are allowed by the CSP: nothing was blocked, nothing threw.
    assert not watched.errors and not [m for m in watched.console if m.startswith("error")], watched.console
    assert page.evaluate("getComputedStyle(document.querySelector('#run-status')).borderRadius") != "0px"


def test_running_run_updates_without_reload(server, watched, tmp_path):
    run_id = server.submit_ok("slow: sleep for six seconds", "viewer-slow")
    server.wait_status(run_id, "running", timeout=30)
    page = watched.page
    page.goto(page_url(server, run_id))
    assert page.text_content("#run-status") == "running", "the run finished before the page loaded"
    page.screenshot(path=str(tmp_path / "running.png"))
    page.evaluate("window.__samePage = 'yes'")
    navigations = len(watched.navigations)

    sync_api.expect(page.locator("#run-status")).to_have_text("succeeded", timeout=60_000)

    assert page.evaluate("window.__samePage") == "yes", "the page was reloaded"
    assert len(watched.navigations) == navigations
    assert "Slept 6 seconds." in page.text_content("#answer")
    assert page.locator("article.step code.tool").all_text_contents() == ["slow"]
    assert page.locator(".live").count() == 0
    # The script stops polling once the run is finished.
    polls = len([url for url in watched.requests if "/state?" in url])
    assert polls >= 1
    page.wait_for_timeout(3000)
    assert len([url for url in watched.requests if "/state?" in url]) == polls
    assert not watched.errors, watched.errors


def test_hostile_output_is_text_and_runs_nothing(server, watched):
    run_id = server.submit_ok("hostile: show me some markup", "viewer-hostile")
    server.wait_status(run_id, "running", timeout=30)
    page = watched.page
    page.goto(page_url(server, run_id))
    # First arrives through the live update (innerHTML of the server-rendered fragment), then on a fresh load.
    sync_api.expect(page.locator("#run-status")).to_have_text("succeeded", timeout=60_000)
    for attempt in ("live", "reload"):
        if attempt == "reload":
            page.reload()
        output = page.text_content("article.step .output")
        assert HOSTILE_TEXT in output and "<img src=x onerror=" in output, (attempt, output)
        assert HOSTILE_IMG in page.text_content("article.step .stdout")
        assert f"Here: {HOSTILE_IMG}" in page.text_content("#answer")
        assert HOSTILE_TEXT in page.text_content("#evaluation-1")
        assert "</p><b>bold?</b>" in page.text_content("article.step .description")
        page.wait_for_timeout(500)  # give any injected handler a chance to fire
        assert page.evaluate("window.__pwned") is None, attempt
        assert page.locator("img").count() == 0 and page.locator("article.step .description b").count() == 0
        assert page.locator("script").count() == 1  # ours: static/viewer.js
    assert not watched.dialogs, watched.dialogs
    assert not watched.errors, watched.errors


def test_unknown_token_is_404(server, watched):
    response = watched.page.goto(f"{server.url}/runs/{secrets.token_urlsafe(24)}")
    assert response is not None and response.status == 404
    assert watched.page.text_content("body").strip() == "not found"
    for path in ("/runs/nope", f"/runs/{secrets.token_urlsafe(24)}/state",
                 f"/runs/{secrets.token_urlsafe(24)}/artifacts/1", "/runs/static/secret.txt"):
        reply = server.http.get(path)
        assert (reply.status_code, reply.text) == (404, "not found"), path


# ------------------------------------------------------------------------------------------ plain HTTP


def test_security_headers_and_artifacts(server, squares_run):
    token = token_of(server, squares_run)
    page = server.http.get(f"/runs/{token}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
                      "frame-ancestors 'none'", "base-uri 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "http" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text and "http://" not in page.text.split("</head>")[0]

    artifacts = {row["name"]: row for row in db_rows(
        server.db, "SELECT id, name, mime FROM artifacts WHERE run_id = ?", (squares_run,))}
    image = server.http.get(f"/runs/{token}/artifacts/{artifacts['plot.png']['id']}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"
    html = server.http.get(f"/runs/{token}/artifacts/{artifacts['squares.html']['id']}")
    assert html.status_code == 200 and html.headers["content-type"] == "application/octet-stream"
    assert html.headers["content-disposition"].startswith('attachment; filename="squares.html"')
    assert "sandbox" in html.headers["content-security-policy"]
    # Another run's token never reaches this run's files.
    other = server.submit_ok("slow: another run", "viewer-other")
    assert server.http.get(f"/runs/{token_of(server, other)}/artifacts/{artifacts['plot.png']['id']}").status_code == 404
    server.http.post(f"/api/runs/{other}/cancel")

    for name, kind in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        asset = server.http.get(f"/runs/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert ".hl .k" in server.http.get("/runs/static/viewer.css").text  # Pygments' styles are ours


def test_state_endpoint(server, squares_run):
    token = token_of(server, squares_run)
    state = server.http.get(f"/runs/{token}/state").json()
    assert state["status"] == "succeeded" and state["finished"] is True and "add up to 204" in state["html"]
    again = server.http.get(f"/runs/{token}/state", params={"v": state["version"]}).json()
    assert again == {**state, "html": None}


def test_viewer_off_serves_nothing_and_links_nothing(llm, tmp_path):
    off = start_serve(llm, tmp_path, UID_BASE + 64, AUTOCODE_VIEWER="off")
    try:
        run_id = off.submit_ok("slow: viewer off", "viewer-off")
        token = token_of(off, run_id)
        assert token  # runs still get a token; only the pages are gone
        for path in (f"/runs/{token}", f"/runs/{token}/state", "/runs/static/viewer.js"):
            assert off.http.get(path).status_code == 404, path
        off.http.post(f"/api/runs/{run_id}/cancel")
    finally:
        off.close()
    run = {"view_token": token}
    assert run_url(Settings(viewer=False), run) is None
    assert run_url(Settings(public_url="https://autocode.example.org"), run) == \
        f"https://autocode.example.org/runs/{token}"
    assert run_url(Settings(port=8123), run) is None  # no public URL: chat users could not open the link


# ------------------------------------------------------------------------------------------ files (issue 13)

HOSTILE_CSV = "<script>alert(1)</script>.csv"  # the names an attacker gives the uploads
TRAVERSAL = "../../etc/passwd"
CSV_BYTES = b"month,region,amount\n2024-01,west,700\n"
PASSWD_BYTES = b"root:x:0:0::/root:/bin/sh\n"


def _upload_run(server: Serve, task: str, conversation: str, files: list[tuple[str, bytes]] = ()) -> str:
    """A run through `POST /api/runs` (multipart when it has files), waited for until it succeeded."""
    if files:
        reply = server.http.post("/api/runs", data={"task": task, "conversation": conversation},
                                 files=[("file", (name, data, "application/octet-stream")) for name, data in files])
        assert reply.status_code == 202, reply.text
        run_id = reply.json()["run_id"]
    else:
        run_id = server.submit_ok(task, conversation)
    run = server.wait_status(run_id, timeout=60)
    assert run["status"] == "succeeded", (run, server.log_tail())
    return run_id


def _input_rows(server: Serve, run_id: str) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in db_rows(server.db, "SELECT * FROM run_inputs WHERE run_id = ?", (run_id,))}


@pytest.fixture(scope="module")
def file_runs(server) -> list[str]:
    """Three runs of one conversation: uploads with hostile names; a follow-up that finds them and run 1's outputs;
    another follow-up whose chart.png replaces run 2's in the conversation's workspace."""
    first = _upload_run(server, "files: what is in these?", "viewer-files",
                        [(HOSTILE_CSV, CSV_BYTES), (TRAVERSAL, PASSWD_BYTES)])
    second = _upload_run(server, "files: and now chart them", "viewer-files")
    third = _upload_run(server, "files: once more", "viewer-files")
    return [first, second, third]


def test_run_page_lists_the_inputs_a_run_started_with_and_its_outputs(server, file_runs):
    first, second, third = file_runs
    page = server.http.get(f"/runs/{token_of(server, first)}").text
    inputs = page.split('id="inputs"')[1].split("</section>")[0]
    # Untrusted names are escaped text, made safe the way inputs/ names them (no separators, no "..").
    assert "<script>" not in page.split("</head>")[1]
    assert "inputs/&lt;script&gt;alert(1)&lt;_script&gt;.csv" in inputs
    assert f"{len(CSV_BYTES)} B · uploaded with this run" in inputs
    assert "inputs/_._etc_passwd" in inputs and "etc/passwd" not in inputs
    # The outputs it kept, with their sizes (a hostile output name is escaped too).
    outputs = page.split('id="artifacts"')[1].split("</section>")[0]
    assert "chart.png" in outputs and "&lt;img src=x onerror=alert(1)&gt;.txt" in outputs
    assert "14 B" in outputs and "<img src=x" not in outputs

    # Run 2 started with run 1's uploads, outputs and result, each with where it came from.
    second_inputs = server.http.get(f"/runs/{token_of(server, second)}").text.split('id="inputs"')[1]
    second_inputs = second_inputs.split("</section>")[0]
    for line in ("inputs/&lt;script&gt;alert(1)&lt;_script&gt;.csv · 37 B · uploaded with run 1",
                 "inputs/_._etc_passwd · 26 B · uploaded with run 1", "output of run 1",
                 "inputs/&lt;img src=x onerror=alert(1)&gt;.txt · 14 B · output of run 1",
                 "inputs/results/run-1.json"):
        assert line in second_inputs, (line, second_inputs)
    # Run 3 replaced chart.png in the workspace; run 2's page still says what run 2 found: run 1's chart.
    chart = [line for line in second_inputs.splitlines() if "inputs/chart.png" in line]
    assert len(chart) == 1 and "output of run 1" in chart[0], second_inputs
    rows = _input_rows(server, second)
    assert rows["chart.png"]["from_run_no"] == 1 and rows["results/run-1.json"]["kind"] == "result"
    third_page = server.http.get(f"/runs/{token_of(server, third)}").text
    assert "output of run 2" in third_page.split('id="inputs"')[1].split("</section>")[0]


def test_input_downloads_are_attachments_of_this_run_only(server, file_runs):
    first, second, _ = file_runs
    token = token_of(server, first)
    rows = _input_rows(server, first)
    hostile = rows["<script>alert(1)<_script>.csv"]
    page = server.http.get(f"/runs/{token}").text
    assert f'href="{token}/inputs/{hostile["id"]}"' in page

    reply = server.http.get(f"/runs/{token}/inputs/{hostile['id']}")
    assert reply.status_code == 200 and reply.content == CSV_BYTES
    assert reply.headers["content-type"] == "application/octet-stream"
    disposition = reply.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="_script_alert_1___script_.csv"'), disposition
    assert "<" not in disposition and "/" not in disposition.split("filename*=UTF-8''")[1]
    assert "sandbox" in reply.headers["content-security-policy"]
    assert reply.headers["x-content-type-options"] == "nosniff" and reply.headers["cache-control"] == "no-store"
    passwd = server.http.get(f"/runs/{token}/inputs/{rows['_._etc_passwd']['id']}")
    assert passwd.content == PASSWD_BYTES and passwd.headers["content-disposition"].startswith(
        'attachment; filename="_._etc_passwd"')

    # Another run's token and an unknown id get the viewer's plain 404; a path that is not an id matches no route.
    for path in (f"/runs/{token_of(server, second)}/inputs/{hostile['id']}", f"/runs/{token}/inputs/999999",
                 f"/runs/{secrets.token_urlsafe(24)}/inputs/{hostile['id']}"):
        reply = server.http.get(path)
        assert (reply.status_code, reply.text) == (404, "not found"), path
    for path in (f"/runs/{token}/inputs/..%2F..%2Fetc%2Fpasswd", f"/runs/{token}/inputs/%2Fetc%2Fpasswd",
                 f"/runs/{token}/inputs/{hostile['id']}%2F..%2F..%2F..%2Fetc%2Fpasswd"):
        reply = server.http.get(path)
        assert reply.status_code == 404 and b"root:" not in reply.content, path


def test_run_page_files_in_a_browser_are_text(server, file_runs, watched):
    page = watched.page
    page.goto(page_url(server, file_runs[1]))
    text = page.text_content("#inputs")
    assert "inputs/<script>alert(1)<_script>.csv" in text and "inputs/<img src=x onerror=alert(1)>.txt" in text
    page.goto(page_url(server, file_runs[0]))
    assert "<img src=x onerror=alert(1)>.txt" in page.text_content("#artifacts")
    page.wait_for_timeout(500)
    assert not watched.dialogs and not watched.errors, (watched.dialogs, watched.errors)
    assert page.locator("script").count() == 1


def test_after_reset_the_page_still_lists_the_inputs_but_serves_them_no_more(server, llm):
    from storage.db import Storage

    run_id = _upload_run(server, "files: before a reset", "viewer-reset", [("notes.txt", b"kept until /reset\n")])
    token = token_of(server, run_id)
    (row,) = _input_rows(server, run_id).values()
    assert server.http.get(f"/runs/{token}/inputs/{row['id']}").content == b"kept until /reset\n"

    storage = Storage(server.db)  # what every adapter's /reset does
    try:
        storage.clear_conversation("viewer-reset")
    finally:
        storage.close()

    inputs = server.http.get(f"/runs/{token}").text.split('id="inputs"')[1].split("</section>")[0]
    assert "inputs/notes.txt · 18 B · uploaded with this run · no longer kept" in inputs
    assert f"{token}/inputs/" not in inputs
    gone = server.http.get(f"/runs/{token}/inputs/{row['id']}")  # no longer kept: 410 Gone, saying why
    assert gone.status_code == 410 and "no longer kept" in gone.text


def test_a_file_removed_by_age_as_the_run_started_is_not_listed_as_its_input(server):
    import sqlite3

    first = _upload_run(server, "files: an old export", "viewer-age", [("old.csv", b"a,b\n1,2\n")])
    conn = sqlite3.connect(server.db, timeout=10)  # the upload is years old (AUTOCODE_WORKSPACE_DAYS is 30)
    with conn:
        conn.execute("UPDATE workspace_files SET created_at = '2000-01-01T00:00:00.000+00:00' WHERE "
                     "conversation = 'viewer-age' AND name = 'old.csv'")
    conn.close()

    second = _upload_run(server, "files: anything left?", "viewer-age")

    assert "Removed from this conversation's files after 30 days" in server.run(second)["answer"]
    second_inputs = server.http.get(f"/runs/{token_of(server, second)}").text.split('id="inputs"')[1]
    assert "old.csv" not in second_inputs.split("</section>")[0] and "results/run-1.json" in second_inputs
    first_inputs = server.http.get(f"/runs/{token_of(server, first)}").text.split('id="inputs"')[1]
    assert "inputs/old.csv · 8 B · uploaded with this run · no longer kept" in first_inputs
