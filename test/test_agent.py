"""The acting agent's core (no ROS): the action leaves before the rest of the step."""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from frame_policy_preset import ON_FRAME

from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint import begin_checkpoint, commit_checkpoint
from ami_ros.core.observation import to_observation
from ami_ros.core.policy import with_persistence
from ami_ros.core.presets import ACTION_CHOICES
from ami_ros.core.rewards.curiosity import prediction_nll


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (84, 84, 3), dtype=np.uint8) for _ in range(n)]


def restored_copy(agent: CuriosityAgent, tmp_path) -> CuriosityAgent:
    """A new agent of the same preset (another seed) restored from `agent`'s checkpoint."""
    stage = begin_checkpoint(tmp_path)
    agent.save_checkpoint(stage)
    path = commit_checkpoint(stage, {'preset': agent.preset.name})
    restored = CuriosityAgent(agent.preset, seed=9)
    restored.load_checkpoint(path)
    return restored


def assert_acting_and_rewarded_alike(a: CuriosityAgent, b: CuriosityAgent) -> None:
    for frame in frames(3, seed=7):
        x, y = a.step(frame), b.step(frame)
        assert x.reward == y.reward and torch.equal(x.action, y.action)


def test_a_restored_agent_holds_its_last_prediction_and_acts_and_is_rewarded_alike(tmp_path):
    agent = CuriosityAgent('cpu', seed=4)
    for frame in frames(4, seed=2):
        predicted = agent.prediction
        step = agent.step(frame)
        if predicted is None:
            assert np.isnan(step.reward)
        else:  # curiosity: the error of the prediction made at the step before
            error = float(prediction_nll(predicted, step.latent[None])[0])
            assert step.reward == pytest.approx(error, rel=1e-5) and step.reward > 0
            assert step.prediction_error == pytest.approx(error / math.pi, rel=1e-5)
    restored = restored_copy(agent, tmp_path)
    assert torch.equal(restored.prediction, agent.prediction)
    assert torch.equal(restored.hidden, agent.hidden) and restored.steps == agent.steps == 4
    assert_acting_and_rewarded_alike(agent, restored)
    # After a pause the prediction no longer refers to the next frame: no reward for it.
    agent.forget_prediction()
    assert agent.prediction is None and np.isnan(agent.step(frames(1)[0]).reward)


def test_action_is_handed_out_before_the_encoder_and_dynamics_run():
    agent = CuriosityAgent(ON_FRAME, seed=3)
    calls = []

    def on_action(action):
        # At this point the step's dynamics have not run: the prediction and
        # the hidden state are still the previous step's.
        calls.append((action.clone(), agent.steps, agent.hidden.clone(),
                      None if agent.prediction is None else agent.prediction.clone()))

    encoder = agent.models['encoder']
    encoder_calls = []  # how many actions had been handed out when the encoder ran
    real_encode = encoder.encode_mean

    def encode_mean(obs):
        encoder_calls.append(len(calls))
        return real_encode(obs)

    encoder.encode_mean = encode_mean  # the real method, counted
    for i, frame in enumerate(frames(4)):
        hidden_before, prediction_before = agent.hidden.clone(), agent.prediction
        step = agent.step(frame, on_action=on_action)
        action, steps_then, hidden_then, prediction_then = calls[-1]
        assert len(calls) == i + 1
        assert torch.equal(action, step.action) and action.dtype == torch.int64
        assert steps_then == i and agent.steps == i + 1
        assert torch.equal(hidden_then, hidden_before)
        assert not torch.equal(agent.hidden, hidden_before)  # the dynamics ran after
        if prediction_before is None:
            assert prediction_then is None
        else:
            assert torch.equal(prediction_then, prediction_before)
    # The encoder ran once per step, each time after that step's callback.
    assert encoder_calls == [1, 2, 3, 4]


def test_a_policy_on_the_latent_acts_on_the_encoders_z_of_this_frame():
    agent = CuriosityAgent('cpu', seed=3)
    policy, encoder = agent.models['policy'], agent.models['encoder']
    seen, order = [], []
    real_policy, real_encode = policy.forward, encoder.encode_mean

    def forward(x):
        order.append('policy')
        seen.append(x.clone())
        return real_policy(x)

    def encode_mean(obs):
        order.append('encoder')
        return real_encode(obs)

    policy.forward, encoder.encode_mean = forward, encode_mean  # the real methods, watched
    for frame in frames(3, seed=4):
        step = agent.step(frame, on_action=lambda action: order.append('action'))
        # The policy's input is the step's latent: z of this very frame.
        assert torch.equal(seen[-1][0], step.latent)
    # The encoder runs once per step, before the policy and the action.
    assert order == ['encoder', 'policy', 'action'] * 3


def test_handing_out_the_action_early_changes_nothing_the_step_produces():
    a, b = CuriosityAgent(ON_FRAME, seed=5), CuriosityAgent(ON_FRAME, seed=5)
    for frame in frames(5, seed=1):
        x = a.step(frame)
        y = b.step(frame, on_action=lambda action: None)
        assert torch.equal(x.action, y.action) and torch.equal(x.log_prob, y.log_prob)
        assert torch.equal(x.latent, y.latent) and torch.equal(x.hidden, y.hidden)
        assert (np.isnan(x.reward) and np.isnan(y.reward)) or x.reward == y.reward
    assert torch.equal(a.hidden, b.hidden)


