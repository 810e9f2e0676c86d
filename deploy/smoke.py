"""Smoke test of the container deployment: build the images, `compose up` serve + worker + Redis, send one task
through the API, answered by the scripted LLM server of the tests, then `compose down -v`.

    python deploy/smoke.py                 # base image autocode-base:bookworm (made by make-base-image.sh if absent)
    python deploy/smoke.py --base python:3.11-slim-bookworm --online

Needs: a Docker daemon, docker compose (v2 plugin) or docker-compose (v1), the repository's tests/ (the fake LLM).
With --offline (the default) the image installs Python packages only from deploy/wheels, filled here with
`pip wheel` on this host: for build networks that cannot reach the package index (here: a TLS-intercepting egress
proxy the image does not trust). The LLM server runs on this host's loopback; a small forwarder exposes it on the
Docker bridge's gateway address, which the containers reach as host.docker.internal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.server_helpers import ScriptedLLM, free_port  # noqa: E402

PROJECT = "autocode-smoke"


def sh(*args: str, check: bool = True, capture: bool = False, env: dict[str, str] | None = None) -> str:
    print("$", " ".join(args), flush=True)
    proc = subprocess.run(args, cwd=ROOT, env=env, text=True, check=False,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if check and proc.returncode != 0:
        raise SystemExit(f"smoke: `{' '.join(args)}` failed with exit status {proc.returncode}\n{proc.stdout or ''}")
    return proc.stdout or ""


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("smoke: neither `docker compose` nor `docker-compose` is installed")


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


class Forwarder:
    """TCP from (host, port) to 127.0.0.1:target, one thread per connection: the fake LLM listens on loopback."""

    def __init__(self, host: str, target: int):
        self.target = target
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="autocode-base:bookworm", help="BASE_IMAGE of the build")
    parser.add_argument("--redis-image", default="autocode-redis:local",
                        help="Redis image (built from deploy/redis.Dockerfile on the base when absent)")
    parser.add_argument("--online", action="store_true", help="pip installs from the package index in the build")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    args = parser.parse_args()
    compose = compose_command()
    timings: dict[str, float] = {}

    if not image_exists(args.base):
        if args.base != "autocode-base:bookworm":
            raise SystemExit(f"smoke: no image {args.base}")
        started = time.monotonic()
        sh(str(ROOT / "deploy" / "make-base-image.sh"))
        timings["base image (debootstrap + import)"] = time.monotonic() - started
    if not image_exists(args.redis_image):
        sh("docker", "build", "--build-arg", f"BASE_IMAGE={args.base}", "-t", args.redis_image,
           "-f", "deploy/redis.Dockerfile", "deploy")
    if not args.online:
        wheels = ROOT / "deploy" / "wheels"
        sh(sys.executable, "-m", "pip", "wheel", "--quiet", ".", "-w", str(wheels))
        sh(sys.executable, "-m", "pip", "download", "--quiet", "setuptools>=69", "wheel", "async-timeout>=4.0.3",
           "-d", str(wheels))  # the build backend; redis's dependency on Python < 3.11.3 (Debian's 3.11.2)
        for own in wheels.glob("autocode-*.whl"):
            own.unlink()  # the image builds this checkout itself

    gateway = sh("docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}",
                 capture=True).strip()
    port = free_port()
    with ScriptedLLM() as llm, tempfile.TemporaryDirectory(prefix="autocode-smoke-") as scratch:
        forward = Forwarder(gateway, llm.fake.port)
        token = "smoke-" + os.urandom(8).hex()
        env_file = Path(scratch, "autocode.env")
        env_file.write_text("\n".join([
            f"OPENAI_BASE_URL=http://host.docker.internal:{forward.port}/v1", "OPENAI_API_KEY=sk-smoke",
            "AUTOCODE_MODEL=fake-model", f"AUTOCODE_API_TOKEN={token}", "AUTOCODE_LLM_STARTUP_CHECK=off",
            f"AUTOCODE_PUBLIC_URL=http://localhost:{port}", "AUTOCODE_SANDBOX_SLOTS=2", ""]))
        override = Path(scratch, "compose.smoke.yaml")
        override.write_text(json.dumps({"services": {
            name: {"extra_hosts": ["host.docker.internal:host-gateway"]} for name in ("serve", "worker")}}))
        env = {**os.environ, "AUTOCODE_ENV_FILE": str(env_file), "BASE_IMAGE": args.base,
               "AUTOCODE_REDIS_IMAGE": args.redis_image, "AUTOCODE_PORT": str(port),
               "PIP_OFFLINE": "" if args.online else "1"}
        base = [*compose, "-p", PROJECT, "-f", "compose.yaml", "-f", str(override)]
        ok = False
        try:
            started = time.monotonic()
            sh(*base, "build", env=env)
            timings["compose build"] = time.monotonic() - started
            started = time.monotonic()
            sh(*base, "up", "-d", env=env)
            url = f"http://127.0.0.1:{port}"
            health: dict = {}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    response = httpx.get(f"{url}/healthz", timeout=5)
                    health = response.json()
                    if response.status_code == 200:
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(1)
            else:
                raise SystemExit(f"smoke: serve never became healthy: {health}")
            timings["compose up until /healthz is ok"] = time.monotonic() - started
            print("healthz:", json.dumps(health), flush=True)
            headers = {"Authorization": f"Bearer {token}"}
            started = time.monotonic()
            submitted = httpx.post(f"{url}/api/runs", json={"task": "smoke test tag=docker", "conversation": "smoke"},
                                   headers=headers, timeout=30)
            print("POST /api/runs:", submitted.status_code, submitted.text, flush=True)
            run_id = submitted.json()["run_id"]
            run: dict = {}
            while time.monotonic() - started < 120:
                run = httpx.get(f"{url}/api/runs/{run_id}", headers=headers, timeout=10).json()
                if run["status"] not in ("queued", "running"):
                    break
                time.sleep(0.5)
            timings["task through the API"] = time.monotonic() - started
            print("GET /api/runs/{id}:", json.dumps({k: run.get(k) for k in ("status", "answer", "error", "url")}))
            ok = run.get("status") == "succeeded" and run.get("answer") == "tag docker"
            if ok:
                page = httpx.get(run["url"].replace(f"http://localhost:{port}", url), timeout=10) if run.get("url") else None
                print("run page:", run.get("url"), page.status_code if page is not None else "-")
            serve_id = sh(*base, "ps", "-q", "serve", capture=True, env=env).strip().splitlines()[-1]
            deadline = time.monotonic() + 90  # Docker's own health check (compose.yaml) turns healthy too
            while (state := sh("docker", "inspect", "-f", "{{.State.Health.Status}}", serve_id, capture=True).strip()) \
                    != "healthy" and time.monotonic() < deadline:
                time.sleep(2)
            print("serve container health:", state)
            ok = ok and state == "healthy"
            sh("docker", "ps", "--filter", f"name={PROJECT}", "--format", "{{.Names}}\t{{.Status}}\t{{.Image}}")
            worker_log = sh(*base, "logs", "worker", capture=True, env=env, check=False)
            print("worker sandbox:", [line.strip() for line in worker_log.splitlines() if "sandbox" in line][:3])
            doctor = sh(*base, "exec", "-T", "worker", "autocode", "doctor", capture=True, env=env, check=False)
            print("doctor in the worker container:\n" + "\n".join(
                line for line in doctor.splitlines() if line.startswith(("Sandbox", "LLM check"))))
            print("LLM requests:", [r.kind for r in llm.log])
        finally:
            if not ok:
                sh(*base, "logs", "--tail", "60", check=False, env=env)
            if not args.keep:
                sh(*base, "down", "-v", check=False, env=env)
            forward.sock.close()
    for what, seconds in timings.items():
        print(f"  {what}: {seconds:.1f} s")
    print("smoke: OK" if ok else "smoke: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
