"""The launcher's eyes on the graph: rates, latency, rewards and state from the graph's topics.

`ami-ros launch` draws its status line (GraphStatus) from a StatusMonitor,
and calls ami/shutdown through it. It watches every agent: with agents:=N the
actions of each are counted apart (the line shows each agent's rate), the
first agent's steps stand for the graph's.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ami_ros.core.timing import LatencyWindow, RateMeter
from ami_ros.graph import LAUNCH_STATUS, relative_name

REWARD_WINDOW = 100
TRAINER_LABELS = {'vae_trainer': 'vae', 'dynamics_trainer': 'dyn', 'policy_trainer': 'ppo'}
STATUS_WIDTH = 120  # the status line never wraps: a wrapped line cannot be erased in place


@dataclass
class GraphStatus:
    """What the status line says: the graph's state, how it acts, how it learns."""

    state: str = 'starting'
    uptime: float = 0.0  # seconds
    frames_hz: float = 0.0
    actions_hz: float = 0.0
    latency_ms: float = math.nan  # frame -> action, p50
    reward: float = math.nan  # mean of the last REWARD_WINDOW steps: one step's is noise
    steps: str = ''  # as the agent reports it; '' until it does
    losses: dict[str, str] = field(default_factory=dict)  # trainer ('vae', 'dyn', 'ppo') -> loss
    restarts: int = 0  # nodes restarted by the launcher, all together
    agents_hz: tuple[float, ...] = ()  # each agent's actions/s, with several agents

    def fields(self) -> list[tuple[int, str]]:
        """(drop rank, text) in display order; when the line is too long the
        highest rank goes first, so what tells whether it runs stays longest."""
        up = int(self.uptime)
        fields = [(0, f'{self.state} {up // 3600}:{up // 60 % 60:02d}:{up % 60:02d}'),
                  (1, f'{self.frames_hz:.1f} fps'),
                  (1, f'{self.actions_hz:.1f} actions/s'
                      + (f' ({" ".join(f"{hz:.1f}" for hz in self.agents_hz)})' if self.agents_hz else '')
                      + (f' in {self.latency_ms:.1f} ms' if math.isfinite(self.latency_ms) else '')),
                  (4, f'reward {_short_number(self.reward)}')]
        if self.steps:
            fields.append((5, f'step {self.steps}'))
        if self.losses:
            fields.append((3, 'loss ' + ' '.join(f'{name} {_short_number(loss)}'
                                                 for name, loss in self.losses.items())))
        if self.restarts:
            fields.insert(1, (2, f'restarts {self.restarts}'))
        return fields

    def render(self, width: int = STATUS_WIDTH) -> str:
        """One line of at most `width` characters: whole fields dropped, never cut, but the first."""
        fields = self.fields()
        while True:
            text = ' | '.join(t for _, t in fields)
            if len(text) <= width or len(fields) == 1:
                return text[:width]
            highest = max(rank for rank, _ in fields)
            drop = max(i for i, (rank, _) in enumerate(fields) if rank == highest)
            fields.pop(drop)


def _short_number(value: float | str, spec: str = '.3g') -> str:
    """`value` (a float or a diagnostic's string) in `spec`; '-' while unknown."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return '-'
    return '-' if math.isnan(number) else format(number, spec)


class StatusMonitor:
    """Rates, latency and graph state from the graph's own topics."""

    def __init__(self, namespace: str, agents: Sequence[str] = ('',)) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image, Joy
        from std_msgs.msg import Float32, String

        from ami_ros.ros.diagnostics import NodeDiagnostics
        from ami_ros.ros.images import stamp_ns

        self._rclpy = rclpy
        self._stamp_ns = stamp_ns
        self.context = rclpy.Context()
        rclpy.init(context=self.context, args=['ami-ros-launch', '--ros-args', '--disable-rosout-logs'],
                   signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
        # Named LAUNCH_STATUS: its /diagnostics status (restarts per node) is the recorder's to record.
        self.node = rclpy.create_node(LAUNCH_STATUS, namespace=namespace or None,
                                      context=self.context, enable_rosout=False)
        self.report = NodeDiagnostics(self.node)
        self.frames = RateMeter()
        self.actions = RateMeter()
        self.latency = LatencyWindow(100)
        self.rewards: deque[float] = deque(maxlen=REWARD_WINDOW)
        self.state = 'starting'
        self.prefix = f'/{namespace.strip("/")}/'.replace('//', '/')  # the graph's, in status names
        self.health: dict[str, dict[str, str]] = {}  # node path ('agent_1/agent') -> latest values
        self.agents = list(agents)
        self.agent_actions = {ns: RateMeter() for ns in self.agents}
        for ns in self.agents:  # every agent's: the line shows the graph's rates and each agent's
            self.node.create_subscription(Image, relative_name(ns, 'camera/image_raw'),
                                          lambda m: self.frames.tick(), qos_profile_sensor_data)
            self.node.create_subscription(Joy, relative_name(ns, 'action'),
                                          lambda m, ns=ns: self._on_action(m, ns), 10)
            self.node.create_subscription(Float32, relative_name(ns, 'reward'), self._on_reward, 10)
        self.node.create_subscription(
            String, 'ami/state', lambda m: setattr(self, 'state', m.data),
            QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 20)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # context shut down at exit
            pass

    def _on_action(self, msg, namespace: str) -> None:
        self.actions.tick()
        self.agent_actions[namespace].tick()
        now = self.node.get_clock().now().nanoseconds
        stamp = self._stamp_ns(msg)
        if stamp:
            self.latency.add((now - stamp) / 1e6)

    def _on_reward(self, msg) -> None:
        self.rewards.append(msg.data)

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith(self.prefix):
                self.health[status.name[len(self.prefix):]] = {kv.key: kv.value for kv in status.values}

    def snapshot(self, started: float, restarts: int = 0) -> GraphStatus:
        """The graph now, as the status line shows it."""
        losses = {label: self.health[trainer].get('loss', '')
                  for trainer, label in TRAINER_LABELS.items() if trainer in self.health}
        first = self.agents[0]
        agent = self.health.get(relative_name(first, 'agent'), {})
        rewards = self.rewards.copy()  # copying is atomic; the spinning thread appends
        return GraphStatus(state=self.state, uptime=time.monotonic() - started,
                           frames_hz=self.frames.rate(), actions_hz=self.actions.rate(),
                           latency_ms=self.latency.summary()['p50'],
                           reward=statistics.fmean(rewards) if rewards else math.nan,
                           steps=agent.get('steps', ''), losses=losses, restarts=restarts,
                           agents_hz=tuple(self.agent_actions[ns].rate() for ns in self.agents)
                           if len(self.agents) > 1 else ())

    def shutdown_graph(self, timeout: float) -> str:
        """Call ami/shutdown; the manager's answer or why there is none."""
        from std_srvs.srv import Trigger

        client = self.node.create_client(Trigger, 'ami/shutdown')
        try:
            if not client.wait_for_service(timeout_sec=2.0):
                return 'the manager does not answer; stopping the nodes with SIGINT'
            future = client.call_async(Trigger.Request())
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not future.done():
                return f'no answer from ami/shutdown within {timeout:g} s; stopping with SIGINT'
            return future.result().message
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        # The spinning thread leaves rclpy before the node and context go.
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
