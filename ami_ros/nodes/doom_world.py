"""doom_world: the embedded stand-in for VRChat + OBS, a headless ViZDoom world.

It listens for VRChat's OSC input (`/input/Vertical`, `/input/Horizontal`,
`/input/LookHorizontal` floats; `/input/MoveForward`, `/input/MoveBackward`,
`/input/MoveLeft`, `/input/MoveRight`, `/input/LookLeft`, `/input/LookRight`,
`/input/Jump`, `/input/Run` ints) on UDP, exactly where VRChat would, steps
the game in real time with the held input, and publishes the frame as the
camera node would. Control mapping: see ami_ros.worlds.doom.

Published topics (relative names; lifecycle publishers, nothing while inactive):
    camera/image_raw  sensor_msgs/Image     rgb8 width x height, stamped at capture
    world/pose        geometry_msgs/PoseStamped  player position (map units) and yaw
    world/episode     std_msgs/UInt32       the episode number, sent when an episode
                      starts (transient local: a late subscriber gets the current one),
                      before that episode's first pose
    world/map         nav_msgs/OccupancyGrid  the level's walls (100 = a blocking line
                      passes through the cell, 0 = inside the level, -1 = outside), sent
                      once per level, transient local
    world/visited     nav_msgs/OccupancyGrid  cells of `visited_cell_size` the player
                      visited this episode (100, else 0), every `view_interval` s when it
                      changed, transient local; the recorder's exploration map cells
    world/path        nav_msgs/Path          this episode's trail, every `view_interval` s
                      when it changed and as an episode starts (empty), transient local
All in frame `frame_id` and world/pose's coordinates (map units): rviz shows them
without TF (config/ami.rviz). Grids: ami_ros.worlds.world_map.

Also /diagnostics (1 Hz): steps per second (and the rate asked for), steps,
episode, OSC messages taken and ignored.

Parameters:
    host, port        OSC input address (127.0.0.1, 9000 like VRChat)
    scenario          ViZDoom scenario name in vizdoom.scenarios_path, or a .cfg path
                      (my_way_home)
    fps               camera frame rate at time_scale 1 (10.0); each step is
                      round(35 / fps) Doom tics
    time_scale        speed-up of the world, 0.1..20 (1.0): steps per second are
                      fps * time_scale, game time per step stays the same
    width, height     published image size (84 x 84), centre crop of the 160x120 render
    episode_timeout   seconds of game time per episode, 0 = the scenario's (0.0)
    seed              game seed, -1 = random (-1)
    start             'x,y': every episode starts at this map point (checked to lie
                      inside the map); '' = the scenario's own spawn spots ('')
    turn_speed        degrees per second of game time at full LookHorizontal (~123,
                      Doom's keyboard turn)
    frame_id          frame of world/pose, world/map, world/visited, world/path (map)
    map_resolution    map units per cell side of world/map, 1..256 (16: the player is
                      32 wide, so a free cell always separates it from a wall cell)
    visited_cell_size map units per cell side of world/visited, 1..1000000 (64: the
                      recorder's cell_size, so both count the same cells)
    view_interval     seconds between updates of world/visited and world/path, 0.1..60 (1.0)
    path_spacing      map units between two poses of world/path, 0..1024 (8.0)
    path_length       poses world/path keeps, the latest, 2..100000 (2000: a whole
                      my_way_home episode, 2100 tics, at 10 steps/s)
    camera_frame_id   frame of camera/image_raw (camera)
"""

from __future__ import annotations

import errno
import math
import sys
import threading

from geometry_msgs.msg import Pose, PoseStamped
from nav_msgs.msg import OccupancyGrid, Path
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import BlockingOSCUDPServer
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import UInt32

from ami_ros.core.timing import RateMeter
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.images import rgb_to_image
from ami_ros.ros.managed_node import ManagedNode, run
from ami_ros.worlds.doom import (
    DEFAULT_TURN_SPEED,
    DoomWorld,
    VRChatInputState,
    WorldState,
    frame_skip_for,
    resolve_scenario,
)
from ami_ros.worlds.world_map import GridGeometry, Trail, visited_grid, wall_grid


def parse_start(spec: str) -> tuple[float, float] | None:
    """The `start` parameter: '' -> None, 'x,y' -> (x, y); ValueError saying how otherwise."""
    if not spec.strip():
        return None
    try:
        x, y = (float(part) for part in spec.split(','))
    except ValueError:
        raise ValueError(f"start {spec!r} is not a map point; write it as 'x,y', e.g. '512,-192'") from None
    return x, y


