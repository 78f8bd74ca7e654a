"""Starting real ami_ros nodes as processes, and a test-side rclpy node.

Every process gets the isolation conftest.py puts in os.environ: DDS
discovery on localhost only and a ROS_DOMAIN_ID of this test run alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.02,
             message: str = 'condition') -> Any:
    """Poll until `condition()` is truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout:.1f}s waiting for {message}')
        time.sleep(interval)


class NodeProcess:
    """One node started as `python -m ami_ros.cli run NODE --ros-args ...`."""

    def __init__(self, node: str, log_dir: Path, parameters: dict[str, Any] | None = None,
                 name: str | None = None, namespace: str = '',
                 remaps: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.node = node
        self.name = name or node
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f'{self.name}.log'
        params_path = log_dir / f'{self.name}.params.yaml'
        params_path.write_text(yaml.safe_dump({'/**': {'ros__parameters': parameters or {}}}))
        cmd = [sys.executable, '-u', '-m', 'ami_ros.cli', 'run', node, '--ros-args',
               '--params-file', str(params_path), '-r', f'__node:={self.name}']
        if namespace:
            cmd += ['-r', f'__ns:={namespace}']
        for src, dst in (remaps or {}).items():
            cmd += ['-r', f'{src}:={dst}']
        cmd += extra_args or []
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Stop with `sig`, SIGKILL after `timeout`; the exit code."""
        self.send(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
        finally:
            self._log.close()


class TestNode:
    """An rclpy node in the test process, spun by a background thread."""

    def __init__(self, name: str = 'test_probe') -> None:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # context shut down under us at teardown
            pass

    def collect(self, msg_type: type, topic: str, qos: int = 50) -> list:
        """Subscribe and return a list that fills with (receive_time, msg)."""
        received: list = []
        self.node.create_subscription(
            msg_type, topic, lambda msg: received.append((time.monotonic(), msg)), qos)
        return received

    def call(self, srv_type: type, name: str, request: Any = None, timeout: float = 10.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise AssertionError(f'service {name} did not appear within {timeout}s')
            future = client.call_async(request if request is not None else srv_type.Request())
            wait_for(future.done, timeout, message=f'answer from {name}')
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)
