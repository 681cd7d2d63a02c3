"""The serving process's start-up heap is frozen out of the collector's walks
(inference_worker/gcpause.py): what exists is frozen, what comes after is not, and
reference counting still frees a frozen object."""

from __future__ import annotations

import gc
import weakref

from inference_worker.gcpause import freeze_startup_heap


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
