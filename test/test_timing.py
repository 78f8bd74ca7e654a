"""Step-gap bookkeeping: side work goes into the acting loop's idle time."""

import threading

from ami_ros.core.timing import StepGap


class FakeClock:
    """A clock the test moves; `tick` is added at every reading."""

    def __init__(self, tick=0.0):
        self.now = 100.0
        self.tick = tick

    def __call__(self):
        self.now += self.tick
        return self.now


def gap_at_10_hz(clock, steps=3, step_time=0.01):
    gap = StepGap(clock)
    for _ in range(steps):
        gap.step_started()
        clock.now += step_time
        gap.step_ended()
        clock.now += 0.1 - step_time
    return gap


def fits(gap, needed):
    return gap.wait(needed, timeout=0)


def test_no_steps_seen_nothing_to_protect():
    assert fits(StepGap(FakeClock()), 1.0)


def test_work_fits_only_before_the_next_step_is_due():
    clock = FakeClock()
    gap = gap_at_10_hz(clock)
    assert abs(gap.period - 0.1) < 1e-9
    gap.step_started()  # a step just started: busy
    assert not fits(gap, 0.001)
    clock.now += 0.01
    gap.step_ended()
    assert fits(gap, 0.05)  # 10 ms after the start: 90 ms left
    assert not fits(gap, 0.095)
    clock.now += 0.06
    assert not fits(gap, 0.05)  # only 30 ms left before the next frame


def test_steps_that_stop_coming_free_the_gap():
    clock = FakeClock()
    gap = gap_at_10_hz(clock)
    gap.step_started()
    gap.step_ended()
    clock.now += 0.15
    assert not fits(gap, 0.2)
    clock.now += 0.1  # two periods without a step: paused or no camera
    assert fits(gap, 0.2)


def test_wait_is_let_go_by_the_end_of_a_step():
    clock = FakeClock()
    gap = gap_at_10_hz(clock)
    gap.step_started()
    result = []
    waiter = threading.Thread(target=lambda: result.append(gap.wait(0.01, timeout=60.0)))
    waiter.start()
    waiter.join(timeout=0.2)  # the clock stands still: only the step's end can free it
    assert waiter.is_alive() and not result
    clock.now += 0.01
    gap.step_ended()
    waiter.join(timeout=10)
    assert result == [True]


def test_wait_gives_up_after_its_timeout_while_a_step_never_ends():
    clock = FakeClock(tick=0.001)  # every reading moves time on by 1 ms
    gap = gap_at_10_hz(clock)
    gap.step_started()
    start = clock.now
    assert not gap.wait(0.01, timeout=0.1)
    assert clock.now - start >= 0.1
