"""`ami-ros bag play BAG`: publish a recorded bag with its timing and QoS (ami_ros/bags/play.py)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading

COMMAND = ('bag', 'play')
HELP = 'publish the messages of a bag with their recorded timing and QoS'
EPILOG = """\
Messages with a std_msgs/Header (Image, Joy, ...) get their stamps moved onto
the playing clock, as if recorded now: the agent's frame -> action latency and
rqt / rviz see live data. --keep-stamps publishes them as recorded.

  ami-ros bag play session/ --topics camera/image_raw   # the agent acts on a recorded camera
  ami-ros bag play session/ --rate 2 --loop --namespace /replay
"""
NODE_NAME = 'ami_bag_player'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument('bag', help='a bag directory, or one .mcap / .db3 file')
    parser.add_argument('--rate', type=_positive, default=1.0, help='speed factor (default 1: as recorded)')
    parser.add_argument('--loop', action='store_true', help='play again from the start at the end')
    parser.add_argument('--topics', nargs='+', default=[], metavar='TOPIC',
                        help='play only these recorded topics (default: all)')
    parser.add_argument('--start-offset', type=_not_negative, default=0.0, metavar='SECONDS',
                        help='skip the first SECONDS of the bag')
    parser.add_argument('--namespace', default='', help='publish every topic under this namespace')
    parser.add_argument('--remap', nargs='+', default=[], metavar='FROM:=TO',
                        help='publish a topic under another name (ROS remap rules, after --namespace)')
    parser.add_argument('--keep-stamps', action='store_true',
                        help='publish header stamps as recorded (default: moved to now)')
    parser.add_argument('--wait-for-subscribers', type=int, nargs='?', const=1, default=0, metavar='N',
                        help='start only once every played topic has N subscribers (default 1; messages '
                        'sent before a subscriber is discovered do not reach it)')


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f'must be above 0 and finite, not {text}')
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, not {text}')
    return value


def run(args: argparse.Namespace) -> int:
    from ami_ros.bags.reading import BagError, open_bag

    bad = [r for r in args.remap if ':=' not in r or not all(r.split(':=', 1))]
    if bad:
        print(f'ami-ros bag play: remaps look like FROM:=TO, got {" ".join(bad)}', file=sys.stderr)
        return 2
    try:
        bag = open_bag(args.bag)
    except BagError as exc:
        print(f'ami-ros bag play: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # stopped while still opening: nothing was played
        return 0
    with bag:
        code = _play(bag, args)
    # Everything is said: leave without interpreter teardown, whose DDS
    # finalisers can hang (as the control commands of ami_ros/cli.py do).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _play(bag, args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from ami_ros.bags.play import BagPlayer, PlayError, PlayOptions
    from ami_ros.bags.reading import BagError
    from ami_ros.launcher import StatusPrinter
    from ami_ros.ros.managed_node import prefer_synchronous_publication

    stop = threading.Event()
    # Ctrl-C and SIGTERM stop playing between two messages; rclpy's own
    # handlers would shut the context down under a publish instead.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    prefer_synchronous_publication()
    context = rclpy.Context()
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    printer = StatusPrinter(sys.stdout, plain_interval=5.0)
    try:
        ros_args = ['--ros-args'] + [part for rule in args.remap for part in ('-r', rule)]
        try:
            node = rclpy.create_node(NODE_NAME, namespace=args.namespace or None, context=context,
                                     cli_args=ros_args if args.remap else None,
                                     use_global_arguments=False, start_parameter_services=False,
                                     enable_rosout=False)
        except Exception as exc:  # a bad namespace or remap rule: rcl says which
            print(f'ami-ros bag play: {str(exc).splitlines()[0]}', file=sys.stderr)
            return 2
        options = PlayOptions(rate=args.rate, loop=args.loop, topics=args.topics,
                              start_offset=args.start_offset, keep_stamps=args.keep_stamps,
                              wait_for_subscribers=args.wait_for_subscribers)
        try:
            player = BagPlayer(node, bag, options, warn=printer.line)
        except PlayError as exc:
            print(f'ami-ros bag play: {args.bag}: {exc}', file=sys.stderr)
            return 2
        if bag.recovered:
            printer.line(f'{args.bag}: {bag.recovery_note}')
        names = player.published_names()
        printer.line(f'playing {args.bag}: ' + ', '.join(
            name if name == topic else f'{topic} as {name}' for topic, name in names.items()))
        try:
            player.play(stop, on_progress=printer.status)
        except BagError as exc:  # the bag breaks off in the middle (truncated)
            printer.close()
            print(f'ami-ros bag play: {exc}', file=sys.stderr)
            return 1
        return 0
    finally:
        printer.close()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
