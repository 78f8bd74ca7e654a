"""`ami-ros bag info`: what a bag holds, as `ros2 bag info` prints it."""

from __future__ import annotations

import argparse
import sys

COMMAND = ('bag', 'info')
HELP = "print a bag's files, size, duration, start, end and topics, like ros2 bag info"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', metavar='BAG',
                        help='a bag directory (mcap or sqlite3), or a single .mcap or .db3 file')


def run(args: argparse.Namespace) -> int:
    from ami_ros.bags.info import describe
    from ami_ros.bags.reading import BagError, open_bag

    try:
        with open_bag(args.bag) as bag:
            text = describe(bag)
    except BagError as exc:
        print(f'ami-ros bag info: {exc}', file=sys.stderr)
        return 1
    print(text, end='', flush=True)
    return 0
