"""matplotlib's font list, built once per host and handed to every sandbox worker.

matplotlib keeps its font list (`fontlist-vNNN.json`) in MPLCONFIGDIR and rebuilds it whenever it finds none: a
scan of every system font, 0.3 s here and 2 s or more on hosts with many fonts. Each run gets a fresh working
directory, so without this every run's first chart step paid that scan. The executor builds the list once into a
directory of its own (`directory()`: root-owned, readable by the sandbox uids, bound read-only into bubblewrap);
each worker copies it into the run's writable `.matplotlib` before its first step (sandbox/worker.py), so steps
find it and never need to write there. `autocode serve` rebuilds it at start (new fonts are picked up); the CLI
builds it only when it is missing.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120


def directory() -> Path | None:
    """The cache directory (made if missing), or None when it cannot be used safely: not ours, or not creatable."""
    if os.geteuid() == 0:
        path = Path("/var/cache/autocode/matplotlib")
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autocode" / "matplotlib"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
        info = path.stat()
    except OSError as exc:
        log.info("matplotlib font cache: cannot use %s (%s); each run builds its own", path, exc)
        return None
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:  # someone else could plant a font list
        log.warning("matplotlib font cache: %s is not ours alone (owner %s, mode %o); each run builds its own",
                    path, info.st_uid, info.st_mode & 0o777)
        return None
    if os.geteuid() == 0:  # the sandbox uids read it (bubblewrap binds it; the process backend reads it in place)
        path.chmod(0o755)
        for parent in path.parents:
            if str(parent) == "/":
                break
            if not parent.stat().st_mode & 0o001:
                return None
    return path


def font_lists(path: Path) -> list[str]:
    return sorted(glob.glob(str(path / "fontlist-v*.json")))


def build(path: Path, force: bool = False) -> bool:
    """Build the font list into `path` with the sandbox's interpreter (unless one is there and not `force`).
    Written beside and renamed into place, so a worker copying it never sees half a file. False: no matplotlib,
    or the build failed (logged; runs then build their own, as before)."""
    if font_lists(path) and not force:
        return True
    with tempfile.TemporaryDirectory(prefix=".build-", dir=path) as scratch:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "MPLCONFIGDIR": scratch, "MPLBACKEND": "Agg"}
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", "import matplotlib.font_manager"], env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("matplotlib font cache: the build failed (%s)", exc)
            return False
        if proc.returncode != 0:
            if "No module named 'matplotlib'" not in proc.stderr:
                log.warning("matplotlib font cache: the build failed: %s", proc.stderr.strip()[-300:])
            return False
        built = font_lists(Path(scratch))
        for stale in font_lists(path):
            os.unlink(stale)
        for made in built:
            os.chmod(made, 0o644)
            os.replace(made, path / os.path.basename(made))
    return bool(built)
