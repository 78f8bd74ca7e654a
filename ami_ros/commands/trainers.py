"""`ami-ros trainers [ARG:=VALUE ...]`: the learning half of the graph, for another machine.

It starts the VAE, dynamics and policy trainers, as `ami-ros launch` would
(same launcher, parameters file, status line and stop), and nothing else:
the acting half runs on the agent's machine with `ami-ros launch ...
train:=false`, whose manager, recorder (which records these trainers too)
and checkpoints serve the graph. The two halves find each other over DDS:
`network:=subnet` here is the default (discovery across the subnet;
`ROS_STATIC_PEERS` passes through where multicast is blocked), and the
acting half needs it too. The trainers do not pace themselves (the agent's
steps are not on this CPU) and send their weights over the payload topic
once the agent answers that their files are not on its machine
(`sync_transport: auto`; ros/weight_payload.py).
"""

from __future__ import annotations

import argparse
import sys

COMMAND = ('trainers',)
HELP = 'start the trainers alone, for another machine than the agent (ami-ros launch train:=false there)'
# The launch arguments that mean something to the trainers alone.
ARGUMENTS = ('preset', 'device', 'trainer_device', 'agents', 'network', 'namespace', 'params_file',
             'checkpoint', 'checkpoint_dir', 'respawn', 'respawn_delay')
DEFAULTS = {'network': 'subnet'}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ami_ros.graph import LAUNCH_ARGUMENTS

    lines = ['arguments (as ami-ros launch; network defaults to subnet here):']
    for name in ARGUMENTS:
        arg = LAUNCH_ARGUMENTS.get(name)
        if arg is not None:  # respawn* come with the launcher's supervision
            choices = f' {{{"|".join(arg.choices)}}}' if arg.choices else ''
            lines.append(f'  {name}:={DEFAULTS.get(name, arg.default) or chr(39) * 2}{choices}\n'
                         f'      {arg.description}')
    lines.append('  duration:=SECONDS\n      stop by itself after this long (0 = run until Ctrl-C)')
    parser.epilog = '\n'.join(lines)
    parser.add_argument('arguments', nargs='*', metavar='ARG:=VALUE')


def run(args: argparse.Namespace) -> int:
    from ami_ros.graph import LAUNCH_ARGUMENTS, GraphArgumentError
    from ami_ros.launcher import launch, parse_launch_arguments

    try:
        given = parse_launch_arguments(list(args.arguments))
        duration = float(given.pop('duration', '0') or 0)
        known = [name for name in ARGUMENTS if name in LAUNCH_ARGUMENTS]
        other = sorted(set(given) - set(known))
        if other:
            raise GraphArgumentError(f'{", ".join(other)} not for the trainers alone; they take '
                                     f'{", ".join(known)} (the rest is the acting half\'s: ami-ros launch)')
        return launch({**DEFAULTS, **given}, duration=duration, part='trainers')
    except (GraphArgumentError, ValueError) as exc:
        print(f'ami-ros trainers: {exc}', file=sys.stderr)
        return 2
