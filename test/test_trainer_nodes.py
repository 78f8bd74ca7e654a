"""The trainer nodes as real processes beside the real agent: learning while acting.

The cpu preset, rounds made short (min_new 16, max_batches 4), frames at 10 Hz
from the test like a camera (a still view where a trainer must learn). The
agent's model versions are read from the `experience` it publishes (each step
carries the versions that produced it).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
import rclpy
import torch
from rclpy.parameter import Parameter
from ros_harness import FrameFeeder, NodeStatus, start_node, sync_weights, wait_for, weights_parameter
from sensor_msgs.msg import Joy
from std_msgs.msg import UInt8MultiArray

from ami_ros.core.models import build_model
from ami_ros.core.presets import ACTION_CHOICES, get_preset
from ami_ros.core.schemas import ExperienceStep, decode_experience, encode_weights
from ami_ros.ros.process_priority import parse_cpu_list

PRESET = get_preset('cpu')
FRAME_HZ = 10.0
# Rounds every 16 new samples, 4 minibatches per epoch: seconds, not minutes.
FAST = {'preset': 'cpu', 'min_new': 16, 'max_batches': 4, 'sync_retry': 0.5}
FAST_POLICY = {'preset': 'cpu', 'min_new': 16, 'sync_retry': 0.5}
TRAINERS = {'vae_trainer': FAST, 'dynamics_trainer': FAST, 'policy_trainer': FAST_POLICY}


class Watch:
    """What the test sees of the graph: actions, experience versions, diagnostics."""

    def __init__(self, test_node) -> None:
        self.actions = test_node.collect(Joy, 'action')
        self.versions: list[tuple[float, dict[str, int]]] = []  # (receive time, versions) per step
        self.health = NodeStatus(test_node)  # the newest /diagnostics of every node
        test_node.node.create_subscription(UInt8MultiArray, 'experience', self._on_experience, 200)

    def _on_experience(self, msg: UInt8MultiArray) -> None:
        step = decode_experience(bytes(msg.data), PRESET)
        self.versions.append((time.monotonic(), step.versions))

    def version(self, model: str) -> int:
        return self.versions[-1][1][model] if self.versions else 0

    def value(self, node: str, key: str, default: float = 0.0) -> float:
        return float(self.health.get(node, key, str(default)))

    def actions_since(self, t: float) -> int:
        return sum(1 for at, _ in self.actions if at >= t)


@pytest.fixture
def graph(launch, test_node):
    watch = Watch(test_node)
    frames = FrameFeeder(test_node, hz=FRAME_HZ)
    yield watch
    frames.close()


def _assert_acting(watch: Watch, seconds: float) -> None:
    """Over the next `seconds`, the agent answers about every frame, with no long gap."""
    start = time.monotonic()
    time.sleep(seconds)
    stamps = [at for at, _ in watch.actions if at >= start]
    assert len(stamps) >= 0.7 * seconds * FRAME_HZ, f'{len(stamps)} actions in {seconds} s'
    assert max(np.diff(stamps)) < 0.6, 'a gap in acting'


def test_trainers_push_weights_while_the_agent_acts(launch, graph):
    watch = graph
    launch('agent', parameters={'preset': 'cpu'})
    procs = {name: launch(name, parameters=params) for name, params in TRAINERS.items()}
    wait_for(lambda: len(watch.actions) >= 5, 30, message='the agent acting')
    start, count = time.monotonic(), len(watch.actions)
    for model in ('encoder', 'dynamics', 'policy'):
        wait_for(lambda model=model: watch.version(model) > 0, 60,
                 message=f'a trained {model} in the agent')
    # The decoder travels with the encoder, in the same request.
    assert watch.version('decoder') == watch.version('encoder')
    elapsed = time.monotonic() - start
    # Acting went on while three trainers trained.
    assert len(watch.actions) - count >= 0.7 * elapsed * FRAME_HZ
    _assert_acting(watch, 2.0)
    wait_for(lambda: all(watch.value(n, 'pushes_ok') >= 1 for n in TRAINERS), 5,
             message='diagnostics of every trainer')
    for name, proc in procs.items():
        assert proc.alive(), proc.output()
        assert watch.value(name, 'rounds') >= 1
        assert watch.value(name, 'pushed_version') >= 1
        assert watch.value(name, 'pushes_failed') == 0, watch.health.status[name]
        assert np.isfinite(watch.value(name, 'loss', float('nan')))
        # Each trainer follows the frames' rhythm (from the frames or the
        # experience stamps) and kept its training out of the agent's steps.
        assert watch.value(name, 'frame_period_ms') == pytest.approx(1000 / FRAME_HZ, rel=0.2)
        # A round may fit between frames without waiting; the next ones will not
        # all do so (the diagnostics also lag a round), so give it a few seconds.
        wait_for(lambda name=name: watch.value(name, 'quiet_waited_s') > 0, 10,
                 message=lambda name=name: f'{name} waiting for room between the agent\'s steps: '
                                           f'{watch.health.status[name]}')
        print(f'{name}: round {watch.value(name, "seconds"):.2f} s, '
              f'{watch.value(name, "batches"):.0f} batches')
    # Pushing keeps up with training: each round's weights reach the agent
    # (pushes must not starve in step with the frames' rhythm).
    wait_for(lambda: all(watch.value(n, 'pushed_version') >= watch.value(n, 'version') - 1 >= 1
                         for n in TRAINERS), 20, message='every trainer\'s newest weights pushed')
    assert 'kl' in watch.health.status['vae_trainer']
    assert 'policy_loss' in watch.health.status['policy_trainer']
    # The agent tells its own step apart from the frame's way to it.
    step, whole = watch.value('agent', 'step_p99_ms'), watch.value('agent', 'latency_p99_ms')
    assert 0 < step <= whole, watch.health.status['agent']


def test_a_killed_trainer_leaves_the_agent_acting_and_a_restart_resumes(launch, graph, tmp_path):
    watch = graph
    launch('agent', parameters={'preset': 'cpu'})
    trainer = launch('dynamics_trainer', parameters=FAST)
    wait_for(lambda: watch.version('dynamics') >= 2, 60, message='dynamics version 2 in the agent')
    before = watch.version('dynamics')
    trainer.send(signal.SIGKILL)
    assert trainer.wait(5) == -signal.SIGKILL
    killed = time.monotonic()
    _assert_acting(watch, 3.0)
    # Nothing pushes any more (a push already on its way may land at first).
    assert len({v['dynamics'] for at, v in watch.versions if at > killed + 0.5}) == 1
    # Same seed, no checkpoint: the new trainer counts from 0 again, so the
    # agent taking its weights shows as a version below the old one.
    restarted = time.monotonic()
    again = start_node('dynamics_trainer', tmp_path / 'restart', parameters=FAST)
    try:
        wait_for(lambda: any(at > restarted and v['dynamics'] < before for at, v in watch.versions),
                 60, message='the restarted trainer\'s weights in the agent')
        assert again.alive()
    finally:
        again.stop()


def test_a_trainer_started_before_the_agent_pushes_once_it_appears(launch, graph):
    watch = graph
    # Inline bytes here (the transport for a trainer on another machine); the
    # other tests use the default file transport.
    vae = launch('vae_trainer', parameters={**FAST, 'sync_transport': 'bytes'})
    # The VAE learns from the camera alone: rounds happen, pushes fail and retry.
    wait_for(lambda: watch.value('vae_trainer', 'rounds') >= 1
             and watch.value('vae_trainer', 'pushes_failed') >= 2, 60,
             message='a VAE round and failing pushes')
    assert 'not available' in watch.health.status['vae_trainer']['last_sync']
    launch('agent', parameters={'preset': 'cpu'})
    wait_for(lambda: watch.version('encoder') >= 1, 60, message='the VAE weights in the agent')
    assert watch.version('decoder') == watch.version('encoder')
    # The trainer counts the push the agent took (a later push may still be
    # in flight, so last_sync is not asserted here).
    wait_for(lambda: watch.value('vae_trainer', 'pushes_ok') >= 1
             and watch.value('vae_trainer', 'pushed_version') >= 1, 15,
             message=lambda: f'an accepted push in the diagnostics: {watch.health.status.get("vae_trainer")}')
    assert vae.alive()


def _experience(test_node) -> list[ExperienceStep]:
    """Every step the agent publishes from now on, decoded."""
    steps: list[ExperienceStep] = []
    test_node.node.create_subscription(
        UInt8MultiArray, 'experience', lambda msg: steps.append(decode_experience(bytes(msg.data), PRESET)),
        200)
    return steps


class RoundLog:
    """A trainer's `key` for each of its rounds, as its diagnostics report them
    (published every second: a round that was followed at once by the next may be missing)."""

    def __init__(self, test_node, node: str, key: str) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self.node, self.key = node, key
        self.values: dict[int, float] = {}
        test_node.node.create_subscription(DiagnosticArray, '/diagnostics', self._on, 50)

    def _on(self, msg) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if status.name.lstrip('/') == self.node and self.key in values and float(values['rounds']) > 0:
                self.values.setdefault(int(float(values['rounds'])), float(values[self.key]))

    def means(self, rounds: int) -> tuple[float, float]:
        """The mean of the first and of the last `rounds` rounds seen."""
        ordered = [self.values[r] for r in sorted(self.values)]
        return float(np.mean(ordered[:rounds])), float(np.mean(ordered[-rounds:]))


def _mean_reward(steps: list[ExperienceStep], versions: Callable[[int], bool], model: str) -> float:
    """The agent's mean reward (its prediction error) over steps made by the `model` versions chosen."""
    rewards = [s.reward for s in steps if versions(s.versions[model]) and s.reward is not None]
    assert len(rewards) >= 10, f'{len(rewards)} rewarded steps of the {model} versions asked for'
    return float(np.mean(rewards))


