"""Build the demo model: a handwritten-digits classifier exported to ONNX.

Why this exists: the worker needs a small, real model for the demo, the tests and the
benchmarks that anyone can rebuild offline. scikit-learn ships the 8x8 `load_digits`
data set, so nothing is downloaded. Training is deterministic (fixed split seed, a
deterministic solver) and the exported file's metadata is pinned, so rebuilding on the
same library versions gives the same bytes.

Writes (relative to the repository root unless --out is given):
  config/models/digits/1/model.onnx   input `pixels` float32 [N, 64] (values 0..16),
                                      outputs `label` int64 [N], `probabilities` float32 [N, 10]
  config/models/digits/heldout.npz    held-out `x` float32 [N, 64] and `y` int64 [N]

Prints the held-out accuracy measured with onnxruntime on the exported file and exits
non-zero when it is below 0.95.

Usage: python scripts/build_digits_model.py [--out config/models/digits]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

SPLIT_SEED = 0
TEST_SIZE = 0.3
# Opset 17 is well inside what onnxruntime >= 1.18 (the project's floor) executes.
TARGET_OPSET = 17
MIN_ACCURACY = 0.95
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("label", "probabilities")


def train(x: np.ndarray, y: np.ndarray) -> Pipeline:
    """Scaler + multinomial logistic regression: ~97% here at one small matmul per row.

    A small MLP scores about the same (~0.974) for several times the compute, so the
    linear model is the better demo: the worker, not the model, should dominate latency.
    """
    clf = Pipeline(
        [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=1.0, max_iter=5000)),  # lbfgs: deterministic
        ]
    )
    clf.fit(x, y)
    return clf


def export(clf: Pipeline) -> onnx.ModelProto:
    """Convert to ONNX with plain tensor outputs and the names the model config declares."""
    model = convert_sklearn(
        clf,
        name="digits",
        initial_types=[(INPUT_NAME, FloatTensorType([None, 64]))],
        # No ZipMap: probabilities as one float32 [N, 10] tensor, not a list of dicts.
        options={id(clf): {"zipmap": False}},
        target_opset={"": TARGET_OPSET, "ai.onnx.ml": 3},
    )
    dedupe_opsets(model)
    rename_outputs(model, dict(zip(("output_label", "output_probability"), OUTPUT_NAMES,
                                   strict=True)))
    # Pin everything that could differ between builds or leak the build environment.
    model.producer_name = "inference-worker/scripts/build_digits_model.py"
    model.producer_version = "1"
    model.domain = "inference_worker.demo"
    model.model_version = 1
    model.doc_string = "8x8 digits classifier (StandardScaler + LogisticRegression)"
    model.graph.doc_string = ""
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    return model


def dedupe_opsets(model: onnx.ModelProto) -> None:
    """skl2onnx may list the default domain twice; keep one import per domain (the highest)."""
    versions: dict[str, int] = {}
    for imp in model.opset_import:
        versions[imp.domain] = max(imp.version, versions.get(imp.domain, 0))
    del model.opset_import[:]
    for domain in sorted(versions):
        model.opset_import.add(domain=domain, version=versions[domain])


def rename_outputs(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename graph outputs (and every reference to them) from skl2onnx's defaults."""
    for node in model.graph.node:
        node.output[:] = [names.get(o, o) for o in node.output]
        node.input[:] = [names.get(i, i) for i in node.input]
    for out in model.graph.output:
        if out.name in names:
            out.name = names[out.name]
    found = [o.name for o in model.graph.output]
    if found != list(OUTPUT_NAMES):
        raise SystemExit(f"unexpected ONNX outputs {found}, wanted {list(OUTPUT_NAMES)}")


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Held-out accuracy through onnxruntime (CPU), and microseconds per row at batch 64."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    label, proba = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    if label.dtype != np.int64 or proba.dtype != np.float32 or proba.shape != (len(x), 10):
        raise SystemExit(f"unexpected output types: {label.dtype} {proba.dtype} {proba.shape}")
    if not np.array_equal(label, proba.argmax(axis=1)):
        raise SystemExit("label output disagrees with argmax(probabilities)")
    batch = {INPUT_NAME: x[:64]}
    for _ in range(20):
        sess.run(None, batch)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, batch)
    us_per_row = (time.perf_counter() - t0) / (n * 64) * 1e6
    return float(np.mean(label == y)), us_per_row


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=root / "config" / "models" / "digits")
    args = parser.parse_args(argv)
    out: Path = args.out

    data_x, data_y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        data_x.astype(np.float32),
        data_y.astype(np.int64),
        test_size=TEST_SIZE,
        stratify=data_y,
        random_state=SPLIT_SEED,
    )
    clf = train(x_train, y_train)
    model = export(clf)

    model_path = out / "1" / "model.onnx"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    blob = model.SerializeToString(deterministic=True)
    model_path.write_bytes(blob)
    np.savez(out / "heldout.npz", x=np.ascontiguousarray(x_test), y=y_test)

    acc, us_per_row = onnx_accuracy(model_path, x_test, y_test)
    print(f"wrote {model_path} ({len(blob)} bytes, sha256 {hashlib.sha256(blob).hexdigest()})")
    print(f"wrote {out / 'heldout.npz'} ({len(y_test)} rows)")
    print(f"sklearn held-out accuracy: {clf.score(x_test, y_test):.4f}")
    print(f"onnxruntime held-out accuracy: {acc:.4f} ({len(y_test)} rows)")
    print(f"onnxruntime CPU cost: {us_per_row:.2f} us/row at batch 64")
    if acc < MIN_ACCURACY:
        print(f"accuracy {acc:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
