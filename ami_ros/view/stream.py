"""The Rerun recording the viewer node logs to, and the local web viewer that shows it.

The web viewer and the gRPC server that buffers the stream for late browsers
run in rerun-sdk's own `rerun --serve-web` process, bound to `host` only
(rerun-sdk's in-process web viewer binds every interface). This process logs
into it over gRPC and, with `save`, into an .rrd file too. A browser that
closes its tab only leaves that server; nothing here notices.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import numpy as np
import rerun as rr

from ami_ros.view.layout import STEP_TIMELINE, WALL_TIMELINE, blueprint
from ami_ros.view.scene import AgentEntities

APPLICATION_ID = 'ami_ros'
PR_SET_PDEATHSIG = 1  # linux/prctl.h
SERVER_START_TIMEOUT = 20.0  # s for the server process to listen on both ports


class ViewError(RuntimeError):
    """The view cannot be served (a busy port, a server that does not start): one line why."""


def port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on now (in use, no such address), or None."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return f'{host}:{port}: {exc.strerror or exc}'
    return None


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the server's child: SIGTERM when the node's process ends, even killed (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the node's on_exit stops it
        pass


def _rerun_executable() -> str:
    spec = importlib.util.find_spec('rerun_cli')
    if spec is None or not spec.submodule_search_locations:
        raise ViewError('rerun-sdk\'s rerun_cli is missing: reinstall with pip install \'ami_ros[view]\'')
    return str(Path(next(iter(spec.submodule_search_locations))) / 'rerun')


class WebViewerServer:
    """`rerun --serve-web` on host:web_port (HTTP) and host:grpc_port (the stream), as a child process."""

    def __init__(self, host: str, web_port: int, grpc_port: int = 0, memory_limit: str = '512MB',
                 log_path: Path | None = None) -> None:
        self.host = host
        self.web_port = web_port
        self.grpc_port = grpc_port or free_port(host)
        for port in (web_port, self.grpc_port):
            if problem := port_problem(host, port):
                raise ViewError(f'cannot serve the live view on {problem}')
        cmd = [_rerun_executable(), '--serve-web', '--bind', host, '--web-viewer-port', str(web_port),
               '--port', str(self.grpc_port), '--server-memory-limit', memory_limit]
        self._log = open(log_path, 'wb') if log_path else subprocess.DEVNULL
        # Its own session: a Ctrl-C reaches the node, which stops it.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent,
                                     env={**os.environ, 'RUST_LOG': os.environ.get('RUST_LOG', 'warn')})
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        host = self._connect_host
        while not (_listening(host, web_port) and _listening(host, self.grpc_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ViewError(f'the Rerun web viewer did not start on {host}:{web_port} '
                                f'(gRPC {self.grpc_port}); see {log_path or "its output"}')
            time.sleep(0.1)

    @property
    def _connect_host(self) -> str:
        return {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(self.host, self.host)

    @property
    def grpc_url(self) -> str:
        host = f'[{self._connect_host}]' if ':' in self._connect_host else self._connect_host
        return f'rerun+http://{host}:{self.grpc_port}/proxy'

    @property
    def url(self) -> str:
        """The page to open: the web viewer, connected to the stream."""
        host = f'[{self._connect_host}]' if ':' in self._connect_host else self._connect_host
        return f'http://{host}:{self.web_port}/?url={urllib.parse.quote(self.grpc_url, safe="")}'

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self._log, 'close'):
            self._log.close()


class ViewStream:
    """One Rerun recording of the graph: gRPC to the web viewer's server and/or an .rrd file.

    Every log call takes the agent step (None before the agent is heard) and
    the wall time (Unix seconds) it belongs to.
    """

    def __init__(self, agents: list[AgentEntities], grpc_url: str | None, save: Path | None) -> None:
        self.recording = rr.RecordingStream(APPLICATION_ID)
        sinks = []
        if grpc_url:
            sinks.append(rr.GrpcSink(grpc_url))
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            sinks.append(rr.FileSink(str(save)))
        self.recording.set_sinks(*sinks, default_blueprint=blueprint(agents))
        # Blueprints travel only with their own sink set: send it for the server's late browsers too.
        self.recording.send_blueprint(blueprint(agents))
        self.logged = 0

    def _at(self, step: int | None, wall: float) -> None:
        if step is None:
            self.recording.disable_timeline(STEP_TIMELINE)
        else:
            self.recording.set_time(STEP_TIMELINE, sequence=step)
        self.recording.set_time(WALL_TIMELINE, timestamp=wall)

    def image(self, path: str, rgb: np.ndarray, step: int | None, wall: float) -> None:
        self._at(step, wall)
        self.recording.log(path, rr.Image(rgb))
        self.logged += 1

    def scalar(self, path: str, value: float, step: int | None, wall: float) -> None:
        self._at(step, wall)
        self.recording.log(path, rr.Scalars(value))
        self.logged += 1

    def text(self, path: str, line: str, step: int | None, wall: float) -> None:
        self._at(step, wall)
        self.recording.log(path, rr.TextLog(line, level=rr.TextLogLevel.INFO))
        self.logged += 1

    def map_picture(self, path: str, rgb: np.ndarray) -> None:
        """The level's map, under the trail and pose; static: it comes (latched) before the
        agent's first step and holds at every step until the next level replaces it."""
        self.recording.log(path, rr.Image(rgb, draw_order=-10.0), static=True)
        self.logged += 1

    def trail(self, path: str, pixels: np.ndarray, step: int | None, wall: float) -> None:
        self._at(step, wall)
        self.recording.log(path, rr.LineStrips2D([pixels], colors=[(230, 80, 40)], radii=0.4))
        self.logged += 1

    def pose(self, path: str, pixel: tuple[float, float], heading: tuple[float, float],
             step: int | None, wall: float) -> None:
        """The player on the map: an arrow from its position, in map pixels."""
        self._at(step, wall)
        self.recording.log(path, rr.Arrows2D(origins=[pixel], vectors=[heading], colors=[(30, 120, 255)],
                                             radii=0.8))
        self.logged += 1

    def position(self, path: str, x: float, y: float, step: int | None, wall: float) -> None:
        """The player's position in map units (world/pose's own numbers), plotted as x and y."""
        self._at(step, wall)
        self.recording.log(path, rr.Scalars([x, y]))
        self.logged += 1

    def close(self, timeout: float = 5.0) -> None:
        self.recording.flush(timeout_sec=timeout)
        self.recording.disconnect()