def test_the_dynamics_trainer_learns_to_predict_what_the_agent_sees(launch, test_node):
    # A still view is learnable: the trainer's loss falls over its rounds, and
    # with each new dynamics the agent's prediction error, its curiosity
    # reward, falls too.
    steps = _experience(test_node)
    losses = RoundLog(test_node, 'dynamics_trainer', 'loss')
    frames = FrameFeeder(test_node, hz=FRAME_HZ, still=True)
    try:
        launch('agent', parameters={'preset': 'cpu'})
        trainer = launch('dynamics_trainer', parameters=FAST)
        wait_for(lambda: steps and steps[-1].versions['dynamics'] >= 8 or not trainer.alive(), 90,
                 message='eight rounds of the dynamics in the agent')
        wait_for(lambda: len(losses.values) >= 6, 10, message=lambda: f'round losses: {losses.values}')
        assert trainer.alive(), trainer.output()
    finally:
        frames.close()
    # In trials the loss fell about 30-fold from the first two rounds to the 7th and 8th.
    first, last = losses.means(2)
    assert last < 0.3 * first, losses.values
    untrained = _mean_reward(steps, lambda v: v == 0, 'dynamics')
    trained = _mean_reward(steps, lambda v: v >= 6, 'dynamics')
    print(f'dynamics loss {first:.4f} -> {last:.4f}, agent reward {untrained:.4f} -> {trained:.4f}')
    assert trained < 0.3 * untrained, (untrained, trained)


