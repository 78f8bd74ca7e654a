"""Benchmark: does training slow the acting agent down? Ours vs one process.

(1) ami_ros: the agent, the OSC bridge and the three trainer nodes as
    separate processes (trainers niced, one torch thread each), frames at
    10 Hz from this script; the trainers train continuously (small min_new).
(2) The reference design: the same agent loop and the same three trainers as
    threads of ONE process, sharing its interpreter.
(3) Design (2) once more with its trainer threads paused around the agent's
    steps the way ours are (ros/pacing.py): the process layout's own share
    of the difference.
With `--pacing on off`, design (1) runs once with the trainer nodes' pacing
on (their default on a CPU) and once with it off, back to back.
All print the agent's step latency p50/p99/max and missed steps while all
three trainers train, and the ratio of the p99s. In both the action leaves
as soon as the policy has chosen it (`CuriosityAgent.step(on_action=...)`).
Ours is measured end to end (frame stamp -> the Joy received back here: DDS
both ways) and agent-side (frame stamp -> action published, which still
includes the frame's DDS hop), and the agent's step alone (frame received ->
action published, as the one-process loop measures it); the one-process loop
from the frame's due time to the action chosen, with no transport at all.

    .venv/bin/python bench/training_interference.py [--presets cpu ami] [--seconds 60] [--pacing on off]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from acting_latency import Chain

from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.models import build_models
from ami_ros.core.observation import to_uint8_chw
from ami_ros.core.presets import get_preset, with_overrides
from ami_ros.core.timing import percentile
from ami_ros.core.trainers import DynamicsTrainer, PPOTrainer, VAETrainer
from ami_ros.ros.pacing import DEFAULT_GUARD_MS, DEFAULT_QUIET_MS, FrameRhythm, TrainerPacing

TRAINERS = ('vae_trainer', 'dynamics_trainer', 'policy_trainer')


def _summary(latencies: list[float], frames: int, answered: int, rounds: dict[str, int]) -> str:
    lat = sorted(latencies)
    return (f'p50 {percentile(lat, 0.5):6.2f} ms  p99 {percentile(lat, 0.99):7.2f} ms  '
            f'max {lat[-1]:7.2f} ms  missed {frames - answered}/{frames}  rounds '
            + ' '.join(f'{k.split("_")[0]}={v}' for k, v in rounds.items()))


def run_processes(preset: str, seconds: float, min_new: int, max_batches: int,
                  nice: int, cpus: str, quiet_ms: int, guard_ms: int, pacing: str
                  ) -> tuple[float, float, float, str]:
    """p99 end to end, agent-side and of the agent's step alone (ms), and a summary."""
    with tempfile.TemporaryDirectory() as tmp:
        params = {'preset': preset, 'min_new': min_new, 'max_batches': max_batches, 'nice': nice,
                  'cpus': cpus, 'quiet_ms': quiet_ms, 'guard_ms': guard_ms,
                  'pacing': pacing}
        # The agent's latency percentiles over exactly the measured steps,
        # like the one-process loop's (not the warm-up's, trainers starting).
        measured = int(round(seconds * 10))
        chain = Chain(preset, Path(tmp), extra_nodes=tuple((t, dict(params)) for t in TRAINERS),
                      agent_params={'latency_window': measured})
        try:
            chain.wait_ready()
            # Warm up at the measured rate: the trainers fill their first
            # rounds' data and start training back to back.
            chain.run(10.0, 10.0)
            r = chain.run(10.0, seconds)
            time.sleep(1.5)  # the agent's /diagnostics after the run (1 Hz)
            lat = sorted(chain.latencies)
            rounds = {t: int(chain.diag.get(t, {}).get('rounds', 0)) for t in TRAINERS}
            text = _summary(lat, r['frames'], r['answered'], rounds)
            agent = {k: float(v) for k, v in chain.agent_diag.items()
                     if k.startswith(('latency_', 'step_'))}
            for what, key in (('agent-side (frame stamp -> action published', 'latency'),
                              ("the agent's step alone (frame received -> action published",
                               'step')):
                text += (f'\n    {what}, the {measured} measured steps): '
                         f'p50 {agent.get(key + "_p50_ms", math.nan):.2f} ms  '
                         f'p99 {agent.get(key + "_p99_ms", math.nan):.2f} ms  '
                         f'max {agent.get(key + "_max_ms", math.nan):.2f} ms')
            return (r['p99'], agent.get('latency_p99_ms', math.nan),
                    agent.get('step_p99_ms', math.nan), text)
        finally:
            chain.close()


