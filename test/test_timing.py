"""Step-gap bookkeeping: side work goes into the acting loop's idle time."""

import threading
import time

from ami_ros.core.timing import StepGap


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def gap_at_10_hz(clock, steps=3, step_time=0.01):
    gap = StepGap(clock)
    for _ in range(steps):
        gap.step_started()
        clock.now += step_time
        gap.step_ended()
        clock.now += 0.1 - step_time
    return gap


def test_no_steps_seen_nothing_to_protect():
    assert StepGap(FakeClock()).fits(1.0)


def test_work_fits_only_before_the_next_step_is_due():
    clock = FakeClock()
    gap = gap_at_10_hz(clock)
    assert abs(gap.period - 0.1) < 1e-9
    # A step just started at clock.now; it is busy.
    gap.step_started()
    assert not gap.fits(0.001)
    clock.now += 0.01
    gap.step_ended()
    assert gap.fits(0.05)  # 10 ms after the start: 90 ms left
    assert not gap.fits(0.095)
    clock.now += 0.06
    assert not gap.fits(0.05)  # only 30 ms left before the next frame


def test_steps_that_stop_coming_free_the_gap():
    clock = FakeClock()
    gap = gap_at_10_hz(clock)
    gap.step_started()
    gap.step_ended()
    clock.now += 0.15
    assert not gap.fits(0.2)
    clock.now += 0.1  # two periods without a step: paused or no camera
    assert gap.fits(0.2)


def test_wait_returns_at_the_end_of_a_step_and_gives_up_after_its_timeout():
    gap = StepGap()  # the real clock: a thread ends a step while we wait
    for _ in range(3):
        gap.step_started()
        time.sleep(0.02)
        gap.step_ended()
        time.sleep(0.03)
    gap.step_started()
    ender = threading.Timer(0.1, gap.step_ended)
    ender.start()
    t0 = time.monotonic()
    assert gap.wait(0.01, timeout=5.0)
    waited = time.monotonic() - t0
    assert 0.05 < waited < 2.0, waited  # let go by the step's end, not at once, not at the timeout
    ender.join()
    gap.step_started()  # busy and never ending: the timeout decides
    t0 = time.monotonic()
    assert not gap.wait(0.01, timeout=0.1)
    assert time.monotonic() - t0 >= 0.1