# The choice of an action part that the paying dynamics pays for, and its version.
PAID_HEAD, PAID_CHOICE, PAYING_VERSION = 0, 1, 100


def _paying_dynamics() -> dict[str, torch.Tensor]:
    """A dynamics whose prediction misses the next view by far after PAID_CHOICE
    of PAID_HEAD (prediction 1 in every dimension), and predicts 0 after the
    other choices: a curiosity reward that pays that choice alone, a bandit."""
    dynamics = build_model('dynamics', PRESET)
    size, latent = PRESET.dynamics.action_embedding, PRESET.encoder.latent
    with torch.no_grad():
        for param in dynamics.parameters():
            param.zero_()  # every block passes its input on unchanged
        dynamics.action_embeddings[PAID_HEAD].weight[PAID_CHOICE] = 1.0
        column = latent + PAID_HEAD * size
        dynamics.input.weight[:size, column:column + size] = torch.eye(size)
        dynamics.output.weight[:, :size] = 1.0 / size
    return dynamics.state_dict()


@pytest.mark.parametrize('persistence', [0.0, 0.8])
def test_a_policy_on_the_latent_learns_from_the_agents_latents(launch, test_node, persistence):
    # The cpu preset's policy acts on the encoder's latent: the policy trainer
    # trains on the latents the agent publishes in `experience` (an image would
    # not fit its MLP and fail the round), and the agent takes the new weights
    # while it acts on them. A dynamics that pays one choice (a bandit on a
    # still view) makes the reward learnable: the policy comes to take that
    # choice and to collect more reward. With persistence the experience
    # carries the action held and its chance, which the trainer's ratio needs.
    steps = _experience(test_node)
    frames = FrameFeeder(test_node, hz=FRAME_HZ, still=True)
    try:
        launch('agent', parameters={'preset': 'cpu', 'persistence': persistence})
        wait_for(lambda: len(steps) >= 3, 30, message='the agent acting')
        blob = encode_weights('dynamics', _paying_dynamics(), PAYING_VERSION, 'cpu')
        assert [r.successful for r in sync_weights(test_node, weights_parameter('dynamics', blob))] == [True]
        # A faster rate than the preset's: in trials it learnt the bandit in 16
        # rounds (the choice's share from a third to 0.7-1.0) for every seed
        # tried alone, but only to 0.47 in a full suite run on 2 busy cores: 26
        # rounds leave room for that.
        trainer = launch('policy_trainer', parameters={**FAST_POLICY, 'learning_rate': 3e-3})
        wait_for(lambda: steps[-1].versions['policy'] >= 26 or not trainer.alive(), 200,
                 message='26 rounds of the latent policy in the agent')
        assert trainer.alive(), trainer.output()
    finally:
        frames.close()
    following = [(a, b) for a, b in pairwise(steps) if b.step == a.step + 1 and b.continues]
    assert len(following) > 20
    assert all(b.persistence == pytest.approx(persistence) for _, b in following)
    if persistence:
        assert all(torch.equal(b.previous_action, a.action) for a, b in following)

    # Each action with the reward the next step brings for it, by the policy version that chose it.
    def paid(versions: Callable[[int], bool]) -> tuple[int, int, float]:
        """How often PAID_CHOICE was taken, of how many steps, and the mean reward for it."""
        chosen = [(a, b) for a, b in following if a.versions['dynamics'] == PAYING_VERSION
                  and versions(a.versions['policy']) and b.reward is not None]
        assert len(chosen) >= 16, f'{len(chosen)} paid steps of the policy versions asked for'
        return (sum(int(a.action[PAID_HEAD]) == PAID_CHOICE for a, _ in chosen), len(chosen),
                float(np.mean([b.reward for _, b in chosen])))

    untrained_taken, untrained_steps, untrained_reward = paid(lambda v: v == 0)
    taken, trained_steps, trained_reward = paid(lambda v: v >= 22)
    print(f'paid choice {untrained_taken}/{untrained_steps} -> {taken}/{trained_steps}, '
          f'reward {untrained_reward:.3f} -> {trained_reward:.3f}')
    # Chance is a third. How far above it a busy 2-core machine gets in 26 rounds
    # varies (shares of 0.47 to 1.0 seen), so the test asks that chance could not
    # explain the trained policy's choices, rather than for a fixed share.
    assert _binomial_tail(taken, trained_steps, 1 / 3) < 1e-3, (untrained_taken, untrained_steps,
                                                                taken, trained_steps)
    assert trained_reward > 1.25 * untrained_reward, (untrained_reward, trained_reward)


