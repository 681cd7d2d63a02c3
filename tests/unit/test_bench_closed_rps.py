"""The bench's closed-loop rate (benchmarks/load.py `Recorder.closed_rps`): measured
between answer-burst ends for a compute-bound model, and over the whole window for a
steady stream, also one with a couple of hiccups (the span between two close burst ends
would be mostly the hiccup: a steady 4,000 answers/s once read as 276)."""

from __future__ import annotations

import argparse

from benchmarks.load import Recorder


def _recorder(arrivals: list[float], answered: int) -> Recorder:
    rec = Recorder.__new__(Recorder)  # bookkeeping only: no factory, no clock
    rec.args = argparse.Namespace(duration=6.0, warmup=1.0)
    rec.win_lo, rec.win_hi = 1.0, 7.0
    rec.arrivals = arrivals
    rec.answered = answered
    return rec


def test_a_steady_stream_with_two_close_hiccups_is_its_window_rate() -> None:
    step = 1 / 4000
    arrivals = [i * step for i in range(int(8 / step))]
    # two stalls of 150 ms, 100 ms apart, early in the window
    arrivals = [t if t < 2.0 else t + 0.15 for t in arrivals]
    arrivals = [t if t < 2.25 else t + 0.15 for t in arrivals]
    answered = sum(1 for t in arrivals if 1.0 <= t < 7.0)
    rate = _recorder(arrivals, answered).closed_rps()
    assert rate == answered / 6.0
    assert rate > 3500


def test_bursts_are_measured_between_their_ends() -> None:
    # 64 answers at once every 0.5 s: a fixed window would be off by up to a burst
    arrivals = [b * 0.5 + 0.3 + i * 1e-5 for b in range(16) for i in range(64)]
    rate = _recorder(arrivals, sum(1 for t in arrivals if 1.0 <= t < 7.0)).closed_rps()
    assert abs(rate - 128.0) < 1.0
