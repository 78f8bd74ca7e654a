"""Side work goes where the acting agent is not stepping: the agent's own
idle gaps (StepGap) and a trainer's room between frames (FrameRhythm)."""

import threading

import pytest

from ami_ros.core.timing import FrameRhythm, StepGap


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


def rhythm_at_10_hz(clock, quiet=0.02, frames=5):
    """Frames captured at 0.0, 0.1, ... 0.4 s after clock's now; the clock ends at the last."""
    rhythm = FrameRhythm(quiet, guard=0.004, clock=clock)
    for i in range(frames):
        rhythm.frame(clock.now + 0.1 * i)
    clock.now += 0.1 * (frames - 1)
    return rhythm


def test_rhythm_keeps_work_out_of_the_quiet_window_and_the_guard():
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    assert rhythm.period == pytest.approx(0.1)
    clock.now += 0.005  # 5 ms after a capture: that step runs
    assert rhythm.delay(0.001) == pytest.approx(0.015)
    clock.now += 0.025  # 30 ms after it: 66 ms to the next capture's guard
    assert rhythm.delay(0.05) == 0.0
    assert rhythm.delay(0.066) == pytest.approx(0.0, abs=1e-9)
    # 70 ms do not fit: wait for the end of the next frame's quiet window.
    assert rhythm.delay(0.07) == pytest.approx(0.07 + 0.02)
    clock.now += 0.2  # two frames later, none seen: the rhythm still predicts them
    assert rhythm.delay(0.07) == pytest.approx(0.09)


def test_rhythm_work_that_never_fits_goes_right_after_a_quiet_window():
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    clock.now += 0.021  # just after the quiet window: the most room there is
    assert rhythm.delay(0.5) == 0.0
    clock.now += 0.03  # in the middle of a gap: wait for the next one's start
    assert rhythm.delay(0.5) == pytest.approx(0.1 - 0.051 + 0.02)


def test_rhythm_outvotes_a_lost_frame_and_ignores_late_or_repeated_stamps():
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    rhythm.frame(clock.now + 0.2)  # one frame lost on the way
    rhythm.frame(clock.now + 0.1)  # an older one arriving late
    rhythm.frame(clock.now + 0.2)  # the same one twice
    assert rhythm.period == pytest.approx(0.1)


def test_rhythm_protects_nothing_without_frames_when_they_stop_or_when_off():
    clock = FakeClock()
    assert FrameRhythm(0.02, clock=clock).delay(1.0) == 0.0
    one = FrameRhythm(0.02, clock=clock)
    one.frame(clock.now)
    assert one.delay(1.0) == 0.0  # one frame gives no rhythm yet
    rhythm = rhythm_at_10_hz(clock)
    clock.now += 0.005
    assert rhythm.delay(0.001) > 0
    clock.now += 0.3  # three periods without a frame: paused, or no camera
    assert rhythm.delay(0.001) == 0.0
    off = rhythm_at_10_hz(FakeClock(), quiet=0.0)
    assert off.delay(1.0) == 0.0


def test_rhythm_slot_predicts_a_kind_from_its_longest_recent_slice(monkeypatch):
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    clock.now += 0.03
    for _ in range(3):
        with rhythm.slot('batch'):
            pass
    assert rhythm.waited == 0.0  # microsecond slices fit anywhere outside the windows
    rhythm._lengths['batch'].append(0.05)  # as if one had taken 50 ms: 60 ms predicted
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr('ami_ros.core.timing.time.sleep', sleep)
    clock.now += 0.03  # 60 ms from now would reach into the next capture's guard
    with rhythm.slot('batch'):
        pass
    assert slept and rhythm.waited == pytest.approx(sum(slept))
    assert (clock.now - 100.0) % 0.1 == pytest.approx(0.02, abs=0.001)  # right after a window


def test_rhythm_pause_waits_through_the_guard_and_the_quiet_window(monkeypatch):
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    monkeypatch.setattr('ami_ros.core.timing.time.sleep', lambda s: setattr(clock, 'now', clock.now + s))
    clock.now += 0.05
    rhythm.pause()  # mid-gap: goes at once
    assert rhythm.waited == 0.0 and (clock.now - 100.0) % 0.1 == pytest.approx(0.05)
    clock.now += 0.047  # 3 ms before the next capture: inside its 4 ms guard
    rhythm.pause()
    assert rhythm.waited == pytest.approx(0.023, abs=0.001)  # to the end of its quiet window
    assert (clock.now - 100.0) % 0.1 == pytest.approx(0.02, abs=0.001)


def test_rhythm_keeps_at_most_half_of_a_fast_cameras_period():
    clock = FakeClock()
    rhythm = FrameRhythm(0.025, guard=0.015, clock=clock)  # 40 ms of 33: would starve training
    for i in range(5):
        rhythm.frame(clock.now + i / 30)
    clock.now += 4 / 30
    assert rhythm.delay(0.0) == pytest.approx(0.025 * (0.5 / 30) / 0.04)  # quiet shrunk in proportion
    clock.now += 0.011  # past the shrunk 10.4 ms window: 33.3 - 11 - 6.25 ms guard left
    assert rhythm.delay(0.0) == 0.0
    assert rhythm.delay(0.016) == 0.0
    assert rhythm.delay(0.0165) > 0  # would reach into the next guard (and can fit later)


def test_rhythm_pause_learns_each_sites_piece_and_waits_until_it_fits(monkeypatch):
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    monkeypatch.setattr('ami_ros.core.timing.time.sleep', lambda s: setattr(clock, 'now', clock.now + s))
    monkeypatch.setattr('ami_ros.core.timing.time.perf_counter', clock)
    clock.now += 0.021  # just after a quiet window
    for _ in range(3):  # 'big' runs 40 ms each time, 'small' 1 ms
        rhythm.pause('big')
        clock.now += 0.04
        rhythm.pause('small')
        clock.now += 0.001
        rhythm.pause('idle')  # the next frame's step, a long wait: no piece
        clock.now += 0.3
    capture = clock.now - 0.021
    rhythm.frame(capture)  # frames again: the latest captured 21 ms ago
    clock.now += 0.03  # 51 ms after it: 45 ms to the next guard, 48 predicted for 'big'
    assert rhythm.waited == 0.0
    rhythm.pause('small')
    assert rhythm.waited == 0.0  # 1.2 ms fit
    rhythm.pause('big')
    assert rhythm.waited == pytest.approx(0.069, abs=0.001)  # to the end of the next quiet window
    assert (clock.now - capture) % 0.1 == pytest.approx(0.02, abs=0.001)
    assert 'idle' not in rhythm._lengths  # 300 ms: longer than a period, not a piece
