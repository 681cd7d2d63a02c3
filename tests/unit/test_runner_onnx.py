"""The ONNX runner on the committed digits model (CPU; no GPU needed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from inference_worker.models import ModelConfig, ModelRepository
from inference_worker.runtimes import Runner, TensorSpec, load_runner
from inference_worker.runtimes.base import OrtOptions
from inference_worker.runtimes.onnx import OnnxRunner, gpu_providers
from inference_worker.serving import ort_options
from inference_worker.settings import load_settings

REPO_MODELS = Path(__file__).resolve().parents[2] / "config" / "models"


@pytest.fixture(scope="module")
def repo() -> ModelRepository:
    return ModelRepository(REPO_MODELS)


@pytest.fixture(scope="module")
def config(repo: ModelRepository) -> ModelConfig:
    return repo.config("digits")


@pytest.fixture(scope="module")
def artifact(repo: ModelRepository) -> Path:
    return repo.artifact_path("digits", repo.latest_version("digits"))


@pytest.fixture(scope="module")
def runner(config: ModelConfig, artifact: Path) -> Iterator[Runner]:
    r = load_runner(config, artifact, device="cpu", intra_op_threads=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(REPO_MODELS / "digits" / "heldout.npz") as data:
        return data["x"], data["y"]


def run_batched(runner: Runner, x: np.ndarray, size: int) -> dict[str, np.ndarray]:
    parts = [runner.run({"pixels": x[i : i + size]}) for i in range(0, len(x), size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in runner.outputs}


def test_runner_metadata(runner: Runner, config: ModelConfig) -> None:
    assert isinstance(runner, Runner)
    assert runner.device == "cpu"
    assert list(runner.inputs) == ["pixels"]
    assert runner.outputs["probabilities"] == TensorSpec("probabilities", "float32", (-1, 10))
    assert list(runner.outputs) == [o.name for o in config.outputs]


def test_heldout_accuracy_independent_of_batch_split(
    runner: Runner, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = heldout
    assert x.dtype == np.float32 and x.shape[1] == 64 and y.dtype == np.int64
    results = {size: run_batched(runner, x, size) for size in (1, 7, 64)}
    for out in results.values():
        assert out["label"].dtype == np.int64 and out["label"].shape == (len(x),)
        assert out["probabilities"].dtype == np.float32
        assert out["probabilities"].shape == (len(x), 10)
        assert float(np.mean(out["label"] == y)) >= 0.95
    base = results[64]
    for size in (1, 7):
        np.testing.assert_array_equal(results[size]["label"], base["label"])
        # Labels are identical; probabilities are too at batch >= 2, but a 1-row batch takes
        # a different (GEMV) kernel in ORT's CPU matmul and drifts by ~1e-7 (seen here).
        np.testing.assert_allclose(
            results[size]["probabilities"], base["probabilities"], rtol=0, atol=1e-6
        )


def test_concurrent_runs_match_serial(
    runner: Runner, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = heldout
    batches = [x[i : i + 64] for i in range(0, len(x), 64)]
    expected = [runner.run({"pixels": b}) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda b: runner.run({"pixels": b}), batches))
            for e, g in zip(expected, got, strict=True):
                np.testing.assert_array_equal(g["label"], e["label"])
                np.testing.assert_array_equal(g["probabilities"], e["probabilities"])


def test_auto_device_without_gpu_falls_back_to_cpu(
    config: ModelConfig, artifact: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    r = load_runner(config, artifact, device="auto")
    try:
        assert r.device in ("cpu", "cuda:0")  # "cpu" on a GPU-less machine, without raising
        out = r.run({"pixels": heldout[0][:3]})
        assert out["label"].shape == (3,)
    finally:
        r.close()


def test_closed_runner_refuses(config: ModelConfig, artifact: Path) -> None:
    r = load_runner(config, artifact, device="cpu")
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.run({"pixels": np.zeros((1, 64), np.float32)})


def test_bad_device_strings(config: ModelConfig, artifact: Path) -> None:
    for device in ("gpu", "cuda:x", "cuda:-1", "tpu:0"):
        with pytest.raises(ValueError, match="cuda:N"):
            load_runner(config, artifact, device=device)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"inputs": (TensorSpec("image", "float32", (-1, 64)),)}, "inputs"),
        ({"outputs": (TensorSpec("labels", "int64", (-1,)),)}, "not graph outputs"),
        ({"inputs": (TensorSpec("pixels", "float64", (-1, 64)),)}, "tensor\\(float\\)"),
        ({"inputs": (TensorSpec("pixels", "float32", (-1, 32)),)}, "shape"),
        ({"outputs": (TensorSpec("label", "int32", (-1,)),)}, "int64"),
        ({"outputs": (TensorSpec("probabilities", "float32", (-1, 10, 1)),)}, "shape"),
    ],
)
def test_config_graph_mismatch_raises_at_load(
    config: ModelConfig, artifact: Path, change: dict[str, object], match: str
) -> None:
    bad = dataclasses.replace(config, **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        load_runner(config=bad, artifact=artifact, device="cpu")


def test_output_subset_is_allowed(config: ModelConfig, artifact: Path) -> None:
    only_label = dataclasses.replace(config, outputs=(TensorSpec("label", "int64", (-1,)),))
    r = load_runner(only_label, artifact, device="cpu")
    assert list(r.run({"pixels": np.zeros((2, 64), np.float32)})) == ["label"]
    r.close()


def test_backend_and_artifact_must_agree(config: ModelConfig, artifact: Path) -> None:
    # An ONNX file declared as a torch model is refused at load, with a clear reason.
    with pytest.raises(ValueError, match=r"\.pt2 or \.pt"):
        load_runner(dataclasses.replace(config, backend="torch"), artifact)


def test_provider_options_put_tensorrt_before_cuda_only_when_asked_and_present() -> None:
    trt = OrtOptions(tensorrt=True, tensorrt_fp16=False, tensorrt_cache_dir="/var/cache/trt")
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = gpu_providers(1, trt, available)
    assert [p if isinstance(p, str) else p[0] for p in providers] == available
    assert providers[0][1] == {
        "device_id": 1,
        "trt_fp16_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/var/cache/trt",
    }
    assert providers[1] == ("CUDAExecutionProvider", {"device_id": 1})
    # Not asked for, or not in this build: CUDA then CPU.
    assert [p[0] for p in gpu_providers(0, OrtOptions(), available)[:1]] == [
        "CUDAExecutionProvider"
    ]
    without = gpu_providers(0, trt, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [p if isinstance(p, str) else p[0] for p in without] == available[1:]


@pytest.mark.parametrize("level", ["disabled", "basic", "extended", "all"])
def test_graph_optimization_levels_all_serve_the_same_answers(
    config: ModelConfig, artifact: Path, level: str
) -> None:
    runner = OnnxRunner(
        config, artifact, device="cpu", options=OrtOptions(graph_optimization=level)
    )
    assert runner.providers == ["CPUExecutionProvider"]
    with np.load(artifact.parents[1] / "heldout.npz") as data:
        x = data["x"][:32].astype(np.float32)
    reference = OnnxRunner(config, artifact, device="cpu").run({"pixels": x})["label"]
    assert np.array_equal(runner.run({"pixels": x})["label"], reference)


def test_unknown_graph_optimization_level_is_refused() -> None:
    with pytest.raises(ValueError, match="graph_optimization"):
        OrtOptions(graph_optimization="max")


def test_settings_reach_the_ort_options() -> None:
    settings = load_settings(
        env={"IW_MODELS__TENSORRT": "true", "IW_MODELS__ORT_GRAPH_OPTIMIZATION": "basic"}
    )
    opts = ort_options(settings.models)
    assert opts.tensorrt and opts.graph_optimization == "basic" and opts.io_binding