def test_an_agent_with_persistence_holds_its_actions_and_reports_the_mixture_it_drew_from(tmp_path):
    agent = CuriosityAgent(ON_FRAME, seed=3, persistence=0.8)
    seen = frames(200, seed=5)
    steps = [agent.step(frame) for frame in seen]
    assert steps[0].persistence == 0.0 and not steps[0].previous_action.any()  # nothing held yet
    for before, now in pairwise(steps):
        assert now.persistence == 0.8 and torch.equal(now.previous_action, before.action)
    # The fresh policy is near uniform: a head repeats with 0.8 + 0.2 / n
    # (without persistence: 1 / n).
    repeats = torch.stack([(b.action == a.action).float() for a, b in pairwise(steps)]).mean(0)
    expected = torch.tensor([0.8 + 0.2 / n for n in ACTION_CHOICES])
    torch.testing.assert_close(repeats, expected, atol=0.08, rtol=0)
    # The log-probabilities are the mixture's, what PPO's ratio compares with.
    with torch.inference_mode():
        dist, _ = agent.models['policy'](to_observation(seen[-1]).unsqueeze(0))
        mixed = with_persistence(dist, steps[-1].previous_action.unsqueeze(0), 0.8)
        torch.testing.assert_close(mixed.log_prob(steps[-1].action.unsqueeze(0))[0], steps[-1].log_prob)

    # The held action is agent state: a restored agent holds and acts alike.
    stage = begin_checkpoint(tmp_path)
    agent.save_checkpoint(stage)
    restored = CuriosityAgent(ON_FRAME, seed=9, persistence=0.8)
    restored.load_checkpoint(commit_checkpoint(stage, {'preset': ON_FRAME.name}))
    assert torch.equal(restored.previous_action, agent.previous_action)
    for frame in frames(5, seed=6):
        x, y = agent.step(frame), restored.step(frame)
        assert torch.equal(x.action, y.action) and torch.equal(x.log_prob, y.log_prob)
    # After a pause the bridge has released every input: nothing is held.
    agent.forget_prediction()
    assert agent.step(seen[0]).persistence == 0.0
    # Acting deterministically holds nothing; 1 would leave the policy no say.
    sure = CuriosityAgent(ON_FRAME, seed=3, persistence=0.8, deterministic=True)
    assert all(sure.step(frame).persistence == 0.0 for frame in frames(3))
    with pytest.raises(ValueError, match='persistence 1.0 is outside'):
        CuriosityAgent('cpu', persistence=1.0)


def test_agents_of_one_graph_share_the_models_and_keep_their_states_by_name(tmp_path):
    first, second = CuriosityAgent('cpu', seed=4), CuriosityAgent('cpu', seed=4, sampling_seed=1)
    for frame_a, frame_b in zip(frames(3, seed=1), frames(5, seed=2), strict=False):
        first.step(frame_a)
        second.step(frame_b)
    second.step(frames(1, seed=3)[0])
    assert not torch.equal(first.hidden, second.hidden) and (first.steps, second.steps) == (3, 4)
    first.versions['policy'] = 7  # the models first saved are the ones shared
    stage = begin_checkpoint(tmp_path)
    first.save_checkpoint(stage, 'agent_0')
    second.save_checkpoint(stage, 'agent_1')  # models/ is there already: not written again
    path = commit_checkpoint(stage, {'preset': 'cpu'})
    for name, saved in (('agent_0', first), ('agent_1', second)):
        restored = CuriosityAgent('cpu', seed=9)
        restored.load_checkpoint(path, name)
        assert torch.equal(restored.hidden, saved.hidden) and restored.steps == saved.steps
        assert restored.versions['policy'] == 7
    newcomer = CuriosityAgent('cpu', seed=9)  # an agent the checkpoint never saw: models only
    newcomer.load_checkpoint(path, None)
    assert newcomer.versions['policy'] == 7 and newcomer.steps == 0
    assert torch.equal(newcomer.hidden, CuriosityAgent('cpu', seed=9).hidden)


def test_a_sampling_seed_gives_agents_of_one_seed_their_own_draws():
    frame = frames(1)[0]
    draws = {s: [CuriosityAgent('cpu', seed=4, sampling_seed=s).step(f).action for f in (frame,) * 5]
             for s in (None, 4)}
    assert all(torch.equal(a, b) for a, b in zip(draws[None], draws[4], strict=True))  # None: the seed
    same_weights = [CuriosityAgent('cpu', seed=4, sampling_seed=s) for s in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(same_weights[0].models['policy'].state_dict().values(),
                                                  same_weights[1].models['policy'].state_dict().values(),
                                                  strict=True))
    actions = [[agent.step(f).action for f in frames(20)] for agent in same_weights]
    assert any(not torch.equal(a, b) for a, b in zip(*actions, strict=True))