class DoomWorldNode(ManagedNode):
    """ViZDoom driven by VRChat's OSC input, publishing camera frames and the pose."""

    def __init__(self) -> None:
        super().__init__('doom_world')
        self.host = self.declare('host', '127.0.0.1', 'Address the OSC input server binds (as VRChat).')
        self.port = self.declare('port', 9000, 'UDP port of the OSC input (VRChat listens on 9000).',
                                 low=1, high=65535)
        scenario = self.declare('scenario', 'my_way_home',
                                'ViZDoom scenario: a .cfg name in vizdoom.scenarios_path, or a .cfg path.')
        self.fps = self.declare('fps', 10.0,
                                'Frames per second at time_scale 1; a step is round(35/fps) tics.',
                                low=1.0, high=35.0)
        self.time_scale = self.declare('time_scale', 1.0,
                                       'World speed-up: steps per second = fps * time_scale.',
                                       low=0.1, high=20.0)
        self.width = self.declare('width', 84, 'Published image width.', low=8, high=1024)
        self.height = self.declare('height', 84, 'Published image height.', low=8, high=1024)
        self.episode_timeout = self.declare(
            'episode_timeout', 0.0, 'Episode length in seconds of game time; 0 = the scenario default.',
            low=0.0, high=86400.0)
        self.seed = self.declare('seed', -1, 'Game seed; -1 = random.', low=-1, high=2**31 - 1)
        self.start = parse_start(self.declare(
            'start', '', "Map point 'x,y' where every episode starts; '' = the scenario's own "
            'spawn spots (my_way_home: a random room).'))
        self.turn_speed = self.declare(
            'turn_speed', DEFAULT_TURN_SPEED,
            'Turn rate in degrees per second of game time at LookHorizontal = 1.', low=1.0, high=1440.0)
        self.frame_id = self.declare('frame_id', 'map',
                                     'Frame of world/pose, world/map, world/visited and world/path.')
        self.map_resolution = self.declare('map_resolution', 16.0,
                                           'Map units per cell side of world/map.', low=1.0, high=256.0)
        self.visited_cell_size = self.declare(
            'visited_cell_size', 64, "Map units per cell side of world/visited (the recorder's "
            'cell_size, so both count the same cells).', low=1, high=1_000_000)
        self.view_interval = self.declare('view_interval', 1.0, 'Seconds between updates of '
                                          'world/visited and world/path.', low=0.1, high=60.0)
        self.path_spacing = self.declare('path_spacing', 8.0, 'Map units between two poses of '
                                         'world/path.', low=0.0, high=1024.0)
        self.path_length = self.declare('path_length', 2000, 'Poses world/path keeps (the latest).',
                                        low=2, high=100_000)
        self.camera_frame_id = self.declare('camera_frame_id', 'camera', 'Frame of camera/image_raw.')

        # Fail before anything starts: a bad scenario or a busy port ends the process.
        self.config_path = resolve_scenario(scenario)
        self.frame_skip = frame_skip_for(self.fps)
        self.inputs = VRChatInputState(self.turn_speed)
        self.world: DoomWorld | None = None
        self._image_pub = None
        self._pose_pub = None
        self._episode_pub = None
        self._episode_sent: int | None = None
        self._map_pub = self._visited_pub = self._path_pub = None
        self._map_sent = False
        self._visited_geometry: GridGeometry | None = None
        self._visited: set[tuple[int, int]] = set()
        self._visited_sent: int | None = None  # how many cells the last world/visited had
        self.trail = Trail(self.path_spacing, self.path_length)
        self._trail_sent = -1
        self._timer = None
        self._view_timer = None
        self.rate = RateMeter()
        self.steps = 0
        self.osc_taken = 0  # counted on the OSC thread
        self.osc_ignored = 0
        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)
        self.diagnostics.set(scenario=self.config_path, osc_input=f'{self.host}:{self.port}',
                             target_rate_hz=self.fps * self.time_scale)
        self._osc = self._open_osc()
        self._osc_thread = threading.Thread(target=self._osc.serve_forever, kwargs={'poll_interval': 0.5},
                                            name='osc_input', daemon=True)
        self._osc_thread.start()

    # -- OSC input ----------------------------------------------------------
    def _open_osc(self) -> BlockingOSCUDPServer:
        # Without strict timing: python-osc would sleep on the one OSC thread until a
        # bundle's timetag, so a bundle timed an hour ahead would stop all input for an
        # hour. Applied on arrival instead, as VRChat does.
        dispatcher = Dispatcher(strict_timing=False)
        dispatcher.set_default_handler(self._on_osc)
        try:
            # One blocking server on its own thread: no thread per datagram.
            server = BlockingOSCUDPServer((self.host, self.port), dispatcher)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(
                    f'UDP port {self.port} on {self.host} is already in use (VRChat or another '
                    f'doom_world?); stop that program or pick another port: --ros-args -p port:=9002'
                ) from None
            raise RuntimeError(f'cannot listen for OSC on {self.host}:{self.port}: {exc}') from None
        # A datagram python-osc cannot parse (bad UTF-8, a short blob) raises in its handler, and
        # socketserver would print a traceback per datagram: a peer could flood the log.
        server.handle_error = self._on_unparsable_osc
        return server

    def _on_unparsable_osc(self, _request: object, client: tuple) -> None:
        self.osc_ignored += 1
        self.get_logger().warning(f'ignoring an OSC datagram from {client[0]}:{client[1]} that does not '
                                  f'parse: {sys.exc_info()[1]!r}', throttle_duration_sec=5.0)

    def _on_osc(self, address: str, *values: object) -> None:
        # Runs on the OSC thread; the input state has its own lock. Returns
        # None on purpose: python-osc would send a returned value back.
        try:
            if self.inputs.handle(address, *values):
                self.osc_taken += 1
            else:
                self.osc_ignored += 1
                self.get_logger().debug(f'ignoring OSC {address} {values!r}: not a VRChat input')
        except ValueError as exc:
            self.osc_ignored += 1
            self.get_logger().warning(f'ignoring OSC message: {exc}', throttle_duration_sec=5.0)

    def _close_osc(self) -> None:
        if self._osc is None:
            return
        if self._osc_thread.is_alive():
            self._osc.shutdown()  # waits for serve_forever to return
        self._osc.server_close()
        self._osc = None

    # -- lifecycle ----------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.world = DoomWorld(
                self.config_path, frame_skip=self.frame_skip, width=self.width, height=self.height,
                episode_timeout=self.episode_timeout, seed=self.seed if self.seed >= 0 else None,
                start=self.start)
        except Exception as exc:
            self.get_logger().error(f'cannot start ViZDoom with {self.config_path}: {exc}')
            return TransitionCallbackReturn.FAILURE
        self._image_pub = self.create_lifecycle_publisher(Image, 'camera/image_raw', 10)
        self._pose_pub = self.create_lifecycle_publisher(PoseStamped, 'world/pose', 10)
        self._episode_pub = self.create_lifecycle_publisher(
            UInt32, 'world/episode', QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self._episode_sent = None
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._map_pub = self.create_lifecycle_publisher(OccupancyGrid, 'world/map', latched)
        self._visited_pub = self.create_lifecycle_publisher(OccupancyGrid, 'world/visited', latched)
        self._path_pub = self.create_lifecycle_publisher(Path, 'world/path', latched)
        self._map_sent = False
        lines = [line for sector in self.world.sectors for line in sector]
        self._visited_geometry = GridGeometry.covering(lines, float(self.visited_cell_size))
        rate = self.fps * self.time_scale
        self._timer = self.create_timer(1.0 / rate, self._step)
        self._timer.cancel()  # runs only while active
        self._view_timer = self.create_timer(self.view_interval, self._publish_views)
        self._view_timer.cancel()
        self.get_logger().info(
            f'scenario {self.config_path}; OSC input on udp://{self.host}:{self.port}; '
            f'{rate:g} steps/s (fps {self.fps:g} x time_scale {self.time_scale:g}), '
            f'{self.frame_skip} tics per step; camera/image_raw {self.width}x{self.height}, world/pose')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # activates the publishers
        if self.world is not None and not self._map_sent:
            self._publish_map()
        for timer in (self._timer, self._view_timer):
            if timer is not None:
                timer.reset()
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for timer in (self._timer, self._view_timer):
            if timer is not None:
                timer.cancel()
        self._publish_views()  # a paused world shows where it stopped, not up to view_interval before
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_world()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_world()
        return super().on_shutdown(state)

    def on_exit(self) -> None:
        self._close_osc()
        if self.world is not None:
            self.world.close()
            self.world = None

    def _release_world(self) -> None:
        for timer in (self._timer, self._view_timer):
            if timer is not None:
                self.destroy_timer(timer)
        self._timer = self._view_timer = None
        for pub in (self._image_pub, self._pose_pub, self._episode_pub, self._map_pub,
                    self._visited_pub, self._path_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._image_pub = self._pose_pub = self._episode_pub = None
        self._map_pub = self._visited_pub = self._path_pub = None
        if self.world is not None:
            self.world.close()
            self.world = None

    # -- the step -----------------------------------------------------------
    def _step(self) -> None:
        if not self.is_active or self.world is None:
            return
        snap = self.world.step(self.inputs.to_buttons())
        self.rate.tick()
        self.steps += 1
        stamp = self.get_clock().now().to_msg()
        if snap.episode != self._episode_sent:
            self._episode_pub.publish(UInt32(data=snap.episode))
            self._episode_sent = snap.episode
            # Restarted before this episode's first pose: no trail crosses two episodes.
            self._visited = set()
            self._visited_sent = None
            self.trail.restart()
        self._image_pub.publish(rgb_to_image(snap.frame, stamp, self.camera_frame_id))
        self._pose_pub.publish(self._pose(snap, stamp))
        self._visited.add(self._visited_geometry.cell(snap.x, snap.y))
        if self.trail.add(snap.x, snap.y, snap.angle) and len(self.trail.poses) == 1:
            self._publish_views()  # an episode's start shows at once: the old trail goes

    # -- the world's views for rviz -----------------------------------------------
    def _publish_map(self) -> None:
        lines = [line for sector in self.world.sectors for line in sector]
        geometry = GridGeometry.covering(lines, self.map_resolution)
        self._map_pub.publish(self._grid(wall_grid(self.world.sectors, geometry), geometry))
        self._map_sent = True
        self.get_logger().info(f'world/map: {geometry.width}x{geometry.height} cells of '
                               f'{self.map_resolution:g} map units, {len(lines)} lines')

    def _publish_views(self) -> None:
        if not self.is_active or self._visited_geometry is None:
            return
        if len(self._visited) != self._visited_sent:  # cells are only ever added within an episode
            grid = visited_grid(self._visited, self._visited_geometry)
            self._visited_pub.publish(self._grid(grid, self._visited_geometry))
            self._visited_sent = len(self._visited)
        if self.trail.version != self._trail_sent:
            self._path_pub.publish(self._path())
            self._trail_sent = self.trail.version

    def _grid(self, grid, geometry: GridGeometry) -> OccupancyGrid:
        msg = OccupancyGrid()
        msg.header.stamp = msg.info.map_load_time = self.get_clock().now().to_msg()
        msg.header.frame_id = self.frame_id
        msg.info.resolution = geometry.resolution
        msg.info.width, msg.info.height = geometry.width, geometry.height
        msg.info.origin.position.x, msg.info.origin.position.y = geometry.origin
        msg.info.origin.orientation.w = 1.0
        msg.data = grid.ravel().tolist()
        return msg

    def _path(self) -> Path:
        msg = Path()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.frame_id
        for x, y, angle in self.trail.poses:
            pose = PoseStamped()
            pose.header = msg.header
            pose.pose.position.x, pose.pose.position.y = x, y
            _set_yaw(pose.pose, angle)
            msg.poses.append(pose)
        return msg

    def _update_diagnostics(self) -> None:
        episode = -1 if self._episode_sent is None else self._episode_sent  # -1: no step yet
        self.diagnostics.set(rate_hz=self.rate.rate(), steps=self.steps, episode=episode,
                             osc_messages=self.osc_taken, ignored_osc=self.osc_ignored,
                             active=self.is_active)

    def _pose(self, snap: WorldState, stamp) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp = stamp
        msg.header.frame_id = self.frame_id
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = snap.x, snap.y, snap.z
        _set_yaw(msg.pose, snap.angle)
        return msg


def _set_yaw(pose: Pose, degrees: float) -> None:
    # Doom's ANGLE is degrees counter-clockwise from +x: a ROS yaw (REP 103).
    half = math.radians(degrees) / 2.0
    pose.orientation.z = math.sin(half)
    pose.orientation.w = math.cos(half)


def main(args=None) -> int:
    return run(DoomWorldNode, args)


if __name__ == '__main__':
    sys.exit(main())
