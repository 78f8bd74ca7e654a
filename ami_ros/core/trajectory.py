"""The on-policy PPO trajectory buffer of the learning core, and GAE.

Thread-safe and saved exactly as tensors + JSON-able counters, like the
replay buffers in `core/buffers.py`.

Convention
----------
`TrajectoryBuffer`: the reward stored with entry t rewards the action of
  entry t-1 (curiosity is known only when the next frame arrives), so a
  trajectory of steps+1 entries trains actions 0..steps-1 on the rewards of
  entries 1..steps and bootstraps from value[steps]. Continuing task: no
  dones. Staleness drops a prefix (entries are in time order, so the stale
  ones come first) and keeps the rest contiguous.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from ami_ros.core.buffers import BufferState, StateInfo, check_kind

_TRAJECTORY_FIELDS = ('observation', 'action', 'log_prob', 'value', 'reward', 'policy_version',
                      'previous_action', 'persistence')


def gae(rewards: Tensor, values: Tensor, last_value: Tensor | float,
        gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation for a continuing task (no dones).

    rewards[t] is the reward for the action taken at step t (r_{t+1}),
    values[t] = V(s_t), last_value = V(s_T) bootstraps the end:
    δ_t = r_{t+1} + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns = A + V.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    values = torch.as_tensor(values, dtype=torch.float32)
    if rewards.shape != values.shape or rewards.dim() != 1:
        raise ValueError(f'rewards {list(rewards.shape)} and values {list(values.shape)} must be equal 1-D')
    next_values = torch.cat([values[1:], torch.as_tensor(last_value, dtype=torch.float32).reshape(1)])
    deltas = rewards + gamma * next_values - values
    advantages = torch.empty_like(deltas)
    running = torch.zeros(())
    for t in range(len(deltas) - 1, -1, -1):
        running = deltas[t] + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def trajectories_gae(trajectories: Sequence[dict[str, Tensor]], gamma: float, lam: float
                     ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """GAE on each full trajectory alone (as `TrajectoryBuffer.take` gives them, one per
    agent: each bootstraps from its own last value), then all concatenated.

    Returns (the trained entries by field: all but each trajectory's last, rewards
    (of entries 1..steps), advantages, returns), in the same order.
    """
    if not trajectories:
        raise ValueError('no full trajectory to train on')
    estimates = [gae(t['reward'][1:], t['value'][:-1], t['value'][-1], gamma, lam) for t in trajectories]
    entries = {key: torch.cat([t[key][:-1] for t in trajectories]) for key in trajectories[0]}
    return (entries, torch.cat([t['reward'][1:] for t in trajectories]),
            torch.cat([adv for adv, _ in estimates]), torch.cat([ret for _, ret in estimates]))


class TrajectoryBuffer:
    """On-policy PPO trajectory of `steps + 1` entries (the last bootstraps).

    Reward convention: the `reward` added with entry t is the reward for the
    action of entry t-1 (the agent computes curiosity when the next frame
    arrives). So a full buffer trains actions 0..steps-1 with the rewards of
    entries 1..steps, and value[steps] bootstraps; entry 0's reward belongs to
    the previous trajectory. `clear()`/`take()` keep the last entry as the
    first of the next trajectory, so no step is lost.

    Entries that arrive while a full trajectory waits for the trainer are kept
    (up to `max_entries`, default 2·(steps+1); beyond it the oldest go), so a
    slow trainer never stops the agent.
    """

    def __init__(self, steps: int, max_entries: int | None = None) -> None:
        if steps < 1:
            raise ValueError(f'steps must be >= 1, got {steps}')
        self.steps = int(steps)
        self.max_entries = int(max_entries or 2 * (steps + 1))
        if self.max_entries < self.steps + 1:
            raise ValueError(f'max_entries must be >= steps + 1 = {self.steps + 1}')
        self._lock = threading.Lock()
        self._entries: list[tuple[Tensor, ...]] = []
        self._dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def dropped(self) -> int:
        """Entries lost to overflow or staleness, in total."""
        with self._lock:
            return self._dropped

    def full(self) -> bool:
        with self._lock:
            return len(self._entries) >= self.steps + 1

    def add(self, observation: Tensor, action: Tensor, log_prob: Tensor, value: float | Tensor,
            reward: float | Tensor, policy_version: int, previous_action: Tensor | None = None,
            persistence: float = 0.0) -> None:
        """Append entry t; `reward` rewards the action of entry t-1.

        `observation` is what the policy acted on: a uint8 image or a float32
        vector (the latent), the same kind for every entry. `previous_action` and
        `persistence` are the action the agent held and how likely it kept
        it (policy.with_persistence; none held: None and 0)."""
        if observation.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f'observation must be a uint8 image or a float32 latent, '
                             f'got {observation.dtype}')
        action = torch.as_tensor(action, dtype=torch.int64).detach().clone().reshape(-1)
        entry = (observation.detach().clone(),
                 action,
                 torch.as_tensor(log_prob, dtype=torch.float32).detach().clone().reshape(-1),
                 torch.as_tensor(value, dtype=torch.float32).detach().reshape(()).clone(),
                 torch.as_tensor(reward, dtype=torch.float32).detach().reshape(()).clone(),
                 torch.tensor(int(policy_version), dtype=torch.int64),
                 (torch.zeros_like(action) if previous_action is None
                  else torch.as_tensor(previous_action, dtype=torch.int64).detach().clone().reshape(-1)),
                 torch.tensor(float(persistence), dtype=torch.float32))
        with self._lock:
            if self._entries:
                for name, got, have in zip(_TRAJECTORY_FIELDS, entry, self._entries[0], strict=True):
                    if got.shape != have.shape or got.dtype != have.dtype:
                        raise ValueError(f'{name} {got.dtype} {list(got.shape)} differs from '
                                         f'{have.dtype} {list(have.shape)}')
            self._entries.append(entry)
            if len(self._entries) > self.max_entries:
                excess = len(self._entries) - self.max_entries
                del self._entries[:excess]
                self._dropped += excess

    @staticmethod
    def _stack(entries: Sequence[tuple[Tensor, ...]]) -> dict[str, Tensor]:
        return {name: torch.stack([e[i] for e in entries]) for i, name in enumerate(_TRAJECTORY_FIELDS)}

    def trajectory(self) -> dict[str, Tensor]:
        """A copy of the first min(len, steps+1) entries, stacked by field."""
        with self._lock:
            if not self._entries:
                raise ValueError('the trajectory buffer is empty')
            return self._stack(self._entries[:self.steps + 1])

    def compute_gae(self, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
        """(advantages, returns) [steps] of the current trajectory (fewer when
        not yet full): actions of entries 0..n-2, rewards of entries 1..n-1."""
        traj = self.trajectory()
        if len(traj['value']) < 2:
            raise ValueError('GAE needs at least two entries')
        return gae(traj['reward'][1:], traj['value'][:-1], traj['value'][-1], gamma, lam)

    def take(self) -> dict[str, Tensor]:
        """Atomically hand out the full trajectory (steps+1 entries, stacked) and
        drop its first `steps` entries, so the last one (and anything added
        since) starts the next trajectory."""
        with self._lock:
            if len(self._entries) < self.steps + 1:
                raise ValueError(f'trajectory not full: {len(self._entries)} of {self.steps + 1} entries')
            out = self._stack(self._entries[:self.steps + 1])
            del self._entries[:self.steps]
            return out

    def clear(self) -> None:
        """Drop the trained entries: the first `steps` (all but the last when not
        full); the last trajectory entry stays as the first of the next."""
        with self._lock:
            del self._entries[:min(self.steps, max(0, len(self._entries) - 1))]

    def break_sequence(self) -> None:
        """Forget everything: without dones, GAE cannot span a break in time."""
        with self._lock:
            self._dropped += len(self._entries)
            self._entries.clear()

    def drop_older_than(self, min_policy_version: int) -> int:
        """Drop the prefix up to the last entry made by a policy older than
        `min_policy_version`; returns how many went. Only a prefix goes, so the
        remaining entries stay one contiguous stretch of time."""
        with self._lock:
            last_stale = -1
            for i, entry in enumerate(self._entries):
                if int(entry[5]) < min_policy_version:
                    last_stale = i
            count = last_stale + 1
            del self._entries[:count]
            self._dropped += count
            return count

    def state_dict(self) -> BufferState:
        with self._lock:
            tensors = self._stack(self._entries) if self._entries else {}
            info: StateInfo = {'kind': 'trajectory', 'steps': self.steps, 'max_entries': self.max_entries,
                               'size': len(self._entries), 'dropped': self._dropped}
            return tensors, info

    def load_state_dict(self, tensors: dict[str, Tensor], info: StateInfo) -> None:
        """Restore entries (the newest `max_entries` if more were saved)."""
        check_kind(info, 'trajectory')
        with self._lock:
            self._entries = []
            if tensors:
                n = len(tensors['value'])
                # Checkpoints from before persistence held no action: none held.
                tensors = {'previous_action': torch.zeros_like(tensors['action']),
                           'persistence': torch.zeros(n), **tensors}
                for i in range(max(0, n - self.max_entries), n):
                    self._entries.append(tuple(tensors[name][i].clone() for name in _TRAJECTORY_FIELDS))
            self._dropped = int(info.get('dropped', 0))
