"""Model repository: config parsing and its errors, version discovery, input validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference_worker.inputs import InputCheck, validate_inputs
from inference_worker.models import (
    ModelConfig,
    ModelConfigError,
    ModelRepository,
    UnknownModelError,
    discover_versions,
    load_model_config,
)
from inference_worker.protocol import ErrorCode, ProtocolError
from inference_worker.runtimes.base import TensorSpec

REPO_MODELS = Path(__file__).resolve().parents[2] / "config" / "models"

GOOD = """\
backend: onnx
max_batch_size: 8
max_delay_ms: 1.5
instances: 2
max_queue: 100
allow_non_finite: false
inputs:
  - {name: a, dtype: float32, shape: [-1, 3]}
  - {name: b, dtype: int64, shape: [-1, -1]}
outputs:
  - {name: y, dtype: float32, shape: [-1]}
"""


def write_model(root: Path, text: str, name: str = "m", versions: tuple[str, ...] = ()) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.yaml").write_text(text)
    for v in versions:
        (model_dir / v).mkdir()
        (model_dir / v / "model.onnx").write_bytes(b"x")
    return model_dir


def test_parses_full_config(tmp_path: Path) -> None:
    cfg = load_model_config(write_model(tmp_path, GOOD))
    assert cfg == ModelConfig(
        name="m",
        backend="onnx",
        inputs=(TensorSpec("a", "float32", (-1, 3)), TensorSpec("b", "int64", (-1, -1))),
        outputs=(TensorSpec("y", "float32", (-1,)),),
        max_batch_size=8,
        max_delay_ms=1.5,
        instances=2,
        max_queue=100,
        allow_non_finite=False,
    )


def test_defaults_for_optional_keys(tmp_path: Path) -> None:
    optional = ("max", "instances", "allow")
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(optional))
    cfg = load_model_config(write_model(tmp_path, text))
    assert (cfg.max_batch_size, cfg.instances, cfg.allow_non_finite) == (64, 1, True)


def test_committed_digits_config() -> None:
    cfg = load_model_config(REPO_MODELS / "digits")
    assert cfg.backend == "onnx"
    assert cfg.inputs == (TensorSpec("pixels", "float32", (-1, 64)),)
    assert [o.name for o in cfg.outputs] == ["label", "probabilities"]


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("backend: onnx", "backend: tensorflow", "backend"),
        ("backend: onnx", "", "backend: required"),
        ("max_batch_size: 8", "max_batch_size: 0", "max_batch_size"),
        ("max_batch_size: 8", "max_batch_size: eight", "max_batch_size"),
        ("max_batch_size: 8", "max_batch_size: true", "max_batch_size"),
        ("max_delay_ms: 1.5", "max_delay_ms: -1", "max_delay_ms"),
        ("instances: 2", "instances: 0", "instances"),
        ("max_queue: 100", "max_queue: -5", "max_queue"),
        ("allow_non_finite: false", "allow_non_finite: maybe", "allow_non_finite"),
        ("instances: 2", "instances: 2\nbatch: 3", "unknown key"),
        ("float32, shape: [-1, 3]", "complex64, shape: [-1, 3]", "inputs[0] (a).dtype"),
        ("shape: [-1, 3]", "shape: [1, 3]", "inputs[0] (a).shape: the first (batch)"),
        ("shape: [-1, 3]", "shape: [-1, 0]", "inputs[0] (a).shape"),
        ("shape: [-1, 3]", "shape: []", "inputs[0] (a).shape"),
        ("shape: [-1, 3]", "shape: [-1, x]", "inputs[0] (a).shape"),
        ("{name: b,", "{name: a,", "duplicate"),
        ("{name: b,", "{name: '',", "inputs[1].name"),
        ("{name: y, dtype: float32, shape: [-1]}", "{name: y, dtype: float32}", "outputs[0] (y)"),
        ("outputs:\n  - {name: y, dtype: float32, shape: [-1]}", "outputs: []", "outputs"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    model_dir = write_model(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ModelConfigError) as info:
        load_model_config(model_dir)
    assert str(model_dir / "config.yaml") in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "backend: [unclosed\n", ""])
def test_malformed_yaml(tmp_path: Path, text: str) -> None:
    with pytest.raises(ModelConfigError, match=r"config\.yaml"):
        load_model_config(write_model(tmp_path, text))


def test_missing_config_and_bad_name(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelConfigError, match="not found"):
        load_model_config(tmp_path / "m")
    with pytest.raises(ModelConfigError, match="model name"):
        load_model_config(write_model(tmp_path, GOOD, name="a+b"))


def test_discover_versions(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, GOOD, versions=("10", "2", "1"))
    (model_dir / "3").mkdir()  # no model file yet: skipped
    (model_dir / "old").mkdir()
    (model_dir / "old" / "model.onnx").write_bytes(b"x")
    (model_dir / "4").write_text("a file, not a directory")
    assert discover_versions(model_dir) == [1, 2, 10]
    assert discover_versions(tmp_path / "absent") == []


def test_repository(tmp_path: Path) -> None:
    write_model(tmp_path, GOOD, name="b", versions=("1", "2"))
    write_model(tmp_path, GOOD, name="a", versions=("7",))
    (tmp_path / "not-a-model").mkdir()
    write_model(tmp_path, GOOD, name="empty")
    repo = ModelRepository(tmp_path)
    assert repo.names() == ["a", "b", "empty"]
    assert repo.config("b").name == "b"
    assert repo.config("b") is repo.config("b")
    assert repo.latest_version("b") == 2
    assert repo.artifact_path("b", 1) == tmp_path / "b" / "1" / "model.onnx"
    with pytest.raises(UnknownModelError):
        repo.artifact_path("b", 3)
    with pytest.raises(UnknownModelError):
        repo.latest_version("empty")
    for bad in ("nope", "../b", "not-a-model", ""):
        with pytest.raises(UnknownModelError):
            repo.config(bad)
    assert ModelRepository(tmp_path / "absent").names() == []


def test_committed_repository() -> None:
    repo = ModelRepository(REPO_MODELS)
    assert "digits" in repo.names()
    assert repo.latest_version("digits") >= 1
    assert repo.artifact_path("digits", repo.latest_version("digits")).is_file()


# -- validate_inputs -------------------------------------------------------------------

CFG = ModelConfig(
    name="m",
    backend="onnx",
    inputs=(TensorSpec("a", "float32", (-1, 3)), TensorSpec("b", "int64", (-1, -1))),
    outputs=(TensorSpec("y", "float32", (-1,)),),
    max_batch_size=4,
    allow_non_finite=False,
)


def good(rows: int = 2) -> dict[str, np.ndarray]:
    return {"a": np.zeros((rows, 3), np.float32), "b": np.zeros((rows, 5), np.int64)}


def rows_of(cfg: ModelConfig, inputs: dict[str, np.ndarray]) -> int:
    """The rows by `validate_inputs`, after checking the compiled `InputCheck` agrees."""
    want = validate_inputs(cfg, inputs)
    assert InputCheck(cfg)(inputs) == want
    return want


def test_valid_inputs_return_rows() -> None:
    assert rows_of(CFG, good(1)) == 1
    assert rows_of(CFG, good(4)) == 4


def invalid(inputs: dict[str, np.ndarray], cfg: ModelConfig = CFG) -> str:
    """The error of `validate_inputs`; the compiled `InputCheck` must raise the same."""
    with pytest.raises(ProtocolError) as info:
        validate_inputs(cfg, inputs)
    assert info.value.code == ErrorCode.INVALID_INPUT
    with pytest.raises(ProtocolError) as compiled:
        InputCheck(cfg)(inputs)
    assert (compiled.value.code, str(compiled.value)) == (info.value.code, str(info.value))
    return str(info.value)


def test_missing_and_extra_inputs() -> None:
    assert "missing ['b']" in invalid({"a": good()["a"]})
    assert "extra ['c']" in invalid({**good(), "c": np.zeros((2, 3), np.float32)})


def test_dtype_mismatch_says_expected_and_got() -> None:
    msg = invalid({**good(), "a": np.zeros((2, 3), np.float64)})
    assert "float32" in msg and "float64" in msg
    assert "int64" in invalid({**good(), "b": np.zeros((2, 5), np.int32)})
    invalid({**good(), "a": np.zeros((2, 3), ">f4")})  # big-endian is not float32 here
    invalid({**good(), "a": [[0.0, 0.0, 0.0]] * 2})  # type: ignore[dict-item]  # not an array


def test_rank_and_dim_mismatch() -> None:
    assert "rank" in invalid({**good(), "a": np.zeros((2, 3, 1), np.float32)})
    assert "rank" in invalid({**good(), "a": np.zeros((), np.float32)})
    assert "dim 1" in invalid({**good(), "a": np.zeros((2, 4), np.float32)})


def test_batch_dimension_checks() -> None:
    mixed = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 5), np.int64)}
    assert "disagree" in invalid(mixed)
    assert "at least one row" in invalid(good(0))
    assert "max_batch_size 4" in invalid(good(5))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite(value: float) -> None:
    bad = good()
    bad["a"][1, 2] = value
    assert "NaN" in invalid(bad)
    allowed = ModelConfig(**{**CFG.__dict__, "allow_non_finite": True})
    assert rows_of(allowed, bad) == 2


def test_non_finite_check_only_for_floats() -> None:
    cfg = ModelConfig(
        name="m",
        backend="onnx",
        inputs=(TensorSpec("i", "int32", (-1,)),),
        outputs=(TensorSpec("y", "int32", (-1,)),),
        allow_non_finite=False,
    )
    assert rows_of(cfg, {"i": np.array([1, 2], np.int32)}) == 2


def test_compiled_check_agrees_on_many_shapes() -> None:
    """Random declarations and inputs (fixed seed): the compiled check returns the same
    rows or raises the same error as `validate_inputs`, including for ndarray subclasses."""
    rng = np.random.default_rng(11)
    dtypes = ["float32", "float64", "int64", "int32"]
    for _ in range(400):
        specs = tuple(
            TensorSpec(f"t{i}", str(rng.choice(dtypes)), (-1, *_dims(rng)))
            for i in range(rng.integers(1, 3))
        )
        cfg = ModelConfig(
            name="m", backend="onnx", inputs=specs, outputs=(TensorSpec("y", "float32", (-1,)),),
            max_batch_size=4, allow_non_finite=bool(rng.integers(0, 2)),
        )  # fmt: skip
        inputs: dict[str, np.ndarray] = {}
        for spec in specs:
            if rng.random() < 0.05:
                continue  # a missing input
            shape = [int(rng.integers(0, 6))]
            shape += [
                int(d) if d != -1 and rng.random() < 0.9 else int(rng.integers(1, 4))
                for d in spec.shape[1:]
            ]
            if rng.random() < 0.05:
                shape.append(1)  # a rank too many
            dtype = spec.dtype if rng.random() < 0.9 else str(rng.choice(dtypes))
            arr = np.ones(shape, dtype)
            if arr.size and arr.dtype.kind == "f" and rng.random() < 0.2:
                arr.flat[-1] = np.nan
            inputs[spec.name] = arr.view(np.memmap) if rng.random() < 0.05 else arr
        try:
            want: int | str = validate_inputs(cfg, inputs)
        except ProtocolError as exc:
            want = str(exc)
        try:
            got: int | str = InputCheck(cfg)(inputs)
        except ProtocolError as exc:
            got = str(exc)
        assert got == want, (cfg, {k: (v.dtype, v.shape) for k, v in inputs.items()})


def _dims(rng: np.random.Generator) -> list[int]:
    return [int(d) for d in rng.choice([-1, 2, 3], rng.integers(0, 3))]