def run_threads(preset_name: str, seconds: float, min_new: int, max_batches: int,
                paced: bool = False, quiet_ms: int = DEFAULT_QUIET_MS,
                guard_ms: int = DEFAULT_GUARD_MS) -> tuple[float, str]:
    """The reference system's design: agent and trainers as threads of one process.

    `paced`: the trainer threads pause around the agent's steps as ami_ros's
    trainer nodes do (the same pacing, fed the frames' due times).
    """
    torch.set_num_threads(1)
    preset = get_preset(preset_name)
    preset = with_overrides(preset, vae_training={'min_new': min_new},
                            dynamics_training={'min_new': min_new},
                            ppo_training={'steps': max(min_new, 8)})
    agent = CuriosityAgent(preset)
    models = build_models(preset, seed=0)
    trainers = {
        'vae_trainer': VAETrainer(models['encoder'], models['decoder'], preset.vae_training),
        'dynamics_trainer': DynamicsTrainer(models['dynamics'], preset.dynamics_training),
        'policy_trainer': PPOTrainer(models['policy'], preset.ppo_training),
    }
    rhythm = FrameRhythm(quiet_ms / 1000.0, guard_ms / 1000.0, clock=time.perf_counter)
    pacing = TrainerPacing(rhythm if paced else None)
    for trainer in trainers.values():
        if hasattr(trainer, 'max_batches'):
            trainer.max_batches = max_batches
        if paced:
            pacing.attach(trainer, lambda _site: None)
    stop = threading.Event()
    rounds = dict.fromkeys(trainers, 0)

    def train(name: str) -> None:
        trainer = trainers[name]
        while not stop.is_set():
            if trainer.ready():
                trainer.train_round()
                rounds[name] += 1
                # Sync as the reference did: copy the new weights into the acting models.
                for model, state in trainer.weights().items():
                    agent.models[model].load_state_dict(state)
            else:
                stop.wait(0.05)

    threads = [threading.Thread(target=train, args=(n,), daemon=True) for n in trainers]
    for t in threads:
        t.start()
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (84, 84, 3), dtype=np.uint8) for _ in range(16)]
    latencies: list[float] = []
    n = int(seconds * 10)
    warmup = 50
    start = time.perf_counter()
    answered = 0
    acted: list[float] = []

    def on_action(_) -> None:
        acted.append(time.perf_counter())

    for i in range(n + warmup):
        target = start + i * 0.1
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif i >= warmup and -delay > 0.1:
            continue  # the frame slot passed while the agent was stuck: a missed step
        rhythm.frame(target)
        rgb = frames[i % len(frames)]
        # The same step as the agent node's: the action is out once the policy chose it.
        acted.clear()
        step = agent.step(rgb, on_action=on_action)
        if i >= warmup:
            latencies.append((acted[0] - target) * 1000)
            answered += 1
        obs = to_uint8_chw(rgb)
        trainers['vae_trainer'].add(obs)
        trainers['dynamics_trainer'].add(step.latent, step.hidden, step.action)
        trainers['policy_trainer'].add(obs, step.action, step.log_prob, step.value,
                                       0.0 if np.isnan(step.reward) else step.reward,
                                       step.versions['policy'])
    stop.set()
    for t in threads:
        t.join(timeout=120)
    lat = sorted(latencies)
    return percentile(lat, 0.99), _summary(lat, n, answered, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--presets', nargs='+', default=['cpu', 'ami'])
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--min-new', type=int, default=32, help='new samples per round')
    parser.add_argument('--max-batches', type=int, default=16, help='minibatches per epoch')
    parser.add_argument('--nice', type=int, default=19, help="the trainer nodes' nice parameter")
    parser.add_argument('--pacing', nargs='+', default=['on'], choices=['on', 'off'],
                        help="the trainer nodes' pacing, one run of design (1) each")
    parser.add_argument('--one-process', default='yes', choices=['yes', 'no'],
                        help='also run designs (2) and (3)')
    parser.add_argument('--quiet-ms', type=int, default=DEFAULT_QUIET_MS,
                        help="the trainer nodes' quiet_ms parameter")
    parser.add_argument('--guard-ms', type=int, default=DEFAULT_GUARD_MS,
                        help="the trainer nodes' guard_ms parameter")
    parser.add_argument('--trainer-cpus', default='',
                        help="the trainer nodes' cpus parameter, e.g. '1' ('' = all)")
    args = parser.parse_args()
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; '
          f'{args.seconds:g}s at 10 Hz per run; trainers: min_new {args.min_new}, '
          f'max_batches {args.max_batches}, nice {args.nice}, cpus {args.trainer_cpus or "all"}, '
          f'quiet_ms {args.quiet_ms}, guard_ms {args.guard_ms}')
    for preset in args.presets:
        ours = {}
        for pacing in args.pacing:
            ours[pacing] = run_processes(preset, args.seconds, args.min_new, args.max_batches, args.nice,
                                         args.trainer_cpus, args.quiet_ms, args.guard_ms, pacing)
            print(f'[{preset}] ami_ros (processes), pacing {pacing}, frame stamp -> action received '
                  f'back: {ours[pacing][3]}', flush=True)
        if args.one_process == 'no':
            continue
        theirs, theirs_text = run_threads(preset, args.seconds, args.min_new, args.max_batches)
        print(f'[{preset}] one process (threads), frame due -> action chosen: {theirs_text}')
        paced, paced_text = run_threads(preset, args.seconds, args.min_new, args.max_batches, True,
                                        args.quiet_ms, args.guard_ms)
        print(f'[{preset}] one process, trainer threads paused around the steps like ours: '
              f'{paced_text}')
        for pacing, (end_to_end, inside, step, _) in ours.items():
            print(f'[{preset}] p99 ratio ours (pacing {pacing}) / one process: '
                  f'{end_to_end / theirs:.2f} end to end, {inside / theirs:.2f} agent-side, '
                  f'{step / theirs:.2f} the step alone; / paced one process: '
                  f'{end_to_end / paced:.2f}, {inside / paced:.2f}, {step / paced:.2f}', flush=True)


if __name__ == '__main__':
    main()
