"""A doom graph under attack, and what the fault suite measures of it (bench/faults.py, test_faults.py).

`FaultGraph` starts `ami-ros launch world:=doom` with a control API on a free
port and checkpoints on a tmpfs (root only), finds each node's process, sends
bad input to each entry point, and says when the graph is healthy: every node
process up, the manager's ami/status finding every managed node active (it
asks each one's get_state), web_api answering, the agent acting at about 10 Hz.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from graph_probe import GraphProbe, node_processes

from ami_ros.graph import TRAINERS, default_params_file, describe
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters

MIN_ACTIONS_PER_S = 7  # "about 10 Hz": the world's rate less what a loaded 2-core machine costs
HEALTHY_TIMEOUT = 45.0
RESTART_TIMEOUT = 20.0  # the supervision's back-off is 1, 2, 4 s
READY = 'agent ready'  # what the agent logs once it has restored and can act


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class FaultGraph:
    """One `ami-ros launch world:=doom preset:=cpu` and an rclpy probe beside it (a context manager)."""

    def __init__(self, work: Path, log: Callable[[str], None] = print, preset: str = 'cpu') -> None:
        self.work, self.log, self.preset = work, log, preset
        self.checkpoint_dir = work / 'checkpoints'
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.tmpfs = os.geteuid() == 0 and subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=512m', 'tmpfs', str(self.checkpoint_dir)]).returncode == 0
        self.osc_port, self.http_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
        self.args = {'world': 'doom', 'preset': preset, 'vrchat_port': str(self.osc_port),
                     'web_api_port': str(self.http_port), 'checkpoint_dir': str(self.checkpoint_dir)}
        specs = describe(self.args)
        self.names = [s.name for s in specs]
        # Restarted by the launcher's supervision (where the graph says so): killed first.
        self.respawned = [s.name for s in specs if getattr(s, 'respawn', False)]
        self.checkpointed = [n for n in ('agent', *TRAINERS) if n in self.names]
        # The manager's default reserve (min_free_mb, 256 MiB) would refuse every save on a small
        # tmpfs before it starts; the full-disk attack wants saves that run into the full disk.
        params = yaml.safe_load(default_params_file().read_text())
        params.setdefault('/**/manager', {}).setdefault('ros__parameters', {})['min_free_mb'] = 0
        (work / 'params.yaml').write_text(yaml.safe_dump(params))
        self.log_path = work / 'launch.log'
        env = {**os.environ, 'MLFLOW_TRACKING_URI': os.environ.get(
            'MLFLOW_TRACKING_URI', f'sqlite:///{work}/mlflow.db')}
        with open(self.log_path, 'wb') as out:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'ami_ros.cli', 'launch', *(f'{k}:={v}' for k, v in self.args.items()),
                 f'params_file:={work / "params.yaml"}'], stdout=out, stderr=subprocess.STDOUT, cwd=work,
                env=env)
        self._start_probe()

    # -- the probe: an rclpy node of this process ----------------------------
    def _start_probe(self) -> None:
        from sensor_msgs.msg import Image, Joy
        from std_msgs.msg import UInt8MultiArray

        from ami_ros.ros.trainer_node import EXPERIENCE_QOS

        self.probe = GraphProbe('fault_probe')
        self.node = self.probe.node
        self.actions: deque[float] = deque(maxlen=100_000)  # receive times
        self.experience: bytes | None = None
        self.node.create_subscription(Joy, 'action', lambda m: self.actions.append(time.monotonic()), 50)
        self.node.create_subscription(UInt8MultiArray, 'experience',
                                      lambda m: setattr(self, 'experience', bytes(m.data)), EXPERIENCE_QOS)
        self.image_pub = self.node.create_publisher(Image, 'camera/image_raw', 10)
        self.experience_pub = self.node.create_publisher(UInt8MultiArray, 'experience', EXPERIENCE_QOS)
        self._clients: dict[tuple[type, str], Any] = {}

    @property
    def diagnostics(self) -> dict[str, tuple[float, dict[str, str]]]:
        """Node name -> (receive time, values) of its latest /diagnostics."""
        return self.probe.by_short_name()

    def call(self, srv_type: type, name: str, request: Any = None, timeout: float = 10.0) -> Any:
        """The service's answer, or None when there is none within `timeout` s."""
        key = (srv_type, name)
        if key not in self._clients:
            self._clients[key] = self.node.create_client(srv_type, name)
        client = self._clients[key]
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(request if request is not None else srv_type.Request())
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        return future.result() if future.done() else None

    # -- processes and health ------------------------------------------------
    def node_pids(self) -> dict[str, int]:
        """Node name -> pid of each live node process the launcher started."""
        return {name: proc.pid for name, proc in node_processes(self.proc.pid).items()}

    def problems(self) -> list[str]:
        """What is wrong with the graph now; [] when every node is up and the agent acts."""
        from std_srvs.srv import Trigger

        found = []
        if self.proc.poll() is not None:
            return [f'the launcher exited with {self.proc.returncode}']
        missing = set(self.names) - set(self.node_pids())
        if missing:
            found.append(f'not running: {", ".join(sorted(missing))}')
        answer = self.call(Trigger, 'ami/status', timeout=5.0)
        if answer is None:
            found.append('ami/status: no answer')
        elif not answer.success or not answer.message.startswith('running:') or re.search(
                r'=(?!active\b)\w+', answer.message):
            found.append(f'ami/status: {answer.message}')
        try:
            code, body = http_get(self.http_port, '/api/status')
            if code != 200 or body.get('status') != 1:
                found.append(f'web_api: {code} {body}')
        except OSError as exc:
            found.append(f'web_api: {exc}')
        now = time.monotonic()
        recent = sum(1 for t in list(self.actions)[-50:] if now - t <= 1.0)
        if recent < MIN_ACTIONS_PER_S:
            found.append(f'{recent} actions in the last second')
        return found

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT) -> tuple[float, list[str]]:
        """(seconds until healthy, []) or (the timeout, the last problems)."""
        started = time.monotonic()
        while True:
            found = self.problems()
            elapsed = time.monotonic() - started
            if not found or elapsed > timeout:
                return elapsed, found
            time.sleep(0.1)

    # -- entry points ----------------------------------------------------------
    def send_osc(self, datagrams: list[bytes]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for blob in datagrams:
                sock.sendto(blob, ('127.0.0.1', self.osc_port))
                time.sleep(0.002)

    def send_images(self, images: list[Any]) -> None:
        for msg in images:
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.image_pub.publish(msg)
            time.sleep(0.01)  # the agent keeps only the newest frame: most would never reach it

    def send_experience(self, blobs: list[bytes]) -> None:
        from std_msgs.msg import UInt8MultiArray

        for blob in blobs:
            self.experience_pub.publish(UInt8MultiArray(data=blob))
            time.sleep(0.01)

    def experience_sample(self, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while self.experience is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.experience is not None, 'no experience from the agent'
        return self.experience

    def send_parameters(self, service: str, requests: list[list[Any]], timeout: float = 30.0) -> int:
        """Each request to `service` (SetParameters), 8 in flight; how many were answered successful."""
        from rcl_interfaces.srv import SetParameters

        key = (SetParameters, service)
        if key not in self._clients:
            self._clients[key] = self.node.create_client(SetParameters, service)
        client = self._clients[key]
        if not client.wait_for_service(timeout_sec=timeout):
            return 0
        accepted, pending = 0, deque()
        deadline = time.monotonic() + timeout
        for parameters in requests:
            pending.append(client.call_async(SetParameters.Request(parameters=parameters)))
            while len(pending) >= 8 or (parameters is requests[-1] and pending):
                if pending[0].done() or time.monotonic() > deadline:
                    future = pending.popleft()
                    accepted += bool(future.done() and any(r.successful for r in future.result().results))
                else:
                    time.sleep(0.005)
        return accepted

    def send_http(self, requests: list[bytes]) -> dict[int, int]:
        """Each request on its own connection, 8 at a time; answers counted by status (0 = none)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(blob: bytes) -> int:
            try:
                with socket.create_connection(('127.0.0.1', self.http_port), timeout=0.5) as sock:
                    sock.sendall(blob)
                    answer = sock.recv(64)
                match = re.match(rb'HTTP/1\.[01] (\d{3})', answer)
                return int(match.group(1)) if match else 0
            except OSError:
                return 0

        counts: dict[int, int] = {}
        with ThreadPoolExecutor(8) as pool:
            for code in pool.map(one, requests):
                counts[code] = counts.get(code, 0) + 1
        return counts

    # -- checkpoints and loss ------------------------------------------------------
    def save(self) -> Path:
        from std_srvs.srv import Trigger

        answer = self.call(Trigger, 'ami/save_checkpoint', timeout=120)
        assert answer is not None and answer.success, f'save failed: {answer}'
        return Path(answer.message)

    def counters(self, after: float, nodes: list[str], key: str) -> dict[str, int]:
        """`key` of each node's first /diagnostics sent after monotonic time `after`."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fresh = {n: self.diagnostics.get(n, (0.0, {})) for n in nodes}
            if all(t > after and key in v for t, v in fresh.values()):
                return {n: int(v[key]) for n, (_, v) in fresh.items()}
            time.sleep(0.1)
        raise AssertionError(f'no fresh {key} from {nodes}')

    def experience_loss(self, seconds: float) -> dict[str, int]:
        """Steps the agent acted in `seconds` of running, and how many each trainer lost of them.

        Counted between two pauses, so no message is in flight when a counter is read."""
        from std_srvs.srv import Trigger

        trainers = [n for n in ('dynamics_trainer', 'policy_trainer') if n in self.names]
        readings = []
        for stage in ('first', 'second'):
            if stage == 'second':
                self.call(Trigger, 'ami/resume', timeout=30)
                time.sleep(seconds)
            self.call(Trigger, 'ami/pause', timeout=30)
            paused = time.monotonic()
            readings.append((self.counters(paused, ['agent'], 'steps')['agent'],
                             self.counters(paused, trainers, 'received')))
        self.call(Trigger, 'ami/resume', timeout=30)
        (a0, r0), (a1, r1) = readings
        return {'steps': a1 - a0, **{n: (a1 - a0) - (r1[n] - r0[n]) for n in trainers}}

    def kill_order(self) -> list[str]:
        """The nodes the launcher restarts first, then the others (the graph is not whole after them)."""
        return self.respawned + [n for n in self.names if n not in self.respawned]

    def __enter__(self) -> FaultGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.probe.close()
        if self.tmpfs:
            subprocess.run(['umount', '-l', str(self.checkpoint_dir)])


def http_get(port: int, path: str) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
    try:
        conn.request('GET', path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b'null')
    finally:
        conn.close()


# -- damaged checkpoints -------------------------------------------------------------
def damaged_start(path: Path, how: str, preset: str, work: Path) -> tuple[str, str]:
    """Start `ami-ros launch` (how='launch') or a lone agent ('agent') on checkpoint `path`:
    ('refused' | 'accepted' | 'crashed', what it said). Refused = one line naming the damage, exit 2
    (launch, nothing started) or 1 (agent). Another DDS domain: a start that is not refused must
    not join the graph under attack."""
    env = {**os.environ, 'ROS_DOMAIN_ID': str((int(os.environ.get('ROS_DOMAIN_ID', '0')) + 50) % 100 + 1)}
    if how == 'launch':
        out = subprocess.run([sys.executable, '-m', 'ami_ros.cli', 'launch', 'world:=doom',
                              f'preset:={preset}', 'train:=false', 'record:=false', 'web_api_port:=0',
                              f'checkpoint:={path}', f'vrchat_port:={_free_port(socket.SOCK_DGRAM)}',
                              'duration:=5'],
                             capture_output=True, text=True, timeout=120, cwd=work, env=env)
        lines = out.stderr.strip().splitlines()
        said = f'exit {out.returncode}: {(lines or [""])[-1][:160]}'
        if '[launch] started' in out.stdout:
            return 'accepted', said
        return ('refused' if out.returncode == 2 and len(lines) == 1 else 'crashed'), said
    params = write_parameters(work / 'lone_agent.yaml', 'agent', {'preset': preset, 'checkpoint': str(path)})
    proc = NodeProcess('agent', node_command('agent', 'agent', [params]), log_path=work / 'lone_agent.log',
                       env=env)
    deadline = time.monotonic() + 60
    while proc.alive() and READY not in proc.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    code, output = proc.stop(), proc.output()
    if READY in output:
        return 'accepted', 'started and acted on it (a node checks sizes; the launchers check hashes)'
    lines = [line for line in output.splitlines() if 'cannot start' in line]
    said = f'exit {code}: {(lines or output.splitlines() or [""])[-1][:160]}'
    refused = code == 1 and len(lines) == 1 and 'Traceback' not in output and 'terminate called' not in output
    return ('refused' if refused else 'crashed'), said
