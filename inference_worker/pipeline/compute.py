"""Compute: one batch — stack and infer in the model's pool, then split and encode.

`infer` runs in the model's bounded thread pool, never on the event loop: one hand-off
there and one back per batch, and the model call itself releases the GIL. `encode` turns
the outputs into one response per job; the batch stage runs it on the loop when the
outputs are small (`worker.loop_codec_max_bytes`: a second hand-off would cost more than
the encoding, and Python in a pool thread competes with the loop for the GIL) and in the
pool otherwise (zstd releases the GIL there). One WireCodec per thread that encodes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from inference_worker_client.frozen import quick_init

from inference_worker.pipeline.jobs import Job
from inference_worker.protocol import Answer, AnswerBatch, Codec, WireCodec
from inference_worker.serving import ServedModel


@quick_init
@dataclass(frozen=True)
class Inferred:
    outputs: dict[str, np.ndarray]  # the whole batch's rows, in the jobs' order
    compute_s: float  # the model call alone
    nbytes: int  # of all outputs: where they are encoded


@quick_init
@dataclass(frozen=True)
class Computed:
    payloads: list[bytes]  # one encoded response per job, in order
    compute_s: float  # the model call alone


class BatchComputer:
    """Stateless apart from one WireCodec per thread that encodes."""

    def __init__(
        self,
        new_codec: Callable[[], WireCodec],
        worker: str,
        codec_for: Callable[[Codec], Codec],
    ) -> None:
        self._new_codec = new_codec
        self._worker = worker
        self._codec_for = codec_for
        self._local = threading.local()

    def infer(self, served: ServedModel, jobs: Sequence[Job]) -> Inferred:
        names = [spec.name for spec in served.config.inputs]
        if len(jobs) == 1:
            stacked = {n: jobs[0].request.inputs[n] for n in names}
        else:
            stacked = {n: np.concatenate([j.request.inputs[n] for j in jobs]) for n in names}
        started = time.monotonic()
        outputs = served.runner.run(stacked)
        compute_s = time.monotonic() - started
        return Inferred(outputs, compute_s, sum(v.nbytes for v in outputs.values()))

    def encode(
        self, served: ServedModel, jobs: Sequence[Job], inferred: Inferred, dispatched: float
    ) -> Computed:
        codec_for = self._codec_for
        answers = [
            Answer(
                job.request.id,
                job.request.app,
                job.rows,
                round((dispatched - job.received_at) * 1000.0, 3),
                job.request.meta,
                codec_for(job.request.codec),
            )
            for job in jobs
        ]
        batch = AnswerBatch(
            served.config.name,
            served.version,
            self._worker,
            round(inferred.compute_s * 1000.0, 3),
            inferred.outputs,
            answers,
        )
        return Computed(self._codec().encode_answers(batch), inferred.compute_s)

    def _codec(self) -> WireCodec:
        codec: WireCodec | None = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = self._new_codec()
        return codec
