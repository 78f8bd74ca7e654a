"""Starting real ami_ros nodes as processes, and a test-side rclpy node.

Every process gets the isolation conftest.py puts in os.environ: DDS
discovery on localhost only and a ROS_DOMAIN_ID of this test run alone.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on now (for a world's OSC input)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a graph's control API)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.02,
             message: str | Callable[[], str] = 'condition') -> Any:
    """Poll until `condition()` is truthy; fail the test after `timeout` s.
    A callable `message` is called only then, so it can show the state at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        TestNode.raise_callback_errors()  # a broken callback fails the wait, not only teardown
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout:.1f}s waiting for '
                                 f'{message() if callable(message) else message}')
        time.sleep(interval)


def fast_trainer_params(path: Path) -> Path:
    """The package's parameters file with trainers that take a round after a few steps, written to `path`."""
    import yaml

    from ami_ros.graph import default_params_file

    params = yaml.safe_load(default_params_file().read_text())
    for trainer in ('vae_trainer', 'dynamics_trainer', 'policy_trainer'):
        params[f'/**/{trainer}']['ros__parameters'].update(min_new=16, sync_retry=0.5)
        if trainer != 'policy_trainer':
            params[f'/**/{trainer}']['ros__parameters']['max_batches'] = 4
    path.write_text(yaml.safe_dump(params))
    return path


def ami_ros(*args: str, timeout: float = 60.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `ami-ros` command (`python -m ami_ros.cli`) to its end, output captured."""
    return subprocess.run([sys.executable, '-m', 'ami_ros.cli', *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def start_graph(cwd: Path, *arguments: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`ami-ros launch <arguments>` in `cwd` (its checkpoints/ land there), its
    output in `proc.log_path`, `env` on top of this process's; `stop_graph` ends it."""
    log_path = cwd / 'launch.log'
    # No control API unless a test asks for one: graphs of tests never take port 8391.
    if not any(a.startswith('web_api_port:=') for a in arguments):
        arguments = (*arguments, 'web_api_port:=0')
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen([sys.executable, '-m', 'ami_ros.cli', 'launch', *arguments],
                                stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    proc.log_path = log_path
    return proc


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
    """Send `sig` to a process still running and wait `timeout` s for it; kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_graph(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a graph still running as Ctrl-C does (the launcher stops its nodes); kill one that hangs."""
    stop_process(proc, signal.SIGINT, timeout)


def start_node(node: str, log_dir: Path, parameters: dict[str, Any] | None = None,
               name: str | None = None, namespace: str = '',
               remaps: dict[str, str] | None = None, env: dict[str, str] | None = None,
               extra_args: list[str] | None = None) -> NodeProcess:
    """Start node `node` as a process logging to `log_dir/<name>.log`."""
    name = name or node
    log_dir.mkdir(parents=True, exist_ok=True)
    params = write_parameters(log_dir / f'{name}.params.yaml', name, parameters or {})
    cmd = node_command(node, name, [params], namespace=namespace, remaps=remaps,
                       extra_ros_args=extra_args or [])
    # Each test's processes work in its own directory: checkpoints/ and
    # mlflow.db never land in the working tree.
    return NodeProcess(name, cmd, log_path=log_dir / f'{name}.log', env=env, cwd=log_dir)


class CallbackError(AssertionError):
    """A callback of the test's own node raised: what it was collecting cannot be trusted."""


class TestNode:
    """An rclpy node in the test process, spun by a background thread.

    An exception in one of its callbacks (a subscription, a timer) is
    recorded and raised in the test's thread by the next `wait_for` and at
    teardown (`close`): swallowed, it would stop the callback's collecting
    and pass every "nothing arrives" check.
    """

    _live: list[TestNode] = []  # open nodes, whose callback errors wait_for raises

    def __init__(self, name: str = 'test_probe') -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        # Single-threaded: rclpy's MultiThreadedExecutor busy-loops a core,
        # which the nodes under test need on this 2-core machine.
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.callback_errors: list[str] = []  # formatted tracebacks, oldest first
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        TestNode._live.append(self)

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException, ShutdownException

        while not self._closing.is_set() and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.1)
            except (ExternalShutdownException, ShutdownException):
                break
            except Exception:
                if self._closing.is_set():  # handles torn down under us at teardown
                    break
                self.callback_errors.append(traceback.format_exc())

    @classmethod
    def raise_callback_errors(cls) -> None:
        """Raise CallbackError for the first callback exception of any open node."""
        for node in cls._live:
            if node.callback_errors:
                raise CallbackError('a callback of the test node raised:\n' + node.callback_errors[0])

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
        """Stop spinning and leave rclpy; CallbackError if a callback raised meanwhile."""
        # The spinning thread leaves rclpy before the node and context go.
        self._closing.set()
        self.executor.shutdown(timeout_sec=5)
        self._thread.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
        TestNode._live.remove(self)
        if self.callback_errors:
            raise CallbackError('a callback of the test node raised:\n' + self.callback_errors[0])


class NodeStatus:
    """The newest /diagnostics status of every node: name (no leading '/') ->
    key -> value, and its level and message."""

    def __init__(self, test_node: TestNode) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self.status: dict[str, dict[str, str]] = {}
        self.level: dict[str, int] = {}
        self.message: dict[str, str] = {}
        test_node.node.create_subscription(DiagnosticArray, '/diagnostics', self._on, 50)

    def _on(self, msg: Any) -> None:
        for status in msg.status:
            name = status.name.lstrip('/')
            self.status[name] = {kv.key: kv.value for kv in status.values}
            self.level[name] = int.from_bytes(status.level, 'little') if isinstance(
                status.level, bytes) else int(status.level)
            self.message[name] = status.message

    def get(self, node: str, key: str, default: str = '') -> str:
        return self.status.get(node, {}).get(key, default)

    def number(self, node: str, key: str) -> float:
        """A value as a number; NaN while the node has not reported it."""
        return float(self.get(node, key, 'nan'))


class FrameFeeder:
    """Random 84x84 camera frames on camera/image_raw at `hz`, from a thread, like a camera.

    With `keep_frames` every frame sent is kept too: `frames[i]` was sent with stamp `published[i]`.
    With `still` every frame is the first one again: a view a trainer can learn.
    """

    def __init__(self, test_node: TestNode, hz: float = 10.0, seed: int = 0,
                 keep_frames: bool = False, still: bool = False) -> None:
        from sensor_msgs.msg import Image

        self.pub = test_node.node.create_publisher(Image, 'camera/image_raw', 10)
        self.clock = test_node.node.get_clock()
        self.hz, self.seed = hz, seed
        self.published: list[int] = []  # header stamps (ns) of every frame sent
        self.keep_frames, self.still = keep_frames, still
        self.frames: list[Any] = []  # HxWx3 uint8 RGB, with keep_frames
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import numpy as np

        from ami_ros.ros.images import rgb_to_image

        rng = np.random.default_rng(self.seed)
        rgb = None
        while not self.stop.wait(1.0 / self.hz):
            if rgb is None or not self.still:
                rgb = rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)
            stamp = self.clock.now()
            self.pub.publish(rgb_to_image(rgb, stamp.to_msg()))
            if self.keep_frames:
                self.frames.append(rgb)
            self.published.append(stamp.nanoseconds)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


