"""`ami-ros`: run, launch and control the ami_ros graph without a ROS install.

    ami-ros run NODE [--ros-args ...]   start one node (like `ros2 run ami_ros NODE`)
    ami-ros launch [ARG:=VALUE ...]     start the whole graph (like `ros2 launch`)
    ami-ros status|pause|resume|save|shutdown   call the manager's ami/* services
    ami-ros parameters [NODE ...] [--markdown]  every node's parameters (docs/parameters.md)

More commands live one per module in ami_ros/commands/ (`ami-ros --help` lists them).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import threading
from collections.abc import Sequence

import ami_ros.nodes
from ami_ros.commands import add_command_parsers


def available_nodes() -> list[str]:
    """The node executables of the package: one per module of ami_ros.nodes."""
    return sorted(m.name for m in pkgutil.iter_modules(ami_ros.nodes.__path__) if not m.ispkg)


def run_node(node: str, ros_args: Sequence[str]) -> int:
    nodes = available_nodes()
    if node not in nodes:
        print(f'ami-ros: no node {node!r}; nodes: {", ".join(nodes) or "(none yet)"}',
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f'ami_ros.nodes.{node}')
        code = module.main([f'ami-ros-{node}', *ros_args])
    except KeyboardInterrupt:
        # Stopped while still importing or starting (torch takes seconds):
        # nothing ran yet, so this is a clean stop, not a failure.
        return 0
    return int(code or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='ami-ros',
        description='Run, launch and control the ami_ros ROS 2 graph.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='nodes: ' + (', '.join(available_nodes()) or '(none yet)'))
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    run = sub.add_parser('run', help='start one node of the package',
                         description='Start one node: ami-ros run NODE [--ros-args ...]')
    run.add_argument('node', help='node executable: ' + (', '.join(available_nodes()) or '(none)'))
    run.add_argument('ros_args', nargs=argparse.REMAINDER,
                     help='ROS arguments, e.g. --ros-args -p fps:=10 -r __ns:=/ami')
    launch = sub.add_parser(
        'launch', help='start the whole graph (like ros2 launch ami_ros ami.launch.py)',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Start the whole graph: ami-ros launch [ARG:=VALUE ...]',
        epilog=_launch_epilog())
    launch.add_argument('arguments', nargs='*', metavar='ARG:=VALUE')
    parameters = sub.add_parser('parameters', help="print every node's parameters",
                                description="Print the nodes' parameters, read from their declarations.")
    parameters.add_argument('nodes', nargs='*', metavar='NODE', help='only these nodes (default: all)')
    parameters.add_argument('--markdown', action='store_true',
                            help='print docs/parameters.md (Markdown tables)')
    for command, text in CONTROL_COMMANDS.items():
        control = sub.add_parser(command, help=text, description=text)
        control.add_argument('--namespace', default='', help='namespace of the graph')
        control.add_argument('--timeout', type=float, default=120.0 if command in ('save', 'shutdown')
                             else 15.0, help='seconds to wait for the manager')
    add_command_parsers(sub)
    return parser


CONTROL_COMMANDS = {
    'status': "print the graph's state and each node's lifecycle state",
    'pause': 'pause the whole graph (every input released)',
    'resume': 'resume the whole graph where it was',
    'shutdown': 'save a final checkpoint and stop every node of the graph cleanly',
    'save': 'save a checkpoint of the whole graph and print its directory',
}
# The manager's service for each control command.
CONTROL_SERVICES = {'save': 'save_checkpoint'}
# How long a control command waits for its ROS teardown before it exits anyway.
TEARDOWN_SECONDS = 5.0


def _launch_epilog() -> str:
    from ami_ros.graph import LAUNCH_ARGUMENTS

    lines = ['arguments:']
    for name, arg in LAUNCH_ARGUMENTS.items():
        choices = f' {{{"|".join(arg.choices)}}}' if arg.choices else ''
        default = arg.default or "''"
        lines.append(f'  {name}:={default}{choices}\n      {arg.description}')
    lines.append('  duration:=SECONDS\n      stop by itself after this long (0 = run until Ctrl-C)')
    return '\n'.join(lines)


def launch_graph(items: Sequence[str]) -> int:
    from ami_ros.graph import GraphArgumentError
    from ami_ros.launcher import launch, parse_launch_arguments

    try:
        given = parse_launch_arguments(list(items))
        duration = float(given.pop('duration', '0') or 0)
        return launch(given, duration=duration)
    except (GraphArgumentError, ValueError) as exc:
        print(f'ami-ros launch: {exc}', file=sys.stderr)
        return 2


def print_parameters(nodes: Sequence[str], markdown: bool) -> int:
    from ami_ros.parameter_docs import collect, render_markdown, render_text

    unknown = sorted(set(nodes) - set(available_nodes()))
    if unknown:
        print(f'ami-ros parameters: no node {", ".join(unknown)}; nodes: {", ".join(available_nodes())}',
              file=sys.stderr)
        return 2
    try:
        docs = collect(nodes or available_nodes())
    except RuntimeError as exc:  # a node that cannot be constructed: say which, in one line
        print(f'ami-ros parameters: {exc}', file=sys.stderr)
        return 1
    print(render_markdown(docs) if markdown else render_text(docs), end='', flush=True)
    return 0


def control(command: str, namespace: str, timeout: float) -> int:
    """Call ami/<command> on the graph's manager and print its answer."""
    import rclpy
    from std_srvs.srv import Trigger

    rclpy.init(args=['ami-ros', '--ros-args', '--disable-rosout-logs'])
    node = None
    try:
        node = rclpy.create_node('ami_ros_cli', namespace=namespace or None, enable_rosout=False)
        client = node.create_client(Trigger, f'ami/{CONTROL_SERVICES.get(command, command)}')
        if not client.wait_for_service(timeout_sec=timeout):
            print(f'ami-ros {command}: no manager answers on {client.srv_name} within {timeout:g}s; '
                  'is the graph running (ami-ros launch) in this ROS_DOMAIN_ID and namespace?',
                  file=sys.stderr)
            return 1
        future = client.call_async(Trigger.Request())
        rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
        if not future.done():
            print(f'ami-ros {command}: the manager did not answer within {timeout:g}s', file=sys.stderr)
            return 1
        result = future.result()
        print(result.message, flush=True)
        return 0 if result.success else 1
    finally:
        # The node goes before the context. A CLI once hung in DDS teardown
        # after printing its answer (seen in CI, not reproduced), so teardown
        # gets a bounded time and main() leaves without interpreter cleanup.
        def teardown() -> None:
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown()

        worker = threading.Thread(target=teardown, daemon=True)
        worker.start()
        worker.join(timeout=TEARDOWN_SECONDS)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if hasattr(args, 'command_run'):
        return int(args.command_run(args) or 0)
    if args.command == 'run':
        return run_node(args.node, args.ros_args)
    if args.command == 'launch':
        return launch_graph(args.arguments)
    if args.command == 'parameters':
        return print_parameters(args.nodes, args.markdown)
    code = control(args.command, args.namespace, args.timeout)
    # Everything is said and rclpy is shut down (or given up on): exit now
    # rather than risk DDS finalisers at interpreter exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == '__main__':
    sys.exit(main())
