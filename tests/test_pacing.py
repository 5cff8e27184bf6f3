"""The live pre-copy's pacing (pure logic, a simulated clock): it keeps to its share while serving is not slowed,
backs off while the steps are slower than 1/0.7 of before, goes at full speed while nothing is served, and goes
as fast as it must to end by its deadline, saying so when that took more than serving allowed."""

import pytest

from remp.reshard.pacing import Pacer, StepClock


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def served(clock: Clock, steps: StepClock, n: int, step_s: float) -> None:
    for _ in range(n):
        with steps:
            clock.t += step_s


def run_round(pacer: Pacer, clock: Clock, units: int, busy_s: float, steps=None, step_s=0.0) -> float:
    """Bursts of busy_s doing one unit each, each rest as the pacer says, with a step of step_s in it (if
    `steps`); returns how long the round took."""
    t0 = clock.t
    for _ in range(units):
        clock.t += busy_s
        rest = pacer.rest(busy_s, 1)
        if steps is not None:
            with steps:
                clock.t += step_s
            rest = max(0.0, rest - step_s)
        clock.t += rest
    return clock.t - t0


def test_keeps_to_its_share_when_the_deadline_is_far():
    clock = Clock()
    pacer = Pacer(0.25, None, now=clock)
    pacer.new_round(1000.0, 100)
    took = run_round(pacer, clock, 100, 0.01)
    assert took == pytest.approx(100 * 0.01 / 0.25)
    assert not pacer.late and pacer.lowest_duty == pytest.approx(0.25)


def test_goes_as_fast_as_the_deadline_needs_and_says_it_was_late():
    clock = Clock()
    pacer = Pacer(0.1, None, now=clock)
    pacer.new_round(2.0, 100)  # 1 s of work: 10 s at the share, so the deadline decides
    took = run_round(pacer, clock, 100, 0.01)
    assert 1.0 <= took <= 2.05
    assert pacer.late


def test_full_speed_while_nothing_is_served():
    clock = Clock()
    steps = StepClock(now=clock)
    served(clock, steps, 10, 0.05)
    clock.t += 1.0  # no step for a second
    pacer = Pacer(0.2, steps, now=clock)
    pacer.new_round(1000.0, 10)
    assert run_round(pacer, clock, 10, 0.01) == pytest.approx(0.1)


def test_backs_off_while_the_steps_slow_down_and_not_otherwise():
    clock = Clock()
    steps = StepClock(now=clock)
    served(clock, steps, 20, 0.05)
    pacer = Pacer(0.3, steps, now=clock)
    pacer.new_round(1000.0, 60)
    run_round(pacer, clock, 60, 0.01, steps, step_s=0.05)  # steps as fast as before
    assert pacer.duty == pytest.approx(0.3) and pacer.slowdown == pytest.approx(1.0)
    run_round(pacer, clock, 60, 0.01, steps, step_s=0.1)  # twice as slow: more than 1/0.7
    assert pacer.duty < 0.1 and pacer.slowdown == pytest.approx(2.0)
    assert not pacer.late


def test_a_worker_that_never_served_keeps_to_its_share():
    clock = Clock()
    pacer = Pacer(0.5, StepClock(now=clock), now=clock)
    pacer.new_round(1000.0, 10)
    assert run_round(pacer, clock, 10, 0.01) == pytest.approx(0.2)


def test_a_share_of_one_never_rests():
    clock = Clock()
    steps = StepClock(now=clock)
    served(clock, steps, 10, 0.05)
    pacer = Pacer(1.0, steps, now=clock)
    pacer.new_round(1000.0, 10)
    assert run_round(pacer, clock, 10, 0.01, steps, step_s=0.5) == pytest.approx(10 * 0.51)
