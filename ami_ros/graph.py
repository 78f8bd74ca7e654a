"""The one description of the ami_ros graph.

Both `launch/ami.launch.py` (ros2 launch) and `ami-ros launch` (pip
installs) build the graph from here, so the two cannot drift apart: the
launch arguments, which nodes run for a given set of arguments, their names,
and the parameters each gets on top of the parameters file.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ami_ros.bags.recording import DEFAULT_TOPICS
from ami_ros.core.presets import DEFAULT_PRESET, PRESETS


@dataclass(frozen=True)
class LaunchArgument:
    default: str
    description: str
    choices: tuple[str, ...] | None = None


LAUNCH_ARGUMENTS: dict[str, LaunchArgument] = {
    'world': LaunchArgument(
        'vrchat', 'vrchat: OBS virtual camera in, OSC out to VRChat; '
        'doom: the embedded ViZDoom world stands in for both', ('vrchat', 'doom')),
    'preset': LaunchArgument(DEFAULT_PRESET, 'model preset: sizes and what the policy sees',
                             tuple(PRESETS)),
    'device': LaunchArgument('cpu', 'torch device for the agent: cpu, cuda or cuda:N'),
    'agents': LaunchArgument(
        '1', 'number of agents acting at once, each with its world or camera and its bridge in '
        'namespace agent_<i>, all feeding one set of trainers; 1 = no agent namespace'),
    'vrchat_host': LaunchArgument('127.0.0.1', 'host VRChat (or doom_world) listens on for OSC; '
                                  'with agents:=N one host, or N of them comma-separated'),
    'vrchat_port': LaunchArgument('9000', 'UDP port VRChat (or doom_world) listens on for OSC; with '
                                  'agents:=N one port (agent i gets port+i), or N comma-separated'),
    'camera_source': LaunchArgument(
        '', 'camera source: empty = the V4L2 device named "OBS Virtual Camera"; '
        'or a device index, /dev/video* path, video file or stream URL; '
        'with agents:=N and world:=vrchat, N of them comma-separated'),
    'train': LaunchArgument('true', 'start the VAE, dynamics and policy trainers, which learn '
                            'while the agent acts and push their weights to it', ('true', 'false')),
    'trainer_device': LaunchArgument('', "torch device of the trainers ('' = the agent's device)"),
    'record': LaunchArgument('true', 'record the run in MLflow (recorder node)', ('true', 'false')),
    'checkpoint': LaunchArgument('', "restore the graph from a checkpoint: a directory, 'latest' "
                                 "(the newest in checkpoint_dir), or '' to start fresh"),
    'checkpoint_dir': LaunchArgument('checkpoints', 'where checkpoints are saved and looked up'),
    'bag': LaunchArgument('', "record the graph's topics into this new bag directory while it runs "
                          "('' = no bag; ami-ros bag info/play read it)"),
    'params_file': LaunchArgument('', 'ROS 2 parameters file (empty: the package\'s config/ami.yaml)'),
    'namespace': LaunchArgument('', 'namespace for every node of the graph'),
    'rviz': LaunchArgument('false', 'also start rviz2 with config/ami.rviz (the world map, trail, '
                           'pose, camera and prediction) where rviz2 is installed', ('false', 'true')),
    'web_api_host': LaunchArgument(
        '127.0.0.1', 'address of the AMI control API (pamiq-console, HTTP): 127.0.0.1 = this '
        'machine only; anyone who reaches it can pause or shut the graph down'),
    'web_api_port': LaunchArgument('8391', 'TCP port of the AMI control API; 0 = none'),
    'view': LaunchArgument('false', "live view in a browser (viewer node, rerun-sdk: the 'view' extra): "
                           "true, or a path ending .rrd to also save the stream there; false = none"),
    'view_host': LaunchArgument('127.0.0.1', 'address of the live view\'s web page: 127.0.0.1 = this '
                                'machine only'),
    'view_port': LaunchArgument('9090', 'TCP port of the live view\'s web page'),
    'network': LaunchArgument(
        'localhost', 'who can reach the graph: localhost = this machine only, whatever the '
        'environment says; subnet = other machines too (ROS_STATIC_PEERS passes through): '
        'secure it with SROS2 first (docs/security.md)', ('localhost', 'subnet')),
    'respawn': LaunchArgument(
        'true', 'restart a node that dies unexpectedly (the trainers, world or camera, bridge and '
        'recorder; a trainer restores from the newest checkpoint), with a growing back-off',
        ('true', 'false')),
    'respawn_delay': LaunchArgument('1.0', 'seconds before the first restart of a node; each '
                                    'further one waits twice as long (ami-ros launch), up to 30 s'),
}

TRAINERS = ('vae_trainer', 'dynamics_trainer', 'policy_trainer')
MAX_AGENTS = 64
# What describe() starts: the whole graph, or the learning half alone (`ami-ros trainers`).
PARTS = ('graph', 'trainers')
# Restarted when they die (respawn:=true). Not the agent: it would start over from its last
# checkpoint while the trainers carry on ahead of it; nor the manager, which would not know the
# graph's state (paused, a save under way): a graph without either is better relaunched. Nor
# the nodes that serve the graph from outside it (web_api, bag_recorder, viewer).
RESPAWNED = ('doom_world', 'camera', 'osc_bridge', *TRAINERS, 'recorder')
# The status the launcher publishes on /diagnostics (restarts per node): recorded with the graph's.
LAUNCH_STATUS = 'launch'


@dataclass(frozen=True)
class NodeSpec:
    """One node of the graph: its executable, its name and its parameters."""

    executable: str
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    respawn: bool = False  # restarted when it dies unexpectedly
    namespace: str = ''  # below the graph's namespace: an agent's ('agent_0'), '' for the rest

    @property
    def path(self) -> str:
        """Its name relative to the graph's namespace: 'agent_1/agent', 'manager'."""
        return f'{self.namespace}/{self.name}' if self.namespace else self.name

    @property
    def restores(self) -> bool:
        """Whether it holds state and restores it from a checkpoint (on a restart too)."""
        return 'checkpoint_dir' in self.parameters and self.name != 'manager'