def weights_parameter(model: str, blob: bytes | None = None, value: Any = None) -> Any:
    """One Parameter of an agent/sync_weights request: a weights envelope as bytes, or `value`."""
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue

    if value is None:
        value = ParameterValue(type=ParameterType.PARAMETER_BYTE_ARRAY, byte_array_value=blob)
    return Parameter(name=model, value=value)


def sync_weights(test_node: TestNode, *parameters: Any, service: str = 'agent/sync_weights') -> list:
    """Push weights to the agent as a trainer does; the SetParametersResult of each model."""
    from rcl_interfaces.srv import SetParameters

    request = SetParameters.Request(parameters=list(parameters))
    return test_node.call(SetParameters, service, request).results


class NamespaceUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no CAP_NET_ADMIN); the text says ip's words."""


@contextlib.contextmanager
def veth_namespaces(ends: tuple[str | None, str], addresses: tuple[str, str]) -> Iterator[None]:
    """Two network namespaces (None = this process's) joined by one veth pair, as two machines.

    Each end gets only its address of `addresses` (a /30 of its own) and the
    namespaces their loopback; the namespaces made here and the pair are removed at the end.
    """
    made = [ns for ns in ends if ns is not None]
    for ns in made:
        added = subprocess.run(['ip', 'netns', 'add', ns], capture_output=True, text=True)
        if added.returncode != 0:
            for done in made[:made.index(ns)]:
                subprocess.run(['ip', 'netns', 'del', done], capture_output=True)
            raise NamespaceUnavailable(added.stderr.strip())
    links = [f'amv{os.getpid() % 100000}{side}' for side in 'ab']  # at most 15 characters
    try:
        subprocess.run(['ip', 'link', 'add', links[0], 'type', 'veth', 'peer', 'name', links[1]],
                       check=True, capture_output=True)
        for ns, link, address in zip(ends, links, addresses, strict=True):
            where = ['-n', ns] if ns is not None else []
            if ns is not None:
                subprocess.run(['ip', 'link', 'set', link, 'netns', ns], check=True, capture_output=True)
                subprocess.run(['ip', *where, 'link', 'set', 'lo', 'up'], check=True, capture_output=True)
            subprocess.run(['ip', *where, 'addr', 'add', f'{address}/30', 'dev', link], check=True,
                           capture_output=True)
            subprocess.run(['ip', *where, 'link', 'set', link, 'up'], check=True, capture_output=True)
        yield
    finally:
        for ns, link in zip(ends, links, strict=True):  # deleting one end takes the other too
            subprocess.run(['ip', *(['-n', ns] if ns else []), 'link', 'del', link], capture_output=True)
        for ns in made:
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)


def in_namespace(namespace: str, argv: list[str], shm: Path | None = None) -> list[str]:
    """`argv` run in network namespace `namespace` with a /dev/shm of its own, as on another
    machine: Fast DDS's shared memory and the trainers' weight files do not cross. `shm`: a
    folder that stands in for it (processes of one "machine" share it), else a fresh tmpfs."""
    mount = f'mount --bind {shlex.quote(str(shm))} /dev/shm' if shm else 'mount -t tmpfs tmpfs /dev/shm'
    return ['ip', 'netns', 'exec', namespace, 'sh', '-c', f'{mount} && exec "$@"', 'netns', *argv]
