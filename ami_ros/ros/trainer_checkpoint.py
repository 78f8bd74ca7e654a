"""A trainer node's part of the graph's checkpoints: its trainer's state, buffer and models.

The manager pauses the graph, then calls `<node name>/save_checkpoint`
(`ami_ros/ros/checkpoint_part.py`). A trainer's part, in the checkpoint
directory:

  trainers/<node name>/state.safetensors  envelope 'trainer/<node name>':
                                          model weights, optimiser tensors,
                                          the minibatch generator
  trainers/<node name>/state.json         counters (rounds, version), the
                                          optimiser's non-tensor state
  data/<node name>/buffer.safetensors     envelope 'buffer/<node name>': the
                                          buffer's contents and generator
  data/<node name>/buffer.json            the buffer's counters

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
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ami_ros.core.checkpoint import (
    CheckpointError,
    load_manifest,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from ami_ros.core.envelope import EnvelopeError, specs_of
from ami_ros.core.json_values import plain_json
from ami_ros.core.schemas import weights_schema
from ami_ros.ros.weight_push import WeightPush

if TYPE_CHECKING:
    from ami_ros.ros.managed_node import ManagedNode

# How long a checkpoint save waits for a running training round to end.
SAVE_WAIT_S = 120.0
# Format of the JSON files of a trainer's checkpoint part.
PART_FORMAT = 1


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
        name = node.get_name()
        self.paths = {'state': f'trainers/{name}/state.safetensors',
                      'state_json': f'trainers/{name}/state.json',
                      'buffer': f'data/{name}/buffer.safetensors',
                      'buffer_json': f'data/{name}/buffer.json'}

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
        paths = self.paths
        meta = {'node': name, 'trainer': self.trainer.kind, 'preset': self.preset_name,
                'rounds': int(info['rounds']), 'version': int(info['version'])}
        # JSON first: a failure there leaves no tensor file without its counters.
        state_json = {'format': PART_FORMAT, **meta, 'state': self._plain(info, paths['state_json'])}
        buffer_json = {'format': PART_FORMAT, 'node': name,
                       'state': self._plain(buffer_info, paths['buffer_json'])}
        write_tensors(stage, paths['state'], tensors, f'trainer/{name}', meta)
        write_json(stage, paths['state_json'], state_json)
        write_tensors(stage, paths['buffer'], buffer_tensors, f'buffer/{name}',
                      {'node': name, 'buffer': str(buffer_info.get('kind', ''))})
        write_json(stage, paths['buffer_json'], buffer_json)
        self.node.get_logger().info(f'saved checkpoint part: {meta["rounds"]} rounds, version '
                                    f'{meta["version"]}, buffer {self.buffer_status()["buffer_len"]}')

    @staticmethod
    def _plain(value: Any, relpath: str) -> Any:
        try:
            return plain_json(value, where=relpath)
        except ValueError as exc:
            raise CheckpointError(f'cannot save {exc}') from None

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

    @staticmethod
    def _state_of(ckpt: Path, relpath: str) -> dict[str, Any]:
        data = read_json(ckpt, relpath)
        if not isinstance(data, dict) or not isinstance(data.get('state'), dict):
            raise CheckpointError(f'checkpoint {ckpt}: {relpath} is damaged (no "state" object); '
                                  'use another checkpoint')
        if data.get('format') != PART_FORMAT:
            raise CheckpointError(f'checkpoint {ckpt}: {relpath} has format {data.get("format")!r}, '
                                  f'this ami_ros reads {PART_FORMAT}; use another checkpoint')
        return data['state']

    def _restore_trainer(self, ckpt: Path) -> None:
        name = self.node.get_name()
        paths = self.paths
        state = read_tensors(ckpt, paths['state'], f'trainer/{name}')
        info = self._state_of(ckpt, paths['state_json'])
        buffer = read_tensors(ckpt, paths['buffer'], f'buffer/{name}')
        buffer_info = self._state_of(ckpt, paths['buffer_json'])
        for relpath, load in ((paths['state'], lambda: self.trainer.load_state_dict(state.tensors, info)),
                              (paths['buffer'], lambda: self.trainer.buffer.load_state_dict(
                                  dict(buffer.tensors), buffer_info))):
            try:
                load()
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise CheckpointError(f'checkpoint {ckpt}: {relpath} does not fit this {name} '
                                      f'({type(exc).__name__}: {exc}); use another checkpoint') from exc

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
