"""Test isolation for every ami_ros test.

DDS stays on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) and each
test run gets its own ROS_DOMAIN_ID, so parallel runs never see each other.
This is set before any test imports rclpy, and node processes inherit it.
"""

from __future__ import annotations

import os
import tempfile

os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.pop('ROS_LOCALHOST_ONLY', None)
os.environ['ROS_DOMAIN_ID'] = str(1 + os.getpid() % 100)
os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
os.environ['PYTHONUNBUFFERED'] = '1'
# Node processes and the test process share 2 cores: one torch thread each.
os.environ['OMP_NUM_THREADS'] = '1'
# MLflow runs of launched graphs go to a directory of this test run, never
# into the working tree.
_mlflow_dir = tempfile.mkdtemp(prefix='ami_ros_test_mlflow_')
os.environ['MLFLOW_TRACKING_URI'] = f'sqlite:///{_mlflow_dir}/mlflow.db'

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def test_node():
    """A spinning rclpy node in the test process (see ros_harness.TestNode)."""
    from ros_harness import TestNode

    node = TestNode()
    yield node
    node.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report shows the end of every node log it started.

    CI keeps no temporary directories, so without this a node that failed to
    act or crashed would leave nothing to read.
    """
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in getattr(item, 'ami_ros_started', []):
            tail = '\n'.join(proc.output().splitlines()[-40:])
            state = 'running' if proc.alive() else f'exited {proc.returncode}'
            report.sections.append((f'node {proc.name} ({state}), last lines', tail))


@pytest.fixture
def launch(tmp_path, request):
    """Start node processes; every one is stopped when the test ends."""
    from ros_harness import start_node

    started = []
    request.node.ami_ros_started = started

    def start(node: str, **kwargs):
        proc = start_node(node, tmp_path / 'logs', **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.stop()
