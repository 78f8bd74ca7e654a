"""recorder: records the launch's training in one MLflow run.

One process writes the run, so several processes never write one run and
no node ever waits on the tracking store: every callback here only appends
to a buffer, and a writer thread (ami_ros.record.mlflow_run.BackgroundRecorder)
opens the run, writes metrics with one log_batch per `flush_interval` and
logs the artifacts. A store that cannot be reached or created gives one
error line (which URI, what to do) and the node runs on without recording.
The experiment is marked as model training and the run's page is logged with
that view selected: MLflow 3's UI otherwise lists the run as a GenAI evaluation.

Subscribes (relative names, except /diagnostics; only while active, but
/diagnostics keeps the summary current while paused):
  reward, prediction_error  std_msgs/Float32 from the agent -> metrics `reward`,
                            `prediction_error`
  action                    sensor_msgs/Joy, one per agent step -> the metric step
  /diagnostics              diagnostic_msgs/DiagnosticArray: every value of a
                            status named <namespace>/<node> (this recorder's
                            namespace) that parses as a finite float -> metric
                            `<node>/<key>` (agent/latency_p99_ms, vae_trainer/loss,
                            policy_trainer/rounds, ...); only the `nodes` of the
                            graph, and names MLflow takes (ami_ros.record.admission)
  world/pose                geometry_msgs/PoseStamped (doom_world) -> exploration
                            map; metric `world/cells_visited`; a pose outside
                            +-`map_extent` is ignored
  world/episode             std_msgs/UInt32 (doom_world) -> metric
                            `world/episode_cells`: the cells one episode visited,
                            logged as the next starts (how far the agent gets
                            from where it started; respawns do not count)
  camera/image_raw,         sensor_msgs/Image, only around a sample every
  prediction/image_raw      `image_interval` s (ami_ros.ros.prediction_samples)
With `agents` (namespaces under this one), each agent's topics are
`<agent>/<topic>`, its metrics `<agent>/reward`, `<agent>/world/cells_visited`,
..., its map its own (ami_ros.record.agent_track), and known `nodes`
'<agent>/agent' give `<agent>/agent/<key>`; its status keys are
`<agent>/cells_visited`, `<agent>/episode`, `<agent>/episode_cells` (plain
`cells_visited`: their sum). Only the step node's agent's actions advance
the step axis; frame samples are of that agent only.
Publishes:
  /diagnostics              its own status: run id, metrics logged, pending, cells,
                            the current episode (-1 before the first) and its cells,
                            the agent's steps last heard (-1 before any), and
                            `refused`: what it ignored of what peers sent

Metric steps: the agent's step count (its diagnostics' `steps`, advanced by
one per action between two diagnostics: every step publishes one action, but
the first step of a run has no reward), else seconds since start until the
agent is heard. MLflow also keeps each value's wall time. A
diagnostic value that changed while the recorder was paused (the counters of
a final checkpoint, saved with the graph paused) is logged once more at the
end, so the run's metrics end where its summary does.

Run params: the launch arguments (`log_params`), and every node it hears
on /diagnostics as `<node>/<parameter>` with the value the node runs with
(asked once per node through its parameter services: ami_ros.ros.node_parameters);
the same as a ROS 2 parameters file, artifact parameters.yaml, which
`params_file:=` takes back.

Artifacts: frames/step_<step>.png (camera t | predicted t+1 | camera t+1),
exploration/step_<step>.png (every `map_interval` s), exploration_map.png and
exploration/cells.json (at the end), summary.json (at the end: steps,
rounds per trainer, final losses, cells visited, reward mean over the last
`summary_window` steps). With `agents`: exploration artifacts per agent
(agent_1/exploration_map.png); summary.json sums cells, pools rewards, and
has each agent's under `agents`.

Parameters: described where they are declared below, and in docs/parameters.md.

The run ends (FINISHED, summary written) on SIGINT/SIGTERM or the lifecycle
shutdown; stop the recorder after the nodes it records, so their last
diagnostics are in.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import numpy as np
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.impl.rcutils_logger import RcutilsLogger
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import Joy
from std_msgs.msg import Float32, UInt32

from ami_ros.record.admission import MAP_EXTENT, MAX_NODES, NodeAdmission, pose_problem, recordable
from ami_ros.record.agent_track import AgentTrack, tracks_status, tracks_summary
from ami_ros.record.mlflow_run import (
    BackgroundRecorder,
    RunRecorder,
    iter_numeric,
    resolve_tracking_uri,
    run_page_url,
)
from ami_ros.record.run_params import node_params, parameters_file, parse_params
from ami_ros.record.summary import RunStats, summary_line
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.managed_node import ManagedNode, run
from ami_ros.ros.node_parameters import NodeParameterReader
from ami_ros.ros.prediction_samples import PredictionSampler
from ami_ros.view.scene import normal_namespace

CLOSE_TIMEOUT = 8.0  # s for the last flush + artifacts; the launcher kills after 10 s


class RecorderNode(ManagedNode):
    def __init__(self) -> None:
        super().__init__('recorder')
        uri = self.declare('tracking_uri', '', "MLflow tracking store; '' = $MLFLOW_TRACKING_URI, "
                           'else sqlite:///mlflow.db in the working directory.')
        self.experiment = self.declare('experiment', 'ami_ros', 'MLflow experiment name.')
        self.run_name = self.declare('run_name', '', "MLflow run name; '' = the start time.")
        self.artifact_location = self.declare(
            'artifact_location', '', "Artifact root of a newly created experiment; '' = "
            '<db dir>/mlruns/<experiment> for a sqlite store, the server\'s default otherwise.')
        # A string from a params file, a list from the launcher: dynamic typing takes both.
        raw_params = self.declare_parameter('log_params', '', ParameterDescriptor(
            description="Run params: 'k=v;k=v' or a list of 'k=v' (the graph's launch arguments).",
            dynamic_typing=True)).value
        self.flush_interval = self.declare('flush_interval', 5.0, 'Seconds between writes to the store.',
                                           low=0.1, high=3600.0)
        self.cell_size = self.declare('cell_size', 64, 'Exploration map cell size in map units.',
                                      low=1, high=1_000_000)
        self.image_interval = self.declare(
            'image_interval', 60.0, 'Seconds between frame/prediction image samples; 0 = none.',
            low=0.0, high=86400.0)
        self.map_interval = self.declare(
            'map_interval', 60.0, 'Seconds between exploration map snapshots; 0 = only at the end.',
            low=0.0, high=86400.0)
        window = self.declare('summary_window', 100, 'Rewards averaged for the end-of-run summary.',
                              low=1, high=1_000_000)
        self.step_node = self.declare('step_node', 'agent',
                                      "Node whose diagnostics' `steps` is the metrics' step axis.")
        self.map_extent = self.declare('map_extent', MAP_EXTENT, 'Poses farther than this from the '
                                       'map origin (map units) are ignored.', low=1.0, high=1e9)
        nodes = self.declare('nodes', [], "Nodes whose statuses are recorded (the launch gives the graph's); "
                             f'none = the first {MAX_NODES} node names heard.')
        agents = self.declare('agents', [], "Namespaces of the agents, relative to this node's (agent_0, "
                              "agent_1, ...), each recorded with its own metrics and map; none = this "
                              "node's own.", read_only=True)

        try:
            self.run_params = parse_params(raw_params if raw_params else None)
        except ValueError as exc:  # a launcher slip must not cost the record
            self.get_logger().warning(f'{exc}; logging log_params as one param')
            self.run_params = {'log_params': str(raw_params)}
        self.run_params.setdefault('cell_size', str(self.cell_size))
        self.tracking_uri = resolve_tracking_uri(uri)

        self.admission = NodeAdmission(self.get_namespace(), self.get_fully_qualified_name(), nodes)
        self.refused = 0  # statuses, metrics and poses refused
        names = list(dict.fromkeys(normal_namespace(a).strip('/') for a in agents)) or ['']
        self.tracks = [AgentTrack(name, self.cell_size, window) for name in names]
        # The step node's agent steps the metrics: 'agent_0' for 'agent_0/agent'.
        self.step_track = next((t for t in self.tracks if t.name == self.step_node.rpartition('/')[0]),
                               self.tracks[0])
        self.stats = RunStats(self.step_node)
        self._last_logged: dict[str, float] = {}  # '<node>/<key>' -> the value last logged
        self.writer: BackgroundRecorder | None = None
        self._t0 = time.monotonic()
        self._agent_steps: int | None = None
        self._actions_since_status = 0
        self._last_step = 0
        self.images_logged = 0
        self.samples = PredictionSampler(self, self._on_sample_picture, prefix=self.step_track.prefix)
        self.node_parameters = NodeParameterReader(self, self._on_node_parameters)
        self._opened = False
        self._exiting = False

        # Before `reward`: rclpy takes ready messages in this order, so a step's
        # action, sent first, counts before its reward is logged.
        self.create_subscription(Joy, self.step_track.key('action'), self.on_action, 100)
        for track in self.tracks:
            self.create_subscription(Float32, track.key('reward'),
                                     lambda msg, t=track: self.on_reward(t, msg), 100)
            self.create_subscription(Float32, track.key('prediction_error'),
                                     lambda msg, t=track: self.on_prediction_error(t, msg), 100)
            self.create_subscription(PoseStamped, track.key('world/pose'),
                                     lambda msg, t=track: self.on_pose(t, msg), 50)
            self.create_subscription(UInt32, track.key('world/episode'),
                                     lambda msg, t=track: self.on_episode(t, msg),
                                     QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.create_subscription(DiagnosticArray, '/diagnostics', self.on_diagnostics, 50)
        self.create_timer(1.0, self._tick)
        if self.image_interval > 0:
            self.create_timer(self.image_interval, self._start_sample)
        if self.map_interval > 0:
            self.create_timer(self.map_interval, self._snapshot_map)
        self.diagnostics = NodeDiagnostics(self)

    # -- lifecycle ------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.writer is None:  # one run per process, even across cleanup/configure
            self.writer = BackgroundRecorder(self._open_run, self.flush_interval,
                                             on_open=self._on_open, on_error=self._on_writer_error)
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.samples.stop()
        return super().on_deactivate(state)

    def _open_run(self) -> RunRecorder:
        # Runs on the writer thread: mlflow's import and store migration take seconds.
        import mlflow  # noqa: F401  (its import sets its loggers to INFO: quieten them after it)

        for name in ('mlflow', 'alembic'):
            logging.getLogger(name).setLevel(logging.WARNING)
        return RunRecorder(self.tracking_uri, self.experiment, self.run_name, self.run_params,
                           tags={'ami_ros.recorder': self.admission.own_name,
                                 'ami_ros.namespace': self.get_namespace()},
                           artifact_location=self.artifact_location)

    def _on_open(self, rec: RunRecorder) -> None:
        self._opened = True
        self.diagnostics.set(run_id=rec.run_id, tracking_uri=rec.tracking_uri)
        page = run_page_url(rec.tracking_uri, rec.experiment_id, rec.run_id)
        if not rec.tracking_uri.startswith(('http://', 'https://')):  # no server yet: start the UI
            page = f'mlflow ui --backend-store-uri {rec.tracking_uri}, then {page}'
        self.get_logger().info(
            f'recording to MLflow run {rec.run_id} ({rec.run_name}) at {rec.tracking_uri}; '
            f'open with: {page}')

    def _run_logger(self) -> RcutilsLogger:
        if self._exiting:
            # ROS is down by now: the node's logger would try to publish to /rosout and
            # complain that it cannot.
            return rclpy.logging.get_logger(f'{self.get_name()}.run')
        return self.get_logger()

    def _on_writer_error(self, text: str) -> None:
        if not self._opened:  # may run before self.writer is even assigned
            self._run_logger().error(f'{text}; the graph runs on without recording')
        else:
            self._run_logger().warning(text)

    def _recording(self) -> bool:
        return self.is_active and self.writer is not None and not self.writer.failed

    def _refuse(self, kind: str, reason: str) -> None:
        """One warning line per kind at most every 5 s: a peer's flood must not flood the log."""
        self.refused += 1
        self.warn_throttled(f'refused-{kind}', f'ignoring {reason}')

    # -- steps ----------------------------------------------------------------
    def _step(self) -> int:
        """The agent's step now, never going back; seconds since start until it is heard."""
        if self._agent_steps is None:
            step = int(time.monotonic() - self._t0)
        else:
            step = self._agent_steps + self._actions_since_status
        self._last_step = max(self._last_step, step)
        return self._last_step

    # -- topics ---------------------------------------------------------------
    def on_reward(self, track: AgentTrack, msg: Float32) -> None:
        if not self._recording() or not math.isfinite(msg.data):
            return
        track.rewards.add(msg.data)
        self.writer.add_metric(track.key('reward'), msg.data, self._step())

    def on_action(self, _msg: Joy) -> None:
        # The step agent's only: the other agents' steps are not the metrics' axis.
        self._actions_since_status += 1

    def on_prediction_error(self, track: AgentTrack, msg: Float32) -> None:
        if self._recording() and math.isfinite(msg.data):
            self.writer.add_metric(track.key('prediction_error'), msg.data, self._step())

    def on_diagnostics(self, msg: DiagnosticArray) -> None:
        # Paused, the recorder logs no metrics but keeps the summary current:
        # the nodes report the counters of the final checkpoint (a round that
        # ended during the save, the agent's last steps) while it is paused.
        if self.writer is None or self.writer.failed:
            return
        recording = self._recording()
        for status in msg.status:
            node = self.admission.node_of(status.name)
            if node is None:
                continue
            if problem := self.admission.problem(node):
                self._refuse('node', problem)
                continue
            values = iter_numeric((kv.key, kv.value) for kv in status.values)
            for kind, reason in recordable(node, values, self.step_node):
                self._refuse(kind, reason)
            self.node_parameters.ask(node)
            if node == self.step_node and 'steps' in values:
                self._agent_steps = int(values['steps'])
                self._actions_since_status = 0
            self.stats.update(node, values)
            if not recording:
                continue
            step = self._step()
            for key, value in values.items():
                name = f'{node}/{key}'
                self.writer.add_metric(name, value, step)
                self._last_logged[name] = value

    def _on_node_parameters(self, node: str, parameters: dict[str, Any]) -> None:
        if self.writer is None:
            return
        params = node_params(node, parameters)
        answered = self.node_parameters.parameters
        text = parameters_file({f'{self.admission.prefix}/{n}': p for n, p in answered.items()})
        self.writer.submit(lambda rec: rec.log_params(params))
        # The whole file again: every node's answer completes it.
        self.writer.submit(lambda rec: rec.log_text('parameters.yaml', text))

    def on_pose(self, track: AgentTrack, msg: PoseStamped) -> None:
        if not self._recording():
            return
        x, y = msg.pose.position.x, msg.pose.position.y
        if problem := pose_problem(x, y, self.map_extent):
            self._refuse('pose', problem)
            return
        track.visit(x, y)

    def on_episode(self, track: AgentTrack, msg: UInt32) -> None:
        cells = track.start_episode(msg.data)
        if self._recording() and cells is not None:
            self.writer.add_metric(track.key('world/episode_cells'), cells, self._step())

    # -- periodic work --------------------------------------------------------
    def _log_cells(self) -> None:
        for track in self.tracks:
            if self.writer is not None and (cells := track.new_cells()) is not None:
                self.writer.add_metric(track.key('world/cells_visited'), cells, self._step())

    def _log_changed_while_paused(self) -> None:
        step = self._step()
        for node, values in self.stats.latest.items():
            for key, value in values.items():
                name = f'{node}/{key}'
                if name in self._last_logged and self._last_logged[name] != value:
                    self.writer.add_metric(name, value, step)
                    self._last_logged[name] = value

    def _tick(self) -> None:
        if self._recording():
            self._log_cells()
        self.samples.check_timeout()
        writer = self.writer
        self.diagnostics.set(
            recording=bool(writer and writer.recorder and not writer.failed),
            metrics_logged=writer.metrics_logged if writer else 0,
            pending=writer.pending if writer else 0,
            dropped=writer.dropped if writer else 0,
            images_logged=self.images_logged, **tracks_status(self.tracks),
            agent_steps=-1 if self._agent_steps is None else self._agent_steps, refused=self.refused)
        if writer is not None and writer.failed:
            self.diagnostics.warn('not recording: ' + (writer.error or '')[:200])

    def _snapshot_map(self) -> None:
        if not self._recording():
            return
        for track in self.tracks:
            if track.map.cells_visited:
                # Rendered here: the map changes under this thread's callbacks, never on the writer's.
                rgb = track.map.render()
                name = track.key(f'exploration/step_{self._step():08d}.png')
                self.writer.submit(lambda rec, name=name, rgb=rgb: rec.log_image(name, rgb))

    # -- frame / prediction samples --------------------------------------------
    def _start_sample(self) -> None:
        if self._recording():
            self.samples.start()

    def _on_sample_picture(self, picture: np.ndarray) -> None:
        if self.writer is not None:
            name = f'frames/step_{self._step():08d}.png'
            self.writer.submit(lambda rec: rec.log_image(name, picture))
            self.images_logged += 1

    # -- the end --------------------------------------------------------------
    def on_exit(self) -> None:
        writer = self.writer
        if writer is None:
            return
        if writer.failed:
            return
        self._log_cells()
        self._log_changed_while_paused()
        extra = {**tracks_summary(self.tracks), 'cell_size': self.cell_size,
                 'images_logged': self.images_logged, 'tracking_uri': self.tracking_uri,
                 'experiment': self.experiment}
        summary = self.stats.summary(extra)
        maps = [(t, t.map.render(), t.map.to_json()) for t in self.tracks if t.poses]

        def final(rec: RunRecorder) -> None:
            for track, map_rgb, cells in maps:
                rec.log_image(track.key('exploration_map.png'), map_rgb)
                rec.log_json(track.key('exploration/cells.json'), cells)
            summary.update(run_id=rec.run_id, run_name=rec.run_name,
                           metrics_logged=rec.metrics_logged, dropped_metrics=writer.dropped)
            rec.log_json('summary.json', summary)

        self._exiting = True
        logger = self._run_logger()
        if writer.close(final, CLOSE_TIMEOUT) and writer.recorder is not None and writer.error is None:
            logger.info(f'MLflow run {writer.recorder.run_id} finished: {summary_line(summary)}')
        elif writer.recorder is None:
            logger.error(f'MLflow store {self.tracking_uri} did not open within the run; nothing recorded')
        else:
            logger.error(f'MLflow run {writer.recorder.run_id} may be incomplete: '
                         f'{writer.error or f"the store did not answer within {CLOSE_TIMEOUT:g} s"}')


def main(args: list[str] | None = None) -> int:
    return run(RecorderNode, args)


if __name__ == '__main__':
    sys.exit(main())
