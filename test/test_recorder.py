"""The recorder node as a real process: topics in, one finished MLflow run out."""

from __future__ import annotations

import json
import math
import signal
import threading
import time

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rclpy.qos import DurabilityPolicy, QoSProfile
from ros_harness import NodeStatus, wait_for
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Float32, UInt32

from ami_ros.record.run_params import node_params
from ami_ros.ros.images import rgb_to_image

# cell_size 100: (10,10) and (50,50) share cell (0,0); then (1,0), (-1,-1), (2,2).
POSES = [(10.0, 10.0), (50.0, 50.0), (150.0, 10.0), (-10.0, -10.0), (250.0, 250.0)]
CELLS = 4


def _status(name: str, **values: str) -> DiagnosticStatus:
    return DiagnosticStatus(name=name, values=[KeyValue(key=k, value=v) for k, v in values.items()])


class CameraAndAgent:
    """Frames at 10 Hz, and the agent's prediction of each while anyone subscribes to it."""

    def __init__(self, node) -> None:
        self.frames = node.create_publisher(Image, 'camera/image_raw', 10)
        self.predictions = node.create_publisher(Image, 'prediction/image_raw', 1)
        self.clock = node.get_clock()
        self.prediction_listeners: list[int] = []  # subscription counts seen, in order
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stop.wait(0.1):
            stamp = self.clock.now().to_msg()
            self.frames.publish(rgb_to_image(rng.integers(0, 255, (84, 84, 3), dtype=np.uint8), stamp))
            listeners = self.predictions.get_subscription_count()
            if not self.prediction_listeners or self.prediction_listeners[-1] != listeners:
                self.prediction_listeners.append(listeners)
            if listeners:  # like the agent: decode only for subscribers, stamped with the frame
                self.predictions.publish(rgb_to_image(np.full((84, 84, 3), 128, np.uint8), stamp,
                                                      'prediction'))


