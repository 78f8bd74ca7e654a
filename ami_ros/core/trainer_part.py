"""A trainer's part of a checkpoint (no ROS): its state and its buffer, under its node's name.

  trainers/<name>/state.safetensors  envelope 'trainer/<name>': model weights,
                                     optimiser tensors, the minibatch generator
  trainers/<name>/state.json         counters (rounds, version), the optimiser's
                                     non-tensor state
  data/<name>/buffer.safetensors     envelope 'buffer/<name>': the buffer's
                                     contents and generator
  data/<name>/buffer.json            the buffer's counters

The trainer nodes write and restore it (`ami_ros/ros/trainer_checkpoint.py`)
and offline training writes it (`ami_ros/offline/`), so a graph started
from an offline checkpoint carries on with the trainers' optimisers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ami_ros.core.checkpoint import CheckpointError, read_json, read_tensors, write_json, write_tensors
from ami_ros.core.json_values import plain_json

# Format of the JSON files of a trainer's checkpoint part.
PART_FORMAT = 1

# (tensors, JSON-able info), as a trainer's and a buffer's state_dict() give them.
PartState = tuple[dict[str, Tensor], dict[str, Any]]


def trainer_part_paths(name: str) -> dict[str, str]:
    """The four files of the part of the trainer node called `name`."""
    return {'state': f'trainers/{name}/state.safetensors',
            'state_json': f'trainers/{name}/state.json',
            'buffer': f'data/{name}/buffer.safetensors',
            'buffer_json': f'data/{name}/buffer.json'}


def _plain(value: Any, relpath: str) -> Any:
    try:
        return plain_json(value, where=relpath)
    except ValueError as exc:
        raise CheckpointError(f'cannot save {exc}') from None


def write_trainer_part(stage: str | os.PathLike[str], name: str, kind: str, preset_name: str,
                       state: PartState, buffer_state: PartState) -> dict[str, Any]:
    """Write the part of trainer node `name` (trainer `kind`) into a staging directory.

    `state` is the trainer's state_dict(), `buffer_state` its buffer's.
    Returns the metadata written with it (node, trainer, preset, rounds, version).
    """
    tensors, info = state
    buffer_tensors, buffer_info = buffer_state
    paths = trainer_part_paths(name)
    meta = {'node': name, 'trainer': kind, 'preset': preset_name,
            'rounds': int(info['rounds']), 'version': int(info['version'])}
    # JSON first: a failure there leaves no tensor file without its counters.
    state_json = {'format': PART_FORMAT, **meta, 'state': _plain(info, paths['state_json'])}
    buffer_json = {'format': PART_FORMAT, 'node': name,
                   'state': _plain(buffer_info, paths['buffer_json'])}
    write_tensors(stage, paths['state'], tensors, f'trainer/{name}', meta)
    write_json(stage, paths['state_json'], state_json)
    write_tensors(stage, paths['buffer'], buffer_tensors, f'buffer/{name}',
                  {'node': name, 'buffer': str(buffer_info.get('kind', ''))})
    write_json(stage, paths['buffer_json'], buffer_json)
    return meta


def _state_of(ckpt: Path, relpath: str) -> dict[str, Any]:
    data = read_json(ckpt, relpath)
    if not isinstance(data, dict) or not isinstance(data.get('state'), dict):
        raise CheckpointError(f'checkpoint {ckpt}: {relpath} is damaged (no "state" object); '
                              'use another checkpoint')
    if data.get('format') != PART_FORMAT:
        raise CheckpointError(f'checkpoint {ckpt}: {relpath} has format {data.get("format")!r}, '
                              f'this ami_ros reads {PART_FORMAT}; use another checkpoint')
    return data['state']


def read_trainer_part(ckpt: str | os.PathLike[str], name: str) -> tuple[PartState, PartState]:
    """The (trainer state, buffer state) of trainer node `name` in checkpoint `ckpt`,
    checked as files; whether they fit a trainer is for its load_state_dict to say."""
    ckpt = Path(ckpt)
    paths = trainer_part_paths(name)
    state = read_tensors(ckpt, paths['state'], f'trainer/{name}')
    info = _state_of(ckpt, paths['state_json'])
    buffer = read_tensors(ckpt, paths['buffer'], f'buffer/{name}')
    buffer_info = _state_of(ckpt, paths['buffer_json'])
    return (dict(state.tensors), info), (dict(buffer.tensors), buffer_info)
