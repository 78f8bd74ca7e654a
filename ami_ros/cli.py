"""`ami-ros`: run, launch and control the ami_ros graph without a ROS install.

    ami-ros run NODE [--ros-args ...]   start one node (like `ros2 run ami_ros NODE`)
    ami-ros launch [ARG:=VALUE ...]     start the whole graph (like `ros2 launch`)
    ami-ros status|pause|resume|shutdown   call the manager's ami/* services
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import ami_ros.nodes


def available_nodes() -> list[str]:
    """The node executables of the package: one per module of ami_ros.nodes."""
    return sorted(m.name for m in pkgutil.iter_modules(ami_ros.nodes.__path__) if not m.ispkg)


def run_node(node: str, ros_args: Sequence[str]) -> int:
    nodes = available_nodes()
    if node not in nodes:
        print(f'ami-ros: no node {node!r}; nodes: {", ".join(nodes) or "(none yet)"}',
              file=sys.stderr)
        return 2
    module = importlib.import_module(f'ami_ros.nodes.{node}')
    code = module.main([f'ami-ros-{node}', *ros_args])
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == 'run':
        return run_node(args.node, args.ros_args)
    return 2


if __name__ == '__main__':
    sys.exit(main())
