"""Benchmark: the main job for a long run. Does memory creep, are steps missed, does disk stay bounded?

Runs `ami-ros launch world:=doom` (the README's main job) for `--minutes`, with
periodic checkpoints every `--checkpoint-interval` seconds and `--keep-last`
retention, and the world sped up by `--time-scale` where the machine keeps up.
Every `--sample` seconds it records each node's resident memory (RSS, from
/proc through psutil) and the world's and the agent's step counters from
/diagnostics. At the end it prints, per node, the RSS at start and end and
its slope (least squares, MiB per hour: after the first 10% of the run, and
over the second half, once the trainers' buffers have filled), the steps
the world made against the steps the agent took from its first step on (the
difference is missed steps), the disk the checkpoints use against what
retention allows (keep_last + 1 of the largest checkpoint: one may be being
written), and the restarts the launcher reported.

    .venv/bin/python bench/soak.py [--minutes 60] [--time-scale 1] [--checkpoint-interval 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from graph_probe import GraphProbe, bench_run_directory, node_processes

ROOT = Path(__file__).resolve().parent.parent


class Counter:
    """A cumulative counter that may restart from 0 (a respawned node): the total of its increases."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.total = 0.0

    def see(self, value: float | None) -> None:
        if value is None:
            return
        if self.last is not None:
            self.total += value - self.last if value >= self.last else value
        self.last = value


def node_rss(launcher_pid: int) -> dict[str, float]:
    """MiB resident per node process started by the launcher, keyed by node name."""
    rss = {}
    for name, proc in node_processes(launcher_pid).items():
        try:
            rss[name] = proc.memory_info().rss / 2**20
        except psutil.Error:  # it just ended (a respawn)
            continue
    return rss


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return float('nan')
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return float('nan') if var == 0 else 3600 * sum((t - mt) * (v - mv) for t, v in points) / var


def directory_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20 if path.exists() else 0.0


def largest_checkpoint_mib(path: Path) -> float:
    sizes = [directory_mib(d) for d in path.iterdir() if d.is_dir()] if path.exists() else []
    return max(sizes, default=0.0)


def params_file(out: Path, time_scale: float, interval: float, keep_last: int) -> Path:
    params = yaml.safe_load((ROOT / 'config' / 'ami.yaml').read_text())
    params['/**/doom_world']['ros__parameters']['time_scale'] = time_scale
    manager = params.setdefault('/**/manager', {}).setdefault('ros__parameters', {})
    manager.update(checkpoint_interval=interval, keep_last=keep_last)
    path = out / 'soak.yaml'
    path.write_text(yaml.safe_dump(params))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--minutes', type=float, default=60.0)
    parser.add_argument('--time-scale', type=float, default=1.0)
    parser.add_argument('--checkpoint-interval', type=float, default=300.0)
    parser.add_argument('--keep-last', type=int, default=3)
    parser.add_argument('--sample', type=float, default=60.0, help='seconds between samples')
    parser.add_argument('--preset', default='cpu')
    parser.add_argument('--out', type=Path, help='keep the run here (default: a temporary directory)')
    args = parser.parse_args()
    out = bench_run_directory(args.out, 'ami_soak_')
    checkpoints = out / 'checkpoints'
    cmd = [str(ROOT / '.venv' / 'bin' / 'ami-ros'), 'launch', 'world:=doom', f'preset:={args.preset}',
           f'checkpoint_dir:={checkpoints}', 'web_api_port:=0',
           f'params_file:={params_file(out, args.time_scale, args.checkpoint_interval, args.keep_last)}',
           f'duration:={args.minutes * 60:g}']
    print(f'# soak: {args.minutes:g} min, time_scale {args.time_scale:g}, checkpoints every '
          f'{args.checkpoint_interval:g} s keep {args.keep_last}; {platform.machine()}, '
          f'{os.cpu_count()} cores; log {out / "launch.log"}', flush=True)
    log = open(out / 'launch.log', 'wb')
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out, start_new_session=True,
                                env={**os.environ, 'MLFLOW_TRACKING_URI': f'file://{out / "mlruns"}'})
    diag = GraphProbe('soak_probe')
    samples: dict[str, list[tuple[float, float]]] = {}
    world, agent = Counter(), Counter()
    max_disk = 0.0
    started = time.monotonic()
    try:
        while launcher.poll() is None:
            time.sleep(min(args.sample, 5.0) if time.monotonic() - started < 30 else args.sample)
            elapsed = time.monotonic() - started
            for name, mib in node_rss(launcher.pid).items():
                samples.setdefault(name, []).append((elapsed, mib))
            acted = diag.number('agent', 'steps')
            if agent.last is not None or (acted or 0) > 0:  # count from the agent's first step on
                world.see(diag.number('doom_world', 'steps'))
                agent.see(acted)
            max_disk = max(max_disk, directory_mib(checkpoints))
            print(f'{elapsed / 60:6.1f} min  world {world.total:8.0f}  agent {agent.total:8.0f}  '
                  f'checkpoints {directory_mib(checkpoints):7.1f} MiB  '
                  + ' '.join(f'{n}={s[-1][1]:.0f}' for n, s in sorted(samples.items())), flush=True)
    except KeyboardInterrupt:
        os.killpg(launcher.pid, signal.SIGINT)
    finally:
        code = launcher.wait()
        diag.close()
        log.close()
    text = (out / 'launch.log').read_text(errors='replace')
    restarts = len(re.findall(r'\[launch\] restarting', text))
    allowed = (args.keep_last + 1) * largest_checkpoint_mib(checkpoints)
    print(f'\n## soak: {(time.monotonic() - started) / 60:.1f} min, launcher exit {code}')
    # The trainers' buffers fill up for a while (bounded by their capacity): the second half's slope
    # tells a creep from a fill.
    print('| node | RSS start MiB | RSS end MiB | slope MiB/h after 10% | slope MiB/h, second half |')
    print('|---|---|---|---|---|')
    for name, points in sorted(samples.items()):
        end = points[-1][0]
        warm = [p for p in points if p[0] >= 0.1 * end]
        late = [p for p in points if p[0] >= 0.5 * end]
        print(f'| {name} | {points[0][1]:.0f} | {points[-1][1]:.0f} | {slope_per_hour(warm):+.1f} | '
              f'{slope_per_hour(late):+.1f} |')
    print(f'\nworld steps {world.total:.0f}, agent steps {agent.total:.0f}, missed '
          f'{max(0.0, world.total - agent.total):.0f} (sampled once a minute: the last minute may differ)')
    print(f'checkpoints: peak {max_disk:.1f} MiB, retention allows {allowed:.1f} MiB '
          f'(keep_last {args.keep_last} + 1 being written); restarts {restarts}')
    return code


if __name__ == '__main__':
    sys.exit(main())
