"""ONNX Runtime backend: one InferenceSession per model, shared by `instances` threads.

`InferenceSession.run` is thread-safe, so the worker's per-model thread pool calls it
concurrently instead of holding one session (and one copy of the weights) per thread.

Device choice. onnxruntime-gpu lists `CUDAExecutionProvider` as available whether or not
a GPU or the CUDA libraries are present; asking for it then logs errors and silently runs
on CPU. So the provider a session actually got is read back from `get_providers()`:
"auto" accepts the fallback (and keeps its noise out of the logs), "cuda:N" refuses it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from inference_worker.protocol import DTYPE_NAMES
from inference_worker.runtimes.base import OrtOptions, TensorSpec

if TYPE_CHECKING:
    from inference_worker.models import ModelConfig

log = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"
_TRT = "TensorrtExecutionProvider"
_CPU = "CPUExecutionProvider"
_GPU_PROVIDERS = (_TRT, _CUDA)
_GRAPH_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# ONNX Runtime's type strings for the dtypes a model config may declare.
_ORT_TYPES: Mapping[str, str] = {
    f"tensor({ {'float32': 'float', 'float64': 'double'}.get(n, n) })": n for n in DTYPE_NAMES
}
# ORT's own default for its process-wide logger (kWARNING); see _quiet_default_logger.
_ORT_DEFAULT_SEVERITY = 2
_ORT_FATAL_ONLY = 4


class OnnxRunner:
    """A loaded ONNX model (implements `inference_worker.runtimes.base.Runner`)."""

    def __init__(
        self,
        config: ModelConfig,
        artifact: Path,
        *,
        device: str = "auto",
        intra_op_threads: int = 0,
        options: OrtOptions | None = None,
    ) -> None:
        if intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
        self._name = config.name
        self._inputs = MappingProxyType({s.name: s for s in config.inputs})
        self._outputs = MappingProxyType({s.name: s for s in config.outputs})
        self._output_names = [s.name for s in config.outputs]
        self._ort = options or OrtOptions()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = _GRAPH_LEVELS[self._ort.graph_optimization]
        opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3
        self._session: ort.InferenceSession | None
        self._session, self._device = self._open(str(artifact), opts, device)
        self._check_graph(self._session, artifact)
        self.providers = list(self._session.get_providers())  # what really runs it
        # On a GPU, bind inputs and outputs explicitly: one host-to-device copy per input
        # and outputs written straight to host buffers, instead of ORT's implicit copies.
        self._io_binding = self._ort.io_binding and self._device.startswith("cuda")

    @property
    def inputs(self) -> Mapping[str, TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Mapping[str, TensorSpec]:
        return self._outputs

    @property
    def device(self) -> str:
        return self._device

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (already validated, already stacked) batch; outputs keyed by config name."""
        session = self._session
        if session is None:
            raise RuntimeError(f"model {self._name!r}: runner is closed")
        feeds = {name: inputs[name] for name in self._inputs}
        rows = next(iter(feeds.values())).shape[0]
        if self._io_binding:
            binding = session.io_binding()
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name in self._output_names:
                binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
            results = binding.copy_outputs_to_cpu()
        else:
            results = session.run(self._output_names, feeds)
        out: dict[str, np.ndarray] = {}
        for name, value in zip(self._output_names, results, strict=True):
            arr = np.asarray(value)
            if arr.ndim == 0 or arr.shape[0] != rows:
                # Splitting the batch back per request relies on row i <-> request row i.
                raise RuntimeError(
                    f"model {self._name!r}: output {name!r} has shape {list(arr.shape)}, "
                    f"expected {rows} rows (batch dimension first)"
                )
            out[name] = arr
        return out

    def close(self) -> None:
        """Drop the session; its memory (host or GPU) is freed once in-flight runs return."""
        self._session = None

    # -- loading -------------------------------------------------------------------------

    def _open(
        self, path: str, opts: ort.SessionOptions, device: str
    ) -> tuple[ort.InferenceSession, str]:
        if device == "cpu":
            return ort.InferenceSession(path, opts, providers=[_CPU]), "cpu"
        if device == "auto":
            if _CUDA not in ort.get_available_providers():
                return ort.InferenceSession(path, opts, providers=[_CPU]), "cpu"
            try:
                with _quiet_default_logger():
                    session = ort.InferenceSession(path, opts, providers=self._gpu(0))
            except Exception as exc:  # ORT raises assorted types when no GPU is usable
                log.info("model %r: CUDA unusable (%s); running on CPU", self._name, exc)
                return ort.InferenceSession(path, opts, providers=[_CPU]), "cpu"
            if session.get_providers()[0] in _GPU_PROVIDERS:
                return session, "cuda:0"
            log.info(
                "model %r: onnxruntime could not start CUDA (no GPU or CUDA/cuDNN libraries); "
                "running on CPU. Set device to cuda:0 to see onnxruntime's reason.",
                self._name,
            )
            return session, "cpu"  # ORT already fell back to a CPU-only session
        device_id = _parse_cuda(device)
        if _CUDA not in ort.get_available_providers():
            raise RuntimeError(
                f"model {self._name!r}: device {device!r} requested but this onnxruntime build "
                f"has no CUDA provider (available: {ort.get_available_providers()})"
            )
        session = ort.InferenceSession(path, opts, providers=self._gpu(device_id))
        if session.get_providers()[0] not in _GPU_PROVIDERS:
            raise RuntimeError(
                f"model {self._name!r}: device {device!r} requested but onnxruntime could not "
                "start CUDA on it (see its log above: GPU, driver, CUDA and cuDNN versions)"
            )
        return session, f"cuda:{device_id}"

    def _gpu(self, device_id: int) -> list[Any]:
        return gpu_providers(device_id, self._ort, ort.get_available_providers())

    def _check_graph(self, session: ort.InferenceSession, artifact: Path) -> None:
        """Fail at load, not at the first request, when the config and the graph disagree."""
        graph_in = {a.name: a for a in session.get_inputs()}
        graph_out = {a.name: a for a in session.get_outputs()}
        where = f"model {self._name!r} ({artifact})"
        if set(graph_in) != set(self._inputs):
            raise ValueError(
                f"{where}: config inputs {sorted(self._inputs)} do not match the graph's "
                f"inputs {sorted(graph_in)}"
            )
        missing = sorted(set(self._outputs) - set(graph_out))
        if missing:
            raise ValueError(
                f"{where}: config outputs {missing} are not graph outputs {sorted(graph_out)}"
            )
        for kind, specs, graph in (
            ("input", self._inputs, graph_in),
            ("output", self._outputs, graph_out),
        ):
            for name, spec in specs.items():
                _check_arg(where, kind, spec, graph[name])


