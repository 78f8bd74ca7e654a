"""`ami-ros train --bag BAG [BAG ...] -o OUT`: learn offline from recorded experience.

The VAE trains on every recorded frame, the forward dynamics on the recorded
sequences of frames and actions, and with --imitate the policy clones the
recorded actions (ami_ros/offline/). OUT is the checkpoint directory itself,
written atomically at the end: `ami-ros launch checkpoint:=OUT` starts from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

COMMAND = ('train',)
HELP = 'train the models offline from recorded bags into a checkpoint (ami-ros launch checkpoint:=OUT)'
PROG = 'ami-ros train'
# Batch metrics buffered for MLflow before a write.
FLUSH_EVERY = 5000
STATUS_HZ = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ami_ros.core.presets import DEFAULT_PRESET, PRESETS
    from ami_ros.offline.samples import DEFAULT_ACTION_TOPIC, DEFAULT_IMAGE_TOPIC

    parser.add_argument('--bag', nargs='+', required=True, metavar='BAG',
                        help='bags to learn from: directories (mcap or sqlite3) or single .mcap/.db3 files')
    parser.add_argument('-o', '--output', required=True, metavar='OUT',
                        help='the checkpoint directory to write (must not exist yet)')
    parser.add_argument('--preset', default=DEFAULT_PRESET, choices=list(PRESETS),
                        help=f'model sizes, as the graph runs them (default {DEFAULT_PRESET})')
    parser.add_argument('--from', dest='start', metavar='CHECKPOINT',
                        help="start from this checkpoint's models (a directory, a name in "
                             '--checkpoint-dir, or latest); default: fresh models')
    parser.add_argument('--checkpoint-dir', default='checkpoints',
                        help='where --from looks up names and latest (default checkpoints)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (default cpu)')
    parser.add_argument('--epochs', type=int, default=3, help='passes over the bags (default 3)')
    parser.add_argument('--batch-size', type=int, default=32, help='minibatch size (default 32)')
    parser.add_argument('--shuffle-window', type=int, default=2048,
                        help='frames held per model for shuffling; bounds memory (default 2048)')
    parser.add_argument('--image-topic', default=None,
                        help=f'camera topic, Image or CompressedImage (default {DEFAULT_IMAGE_TOPIC}, '
                             'under any namespace)')
    parser.add_argument('--action-topic', default=None,
                        help=f'sensor_msgs/Joy actions (default {DEFAULT_ACTION_TOPIC}, under any namespace)')
    parser.add_argument('--imitate', action='store_true',
                        help='also train the policy to choose the recorded actions (behaviour cloning)')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (default 0: all cores)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the fresh models and shuffling')
    parser.add_argument('--tracking-uri', default='',
                        help="MLflow store ('' = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument('--experiment', default='ami_ros', help='MLflow experiment (default ami_ros)')
    parser.add_argument('--no-record', action='store_true', help='write no MLflow run')


class _Status:
    """The progress line: frames/s, each model's samples/s and losses."""

    def __init__(self, epochs: int, progress: Any) -> None:
        self.epochs, self.progress = epochs, progress

    def render(self, width: int) -> str:
        p = self.progress
        elapsed = max(time.perf_counter() - p.started, 1e-9)
        parts = [f'epoch {p.epoch}/{self.epochs}', f'{p.frames / elapsed:.0f} frames/s']
        for model, metrics in p.last.items():
            extra = f' acc {metrics["accuracy"]:.2f}' if 'accuracy' in metrics else ''
            parts.append(f'{model} {p.rate(model):.0f}/s loss {metrics["loss"]:.4g}{extra}')
        return '  '.join(parts)[:width]


def _reserve(out: Path) -> Path:
    """The staging directory of checkpoint `out`, reserved now (a hidden .OUT.partial beside it)."""
    from ami_ros.core.checkpoint import abort_checkpoint, begin_checkpoint

    if out.exists():
        raise ValueError(f'-o {out} exists; give a new directory (nothing was written)')
    try:
        stage = begin_checkpoint(out.parent, name=out.name)
    except ValueError as exc:
        raise ValueError(f'-o {out}: {exc}') from None
    if stage.name != f'.{out.name}.partial':  # another save took the name meanwhile
        abort_checkpoint(stage)
        raise ValueError(f'-o {out} is being written by another save; give a new directory')
    return stage


def run(args: argparse.Namespace) -> int:
    from ami_ros.bags.reading import BagError
    from ami_ros.core.checkpoint import CheckpointError
    from ami_ros.record.mlflow_run import RecordError

    try:
        return _train(args)
    except (BagError, CheckpointError, RecordError, ValueError, OSError) as exc:
        print(f'{PROG}: {" ".join(str(exc).split())}', file=sys.stderr)
        return 1


