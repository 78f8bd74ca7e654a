"""launch/ami.launch.py against the package's graph description.

launch and launch_ros are not on PyPI, so this test loads the launch file
with minimal stand-ins for the few launch classes it uses (they record their
arguments) and checks that it declares every argument and starts exactly the
nodes, executables and parameter files of ami_ros.graph. The real
`ami-ros launch` is tested with real processes in test_graph.py.
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

from ami_ros import graph

ROOT = Path(__file__).resolve().parent.parent


class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


@pytest.fixture
def launch_file(monkeypatch):
    """The launch file's module, loaded with recording stand-ins for launch/launch_ros."""
    launch = types.ModuleType('launch')
    launch.LaunchDescription = _Recorder
    actions = types.ModuleType('launch.actions')
    actions.DeclareLaunchArgument = _Recorder
    actions.OpaqueFunction = _Recorder
    actions.SetEnvironmentVariable = _Recorder
    actions.ExecuteProcess = _Recorder
    actions.LogInfo = _Recorder
    subs = types.ModuleType('launch.substitutions')
    subs.LaunchConfiguration = _LaunchConfiguration
    launch_ros = types.ModuleType('launch_ros')
    ros_actions = types.ModuleType('launch_ros.actions')
    ros_actions.Node = _Recorder
    for name, module in {'launch': launch, 'launch.actions': actions,
                         'launch.substitutions': subs, 'launch_ros': launch_ros,
                         'launch_ros.actions': ros_actions}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location('ami_launch', ROOT / 'launch' / 'ami.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(launch_file, **given):
    description = launch_file.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs for e in entities if e.args and isinstance(e.args[0], str)}
    opaque = [e for e in entities if 'function' in e.kwargs][0]
    config = {name: arg.default for name, arg in graph.LAUNCH_ARGUMENTS.items()}
    config.update(given)
    context = types.SimpleNamespace(launch_configurations=config)
    started = opaque.kwargs['function'](context)
    nodes = [e for e in started if 'executable' in e.kwargs]
    # Every environment variable is set before the first node starts.
    environment = dict(e.args for e in started[:len(started) - len(nodes)])
    assert started[len(started) - len(nodes):] == nodes
    return declared, nodes, environment


def test_declares_every_graph_argument_with_description_and_choices(launch_file):
    declared, _, _ = _run(launch_file)
    assert set(declared) == set(graph.LAUNCH_ARGUMENTS)
    for name, arg in graph.LAUNCH_ARGUMENTS.items():
        assert declared[name]['default_value'] == arg.default
        assert declared[name]['description']
        if arg.choices:
            assert declared[name]['choices'] == list(arg.choices)


@pytest.mark.parametrize('world', ['vrchat', 'doom'])
def test_starts_the_graph_nodes_with_the_params_file(launch_file, world):
    _, nodes, _ = _run(launch_file, world=world, preset='ami', vrchat_port='9123', namespace='bot')
    specs = graph.describe({'world': world, 'preset': 'ami', 'vrchat_port': '9123',
                            'namespace': 'bot'})
    assert [n.kwargs['executable'] for n in nodes] == [s.executable for s in specs]
    assert [n.kwargs['name'] for n in nodes] == [s.name for s in specs]
    params_file = Path(nodes[0].kwargs['parameters'][0])
    assert params_file == ROOT / 'config' / 'ami.yaml'
    for node, spec in zip(nodes, specs, strict=True):
        assert node.kwargs['package'] == 'ami_ros'
        assert node.kwargs['namespace'] == 'bot'
        assert node.kwargs['parameters'] == [str(params_file), spec.parameters]
    executables = [n.kwargs['executable'] for n in nodes]
    assert ('doom_world' in executables) == (world == 'doom')
    assert ('camera' in executables) == (world == 'vrchat')
    agent = nodes[executables.index('agent')]
    assert agent.kwargs['parameters'][1]['preset'] == 'ami'
    bridge = nodes[executables.index('osc_bridge')]
    assert bridge.kwargs['parameters'][1]['port'] == 9123


def test_agents_start_in_namespaces_of_their_own_below_the_graphs(launch_file):
    _, nodes, _ = _run(launch_file, world='doom', agents='2', vrchat_port='9123', namespace='bot')
    placed = {(n.kwargs['namespace'], n.kwargs['name']) for n in nodes}
    for i in range(2):
        assert {(f'bot/agent_{i}', name) for name in ('doom_world', 'agent', 'osc_bridge')} <= placed
    assert ('bot', 'vae_trainer') in placed and ('bot', 'manager') in placed
    # Each agent's world and bridge meet on a port of their own.
    ports = {n.kwargs['namespace']: n.kwargs['parameters'][1]['port'] for n in nodes
             if n.kwargs['name'] == 'osc_bridge'}
    assert ports == {'bot/agent_0': 9123, 'bot/agent_1': 9124}


@pytest.mark.parametrize('given', [{}, {'respawn': 'false'}, {'respawn_delay': '2.5', 'world': 'doom'}])
def test_nodes_respawn_as_the_graph_description_says(launch_file, given):
    _, nodes, _ = _run(launch_file, **given)
    specs = graph.describe(given)
    assert [n.kwargs['respawn'] for n in nodes] == [s.respawn for s in specs]
    assert any(s.respawn for s in specs) == (given.get('respawn') != 'false')
    assert {n.kwargs['respawn_delay'] for n in nodes} == {float(given.get('respawn_delay', '1.0'))}


