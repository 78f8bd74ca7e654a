"""agent/sync_weights and the experience stream, with the real agent process."""

import numpy as np
import pytest
import torch
from rcl_interfaces.msg import ParameterType, ParameterValue
from ros_harness import FrameFeeder, NodeStatus, sync_weights, wait_for, weights_parameter
from sensor_msgs.msg import Joy
from std_msgs.msg import UInt8MultiArray

from ami_ros.core.envelope import encode
from ami_ros.core.models import build_models
from ami_ros.core.presets import ACTION_CHOICES, get_preset
from ami_ros.core.schemas import decode_experience, encode_weights

PRESET = get_preset('cpu')


@pytest.fixture
def acting(launch, test_node):
    agent = launch('agent', parameters={'preset': 'cpu'})
    actions = test_node.collect(Joy, 'action')
    experience = test_node.collect(UInt8MultiArray, 'experience', qos=200)
    frames = FrameFeeder(test_node)
    wait_for(lambda: len(actions) >= 5, 30, message='the agent acting')
    yield agent, actions, experience, frames
    frames.close()


def _forcing_policy(target):
    """A policy whose heads always choose `target` (logit bias +50)."""
    policy = build_models(PRESET, seed=3)['policy']
    state = policy.state_dict()
    heads = sorted(k for k in state if k.endswith('.bias') and state[k].shape[0] in ACTION_CHOICES
                   and state[k].shape[0] > 1)
    assert len(heads) == len(ACTION_CHOICES), heads
    for key, choice in zip(heads, target, strict=True):
        state[key.replace('.bias', '.weight')].zero_()
        state[key].zero_()
        state[key][choice] = 50.0
    return state


def test_experience_carries_every_step(acting):
    _, actions, experience, _ = acting
    wait_for(lambda: len(experience) >= 10, 10, message='experience')
    steps = [decode_experience(bytes(m.data), PRESET) for _, m in experience[-10:]]
    numbers = [s.step for s in steps]
    assert numbers == list(range(numbers[0], numbers[0] + 10))  # one message per step, none lost
    assert all(s.continues for s in steps[1:])
    assert all(s.reward is not None and np.isfinite(s.reward) for s in steps[1:])
    assert steps[0].observation.shape == (3, 84, 84) and steps[0].observation.dtype == torch.uint8
    assert steps[0].hidden.dtype == torch.complex64
    assert steps[-1].versions == {'encoder': 0, 'decoder': 0, 'dynamics': 0, 'policy': 0}
    # The hidden state a step used is the one the previous step produced: it changes.
    assert not torch.equal(steps[0].hidden, steps[-1].hidden)


def test_pushed_policy_changes_behaviour(acting, test_node):
    _, actions, experience, _ = acting
    target = [1, 2, 1, 1, 0]  # forward, left, look right, jump, walk
    blob = encode_weights('policy', _forcing_policy(target), 7, 'cpu')
    results = sync_weights(test_node, weights_parameter('policy', blob))
    assert [r.successful for r in results] == [True], results
    count = len(actions)
    wait_for(lambda: len(actions) >= count + 5, 10, message='actions after the sync')
    expected_axes = [1.0, -1.0, 1.0]
    for _, joy in actions[-3:]:
        assert list(joy.axes) == expected_axes and list(joy.buttons) == [1, 0]
    # Experience reports the new policy version.
    wait_for(lambda: decode_experience(bytes(experience[-1][1].data), PRESET).versions['policy'] == 7,
             5, message='policy version 7 in experience')


def _stamp_ns(joy: Joy) -> int:
    return joy.header.stamp.sec * 1_000_000_000 + joy.header.stamp.nanosec


def _good_state(model, seed=0):
    return dict(build_models(PRESET, seed=seed)[model].state_dict())


def _versions(experience):
    """The model versions the newest step received was taken with."""
    return decode_experience(bytes(experience[-1][1].data), PRESET).versions