def _train(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.batch_size < 2 or args.shuffle_window < 1:
        raise ValueError('--epochs must be >= 1, --batch-size >= 2 and --shuffle-window >= 1')
    out = Path(args.output).expanduser().absolute()
    if out.exists():
        raise ValueError(f'-o {out} exists; give a new directory (nothing was written)')
    import torch

    from ami_ros.core.agent import resolve_device
    from ami_ros.core.checkpoint import abort_checkpoint, load_manifest
    from ami_ros.core.checkpoint_store import resolve_checkpoint
    from ami_ros.core.presets import get_preset
    from ami_ros.launcher import StatusPrinter
    from ami_ros.offline.samples import inspect_bags
    from ami_ros.offline.training import OfflineConfig, OfflineTraining

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)  # the VAE's sampling noise and dropout: a run repeats
    preset = get_preset(args.preset)
    device = resolve_device(args.device)
    start = None
    if args.start:
        start = resolve_checkpoint(args.start, args.checkpoint_dir)
        load_manifest(start, expected_preset=preset.name, verify=True)
    bags = inspect_bags(args.bag, args.image_topic, args.action_topic)
    cfg = OfflineConfig(preset, str(device), args.epochs, args.batch_size, args.shuffle_window,
                        args.imitate, args.seed)
    training = OfflineTraining(cfg, bags, start)
    printer = StatusPrinter(sys.stdout)
    frames = sum(b.image_count for b in bags)
    topics = '; '.join(f'{b.path.name}: {b.image} ({b.image_count})'
                       + (f', {b.action} ({b.action_count})' if b.action else ', no actions') for b in bags)
    printer.line(f'{PROG}: {frames} frames in {len(bags)} bag(s) [{topics}], preset {preset.name}, '
                 f'device {device}, {torch.get_num_threads()} threads; training {", ".join(training.active)}')
    if not training.has_actions:
        printer.line(f'{PROG}: frames only (no action topic): training the encoder (VAE) only')
    recorder = None if args.no_record else _open_run(args, cfg, bags, start)
    params = {'preset': preset.name, 'epochs': args.epochs, 'batch_size': args.batch_size,
              'shuffle_window': args.shuffle_window, 'imitate': args.imitate, 'device': str(device),
              'threads': torch.get_num_threads(), 'from': str(start or ''), 'seed': args.seed,
              'bags': [str(b.path) for b in bags], 'models': list(training.active)}
    status = _Status(args.epochs, training.progress)
    shown = [0.0]

    def on_batch(progress: Any) -> None:
        now = time.monotonic()
        if now - shown[0] >= 1.0 / STATUS_HZ:
            shown[0] = now
            printer.status(status, now)
        if recorder is not None:
            for model, metrics in progress.last.items():
                for key, value in metrics.items():
                    recorder.add_metric(f'{model}/{key}', value, progress.samples[model])
            if recorder.pending >= FLUSH_EVERY:
                recorder.flush()

    def on_epoch(epoch: dict[str, Any]) -> None:
        printer.line(_epoch_line(epoch, args.epochs, training.progress))
        if recorder is not None:
            _record_epoch(recorder, epoch, training.progress)

    stage = _reserve(out)
    try:
        training.train(on_batch, on_epoch)
        path = training.save(stage, params)
    except BaseException as exc:
        abort_checkpoint(stage)
        printer.close()
        if recorder is not None:
            recorder.finish(status='KILLED' if isinstance(exc, KeyboardInterrupt) else 'FAILED')
        if isinstance(exc, KeyboardInterrupt):
            print(f'{PROG}: interrupted; nothing was written to {out}', file=sys.stderr)
            return 130
        raise
    printer.close()
    versions = ', '.join(f'{k} {v}' for k, v in training.versions().items())
    print(f'{PROG}: checkpoint {path} (versions {versions}); start from it with '
          f'ami-ros launch preset:={preset.name} checkpoint:={path}', flush=True)
    if recorder is not None:
        recorder.finish(summary={'checkpoint': str(path), 'versions': training.versions(),
                                 'epochs': training.history})
        print(f'{PROG}: MLflow run {recorder.run_id} at {recorder.tracking_uri}', flush=True)
    return 0


def _epoch_line(epoch: dict[str, Any], epochs: int, progress: Any) -> str:
    parts = [f'epoch {epoch["epoch"]}/{epochs}: {epoch["frames"]} frames, {epoch["segments"]} segments']
    for model in ('vae', 'dynamics', 'policy'):
        if model in epoch:
            metrics = epoch[model]
            extra = f', accuracy {metrics["accuracy"]:.3f}' if 'accuracy' in metrics else ''
            parts.append(f'{model} loss {metrics["loss"]:.5g}{extra} ({progress.rate(model):.0f} samples/s)')
    return '; '.join(parts)


def _record_epoch(recorder: Any, epoch: dict[str, Any], progress: Any) -> None:
    for model in ('vae', 'dynamics', 'policy'):
        for key, value in epoch.get(model, {}).items():
            recorder.add_metric(f'epoch/{model}/{key}', value, epoch['epoch'])
        if model in epoch:
            recorder.add_metric(f'epoch/{model}/samples_per_second', progress.rate(model), epoch['epoch'])
    recorder.flush()


def _open_run(args: argparse.Namespace, cfg: Any, bags: list[Any], start: Path | None) -> Any:
    from ami_ros.record.mlflow_run import RunRecorder, resolve_tracking_uri

    params = {'kind': 'offline', 'preset': cfg.preset.name, 'epochs': cfg.epochs,
              'batch_size': cfg.batch_size, 'shuffle_window': cfg.shuffle_window, 'imitate': cfg.imitate,
              'device': cfg.device, 'seed': cfg.seed, 'from': str(start or ''),
              'bags': ','.join(str(b.path) for b in bags), 'output': str(Path(args.output).absolute())}
    return RunRecorder(resolve_tracking_uri(args.tracking_uri), args.experiment,
                       f'offline-{time.strftime("%Y-%m-%d_%H-%M-%S")}', params,
                       tags={'ami_ros.kind': 'offline'})
