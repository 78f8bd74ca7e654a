"""viewer: the graph live in a browser, through a Rerun recording (`view:=true`, `ami-ros run viewer`).

Subscribes (best effort, except the latched map and trail), per agent
namespace (`agents`; none = this node's own, relative names):
  camera/image_raw                         sensor_msgs/Image, decimated to `image_rate`
  prediction/image_raw                     sensor_msgs/Image, one every `prediction_interval`:
                                           subscribed for one frame at a time (the agent
                                           decodes predictions only while subscribed)
  reward, prediction_error                 std_msgs/Float32 (one reward per agent step: the
                                           step clock between two agent diagnostics)
  world/pose                               geometry_msgs/PoseStamped (doom_world)
  world/map, world/path                    nav_msgs/OccupancyGrid, nav_msgs/Path (latched)
  /diagnostics                             every numeric value of the agent's namespace's
                                           nodes; each trainer's loss and the agent's
                                           frame->action latency in their own plots; weight
                                           versions as events
Publishes:
  /diagnostics                             what it logged, images passed and held back

Everything goes into one Rerun recording (ami_ros.view): one entity tree per
agent, timelines `step` (the agent's steps: its diagnostics' count plus one per
reward since) and `wall_time` (capture stamps of images and poses, arrival for
the rest), and the layout of ami_ros.view.layout. It serves rerun's web
viewer on `view_host:view_port` (127.0.0.1 by default) and prints the URL once;
`save` also writes the stream to an .rrd file (`rerun FILE.rrd` opens it).

It must never slow the agent: its own process at a lower priority (`nice`),
best-effort subscriptions, images decimated. Not among the manager's nodes
(like web_api): a paused graph is still shown; it ends once the manager has
shut the graph down. Without rerun-sdk, a busy port or a server that does not
start it says so in one line and exits 0: the graph runs on without it.

Parameters: declared below, and in docs/parameters.md.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import OccupancyGrid
from nav_msgs.msg import Path as PathMsg
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Float32

from ami_ros.record.mlflow_run import iter_numeric
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.images import FrameReader, stamp_ns
from ami_ros.ros.managed_node import ManagedNode, run
from ami_ros.ros.manager_watch import ManagerWatch
from ami_ros.ros.process_priority import yield_cpu
from ami_ros.view import rerun_missing
from ami_ros.view.scene import (
    AgentEntities,
    DiagnosticsView,
    MapFrame,
    RateGate,
    StepClock,
    heading_vector,
    normal_namespace,
    occupancy_to_rgb,
    split_status_name,
    yaw,
)

BEST_EFFORT = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
NEWEST_IMAGE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
ARROW_PIXELS = 4.0
PREDICTION_WAIT = 5.0  # s a prediction subscription waits before it is made again
CLOSE_TIMEOUT = 4.0  # s for the .rrd's last flush, and again for the server; launchers kill after 10 s


class AgentFeed:
    """One agent's subscriptions and what the view needs to remember of it."""

    def __init__(self, node: ViewerNode, entities: AgentEntities, own: bool) -> None:
        self.node = node
        self.entities = entities
        self.clock = StepClock()
        self.diagnostics = DiagnosticsView(entities)
        self.map_frame: MapFrame | None = None
        self.gates = {'camera': RateGate(node.image_rate), 'prediction': RateGate(node.image_rate)}
        topic = lambda name: entities.topic(name, own)  # noqa: E731
        sub = node.create_subscription
        if node.image_rate > 0:
            sub(Image, topic('camera/image_raw'), lambda m: self.on_image('camera', m), NEWEST_IMAGE)
        self._prediction_topic = topic('prediction/image_raw')
        self._prediction_sub = None
        self._prediction_asked = 0.0
        if node.prediction_interval > 0:
            node.create_timer(node.prediction_interval, self.ask_prediction)
        sub(Float32, topic('reward'), self.on_reward, BEST_EFFORT)
        sub(Float32, topic('prediction_error'), lambda m: self.on_scalar(entities.prediction_error, m),
            BEST_EFFORT)
        sub(PoseStamped, topic('world/pose'), self.on_pose, BEST_EFFORT)
        sub(OccupancyGrid, topic('world/map'), self.on_map, LATCHED)
        sub(PathMsg, topic('world/path'), self.on_path, LATCHED)

    def on_image(self, which: str, msg: Image) -> None:
        stream = self.node.stream
        if stream is None or not self.gates[which].open():
            return
        rgb = self.node.frames.observation(msg)
        if rgb is not None:
            path = self.entities.camera if which == 'camera' else self.entities.prediction
            stream.image(path, rgb, self.clock.now(), stamp_ns(msg) / 1e9 or time.time())

    # The agent decodes a prediction each step only while someone subscribes: subscribe for
    # one, then leave, so the agent decodes a few per interval rather than one every step.
    def ask_prediction(self) -> None:
        if self._prediction_sub is not None:
            if time.monotonic() - self._prediction_asked < PREDICTION_WAIT:
                return
            self._end_prediction()  # none came (a paused graph): ask again next time
        self._prediction_asked = time.monotonic()
        self._prediction_sub = self.node.create_subscription(
            Image, self._prediction_topic, self.on_prediction, NEWEST_IMAGE)

    def on_prediction(self, msg: Image) -> None:
        if self._prediction_sub is None:
            return
        self._end_prediction()
        stream = self.node.stream
        rgb = self.node.frames.observation(msg)
        if stream is not None and rgb is not None:
            self.gates['prediction'].passed += 1
            stream.image(self.entities.prediction, rgb, self.clock.now(), stamp_ns(msg) / 1e9 or time.time())

    def _end_prediction(self) -> None:
        self.node.destroy_subscription(self._prediction_sub)
        self._prediction_sub = None

    def on_reward(self, msg: Float32) -> None:
        # One reward per step (published after the step's action): the step clock counts them,
        # not the actions, so the viewer adds no subscriber to the agent's action path.
        self.clock.on_step()
        self.on_scalar(self.entities.reward, msg)

    def on_scalar(self, path: str, msg: Float32) -> None:
        if self.node.stream is not None and np.isfinite(msg.data):
            self.node.stream.scalar(path, float(msg.data), self.clock.now(), time.time())

    def on_pose(self, msg: PoseStamped) -> None:
        stream = self.node.stream
        if stream is None:
            return
        p, q = msg.pose.position, msg.pose.orientation
        step, wall = self.clock.now(), stamp_ns(msg) / 1e9 or time.time()
        stream.position(self.entities.position, p.x, p.y, step, wall)
        if self.map_frame is not None:  # the arrow needs the map's pixels
            pixel = self.map_frame.pixels(np.array([p.x]), np.array([p.y]))[0]
            heading = heading_vector(yaw(q.z, q.w), ARROW_PIXELS)
            stream.pose(self.entities.pose, (float(pixel[0]), float(pixel[1])), heading, step, wall)

    def on_map(self, msg: OccupancyGrid) -> None:
        info = msg.info
        if self.node.stream is None or info.width * info.height == 0 or info.resolution <= 0:
            return
        if len(msg.data) != info.width * info.height:
            self.node.warn_throttled('map', f'ignoring a map of {len(msg.data)} cells for '
                                     f'{info.width}x{info.height}')
            return
        self.map_frame = MapFrame(info.origin.position.x, info.origin.position.y, info.resolution,
                                  info.height)
        rgb = occupancy_to_rgb(np.asarray(msg.data, np.int8), info.width, info.height)
        self.node.stream.map_picture(self.entities.map, rgb)

    def on_path(self, msg: PathMsg) -> None:
        if self.node.stream is None or self.map_frame is None or not msg.poses:
            return
        xs = np.array([p.pose.position.x for p in msg.poses])
        ys = np.array([p.pose.position.y for p in msg.poses])
        self.node.stream.trail(self.entities.trail, self.map_frame.pixels(xs, ys), self.clock.now(),
                               time.time())

    def on_status(self, node: str, values: dict[str, float]) -> None:
        if node == 'agent' and 'steps' in values:
            self.clock.on_steps(int(values['steps']))
        stream = self.node.stream
        if stream is None:
            return
        step, wall = self.clock.now(), time.time()
        for path, value in self.diagnostics.scalars(node, values):
            stream.scalar(path, value, step, wall)
        for line in self.diagnostics.events(node, values):
            stream.text(self.entities.events, line, step, wall)


