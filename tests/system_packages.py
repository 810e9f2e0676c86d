"""The system packages some tests need, and one way for a test to say so.

A test that needs bubblewrap, slirp4netns, nftables, redis-server or chromium is marked
`@requires("bubblewrap")` (or, where the need is known only at run time, calls `require("bubblewrap")`). On a
machine without the package it is skipped with a reason that names the Debian package and says that
`bash .ci/run` installs it, so the README's `python -m pytest -q` passes on a fresh machine. `.ci/run` sets
AUTOCODE_TESTS_REQUIRE_SYSTEM_PACKAGES=1: there a missing package fails the test instead, so CI never passes by
skipping.

AUTOCODE_TESTS_HIDE_SYSTEM_PACKAGES=bubblewrap,redis-server,... exists only to check those skip paths on a
machine that has the packages (a shared host cannot uninstall them): the packages listed count as missing, and
their programs are taken off the test session's PATH (`hide_programs`), so that the sandbox's `auto` backend
falls back to `process` exactly as on a machine without bubblewrap.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REQUIRE_ENV = "AUTOCODE_TESTS_REQUIRE_SYSTEM_PACKAGES"
HIDE_ENV = "AUTOCODE_TESTS_HIDE_SYSTEM_PACKAGES"

# Debian package -> the program of it the tests (or the sandbox) look for on PATH.
PROGRAMS = {
    "bubblewrap": "bwrap",
    "slirp4netns": "slirp4netns",
    "nftables": "nft",
    "redis-server": "redis-server",
    "chromium": "chromium",
}
# What the sandbox's network "on" needs besides bubblewrap (nsenter is util-linux, always there).
NETWORK_PACKAGES = ("slirp4netns", "nftables")


def hidden() -> frozenset[str]:
    """The packages AUTOCODE_TESTS_HIDE_SYSTEM_PACKAGES lists (unknown names are an error, not ignored)."""
    names = frozenset(n.strip() for n in os.environ.get(HIDE_ENV, "").split(",") if n.strip())
    unknown = names - PROGRAMS.keys()
    if unknown:
        raise pytest.UsageError(f"{HIDE_ENV}: unknown package(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(PROGRAMS)}")
    return names


def strict() -> bool:
    """Is a missing package a failure (CI) rather than a skip?"""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@functools.cache
def missing(package: str) -> str | None:
    """None when `package` is usable here, else why not (the words a skip reason starts with)."""
    if package not in PROGRAMS:
        raise ValueError(f"unknown system package {package!r}; known: {', '.join(PROGRAMS)}")
    what = f"needs the Debian package `{package}` ({PROGRAMS[package]}"
    if package in hidden():
        return f"{what} is hidden by {HIDE_ENV}, which exists only to check this skip)"
    if shutil.which(PROGRAMS[package]) is None:
        return f"{what} is not installed)"
    if package == "bubblewrap":
        problem = _bubblewrap_problem()
        if problem:
            return f"{what} is installed but does not work here: {problem})"
    return None


def _bubblewrap_problem() -> str | None:
    """Why bubblewrap cannot start the real sandbox layout here (e.g. no user namespaces), or None."""
    from agent_core.sandbox import SandboxUnavailable
    from agent_core.sandbox.backends import choose_launcher

    try:
        choose_launcher("bwrap", 64, None, False)
    except SandboxUnavailable as exc:
        return str(exc)
    return None


def available(package: str) -> bool:
    return missing(package) is None


def require(*packages: str) -> None:
    """Skip the running test (fail it under AUTOCODE_TESTS_REQUIRE_SYSTEM_PACKAGES) unless all `packages` work."""
    problems = [reason for package in packages if (reason := missing(package))]
    if not problems:
        return
    message = "; ".join(problems) + ("; `bash .ci/run` installs it" if len(problems) == 1
                                     else "; `bash .ci/run` installs them")
    if strict():
        pytest.fail(f"{message} ({REQUIRE_ENV} is set: CI runs every test, none may skip for this)", pytrace=False)
    pytest.skip(message)


def requires(*packages: str) -> pytest.MarkDecorator:
    """A mark for a test (or a `pytest.param`) that needs `packages`; tests/conftest.py applies it at setup."""
    for package in packages:
        if package not in PROGRAMS:
            raise ValueError(f"unknown system package {package!r}; known: {', '.join(PROGRAMS)}")
    return pytest.mark.system_packages(*packages)


def hide_programs(packages: frozenset[str]) -> tuple[str, Path] | None:
    """A PATH without the programs of `packages`, and the directory to remove afterwards (None: nothing to hide).

    Each PATH directory holding one of them is replaced by a directory of symlinks to everything else in it (the
    python3 next to /usr/bin/bwrap stays reachable), so `shutil.which` in the tests, in the sandbox's backend
    choice and in the servers the tests start all find the package missing.
    """
    programs = {PROGRAMS[p] for p in packages}
    if not programs:
        return None
    shadow_root = Path(tempfile.mkdtemp(prefix="autocode-tests-hidden-"))
    os.chmod(shadow_root, 0o755)
    entries: list[str] = []
    for index, directory in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not directory or not any(os.path.lexists(os.path.join(directory, p)) for p in programs):
            entries.append(directory)
            continue
        shadow = shadow_root / str(index)
        shadow.mkdir()
        for name in os.listdir(directory):
            if name not in programs:
                (shadow / name).symlink_to(os.path.join(directory, name))
        entries.append(str(shadow))
    return os.pathsep.join(entries), shadow_root
