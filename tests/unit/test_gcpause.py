"""The serving process's start-up heap is frozen out of the collector's walks
(inference_worker/gcpause.py): what exists is frozen, what comes after is not, and
reference counting still frees a frozen object; a frozen cycle (a retired model) is
collected once `collect_retired` runs."""

from __future__ import annotations

import gc
import weakref

from inference_worker.gcpause import collect_retired, freeze_startup_heap


class _Thing:
    pass


def test_the_heap_that_exists_is_frozen_and_what_comes_after_is_not() -> None:
    before = _Thing()
    gone = weakref.ref(before)
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        after = _Thing()
        assert any(o is after for o in gc.get_objects())  # tracked: the collector sees it
        assert not any(o is before for o in gc.get_objects())  # frozen: it does not
        del before
        assert gone() is None  # freed by reference counting all the same
    finally:
        gc.unfreeze()  # the rest of the test session keeps an ordinary collector


def test_a_frozen_cycle_that_became_garbage_is_collected_after_a_retirement() -> None:
    lane = _Thing()
    lane.self = lane  # type: ignore[attr-defined]  # cyclic, as a lane and an fx module are
    gone = weakref.ref(lane)
    try:
        freeze_startup_heap()
        del lane
        gc.collect()
        assert gone() is not None  # frozen: the collector cannot see the cycle
        collect_retired()
        assert gone() is None
        assert gc.get_freeze_count() > 0  # and the heap is frozen again
    finally:
        gc.unfreeze()


def test_collect_retired_leaves_an_unfrozen_process_unfrozen() -> None:
    assert gc.get_freeze_count() == 0
    collect_retired()
    assert gc.get_freeze_count() == 0
