"""Side work goes where the acting agent is not stepping: the agent's own
idle gaps (StepGap), a trainer's room between frames (FrameRhythm) and the
pause points pacing puts into a trainer's rounds (TrainerPacing)."""

import copy
import threading

import pytest
import torch

from ami_ros.core.models import build_models
from ami_ros.core.presets import get_preset, with_overrides
from ami_ros.core.trainers import DynamicsTrainer, PPOTrainer, VAETrainer
from ami_ros.ros.pacing import FrameRhythm, SlicedOptimizer, StepGap, TrainerPacing, pacing_on


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

    monkeypatch.setattr('ami_ros.ros.pacing.time.sleep', sleep)
    clock.now += 0.03  # 60 ms from now would reach into the next capture's guard
    with rhythm.slot('batch'):
        pass
    assert slept and rhythm.waited == pytest.approx(sum(slept))
    assert (clock.now - 100.0) % 0.1 == pytest.approx(0.02, abs=0.001)  # right after a window


def test_rhythm_pause_waits_through_the_guard_and_the_quiet_window(monkeypatch):
    clock = FakeClock()
    rhythm = rhythm_at_10_hz(clock)
    monkeypatch.setattr('ami_ros.ros.pacing.time.sleep', lambda s: setattr(clock, 'now', clock.now + s))
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
    monkeypatch.setattr('ami_ros.ros.pacing.time.sleep', lambda s: setattr(clock, 'now', clock.now + s))
    monkeypatch.setattr('ami_ros.ros.pacing.time.perf_counter', clock)
    clock.now += 0.021  # just after a quiet window
    for _ in range(3):  # 'big' runs 40 ms each time, 'cpu' 1 ms
        rhythm.pause('big')
        clock.now += 0.04
        rhythm.pause('cpu')
        clock.now += 0.001
        rhythm.pause('idle')  # the next frame's step, a long wait: no piece
        clock.now += 0.3
    capture = clock.now - 0.021
    rhythm.frame(capture)  # frames again: the latest captured 21 ms ago
    clock.now += 0.03  # 51 ms after it: 45 ms to the next guard, 48 predicted for 'big'
    assert rhythm.waited == 0.0
    rhythm.pause('cpu')
    assert rhythm.waited == 0.0  # 1.2 ms fit
    rhythm.pause('big')
    assert rhythm.waited == pytest.approx(0.069, abs=0.001)  # to the end of the next quiet window
    assert (clock.now - capture) % 0.1 == pytest.approx(0.02, abs=0.001)
    assert 'idle' not in rhythm._lengths  # 300 ms: longer than a period, not a piece


# -- a trainer's pause points -------------------------------------------------

def _trainer(kind: str, seed: int = 0):
    preset = with_overrides(get_preset('cpu'), vae_training=dict(buffer_size=24),
                            dynamics_training=dict(buffer_size=40), ppo_training=dict(steps=16))
    models = build_models(preset, seed=seed)
    if kind == 'vae':
        trainer = VAETrainer(models['encoder'], models['decoder'], preset.vae_training, seed=seed)
    elif kind == 'dynamics':
        trainer = DynamicsTrainer(models['dynamics'], preset.dynamics_training, seed=seed)
    else:
        trainer = PPOTrainer(models['policy'], preset.ppo_training, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dyn = preset.dynamics
    for _ in range(17 if kind == 'ppo' else 24):
        if kind == 'vae':
            trainer.add(torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8, generator=gen))
        elif kind == 'dynamics':
            trainer.add(torch.randn(preset.encoder.latent, generator=gen),
                        torch.randn(dyn.depth, dyn.dim, generator=gen).to(torch.complex64),
                        torch.randint(0, 2, (5,), generator=gen))
        else:
            trainer.add(torch.randn(preset.encoder.latent, generator=gen),
                        torch.randint(0, 2, (5,), generator=gen), -torch.rand(5, generator=gen),
                        float(torch.randn((), generator=gen)), float(torch.rand((), generator=gen)), 0)
    return trainer


def _count_steps(trainer, events):
    """Mark each minibatch's end (its optimiser step) in `events`."""
    real_step = trainer._step

    def step(loss, max_grad_norm):
        events.append('backward')
        result = real_step(loss, max_grad_norm)
        events.append('optimiser step done')
        return result

    trainer._step = step


@pytest.mark.parametrize('choice, device, on', [
    ('auto', 'cpu', True), ('auto', 'cuda', False), ('auto', 'cuda:1', False),
    ('on', 'cuda', True), ('off', 'cpu', False)])
def test_pacing_is_on_by_default_only_for_a_trainer_on_the_cpu(choice, device, on):
    assert pacing_on(choice, device) is on


