"""Benchmark: time to save and to restore a whole-graph checkpoint, full buffers.

ROS-free, in this process, with the same files the nodes write: the agent's
part (models, hidden and sampling state) and each trainer's state and full
buffer (filled to the preset's capacity with random data), then
commit_checkpoint (manifest with sha256 of every file) and, for restore,
load_manifest with hash verification plus loading every part. In the running
graph the manager pauses it for the save, so no agent step happens during
one: the save time is how long acting stops.

    .venv/bin/python bench/checkpoint_io.py [--presets cpu ami]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    load_manifest,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from ami_ros.core.models import build_models
from ami_ros.core.presets import IMAGE_SHAPE, get_preset
from ami_ros.core.trainers import DynamicsTrainer, PPOTrainer, VAETrainer


def full_trainers(preset_name: str) -> dict[str, object]:
    preset = get_preset(preset_name)
    models = build_models(preset, seed=0)
    gen = torch.Generator().manual_seed(0)
    vae = VAETrainer(models['encoder'], models['decoder'], preset.vae_training)
    for _ in range(preset.vae_training.buffer_size):
        vae.add(torch.randint(0, 256, IMAGE_SHAPE, dtype=torch.uint8, generator=gen))
    dyn = DynamicsTrainer(models['dynamics'], preset.dynamics_training)
    for _ in range(preset.dynamics_training.buffer_size):
        dyn.add(torch.randn(preset.encoder.latent, generator=gen),
                torch.randn(preset.dynamics.depth, preset.dynamics.dim, dtype=torch.complex64),
                torch.zeros(5, dtype=torch.long))
    ppo = PPOTrainer(models['policy'], preset.ppo_training)
    for _ in range(preset.ppo_training.steps + 1):
        ppo.add(torch.randint(0, 256, IMAGE_SHAPE, dtype=torch.uint8, generator=gen),
                torch.zeros(5, dtype=torch.long), torch.zeros(5), 0.0, 0.0, 0)
    return {'vae_trainer': vae, 'dynamics_trainer': dyn, 'policy_trainer': ppo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--presets', nargs='+', default=['cpu', 'ami'])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores')
    for preset in args.presets:
        agent = CuriosityAgent(preset)
        trainers = full_trainers(preset)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            stage = begin_checkpoint(tmp)
            agent.save_checkpoint(stage)
            for name, trainer in trainers.items():
                tensors, info = trainer.state_dict()
                write_tensors(stage, f'trainers/{name}/state.safetensors', tensors, f'trainer/{name}')
                write_json(stage, f'trainers/{name}/state.json', info)
                tensors, info = trainer.buffer.state_dict()
                write_tensors(stage, f'data/{name}/buffer.safetensors', tensors, f'buffer/{name}')
                write_json(stage, f'data/{name}/buffer.json', info)
            path = commit_checkpoint(stage, {'preset': preset})
            saved = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file())
            t0 = time.perf_counter()
            load_manifest(path, expected_preset=preset, verify=True)
            CuriosityAgent(preset).load_checkpoint(path)
            for name, trainer in trainers.items():
                state = read_tensors(path, f'trainers/{name}/state.safetensors', f'trainer/{name}')
                trainer.load_state_dict(state.tensors, read_json(path, f'trainers/{name}/state.json'))
                buf = read_tensors(path, f'data/{name}/buffer.safetensors', f'buffer/{name}')
                trainer.buffer.load_state_dict(buf.tensors, read_json(path, f'data/{name}/buffer.json'))
            restored = time.perf_counter() - t0
            print(f'[{preset}] checkpoint {size / 1e6:7.1f} MB: save {saved:6.2f} s (the graph is '
                  f'paused meanwhile), restore {restored:6.2f} s (hashes verified)')


if __name__ == '__main__':
    main()
