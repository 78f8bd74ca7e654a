"""The Doom world as rviz and rqt see it: world/map, world/path, world/visited, and the
config/ami.rviz and config/ami.perspective files against a running graph (real processes)."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import yaml
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import OccupancyGrid
from nav_msgs.msg import Path as PathMsg
from pythonosc.udp_client import SimpleUDPClient
from rclpy.qos import DurabilityPolicy, QoSProfile
from ros_harness import NodeStatus, free_udp_port, wait_for
from std_msgs.msg import UInt32

from ami_ros.worlds.doom import DoomWorld
from ami_ros.worlds.world_map import WALL, GridGeometry, Segment, Trail, segment_cells

CONFIG = Path(__file__).resolve().parent.parent / 'config'
START_TIMEOUT = 40.0  # cold starts of ViZDoom, MLflow or torch on a shared CPU
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
CELL_SIZE = 64


def distance_to_segment(px: float, py: float, s) -> float:
    dx, dy = s.x2 - s.x1, s.y2 - s.y1
    t = max(0.0, min(1.0, ((px - s.x1) * dx + (py - s.y1) * dy) / (dx * dx + dy * dy)))
    return math.hypot(px - (s.x1 + t * dx), py - (s.y1 + t * dy))


def grid_value(grid: OccupancyGrid, x: float, y: float) -> int:
    col = math.floor((x - grid.info.origin.position.x) / grid.info.resolution)
    row = math.floor((y - grid.info.origin.position.y) / grid.info.resolution)
    assert 0 <= col < grid.info.width and 0 <= row < grid.info.height, (x, y)
    return grid.data[row * grid.info.width + col]


def occupied_centers(grid: OccupancyGrid, value: int) -> list[tuple[float, float]]:
    info, res = grid.info, grid.info.resolution
    return [(info.origin.position.x + (i % info.width + 0.5) * res,
             info.origin.position.y + (i // info.width + 0.5) * res)
            for i, v in enumerate(grid.data) if v == value]


def test_map_path_and_visited_follow_the_player(launch, test_node, tmp_path):
    maps = test_node.collect(OccupancyGrid, 'world/map', qos=LATCHED)
    visited = test_node.collect(OccupancyGrid, 'world/visited', qos=LATCHED)
    paths = test_node.collect(PathMsg, 'world/path', qos=LATCHED)
    poses = test_node.collect(PoseStamped, 'world/pose')
    episodes = test_node.collect(UInt32, 'world/episode', qos=LATCHED)
    status = NodeStatus(test_node)
    recorder = launch('recorder', parameters={
        'tracking_uri': 'sqlite:///' + str(tmp_path / 'mlflow.db'), 'experiment': 'views',
        'artifact_location': (tmp_path / 'artifacts').as_uri(), 'cell_size': CELL_SIZE,
        'image_interval': 0.0, 'map_interval': 0.0})
    port = free_udp_port()
    # Episodes of 6 s real time (12 s of game time, twice as fast as real time).
    world = launch('doom_world', parameters={
        'port': port, 'seed': 3, 'time_scale': 2.0, 'episode_timeout': 12.0, 'view_interval': 0.2,
        'visited_cell_size': CELL_SIZE})
    osc = SimpleUDPClient('127.0.0.1', port)
    wait_for(lambda: (maps and poses) or not world.alive(), START_TIMEOUT, message='world/map and a pose')
    assert world.alive(), world.output()

    # The walls: a well formed grid whose wall cells lie on the level's blocking lines.
    grid = maps[-1][1]
    assert grid.header.frame_id == 'map' and grid.info.resolution > 0
    assert grid.info.width * grid.info.height == len(grid.data) > 0
    level = DoomWorld(seed=0)
    try:
        walls = [s for lines in level.sectors for s in lines if s.blocking]
    finally:
        level.close()
    half_diagonal = grid.info.resolution * math.sqrt(0.5) + 1e-6
    wall_cells = occupied_centers(grid, WALL)
    assert wall_cells and set(grid.data) == {-1, 0, WALL}
    for x, y in wall_cells:
        assert min(distance_to_segment(x, y, s) for s in walls) <= half_diagonal, (x, y)
    for s in walls:  # and no wall is left out
        assert grid_value(grid, (s.x1 + s.x2) / 2, (s.y1 + s.y2) / 2) == WALL, s

    # The player wanders (forward, turning slowly) until the recorder records.
    osc.send_message('/input/Vertical', 1.0)
    osc.send_message('/input/LookHorizontal', 0.25)
    wait_for(lambda: 'recording to MLflow run' in recorder.output() or not recorder.alive(),
             START_TIMEOUT, message='the recorder to record')
    assert recorder.alive(), recorder.output()
    # An episode the recorder sees whole: it starts after the recorder hears the one before.
    wait_for(lambda: episodes and status.get('recorder', 'episode') == str(episodes[-1][1].data), 10,
             message='the recorder hearing the current episode')
    joined = episodes[-1][1].data
    wait_for(lambda: episodes[-1][1].data > joined, 10, message='a new episode')
    episode = episodes[-1][1].data
    # Its path restarted: a path shorter than the one before, starting at a pose of the world.
    paths_then = len(paths)
    wait_for(lambda: len(paths) > paths_then + 3, 5, message='paths of the new episode')
    lengths = [len(m.poses) for _, m in paths]
    restarts = [i for i in range(1, len(lengths)) if lengths[i] < lengths[i - 1]]
    assert restarts, lengths
    first = paths[restarts[-1]][1].poses[0].pose.position
    assert any((p.pose.position.x, p.pose.position.y) == (first.x, first.y) for _, p in poses)
    # It grows as the player moves, keeping what it had.
    grown = [m for _, m in paths[restarts[-1]:]]
    assert len(grown[-1].poses) > len(grown[0].poses) >= 1, [len(m.poses) for m in grown]
    assert grown[-1].poses[0].pose.position == grown[0].poses[0].pose.position
    assert grown[-1].header.frame_id == 'map'

    # Still, within that episode: the world's visited cells are the recorder's.
    osc.send_message('/input/Vertical', 0.0)
    osc.send_message('/input/LookHorizontal', 0.0)

    def cells(msg: OccupancyGrid) -> int:
        return sum(1 for v in msg.data if v == 100)

    wait_for(lambda: (visited and status.get('recorder', 'episode') == str(episode)
                      and status.get('recorder', 'episode_cells') == str(cells(visited[-1][1]))),
             5, message=lambda: f'world/visited {cells(visited[-1][1]) if visited else None} cells, '
             f'the recorder {status.status.get("recorder")}')
    assert episodes[-1][1].data == episode, 'the episode ended before the counts were compared'
    last = visited[-1][1]
    assert last.info.resolution == CELL_SIZE and cells(last) >= 2
    assert last.info.origin.position.x % CELL_SIZE == 0 and last.info.origin.position.y % CELL_SIZE == 0
    # Every visited cell held a pose the world sent.
    pose_cells = {(math.floor(p.pose.position.x / CELL_SIZE), math.floor(p.pose.position.y / CELL_SIZE))
                  for _, p in poses}
    for x, y in occupied_centers(last, 100):
        assert (math.floor(x / CELL_SIZE), math.floor(y / CELL_SIZE)) in pose_cells

    # Every pose it sent fell on a free cell of the walls map.
    assert len(poses) > 50
    for _, pose in poses:
        assert grid_value(grid, pose.pose.position.x, pose.pose.position.y) == 0, pose.pose.position


# -- config/ami.rviz and config/ami.perspective --------------------------------------------
RVIZ_TYPES = {  # display class -> the message type it shows
    'rviz_default_plugins/Map': 'nav_msgs/msg/OccupancyGrid',
    'rviz_default_plugins/Path': 'nav_msgs/msg/Path',
    'rviz_default_plugins/Pose': 'geometry_msgs/msg/PoseStamped',
    'rviz_default_plugins/Image': 'sensor_msgs/msg/Image',
}


def rviz_topics() -> dict[str, str]:
    config = yaml.safe_load((CONFIG / 'ami.rviz').read_text())
    manager = config['Visualization Manager']
    assert manager['Global Options']['Fixed Frame'] == 'map'
    assert manager['Transformation']['Current']['Class'] == 'rviz_common/Identity'
    topics = {}
    for display in manager['Displays']:
        assert display['Class'] in RVIZ_TYPES, display['Class']
        topic = display['Topic']['Value']
        topics[topic if topic.startswith('/') else '/' + topic] = RVIZ_TYPES[display['Class']]
    return topics


def perspective_topics() -> dict[str, str]:
    """Topic -> type of every plugin the perspective runs (an rqt_plot field names its topic)."""
    manager = json.loads((CONFIG / 'ami.perspective').read_text())['groups']['pluginmanager']
    running = ast.literal_eval(manager['keys']['running-plugins']['repr'])
    topics = {}
    for plugin, serials in running.items():
        for serial in serials:
            group = manager['groups'][f'plugin__{plugin.replace("/", "__")}__{serial}']
            settings = {key: ast.literal_eval(value['repr'])
                        for key, value in group['groups']['plugin']['keys'].items()}
            if plugin == 'rqt_image_view/ImageView':
                topics[settings['topic']] = 'sensor_msgs/msg/Image'
            elif plugin == 'rqt_plot/Plot':
                for field in settings['topics']:
                    topic, _, member = field.rpartition('/')
                    assert member == 'data', field
                    topics[topic] = 'std_msgs/msg/Float32'
            else:  # its topic is fixed (/diagnostics_agg): rqt is started with a remap (README)
                assert plugin == 'rqt_robot_monitor/RobotMonitor', plugin
                topics['/diagnostics'] = 'diagnostic_msgs/msg/DiagnosticArray'
    return topics


def test_rviz_and_rqt_name_topics_the_graph_publishes(launch, test_node):
    rviz, rqt = rviz_topics(), perspective_topics()
    assert {'/world/map', '/world/visited', '/world/path', '/world/pose', '/camera/image_raw',
            '/prediction/image_raw'} <= set(rviz)
    assert {'/camera/image_raw', '/prediction/image_raw', '/reward', '/prediction_error',
            '/diagnostics'} == set(rqt)
    launch('doom_world', parameters={'port': free_udp_port()})
    launch('agent', parameters={'preset': 'cpu'})
    wanted = {**rviz, **rqt}

    def published() -> dict[str, list[str]]:
        return {name: types for name, types in test_node.node.get_topic_names_and_types()
                if test_node.node.get_publishers_info_by_topic(name)}

    wait_for(lambda: all(t in published() for t in wanted), START_TIMEOUT,
             message=lambda: f'{sorted(set(wanted) - set(published()))} to be published')
    graph = published()
    for topic, msg_type in wanted.items():
        assert graph[topic] == [msg_type], (topic, graph[topic])


# -- the grids without ROS -------------------------------------------------------------------
def test_segment_cells_are_every_cell_the_line_crosses():
    geometry = GridGeometry(16.0, -10, -10, 20, 20)
    for segment in (Segment(3.0, 5.0, 90.0, 41.0), Segment(-40.0, 70.0, 33.0, -64.0),
                    Segment(16.0, 0.0, 16.0, 48.0), Segment(0.0, 0.0, 32.0, 32.0)):
        dense = {geometry.cell(segment.x1 + t / 4000 * (segment.x2 - segment.x1),
                               segment.y1 + t / 4000 * (segment.y2 - segment.y1)) for t in range(4001)}
        assert segment_cells(segment, geometry) == dense, segment


def test_trail_keeps_spaced_poses_up_to_its_length_and_restarts():
    trail = Trail(spacing=10.0, length=3)
    assert trail.add(0.0, 0.0, 0.0) and not trail.add(5.0, 5.0, 0.0)  # 7 units: too close
    for x in (10.0, 20.0, 30.0):
        assert trail.add(x, 0.0, 90.0)
    assert [p[0] for p in trail.poses] == [10.0, 20.0, 30.0]  # the oldest went
    version = trail.version
    trail.restart()
    assert not trail.poses and trail.version > version
