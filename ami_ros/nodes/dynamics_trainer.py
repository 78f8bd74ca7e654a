"""dynamics_trainer: trains the forward dynamics on the agent's experience.

Subscribes (for each agent of `agents`, `<agent>/experience`):
  experience            std_msgs/UInt8MultiArray, one envelope per agent step
                        (ami_ros/core/schemas.py): latent z_t, hidden h_t and
                        action a_t go into the time-ordered dynamics buffer.
                        A break in time (the agent's continues=False, or a
                        step number that does not follow) starts a new
                        sequence, so no training chunk spans it; each
                        agent's steps are kept apart (the preset's
                        buffer_size shared evenly among them). Messages of
                        another preset or damaged ones are dropped with a
                        throttled warning naming the reason.
Calls:
  agent/sync_weights    rcl_interfaces/srv/SetParameters: 'dynamics' after
                        each round (each agent's)
Publishes:
  /diagnostics          see ami_ros/ros/trainer_node.py; plus received,
                        undecodable, gaps, and received/<agent> with several agents

Parameters: those of every trainer node (ami_ros/ros/trainer_node.py),
max_batches included; min_new overrides the preset's
dynamics_training.min_new (new steps before a round).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ami_ros.core.presets import Preset
from ami_ros.core.schemas import ExperienceStep
from ami_ros.core.trainers import DEFAULT_MAX_BATCHES, DynamicsTrainer
from ami_ros.ros.managed_node import run
from ami_ros.ros.trainer_node import ExperienceTrainerNode


class DynamicsTrainerNode(ExperienceTrainerNode):
    pushed_models = ('dynamics',)
    min_new_field = ('dynamics_training', 'min_new')
    caps_batches = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('dynamics_trainer', **kwargs)

    def make_trainer(self, preset: Preset, models: dict[str, nn.Module], device: str, seed: int,
                     max_batches: int, sources: tuple[str, ...]) -> DynamicsTrainer:
        return DynamicsTrainer(models['dynamics'], preset.dynamics_training, device=device,
                               seed=seed, max_batches=max_batches or DEFAULT_MAX_BATCHES, sources=sources)

    def add_step(self, step: ExperienceStep, follows: bool, source: str = '') -> None:
        self.trainer.add(step.latent, step.hidden, step.action, continues=follows, source=source)

    def buffer_status(self) -> dict[str, object]:
        buffer = self.trainer.buffer
        return {'buffer_len': len(buffer), 'buffer_capacity': buffer.capacity,
                'new_count': buffer.new_count}


def main(args: list[str] | None = None) -> int:
    return run(DynamicsTrainerNode, args)


if __name__ == '__main__':
    sys.exit(main())
