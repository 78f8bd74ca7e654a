"""A trainer node's part of the graph's checkpoints: its trainer's state, buffer and models.

The manager pauses the graph, then calls `<node name>/save_checkpoint`
(`ami_ros/ros/checkpoint_part.py`). A trainer's part, in the checkpoint
directory (trainers/<node name>/, data/<node name>/), is written and read by
`ami_ros/core/trainer_part.py`, which has its layout.

A save waits (up to SAVE_WAIT_S) for a running round to end, so the state is
never caught half-way through one; it is taken while no round runs and the
executor delivers no data. At start with `checkpoint:=<dir>` the node
restores all of it before its training thread starts and before it
subscribes; a missing or damaged file, or one that does not fit this
trainer, refuses the start with one line naming it. The weights go to the
agent again on activation unless the checkpoint's models/ already hold
exactly them. A checkpoint without this trainer's part (saved while it did
not run) starts it with an empty buffer and a fresh optimiser, from the
agent's saved weights in models/<model>.safetensors and their version when
those are there (else from the seed weights, version 0), with a warning.

Several agents: each agent's buffer is restored where this trainer learns
from the same agent namespace (core/source_buffers.py); an agent of ours
absent from the checkpoint starts empty, and one we do not learn from is
left out with a log line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ami_ros.core.checkpoint import CheckpointError, load_manifest, read_tensors
from ami_ros.core.envelope import EnvelopeError, specs_of
from ami_ros.core.schemas import weights_schema
from ami_ros.core.trainer_part import read_trainer_part, trainer_part_paths, write_trainer_part
from ami_ros.ros.weight_push import WeightPush

if TYPE_CHECKING:
    from ami_ros.ros.managed_node import ManagedNode

# How long a checkpoint save waits for a running training round to end.
SAVE_WAIT_S = 120.0


class TrainerCheckpoint:
    """Saves and restores the part of `node`, whose `trainer` trains under `round_lock`.

    `restored_part` says what a restore found: 'trainer' (the whole part),
    'models' (the agent's weights only), 'none' (neither), '' (no restore).
    """

    def __init__(self, node: ManagedNode, trainer: Any, preset_name: str, push: WeightPush,
                 round_lock: threading.Lock, buffer_status: Callable[[], dict[str, object]]) -> None:
        self.node = node
        self.trainer = trainer
        self.preset_name = preset_name
        self.push = push
        self.round_lock = round_lock
        self.buffer_status = buffer_status
        self.restored_part = ''
        self.paths = trainer_part_paths(node.get_name())

    def save(self, stage: Path) -> None:
        """Write this trainer's part into the staging directory `stage`.

        The state is taken while no round runs (waiting up to SAVE_WAIT_S for
        one to end) on the executor, so no data arrives meanwhile either; the
        files are written afterwards from those copies.
        """
        name = self.node.get_name()
        if not self.round_lock.acquire(timeout=SAVE_WAIT_S):
            raise CheckpointError(f'{name}: a training round did not finish within {SAVE_WAIT_S:g} s; '
                                  'its part was not saved (try again later)')
        try:
            tensors, info = self.trainer.state_dict()
            buffer_tensors, buffer_info = self.trainer.buffer.state_dict()
        finally:
            self.round_lock.release()
        meta = write_trainer_part(stage, name, self.trainer.kind, self.preset_name,
                                  (tensors, info), (buffer_tensors, buffer_info))
        self.node.get_logger().info(f'saved checkpoint part: {meta["rounds"]} rounds, version '
                                    f'{meta["version"]}, buffer {self.buffer_status()["buffer_len"]}')

    def restore(self, ckpt: Path) -> None:
        """Restore from checkpoint `ckpt` (its manifest is already checked); see the module doc."""
        name = self.node.get_name()
        files = load_manifest(ckpt)['files']
        if any(rel.startswith((f'trainers/{name}/', f'data/{name}/')) for rel in files):
            self._restore_trainer(ckpt)
            self._queue_restored_weights(ckpt, files)
            self.restored_part = 'trainer'
        else:
            self.restored_part = self._restore_models(ckpt, files)
        self.node.get_logger().info(
            f'restored ({self.restored_part}): {self.trainer.rounds} rounds, version '
            f'{self.trainer.version}, buffer {self.buffer_status()["buffer_len"]}')

    def _restore_trainer(self, ckpt: Path) -> None:
        name = self.node.get_name()
        paths = self.paths
        (state, info), (buffer, buffer_info) = read_trainer_part(ckpt, name)
        ignored: list[str] = []
        for relpath, load in ((paths['state'], lambda: self.trainer.load_state_dict(state, info)),
                              (paths['buffer'], lambda: ignored.extend(self.trainer.buffer.load_state_dict(
                                  buffer, buffer_info) or ()))):
            try:
                load()
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise CheckpointError(f'checkpoint {ckpt}: {relpath} does not fit this {name} '
                                      f'({type(exc).__name__}: {exc}); use another checkpoint') from exc
        if ignored:
            self.node.get_logger().info(
                f'checkpoint {ckpt}: left out the saved experience of agent(s) '
                f'{", ".join(repr(s) for s in ignored)}, which this {name} does not learn from')

    def _read_models(self, ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
        """The agent's saved weights of the pushed models, checked against ours, and their versions."""
        weights, versions = {}, {}
        for model in self.push.models:
            relpath = f'models/{model}.safetensors'
            env = read_tensors(ckpt, relpath, weights_schema(model),
                               specs_of(self.trainer.models[model].state_dict()))
            try:
                versions[model] = env.int_meta('version', 0)
            except EnvelopeError as exc:
                raise CheckpointError(f'checkpoint {ckpt}: {relpath} cannot be used ({exc}); '
                                      'use another checkpoint') from None
            weights[model] = env.tensors
        return weights, versions

    def _restore_models(self, ckpt: Path, files: dict[str, Any]) -> str:
        """No part of ours: start from the agent's saved weights if there are any."""
        name = self.node.get_name()
        models = self.push.models
        missing = f'holds no {name} part (trainers/{name}/, data/{name}/; saved without this trainer?)'
        if not any(f'models/{model}.safetensors' in files for model in models):
            self.node.get_logger().warning(
                f'checkpoint {ckpt} {missing} and no models/ weights of {", ".join(models)}: '
                'starting fresh from the seed weights, version 0')
            return 'none'
        weights, versions = self._read_models(ckpt)  # all of them: a missing one names its file
        self.trainer.load_weights(weights)
        self.trainer.version = max(versions.values())
        self.node.get_logger().warning(
            f'checkpoint {ckpt} {missing}: starting with an empty buffer and a fresh optimiser from '
            f'the saved weights of {", ".join(models)}, version {self.trainer.version}')
        return 'models'

    def _queue_restored_weights(self, ckpt: Path, files: dict[str, Any]) -> None:
        """Push the restored weights on activation unless the agent restores exactly them.

        A round's weights may still have been waiting for the agent when the
        checkpoint was taken (or the agent's part may be missing).
        """
        if self.trainer.version == 0:
            return  # the seed weights, which the agent holds too
        ours = self.trainer.weights()
        models = self.push.models
        if all(f'models/{model}.safetensors' in files for model in models):
            try:
                theirs, _ = self._read_models(ckpt)
            except CheckpointError:
                theirs = {}  # the agent's part is its own business: just send ours
            if theirs and all(
                    set(theirs[m]) == set(ours[m]) and all(torch.equal(theirs[m][k], ours[m][k])
                                                           for k in ours[m])
                    for m in models):
                return
        self.push.offer(self.push.encode(int(self.trainer.version), ours))
