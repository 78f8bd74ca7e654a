"""The AMI control API over HTTP, as pamiq-core 0.6's web API speaks it (no ROS here).

    GET  /api/status         200 {"status": <pamiq SystemStatus int>}
    POST /api/pause          \\
    POST /api/resume          |  200 {"result": "ok"}, 500 {"error": "Internal server error"}
    POST /api/shutdown        |  when the command failed, 503 {"error": "Command queue is full,
    POST /api/save-state      |  try again later"} when one runs and another waits already
    POST /api/save-checkpoint /  (ami's name for save-state)
    other paths              404 {"error": "Invalid API endpoint"}
    other methods            405 {"error": "Invalid API method"}
    a request body           400 {"error": "Request body not accepted"}: no endpoint takes one

pamiq-core answers a command as soon as it is queued. Here the answer waits
for the command's outcome up to `answer_timeout` seconds (less than the 5 s
pamiq-console's HTTP client waits), so a failure is a 500 rather than a silent
200; a command still running then (a save, a shutdown with its final
checkpoint) is answered 200 as pamiq-core would, and its outcome is logged.
Commands run one at a time, in arrival order, on one worker thread.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 8391  # pamiq-core's and ami's


class SystemStatus(IntEnum):
    """pamiq-core's SystemStatus values, which its client reads back with SystemStatus(int)."""

    ACTIVE = 1
    PAUSING = 2
    PAUSED = 3
    RESUMING = 4
    SHUTTING_DOWN = 5
    OFFLINE = 6


STATUS_PATH = '/api/status'
# Path -> the manager's command (its ami/<command> service).
COMMAND_PATHS = {
    '/api/pause': 'pause',
    '/api/resume': 'resume',
    '/api/shutdown': 'shutdown',
    '/api/save-state': 'save_checkpoint',
    '/api/save-checkpoint': 'save_checkpoint',  # MLShukai/ami's name
}
RESULT_OK = {'result': 'ok'}
ERROR_QUEUE_FULL = {'error': 'Command queue is full, try again later'}
ERROR_INVALID_ENDPOINT = {'error': 'Invalid API endpoint'}
ERROR_INVALID_METHOD = {'error': 'Invalid API method'}
ERROR_INTERNAL_SERVER = {'error': 'Internal server error'}
ERROR_BODY = {'error': 'Request body not accepted'}


def system_status(manager_state: str | None, pending: str | None) -> SystemStatus:
    """The pamiq status of the graph: the manager's ami/state (None: no manager is
    there) and the command running or waiting here, if any."""
    if manager_state is None:
        return SystemStatus.OFFLINE
    if manager_state == 'shutting_down' or pending == 'shutdown':
        return SystemStatus.SHUTTING_DOWN
    if manager_state == 'paused':
        return SystemStatus.RESUMING if pending == 'resume' else SystemStatus.PAUSED
    return SystemStatus.PAUSING if pending == 'pause' else SystemStatus.ACTIVE


class Ticket:
    """One queued command; `wait` gives its outcome (ok, the manager's message)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._done = threading.Event()
        self.outcome: tuple[bool, str] | None = None

    def finish(self, ok: bool, message: str) -> None:
        self.outcome = (ok, message)
        self._done.set()

    def wait(self, timeout: float) -> tuple[bool, str] | None:
        """The outcome, or None while the command still waits or runs after `timeout` s."""
        self._done.wait(timeout)
        return self.outcome


class CommandQueue:
    """Runs commands one at a time in arrival order; at most `max_waiting` wait behind
    the running one (pamiq-core's queue holds one), the rest are refused."""

    def __init__(self, execute: Callable[[str], tuple[bool, str]],
                 on_outcome: Callable[[Ticket], None], max_waiting: int = 1) -> None:
        self._execute = execute
        self._on_outcome = on_outcome
        self._max_waiting = max_waiting
        self._waiting: deque[Ticket] = deque()
        self._running: Ticket | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._work, name='control-commands', daemon=True)
        self._thread.start()

    def submit(self, command: str) -> Ticket | None:
        """The command's ticket, or None when the queue is full or closed."""
        with self._wake:
            if self._closed or len(self._waiting) >= self._max_waiting:
                return None
            ticket = Ticket(command)
            self._waiting.append(ticket)
            self._wake.notify()
            return ticket

    def pending(self) -> str | None:
        """The command running, else the first waiting one; None when idle."""
        with self._wake:
            ticket = self._running or (self._waiting[0] if self._waiting else None)
            return ticket.command if ticket else None

    def close(self, timeout: float = 1.0) -> None:
        """Refuse new commands, fail the waiting ones; a running one is left to finish."""
        with self._wake:
            self._closed = True
            while self._waiting:
                self._waiting.popleft().finish(False, 'the control API is closing')
            self._wake.notify()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                self._running = self._waiting.popleft()
            ticket = self._running
            try:
                ok, message = self._execute(ticket.command)
            except Exception as exc:  # a broken call must not stop the queue
                ok, message = False, f'{type(exc).__name__}: {exc}'
            with self._wake:
                self._running = None
            ticket.finish(ok, message)
            self._on_outcome(ticket)