class GraphArgumentError(ValueError):
    """A launch argument that is unknown or has a value outside its choices."""


@dataclass(frozen=True)
class AgentGroup:
    """One acting agent's part of the graph: its namespace and where its world is."""

    namespace: str  # '' for the only agent (agents:=1), else 'agent_<i>'
    host: str
    port: int
    camera_source: str


def _per_agent(name: str, value: str, count: int) -> list[str]:
    """One value for every agent, or a comma-separated list of exactly `count`."""
    items = [item.strip() for item in value.split(',')] if count > 1 else [value]
    if len(items) not in (1, count):
        raise GraphArgumentError(f'{name}:={value} names {len(items)} values for agents:={count}; '
                                 f'give one, or {count} comma-separated')
    return items if len(items) == count else items * count


def agent_groups(args: dict[str, str]) -> list[AgentGroup]:
    """The acting agents the arguments ask for, with their OSC address and camera."""
    if not re.fullmatch('[0-9]{1,3}', args['agents']) or not 1 <= int(args['agents']) <= MAX_AGENTS:
        raise GraphArgumentError(f'agents:={args["agents"]} is not a number of agents (1..{MAX_AGENTS})')
    count = int(args['agents'])
    hosts = _per_agent('vrchat_host', args['vrchat_host'], count)
    ports_given = _per_agent('vrchat_port', args['vrchat_port'], count)
    ports = []
    for i, text in enumerate(ports_given):
        port = int(text) if re.fullmatch('[0-9]{1,5}', text) else 0
        # One port for all: agent i listens on port+i, as several VRChat clients on one PC must.
        port += i if ',' not in args['vrchat_port'] else 0
        if not 1 <= port <= 65535:
            raise GraphArgumentError(f'vrchat_port:={args["vrchat_port"]} is not a UDP port '
                                     f'(1..65535) for every agent')
        ports.append(port)
    if len(set(zip(hosts, ports, strict=True))) < count:
        raise GraphArgumentError(f'vrchat_host and vrchat_port give two agents the same OSC address; '
                                 f'give {count} different ports')
    if args['world'] == 'vrchat' and count > 1:
        if len([c for c in args['camera_source'].split(',') if c.strip()]) != count:
            raise GraphArgumentError(f'world:=vrchat with agents:={count} needs {count} camera sources, '
                                     'comma-separated (camera_source:=/dev/video0,/dev/video2,...)')
    sources = _per_agent('camera_source', args['camera_source'], count)
    return [AgentGroup(f'agent_{i}' if count > 1 else '', hosts[i], ports[i], sources[i])
            for i in range(count)]


