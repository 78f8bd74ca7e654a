"""Buffers of the learning core: replacement policies, chunks, GAE, state round trips."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ami_ros.core.buffers import DynamicsBuffer, ImageBuffer
from ami_ros.core.source_buffers import DynamicsBuffers, TrajectoryBuffers
from ami_ros.core.trajectory import TrajectoryBuffer, gae


def _through_disk(state):
    """What a checkpoint does: safetensors for tensors, JSON for the rest."""
    tensors, info = state
    return st_load(st_save({k: v.contiguous() for k, v in tensors.items()})), json.loads(json.dumps(info))


def _image(value: int, shape=(3, 4, 4)) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.uint8)


# ---------------------------------------------------------------- ImageBuffer

def test_image_buffer_random_replacement_keeps_capacity_and_reaches_every_slot():
    buf = ImageBuffer(capacity=8, seed=1)
    for i in range(8):
        buf.add(_image(i))
    assert len(buf) == 8 and buf.new_count == 8
    first = buf.snapshot()
    assert [int(img[0, 0, 0]) for img in first] == list(range(8))
    for i in range(8, 200):
        buf.add(_image(i))
        assert len(buf) == 8
    snap = buf.snapshot()
    # Every original slot has been overwritten by a later image.
    assert all(int(img[0, 0, 0]) >= 8 for img in snap)
    # Random, not FIFO: the survivors are not simply the last 8 added.
    assert sorted(int(img[0, 0, 0]) for img in snap) != list(range(192, 200))
    assert buf.new_count == 200
    buf.mark_trained()
    assert buf.new_count == 0
    assert buf.sample(5).shape == (5, 3, 4, 4)


def test_image_buffer_snapshot_is_a_copy_and_marks():
    buf = ImageBuffer(capacity=4)
    buf.add(_image(3))
    snap = buf.snapshot(mark_trained=True)
    snap.fill_(0)
    assert int(buf.snapshot()[0, 0, 0, 0]) == 3
    assert buf.new_count == 0
    with pytest.raises(ValueError):
        buf.add(_image(1, shape=(3, 5, 5)))
    with pytest.raises(ValueError):
        buf.add(torch.zeros(3, 4, 4))


def test_image_buffer_state_round_trip_is_exact_including_generator():
    buf = ImageBuffer(capacity=6, seed=7)
    for i in range(20):
        buf.add(_image(i))
    restored = ImageBuffer(capacity=6, seed=999)
    restored.load_state_dict(*_through_disk(buf.state_dict()))
    assert torch.equal(restored.snapshot(), buf.snapshot())
    assert (restored.new_count, len(restored), restored.added) == (buf.new_count, len(buf), buf.added)
    # Same generator state: the same samples and the same replacement slots.
    assert torch.equal(restored.sample(10), buf.sample(10))
    for i in range(20, 30):
        buf.add(_image(i))
        restored.add(_image(i))
    assert torch.equal(restored.snapshot(), buf.snapshot())


def test_image_buffer_is_thread_safe():
    buf = ImageBuffer(capacity=64, seed=0)
    buf.add(_image(0, (3, 16, 16)))
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(2000):
                buf.add(_image(i % 251, (3, 16, 16)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        batch = buf.sample(8)
        # An image is written under the lock, so a sample never sees a torn one.
        assert bool((batch == batch[:, :1, :1, :1]).all())
        buf.snapshot()
    thread.join()
    assert not errors
    assert len(buf) == 64 and buf.added == 2001


# ------------------------------------------------------------- DynamicsBuffer

def _step(i: int, latent=4, depth=2, dim=3):
    z = torch.full((latent,), float(i))
    h = torch.full((depth, dim), complex(i, -i), dtype=torch.complex64)
    a = torch.full((5,), i % 3, dtype=torch.int64)
    return z, h, a


def test_dynamics_buffer_is_fifo():
    buf = DynamicsBuffer(capacity=5)
    for i in range(12):
        buf.add(*_step(i))
    assert len(buf) == 5 and buf.new_count == 12
    tensors, _ = buf.state_dict()
    assert tensors['latent'][:, 0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]


def test_dynamics_chunks_align_targets_and_hidden():
    buf = DynamicsBuffer(capacity=16)
    for i in range(10):
        buf.add(*_step(i))
    z, h0, a, target = buf.chunks(4)
    assert z.shape == (7, 3, 4) and target.shape == (7, 3, 4)
    assert h0.shape == (7, 2, 3) and h0.dtype == torch.complex64
    assert a.shape == (7, 3, 5) and a.dtype == torch.int64
    for n in range(7):
        assert z[n, :, 0].tolist() == [n, n + 1, n + 2]
        assert target[n, :, 0].tolist() == [n + 1, n + 2, n + 3]  # target = next latent
        assert a[n, :, 0].tolist() == [n % 3, (n + 1) % 3, (n + 2) % 3]
        assert complex(h0[n, 0, 0]) == complex(n, -n)  # the state stored with the first step


def test_dynamics_chunks_never_span_a_break_and_follow_the_ring():
    buf = DynamicsBuffer(capacity=12)
    for i in range(20):  # wraps the ring: steps 8..19 stay
        if i == 13:
            buf.break_sequence()
        buf.add(*_step(i), continues=(i != 16))
    z, _, _, target = buf.chunks(3)
    starts = [int(row[0, 0]) for row in z]
    # Runs: 8..12, 13..15, 16..19 -> windows of 3 starting at 8,9,10 / 13 / 16,17.
    assert starts == [8, 9, 10, 13, 16, 17]
    assert all(int(t[-1, 0]) == s + 2 for s, t in zip(starts, target, strict=True))
    assert buf.chunks(6)[0].shape[0] == 0
    buf.chunks(3, mark_trained=True)
    assert buf.new_count == 0


def test_dynamics_state_round_trip_is_exact():
    buf = DynamicsBuffer(capacity=8)
    for i in range(11):
        buf.add(*_step(i), continues=(i != 6))
    restored = DynamicsBuffer(capacity=8)
    restored.load_state_dict(*_through_disk(buf.state_dict()))
    for got, want in zip(restored.chunks(3), buf.chunks(3), strict=True):
        assert torch.equal(got, want)
    assert (restored.new_count, len(restored), restored.added) == (buf.new_count, len(buf), buf.added)
    buf.add(*_step(11))
    restored.add(*_step(11))
    for got, want in zip(restored.chunks(3), buf.chunks(3), strict=True):
        assert torch.equal(got, want)


def test_dynamics_buffer_is_thread_safe():
    buf = DynamicsBuffer(capacity=50)
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(3000):
                buf.add(*_step(i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        z, h0, _, target = buf.chunks(5)
        if len(z):
            # Consistent windows: consecutive latents, hidden of the first step.
            assert bool((target[:, :, 0] == z[:, :, 0] + 1).all())
            assert bool((h0[:, 0, 0].real == z[:, 0, 0]).all())
    thread.join()
    assert not errors and len(buf) == 50


# ------------------------------------------------------------------------ GAE

def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([1.0, 0.0, 2.0])  # r_1, r_2, r_3 (for actions 0, 1, 2)
    values = torch.tensor([0.5, 1.0, -1.0])   # V_0, V_1, V_2
    last_value = 2.0                          # V_3
    # δ_2 = 2 + 0.9*2 - (-1) = 4.8          A_2 = 4.8
    # δ_1 = 0 + 0.9*(-1) - 1 = -1.9         A_1 = -1.9 + 0.72*4.8 = 1.556
    # δ_0 = 1 + 0.9*1 - 0.5 = 1.4           A_0 = 1.4 + 0.72*1.556 = 2.52032
    adv, ret = gae(rewards, values, last_value, gamma, lam)
    assert adv.tolist() == pytest.approx([2.52032, 1.556, 4.8], abs=1e-5)
    assert ret.tolist() == pytest.approx([3.02032, 2.556, 3.8], abs=1e-5)


def _entry(i: int, reward: float = 0.0, value: float = 0.0, version: int = 0):
    return (torch.full((3, 2, 2), i, dtype=torch.uint8), torch.full((5,), i % 2), torch.full((5,), -0.5),
            value, reward, version)


def test_trajectory_buffer_reward_convention_and_clear_keeps_last():
    buf = TrajectoryBuffer(steps=3)
    values = [0.5, 1.0, -1.0, 2.0]
    rewards = [9.0, 1.0, 0.0, 2.0]  # entry 0's reward belongs to an earlier action
    for i in range(4):
        assert not buf.full()
        buf.add(*_entry(i, rewards[i], values[i]))
    assert buf.full()
    adv, ret = buf.compute_gae(0.9, 0.8)
    assert adv.tolist() == pytest.approx([2.52032, 1.556, 4.8], abs=1e-5)
    buf.add(*_entry(4))  # arrives before training: kept, not lost
    buf.clear()
    assert len(buf) == 2
    assert int(buf.trajectory()['observation'][0, 0, 0, 0]) == 3  # the last entry starts the next one


def test_trajectory_take_hands_out_steps_plus_one_and_keeps_the_rest():
    buf = TrajectoryBuffer(steps=4)
    for i in range(7):
        buf.add(*_entry(i, value=float(i)))
    traj = buf.take()
    assert traj['value'].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert traj['observation'].shape == (5, 3, 2, 2) and traj['action'].dtype == torch.int64
    assert buf.trajectory()['value'].tolist() == [4.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        buf.take()


def test_trajectory_holds_latents_for_a_policy_on_the_latent_and_never_mixes_kinds():
    buf = TrajectoryBuffer(steps=2)
    for i in range(3):
        buf.add(torch.full((4,), i / 2), torch.zeros(5), torch.zeros(5), 0.0, 0.0, 0)
    traj = buf.take()
    assert traj['observation'].dtype == torch.float32 and traj['observation'].shape == (3, 4)
    assert traj['observation'][:, 0].tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match='observation torch.uint8 \\[4\\] differs from torch.float32'):
        buf.add(torch.zeros(4, dtype=torch.uint8), torch.zeros(5), torch.zeros(5), 0.0, 0.0, 0)
    with pytest.raises(ValueError, match='a uint8 image or a float32 latent, got torch.float64'):
        buf.add(torch.zeros(4, dtype=torch.float64), torch.zeros(5), torch.zeros(5), 0.0, 0.0, 0)


def test_trajectory_overflow_and_staleness_drop_a_prefix():
    buf = TrajectoryBuffer(steps=2, max_entries=5)
    for i in range(7):
        buf.add(*_entry(i, value=float(i), version=0 if i < 4 else 1))
    assert len(buf) == 5 and buf.dropped == 2
    assert buf.drop_older_than(1) == 2  # entries 2 and 3
    assert buf.trajectory()['value'].tolist() == [4.0, 5.0, 6.0]
    assert buf.drop_older_than(1) == 0
    buf.break_sequence()
    assert len(buf) == 0


def test_trajectory_state_round_trip_is_exact():
    buf = TrajectoryBuffer(steps=3)
    for i in range(5):
        buf.add(*_entry(i, reward=i * 0.25, value=-i, version=i))
    restored = TrajectoryBuffer(steps=3)
    restored.load_state_dict(*_through_disk(buf.state_dict()))
    for key, value in buf.trajectory().items():
        assert torch.equal(restored.trajectory()[key], value)
    assert len(restored) == 5
    empty = TrajectoryBuffer(steps=3)
    empty.load_state_dict(*_through_disk(TrajectoryBuffer(steps=3).state_dict()))
    assert len(empty) == 0


def test_a_trajectory_saved_before_persistence_loads_with_nothing_held():
    buf = TrajectoryBuffer(steps=3)
    for i in range(4):
        buf.add(*_entry(i, reward=0.5, value=1.0, version=i), previous_action=torch.ones(5), persistence=0.8)
    tensors, info = buf.state_dict()
    assert torch.equal(tensors['persistence'], torch.full((4,), 0.8))
    old = {k: v for k, v in tensors.items() if k not in ('previous_action', 'persistence')}
    restored = TrajectoryBuffer(steps=3)
    restored.load_state_dict(*_through_disk((old, info)))
    traj = restored.trajectory()
    assert torch.equal(traj['action'], buf.trajectory()['action'])
    assert not traj['previous_action'].any() and not traj['persistence'].any()


# ------------------------------------------- per-source sets (several agents)

def _dyn_step(buf, value: float, continues: bool = True) -> None:
    buf.add(torch.full((3,), float(value)), torch.zeros(2, 4, dtype=torch.complex64),
            torch.zeros(5, dtype=torch.int64), continues)


def _traj_step(buf, policy_version: int, value: float = 0.0) -> None:
    buf.add(torch.full((4,), float(value)), torch.zeros(5), torch.zeros(5), value, 0.5, policy_version)


def test_a_single_source_set_saves_and_restores_exactly_the_plain_buffers_layout():
    plain_dyn, single_dyn = DynamicsBuffer(8), DynamicsBuffers(('',), 8)
    plain_traj, single_traj = TrajectoryBuffer(3), TrajectoryBuffers(('',), 3)
    for i in range(5):
        _dyn_step(plain_dyn, i)
        _dyn_step(single_dyn[''], i)
        _traj_step(plain_traj, i, i)
        _traj_step(single_traj[''], i, i)
    for plain, single in ((plain_dyn, single_dyn), (plain_traj, single_traj)):
        (want, want_info), (got, got_info) = plain.state_dict(), single.state_dict()
        assert set(got) == set(want) and got_info == want_info
        assert all(torch.equal(got[k], want[k]) for k in want)
        # A checkpoint of today's layout restores into a set that has the source ''
        # (beside others), and is left out by one that has not.
        both = type(single)(('', 'agent_1'), 16) if plain is plain_dyn else TrajectoryBuffers(('', 'x'), 3)
        assert both.load_state_dict(*_through_disk(plain.state_dict())) == []
        assert len(both['']) == len(plain) and len(both) == len(plain)
        other = DynamicsBuffers(('a',), 8) if plain is plain_dyn else TrajectoryBuffers(('a',), 3)
        assert other.load_state_dict(*_through_disk(plain.state_dict())) == ['']
        assert len(other) == 0


def test_a_set_of_two_sources_round_trips_by_name_and_leaves_out_sources_it_lacks():
    dyn = DynamicsBuffers(('agent_0', 'agent_1'), 16)
    assert [b.capacity for b in dyn] == [8, 8] and dyn.capacity == 16  # the total, split evenly
    traj = TrajectoryBuffers(('agent_0', 'agent_1'), 3)
    for i in range(6):
        _dyn_step(dyn['agent_0'], i)
        _traj_step(traj['agent_0'], i, i)
    for i in range(3):
        _dyn_step(dyn['agent_1'], 100 + i)
        _traj_step(traj['agent_1'], 7, 100 + i)
    for saved, make in ((dyn, lambda s: DynamicsBuffers(s, 16)), (traj, lambda s: TrajectoryBuffers(s, 3))):
        state = _through_disk(saved.state_dict())
        same = make(('agent_1', 'agent_0'))
        assert same.load_state_dict(*state) == []
        for source in ('agent_0', 'agent_1'):
            want, got = saved[source].state_dict(), same[source].state_dict()
            assert want[1] == got[1] and all(torch.equal(want[0][k], got[0][k]) for k in want[0])
        # Restored by name: agent_1's buffer goes to agent_1, agent_2 starts empty.
        other = make(('agent_1', 'agent_2'))
        if saved is dyn:  # something of its own, which the restore empties
            _dyn_step(other['agent_2'], 5)
        else:
            _traj_step(other['agent_2'], 1)
        assert other.load_state_dict(*state) == ['agent_0']
        assert (len(other['agent_1']), len(other['agent_2'])) == (3, 0)
        with pytest.raises(ValueError, match='no listed source'):
            tensors, info = state
            make(('agent_0',)).load_state_dict({**tensors, 'agent_9:latent': torch.zeros(1)}, info)
    with pytest.raises(ValueError, match='unknown source'):
        dyn['agent_2']


def test_staleness_drops_each_sources_own_stale_prefix():
    traj = TrajectoryBuffers(('a', 'b'), 4)
    # Interleaved in time: a global prefix would take b's fresh entries with a's stale ones.
    for a_version, b_version in ((1, 3), (1, 3), (3, 1), (3, 3)):
        _traj_step(traj['a'], a_version)
        _traj_step(traj['b'], b_version)
    assert traj.drop_older_than(2) == 5
    assert (len(traj['a']), len(traj['b'])) == (2, 1)
    assert all(int(v) >= 2 for t in (traj['a'], traj['b']) for v in t.trajectory()['policy_version'])
    assert traj.dropped == 5
