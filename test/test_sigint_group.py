"""Ctrl-C as a terminal sends it: SIGINT to a whole process group (issue 24).

ros2 launch starts every node in its own process group and, on Ctrl-C, sends
nothing itself: the terminal's SIGINT reaches every node at the same moment,
and launch_ros sends SIGTERM after `sigterm_timeout`. launch_ros is not on
PyPI, so a small group leader stands in for it: the graph description's nodes
as its children, in its process group, with the same escalation. `ami-ros
launch` is tested the same way, in a process group of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from ros_harness import NodeStatus, free_udp_port, stop_process, wait_for
from std_srvs.srv import Trigger

from ami_ros.core.checkpoint import load_manifest, read_json
from ami_ros.core.checkpoint_store import list_checkpoints
from ami_ros.graph import describe, discovery_environment, params_file, resolve_arguments
from ami_ros.ros.graceful_stop import LAUNCH_SIGTERM_TIMEOUT
from ami_ros.ros.node_process import node_command, write_parameters

TRAINERS = ('vae_trainer', 'dynamics_trainer', 'policy_trainer')
MODELS = ('encoder', 'decoder', 'dynamics', 'policy')
ALONE_EXIT = 2.5  # s: a node no manager manages leaves at once (its on_exit included)

# launch_ros's part, as its ExecuteProcess does it: children in the leader's process group,
# the leader survives SIGINT; sigterm_timeout after it, SIGTERM to what is left, then SIGKILL.
GROUP_LEADER = r'''
import json, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
interrupted = []
signal.signal(signal.SIGINT, lambda *_: interrupted.append(time.monotonic()))
procs = {}
for name, cmd in spec['nodes'].items():
    with open(f"{spec['log_dir']}/{name}.log", 'wb') as log:
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
exits, escalated = {}, []
while len(exits) < len(procs):
    time.sleep(0.02)
    now = time.monotonic()
    for name, proc in procs.items():
        if name not in exits and proc.poll() is not None:
            exits[name] = [proc.returncode, now - interrupted[0] if interrupted else None]
    late = now - interrupted[0] if interrupted else 0.0
    term = spec['sigterm_timeout']
    for sig, after in ((signal.SIGTERM, term), (signal.SIGKILL, term + 5)):
        if late > after and sig.name not in escalated:
            escalated.append(sig.name)
            for name, proc in procs.items():
                if proc.poll() is None:
                    proc.send_signal(sig)
with open(spec['result'], 'w') as out:
    json.dump({'exits': exits, 'escalated': escalated}, out)
'''


def _log_tail(log_dir, names) -> str:
    return '\n'.join(f'--- {n}\n' + '\n'.join((log_dir / f'{n}.log').read_text(errors='replace')
                                              .splitlines()[-15:]) for n in names
                     if (log_dir / f'{n}.log').exists())


def _seen(health: NodeStatus) -> dict[str, float]:
    return {'steps': health.number('agent', 'steps'),
            **{m: health.number('agent', f'version_{m}') for m in MODELS}}


def _check_final(ckpt_dir, before: list, seen: dict[str, float], nodes: list[str]):
    """The final checkpoint: new, complete, and holding at least what the graph had done."""
    after = list_checkpoints(ckpt_dir)
    assert [str(p) for p in after[:-1]] == [str(p) for p in before] and len(after) == len(before) + 1
    final = after[-1]
    manifest = load_manifest(final, expected_preset='cpu', verify=True)  # every part, its sha256
    assert manifest['nodes'] == nodes and not manifest.get('manual'), manifest
    assert read_json(final, 'interaction/agent/state.json')['steps'] >= seen['steps']
    return final


def test_sigint_to_the_launch_group_saves_the_final_checkpoint(test_node, tmp_path):
    ckpt_dir, log_dir = tmp_path / 'ckpt', tmp_path / 'logs'
    log_dir.mkdir()
    args = resolve_arguments({'world': 'doom', 'preset': 'cpu', 'train': 'true', 'record': 'false',
                              'web_api_port': '0', 'vrchat_port': str(free_udp_port()),
                              'checkpoint_dir': str(ckpt_dir)})
    fast = {'min_new': 16}  # rounds within seconds, so weights are pushed early
    commands = {}
    for spec in describe(args):
        overrides = write_parameters(log_dir / f'{spec.name}.yaml', spec.name,
                                     {**spec.parameters, **(fast if spec.name in TRAINERS else {})})
        commands[spec.name] = node_command(spec.executable, spec.name, [params_file(args), overrides])
    # `ami-ros run agent` in the same group, with no manager in its namespace: it leaves at once.
    alone = write_parameters(log_dir / 'alone.yaml', 'agent', {'preset': 'cpu'})
    commands['alone'] = node_command('agent', 'agent', [alone], namespace='alone')
    result = tmp_path / 'group.json'
    spec = {'nodes': commands, 'log_dir': str(log_dir), 'result': str(result),
            'sigterm_timeout': LAUNCH_SIGTERM_TIMEOUT}
    leader = subprocess.Popen([sys.executable, '-c', GROUP_LEADER, json.dumps(spec)],
                              start_new_session=True, env={**os.environ, **discovery_environment(args)})
    try:
        health = NodeStatus(test_node)
        wait_for(lambda: all(health.number('agent', f'version_{m}') >= 1 for m in MODELS), 120,
                 message=lambda: f"every trainer's weights in the agent: {health.status.get('agent')}\n"
                                 + _log_tail(log_dir, commands))
        manual = test_node.call(Trigger, 'ami/save_checkpoint', timeout=60)
        assert manual.success, manual.message
        saved_steps = read_json(manual.message, 'interaction/agent/state.json')['steps']
        wait_for(lambda: health.number('agent', 'steps') >= saved_steps + 5, 20,
                 message='the agent acting again after the save')
        before, seen = list_checkpoints(ckpt_dir), _seen(health)
        sent = time.monotonic()
        os.killpg(leader.pid, signal.SIGINT)  # the terminal's Ctrl-C
        leader.wait(LAUNCH_SIGTERM_TIMEOUT + 30)
        waited = time.monotonic() - sent
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()
    report = json.loads(result.read_text())
    exits = report['exits']
    assert report['escalated'] == [], (report, _log_tail(log_dir, commands))
    assert {name: code for name, (code, _) in exits.items()} == {name: 0 for name in commands}, \
        (exits, _log_tail(log_dir, commands))
    gone = max(after for _, after in exits.values())
    print(f'SIGINT to the group -> every process gone: {gone:.2f} s ({waited:.2f} s in the test); '
          f'the lone agent: {exits["alone"][1]:.2f} s')
    assert gone < LAUNCH_SIGTERM_TIMEOUT
    assert exits['alone'][1] < ALONE_EXIT, exits
    final = _check_final(ckpt_dir, before, seen, ['agent', *TRAINERS])
    assert read_json(final, 'interaction/agent/state.json')['steps'] > saved_steps
    for trainer in TRAINERS:
        state = read_json(final, f'trainers/{trainer}/state.json')
        assert state['rounds'] >= 1 and state['version'] >= 1, (trainer, state)
    assert min(seen[m] for m in MODELS) >= 1
    # Paused before the save: the bridge released every input.
    assert 'released every input (paused)' in (log_dir / 'osc_bridge.log').read_text()
    manager_log = (log_dir / 'manager.log').read_text()
    assert 'SIGINT: pausing the graph' in manager_log and f'final checkpoint {final}' in manager_log


def test_sigint_to_ami_ros_launchs_group_saves_the_final_checkpoint(test_node, tmp_path):
    """`ami-ros launch` runs its nodes in sessions of their own: the group's SIGINT reaches the
    launcher alone, which stops the graph through the manager."""
    ckpt_dir = tmp_path / 'ckpt'
    log_path = tmp_path / 'launch.log'
    with open(log_path, 'wb') as log:
        launcher = subprocess.Popen(
            [sys.executable, '-m', 'ami_ros.cli', 'launch', 'world:=doom', 'preset:=cpu', 'train:=false',
             'record:=false', 'web_api_port:=0', f'vrchat_port:={free_udp_port()}',
             f'checkpoint_dir:={ckpt_dir}'],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        health = NodeStatus(test_node)
        wait_for(lambda: health.number('agent', 'steps') >= 20, 90,
                 message=lambda: log_path.read_text(errors='replace')[-3000:])
        seen = _seen(health)
        sent = time.monotonic()
        os.killpg(launcher.pid, signal.SIGINT)
        code = launcher.wait(120)
        print(f'SIGINT to ami-ros launch\'s group -> the launcher gone: {time.monotonic() - sent:.2f} s')
    finally:
        stop_process(launcher, signal.SIGINT, 60)  # it stops its nodes (their own sessions) on SIGINT
    output = log_path.read_text(errors='replace')
    assert code == 0, output[-3000:]
    assert '[launch] all nodes stopped cleanly' in output
    _check_final(ckpt_dir, [], seen, ['agent'])


def test_a_sigint_to_one_node_or_the_manager_alone_stops_it_at_once(launch, test_node, tmp_path):
    """`ami-ros run`, a test or a supervisor signals one process (its own process group): no wait."""
    agent = launch('agent', parameters={'preset': 'cpu', 'checkpoint_dir': str(tmp_path / 'ckpt')})
    manager = launch('manager', parameters={'managed_nodes': ['agent'], 'checkpoint_interval': 0.0,
                                            'checkpoint_dir': str(tmp_path / 'ckpt')})
    wait_for(lambda: test_node.call(Trigger, 'ami/status').message == 'running: agent=active', 30,
             interval=0.5, message='the manager managing the agent')
    for proc in (agent, manager):  # the node while its manager runs, then the manager
        sent = time.monotonic()
        assert proc.stop(timeout=10) == 0, proc.output()
        took = time.monotonic() - sent
        print(f'{proc.name} alone: gone {took:.2f} s after SIGINT')
        assert took < ALONE_EXIT, proc.name
    assert list_checkpoints(tmp_path / 'ckpt') == []  # the manager alone: no shutdown path