def resolve_arguments(given: dict[str, str]) -> dict[str, str]:
    """Launch arguments with defaults filled in; unknown or invalid ones refused."""
    unknown = sorted(set(given) - set(LAUNCH_ARGUMENTS))
    if unknown:
        raise GraphArgumentError(
            f'unknown launch argument {", ".join(unknown)}; known: {", ".join(LAUNCH_ARGUMENTS)}')
    args = {name: str(given.get(name, arg.default)) for name, arg in LAUNCH_ARGUMENTS.items()}
    for name, arg in LAUNCH_ARGUMENTS.items():
        if arg.choices and args[name] not in arg.choices:
            raise GraphArgumentError(
                f'{name}:={args[name]} is not valid; use one of {", ".join(arg.choices)}')
    try:
        delay = float(args['respawn_delay'])
    except ValueError:
        delay = -1.0
    if not 0.0 <= delay <= 3600.0:
        raise GraphArgumentError(f'respawn_delay:={args["respawn_delay"]} is not a number of seconds '
                                 '(0..3600)')
    agent_groups(args)  # agents, and the OSC addresses and cameras they need
    if not re.fullmatch('[0-9]{1,5}', args['web_api_port']) or int(args['web_api_port']) > 65535:
        raise GraphArgumentError(f'web_api_port:={args["web_api_port"]} is not a TCP port (0 = none, '
                                 '1..65535)')
    if args['view'] not in ('false', 'true') and not args['view'].endswith('.rrd'):
        raise GraphArgumentError(f'view:={args["view"]} is not valid; use true, false or a file ending .rrd')
    if not re.fullmatch('[0-9]{1,5}', args['view_port']) or not 1 <= int(args['view_port']) <= 65535:
        raise GraphArgumentError(f'view_port:={args["view_port"]} is not a TCP port (1..65535)')
    return args