def test_malformed_sync_requests_are_refused_and_acting_goes_on(acting, test_node, tmp_path):
    agent, actions, experience, frames = acting
    health = NodeStatus(test_node)
    # A good version 1 first, so that "nothing changed" below is not just "nothing ever could".
    served = encode_weights('dynamics', _good_state('dynamics', seed=1), 1, 'cpu')
    assert [r.successful for r in sync_weights(test_node, weights_parameter('dynamics', served))] == [True]
    wait_for(lambda: _versions(experience)['dynamics'] == 1, 10, message='dynamics version 1 in experience')
    before = _versions(experience)

    def dynamics(state, preset='cpu'):  # every refused push would be version 2
        return weights_parameter('dynamics', encode_weights('dynamics', state, 2, preset))

    good = encode_weights('dynamics', _good_state('dynamics'), 2, 'cpu')
    wrong_shape = _good_state('dynamics')
    key = next(k for k, v in wrong_shape.items() if v.ndim == 2)
    wrong_shape[key] = torch.zeros(3, 3)
    # Same size, other dtype (float64 would be refused earlier, as larger than the model needs).
    wrong_dtype = {k: (v.to(torch.int32) if v.is_floating_point() else v)
                   for k, v in _good_state('dynamics').items()}
    with_nan = _good_state('dynamics')
    with_nan[key] = with_nan[key].clone()
    with_nan[key][0, 0] = float('nan')
    missing = tmp_path / 'never_written.safetensors'
    cases = {
        'truncated': (weights_parameter('dynamics', good[: len(good) // 2]), 'truncated'),
        'unknown model': (weights_parameter('critic', good), "unknown model 'critic'"),
        'wrong shape': (dynamics(wrong_shape), f'{key} has shape [3, 3]'),
        'wrong dtype': (dynamics(wrong_dtype), 'dtype int32, expected float32'),
        'NaN': (dynamics(with_nan), 'NaN'),
        'other preset': (dynamics(_good_state('dynamics'), 'ami'), "preset 'ami', this node runs 'cpu'"),
        'wrong schema': (weights_parameter('dynamics', encode(_good_state('dynamics'), 'weights/policy')),
                         "expected 'weights/dynamics'"),
        'not bytes': (weights_parameter('dynamics', value=ParameterValue(
            type=ParameterType.PARAMETER_INTEGER, integer_value=3)), 'byte_array'),
        # Outside the trainers' sync folder: refused unread, its existence not told.
        'no such file': (weights_parameter('dynamics', value=ParameterValue(
            type=ParameterType.PARAMETER_STRING, string_value=missing.as_uri())), 'read only from'),
    }
    first_frame = len(frames.published)
    for name, (param, reason) in cases.items():
        results = sync_weights(test_node, param)
        assert len(results) == 1 and not results[0].successful, name
        assert reason in results[0].reason, (name, results[0].reason)
    # A request with one good and one bad model changes nothing: all or none,
    # and each model refused says why.
    good_policy = weights_parameter('policy', encode_weights('policy', _good_state('policy'), 2, 'cpu'))
    for params, reason in (((good_policy, cases['NaN'][0]), 'NaN'),
                           ((weights_parameter('dynamics', good), good_policy, weights_parameter(
                               'dynamics', good)), 'named twice')):
        results = sync_weights(test_node, *params)
        assert len(results) == len(params) and not any(r.successful for r in results)
        assert all(reason in r.reason for r in results), [r.reason for r in results]
    last_frame = len(frames.published)
    # Acting went on throughout, old weights serving. Judged by frame stamps,
    # not by arrival times here: this process's own serialising of the
    # requests can hold up its feeder and its receiver, which is no gap of the
    # agent's. The agent keeps only the newest frame, so an agent stalled for
    # three frame periods leaves three frames in a row without an action. Two
    # in a row are allowed: best-effort transport may lose a frame, and on a
    # loaded 2-core CI machine a step may also start a period late (seen once
    # in a CI run).
    sent = frames.published[first_frame:last_frame]
    assert len(sent) >= 3, 'the feeder sent too few frames to judge'
    wait_for(lambda: _stamp_ns(actions[-1][1]) >= sent[-1], 5, message='the last frame acted on')
    acted_on = {_stamp_ns(joy) for _, joy in actions}
    unanswered = [stamp not in acted_on for stamp in sent]
    assert not any(all(unanswered[i:i + 3]) for i in range(len(unanswered) - 2)), \
        f'three frames in a row without an action while refusing weights: {unanswered}'
    assert sum(unanswered) <= max(2, len(sent) // 4), f'too many frames without an action: {unanswered}'
    assert agent.alive()
    assert 'refused weights' in agent.output()
    refused = len(cases) + 2
    # The agent still serves version 1: in the steps it takes after the last
    # request, and in its own count of syncs.
    count = len(experience)
    wait_for(lambda: len(experience) >= count + 3, 10, message='experience after the refusals')
    assert _versions(experience) == before
    wait_for(lambda: health.number('agent', 'syncs_refused') == refused, 10,
             message=lambda: f'{refused} refused syncs in /diagnostics, {health.status.get("agent")}')
    assert health.number('agent', 'syncs_ok') == 1
    assert health.get('agent', 'version_dynamics') == '1' and health.get('agent', 'version_policy') == '0'
