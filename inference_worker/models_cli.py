"""`inference-worker models [NAME ...]`: what each model takes and gives, from the model
repository on disk (no broker, no Redis): the same document a worker publishes retained
on `models/<name>/metadata` (`--json` prints exactly those bytes, one line per model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from inference_worker.metadata import encode, from_repository
from inference_worker.models import ModelConfigError, UnknownModelError
from inference_worker.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="describe the models in the repository (inputs, outputs)")
    p.add_argument("names", nargs="*", help="only these models (default: models.names, or all)")
    p.add_argument("--json", action="store_true", help="the published metadata, one line each")
    return p


def _range(value: list[float] | None) -> str:
    return "" if value is None else f"{value[0]:g}..{value[1]:g}"


def format_model(doc: dict[str, Any]) -> str:
    versions = ", ".join(map(str, doc["versions"])) or "none on disk"
    lines = [
        f"{doc['name']}  (backend {doc['backend']}, versions {versions}, "
        f"max_batch_size {doc['max_batch_size']}, codecs {', '.join(doc['codecs'])})"
    ]
    for kind in ("inputs", "outputs"):
        for t in doc[kind]:
            shape = "[" + ", ".join(map(str, t["shape"])) + "]"
            lines.append(
                f"  {kind[:-1]:<6} {t['name']:<16} {t['dtype']:<8} {shape:<12} "
                f"{_range(t['range']):<12} {t['description']}"
            )
    return "\n".join(lines)


def main(settings: Settings, args: argparse.Namespace) -> int:
    names = list(args.names) or list(settings.models.names)
    try:
        docs = from_repository(Path(settings.models.root), names)
    except (ModelConfigError, UnknownModelError) as err:
        print(str(err), file=sys.stderr)
        return 2
    if not docs:
        print(f"no models under {settings.models.root}", file=sys.stderr)
        return 1
    for doc in docs.values():
        print(encode(doc).decode() if args.json else format_model(doc))
    return 0