def describe(given: dict[str, str], part: str = 'graph') -> list[NodeSpec]:
    """The nodes to start for these launch arguments, in start order (`part`: PARTS).

    The manager manages the nodes started before it, in the order its
    `managed_nodes` lists them (the order pause applies). web_api and
    bag_recorder, which serve the graph but are not managed, come after it.
    """
    args = resolve_arguments(given)
    groups = agent_groups(args)
    checkpoint_dir = str(Path(args['checkpoint_dir']).absolute())
    # Nodes that hold state save only into stages under checkpoint_dir, and restore from `checkpoint`.
    restore = {'checkpoint_dir': checkpoint_dir, **({'checkpoint': str(restore_point(
        args['checkpoint'], checkpoint_dir, args['preset']))} if args['checkpoint'] else {})}
    # With several agents the trainers learn from, and push to, each of their namespaces.
    namespaces = [g.namespace for g in groups]
    agents = {'agents': namespaces} if len(groups) > 1 else {}
    nodes: list[NodeSpec] = []
    if part == 'trainers':
        # For a machine other than the agent's: no pacing (the agent's steps are not on this
        # CPU); no manager or recorder, the acting half's (`train:=false`) serve the graph.
        device = args['trainer_device'] or args['device']
        nodes = [NodeSpec(t, t, {'preset': args['preset'], 'device': device, 'pacing': 'off',
                                 **restore, **agents}) for t in TRAINERS]
        return [replace(n, respawn=args['respawn'] == 'true') for n in nodes]
    for group in groups:
        nodes += _acting_nodes(args, group, restore)
    if args['train'] == 'true':
        device = args['trainer_device'] or args['device']
        nodes += [NodeSpec(t, t, {'preset': args['preset'], 'device': device, **restore, **agents})
                  for t in TRAINERS]
    if args['record'] == 'true':
        # The nodes whose statuses it records: this graph's, no name a peer makes up.
        known = ([n.path for n in nodes] + ['manager', LAUNCH_STATUS]
                 + (['bag_recorder'] if args['bag'] else []))
        if args['train'] == 'false':  # trainers may run on another machine (`ami-ros trainers`)
            known += list(TRAINERS)
        several = {'agents': namespaces, 'step_node': f'{namespaces[0]}/agent'} if len(groups) > 1 else {}
        nodes.append(NodeSpec('recorder', 'recorder', {'log_params': _run_params(args),
                                                       'nodes': known, **several}))
    # With several agents, a checkpoint goes without an agent that died (the others' states count).
    spare = {'spare_nodes': [n.path for n in nodes if n.name == 'agent']} if len(groups) > 1 else {}
    nodes.append(NodeSpec('manager', 'manager', {'managed_nodes': [n.path for n in nodes],
                                                 'checkpointed_nodes': [n.path for n in nodes if n.restores],
                                                 **spare,
                                                 'checkpoint_dir': checkpoint_dir,
                                                 'preset': args['preset']}))
    if int(args['web_api_port']):
        # After the manager, not among its nodes: a paused graph still answers, and it ends
        # by itself once the manager has shut down.
        nodes.append(NodeSpec('web_api', 'web_api', {'web_api_host': args['web_api_host'],
                                                     'web_api_port': int(args['web_api_port'])}))
    if args['view'] != 'false':
        # Like web_api: not among the manager's nodes (a paused graph is still shown).
        save = str(Path(args['view']).absolute()) if args['view'] != 'true' else ''
        shown = ({'agents': ['/' + node_namespace(args['namespace'], ns) for ns in namespaces]}
                 if len(groups) > 1 else {})
        nodes.append(NodeSpec('viewer', 'viewer', {'view_host': args['view_host'],
                                                   'view_port': int(args['view_port']), 'save': save,
                                                   **shown}))
    if args['bag']:
        # Not among the manager's nodes: a pause does not pause the recording, and it stops last.
        topics = ({'topics': [relative_name(ns, t) for ns in namespaces for t in DEFAULT_TOPICS]}
                  if len(groups) > 1 else {})
        nodes.append(NodeSpec('bag_recorder', 'bag_recorder', {'output': str(Path(args['bag']).absolute()),
                                                               **topics}))
    respawn = args['respawn'] == 'true'
    return [replace(n, respawn=respawn and n.name in RESPAWNED) for n in nodes]


def relative_name(namespace: str, name: str) -> str:
    """`name` below `namespace`, both relative: ('agent_1', 'action') -> 'agent_1/action'."""
    return '/'.join(part for part in (namespace.strip('/'), name.strip('/')) if part)


def node_namespace(graph_namespace: str, namespace: str) -> str:
    """The namespace a node runs in: the graph's, and below it the node's own (an agent's)."""
    return relative_name(graph_namespace, namespace)


def _acting_nodes(args: dict[str, str], group: AgentGroup, restore: dict[str, str]) -> list[NodeSpec]:
    """One agent's world (or camera), the agent and its bridge, in the agent's namespace."""
    if args['world'] == 'doom':
        world = NodeSpec('doom_world', 'doom_world', {'port': group.port})
    else:
        world = NodeSpec('camera', 'camera', {'source': group.camera_source})
    # Each agent keeps its own hidden state and counters in a checkpoint, by namespace, and
    # draws its own actions (all share `seed`: the trainers' initial weights).
    state = {'state_name': group.namespace, 'sampling_seed': int(group.namespace.rsplit('_', 1)[1])
             } if group.namespace else {}
    nodes = [world,
             NodeSpec('agent', 'agent', {'preset': args['preset'], 'device': args['device'],
                                         **restore, **state}),
             NodeSpec('osc_bridge', 'osc_bridge', {'host': group.host, 'port': group.port})]
    return [replace(n, namespace=group.namespace) for n in nodes]


# Distributions that predate ROS_AUTOMATIC_DISCOVERY_RANGE (Iron): ROS_LOCALHOST_ONLY=1 does it
# there, and their rmw_fastrtps binds it to the loopback interface.
_LOCALHOST_ONLY_DISTROS = ('foxy', 'galactic', 'humble')
# Distributions on Fast DDS 2, which reads its profile from FASTRTPS_DEFAULT_PROFILES_FILE
# (Fast DDS 3 reads FASTDDS_DEFAULT_PROFILES_FILE and warns about the old name).
_FASTDDS2_DISTROS = (*_LOCALHOST_ONLY_DISTROS, 'iron', 'jazzy')


