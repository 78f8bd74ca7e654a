"""Time one `train_round()` of each trainer with full default buffers.

    python bench/train_round.py [--presets cpu ami] [--device cpu] [--threads 1]

Buffers are filled to the preset's capacity with random data (content does
not change the cost), then one round runs per trainer; prints a table.
"""

from __future__ import annotations

import argparse
import time

import torch

from ami_ros.core.models import build_models
from ami_ros.core.presets import IMAGE_SHAPE, get_preset
from ami_ros.core.trainers import DynamicsTrainer, PPOTrainer, VAETrainer


def _fill(preset_name: str, device: str) -> list[tuple[str, object]]:
    preset = get_preset(preset_name)
    models = build_models(preset, seed=0)
    gen = torch.Generator().manual_seed(0)
    vae = VAETrainer(models['encoder'], models['decoder'], preset.vae_training, device=device)
    for _ in range(preset.vae_training.buffer_size):
        vae.add(torch.randint(0, 256, IMAGE_SHAPE, dtype=torch.uint8, generator=gen))
    dyn = DynamicsTrainer(models['dynamics'], preset.dynamics_training, device=device)
    hidden_shape = (preset.dynamics.depth, preset.dynamics.dim)
    for _ in range(preset.dynamics_training.buffer_size):
        dyn.add(torch.randn(preset.encoder.latent, generator=gen),
                torch.randn(hidden_shape, generator=gen).to(torch.complex64),
                torch.randint(0, 2, (5,), generator=gen))
    ppo = PPOTrainer(models['policy'], preset.ppo_training, device=device)

    def observation() -> torch.Tensor:  # what the preset's policy sees: the frame or the latent
        if preset.policy.input == 'latent':
            return torch.randn(preset.encoder.latent, generator=gen)
        return torch.randint(0, 256, IMAGE_SHAPE, dtype=torch.uint8, generator=gen)

    for _ in range(preset.ppo_training.steps + 1):
        ppo.add(observation(),
                torch.randint(0, 2, (5,), generator=gen), -torch.rand(5, generator=gen),
                float(torch.randn((), generator=gen)), float(torch.rand((), generator=gen)), 0)
    return [('vae', vae), ('dynamics', dyn), ('ppo', ppo)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--presets', nargs='+', default=['cpu', 'ami'])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s)')
    print(f'{"preset":<8} {"trainer":<9} {"samples":>8} {"batches":>8} {"s/round":>9} {"ms/batch":>9}')
    for name in args.presets:
        for trainer_name, trainer in _fill(name, args.device):
            start = time.perf_counter()
            metrics = trainer.train_round()
            if args.device.startswith('cuda'):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            batches = metrics['batches']
            print(f'{name:<8} {trainer_name:<9} {int(metrics["samples"]):>8} {int(batches):>8} '
                  f'{seconds:>9.2f} {1000 * seconds / max(batches, 1):>9.1f}', flush=True)


if __name__ == '__main__':
    main()
