"""The acting agent's core (no ROS): the action leaves before the rest of the step."""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint import begin_checkpoint, commit_checkpoint
from ami_ros.core.observation import to_observation
from ami_ros.core.policy import policy_observation, with_persistence
from ami_ros.core.presets import ACTION_CHOICES
from ami_ros.core.reward import prediction_nll


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (84, 84, 3), dtype=np.uint8) for _ in range(n)]


def restored_copy(agent: CuriosityAgent, tmp_path) -> CuriosityAgent:
    """A new agent of the same preset (another seed) restored from `agent`'s checkpoint."""
    stage = begin_checkpoint(tmp_path)
    agent.save_checkpoint(stage)
    path = commit_checkpoint(stage, {'preset': agent.preset.name})
    restored = CuriosityAgent(agent.preset.name, seed=9)
    restored.load_checkpoint(path)
    return restored


def assert_acting_and_rewarded_alike(a: CuriosityAgent, b: CuriosityAgent) -> None:
    for frame in frames(3, seed=7):
        x, y = a.step(frame), b.step(frame)
        assert x.reward == y.reward and torch.equal(x.action, y.action)


def assert_owed_reward_restored_and_forgotten(agent: CuriosityAgent, attribute: str, tmp_path) -> None:
    """For a preset whose reward uses what the dynamics said with its last
    prediction (`attribute` of the agent): a restored agent holds it and acts
    and is rewarded alike, a pause forgets it, and no other reward can be
    combined with it."""
    restored = restored_copy(agent, tmp_path)
    assert torch.equal(getattr(restored, attribute), getattr(agent, attribute))
    assert_acting_and_rewarded_alike(agent, restored)
    agent.forget_prediction()
    assert getattr(agent, attribute) is None
    with pytest.raises(ValueError, match='use reward:=curiosity'):
        CuriosityAgent(agent.preset.name, reward='novel_curiosity')


def test_action_is_handed_out_before_the_encoder_and_dynamics_run():
    agent = CuriosityAgent('small', seed=3)
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
    agent = CuriosityAgent('small-latent', seed=3)
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


def test_an_ensemble_agent_is_paid_the_disagreement_of_its_last_prediction(tmp_path):
    # small-ensemble: the reward for an action is how much the dynamics'
    # members disagreed on what it would bring, computed with the prediction
    # and paid with the next frame; a restored agent pays the same.
    agent = CuriosityAgent('small-ensemble', seed=4)
    dynamics = agent.models['dynamics']
    previous = None
    for frame in frames(4, seed=8):
        owed = agent.disagreement
        step = agent.step(frame)
        if previous is None:
            assert owed is None and np.isnan(step.reward)
        else:
            assert step.reward == pytest.approx(float(owed[0]), rel=1e-6)
            # The members' variance for the previous step's z, state and action.
            with torch.no_grad():
                recomputed = dynamics.step_with_extras(
                    previous.latent[None], previous.hidden[None], previous.action[None]).disagreement
            assert step.reward == pytest.approx(float(recomputed[0]), rel=1e-5)
            # Not the prediction's error, which the latent's metric still reports.
            assert step.reward != pytest.approx(step.prediction_error * math.pi, rel=1e-2)
        previous = step
    assert_owed_reward_restored_and_forgotten(agent, 'disagreement', tmp_path)


def test_a_policy_on_the_hidden_state_acts_on_what_the_step_records():
    # small-memory: the policy trainer rebuilds each step's input from the
    # experience (z and the hidden state the step used); PPO's importance
    # ratio is only right if that is exactly what the agent acted on.
    agent = CuriosityAgent('small-memory', seed=3)
    policy = agent.models['policy']
    hiddens = set()
    for frame in frames(4, seed=5):
        step = agent.step(frame)
        with torch.no_grad():
            rebuilt = policy_observation('latent-hidden', None, step.latent, step.hidden)
            dist, value = policy(rebuilt[None])
        assert torch.allclose(dist.log_prob(step.action[None])[0], step.log_prob, atol=1e-6)
        assert float(value[0]) == pytest.approx(step.value, abs=1e-6)
        hiddens.add(step.hidden.abs().sum().item())
    assert len(hiddens) == 4  # a new state every step: the input is not constant


def test_handing_out_the_action_early_changes_nothing_the_step_produces():
    a, b = CuriosityAgent('small', seed=5), CuriosityAgent('small', seed=5)
    for frame in frames(5, seed=1):
        x = a.step(frame)
        y = b.step(frame, on_action=lambda action: None)
        assert torch.equal(x.action, y.action) and torch.equal(x.log_prob, y.log_prob)
        assert torch.equal(x.latent, y.latent) and torch.equal(x.hidden, y.hidden)
        assert (np.isnan(x.reward) and np.isnan(y.reward)) or x.reward == y.reward
    assert torch.equal(a.hidden, b.hidden)


