"""Supervision in `ami-ros launch`: the restart rule (no processes), and one real graph
whose nodes are killed: a trainer and the bridge come back, the bridge's death releases
VRChat's inputs at once, a node restarted in a paused graph stays paused, and a node
that keeps dying is given up while the rest goes on."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from ros_harness import NodeStatus, start_graph, stop_graph, wait_for
from test_graph import FakeVRChat, _ends_released, _video

from ami_ros import graph
from ami_ros.launcher import GraphStatus
from ami_ros.supervision import RestartPolicy, Supervisor, restart_parameters

ROOT = Path(__file__).resolve().parent.parent


# -- the rule, without processes ---------------------------------------------------
class FakeProcess:
    def __init__(self, name: str) -> None:
        self.name, self.returncode = name, None

    def alive(self) -> bool:
        return self.returncode is None

    def stop(self, *args) -> int | None:
        return self.returncode


class FakeGraph:
    """A Supervisor over FakeProcesses: what it started, said and released."""

    def __init__(self, names, respawn=True, policy=None) -> None:
        self.started: list[tuple[str, dict]] = []
        self.lines: list[str] = []
        self.released: list[str] = []  # the bridges released for, by path
        # 'agent_1/osc_bridge': a node in an agent's namespace.
        specs = [graph.NodeSpec(n.rsplit('/', 1)[-1], n.rsplit('/', 1)[-1], {}, respawn=respawn,
                                namespace=n.rpartition('/')[0]) for n in names]
        self.supervisor = Supervisor(specs, self.start, self.lines.append, self.release,
                                     policy or RestartPolicy(first_delay=1.0, cap=5.0, give_up_after=4,
                                                             window=60.0))
        self.supervisor.start_all()

    def start(self, spec, params):
        self.started.append((spec.path, params))
        return FakeProcess(spec.path)

    def release(self, bridge) -> None:
        self.released.append(bridge.path)

    @property
    def releases(self) -> int:
        return len(self.released)

    def process(self, name: str) -> FakeProcess:
        return next(p for p in self.supervisor.processes() if p.name == name)


def test_back_off_doubles_up_to_the_cap_and_a_node_that_keeps_dying_is_given_up():
    fake = FakeGraph(['vae_trainer', 'doom_world'])
    delays, now = [], 0.0
    for _ in range(3):
        fake.process('vae_trainer').returncode = -9
        fake.supervisor.poll(stopping=False, now=now)
        delay = float(re.search(r'in (\S+) s$', fake.lines[-1]).group(1))
        delays.append(delay)
        fake.supervisor.poll(stopping=False, now=now + delay - 0.01)  # not yet
        assert fake.process('vae_trainer').returncode == -9
        fake.supervisor.poll(stopping=False, now=now + delay)
        assert fake.process('vae_trainer').alive()
        now += delay + 1.0
    assert delays == [1.0, 2.0, 4.0]
    assert fake.lines[0] == '[launch] restarting vae_trainer (exit -9), attempt 1, in 1 s'
    assert fake.supervisor.report() == ({'restarts': 3, 'restarts/vae_trainer': 3,
                                         'restarts/doom_world': 0}, '')
    fake.process('vae_trainer').returncode = 1  # the 4th death within 60 s
    fake.supervisor.poll(stopping=False, now=now)
    assert fake.lines[-1] == ('[launch] vae_trainer died 4 times within 60 s (last exit code 1); '
                              'not restarting it: see its output above')
    fake.supervisor.poll(stopping=False, now=now + 100)
    assert len(fake.started) == 2 + 3 and fake.supervisor.failed == ['vae_trainer']
    assert fake.supervisor.report()[1] == 'not restarted any more: vae_trainer'
    assert not fake.supervisor.settled(['doom_world']) and fake.supervisor.settled(['vae_trainer'])
    assert fake.releases == 0  # not the bridge
    assert RestartPolicy(first_delay=1.0, cap=5.0).delay(4) == 5.0


def test_deaths_far_apart_start_the_back_off_again():
    fake = FakeGraph(['recorder'])
    for i in range(6):  # one death every two minutes never reaches 4 within 60 s
        fake.process('recorder').returncode = -11
        fake.supervisor.poll(stopping=False, now=i * 120.0)
        assert fake.lines[-1].endswith('attempt 1, in 1 s'), fake.lines[-1]
        fake.supervisor.poll(stopping=False, now=i * 120.0 + 1.0)
    assert fake.supervisor.report()[0]['restarts'] == 6 and not fake.supervisor.failed


def test_the_bridges_death_releases_at_once_and_again_when_it_is_back():
    fake = FakeGraph(['osc_bridge'])
    fake.process('osc_bridge').returncode = -9
    fake.supervisor.poll(stopping=False, now=0.0)
    assert fake.releases == 1 and fake.lines[0] == '[launch] released every input (osc_bridge is gone)'
    fake.supervisor.poll(stopping=False, now=1.0)
    assert fake.releases == 2 and fake.lines[-1] == '[launch] released every input (osc_bridge is back)'


def test_with_several_agents_only_the_dead_bridges_avatar_is_released():
    fake = FakeGraph(['agent_0/osc_bridge', 'agent_1/osc_bridge', 'agent_1/agent'])
    fake.process('agent_1/osc_bridge').returncode = -9
    fake.supervisor.poll(stopping=False, now=0.0)
    assert fake.released == ['agent_1/osc_bridge']
    assert fake.lines[0] == '[launch] released every input (agent_1/osc_bridge is gone)'
    fake.supervisor.poll(stopping=False, now=1.0)
    assert fake.started[-1][0] == 'agent_1/osc_bridge' and fake.released[-1] == 'agent_1/osc_bridge'
    assert fake.supervisor.report()[0]['restarts/agent_1/osc_bridge'] == 1


def test_nothing_is_restarted_when_stopping_or_without_respawn():
    fake = FakeGraph(['osc_bridge', 'vae_trainer'])
    fake.process('vae_trainer').returncode = -9
    fake.supervisor.poll(stopping=False, now=0.0)  # a restart is due in 1 s ...
    fake.process('osc_bridge').returncode = 0
    fake.supervisor.poll(stopping=True, now=5.0)  # ... but the graph shuts down
    assert len(fake.started) == 2 and fake.releases == 1  # the bridge's exit still releases
    assert fake.lines[-1] == '[launch] osc_bridge exited' and fake.supervisor.settled(['osc_bridge',
                                                                                         'vae_trainer'])
    fixed = FakeGraph(['vae_trainer'], respawn=False)
    fixed.process('vae_trainer').returncode = -9
    fixed.supervisor.poll(stopping=False, now=0.0)
    fixed.supervisor.poll(stopping=False, now=100.0)
    assert len(fixed.started) == 1 and fixed.supervisor.failed == ['vae_trainer']
    assert fixed.lines == ['[launch] vae_trainer died with exit code -9; see its output above']


def test_a_node_with_state_restarts_from_the_newest_checkpoint(tmp_path):
    from ami_ros.core.checkpoint import begin_checkpoint, commit_checkpoint

    spec = next(s for s in graph.describe({'checkpoint_dir': str(tmp_path)}) if s.name == 'vae_trainer')
    assert restart_parameters(spec) == spec.parameters  # nothing saved yet: as it started
    t0 = datetime(2026, 1, 1, 12, 0, 0).astimezone()
    older = commit_checkpoint(begin_checkpoint(tmp_path, now=t0), {'preset': 'cpu'})
    time.sleep(0.02)  # a later modification time too
    newest = commit_checkpoint(begin_checkpoint(tmp_path, now=t0 + timedelta(hours=1)), {'preset': 'cpu'})
    assert restart_parameters(spec)['checkpoint'] == str(newest)
    started_from = graph.describe({'checkpoint_dir': str(tmp_path), 'checkpoint': str(older)})
    trainer = next(s for s in started_from if s.name == 'vae_trainer')
    assert trainer.parameters['checkpoint'] == str(older)
    assert restart_parameters(trainer)['checkpoint'] == str(newest)  # saved since: the newer
    bridge = next(s for s in started_from if s.name == 'osc_bridge')
    assert restart_parameters(bridge) == bridge.parameters  # no state


def test_which_nodes_are_respawned_and_the_restarts_field():
    specs = {s.name: s for s in graph.describe({'world': 'doom', 'bag': 'b'})}
    assert {n for n, s in specs.items() if s.respawn} == {
        'doom_world', 'osc_bridge', 'vae_trainer', 'dynamics_trainer', 'policy_trainer', 'recorder'}
    assert not any(s.respawn for s in graph.describe({'respawn': 'false'}))
    assert graph.LAUNCH_STATUS in specs['recorder'].parameters['nodes']  # restarts reach MLflow
    with pytest.raises(graph.GraphArgumentError, match='respawn_delay:=soon'):
        graph.describe({'respawn_delay': 'soon'})
    text = GraphStatus(state='running', restarts=3).render()
    assert text.split(' | ')[1] == 'restarts 3'
    assert 'restarts' not in GraphStatus(state='running').render()


# -- one real graph ------------------------------------------------------------------
def _child(parent: int, node: str, not_pid: int = 0) -> int:
    """The pid of `parent`'s child that runs `node` (0 while there is none but `not_pid`)."""
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == not_pid:
            continue
        try:
            stat = Path(f'/proc/{entry}/stat').read_text()
            cmdline = Path(f'/proc/{entry}/cmdline').read_bytes().split(b'\0')
        except OSError:
            continue
        if int(stat.rsplit(')', 1)[1].split()[1]) == parent and f'__node:={node}'.encode() in cmdline:
            return int(entry)
    return 0


