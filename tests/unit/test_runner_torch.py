"""The torch runner on tiny modules built here: torch.export (.pt2) and TorchScript (.pt)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_worker.models import ModelConfig
from inference_worker.runtimes import Runner, TensorSpec, load_runner
from tests.models import require_modules

require_modules("torch")
import torch  # noqa: E402

from inference_worker.runtimes.torch import TorchRunner  # noqa: E402

FEATURES = 8
# TorchScript is deprecated in torch 2.13 but still loads; the runner supports it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


class TinyNet(torch.nn.Module):
    """Two outputs, one float and one integer; dtype-neutral (castable to fp16/bf16)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.linear(x) * scale
        return logits.softmax(dim=-1), logits.argmax(dim=-1)


class DictNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "total": x.sum(dim=1)}


class BakedFloat32(torch.nn.Module):
    """Casts to float32 inside forward: cannot run in half precision."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.float32))  # type: ignore[no-any-return]


def tiny_config(**change: Any) -> ModelConfig:
    config = ModelConfig(
        name="tiny",
        backend="torch",
        inputs=(
            TensorSpec("x", "float32", (-1, FEATURES)),
            TensorSpec("scale", "float32", (-1, 1)),
        ),
        outputs=(
            TensorSpec("probabilities", "float32", (-1, 4)),
            TensorSpec("label", "int64", (-1,)),
        ),
    )
    return dataclasses.replace(config, **change)


def with_precision(config: ModelConfig, precision: str) -> ModelConfig:
    """ModelConfig gains `precision` in models.py; until then an attribute stands in."""
    if "precision" in {f.name for f in dataclasses.fields(config)}:
        return dataclasses.replace(config, precision=precision)  # type: ignore[call-arg]
    holder = _PrecisionConfig(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    )
    object.__setattr__(holder, "precision", precision)
    return holder


@dataclasses.dataclass(frozen=True)
class _PrecisionConfig(ModelConfig):
    pass


def example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(3, FEATURES), torch.ones(3, 1)


@pytest.fixture(scope="module")
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def pt2(net: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        net, example(), dynamic_shapes={"x": {0: batch}, "scale": {0: batch}}
    )
    path = tmp_path_factory.mktemp("torch") / "model.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def pt(net: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torch") / "model.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.fixture(scope="module", params=["pt2", "pt"])
def artifact(request: pytest.FixtureRequest, pt2: Path, pt: Path) -> Path:
    return pt2 if request.param == "pt2" else pt


@pytest.fixture(scope="module")
def runner(artifact: Path) -> Iterator[Runner]:
    r = load_runner(tiny_config(), artifact, device="cpu", intra_op_threads=1)
    yield r
    r.close()


def batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, FEATURES)).astype(np.float32),
        "scale": np.full((rows, 1), 2.0, np.float32),
    }


def eager(net: TinyNet, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        p, label = net(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["scale"]))
    return p.numpy(), label.numpy()


def test_runner_metadata(runner: Runner) -> None:
    assert isinstance(runner, Runner)
    assert isinstance(runner, TorchRunner)
    assert runner.device == "cpu"
    assert list(runner.inputs) == ["x", "scale"]
    assert list(runner.outputs) == ["probabilities", "label"]


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_outputs_match_eager_module(runner: Runner, net: TinyNet, rows: int) -> None:
    inputs = batch(rows, seed=rows)
    out = runner.run(inputs)
    assert list(out) == ["probabilities", "label"]
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (rows, 4)
    assert out["label"].dtype == np.int64 and out["label"].shape == (rows,)
    p, label = eager(net, inputs)
    np.testing.assert_allclose(out["probabilities"], p, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["label"], label)


def test_inputs_are_matched_by_name_not_order(runner: Runner, net: TinyNet) -> None:
    inputs = batch(4)
    reordered = {"scale": inputs["scale"], "x": inputs["x"]}
    np.testing.assert_array_equal(runner.run(reordered)["label"], eager(net, inputs)[1])


def test_read_only_and_strided_inputs(runner: Runner, net: TinyNet) -> None:
    inputs = batch(6)
    x = np.asfortranarray(inputs["x"])  # not C-contiguous
    scale = np.frombuffer(inputs["scale"].tobytes(), np.float32).reshape(6, 1)  # read-only
    assert not scale.flags.writeable
    out = runner.run({"x": x, "scale": scale})
    np.testing.assert_array_equal(out["label"], eager(net, inputs)[1])


def test_concurrent_runs_match_serial(runner: Runner) -> None:
    batches = [batch(16, seed=i) for i in range(12)]
    expected = [runner.run(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            got = list(pool.map(runner.run, batches))
            for e, g in zip(expected, got, strict=True):
                np.testing.assert_array_equal(g["label"], e["label"])
                np.testing.assert_array_equal(g["probabilities"], e["probabilities"])


def test_warm_up_runs_at_load(pt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, tuple[tuple[int, ...], np.dtype[Any]]]] = []
    real = TorchRunner._forward

    def spy(self: TorchRunner, module: Any, inputs: Any, rows: int) -> Any:
        seen.append({k: (v.shape, v.dtype) for k, v in inputs.items()})
        return real(self, module, inputs, rows)

    monkeypatch.setattr(TorchRunner, "_forward", spy)
    r = load_runner(tiny_config(), pt2, device="cpu")
    assert seen == [
        {"x": ((1, FEATURES), np.dtype("float32")), "scale": ((1, 1), np.dtype("float32"))}
    ]
    r.close()


@pytest.mark.parametrize(("precision", "atol"), [("bf16", 5e-2), ("fp16", 5e-3)])
def test_half_precision_on_cpu(artifact: Path, net: TinyNet, precision: str, atol: float) -> None:
    r = load_runner(with_precision(tiny_config(), precision), artifact, device="cpu")
    try:
        assert isinstance(r, TorchRunner)
        assert r.precision_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        inputs = batch(32)
        out = r.run(inputs)
        # Outputs come back in the declared dtypes whatever the compute dtype.
        assert out["probabilities"].dtype == np.float32 and out["label"].dtype == np.int64
        np.testing.assert_allclose(out["probabilities"], eager(net, inputs)[0], atol=atol)
    finally:
        r.close()


def test_half_precision_refuses_a_module_with_float32_baked_in(tmp_path: Path) -> None:
    program = torch.export.export(
        BakedFloat32().eval(),
        (torch.randn(2, FEATURES),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    config = tiny_config(
        inputs=(TensorSpec("x", "float32", (-1, FEATURES)),),
        outputs=(TensorSpec("y", "float32", (-1, 4)),),
    )
    load_runner(config, path, device="cpu").close()  # fp32: fine
    with pytest.raises(RuntimeError, match="warm-up"):
        load_runner(with_precision(config, "bf16"), path, device="cpu")


def test_unknown_precision_is_refused(pt2: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        load_runner(with_precision(tiny_config(), "int4"), pt2, device="cpu")


def test_dict_outputs_are_matched_by_key(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(DictNet()), str(path))
    config = tiny_config(
        inputs=(TensorSpec("x", "float32", (-1, 3)),),
        outputs=(TensorSpec("total", "float32", (-1,)),),  # a subset, by name
    )
    r = load_runner(config, path, device="cpu")
    out = r.run({"x": np.ones((2, 3), np.float32)})
    assert list(out) == ["total"]
    np.testing.assert_array_equal(out["total"], [3.0, 3.0])
    r.close()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"inputs": (TensorSpec("x", "float32", (-1, FEATURES)),)}, "forward arguments"),
        (
            {
                "inputs": (
                    TensorSpec("x", "float32", (-1, FEATURES)),
                    TensorSpec("gain", "float32", (-1, 1)),
                )
            },
            "forward arguments",
        ),
        ({"outputs": (TensorSpec("probabilities", "float32", (-1, 4)),)}, "by position"),
        (
            {
                "outputs": (
                    TensorSpec("probabilities", "float32", (-1, 4)),
                    TensorSpec("label", "int32", (-1,)),
                )
            },
            "int64",
        ),
        (
            {
                "outputs": (
                    TensorSpec("probabilities", "float64", (-1, 4)),
                    TensorSpec("label", "int64", (-1,)),
                )
            },
            "float32",
        ),
    ],
)
def test_config_module_mismatch_raises_at_load(
    artifact: Path, change: dict[str, Any], match: str
) -> None:
    with pytest.raises((ValueError, RuntimeError), match=match):
        load_runner(tiny_config(**change), artifact, device="cpu")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (TensorSpec("x", "float64", (-1, FEATURES)), "float64"),  # dtype exported with
        (TensorSpec("x", "float32", (-1, FEATURES + 1)), "shape"),  # fixed dim exported with
    ],
)
def test_exported_input_signature_is_checked(pt2: Path, spec: TensorSpec, match: str) -> None:
    config = tiny_config(inputs=(spec, TensorSpec("scale", "float32", (-1, 1))))
    with pytest.raises(ValueError, match=match):
        load_runner(config, pt2, device="cpu")


def test_static_batch_export_is_refused(tmp_path: Path, net: TinyNet) -> None:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(net, example()), str(path))
    with pytest.raises(ValueError, match="fixed batch dimension"):
        load_runner(tiny_config(), path, device="cpu")


def test_output_rows_must_match_the_batch(tmp_path: Path) -> None:
    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=0)  # collapses the batch dimension

    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(Pooled()), str(path))
    config = tiny_config(
        inputs=(TensorSpec("x", "float32", (-1, 3)),),
        outputs=(TensorSpec("y", "float32", (-1,)),),
    )
    with pytest.raises(RuntimeError, match=r"warm-up run failed: .*expected 1 rows"):
        load_runner(config, path, device="cpu")


def test_closed_runner_refuses(pt2: Path) -> None:
    r = load_runner(tiny_config(), pt2, device="cpu")
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.run(batch(1))


def test_bad_device_strings(pt2: Path) -> None:
    for device in ("gpu", "cuda:x", "cuda:-1", "tpu:0"):
        with pytest.raises(ValueError, match="cuda:N"):
            load_runner(tiny_config(), pt2, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_devices_without_gpu(pt2: Path) -> None:
    r = load_runner(tiny_config(), pt2, device="auto")
    assert r.device == "cpu"
    r.close()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        load_runner(tiny_config(), pt2, device="cuda:0")


def _need_cuda() -> None:
    """A GPU is hardware CI never has (not a server it must start), so its absence skips
    even under CI; on a GPU host `IW_REQUIRE_CUDA=1` makes a missing device a failure."""
    if torch.cuda.is_available():
        return
    if os.environ.get("IW_REQUIRE_CUDA"):
        pytest.fail("IW_REQUIRE_CUDA is set but torch sees no CUDA device")
    pytest.skip("needs a CUDA device (CI has none; IW_REQUIRE_CUDA=1 to require one)")


def test_cuda_matches_cpu_with_one_stream_per_thread(pt2: Path) -> None:
    _need_cuda()
    cpu = load_runner(tiny_config(), pt2, device="cpu")
    gpu = load_runner(tiny_config(), pt2, device="cuda:0")
    assert gpu.device == "cuda:0"
    batches = [batch(32, seed=i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(gpu.run, batches))
    for b, g in zip(batches, got, strict=True):
        np.testing.assert_allclose(g["probabilities"], cpu.run(b)["probabilities"], atol=1e-5)
    cpu.close()
    gpu.close()


def test_wrong_artifact_kind_for_the_backend(tmp_path: Path, pt2: Path) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.pt2 or \.pt"):
        load_runner(tiny_config(), onnx_file, device="cpu")
    with pytest.raises(ValueError, match=r"\.onnx"):
        load_runner(tiny_config(backend="onnx"), pt2, device="cpu")


def test_intra_op_threads_is_validated(pt2: Path) -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        load_runner(tiny_config(), pt2, device="cpu", intra_op_threads=-1)