def _binomial_tail(k: int, n: int, p: float) -> float:
    """The chance of k or more successes in n tries of chance p."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


# -- the policy trainer's staleness and break handling, in this process -------

def _step(policy_version: int, reward: float | None = 0.5) -> ExperienceStep:
    heads = len(ACTION_CHOICES)
    return ExperienceStep(
        observation=torch.zeros(3, 84, 84, dtype=torch.uint8),
        latent=torch.zeros(PRESET.encoder.latent),
        hidden=torch.zeros(PRESET.dynamics.depth, PRESET.dynamics.dim, dtype=torch.complex64),
        action=torch.zeros(heads, dtype=torch.int64), log_prob=torch.zeros(heads), value=0.0,
        reward=reward, stamp_ns=0, step=0, continues=True,
        versions={'encoder': 0, 'decoder': 0, 'dynamics': 0, 'policy': policy_version})


@pytest.fixture
def policy_node():
    from ami_ros.nodes.policy_trainer import PolicyTrainerNode

    context = rclpy.Context()
    rclpy.init(context=context)
    node = PolicyTrainerNode(context=context, parameter_overrides=[
        Parameter('preset', value='cpu'), Parameter('nice', value=0), Parameter('min_new', value=8),
        Parameter('learning_rate', value=2e-3), Parameter('entropy_coef', value=0.02),
        Parameter('max_policy_lag', value=2)])
    yield node  # never activated: its training thread stays idle
    node.on_exit()
    node.destroy_node()
    rclpy.try_shutdown(context=context)


def test_policy_trainer_drops_stale_steps_and_reports_them(policy_node):
    node = policy_node
    buffer = node.trainer.buffer
    assert buffer.steps == 8  # min_new overrides the PPO steps per update
    # and learning_rate the preset's rate (3e-4), in the optimiser itself
    assert node.preset.ppo_training.lr == 2e-3
    assert [g['lr'] for g in node.trainer.optimizer.param_groups] == [2e-3]
    assert node.diagnostics.values['learning_rate'] == '0.002'
    assert node.trainer.cfg.entropy_coef == 0.02  # and entropy_coef the preset's 0.001
    for version in (1, 1, 2, 3, 3, 4, 3):
        node.add_step(_step(version), follows=True)
    node.trainer.version = 5  # five rounds pushed since: policies < 3 are too old
    node.before_round()
    # Only a prefix goes, so what stays is one stretch of time.
    assert len(buffer) == 4 and node.dropped_stale == 3
    status = node.node_status()
    assert status['dropped_stale'] == 3 and status['dropped'] == 3
    # A break in time (or a step without the previous reward) empties the trajectory.
    node.add_step(_step(5), follows=False)
    assert len(buffer) == 1
    node.add_step(_step(5), follows=True)
    node.add_step(_step(5, reward=None), follows=True)
    assert len(buffer) == 1
    assert node.node_status()['dropped_stale'] == 3  # breaks are not staleness


def test_a_trainer_yields_the_cpu_on_the_cores_it_is_given(launch):
    """nice 19 + cpus: every thread of the process (DDS's, torch's, the training
    thread) runs SCHED_IDLE on the given CPU only."""
    cpu = max(os.sched_getaffinity(0))
    trainer = launch('vae_trainer', parameters={**FAST, 'nice': 19, 'cpus': str(cpu)})
    wait_for(lambda: 'vae_trainer ready' in trainer.output() or not trainer.alive(), 60,
             message='the trainer')
    assert trainer.alive(), trainer.output()
    assert f'cpus {cpu};' in trainer.output()
    pid = trainer.proc.pid
    threads = [int(t) for t in os.listdir(f'/proc/{pid}/task')]
    assert len(threads) > 2  # rclpy/DDS threads and the training thread, not only the main one
    for tid in threads:
        assert os.sched_getaffinity(tid) == {cpu}, tid
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE, tid
        assert os.getpriority(os.PRIO_PROCESS, tid) == 19, tid


@pytest.mark.parametrize('spec, says', [('x', "'x' is not a CPU id"),
                                        ('4096', 'are not all usable here')])
def test_a_trainer_refuses_cpus_it_cannot_use_in_one_line(launch, spec, says):
    trainer = launch('vae_trainer', parameters={**FAST, 'cpus': spec})
    assert trainer.wait(60) != 0
    lines = [line for line in trainer.output().splitlines() if says in line]
    assert lines, trainer.output()
    assert 'Traceback' not in trainer.output()


def test_cpu_lists_read_like_taskset():
    assert parse_cpu_list('') == set()
    assert parse_cpu_list('1') == {1}
    assert parse_cpu_list('0,2-3') == {0, 2, 3}
    assert parse_cpu_list(' 1 , 1-2 ') == {1, 2}
    with pytest.raises(ValueError, match="'3-1' is not a range"):
        parse_cpu_list('3-1')
    with pytest.raises(ValueError, match="'a-b' is not a CPU id"):
        parse_cpu_list('a-b')
