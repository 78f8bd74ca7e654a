"""Benchmark: the fault and bad-input suite. One doom graph runs throughout; every entry point is attacked.

Starts `ami-ros launch world:=doom preset:=cpu` (real processes, a control API
on a free port, checkpoints on a small tmpfs where this runs as root) and, in
turn: counts the experience the trainers receive against the steps the agent
acts; sends garbage to every entry point (OSC to doom_world, Images to
camera/image_raw, experience envelopes to the trainers, SetParameters to
agent/sync_weights and every <node>/save_checkpoint, malformed HTTP to
web_api; inputs from bench/fault_inputs.py); starts `ami-ros launch` and a
lone agent on bit-flipped and truncated checkpoints; saves onto a full disk;
and SIGKILLs each node in turn, several times. After each batch of bad input,
each save and each kill it waits until every node process is up, the manager's
ami/status finds every node active (their get_state), web_api answers and
the agent acts at about 10 Hz again: that wait is the recovery time.

It prints a table (attack, count, survived, worst recovery s, lost) and exits 1
if any node crashed on bad input or a save onto a full disk harmed the graph.
Kills come last: they depend on the launcher's supervision, and a node that
is not restarted is reported as such (the rows after it run on a smaller graph).

    sudo .venv/bin/python bench/faults.py [--quick] [--scale 2.0] [--kills 3] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# Linux DDS domains stay in 0..101 (higher ones reach into ephemeral ports).
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + (os.getpid() + 53) % 100))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_inputs  # noqa: E402
from fault_probe import HEALTHY_TIMEOUT, RESTART_TIMEOUT, FaultGraph, damaged_start  # noqa: E402

from ami_ros.core.models import build_models  # noqa: E402
from ami_ros.core.presets import get_preset  # noqa: E402
from ami_ros.core.schemas import encode_weights  # noqa: E402
from ami_ros.graph import TRAINERS  # noqa: E402

BAD_INPUT = ('OSC datagrams', 'Images', 'experience', 'SetParameters', 'HTTP')


@dataclass
class Row:
    attack: str
    count: int
    survived: int
    worst_recovery: float  # seconds; nan when it never recovered
    lost: str = '-'
    crashed: tuple[str, ...] = ()  # nodes that died of it
    note: str = ''


def bad_input_attack(graph: FaultGraph, name: str, inputs: list, send, batch: int) -> Row:
    """Send `inputs` in batches; after each one every node must still run, the graph recover."""
    before = graph.node_pids()
    survived, worst, crashed = 0, 0.0, set()
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        send(chunk)
        recovery, problems = graph.wait_healthy()
        now = graph.node_pids()
        crashed |= {n for n, pid in before.items() if now.get(n) != pid}
        worst = max(worst, recovery)
        if problems or crashed:
            graph.log(f'{name}: after {start + len(chunk)} inputs: {problems}, crashed {sorted(crashed)}')
            break
        survived += len(chunk)
    return Row(name, len(inputs), survived, worst, crashed=tuple(sorted(crashed)))


def valid_weights(preset: str) -> dict[str, bytes]:
    models = build_models(get_preset(preset))
    return {name: encode_weights(name, model.state_dict(), 1, preset) for name, model in models.items()}


def bad_input_rows(graph: FaultGraph, rng: np.random.Generator, count: int, batch: int) -> list[Row]:
    """Every entry point, `count` inputs each (SetParameters split over the services)."""
    rows = [bad_input_attack(graph, 'OSC datagrams -> doom_world', fault_inputs.osc_datagrams(rng, count),
                             graph.send_osc, batch),
            bad_input_attack(graph, 'Images -> camera/image_raw', fault_inputs.bad_images(rng, count),
                             graph.send_images, batch)]
    valid = graph.experience_sample()
    rows.append(bad_input_attack(graph, 'experience -> trainers',
                                 fault_inputs.bad_experiences(rng, count, valid, graph.preset),
                                 graph.send_experience, batch))
    weights = valid_weights(graph.preset)
    services = ['agent/sync_weights'] + [f'{n}/save_checkpoint' for n in graph.checkpointed]
    for service in services:
        requests = fault_inputs.bad_parameter_requests(rng, max(1, count // len(services) * 2), weights,
                                                       graph.checkpoint_dir)
        accepted: list[int] = []
        row = bad_input_attack(graph, f'SetParameters -> {service}', requests,
                               lambda chunk, s=service, a=accepted: a.append(graph.send_parameters(s, chunk)),
                               batch)
        if sum(accepted):
            row.note = f'{sum(accepted)} requests answered successful'
        rows.append(row)
    answers: list[dict[int, int]] = []
    row = bad_input_attack(graph, 'HTTP -> web_api', fault_inputs.bad_http(rng, count),
                           lambda chunk: answers.append(graph.send_http(chunk)), batch)
    codes: dict[int, int] = {}
    for answer in answers:
        for code, n in answer.items():
            codes[code] = codes.get(code, 0) + n
    row.note = 'answers ' + ', '.join(f'{c or "none"}: {n}' for c, n in sorted(codes.items()))
    rows.append(row)
    return rows


def checkpoint_rows(graph: FaultGraph, rng: np.random.Generator, count: int, work: Path) -> list[Row]:
    """`ami-ros launch checkpoint:=` and a lone agent on damaged copies of a fresh checkpoint."""
    source = graph.save()
    damaged = fault_inputs.damaged_checkpoints(source, work / 'damaged', rng, count)
    rows = []
    for how in ('launch', 'agent'):
        outcomes: dict[str, list[str]] = {'refused': [], 'accepted': [], 'crashed': []}
        for path, what in damaged:
            outcome, said = damaged_start(path, how, graph.preset, work)
            outcomes[outcome].append(f'{what} ({said})' if outcome == 'crashed' else what)
        note = '; '.join(f'{kind}: {", ".join(whats)}' for kind, whats in outcomes.items()
                         if whats and kind != 'refused')
        target = 'ami-ros launch' if how == 'launch' else 'agent node alone'
        rows.append(Row(f'damaged checkpoint:= -> {target}',
                        len(damaged), len(outcomes['refused']), 0.0, note=note,
                        crashed=('agent',) * bool(outcomes['crashed'])))
    return rows


# -- the full disk -------------------------------------------------------------------
@dataclass
class DiskOutcome:
    ok: bool
    message: str
    recovery: float = float('nan')
    lost: str = '-'
    problems: list[str] = field(default_factory=list)


def full_disk(graph: FaultGraph) -> DiskOutcome | None:
    """A save that runs into a full disk (the tmpfs filled while it is under way), then one refused on
    the full disk; the first checkpoint must stay whole and the graph act on. None without a tmpfs."""
    from std_srvs.srv import Trigger

    from ami_ros.core.checkpoint import CheckpointError, load_manifest
    from ami_ros.core.checkpoint_store import list_checkpoints

    if not graph.tmpfs:
        return None
    first = graph.save()
    before = list_checkpoints(graph.checkpoint_dir)
    size = sum(f.stat().st_size for f in first.rglob('*') if f.is_file())
    used = shutil.disk_usage(graph.checkpoint_dir).used
    # Room for about two more checkpoints: the save's check of free space lets it start.
    limit = (used + 2 * size) // (1 << 20) + 1
    subprocess.run(['mount', '-o', f'remount,size={limit}m', str(graph.checkpoint_dir)], check=True)
    filler = graph.checkpoint_dir / 'filler'
    answers = []
    asking = threading.Thread(target=lambda: answers.append(
        graph.call(Trigger, 'ami/save_checkpoint', timeout=120)))
    asking.start()
    # The stage appears once the manager has checked the free space and paused the graph, as the
    # nodes begin to write their parts: the disk fills under them.
    deadline = time.monotonic() + 60
    while not any(p.name.endswith('.partial') for p in graph.checkpoint_dir.iterdir()) and asking.is_alive():
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)
    try:
        with open(filler, 'wb') as out:
            while True:
                out.write(b'\0' * (1 << 20))
    except OSError:
        pass
    asking.join()
    answered = time.monotonic()
    during = answers[0]
    refused = graph.call(Trigger, 'ami/save_checkpoint', timeout=60)
    _, problems = graph.wait_healthy()
    recovery = time.monotonic() - answered  # from the failed save's answer to a graph acting again
    try:
        load_manifest(first, expected_preset=graph.preset, verify=True)
        intact = set(before) <= set(list_checkpoints(graph.checkpoint_dir))
    except CheckpointError as exc:
        intact, problems = False, problems + [str(exc)]
    leftovers = [p.name for p in graph.checkpoint_dir.iterdir() if p.name.startswith('.')]
    filler.unlink()
    subprocess.run(['mount', '-o', 'remount,size=512m', str(graph.checkpoint_dir)], check=True)
    after = graph.call(Trigger, 'ami/save_checkpoint', timeout=120)
    # Clear = it says the disk lacks room ('No space left on device', or 'N MiB free ... needed').
    failed_clearly = [a is not None and not a.success and ('space' in a.message or 'free' in a.message)
                      for a in (during, refused)]
    ok = all(failed_clearly) and intact and not problems and after is not None and after.success
    message = (f'during: {during.message[:150] if during else "no answer"} | full: '
               f'{refused.message[:150] if refused else "no answer"} | leftovers {leftovers or "none"}; '
               f'saved again once freed: {bool(after and after.success)}')
    graph.log(f'full disk: {message}')
    return DiskOutcome(ok, message, recovery,
                       lost='earlier checkpoint ' + ('intact' if intact else 'DAMAGED'), problems=problems)


# -- SIGKILL -----------------------------------------------------------------------
@dataclass
class KillOutcome:
    restarted: bool
    recovery: float = float('nan')
    missed_actions: int = 0
    problems: list[str] = field(default_factory=list)


def kill_and_recover(graph: FaultGraph, name: str) -> KillOutcome:
    """SIGKILL node `name`; time until a new process runs it and the graph is healthy again (a killed
    trainer reports itself active on /diagnostics again)."""
    pid = graph.node_pids().get(name)
    if pid is None:
        return KillOutcome(False, problems=[f'{name} is not running'])
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while graph.node_pids().get(name) in (None, pid):
        if time.monotonic() - killed > RESTART_TIMEOUT:
            return KillOutcome(False, problems=[f'not restarted within {RESTART_TIMEOUT:g} s'])
        time.sleep(0.05)
    _, problems = graph.wait_healthy()
    if name in TRAINERS:
        deadline = time.monotonic() + HEALTHY_TIMEOUT
        while time.monotonic() < deadline:
            t, values = graph.diagnostics.get(name, (0.0, {}))
            if t > killed and values.get('active') == 'True':
                break
            time.sleep(0.1)
        else:
            problems.append(f'{name} does not report itself active')
    recovery = time.monotonic() - killed
    acted = sum(1 for t in list(graph.actions) if t >= killed)
    time.sleep(2.0)  # let the next kill meet a settled graph
    return KillOutcome(True, recovery, max(0, round(10 * recovery) - acted), problems)


def print_table(rows: list[Row], seed: int, elapsed: float) -> None:
    machine = platform.processor() or platform.machine()
    print(f'\nfault suite: seed {seed}, {elapsed / 60:.1f} min, {machine}, {os.cpu_count()} CPUs\n')
    print('| attack | count | survived | worst recovery s | lost |')
    print('|---|---:|---:|---:|---|')
    for r in rows:
        print(f'| {r.attack} | {r.count} | {r.survived} | {r.worst_recovery:.1f} | {r.lost} |')
    for r in rows:
        if r.note or r.crashed:
            print(f'- {r.attack}: {r.note}' + (f' crashed: {", ".join(r.crashed)}' if r.crashed else ''))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='a short run: fewer inputs, one kill each')
    parser.add_argument('--scale', type=float, default=1.0, help='multiply every count')
    parser.add_argument('--kills', type=int, default=3, help='SIGKILLs per node')
    parser.add_argument('--seed', type=int, default=int(time.time()) % 100_000)
    parser.add_argument('--keep', action='store_true', help='keep the work directory (logs)')
    args = parser.parse_args()
    count = int((200 if args.quick else 1000) * args.scale)
    kills = 1 if args.quick else args.kills
    print(f'seed {args.seed} (replay with --seed {args.seed})', flush=True)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix='ami_ros_faults_'))
    rows: list[Row] = []
    with FaultGraph(work, log=lambda text: print(text, flush=True)) as graph:
        recovery, problems = graph.wait_healthy(timeout=180)
        if problems:
            print(f'the graph did not come up: {problems}; see {graph.log_path}')
            return 1
        print(f'graph up: {", ".join(graph.names)}; checkpoints on {graph.checkpoint_dir} '
              f'({"tmpfs" if graph.tmpfs else "no tmpfs: not root"})', flush=True)
        lost = graph.experience_loss(seconds=10 if args.quick else 60)
        steps = lost.pop('steps')
        rows.append(Row('experience: agent steps -> trainers', steps, steps, 0.0,
                        lost=', '.join(f'{n} {v}' for n, v in lost.items())))
        rows += bad_input_rows(graph, rng, count, batch=max(25, count // 4))
        rows += checkpoint_rows(graph, rng, 6 if args.quick else 30, work)
        outcome = full_disk(graph)
        if outcome is None:
            print('full disk: skipped, mounting a tmpfs needs root')
        else:
            rows.append(Row('save onto a full disk', 1, int(outcome.ok), outcome.recovery,
                            lost=outcome.lost, note=outcome.message))
        for name in graph.kill_order():
            worst, survived, lost_actions, notes = 0.0, 0, 0, []
            for _ in range(kills):
                result = kill_and_recover(graph, name)
                if result.restarted and not result.problems:
                    survived += 1
                    worst = max(worst, result.recovery)
                    lost_actions += result.missed_actions
                else:
                    notes.append('not restarted' if not result.restarted else '; '.join(result.problems))
                    break
            rows.append(Row(f'SIGKILL {name}', kills, survived, worst if survived else float('nan'),
                            lost=f'{lost_actions} actions', note=', '.join(notes)))
    print_table(rows, args.seed, time.monotonic() - started)
    if args.keep:
        print(f'logs in {work}')
    # Non-zero when bad input crashed a node or a full disk harmed the graph. A lone node taking a
    # bit-flipped checkpoint, or a node the supervision does not restart, is reported, not failed.
    bad = [r for r in rows if r.crashed or (r.attack == 'save onto a full disk' and not r.survived)
           or (r.attack.split(' -> ')[0] in BAD_INPUT and r.survived < r.count)]
    return 1 if bad else 0

if __name__ == '__main__':
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
