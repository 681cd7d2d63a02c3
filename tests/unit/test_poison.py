"""Poison isolation's search (pipeline.poison.isolate) against a scripted model: which
groups ran, which were answered, what the culprits are, and what it cost in calls."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from inference_worker.pipeline.poison import Failed, call_budget, isolate


class Model:
    """Fails any call holding a poison item; records every call and every answer."""

    def __init__(self, poison: set[int], *, timeout_on: set[int] | None = None) -> None:
        self.poison = poison
        self.timeout_on = timeout_on or set()
        self.calls: list[list[int]] = []
        self.answered: Counter[int] = Counter()

    async def __call__(self, group: list[int]) -> Failed | None:
        self.calls.append(list(group))
        if self.timeout_on.intersection(group):
            return Failed("timed out", splittable=False)
        bad = self.poison.intersection(group)
        if bad:
            return Failed(f"poison {sorted(bad)}")
        self.answered.update(group)
        return None


@pytest.mark.parametrize("n", [2, 3, 7, 64, 100])
async def test_one_culprit_anywhere_costs_at_most_two_calls_per_halving(n: int) -> None:
    for at in range(n):
        model = Model({at})
        found = await isolate(list(range(n)), Failed("batch failed"), model)
        assert [job for job, _ in found.culprits] == [at]
        assert found.unresolved == []
        # Every good item answered exactly once; the culprit never.
        assert model.answered == Counter(i for i in range(n) if i != at)
        assert found.calls == len(model.calls)
        assert found.calls <= 2 * math.ceil(math.log2(n)), (n, at, model.calls)


async def test_two_culprits_are_both_found_and_the_rest_answered_once() -> None:
    model = Model({5, 40})
    found = await isolate(list(range(64)), Failed("batch failed"), model)
    assert sorted(job for job, _ in found.culprits) == [5, 40]
    assert model.answered == Counter(i for i in range(64) if i not in (5, 40))
    assert found.calls <= call_budget(64)


async def test_a_model_failing_everything_stops_at_the_budget() -> None:
    """Not poison but a broken model: the search spends its budget and hands the rest
    back unresolved (retried as they are), it does not run 2n calls."""
    model = Model(set(range(64)))
    found = await isolate(list(range(64)), Failed("broken"), model)
    assert found.calls == len(model.calls) == call_budget(64)
    assert model.answered == Counter()
    jobs = [job for job, _ in found.culprits] + found.unresolved
    assert sorted(jobs) == list(range(64))  # every job accounted for, once
    assert "budget" in found.reason


async def test_a_transient_failure_charges_no_good_request() -> None:
    """The batch failed once, nothing fails again: all are answered, no culprit."""
    model = Model(set())
    found = await isolate(list(range(16)), Failed("flake"), model)
    assert found.culprits == [] and found.unresolved == []
    assert model.answered == Counter(range(16))


async def test_a_timeout_stops_the_search() -> None:
    model = Model({3}, timeout_on={3})
    found = await isolate(list(range(8)), Failed("batch failed"), model)
    assert found.reason == "timed out"
    accounted = [job for job, _ in found.culprits] + found.unresolved
    assert 3 in accounted
    assert sorted(accounted + list(model.answered)) == list(range(8))
    # Nothing ran after the call that timed out.
    assert 3 in model.calls[-1]
