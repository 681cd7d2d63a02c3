"""The model runtime contract: a loaded model that maps named arrays to named arrays.

`run` is synchronous and is called from a worker thread (never on the event loop);
implementations must be safe to call from `instances` threads at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Declared tensor: dtype name (numpy), shape with -1 for dynamic dims, batch first."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@runtime_checkable
class Runner(Protocol):
    @property
    def inputs(self) -> Mapping[str, TensorSpec]: ...

    @property
    def outputs(self) -> Mapping[str, TensorSpec]: ...

    @property
    def device(self) -> str:
        """Where it runs, e.g. "cpu" or "cuda:0"."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime knobs from the `models` settings."""

    graph_optimization: str = "all"  # disabled | basic | extended | all
    tensorrt: bool = False  # put the TensorRT EP before CUDA when this build has it
    tensorrt_fp16: bool = True
    tensorrt_cache_dir: str = ".cache/tensorrt"  # built engines, reused across restarts
    io_binding: bool = True  # on a GPU

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}, "
                f"got {self.graph_optimization!r}"
            )