def _check_arg(where: str, kind: str, spec: TensorSpec, arg: Any) -> None:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype != spec.dtype:
        raise ValueError(
            f"{where}: {kind} {spec.name!r} is {arg.type} in the graph, config says {spec.dtype}"
        )
    shape = arg.shape
    if not isinstance(shape, list | tuple):  # rank unknown in the graph: nothing to compare
        return
    fixed_conflict = any(
        isinstance(g, int) and g > 0 and c > 0 and g != c
        for g, c in zip(shape, spec.shape, strict=False)
    )
    if len(shape) != len(spec.shape) or fixed_conflict:
        raise ValueError(
            f"{where}: {kind} {spec.name!r} has shape {list(shape)} in the graph, "
            f"config says {list(spec.shape)}"
        )


def gpu_providers(device_id: int, options: OrtOptions, available: Sequence[str]) -> list[Any]:
    """Providers for a GPU session, best first; CPU last so unsupported nodes still run.

    TensorRT (when asked for and present) builds an engine per input shape on first use,
    which takes seconds to minutes; the engine cache keeps them across restarts.
    """
    providers: list[Any] = []
    if options.tensorrt and _TRT in available:
        providers.append(
            (
                _TRT,
                {
                    "device_id": device_id,
                    "trt_fp16_enable": options.tensorrt_fp16,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": options.tensorrt_cache_dir,
                },
            )
        )
    providers.append((_CUDA, {"device_id": device_id}))
    providers.append(_CPU)
    return providers


def _parse_cuda(device: str) -> int:
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit() or not index.isascii():
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda:N', got {device!r}")
    return int(index)


@contextlib.contextmanager
def _quiet_default_logger() -> Iterator[None]:
    """Silence ORT's process-wide logger while probing CUDA for device "auto".

    The provider-load failure is logged on ORT's default logger, not the session's, so
    `log_severity_level` cannot hide it. ORT has no getter for that logger's level, so
    afterwards it goes back to ORT's own default (warnings).
    """
    ort.set_default_logger_severity(_ORT_FATAL_ONLY)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
