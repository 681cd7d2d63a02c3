"""What installing only the client costs: a fresh venv with ./client and nothing else.

Prints the distributions installed, the bytes they take in site-packages and the median
wall time of ``python -c "import inference_worker_client"`` over several fresh
interpreters (and, for comparison, of the bare interpreter), e.g.::

    python scripts/client_footprint.py                 # a throw-away venv
    python scripts/client_footprint.py --venv /tmp/c --json

The venv is made without pip (``python -m venv --without-pip``) and filled by this
interpreter's pip (``pip --python``), so pip itself is not counted. Needs PyPI (or a pip
cache holding paho-mqtt, msgpack, zstandard and numpy wheels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "client"


def fresh_client_venv(where: Path, extras: str = "") -> Path:
    """A new venv at `where` holding ./client (with `extras`, e.g. "[kafka]"); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--disable-pip-version-check",
            f"{CLIENT}{extras}",
        ],
        check=True,
    )
    return python


def installed(python: Path) -> dict[str, str]:
    """Distribution name -> version, as the venv's own importlib.metadata sees them."""
    code = (
        "import json, importlib.metadata as m;"
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", code], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def site_packages_bytes(python: Path) -> int:
    """Bytes of regular files under the venv's site-packages (what `du -b` would sum)."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run(
        [str(python), "-I", "-c", code], check=True, capture_output=True, text=True
    )
    total = 0
    for root, _dirs, files in os.walk(out.stdout.strip()):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def median_run_s(argv: list[str], runs: int) -> float:
    """Median wall time of `argv` over `runs` fresh processes (after one warm-up run)."""
    subprocess.run(argv, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(python: Path, runs: int) -> dict[str, object]:
    # -I: no cwd, no PYTHON* variables on sys.path, as an installed service would run
    bare = median_run_s([str(python), "-I", "-c", "pass"], runs)
    with_client = median_run_s([str(python), "-I", "-c", "import inference_worker_client"], runs)
    return {
        "python": str(python),
        "distributions": installed(python),
        "site_packages_bytes": site_packages_bytes(python),
        "interpreter_s": round(bare, 4),
        "import_client_s": round(with_client, 4),
        "import_cost_s": round(with_client - bare, 4),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="make the venv here (kept); default: a temp dir")
    parser.add_argument("--extras", default="", help='e.g. "[kafka]"')
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.venv or Path(tmp) / "venv"
        result = measure(fresh_client_venv(where, args.extras), args.runs)
    if args.json:
        print(json.dumps(result))
    else:
        dists = ", ".join(f"{k} {v}" for k, v in sorted(result["distributions"].items()))  # type: ignore[attr-defined]
        print(f"installed: {dists}")
        print(f"site-packages: {int(result['site_packages_bytes']) / 2**20:.1f} MiB")  # type: ignore[call-overload]
        print(
            f"import inference_worker_client: {result['import_cost_s']}s over the bare "
            f"interpreter ({result['interpreter_s']}s), median of {args.runs}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
