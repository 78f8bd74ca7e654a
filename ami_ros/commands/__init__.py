"""The `ami-ros` commands that live in their own module, one per file.

A module here is a command when it defines:

    COMMAND: tuple[str, ...]   its words on the command line, e.g. ('bag', 'record')
    HELP: str                  one line for `ami-ros --help` / `ami-ros bag --help`
    add_arguments(parser)      its options, on an argparse parser
    run(args) -> int           does the work; the exit status

`ami_ros.cli` finds them with pkgutil, so adding a command means adding a
file. Modules import their heavy dependencies (torch, rclpy) inside `run`,
so `ami-ros --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from types import ModuleType

# One line for each group of commands, in `ami-ros --help`.
GROUP_HELP = {('bag',): 'record, inspect and play rosbag2 bags'}


def command_modules() -> list[ModuleType]:
    """Every command module of this package, in name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f'{__name__}.{info.name}')
        if hasattr(module, 'COMMAND') and hasattr(module, 'run'):
            found.append(module)
    return found


def add_command_parsers(sub: argparse._SubParsersAction) -> None:
    """Add each command module's parser under `sub`, groups (`bag`) made as needed."""
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): sub}
    for module in command_modules():
        words: tuple[str, ...] = module.COMMAND
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                group = groups[words[:depth - 1]].add_parser(
                    prefix[-1], help=GROUP_HELP.get(prefix, f'{" ".join(prefix)} commands'),
                    description=f'ami-ros {" ".join(prefix)} COMMAND')
                groups[prefix] = group.add_subparsers(dest=f'command_{depth}', required=True,
                                                      metavar='COMMAND')
        parser = groups[words[:-1]].add_parser(
            words[-1], help=module.HELP, description=module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(command_run=module.run)