class Lifecycle:
    """`node/get_state` answers, asked with a short timeout: a killed node answers nothing."""

    def __init__(self, test_node) -> None:
        self.test_node, self.clients = test_node, {}

    def state(self, node: str, timeout: float = 1.0) -> str:
        from lifecycle_msgs.srv import GetState

        if node not in self.clients:
            self.clients[node] = self.test_node.node.create_client(GetState, f'{node}/get_state')
        client = self.clients[node]
        if not client.service_is_ready():
            return ''
        future = client.call_async(GetState.Request())
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        return future.result().current_state.label if future.done() else ''


def _releases(messages) -> list[int]:
    """Indexes of the last message of each full release (5 in a row) in `messages`."""
    return [i + 4 for i in range(len(messages) - 4) if _ends_released(messages[i:i + 5])]


def _kill(proc, node: str) -> tuple[int, float]:
    pid = wait_for(lambda: _child(proc.pid, node), 30, message=f'{node} running')
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_killed_nodes_come_back_in_the_graphs_state_and_inputs_are_released(tmp_path, test_node):
    from std_srvs.srv import Trigger

    vrchat = FakeVRChat()
    params = yaml.safe_load((ROOT / 'config' / 'ami.yaml').read_text())
    params['/**/agent']['ros__parameters']['persistence'] = 0.0  # inputs change every step
    params['/**/recorder']['ros__parameters']['flush_interval'] = 1.0  # restarts in MLflow soon
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    status, lifecycle = NodeStatus(test_node), Lifecycle(test_node)
    proc = start_graph(tmp_path, 'world:=vrchat', f'camera_source:={_video(tmp_path / "obs.avi")}',
                       f'vrchat_port:={vrchat.port}', 'preset:=cpu', f'params_file:={params_file}',
                       'respawn_delay:=0.25')
    log = proc.log_path.read_text
    figures = {}
    try:
        wait_for(lambda: len(vrchat.messages) > 20, 90,
                 message=lambda: f'OSC from the graph; {log()[-3000:]}')
        saved = test_node.call(Trigger, 'ami/save_checkpoint', timeout=120)
        assert saved.success, saved.message
        # The bridge, while the agent acts: the launcher releases every input at once.
        _, killed = _kill(proc, 'osc_bridge')
        wait_for(lambda: _releases(vrchat.since(killed)), 5, message='a release after the kill')
        figures['release_s'] = vrchat.since(killed)[_releases(vrchat.since(killed))[0]][0] - killed
        assert figures['release_s'] < 0.5, figures
        # A trainer: back, from the checkpoint just saved, and learning again.
        _, trainer_killed = _kill(proc, 'vae_trainer')
        wait_for(lambda: lifecycle.state('vae_trainer') == 'active', 60, interval=0.1,
                 message=lambda: f'vae_trainer back; {log()[-2000:]}')
        figures['trainer_back_s'] = time.monotonic() - trainer_killed
        wait_for(lambda: status.get('vae_trainer', 'restored_from') == saved.message, 10,
                 message=lambda: f'restored from {saved.message}: {status.status.get("vae_trainer")}')
        rounds = status.number('vae_trainer', 'rounds')
        wait_for(lambda: status.number('vae_trainer', 'rounds') > rounds, 60, interval=0.2,
                 message='a round after the restart')
        # The bridge is back too: released again, then acting again.
        after = vrchat.since(killed)
        releases = _releases(after)
        assert len(releases) >= 2, after[:20]  # gone, and back (the launcher's, the bridge's own)
        assert any(args not in ((0,), (0.0,)) for _, _, args in after[releases[1]:]), 'acting again'
        assert '[launch] restarting osc_bridge (exit -9), attempt 1, in 0.25 s' in log()
        assert f'[launch] restarted vae_trainer from checkpoint {saved.message}' in log()
        # Paused: a restarted node joins paused, and comes back with the resume.
        assert test_node.call(Trigger, 'ami/pause', timeout=30).success
        _, paused_kill = _kill(proc, 'osc_bridge')
        wait_for(lambda: _releases(vrchat.since(paused_kill)), 5, message='a release after the kill')
        wait_for(lambda: '[launch] restarted osc_bridge' in log().split('attempt 2')[-1], 10,
                 message='the second restart')
        wait_for(lambda: lifecycle.state('osc_bridge') == 'inactive', 30, interval=0.1,
                 message=lambda: f'the bridge inactive; {log()[-2000:]}')
        figures['bridge_back_paused_s'] = time.monotonic() - paused_kill
        time.sleep(1.0)
        assert lifecycle.state('osc_bridge') == 'inactive'
        assert test_node.call(Trigger, 'ami/resume', timeout=30).success
        assert lifecycle.state('osc_bridge') == 'active'
        # The recorder keeps dying: given up after 5 deaths, the rest goes on.
        run_id = status.get('recorder', 'run_id')
        wait_for(lambda: status.get('launch', 'restarts') == '3', 5, message='the restarts so far')
        time.sleep(float(params['/**/recorder']['ros__parameters']['flush_interval']) + 1.0)  # written
        victims = [0]
        for _ in range(5):
            pid = wait_for(lambda: _child(proc.pid, 'recorder', victims[-1]), 30,
                           message='the recorder again')
            os.kill(pid, signal.SIGKILL)
            victims.append(pid)
        wait_for(lambda: '[launch] recorder died 5 times within 300 s (last exit code -9); '
                 'not restarting it' in log(), 10, message=lambda: log()[-2000:])
        given_up = time.monotonic()
        time.sleep(1.0)
        assert not _child(proc.pid, 'recorder') and proc.poll() is None
        wait_for(lambda: 'recorder' in status.message.get('launch', ''), 5, message='the launch status')
        assert status.get('launch', 'restarts/osc_bridge') == '2'
        assert status.get('launch', 'restarts/vae_trainer') == '1'
        assert status.get('launch', 'restarts/recorder') == '4'
        wait_for(lambda: len(vrchat.since(given_up)) > 10, 10, message='the agent still acting')
    finally:
        stop_graph(proc, timeout=90)
        vrchat.close()
    out = log()
    stopping = out.index('[launch] stopping')
    assert '[launch] restart' not in out[stopping:], out[stopping:]
    assert proc.returncode == 1 and '[launch] failed: recorder' in out
    assert re.search(r'^\[status\] .*\| restarts 7 \|', out, re.MULTILINE), out[-2000:]
    # The restarts so far reached the MLflow run of the recorder that heard them.
    from mlflow import MlflowClient

    history = MlflowClient().get_metric_history(run_id, 'launch/restarts')
    assert history and max(m.value for m in history) == 3, history
    print(f'figures: {figures}')
