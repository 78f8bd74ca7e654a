"""One set of trainers serving two agents, as real processes over DDS.

A real dynamics_trainer and policy_trainer run with `agents: [agent_0, agent_1]`;
the test plays both agents: it publishes each one's experience on
`agent_<i>/experience` (real envelopes, each agent its own step numbers, the
policy version it last took) and serves each one's weight service
`agent_<i>/agent/sync_weights`, reading the version of every weights file it is sent.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlparse

import torch
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import NodeStatus, wait_for
from std_msgs.msg import UInt8MultiArray

from ami_ros.core.envelope import decode
from ami_ros.core.presets import ACTION_CHOICES, get_preset
from ami_ros.core.schemas import ExperienceStep, encode_experience, weights_schema

PRESET = get_preset('cpu')
AGENTS = ('agent_0', 'agent_1')
SYNC_RETRY = 1.0
# Short rounds (as test_trainer_nodes' FAST); pushes given up after 2 s unanswered.
FAST = {'preset': 'cpu', 'min_new': 16, 'sync_retry': SYNC_RETRY, 'sync_timeout': 2.0,
        'agents': list(AGENTS)}
TRAINERS = {'dynamics_trainer': {**FAST, 'max_batches': 4}, 'policy_trainer': FAST}
MODELS = {'dynamics_trainer': 'dynamics', 'policy_trainer': 'policy'}
STEP_HZ = 10.0


class FakeAgent:
    """One agent's side: its experience at STEP_HZ and its weight service."""

    def __init__(self, test_node, namespace: str, seed: int) -> None:
        self.node = test_node.node
        self.namespace = namespace
        self.gen = torch.Generator().manual_seed(seed)
        self.taken: dict[str, list[tuple[float, int]]] = {m: [] for m in MODELS.values()}
        self.step = 0
        self.publishing = True
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = self.node.create_publisher(UInt8MultiArray, f'{namespace}/experience', qos)
        self.service = None
        self.serve()

    def serve(self) -> None:
        self.service = self.node.create_service(SetParameters, f'{self.namespace}/agent/sync_weights',
                                                self._on_weights)

    def stop_serving(self) -> None:
        self.node.destroy_service(self.service)

    def _on_weights(self, request, response):
        for parameter in request.parameters:
            blob = Path(urlparse(parameter.value.string_value).path).read_bytes()
            version = decode(blob, weights_schema(parameter.name), None).int_meta('version')
            self.taken[parameter.name].append((time.monotonic(), version))
        response.results = [SetParametersResult(successful=True) for _ in request.parameters]
        return response

    def versions(self, model: str) -> list[int]:
        return [v for _, v in self.taken[model]]

    def version(self, model: str) -> int:
        return self.taken[model][-1][1] if self.taken[model] else 0

    def publish(self) -> None:
        heads = len(ACTION_CHOICES)
        step = ExperienceStep(
            observation=torch.zeros(3, 84, 84, dtype=torch.uint8),
            latent=torch.randn(PRESET.encoder.latent, generator=self.gen),
            hidden=torch.zeros(PRESET.dynamics.depth, PRESET.dynamics.dim, dtype=torch.complex64),
            action=torch.randint(0, 2, (heads,), generator=self.gen), log_prob=torch.full((heads,), -0.7),
            value=0.0, reward=float(torch.rand((), generator=self.gen)), stamp_ns=time.time_ns(),
            step=self.step, continues=self.step > 0, preset='cpu',
            versions={'encoder': 0, 'decoder': 0, 'dynamics': self.version('dynamics'),
                      'policy': self.version('policy')})
        self.pub.publish(UInt8MultiArray(data=encode_experience(step)))
        self.step += 1


def _play(agents: list[FakeAgent], stop: threading.Event) -> None:
    while not stop.wait(1.0 / STEP_HZ):
        for agent in agents:
            if agent.publishing:
                agent.publish()


def test_one_set_of_trainers_learns_from_and_pushes_to_two_agents(launch, test_node):
    status = NodeStatus(test_node)
    agents = [FakeAgent(test_node, ns, seed) for seed, ns in enumerate(AGENTS)]
    stop = threading.Event()
    player = threading.Thread(target=_play, args=(agents, stop), daemon=True)
    player.start()
    try:
        procs = {name: launch(name, parameters=params) for name, params in TRAINERS.items()}
        # Both agents get both trainers' weights, in increasing versions.
        wait_for(lambda: all(a.version(m) >= 2 for a in agents for m in MODELS.values())
                 or not all(p.alive() for p in procs.values()), 45,
                 message=lambda: f'versions {[a.taken for a in agents]}')
        assert all(p.alive() for p in procs.values())
        for agent in agents:
            for model in MODELS.values():
                assert all(a < b for a, b in pairwise(agent.versions(model))), (agent.namespace, model)
        # Each trainer counts every agent's experience, and each agent's pushes.
        wait_for(lambda: all(status.number(n, f'{key}/{ns}') >= 1 for n in TRAINERS for ns in AGENTS
                             for key in ('received', 'pushed_version')), 10,
                 message=lambda: f'per-agent diagnostics: {status.status}')
        for name in TRAINERS:
            assert status.number(name, 'gaps') == 0, status.status[name]
            per_agent = sum(status.number(name, f'received/{ns}') for ns in AGENTS)
            assert status.number(name, 'received') == per_agent, status.status[name]

        # agent_1 dies: agent_0 keeps getting every trainer's new weights, without a long gap.
        agents[1].stop_serving()
        agents[1].publishing = False
        died = time.monotonic()
        before = {m: agents[0].version(m) for m in MODELS.values()}
        wait_for(lambda: all(agents[0].version(m) >= before[m] + 3 for m in MODELS.values()), 20,
                 message=lambda: f'agent_0 versions after agent_1 died: {agents[0].taken}')
        for model in MODELS.values():
            stamps = [died] + [at for at, _ in agents[0].taken[model] if at > died]
            assert max(b - a for a, b in pairwise(stamps)) < 5.0, (model, stamps)
        wait_for(lambda: all('agent_1' in status.get(n, 'last_sync') for n in TRAINERS), 10,
                 message=lambda: f"agent_1's failure in the diagnostics: {status.status}")
        assert all(status.get(n, 'last_sync/agent_0') == 'ok' for n in TRAINERS), status.status

        # agent_1 comes back: within one retry it has the newest weights.
        newest = {m: agents[0].version(m) for m in MODELS.values()}
        agents[1].serve()
        back = time.monotonic()
        wait_for(lambda: all(any(at > back for at, _ in agents[1].taken[m]) for m in MODELS.values()),
                 SYNC_RETRY + 1.0 + 1.0, message='weights for the returning agent_1')
        for model in MODELS.values():
            first_at, first = next((at, v) for at, v in agents[1].taken[model] if at > back)
            assert first >= newest[model], (model, first, newest)
            assert first_at - back <= SYNC_RETRY + 1.0, (model, first_at - back)
            print(f'{model}: agent_0 took {agents[0].versions(model)}, agent_1 {agents[1].versions(model)}; '
                  f'back after {first_at - back:.2f} s with version {first}')
        assert all(p.alive() for p in procs.values())
    finally:
        stop.set()
        player.join(timeout=2)