def test_recorder_writes_one_finished_run(launch, test_node, tmp_path):
    uri = 'sqlite:///' + str(tmp_path / 'mlflow.db')
    artifacts = tmp_path / 'artifacts'
    recorder = launch('recorder', parameters={
        'tracking_uri': uri, 'experiment': 'test', 'run_name': 'ros_test',
        'artifact_location': artifacts.as_uri(), 'log_params': 'preset=cpu;world=doom',
        'cell_size': 100, 'image_interval': 2.0, 'map_interval': 1.0, 'flush_interval': 0.5,
        'summary_window': 10})
    node = test_node.node
    # The probe stands in for a node of the graph: a real node whose
    # parameters the recorder asks for once its status names it.
    node.declare_parameter('persistence', 0.8)
    node.declare_parameter('velocity', [1.0, 2.0])
    node.declare_parameter('mode', 'held')
    probe = node.get_fully_qualified_name()
    diagnostics = node.create_publisher(DiagnosticArray, '/diagnostics', 10)
    rewards = node.create_publisher(Float32, 'reward', 50)
    actions = node.create_publisher(Joy, 'action', 50)
    errors = node.create_publisher(Float32, 'prediction_error', 50)
    poses = node.create_publisher(PoseStamped, 'world/pose', 50)
    episodes = node.create_publisher(UInt32, 'world/episode', QoSProfile(
        depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    own_status = test_node.collect(DiagnosticArray, '/diagnostics')
    wait_for(lambda: 'recording to MLflow run' in recorder.output(), 30, message='the run to open')
    for pub in (diagnostics, rewards, actions, errors, poses, episodes):
        wait_for(lambda pub=pub: pub.get_subscription_count() > 0, 10, message=f'{pub.topic} matched')

    feeder = CameraAndAgent(node)
    try:
        diagnostics.publish(DiagnosticArray(status=[
            _status('/agent', steps='100', latency_p99_ms='12.5', preset='cpu', active='True'),
            _status('/vae_trainer', rounds='3', loss='0.25'), _status(probe),
            _status('/elsewhere/agent', steps='999999')]))  # another namespace: not this run's
        time.sleep(0.3)
        for i in range(20):  # a step: its action, then its reward, as the agent sends them
            actions.publish(Joy())
            time.sleep(0.01)
            rewards.publish(Float32(data=float(i)))
            errors.publish(Float32(data=0.5))
            time.sleep(0.01)
        # Episode 1 visits CELLS cells, episode 2 one; each number goes out
        # before the episode's poses, as doom_world sends them. The recorder's
        # own status says when it has taken each in, which keeps the two
        # topics in that order.
        def recorder_has(**values: int):
            status = [s for _, msg in own_status for s in msg.status if s.name == '/recorder']
            latest = {kv.key: kv.value for kv in status[-1].values} if status else {}
            return all(latest.get(key) == str(value) for key, value in values.items())

        for number, positions in ((1, POSES), (2, [(10.0, 10.0), (20.0, 30.0)])):
            episodes.publish(UInt32(data=number))
            wait_for(lambda n=number: recorder_has(episode=n, episode_cells=0), 10,
                     message=f'the recorder in episode {number}')
            for x, y in positions:
                pose = PoseStamped()
                pose.pose.position.x, pose.pose.position.y = x, y
                poses.publish(pose)
            cells = len({(math.floor(x / 100), math.floor(y / 100)) for x, y in positions})
            wait_for(lambda c=cells: recorder_has(episode_cells=c), 10,
                     message=f'{cells} cells in episode {number}')
        episodes.publish(UInt32(data=3))
        wait_for(lambda: recorder_has(episode=3), 10, message='the recorder in episode 3')
        diagnostics.publish(DiagnosticArray(status=[_status('/agent', steps='120', latency_p99_ms='13.0')]))
        # Taken in before the stop below: a message still queued at SIGINT is
        # not part of the summary.
        wait_for(lambda: recorder_has(agent_steps=120), 10, message='the agent at step 120')
        # A sample: the recorder subscribes to predictions, saves a picture, unsubscribes.
        wait_for(lambda: list(artifacts.glob('*/artifacts/frames/*.png')), 20, message='a frame sample')
        wait_for(lambda: feeder.prediction_listeners[-1] == 0, 5, message='the unsubscription')
        assert 1 in feeder.prediction_listeners
        wait_for(lambda: list(artifacts.glob('*/artifacts/exploration/step_*.png')), 5,
                 message='a map snapshot')
        wait_for(lambda: list(artifacts.glob('*/artifacts/parameters.yaml')), 10,
                 message="the probe's parameters")
    finally:
        feeder.stop.set()
        feeder.thread.join(2)
    assert recorder.stop(signal.SIGINT) == 0, recorder.output()
    assert 'finished: 120 agent steps' in recorder.output()

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name('test').experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == 'FINISHED' and run.info.run_name == 'ros_test'
    # Filed under MLflow's model-training view, and the link it logs opens the run there.
    assert client.get_experiment(run.info.experiment_id).tags.get('mlflow.experimentKind') == \
        'custom_model_development'
    assert (f'/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}'
            '?workflowType=machine_learning') in recorder.output()
    launch_args = {k: v for k, v in run.data.params.items() if '/' not in k}
    assert launch_args == {'preset': 'cpu', 'world': 'doom', 'cell_size': '100'}
    # The probe's parameters as it has them; none for the statuses without a
    # node behind them (/agent, /vae_trainer here).
    name = probe.lstrip('/')
    own = {p: v.value for p, v in node.get_parameters_by_prefix('').items()}  # ROS's own too
    assert {k: v for k, v in run.data.params.items() if '/' in k} == node_params(name, own)
    assert (run.data.params[f'{name}/persistence'], run.data.params[f'{name}/velocity'],
            run.data.params[f'{name}/mode']) == ('0.8', '[1.0, 2.0]', 'held')

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)

    reward = history('reward')
    assert sorted(m.value for m in reward) == [float(i) for i in range(20)]
    # The agent's steps, counted by its actions from the status's 100. Two topics
    # keep no order between them, so a reward may take its step one late.
    steps = [m.step for m in sorted(reward, key=lambda m: m.value)]
    assert steps == sorted(steps) and 101 <= steps[0] <= 102 and 120 <= steps[-1] <= 121, steps
    assert len(history('prediction_error')) == 20
    assert [m.value for m in history('agent/latency_p99_ms')] == [12.5, 13.0]
    assert max(m.value for m in history('agent/steps')) == 120
    assert [m.value for m in history('vae_trainer/loss')] == [0.25]
    assert history('world/cells_visited')[-1].value == CELLS
    assert [m.value for m in history('world/episode_cells')] == [CELLS, 1]
    assert not any(key.startswith(('agent/preset', 'agent/active', 'elsewhere')) for key in run.data.metrics)

    root = artifacts / run.info.run_id / 'artifacts'
    import yaml

    dumped = yaml.safe_load((root / 'parameters.yaml').read_text())  # a ROS 2 parameters file
    assert dumped == {probe: {'ros__parameters': own}}
    world_map = cv2.imread(str(root / 'exploration_map.png'))
    assert world_map is not None and world_map.ndim == 3
    frame = cv2.imread(str(sorted((root / 'frames').glob('*.png'))[0]))
    assert frame.shape == (252 + 18, 3 * 252 + 2 * 4, 3)  # camera t | predicted t+1 | camera t+1
    assert json.loads((root / 'exploration' / 'cells.json').read_text())['cells_visited'] == CELLS
    summary = json.loads((root / 'summary.json').read_text())
    assert summary['run_id'] == run.info.run_id
    assert summary['steps'] == 120 and summary['rounds'] == {'vae_trainer': 3}
    assert summary['losses'] == {'vae_trainer/loss': 0.25}
    assert summary['cells_visited'] == CELLS
    assert summary['reward_mean_last_n'] == 14.5 and summary['reward_count'] == 20


def test_recorder_of_several_agents_keeps_each_agents_metrics_and_map(launch, test_node, tmp_path):
    """agents:=2: each agent's topics and status under its namespace, one step axis (agent_0's)."""
    uri = 'sqlite:///' + str(tmp_path / 'mlflow.db')
    artifacts = tmp_path / 'artifacts'
    recorder = launch('recorder', parameters={
        'tracking_uri': uri, 'experiment': 'agents', 'artifact_location': artifacts.as_uri(),
        'cell_size': 100, 'image_interval': 0.0, 'map_interval': 0.0, 'flush_interval': 0.5,
        'agents': ['agent_0', 'agent_1'], 'step_node': 'agent_0/agent',
        'nodes': ['agent_0/agent', 'agent_1/agent', 'vae_trainer']})
    node = test_node.node
    status = NodeStatus(test_node)
    diagnostics = node.create_publisher(DiagnosticArray, '/diagnostics', 10)
    pubs = {(agent, topic): node.create_publisher(kind, f'{agent}/{topic}', 50)
            for agent in ('agent_0', 'agent_1')
            for topic, kind in (('action', Joy), ('reward', Float32), ('world/pose', PoseStamped))}
    episodes = node.create_publisher(UInt32, 'agent_1/world/episode', QoSProfile(
        depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    wait_for(lambda: 'recording to MLflow run' in recorder.output(), 30, message='the run to open')
    for pub in [diagnostics, episodes, *(p for (a, t), p in pubs.items() if (a, t) != ('agent_1', 'action'))]:
        wait_for(lambda pub=pub: pub.get_subscription_count() > 0, 10, message=f'{pub.topic} matched')

    diagnostics.publish(DiagnosticArray(status=[
        _status('/agent_0/agent', steps='100', rate_hz='10.0'),
        _status('/agent_1/agent', steps='40', rate_hz='9.5'),
        _status('/agent_7/agent', rate_hz='1.0'),  # nested, not a node of this graph
        _status('/agent_1/agent/extra', rate_hz='2.0')]))
    wait_for(lambda: status.get('recorder', 'agent_steps') == '100', 10, message="agent_0's steps")
    for _ in range(30):  # agent_1 steps too, but its steps are not the metrics' axis
        pubs['agent_1', 'action'].publish(Joy())
    for i in range(5):
        pubs['agent_0', 'action'].publish(Joy())
        time.sleep(0.01)
        pubs['agent_0', 'reward'].publish(Float32(data=float(i)))
        pubs['agent_1', 'reward'].publish(Float32(data=10.0 + i))
    positions = {'agent_0': [(10.0, 10.0), (150.0, 10.0)],
                 'agent_1': [(10.0, 10.0), (50.0, 50.0), (-10.0, -10.0), (250.0, 250.0)]}
    episodes.publish(UInt32(data=1))
    wait_for(lambda: status.get('recorder', 'agent_1/episode') == '1', 10, message='agent_1 in episode 1')
    for agent, points in positions.items():
        for x, y in points:
            pose = PoseStamped()
            pose.pose.position.x, pose.pose.position.y = x, y
            pubs[agent, 'world/pose'].publish(pose)
    cells = {agent: len({(math.floor(x / 100), math.floor(y / 100)) for x, y in points})
             for agent, points in positions.items()}
    wait_for(lambda: all(status.get('recorder', f'{a}/cells_visited') == str(c) for a, c in cells.items()),
             10, message='both maps')
    assert status.get('recorder', 'cells_visited') == str(sum(cells.values()))
    episodes.publish(UInt32(data=2))
    wait_for(lambda: status.get('recorder', 'agent_1/episode') == '2', 10, message='agent_1 in episode 2')
    assert recorder.stop(signal.SIGINT) == 0, recorder.output()

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name('agents').experiment_id])

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)

    assert [m.value for m in history('agent_0/agent/rate_hz')] == [10.0]
    assert [m.value for m in history('agent_1/agent/rate_hz')] == [9.5]
    assert [m.value for m in history('agent_1/agent/steps')] == [40.0]
    assert history('agent_0/world/cells_visited')[-1].value == cells['agent_0'] == 2
    assert history('agent_1/world/cells_visited')[-1].value == cells['agent_1'] == 3
    assert [m.value for m in history('agent_1/world/episode_cells')] == [cells['agent_1']]
    assert sorted(m.value for m in history('agent_0/reward')) == [0.0, 1.0, 2.0, 3.0, 4.0]
    # Both agents' rewards on agent_0's steps (100 + its 5 actions): agent_1's 30 do not count.
    rewards = history('agent_1/reward')
    assert sorted(m.value for m in rewards) == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert all(100 <= m.step <= 106 for m in rewards + history('agent_0/reward')), rewards
    assert not [k for k in run.data.metrics if k.startswith(('agent_7', 'agent_1/agent/extra', 'reward',
                                                            'world/'))]
    root = artifacts / run.info.run_id / 'artifacts'
    for agent, count in cells.items():
        assert cv2.imread(str(root / agent / 'exploration_map.png')) is not None
        assert json.loads((root / agent / 'exploration' / 'cells.json').read_text())['cells_visited'] == count
    summary = json.loads((root / 'summary.json').read_text())
    assert summary['steps'] == 100 and summary['cells_visited'] == 5
    assert {a: s['cells_visited'] for a, s in summary['agents'].items()} == cells
    assert summary['agents']['agent_1']['reward_mean_last_n'] == 12.0