def test_ctrl_c_gives_the_final_checkpoint_more_than_launch_ros_default_5_s(launch_file):
    from ami_ros.ros.graceful_stop import SHUTDOWN_GRACE

    _, nodes, _ = _run(launch_file, world='doom')
    # launch_ros sends SIGTERM this long after Ctrl-C: only once the nodes' own grace is over.
    assert {float(n.kwargs['sigterm_timeout']) for n in nodes} == {SHUTDOWN_GRACE + 10.0}
    assert SHUTDOWN_GRACE > 5.0


@pytest.mark.parametrize('network', ['localhost', 'subnet'])
def test_the_nodes_discover_as_the_network_argument_says(launch_file, network):
    given = {} if network == 'localhost' else {'network': network}  # localhost is the default
    _, _, environment = _run(launch_file, **given)
    assert environment == graph.discovery_environment(graph.resolve_arguments(given))
    assert environment['ROS_AUTOMATIC_DISCOVERY_RANGE'] == network.upper()
    # Static peers and a Fast DDS profile from a shell profile: replaced on localhost (by the
    # loopback-only profile), passed through on subnet.
    assert environment.get('ROS_STATIC_PEERS', 'inherited') == ('' if network == 'localhost' else 'inherited')
    profiles = [v for k, v in environment.items() if k.endswith('_DEFAULT_PROFILES_FILE')]
    assert len(profiles) == (network == 'localhost') and all(Path(p).is_file() for p in profiles)


def test_rviz_starts_rviz2_with_the_package_config_or_says_it_is_missing(launch_file, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))
    started = launch_file._nodes(types.SimpleNamespace(launch_configurations={
        **{n: a.default for n, a in graph.LAUNCH_ARGUMENTS.items()}, 'rviz': 'true'}))
    assert started[-1].kwargs == {'msg': graph.RVIZ_MISSING}
    (tmp_path / 'rviz2').write_text('#!/bin/sh\n')
    (tmp_path / 'rviz2').chmod(0o755)
    started = launch_file._nodes(types.SimpleNamespace(launch_configurations={
        **{n: a.default for n, a in graph.LAUNCH_ARGUMENTS.items()}, 'rviz': 'true', 'namespace': 'bot'}))
    assert started[-1].kwargs['cmd'] == [str(tmp_path / 'rviz2'), '-d', str(ROOT / 'config' / 'ami.rviz'),
                                         '--ros-args', '-r', '__ns:=/bot']
    assert (ROOT / 'config' / 'ami.rviz').is_file()


def test_bad_arguments_are_refused_with_the_choices(launch_file):
    with pytest.raises(graph.GraphArgumentError, match='world:=quake is not valid; use one of vrchat, doom'):
        _run(launch_file, world='quake')
    with pytest.raises(graph.GraphArgumentError, match='not a UDP port'):
        _run(launch_file, vrchat_port='70000')


@pytest.mark.parametrize(('given', 'says'), [
    ({'agents': '0'}, r'agents:=0 is not a number of agents \(1\.\.64\)'),
    ({'agents': 'two'}, 'is not a number of agents'),
    ({'agents': '3', 'vrchat_port': '9000,9001'}, 'names 2 values for agents:=3; give one, or 3'),
    ({'agents': '2', 'vrchat_port': '9000,9000'}, 'the same OSC address'),
    ({'agents': '2', 'vrchat_port': '65535'}, 'not a UDP port'),  # the second agent's would be 65536
    ({'agents': '2', 'camera_source': '/dev/video0'}, 'needs 2 camera sources'),
])
def test_several_agents_need_an_address_and_a_camera_each(given, says):
    with pytest.raises(graph.GraphArgumentError, match=says):
        graph.resolve_arguments(given)


def test_several_agents_take_lists_or_one_value_each_agent_shares():
    groups = graph.agent_groups(graph.resolve_arguments(
        {'agents': '2', 'vrchat_host': '10.0.0.5,10.0.0.6', 'vrchat_port': '9000',
         'camera_source': '/dev/video0, /dev/video2'}))
    assert [(g.namespace, g.host, g.port, g.camera_source) for g in groups] == [
        ('agent_0', '10.0.0.5', 9000, '/dev/video0'), ('agent_1', '10.0.0.6', 9001, '/dev/video2')]
    [only] = graph.agent_groups(graph.resolve_arguments({}))
    assert only.namespace == '' and only.port == 9000  # agents:=1: today's graph, no namespace


def test_every_node_executable_is_a_node_module_and_an_entry_point():
    from ami_ros.cli import available_nodes

    setup_src = (ROOT / 'setup.py').read_text()
    nodes = available_nodes()
    for world in ('vrchat', 'doom'):
        for spec in graph.describe({'world': world}):
            assert spec.executable in nodes
            assert f"'{spec.executable}'" in setup_src, f'{spec.executable} missing in setup.py NODES'


def test_params_file_names_only_graph_nodes():
    params = yaml.safe_load((ROOT / 'config' / 'ami.yaml').read_text())
    names = {s.name for w in ('vrchat', 'doom') for s in graph.describe({'world': w})}
    for key, section in params.items():
        assert key.startswith('/**/'), key
        assert key[4:] in names, f'{key} is not a node of the graph'
        assert 'ros__parameters' in section
