"""`ami-ros bag record`: record topics of a running graph into a rosbag2 bag (MCAP)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

COMMAND = ('bag', 'record')
HELP = 'record topics into a rosbag2 bag (MCAP + metadata.yaml), like ros2 bag record'
EPILOG = '''Default topics (relative to --namespace): camera/image_raw, action, experience, reward,
prediction_error, world/pose, world/episode. Ctrl-C (or SIGTERM) closes the bag cleanly; after a
SIGKILL, `ami-ros bag info` reads back every complete chunk. Example:
  ami-ros bag record -o run1 --namespace ami --max-duration 600'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument('topics', nargs='*', metavar='TOPIC',
                        help='topics to record, relative to the namespace (default: the graph\'s)')
    parser.add_argument('-o', '--output', default='',
                        help='bag directory to create (default: rosbag2_<date>-<time>)')
    parser.add_argument('-a', '--all', action='store_true', help='record every topic (hidden ones excepted)')
    parser.add_argument('--namespace', default='', help='namespace of the graph')
    parser.add_argument('--max-duration', type=float, default=0.0, metavar='S',
                        help='split into numbered files every S seconds (0 = never)')
    parser.add_argument('--max-size', type=int, default=0, metavar='BYTES',
                        help='split into numbered files of about BYTES each (0 = never)')
    parser.add_argument('--compression', choices=('zstd', 'none'), default='zstd',
                        help='MCAP chunk compression (default zstd)')
    parser.add_argument('--status-interval', type=float, default=10.0, metavar='S',
                        help='seconds between status lines when not on a terminal (0 = none)')


def run(args: argparse.Namespace) -> int:
    from ami_ros.bags.recording import DEFAULT_TOPICS
    from ami_ros.nodes import bag_recorder
    from ami_ros.ros.node_process import write_parameters

    if args.max_duration < 0 or args.max_size < 0:
        print('ami-ros bag record: --max-duration and --max-size must be 0 or more', flush=True)
        return 2
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        print(f'ami-ros bag record: {output} exists and is not an empty directory; choose a new one',
              file=sys.stderr)
        return 1
    parameters = {'topics': list(args.topics or DEFAULT_TOPICS), 'all_topics': bool(args.all),
                  'max_duration': float(args.max_duration), 'max_size': int(args.max_size),
                  'compression': args.compression, 'status_interval': float(args.status_interval)}
    if output is not None:
        parameters['output'] = str(output)
    with tempfile.TemporaryDirectory(prefix='ami_ros_bag_') as tmp:
        params = write_parameters(Path(tmp) / 'bag_record.yaml', 'bag_record', parameters)
        ros_args = ['ami-ros-bag-record', '--ros-args', '-r', '__node:=bag_record',
                    '--params-file', str(params)]
        if args.namespace:
            ros_args += ['-r', f'__ns:=/{args.namespace.strip("/")}']
        return bag_recorder.main(ros_args)
