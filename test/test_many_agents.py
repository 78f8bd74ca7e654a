"""agents:=2 in the Doom world, as real processes: two agents feed one set of trainers.

One graph (`ami-ros launch world:=doom agents:=2`, trainers that take short
rounds) serves the tests below, in order: both agents act and learn, a
checkpoint holds both agents' states and restores each by namespace, and a
SIGKILL of one agent leaves the other acting and the trainers training.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
import torch
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from ros_harness import (
    NodeStatus,
    fast_trainer_params,
    free_udp_port,
    start_graph,
    start_node,
    stop_graph,
    wait_for,
)
from ros_harness import (
    TestNode as ProbeNode,
)
from std_msgs.msg import UInt8MultiArray
from std_srvs.srv import Trigger

from ami_ros.core.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    load_manifest,
    read_json,
    read_tensors,
)
from ami_ros.core.presets import get_preset
from ami_ros.core.schemas import ExperienceStep, decode_experience

AGENTS = ('agent_0', 'agent_1')
MODELS = ('encoder', 'decoder', 'dynamics', 'policy')
PRESET = get_preset('cpu')


class Agents:
    """What the test sees of the graph: each agent's experience, and every node's diagnostics."""

    def __init__(self, node: ProbeNode, namespaces: tuple[str, ...]) -> None:
        self.steps: dict[str, list[tuple[float, ExperienceStep]]] = {ns: [] for ns in namespaces}
        self.health = NodeStatus(node)
        self.subscriptions = [node.node.create_subscription(
            UInt8MultiArray, f'{ns}/experience', lambda msg, ns=ns: self._on(ns, msg), 200)
            for ns in namespaces]

    def _on(self, ns: str, msg: UInt8MultiArray) -> None:
        self.steps[ns].append((time.monotonic(), decode_experience(bytes(msg.data), PRESET)))

    def since(self, ns: str, t: float) -> list[ExperienceStep]:
        return [step for at, step in self.steps[ns] if at >= t]

    def newest_versions(self, ns: str) -> dict[str, int]:
        return self.steps[ns][-1][1].versions if self.steps[ns] else dict.fromkeys(MODELS, 0)


@pytest.fixture(scope='module')
def two_agents(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('many_agents')
    params = fast_trainer_params(tmp / 'params.yaml')
    node = ProbeNode('many_agents_probe')
    seen = Agents(node, AGENTS)
    ports = f'{free_udp_port()},{free_udp_port()}'
    graph = start_graph(tmp, 'world:=doom', 'agents:=2', f'vrchat_port:={ports}', f'params_file:={params}',
                        env={'MLFLOW_TRACKING_URI': f'sqlite:///{tmp}/mlflow.db'})
    try:
        yield graph, node, seen, tmp
    finally:
        stop_graph(graph)
        node.close()


def _log(graph) -> str:
    return graph.log_path.read_text(errors='replace')[-4000:]


def test_both_agents_act_and_learn_with_their_experience_kept_apart(two_agents):
    graph, _, seen, _ = two_agents
    # Every model of both agents moves past its initial version: the trainers push to each.
    wait_for(lambda: all(min(seen.newest_versions(ns).values()) >= 1 for ns in AGENTS), 180, interval=0.5,
             message=lambda: f'{ {ns: seen.newest_versions(ns) for ns in AGENTS} }; {_log(graph)}')
    start = time.monotonic()
    time.sleep(5.0)  # a window of acting to count steps in, not a wait for a condition
    for ns in AGENTS:
        steps = seen.since(ns, start)
        assert len(steps) >= 35, (ns, len(steps))  # about 10 Hz each, on 2 shared cores
        numbers = [s.step for s in steps]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), ns  # one stream each
        agent = seen.health.status.get(f'{ns}/agent', {})
        assert float(agent.get('rate_hz', 0)) >= 7.0, (ns, agent)
    # Two worlds, not one seen twice: the agents saw different frames at the same moment.
    last = {ns: seen.steps[ns][-1][1] for ns in AGENTS}
    assert not torch.equal(last['agent_0'].observation, last['agent_1'].observation)
    for trainer in ('dynamics_trainer', 'policy_trainer'):
        status = seen.health.status.get(trainer, {})
        for ns in AGENTS:
            assert int(status.get(f'received/{ns}', 0)) > 0, (trainer, status)
        # Each agent's steps follow one another within its own stream: a trainer that mixed the
        # two streams into one sequence would see every other step as a gap.
        assert int(status['gaps']) == 0, (trainer, status)
    assert int(seen.health.get('vae_trainer', 'rounds', '0')) >= 1
    # The launcher's status line shows each agent's rate (a plain line every 10 s in a pipe).
    wait_for(lambda: re.search(r'actions/s \(\d+\.\d \d+\.\d\)', _log(graph)), 15, interval=0.5,
             message=lambda: _log(graph))


def test_a_checkpoint_holds_both_agents_states_and_restores_each_by_namespace(two_agents, tmp_path):
    graph, node, _, tmp = two_agents
    answer = node.call(Trigger, 'ami/save_checkpoint', timeout=60)
    assert answer.success, answer.message + _log(graph)
    path = answer.message
    manifest = load_manifest(path, expected_preset='cpu', verify=True)
    assert {f'{ns}/agent' for ns in AGENTS} <= set(manifest['nodes']), manifest['nodes']
    saved = {ns: (read_json(path, f'interaction/{ns}/state.json')['steps'],
                  read_tensors(path, f'interaction/{ns}/state.safetensors', 'agent/state',
                               allow_extra=True).tensors['hidden']) for ns in AGENTS}
    assert not torch.equal(saved['agent_0'][1], saved['agent_1'][1])  # two histories, two states
    # Each agent's state comes back to the agent of its name: agents restored from it in
    # namespaces of their own, crossed over so a mix-up cannot pass, each asked at once (before
    # any frame) to save its part again: it holds the state saved under its name.
    restored = AGENTS[::-1]
    agents = [start_node('agent', tmp_path / ns, namespace=f'restored_{ns}', parameters={
        'preset': 'cpu', 'checkpoint': path, 'checkpoint_dir': str(tmp / 'checkpoints'), 'state_name': ns})
        for ns in restored]
    try:
        for ns in restored:
            stage = begin_checkpoint(tmp / 'checkpoints')
            request = SetParameters.Request(parameters=[Parameter(name='directory', value=ParameterValue(
                type=ParameterType.PARAMETER_STRING, string_value=str(stage)))])
            answer = node.call(SetParameters, f'restored_{ns}/agent/save_checkpoint', request, timeout=60)
            assert [r.successful for r in answer.results] == [True], answer.results
            again = commit_checkpoint(stage, {'preset': 'cpu', 'nodes': [f'{ns}/agent']})
            assert read_json(again, f'interaction/{ns}/state.json')['steps'] == saved[ns][0]
            hidden = read_tensors(again, f'interaction/{ns}/state.safetensors', 'agent/state',
                                  allow_extra=True).tensors['hidden']
            assert torch.equal(hidden, saved[ns][1]), ns
    finally:
        for agent in agents:
            agent.stop()


def _agent_process(namespace: str) -> psutil.Process:
    """The agent process the launcher started in `namespace`."""
    found = [p for p in psutil.process_iter(['cmdline'])
             if {f'__ns:=/{namespace}', '__node:=agent'} <= set(p.info['cmdline'] or ())]
    assert len(found) == 1, found
    return found[0]


def test_a_killed_agent_leaves_the_other_acting_and_the_trainers_training(two_agents):
    graph, node, seen, _ = two_agents
    victim = _agent_process('agent_1')
    rounds = {t: int(seen.health.get(t, 'rounds', '0')) for t in ('vae_trainer', 'dynamics_trainer')}
    versions = seen.newest_versions('agent_0')
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: '[launch] agent_1/agent died' in _log(graph), 10, message=lambda: _log(graph))
    time.sleep(8.0)  # a window after the kill: steps counted in it, and none from agent_1
    assert len(seen.since('agent_1', killed + 1.0)) == 0  # it is gone (and, by design, not restarted)
    steps = seen.since('agent_0', killed)
    assert len(steps) >= 55, len(steps)  # acting on at about its rate
    # The trainers go on: new rounds, new weights taken by the agent still there.
    wait_for(lambda: all(int(seen.health.get(t, 'rounds', '0')) > rounds[t] for t in rounds), 60,
             interval=0.5, message=lambda: f'rounds after the kill: {rounds}; {_log(graph)}')
    wait_for(lambda: any(seen.newest_versions('agent_0')[m] > versions[m] for m in MODELS), 60,
             interval=0.5, message='new weights for agent_0 after the kill')
    # Checkpoints go on too, with the agent still there (agent_1 restores fresh from it).
    answer = node.call(Trigger, 'ami/save_checkpoint', timeout=90)
    assert answer.success, answer.message + _log(graph)
    saved = load_manifest(answer.message, verify=True)['nodes']
    assert 'agent_0/agent' in saved and 'agent_1/agent' not in saved, saved