class ControlApiServer:
    """The HTTP server: answers from `status()` and the command queue."""

    def __init__(self, host: str, port: int, status: Callable[[], SystemStatus],
                 commands: CommandQueue, answer_timeout: float,
                 log: Callable[[str], None]) -> None:
        server_class = _IPv6Server if ':' in host else _Server
        # Binds now: a busy port raises OSError here, before anything serves.
        self.httpd = server_class((host, port), _handler_class(status, commands, answer_timeout, log))
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name='control-http',
                                        kwargs={'poll_interval': 0.2}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving; answers being written are let finish (bounded by the socket timeout)."""
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    # Joined at server_close, so an answer under way is sent before the process ends.
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # a burst of console clients is accepted, not left to SYN retries

    def handle_error(self, request: object, client_address: object) -> None:
        # A client gone before its answer was written (reset, closed) is no fault of the server:
        # socketserver would print a traceback for each, and any local client could flood the log.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _handler_class(status: Callable[[], SystemStatus], commands: CommandQueue,
                   answer_timeout: float, log: Callable[[str], None]) -> type[BaseHTTPRequestHandler]:
    class ControlApiHandler(BaseHTTPRequestHandler):
        timeout = 10.0  # a client that sends nothing does not hold its thread for long
        server_version = 'ami_ros'
        sys_version = ''

        def __getattr__(self, name: str):
            # http.server looks for do_<METHOD>: every method, known or not, reaches the table,
            # so an unknown one is a JSON 405 (or 404), never http.server's HTML 501.
            if name.startswith('do_'):
                return self._dispatch
            raise AttributeError(name)

        def _dispatch(self) -> None:
            path = urlsplit(self.path).path
            if path != STATUS_PATH and path not in COMMAND_PATHS:
                return self._answer(404, ERROR_INVALID_ENDPOINT)
            # HEAD with GET, as starlette (pamiq-core's server) allows it.
            if self.command not in (('GET', 'HEAD') if path == STATUS_PATH else ('POST',)):
                return self._answer(405, ERROR_INVALID_METHOD)
            if self.headers.get('Transfer-Encoding') or _content_length(self.headers) != 0:
                # Not read: the connection closes after the answer, nothing was acted on.
                self.close_connection = True
                return self._answer(400, ERROR_BODY)
            if path == STATUS_PATH:
                try:
                    return self._answer(200, {'status': int(status())})
                except Exception as exc:
                    log(f'status failed: {exc}')
                    return self._answer(500, ERROR_INTERNAL_SERVER)
            command = COMMAND_PATHS[path]
            ticket = commands.submit(command)
            if ticket is None:
                return self._answer(503, ERROR_QUEUE_FULL)
            outcome = ticket.wait(answer_timeout)
            if outcome is None or outcome[0]:
                return self._answer(200, RESULT_OK)
            return self._answer(500, ERROR_INTERNAL_SERVER)

        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
            pass  # commands and their outcomes are logged by the node; requests are not

    return ControlApiHandler


def _content_length(headers) -> int:
    """The declared body length; -1 when it is not a number (refused as a body)."""
    try:
        return int(headers.get('Content-Length', '0'))
    except ValueError:
        return -1
