"""`Job.claimed` (pipeline/jobs.py) builds the job directly for speed; it must equal
`dataclasses.replace` field by field, including any field added later."""

from __future__ import annotations

import dataclasses
from typing import Any

from inference_worker.pipeline.jobs import Job


def test_claimed_is_replace_with_the_token_and_attempts() -> None:
    values: dict[str, Any] = {f.name: object() for f in dataclasses.fields(Job)}
    job = Job(**values)
    claimed = job.claimed("token-1", 3)
    expected = dataclasses.replace(job, token="token-1", attempts=3)
    for f in dataclasses.fields(Job):
        assert getattr(claimed, f.name) is getattr(expected, f.name), f.name
