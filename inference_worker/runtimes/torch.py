"""PyTorch backend: torch.export programs (`model.pt2`) and TorchScript modules (`model.pt`).

One module per model, shared by the `instances` threads: a forward pass under
`torch.inference_mode()` keeps no state, and torch releases the GIL inside its kernels, so
the threads compute concurrently. On CUDA each thread runs on its own stream (created on
the thread's first call), so that one thread's copies and kernels do not queue behind
another's on the default stream.

Names. ONNX graphs name their inputs and outputs; torch modules name only their
arguments. Inputs are matched by name to the forward's arguments (the exported
program's user inputs, the TorchScript schema) and passed positionally in that order.
Outputs are matched by position: a tensor, or a tuple/list of tensors in the order the
config lists `outputs`; a module returning a dict is matched by key instead.

Precision. `fp16`/`bf16` casts the module's floating parameters and buffers and every
floating input to that dtype, and floating outputs back to their declared dtype. The
artifact must be dtype-neutral for this (no float32 baked into the graph, e.g. by
`.float()` or `.to(torch.float32)` in forward); the warm-up run at load catches a module
that is not, so a bad combination fails at load rather than on the first request.

`torch` is imported by this module only; `runtimes.load_runner` imports it lazily, when a
torch model is configured, so a worker serving ONNX models runs without torch installed.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from inference_worker.protocol import DTYPE_NAMES
from inference_worker.runtimes.base import TensorSpec

if TYPE_CHECKING:
    from inference_worker.models import ModelConfig

log = logging.getLogger(__name__)

# The dtypes a model config may declare, as torch dtypes (uint16/32/64 need torch >= 2.3).
_TORCH_DTYPES: Mapping[str, torch.dtype] = {n: getattr(torch, n) for n in DTYPE_NAMES}
PRECISIONS: Mapping[str, torch.dtype | None] = {
    "fp32": None,  # run the module as exported
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
EXPORT_SUFFIX = ".pt2"  # torch.export.save
SCRIPT_SUFFIX = ".pt"  # torch.jit.save


class TorchRunner:
    """A loaded torch model (implements `inference_worker.runtimes.base.Runner`)."""

    def __init__(
        self,
        config: ModelConfig,
        artifact: Path,
        *,
        device: str = "auto",
        intra_op_threads: int = 0,
    ) -> None:
        if intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
        self._name = config.name
        self._where = f"model {config.name!r} ({artifact})"
        precision = config.precision
        if precision not in PRECISIONS:
            raise ValueError(
                f"{self._where}: precision must be one of {sorted(PRECISIONS)}, got {precision!r}"
            )
        self._compute_dtype = PRECISIONS[precision]
        self._inputs = MappingProxyType({s.name: s for s in config.inputs})
        self._outputs = MappingProxyType({s.name: s for s in config.outputs})
        for spec in (*config.inputs, *config.outputs):
            if spec.dtype not in _TORCH_DTYPES:
                raise ValueError(
                    f"{self._where}: dtype {spec.dtype!r} of {spec.name!r} has no torch equivalent"
                )
        self._torch_device = _resolve_device(device, self._name)
        self._device = str(self._torch_device)
        if intra_op_threads > 0:
            # Process-wide in torch: the last model loaded sets it for all torch models.
            torch.set_num_threads(intra_op_threads)
        self._local = threading.local()
        module, arg_names = self._load(artifact)
        if set(arg_names) != set(self._inputs) or len(arg_names) != len(self._inputs):
            raise ValueError(
                f"{self._where}: config inputs {sorted(self._inputs)} do not match the "
                f"module's forward arguments {list(arg_names)}"
            )
        self._arg_names = tuple(arg_names)
        if self._compute_dtype is not None:
            module = module.to(self._compute_dtype)
        self._module: torch.nn.Module | None = module
        self._warm_up()

    @property
    def inputs(self) -> Mapping[str, TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Mapping[str, TensorSpec]:
        return self._outputs

    @property
    def device(self) -> str:
        return self._device

    @property
    def precision_dtype(self) -> torch.dtype | None:
        """The dtype floating tensors are computed in (None: as exported)."""
        return self._compute_dtype

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (already validated, already stacked) batch; outputs keyed by config name."""
        module = self._module
        if module is None:
            raise RuntimeError(f"model {self._name!r}: runner is closed")
        rows = inputs[self._arg_names[0]].shape[0]
        if self._torch_device.type != "cuda":
            with torch.inference_mode():
                return self._forward(module, inputs, rows)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(self._torch_device)  # type: ignore[no-untyped-call]
            self._local.stream = stream
        with torch.inference_mode(), torch.cuda.stream(stream):
            out = self._forward(module, inputs, rows)
            stream.synchronize()  # the device-to-host copies are queued on this stream
        return out

    def close(self) -> None:
        """Drop the module; its memory is freed once in-flight runs return."""
        self._module = None

    # -- one call ------------------------------------------------------------------------

    def _forward(
        self, module: torch.nn.Module, inputs: Mapping[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        args = [self._tensor(inputs[name]) for name in self._arg_names]
        result = module(*args)
        out: dict[str, np.ndarray] = {}
        for name, value in self._match_outputs(result).items():
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(
                    f"model {self._name!r}: output {name!r} is {type(value).__name__}, "
                    "expected a tensor"
                )
            if value.ndim == 0 or value.shape[0] != rows:
                # Splitting the batch back per request relies on row i <-> request row i.
                raise RuntimeError(
                    f"model {self._name!r}: output {name!r} has shape {list(value.shape)}, "
                    f"expected {rows} rows (batch dimension first)"
                )
            out[name] = self._to_numpy(name, value)
        return out

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr)  # shares memory; inference_mode never writes inputs
        if self._compute_dtype is not None and t.is_floating_point():
            t = t.to(self._compute_dtype)
        return t.to(self._torch_device, non_blocking=True)

    def _match_outputs(self, result: Any) -> dict[str, Any]:
        names = list(self._outputs)
        if isinstance(result, Mapping):
            missing = [n for n in names if n not in result]
            if missing:
                raise RuntimeError(
                    f"model {self._name!r}: config outputs {missing} are not among the "
                    f"module's outputs {sorted(map(str, result))}"
                )
            return {n: result[n] for n in names}
        values: Sequence[Any] = (
            [result]
            if isinstance(result, torch.Tensor)
            else result
            if isinstance(result, list | tuple)
            else [result]
        )
        if len(values) != len(names):
            raise RuntimeError(
                f"model {self._name!r}: the module returned {len(values)} output(s), the config "
                f"declares {len(names)} ({names}); outputs are matched by position"
            )
        return dict(zip(names, values, strict=True))

    def _to_numpy(self, name: str, value: torch.Tensor) -> np.ndarray:
        spec = self._outputs[name]
        want = _TORCH_DTYPES[spec.dtype]
        if value.dtype != want:
            # Half precision computes float outputs in the compute dtype; anything else
            # disagreeing with the declaration is a config/artifact mismatch.
            if not (
                self._compute_dtype is not None
                and value.dtype == self._compute_dtype
                and want.is_floating_point
            ):
                raise RuntimeError(
                    f"model {self._name!r}: output {name!r} is {value.dtype}, "
                    f"config says {spec.dtype}"
                )
            value = value.to(want)
        return value.cpu().numpy()

    # -- loading -------------------------------------------------------------------------

    def _load(self, artifact: Path) -> tuple[torch.nn.Module, list[str]]:
        if not artifact.is_file():
            raise FileNotFoundError(f"{self._where}: artifact not found")
        if artifact.suffix == EXPORT_SUFFIX:
            return self._load_export(artifact)
        if artifact.suffix == SCRIPT_SUFFIX:
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(artifact), map_location=self._torch_device
            )
            module.eval()
            schema = module.forward.schema
            return module, [a.name for a in schema.arguments[1:]]  # [0] is self
        raise ValueError(
            f"{self._where}: the torch backend loads {EXPORT_SUFFIX} (torch.export) or "
            f"{SCRIPT_SUFFIX} (TorchScript) files, not {artifact.name!r}"
        )

    def _load_export(self, artifact: Path) -> tuple[torch.nn.Module, list[str]]:
        program = torch.export.load(str(artifact))
        names = list(program.graph_signature.user_inputs)
        self._check_export_inputs(program, names)
        if self._torch_device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            # Rewrites device arguments baked into the graph too, not just the weights.
            program = move_to_device_pass(program, self._torch_device)
        return program.module(), names

    def _check_export_inputs(self, program: torch.export.ExportedProgram, names: list[str]) -> None:
        """Compare declared dtypes and fixed dims with what the program was exported with."""
        metas = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
        for name in names:
            spec = self._inputs.get(name)
            val = metas.get(name)
            if spec is None or not isinstance(val, torch.Tensor):
                continue  # unknown names are reported by the caller; non-tensor args: skip
            if val.dtype != _TORCH_DTYPES[spec.dtype]:
                raise ValueError(
                    f"{self._where}: input {name!r} is {val.dtype} in the program, "
                    f"config says {spec.dtype}"
                )
            dims = [d if isinstance(d, int) else -1 for d in val.shape]
            if dims and dims[0] != -1:
                raise ValueError(
                    f"{self._where}: input {name!r} was exported with a fixed batch dimension "
                    f"({dims[0]}); export with dynamic_shapes marking dim 0 as a torch.export.Dim"
                )
            conflict = any(
                g > 0 and c > 0 and g != c for g, c in zip(dims[1:], spec.shape[1:], strict=False)
            )
            if len(dims) != len(spec.shape) or conflict:
                raise ValueError(
                    f"{self._where}: input {name!r} has shape {dims} in the program, "
                    f"config says {list(spec.shape)}"
                )

    def _warm_up(self) -> None:
        """One batch-1 run of zeros at load: kernels chosen, memory allocated, mismatches
        (dtypes, output count, precision) raised now rather than on the first request."""
        feeds = {}
        for name, spec in self._inputs.items():
            arr = np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.dtype)
            arr.setflags(write=False)
            feeds[name] = arr
        with warnings.catch_warnings():
            # torch warns once per process about read-only arrays (decoded request tensors
            # are read-only views of the message). Trigger it here, silenced: inference
            # never writes its inputs.
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(next(iter(feeds.values())))
        try:
            self.run(feeds)
        except Exception as exc:
            raise RuntimeError(f"{self._where}: warm-up run failed: {exc}") from exc
        log.info("model %r: torch runner ready on %s", self._name, self._device)


def _resolve_device(device: str, name: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit() or not index.isascii():
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"model {name!r}: device {device!r} requested but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"
        )
    if int(index) >= torch.cuda.device_count():
        raise RuntimeError(
            f"model {name!r}: device {device!r} requested but torch sees "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", int(index))
