"""One ami_ros node as a child process: for the launcher, tests and benches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml


def write_parameters(path: Path, node_name: str, parameters: dict[str, Any]) -> Path:
    """A ROS 2 parameters file holding `parameters` for `node_name` in any namespace."""
    path.write_text(yaml.safe_dump({f'/**/{node_name}': {'ros__parameters': parameters}}))
    return path


def node_command(executable: str, name: str, params_files: Sequence[Path] = (),
                 namespace: str = '', remaps: dict[str, str] | None = None,
                 extra_ros_args: Sequence[str] = ()) -> list[str]:
    """The command line that runs node `executable` as `name` (ami-ros run ...)."""
    cmd = [sys.executable, '-u', '-m', 'ami_ros.cli', 'run', executable, '--ros-args',
           '-r', f'__node:={name}']
    if namespace:
        cmd += ['-r', f'__ns:=/{namespace.lstrip("/")}']  # rcl takes only absolute ones
    for path in params_files:
        cmd += ['--params-file', str(path)]
    for src, dst in (remaps or {}).items():
        cmd += ['-r', f'{src}:={dst}']
    return cmd + list(extra_ros_args)


class NodeProcess:
    """A node process in its own session, its output to a file or a line callback.

    Its own session: a Ctrl-C on the terminal reaches only the parent, which
    stops the nodes in the order it chooses.
    """

    def __init__(self, name: str, cmd: list[str], log_path: Path | None = None,
                 on_line: Callable[[str], None] | None = None,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, 'wb') if log_path else None
        stdout = self._log if self._log else subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})},
                                     cwd=cwd)
        self._reader = None
        if self._log is None:
            self._reader = threading.Thread(target=self._forward, args=(on_line or print,),
                                            daemon=True)
            self._reader.start()

    def _forward(self, on_line: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            on_line(raw.decode(errors='replace').rstrip())

    def output(self) -> str:
        """What the process printed so far (file-logged processes only)."""
        if self._log is None or self.log_path is None:
            return ''
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def send(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code; SIGKILL after `timeout` s (then the code is -9)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        self.send(sig)
        try:
            return self.wait(timeout)
        finally:
            if self._log is not None:
                self._log.close()
            if self._reader is not None:
                self._reader.join(timeout=2)
