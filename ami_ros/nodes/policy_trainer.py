"""policy_trainer: trains the PPO policy on the agent's experience.

Subscribes (for each agent of `agents`, `<agent>/experience`):
  experience            std_msgs/UInt8MultiArray, one envelope per agent step
                        (ami_ros/core/schemas.py): observation (or latent,
                        for a policy on the latent), action,
                        log_prob, value, reward (of the previous action) and
                        the policy version that acted go into the on-policy
                        trajectory buffer. A break in time (the agent's
                        continues=False, a step number that does not follow,
                        or a step without the previous action's reward)
                        empties it, since GAE cannot span a gap. Each
                        agent has a trajectory of its own (GAE and
                        staleness per agent); a round trains on every
                        agent's full one.
Calls:
  agent/sync_weights    rcl_interfaces/srv/SetParameters: 'policy' after each
                        round (each agent's)
Publishes:
  /diagnostics          see ami_ros/ros/trainer_node.py; plus received,
                        undecodable, gaps, received/<agent> with several
                        agents, trajectories (of the last round), dropped_stale (entries dropped as
                        too old, in total), dropped (all entries dropped:
                        stale, breaks, overflow) and max_policy_lag

Parameters: those of every trainer node (ami_ros/ros/trainer_node.py; no
max_batches: a PPO round always uses its whole trajectory; min_new
overrides the preset's ppo_training.steps), max_policy_lag and entropy_coef;
each is described where it is declared.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ami_ros.core.policy import policy_observation
from ami_ros.core.presets import Preset, with_overrides
from ami_ros.core.schemas import ExperienceStep
from ami_ros.core.trainers import PPOTrainer
from ami_ros.ros.managed_node import run
from ami_ros.ros.trainer_node import ExperienceTrainerNode


class PolicyTrainerNode(ExperienceTrainerNode):
    pushed_models = ('policy',)
    min_new_field = ('ppo_training', 'steps')
    caps_batches = False
    max_policy_lag = 2  # the parameter's default, until it is declared

    def __init__(self, **kwargs: Any) -> None:
        self.dropped_stale = 0
        super().__init__('policy_trainer', **kwargs)
        self.max_policy_lag = self.declare(
            'max_policy_lag', 2, 'Drop entries made by a policy more than this many versions '
            'older than the trainer\'s before a round (PPO\'s ratio corrects a small lag only).',
            low=0, high=1_000_000)

    def make_trainer(self, preset: Preset, models: dict[str, nn.Module], device: str, seed: int,
                     max_batches: int, sources: tuple[str, ...]) -> PPOTrainer:
        entropy_coef = self.declare(
            'entropy_coef', 0.0, 'Weight of the entropy bonus in the PPO loss; 0 = the preset\'s '
            '(docs/reference.md: 0.001). Larger keeps the policy from settling on one habit.',
            low=0.0, high=1.0, read_only=True)
        overrides = {'entropy_coef': float(entropy_coef)} if entropy_coef else {}
        cfg = with_overrides(preset, ppo_training=overrides).ppo_training
        return PPOTrainer(models['policy'], cfg, device=device, seed=seed, sources=sources)

    def add_step(self, step: ExperienceStep, follows: bool, source: str = '') -> None:
        # Without the previous action's reward no trajectory may span this step.
        if not follows or step.reward is None:
            self.trainer.buffer[source].break_sequence()
        # What the policy acted on: the frame, or the latent the agent's encoder made of it.
        seen = policy_observation(self.preset.policy.input, step.observation, step.latent)
        self.trainer.add(seen, step.action, step.log_prob, step.value,
                         0.0 if step.reward is None else step.reward,
                         policy_version=step.versions['policy'],
                         previous_action=step.previous_action, persistence=step.persistence,
                         source=source)

    def before_round(self) -> None:
        """Drop entries of a policy too old for PPO's importance ratio (each agent's stale prefix)."""
        oldest = self.trainer.version - self.max_policy_lag
        dropped = self.trainer.buffer.drop_older_than(oldest)
        if dropped:
            self.dropped_stale += dropped
            self.get_logger().debug(f'dropped {dropped} stale step(s) of policy versions < {oldest} '
                                   f'({self.dropped_stale} in total)')

    def buffer_status(self) -> dict[str, object]:
        buffer = self.trainer.buffer
        size = len(buffer)
        return {'buffer_len': size, 'buffer_capacity': (buffer.steps + 1) * len(buffer.sources),
                'new_count': size}

    def node_status(self) -> dict[str, object]:
        return {**super().node_status(), 'dropped_stale': self.dropped_stale,
                'dropped': self.trainer.buffer.dropped, 'max_policy_lag': self.max_policy_lag}


def main(args: list[str] | None = None) -> int:
    return run(PolicyTrainerNode, args)


if __name__ == '__main__':
    sys.exit(main())
