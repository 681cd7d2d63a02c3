"""Where a lane's model calls run (pipeline/placement.py): the loop only for calls known
to be tiny, the pool for the first calls, after a slow one, and when switched off."""

from __future__ import annotations

from inference_worker.pipeline.placement import CallPlacement


def test_the_first_calls_run_in_the_pool_then_tiny_ones_on_the_loop() -> None:
    placement = CallPlacement(0.001, learn=4, window=8)
    for _ in range(3):
        assert not placement.on_loop()
        placement.observe(0.0002)
    placement.observe(0.0002)
    assert placement.on_loop()


def test_one_slow_call_sends_a_window_of_calls_back_to_the_pool() -> None:
    placement = CallPlacement(0.001, learn=2, window=4)
    for _ in range(4):
        placement.observe(0.0002)
    assert placement.on_loop()
    placement.observe(0.005)  # slow: the next calls go to the pool
    for _ in range(3):
        assert not placement.on_loop()
        placement.observe(0.0002)
    placement.observe(0.0002)  # the slow call has left the window
    assert placement.on_loop()


def test_the_slowest_is_recomputed_when_it_leaves_the_window() -> None:
    placement = CallPlacement(0.001, learn=1, window=3)
    for seconds in (0.0009, 0.0005, 0.0004):
        placement.observe(seconds)
    assert placement.on_loop()
    placement.observe(0.002)
    placement.observe(0.0001)
    placement.observe(0.0001)
    assert not placement.on_loop()  # 0.002 still in (0.002, 0.0001, 0.0001)
    placement.observe(0.0001)
    assert placement.on_loop()


def test_zero_keeps_every_call_in_the_pool() -> None:
    placement = CallPlacement(0.0, learn=1, window=4)
    for _ in range(10):
        placement.observe(0.0)
    assert not placement.on_loop()


def test_a_timed_out_call_counts_as_slow() -> None:
    placement = CallPlacement(0.001, learn=1, window=4)
    placement.observe(0.0001)
    assert placement.on_loop()
    placement.observe(60.0)
    assert not placement.on_loop()
