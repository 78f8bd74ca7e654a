"""ros2 launch ami_ros ami.launch.py [world:=vrchat|doom] [preset:=cpu] ...

The nodes, their names and their parameters come from ami_ros.graph, the
same description `ami-ros launch` uses, so the two cannot drift apart; so do
the DDS discovery variables the nodes run with (`network:=`, localhost by
default: the graph stays on this machine).
"""

from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    SetEnvironmentVariable,
)
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from ami_ros import graph
from ami_ros.ros.graceful_stop import LAUNCH_SIGTERM_TIMEOUT


def _nodes(context, *args, **kwargs):
    given = {name: LaunchConfiguration(name).perform(context) for name in graph.LAUNCH_ARGUMENTS}
    resolved = graph.resolve_arguments(given)
    params = str(graph.params_file(resolved))
    # Set before the nodes: a launch's processes take the environment as it is when they start.
    environment = [SetEnvironmentVariable(name, value)
                   for name, value in graph.discovery_environment(resolved).items()]
    nodes = [
        Node(package='ami_ros', executable=spec.executable, name=spec.name,
             namespace=graph.node_namespace(resolved['namespace'], spec.namespace),
             output='screen', emulate_tty=True,
             parameters=[params, spec.parameters],
             # launch_ros restarts with the same command after a fixed delay (no back-off).
             respawn=spec.respawn, respawn_delay=float(resolved['respawn_delay']),
             # Ctrl-C sends SIGINT to every node at once: the manager saves the final checkpoint
             # while the nodes wait for it (shutdown_grace). launch_ros's 5 s before SIGTERM
             # would cut that save short; SIGTERM comes only after the nodes' own grace.
             sigterm_timeout=str(LAUNCH_SIGTERM_TIMEOUT))
        for spec in graph.describe(resolved)
    ]
    viewers = []
    if resolved['rviz'] == 'true':
        rviz = graph.rviz_command(resolved)
        viewers.append(ExecuteProcess(cmd=rviz, name='rviz2', output='screen') if rviz
                       else LogInfo(msg=graph.RVIZ_MISSING))
    return environment + nodes + viewers


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument(name, default_value=arg.default, description=arg.description,
                              **({'choices': list(arg.choices)} if arg.choices else {}))
        for name, arg in graph.LAUNCH_ARGUMENTS.items()
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_nodes)])
