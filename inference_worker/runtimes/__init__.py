"""Model runtimes behind the `Runner` protocol (see base.py).

Backends are imported only when a model needs them: importing onnxruntime (or torch) is
slow, and it must happen after the supervisor has set `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from inference_worker.runtimes.base import OrtOptions, Runner, TensorSpec

if TYPE_CHECKING:  # models.py imports runtimes.base; a runtime import here would be circular
    from inference_worker.models import ModelConfig

__all__ = ["BACKEND_SUFFIXES", "Runner", "TensorSpec", "load_runner"]

# The artifact file suffixes each backend loads.
BACKEND_SUFFIXES: dict[str, tuple[str, ...]] = {"onnx": (".onnx",), "torch": (".pt2", ".pt")}


def load_runner(
    config: ModelConfig,
    artifact: Path,
    *,
    device: str = "auto",
    intra_op_threads: int = 0,
    ort_options: OrtOptions | None = None,
) -> Runner:
    """Load `artifact` with the backend `config` names, on `device`.

    The backend comes from the config (`backend: onnx | torch`); the artifact must have a
    suffix that backend loads (`.onnx`; `.pt2` torch.export or `.pt` TorchScript). torch is
    imported here, lazily, only for a torch model.

    device: "auto" (a GPU when one really works, else CPU), "cpu", or "cuda:N".
    intra_op_threads: threads per inference call; 0 leaves the backend's default.
    """
    if config.backend not in BACKEND_SUFFIXES:
        raise ValueError(f"model {config.name!r}: unknown backend {config.backend!r}")
    # The config's `backend` picks the runtime; the artifact's suffix must be one that
    # runtime loads (and, for torch, picks the format: .pt2 torch.export, .pt TorchScript).
    if artifact.suffix not in BACKEND_SUFFIXES[config.backend]:
        raise ValueError(
            f"model {config.name!r}: backend {config.backend!r} loads "
            f"{' or '.join(BACKEND_SUFFIXES[config.backend])} files, not {artifact.name!r}"
        )
    precision = config.precision
    if config.backend == "onnx":
        if precision != "fp32":
            raise ValueError(
                f"model {config.name!r}: precision {precision!r} is supported by the torch "
                "backend only; export the ONNX model in the precision it should run in"
            )
        from inference_worker.runtimes.onnx import OnnxRunner

        return OnnxRunner(
            config, artifact, device=device, intra_op_threads=intra_op_threads, options=ort_options
        )
    try:
        from inference_worker.runtimes.torch import TorchRunner
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"model {config.name!r}: backend torch needs PyTorch: "
            "pip install 'inference-worker[torch]'",
            name="torch",
        ) from exc
    return TorchRunner(config, artifact, device=device, intra_op_threads=intra_op_threads)
