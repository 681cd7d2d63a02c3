"""The request path, one module per stage, data flowing one way (docs/architecture.md):

intake → admission → claims → lanes → batches/compute → outbox, with recovery beside
them and the lifecycle (`Worker`) on top.
"""

from inference_worker.pipeline.assembly import Assembly
from inference_worker.pipeline.jobs import Address, Job, Refusal
from inference_worker.pipeline.lifecycle import PipelineFailed, Worker

__all__ = ["Address", "Assembly", "Job", "PipelineFailed", "Refusal", "Worker"]