def test_an_agent_with_persistence_holds_its_actions_and_reports_the_mixture_it_drew_from(tmp_path):
    agent = CuriosityAgent('small', seed=3, persistence=0.8)
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
    restored = CuriosityAgent('small', seed=9, persistence=0.8)
    restored.load_checkpoint(commit_checkpoint(stage, {'preset': 'small'}))
    assert torch.equal(restored.previous_action, agent.previous_action)
    for frame in frames(5, seed=6):
        x, y = agent.step(frame), restored.step(frame)
        assert torch.equal(x.action, y.action) and torch.equal(x.log_prob, y.log_prob)
    # After a pause the bridge has released every input: nothing is held.
    agent.forget_prediction()
    assert agent.step(seen[0]).persistence == 0.0
    # Acting deterministically holds nothing; 1 would leave the policy no say.
    sure = CuriosityAgent('small', seed=3, persistence=0.8, deterministic=True)
    assert all(sure.step(frame).persistence == 0.0 for frame in frames(3))
    with pytest.raises(ValueError, match='persistence 1.0 is outside'):
        CuriosityAgent('small', persistence=1.0)


@pytest.mark.parametrize('reward', ['novel_curiosity', 'counted_curiosity'])
def test_a_reward_with_memory_is_saved_and_restored_with_the_agent(tmp_path, reward):
    # novel_curiosity remembers recent latents, counted_curiosity how often
    # it saw each kind; a restored agent must reward the next frames exactly
    # as the original does.
    original = CuriosityAgent('small', seed=2, reward=reward)
    for frame in frames(15, seed=3):
        original.step(frame)
    stage = begin_checkpoint(tmp_path)
    original.save_checkpoint(stage)
    path = commit_checkpoint(stage, {'preset': 'small'})
    restored = CuriosityAgent('small', seed=9, reward=reward)
    restored.load_checkpoint(path)
    memory = original.reward_fn.state_dict()
    assert memory and memory.keys() == restored.reward_fn.state_dict().keys()
    for frame in frames(5, seed=4):
        x, y = original.step(frame), restored.step(frame)
        assert x.reward == y.reward and torch.equal(x.action, y.action)
    # The memory of one reward function is not forced on another.
    plain = CuriosityAgent('small', seed=2)
    plain.load_checkpoint(path)
    assert plain.step(frames(1)[0]).reward > 0


def test_an_icm_agent_is_rewarded_by_the_error_of_its_feature_prediction(tmp_path):
    agent = CuriosityAgent('small-icm', seed=4)
    dynamics = agent.models['dynamics']
    for i, frame in enumerate(frames(4, seed=6)):
        predicted_latent, predicted_features = agent.prediction, agent.feature_prediction
        step = agent.step(frame)
        if i == 0:
            assert predicted_features is None and np.isnan(step.reward)
            continue
        with torch.no_grad():
            z = step.latent[None]
            in_features = float(prediction_nll(predicted_features, dynamics.features(z))[0])
            in_latent = float(prediction_nll(predicted_latent, z)[0])
        assert step.reward == pytest.approx(in_features, rel=1e-5)
        assert step.reward != pytest.approx(in_latent, rel=1e-2)
        # prediction_error stays the error in the latent, the one predicted frames show.
        assert step.prediction_error == pytest.approx(in_latent / math.pi, rel=1e-5)
    # A restored agent predicts the same features, so it is rewarded the same.
    restored = restored_copy(agent, tmp_path)
    assert torch.equal(restored.feature_prediction, agent.feature_prediction)
    assert_acting_and_rewarded_alike(agent, restored)
    agent.forget_prediction()
    assert agent.prediction is None and agent.feature_prediction is None


def test_an_aleatoric_agent_is_paid_the_error_beyond_the_one_it_expected(tmp_path):
    # small-aleatoric: the dynamics' head guesses, from the recurrent features
    # a prediction is made from and the action, how large its error will be;
    # the reward is the error less that guess, computed with the next frame.
    agent = CuriosityAgent('small-aleatoric', seed=4)
    dynamics = agent.models['dynamics']
    previous = None
    for frame in frames(4, seed=9):
        predicted, expected = agent.prediction, agent.expected_error
        step = agent.step(frame)
        if previous is None:
            assert expected is None and np.isnan(step.reward)
        else:
            error = float(prediction_nll(predicted, step.latent[None])[0])
            # The guess for the previous step's z, state and action, recomputed.
            with torch.no_grad():
                guess = float(dynamics.step_with_extras(
                    previous.latent[None], previous.hidden[None], previous.action[None]).expected_error[0])
            assert float(expected[0]) == pytest.approx(guess, rel=1e-5)
            assert step.reward == pytest.approx(error - guess, rel=1e-5, abs=1e-6)
            assert abs(guess) > 1e-4  # an untrained head guesses something: the test can tell
            assert step.prediction_error == pytest.approx(error / math.pi, rel=1e-5)
        previous = step
    assert_owed_reward_restored_and_forgotten(agent, 'expected_error', tmp_path)
    assert CuriosityAgent('small-latent').expected_error is None
