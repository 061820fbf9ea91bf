"""The stream's frame pacing: redraws spaced so the UI thread's CPU stays under its share, on fake clocks; and the
garbage collector held off while a stream runs."""

from __future__ import annotations

import pytest

from gpt2term.tui.pacing import CollectorPause, FramePacer


class Clocks:
    """A wall clock and a UI-thread CPU clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0

    def pacer(self, fps: float = 10, share: float = 0.03, slowest: float = 1.0) -> FramePacer:
        return FramePacer(fps, share, slowest, clock=lambda: self.wall, cpu=lambda: self.cpu)

    def frame(self, pacer: FramePacer, cost: float) -> None:
        """Wait until the pacer allows a redraw, then draw one that takes `cost` seconds of the UI's CPU."""
        self.wall += pacer.wait()
        pacer.drew()
        self.cpu += cost
        self.wall += cost


def test_cheap_redraws_keep_the_full_frame_rate():
    clocks = Clocks()
    pacer = clocks.pacer(fps=10, share=0.03)
    assert pacer.wait() == 0  # the first token of a stream is drawn at once
    for _ in range(10):
        clocks.frame(pacer, cost=0.001)
    assert pacer.interval == pytest.approx(0.1)


def test_costly_redraws_are_spaced_to_keep_the_ui_under_its_share():
    clocks = Clocks()
    pacer = clocks.pacer(fps=10, share=0.03, slowest=2.0)
    for _ in range(20):
        clocks.frame(pacer, cost=0.015)
    assert pacer.frame_cost == pytest.approx(0.015)
    assert pacer.interval == pytest.approx(0.5)  # 15 ms in every 500 ms: 3%
    start_wall, start_cpu = clocks.wall, clocks.cpu
    for _ in range(10):
        clocks.frame(pacer, cost=0.015)
    assert (clocks.cpu - start_cpu) / (clocks.wall - start_wall) == pytest.approx(0.03, rel=0.05)


def test_the_screen_moves_at_least_every_slowest_seconds_and_one_slow_frame_does_not_stall_it():
    clocks = Clocks()
    pacer = clocks.pacer(fps=10, share=0.03, slowest=1.0)
    for _ in range(5):
        clocks.frame(pacer, cost=0.3)  # a very slow machine: 10 s per frame would keep 3%
    assert pacer.interval == pytest.approx(1.0)
    pacer = clocks.pacer(fps=10, share=0.03, slowest=1.0)
    for cost in [0.001] * 5 + [0.03] + [0.001] * 5:
        clocks.frame(pacer, cost=cost)
    assert pacer.interval == pytest.approx(0.1, rel=0.2)  # back to the full rate after the slow one


def test_a_new_stream_is_drawn_at_once_and_fps_0_draws_every_token():
    clocks = Clocks()
    pacer = clocks.pacer(fps=10, share=0.03)
    clocks.frame(pacer, cost=0.02)
    clocks.frame(pacer, cost=0.02)
    assert pacer.wait() > 0
    pacer.restart()
    assert pacer.wait() == 0
    assert clocks.pacer(fps=0).interval == 0


def test_overlapping_pauses_turn_the_collector_back_on_only_when_the_last_one_ends():
    import gc

    first, second = CollectorPause(), CollectorPause()
    try:
        first.begin()
        first.begin()  # twice is once
        second.begin()
        assert not gc.isenabled()
        first.end()
        first.end()
        assert not gc.isenabled()  # the second stream still runs
        second.end()
        assert gc.isenabled()
        second.end()  # ending one that has ended changes nothing
        assert gc.isenabled()
    finally:
        gc.enable()