class ViewerNode(ManagedNode):
    def __init__(self) -> None:
        super().__init__('viewer')
        self.host = str(self.declare(
            'view_host', '127.0.0.1', 'Address the web viewer and its stream listen on; 127.0.0.1 = '
            'this machine only (the view shows what the agent sees).'))
        self.port = int(self.declare('view_port', 9090, 'TCP port of the web viewer (HTTP); 0 = no '
                                     'web viewer, only the `save` file.', low=0, high=65535))
        self.grpc_port = int(self.declare('grpc_port', 0, 'TCP port of the stream the web page reads '
                                          '(gRPC); 0 = a free one.', low=0, high=65535))
        self.save = str(self.declare('save', '', "Also write the stream to this .rrd file ('' = none); "
                                     '`rerun FILE.rrd` opens it later.'))
        self.memory_limit = str(self.declare(
            'memory_limit', '512MB', 'What the web viewer\'s server keeps for browsers that connect '
            'later (e.g. 512MB, 10%); the oldest data goes first.'))
        self.image_rate = float(self.declare('image_rate', 5.0, 'Camera and prediction images shown '
                                             'per second each (0 = none).', low=0.0, high=60.0))
        self.prediction_interval = float(self.declare(
            'prediction_interval', 1.0, 'Seconds between two predicted frames shown (0 = none): the '
            'agent decodes one every step while anyone subscribes to prediction/image_raw, so the '
            'viewer subscribes for one frame at a time.', low=0.0, high=3600.0))
        self.nice = int(self.declare('nice', 19, 'Niceness added to this process and its web viewer '
                                     'server, so the agent wins the CPU; 19 = only CPU time nothing '
                                     'else wants (SCHED_IDLE): the view may lag under full load.',
                                     low=0, high=19))
        agents = self.declare('agents', [], "Namespaces of the agents to show, one entity tree each; none = "
                              "this node's own.")
        if self.nice:
            yield_cpu(self.nice)
        own = normal_namespace(self.get_namespace())
        namespaces = list(dict.fromkeys(normal_namespace(a) for a in agents)) or [own]
        self.stream = None
        self.server = None
        self.frames = FrameReader(self.warn_throttled)
        self.feeds = {ns: AgentFeed(self, AgentEntities(ns), ns == own and not agents) for ns in namespaces}
        self.create_subscription(DiagnosticArray, '/diagnostics', self.on_diagnostics, BEST_EFFORT)
        self.manager = ManagerWatch(self)
        self.create_timer(0.5, self._watch)
        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)

    # -- lifecycle ------------------------------------------------------------
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.stream is None and not self.finished:
            self._open()
        return super().on_activate(state)

    def _open(self) -> None:
        if missing := rerun_missing():
            self._give_up(f'{missing}; the graph runs without the live view')
            return
        from ami_ros.view.stream import ViewError, ViewStream, WebViewerServer

        save = Path(self.save).absolute() if self.save else None
        if self.port:
            try:
                self.server = WebViewerServer(self.host, self.port, self.grpc_port, self.memory_limit,
                                              log_path=save.with_suffix('.server.log') if save else None)
            except ViewError as exc:
                hint = ('choose another with view_port:=N' if 'cannot serve' in str(exc) else 'see above')
                if save is None:
                    self._give_up(f'{exc}; the graph runs without the live view: {hint}')
                    return
                self.get_logger().error(f'{exc}; recording only to {save}: {hint}')
        if self.server is None and save is None:
            self._give_up('view_port is 0 and no save file: nothing to show')
            return
        self.stream = ViewStream([f.entities for f in self.feeds.values()],
                                 self.server.grpc_url if self.server else None, save)
        if self.server is not None:
            self.get_logger().info(f'live view: open {self.server.url}')
        if save is not None:
            self.get_logger().info(f'live view saved to {save} (open with: rerun {save})')

    def _give_up(self, line: str) -> None:
        # One line, exit 0: the graph does not count it as a failure.
        self.get_logger().error(line)
        self.finished = True

    def on_exit(self) -> None:
        # Already on the way out: a launcher's SIGINT now (it stops what serves the graph once
        # the graph is gone, while this node may be ending by itself) must not cut the .rrd's
        # last flush short nor leave the server behind. Both are bounded (CLOSE_TIMEOUT each).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if self.stream is not None:
            self.stream.close(CLOSE_TIMEOUT)
        if self.server is not None:
            self.server.stop(CLOSE_TIMEOUT)

    # -- topics ---------------------------------------------------------------
    def on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            namespace, node = split_status_name(status.name)
            feed = self.feeds.get(namespace)
            if feed is not None and node != self.get_name():
                feed.on_status(node, iter_numeric((kv.key, kv.value) for kv in status.values))

    def _watch(self) -> None:
        if self.manager.graph_shut_down() and not self.finished:
            self.get_logger().info('the manager has shut the graph down; closing the live view')
            self.finished = True
        if self.server is not None and not self.server.alive():
            self.warn_throttled('server', 'the web viewer\'s server has stopped; the view is '
                                'still saved where `save` says', period=60.0)

    def _update_diagnostics(self) -> None:
        gates = [g for f in self.feeds.values() for g in f.gates.values()]
        self.diagnostics.set(logged=self.stream.logged if self.stream else 0,
                             images_shown=sum(g.passed for g in gates),
                             images_skipped=sum(g.held for g in gates),
                             dropped_frames=self.frames.dropped,
                             serving=bool(self.server and self.server.alive()),
                             url=self.server.url if self.server else '')


def main(args: list[str] | None = None) -> int:
    return run(ViewerNode, args)


if __name__ == '__main__':
    sys.exit(main())