@pytest.mark.parametrize('kind', ['vae', 'dynamics', 'ppo'])
def test_paced_training_pauses_before_every_layer_gradient_and_optimiser_slice(kind):
    """A whole minibatch of a big model can take longer than the time between
    two frames; its pieces do not, so the pause must come inside the forward
    and backward passes and the optimiser step, not only between rounds."""
    trainer = _trainer(kind)
    events, sites = [], []
    _count_steps(trainer, events)
    pacing = TrainerPacing(FrameRhythm(0.025))  # no frames seen: nothing waits
    pacing.rhythm.pause = lambda site: (events.append('pause'), sites.append(site))
    pacing.attach(trainer, lambda site: None)
    assert isinstance(trainer.optimizer, SlicedOptimizer)
    metrics = trainer.train_round()
    batches = int(metrics['batches'])
    assert batches >= 2
    per_batch = ' '.join(events).split('optimiser step done')[:-1]
    assert len(per_batch) == batches
    for work in per_batch:
        forward, backward = work.split('backward')
        assert forward.count('pause') >= 5  # the model's start and its layers' forwards
        assert backward.count('pause') >= 5  # gradients of the layers' parameters, the slices
    kinds = {site.split()[0] for site in sites}
    assert kinds == {'forward', 'gradient', 'step'}


@pytest.mark.parametrize('kind', ['vae', 'dynamics', 'ppo'])
def test_unpaced_training_still_stops_at_each_minibatch_and_waits_for_nothing(kind):
    trainer = _trainer(kind)
    optimizer = trainer.optimizer
    events = []
    _count_steps(trainer, events)
    pacing = TrainerPacing(None)
    pacing.attach(trainer, lambda site: events.append('stop?'))
    assert trainer.optimizer is optimizer  # the optimiser is left as it was
    metrics = trainer.train_round()
    per_batch = ' '.join(events).split('optimiser step done')[:-1]
    assert len(per_batch) == int(metrics['batches'])
    assert all(work.count('stop?') >= 1 for work in per_batch)
    assert pacing.status() == {'pacing': 'off', 'frame_period_ms': '0.0', 'quiet_waited_s': '0.000'}
    with pacing.slot('weights'):
        pass

    class Stop(Exception):
        pass

    def stop(site):
        raise Stop(site)

    stopping = _trainer(kind)
    TrainerPacing(None).attach(stopping, stop)
    with pytest.raises(Stop):
        stopping.train_round()
    assert (stopping.rounds, stopping.version) == (0, 0)  # the round was given up


@pytest.mark.parametrize('make', [lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
                                  lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)],
                         ids=['adam', 'adamw'])
def test_sliced_optimizer_is_the_single_optimizer_stepped_in_pieces(make):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 4))
    twin = copy.deepcopy(net)
    single = make(list(twin.parameters()))
    pauses = []
    sliced = SlicedOptimizer(make(list(net.parameters())), pauses.append, slice_elements=1000)
    assert len(sliced.optimizers) >= 3  # the test means something only with several slices
    assert sliced.param_groups[0]['lr'] == 1e-2 and sliced.param_groups[0]['params'] == list(net.parameters())
    for step in range(5):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        for model in (net, twin):
            model(x).pow(2).mean().backward()
        sliced.step()
        single.step()
        sliced.zero_grad()
        single.zero_grad()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert len(pauses) == 5 * len(sliced.optimizers)

    # Its state is the single optimiser's, both ways (checkpoints do not change).
    state, reference = sliced.state_dict(), single.state_dict()
    assert state['param_groups'] == reference['param_groups']
    assert state['state'].keys() == reference['state'].keys()
    for pid, entry in reference['state'].items():
        for key, value in entry.items():
            torch.testing.assert_close(state['state'][pid][key], value, rtol=1e-6, atol=1e-7)
    restored = SlicedOptimizer(make(list(copy.deepcopy(net).parameters())), pauses.append,
                               slice_elements=1000)
    restored.load_state_dict(reference)
    again = restored.state_dict()
    for pid, entry in reference['state'].items():
        for key, value in entry.items():
            torch.testing.assert_close(again['state'][pid][key], value, rtol=0, atol=0)
    # Wrapping a stepped optimiser keeps its state.
    wrapped = SlicedOptimizer(single, pauses.append, slice_elements=1000)
    assert wrapped.state_dict()['state'].keys() == reference['state'].keys()


def test_a_paced_trainer_saves_and_restores_the_unpaced_ones_state():
    """Checkpoints do not depend on pacing: a paced trainer's state loads into an unpaced one."""
    paced = _trainer('dynamics')
    TrainerPacing(FrameRhythm(0.025)).attach(paced, lambda site: None)
    paced.train_round()
    tensors, info = paced.state_dict()
    plain = _trainer('dynamics', seed=3)
    plain.load_state_dict(tensors, info)
    assert plain.state_dict()[0].keys() == tensors.keys()
    assert all(torch.equal(plain.state_dict()[0][k], v) for k, v in tensors.items())
    back = _trainer('dynamics', seed=4)
    TrainerPacing(FrameRhythm(0.025)).attach(back, lambda site: None)
    back.load_state_dict(*plain.state_dict())
    assert all(torch.equal(back.state_dict()[0][k], v) for k, v in tensors.items())