def discovery_environment(args: dict[str, str], environ: Mapping[str, str] | None = None
                          ) -> dict[str, str]:
    """The DDS discovery variables the graph's processes run with (`network`).

    localhost overrides the user's environment, so a shell profile that widens
    discovery or names static peers does not open the graph: discovery range
    LOCALHOST, no static peers, and Fast DDS's transports on the loopback
    interface only (config/fastdds_localhost.xml; LOCALHOST alone still answers
    a peer that unicasts to this machine's address). subnet keeps the
    environment's ROS_STATIC_PEERS and Fast DDS profile. The deprecated
    ROS_LOCALHOST_ONLY is emptied (rcl reads empty as unset) where the range
    exists: it would override both, with a warning in every node.
    """
    distro = (os.environ if environ is None else environ).get('ROS_DISTRO', '')
    if args['network'] == 'subnet':
        return {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET',
                'ROS_LOCALHOST_ONLY': '0' if distro in _LOCALHOST_ONLY_DISTROS else ''}
    profile = 'FASTRTPS' if distro in _FASTDDS2_DISTROS else 'FASTDDS'
    return {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_STATIC_PEERS': '',
            'ROS_LOCALHOST_ONLY': '1' if distro in _LOCALHOST_ONLY_DISTROS else '',
            f'{profile}_DEFAULT_PROFILES_FILE': str(package_share() / 'config' / 'fastdds_localhost.xml')}


def restore_point(arg: str, checkpoint_dir: str, preset: str) -> Path:
    """The checkpoint `arg` names, checked before anything starts.

    A missing, damaged or foreign (other preset) checkpoint is refused with
    the one-line reason of ami_ros.core.checkpoint.
    """
    from ami_ros.core.checkpoint import CheckpointError, load_manifest
    from ami_ros.core.checkpoint_store import resolve_checkpoint

    try:
        path = resolve_checkpoint(arg, checkpoint_dir)
        load_manifest(path, expected_preset=preset, verify=True)
    except CheckpointError as exc:
        raise GraphArgumentError(str(exc)) from None
    return path.absolute()


def _run_params(args: dict[str, str]) -> str:
    """The launch arguments worth recording with a run, as 'k=v;k=v'."""
    keep = ('world', 'preset', 'device', 'train', 'trainer_device', 'agents')
    return ';'.join(f'{k}={args[k]}' for k in keep)


def package_share() -> Path:
    """share/ami_ros of an install (colcon or pip), or the source tree."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            share = Path(get_package_share_directory('ami_ros'))
            if (share / 'config' / 'ami.yaml').exists():
                return share
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset
            pass
    except ImportError:
        pass
    for candidate in (Path(__file__).resolve().parent.parent,  # editable / source tree
                      Path(sys.prefix) / 'share' / 'ami_ros'):  # pip data_files
        if (candidate / 'config' / 'ami.yaml').exists():
            return candidate
    raise FileNotFoundError('cannot find share/ami_ros/config/ami.yaml; reinstall ami_ros')


RVIZ_MISSING = ('rviz:=true but rviz2 is not on PATH: install ROS 2\'s rviz2 (ros-<distro>-rviz2) '
                'or open config/ami.rviz with rviz2 -d elsewhere; the graph runs without it')


def rviz_command(args: dict[str, str]) -> list[str] | None:
    """rviz2 -d <share>/config/ami.rviz in the graph's namespace, or None where rviz2 is missing."""
    rviz2 = shutil.which('rviz2')
    if rviz2 is None:
        return None
    # Its topics are relative: in the namespace it finds the graph's.
    namespace = ['--ros-args', '-r', f'__ns:=/{args["namespace"].strip("/")}'] if args['namespace'] else []
    return [rviz2, '-d', str(package_share() / 'config' / 'ami.rviz'), *namespace]


def default_params_file() -> Path:
    return package_share() / 'config' / 'ami.yaml'


def params_file(args: dict[str, str]) -> Path:
    """The parameters file the arguments name, checked to exist."""
    path = Path(args['params_file']) if args.get('params_file') else default_params_file()
    if not path.is_file():
        raise GraphArgumentError(f'params_file:={path} does not exist')
    return path
