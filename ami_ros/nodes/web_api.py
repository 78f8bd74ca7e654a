"""web_api: the AMI control API (pamiq-core 0.6's web API) over HTTP for the whole graph.

`pamiq-console --port 8391` (or curl) pauses, resumes, saves and shuts the
graph down: each command calls the manager's ami/pause, ami/resume,
ami/save_checkpoint or ami/shutdown (std_srvs/Trigger), as `ami-ros
pause|resume|save|shutdown` do, one at a time in arrival order
(ami_ros.control.web_api has the protocol). The status comes from the
manager's latched ami/state.

It binds `web_api_host:web_api_port` (loopback by default: anyone who reaches
the port can shut the agent down). A busy port is one error line, and the node
exits with 0: the graph runs on without the API and the launch does not count
it as a failure. It is not among the manager's nodes (a paused graph still
answers) and exits by itself once the manager has shut down, whoever asked it to.

Parameters: declared below, and in docs/parameters.md.
"""

from __future__ import annotations

import sys
import threading

from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ami_ros.control.web_api import (
    COMMAND_PATHS,
    DEFAULT_HOST,
    DEFAULT_PORT,
    CommandQueue,
    ControlApiServer,
    Ticket,
    system_status,
)
from ami_ros.ros.managed_node import ManagedNode, run


class WebApiNode(ManagedNode):
    """Serves the control API while active; calls the manager's services."""

    def __init__(self) -> None:
        super().__init__('web_api')
        self.host = str(self.declare(
            'web_api_host', DEFAULT_HOST,
            'Address the control API listens on; 127.0.0.1 = this machine only. Anyone who '
            'reaches it can pause or shut the graph down: widen it only on a trusted network.'))
        self.port = int(self.declare(
            'web_api_port', DEFAULT_PORT, 'TCP port of the control API (pamiq-console '
            '--port); 0 = no control API.', low=0, high=65535))
        self.answer_timeout = float(self.declare(
            'answer_timeout', 4.0, 'Seconds an HTTP command waits for the outcome before it is '
            "answered 200 anyway (pamiq-console's client gives up after 5 s).", low=0.1, high=60.0))
        self.command_timeout = float(self.declare(
            'command_timeout', 600.0, "Seconds to wait for the manager's answer to one command "
            '(a save or a shutdown writes a checkpoint first).', low=1.0, high=7200.0))
        self.manager_state: str | None = None  # its latest ami/state; None until one arrives
        self._manager_seen = False  # its ami/state publisher was in the graph once
        self.manager_gone = False  # ... and is not now
        self._seen_shutting_down = False
        self._command_clients = {command: self.create_client(Trigger, f'ami/{command}')
                         for command in sorted(set(COMMAND_PATHS.values()))}
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(String, 'ami/state', self._on_state, latched)
        self.create_timer(0.2, self._watch_manager)
        self.commands: CommandQueue | None = None
        self.server: ControlApiServer | None = None

    # -- lifecycle --------------------------------------------------------
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.port == 0:
            self.get_logger().info('web_api_port is 0: no control API')
            self.finished = True
            return super().on_activate(state)
        self.commands = CommandQueue(self._execute, self._log_outcome)
        try:
            self.server = ControlApiServer(self.host, self.port, self._status, self.commands,
                                           self.answer_timeout, self.get_logger().error)
        except OSError as exc:
            # One line, then exit 0: the rest of the graph runs on without the API.
            self.get_logger().error(
                f'cannot serve the control API on {self.host}:{self.port} ({exc.strerror or exc}); '
                'the graph runs without it: stop what uses the port, or choose another with '
                'web_api_port:=N (0 = off)')
            self.commands.close()
            self.commands = None
            self.finished = True
            return super().on_activate(state)
        self.server.start()
        self.get_logger().info(f'control API on http://{self.host}:{self.server.port}/api/status')
        return super().on_activate(state)

    def on_exit(self) -> None:
        if self.commands is not None:
            self.commands.close()
        if self.server is not None:
            self.server.close()

    # -- the graph ----------------------------------------------------------
    def _on_state(self, msg: String) -> None:
        self.manager_state = msg.data
        self._seen_shutting_down |= msg.data == 'shutting_down'

    def _watch_manager(self) -> None:
        # The graph cache can learn of a publisher after its first message has arrived: gone
        # means seen in the graph before and not now. A manager that has gone is OFFLINE;
        # after a shutdown, whoever asked for it, this node ends too, so the launch ends.
        present = self.count_publishers('ami/state') > 0
        self._manager_seen |= present
        self.manager_gone = self._manager_seen and not present
        if self.manager_gone and self._seen_shutting_down and not self.finished:
            self.get_logger().info('the manager has shut the graph down; closing the control API')
            self.finished = True

    def _status(self) -> int:
        state = None if self.manager_gone else self.manager_state
        return system_status(state, self.commands.pending() if self.commands else None)

    def _execute(self, command: str) -> tuple[bool, str]:
        """Call ami/<command> and wait for the manager's answer (on the queue's thread)."""
        client = self._command_clients[command]
        if not client.wait_for_service(timeout_sec=min(5.0, self.command_timeout)):
            return False, f'no manager answers on {client.srv_name}'
        done = threading.Event()
        future = client.call_async(Trigger.Request())
        future.add_done_callback(lambda _: done.set())
        if not done.wait(self.command_timeout):
            future.cancel()
            return False, f'the manager did not answer {command} within {self.command_timeout:g} s'
        result = future.result()
        return bool(result.success), str(result.message)

    def _log_outcome(self, ticket: Ticket) -> None:
        ok, message = ticket.outcome or (False, '')
        if ok:
            self.get_logger().info(f'{ticket.command}: {message}')
        else:
            self.get_logger().error(f'{ticket.command} failed: {message}')


def main(args: list[str] | None = None) -> int:
    return run(WebApiNode, args)


if __name__ == '__main__':
    sys.exit(main())
