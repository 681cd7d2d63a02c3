"""A tiny ONNX model with a known poison input, in two versions (dead-letter tests).

Version 1 ("poisoned") looks up the largest pixel of each row in a table of 17 entries
(digits pixels are 0..16): a pixel of `POISON` indexes past the table and onnxruntime
raises, so such a request fails every attempt. Version 2 ("fixed") clips the pixels to
0..16 first and answers every request. Both declare the digits model's `pixels` input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

POISON = 99.0
CONFIG = """\
backend: onnx
max_batch_size: 64
max_delay_ms: 1
inputs:
  - {name: pixels, dtype: float32, shape: [-1, 64], description: "digit pixels", range: [0, 16]}
outputs:
  - {name: label, dtype: int64, shape: [-1], description: "largest pixel", range: [0, 16]}
"""


def _model(fixed: bool) -> onnx.ModelProto:
    nodes = []
    source = "pixels"
    if fixed:
        nodes.append(helper.make_node("Clip", ["pixels", "lo", "hi"], ["clipped"]))
        source = "clipped"
    nodes += [
        helper.make_node("ReduceMax", [source], ["peak"], axes=[1], keepdims=0),
        helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["label"], axis=0),
    ]
    inits = [numpy_helper.from_array(np.arange(17, dtype=np.int64), "table")]
    if fixed:
        inits += [
            numpy_helper.from_array(np.array(0, dtype=np.float32), "lo"),
            numpy_helper.from_array(np.array(16, dtype=np.float32), "hi"),
        ]
    graph = helper.make_graph(
        nodes,
        "poison",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_config(root: Path, name: str) -> Path:
    """`<root>/<name>/config.yaml`; returns the model directory."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(CONFIG)
    return model_dir


def write_version(model_dir: Path, version: int, *, fixed: bool) -> None:
    """Add version `version` (written in place, then renamed: a reload never sees half)."""
    folder = model_dir / str(version)
    folder.mkdir()
    partial = folder / "model.onnx.partial"
    partial.write_bytes(_model(fixed).SerializeToString())
    partial.rename(folder / "model.onnx")
