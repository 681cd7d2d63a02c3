"""Node.js for tests: find node and npm (missing: skip locally, fail under CI) and install
a package directory from its lock file, once per lock file content.

`npm ci` deletes and rebuilds `node_modules` every time (seconds, plus the download when
npm's cache is cold), so the install is skipped when `node_modules/.lock-sha256` holds the
hash of the current `package-lock.json`: a CI machine that keeps the checkout (or npm's
cache, `~/.npm`) pays for it once.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from tests.servers import missing

STAMP = ".lock-sha256"


def require_node(min_major: int = 18) -> tuple[str, str]:
    """Paths of node and npm, or `missing()`."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node and npm are needed (Node.js >= 18; CI uses 20)")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(out.stdout.strip().lstrip("v").split(".")[0])
    if major < min_major:
        missing(f"Node.js >= {min_major} needed, found {out.stdout.strip()}")
    return node, npm


def npm_ci(package_dir: Path, npm: str, timeout_s: float = 300) -> None:
    """`npm ci` in `package_dir` unless its node_modules matches its package-lock.json."""
    lock = (package_dir / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock).hexdigest()
    stamp = package_dir / "node_modules" / STAMP
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    done = subprocess.run(
        [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=package_dir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise AssertionError(f"npm ci in {package_dir} failed:\n{done.stderr[-3000:]}")
    stamp.write_text(digest + "\n")
