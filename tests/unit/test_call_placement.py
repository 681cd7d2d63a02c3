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


def test_a_rare_slow_call_is_tolerated_a_frequent_one_is_not() -> None:
    placement = CallPlacement(0.001, learn=2, window=20)  # 1 in 10: two of twenty
    for _ in range(20):
        placement.observe(0.0002)
    placement.observe(0.002)
    placement.observe(0.002)
    assert placement.on_loop()  # two of twenty over: noise
    placement.observe(0.002)
    assert not placement.on_loop()  # three: the model is slow now
    for _ in range(17):
        placement.observe(0.0002)
    assert not placement.on_loop()  # the first slow one just left: still three in 20
    placement.observe(0.0002)
    assert placement.on_loop()


def test_one_very_slow_call_sends_a_window_of_calls_back_to_the_pool() -> None:
    placement = CallPlacement(0.001, learn=2, window=4)
    for _ in range(4):
        placement.observe(0.0002)
    assert placement.on_loop()
    placement.observe(0.05)  # over ten times the limit
    for _ in range(3):
        assert not placement.on_loop()
        placement.observe(0.0002)
    placement.observe(0.0002)  # the slow call has left the window
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


def test_the_tolerance_is_one_in_ten_of_the_calls_seen_so_far() -> None:
    placement = CallPlacement(0.001, learn=16, window=64)
    for _ in range(6):
        placement.observe(0.005)  # slow, but under ten times the limit
    for _ in range(10):
        placement.observe(0.0002)
    assert not placement.on_loop()  # 6 of 16 seen: far more than 1 in 10
    for _ in range(44):
        placement.observe(0.0002)
    assert placement.on_loop()  # 6 of 60
