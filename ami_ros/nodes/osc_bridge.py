"""osc_bridge: turns `action` (sensor_msgs/Joy) into VRChat OSC input messages.

Subscribes:
  action   sensor_msgs/Joy, axes = [Vertical, Horizontal, LookHorizontal] in
           [-1, 1], buttons = [Jump, Run] each 0 or 1 (from the agent, or a
           person's gamepad through joy_node)

Sends (UDP, OSC, to host:port):
  /input/Vertical, /input/Horizontal, /input/LookHorizontal
           floats, clamp(axis * velocity[i], -1, 1)
  /input/Jump, /input/Run
           ints 0/1 (never bools: python-osc would send True as an OSC bool,
           which VRChat does not take as a button press)

Only values that changed since the last send go out. Every input is released
(all axes 0.0, both buttons 0, sent whether or not they changed) on activate,
when no action arrived for `release_after` seconds, on deactivate (pause), on
lifecycle shutdown and at process exit (SIGINT/SIGTERM), so the avatar never
keeps walking on its own. While inactive, incoming actions are ignored.

Publishes /diagnostics (1 Hz): the target, actions per second, actions
taken and ignored, OSC messages sent, send errors and releases; a warning
while sends fail.

Parameters:
  host           address VRChat listens on (default 127.0.0.1)
  port           UDP port VRChat listens on, 1..65535 (default 9000)
  velocity       3 non-negative factors for the axes (default [1.0, 1.0, 1.0])
  release_after  seconds without an action before every input is released,
                 0.05..10 (default 0.5)
  autostart      configure and activate without the manager (default true)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import rclpy.logging
from pythonosc.udp_client import SimpleUDPClient
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import Joy

from ami_ros.core.action import OSC_AXES, OSC_BUTTONS, RELEASED_INPUTS
from ami_ros.core.timing import RateMeter
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.managed_node import ManagedNode, run

AXES, BUTTONS, RELEASED = OSC_AXES, OSC_BUTTONS, RELEASED_INPUTS


def joy_problem(msg: Joy) -> tuple[str, str] | None:
    """(kind, reason) when a Joy message is not a valid action, None when it is.

    kind is 'shape', 'axis' or 'button', so each kind of fault gets its own
    throttled warning.
    """
    if len(msg.axes) != len(AXES) or len(msg.buttons) != len(BUTTONS):
        return 'shape', (f'expected {len(AXES)} axes [Vertical, Horizontal, LookHorizontal] and '
                f'{len(BUTTONS)} buttons [Jump, Run], got {len(msg.axes)} axes and '
                f'{len(msg.buttons)} buttons')
    for name, value in zip(AXES, msg.axes, strict=True):
        if not math.isfinite(value) or abs(value) > 1.0:
            return 'axis', f'axis {name.rsplit("/", 1)[1]} = {value} is not a number in [-1, 1]'
    for name, value in zip(BUTTONS, msg.buttons, strict=True):
        if value not in (0, 1):
            return 'button', f'button {name.rsplit("/", 1)[1]} = {value} is not 0 or 1'
    return None


def action_to_osc(msg: Joy, velocity: Sequence[float]) -> dict[str, float | int]:
    """The OSC address -> value map of a valid action (see joy_problem)."""
    values: dict[str, float | int] = {}
    for name, axis, speed in zip(AXES, msg.axes, velocity, strict=True):
        values[name] = float(min(1.0, max(-1.0, float(axis) * float(speed))))
    for name, button in zip(BUTTONS, msg.buttons, strict=True):
        values[name] = int(button)
    return values


class OscBridge(ManagedNode):
    """Forwards actions to VRChat over OSC and releases every input when idle."""

    def __init__(self) -> None:
        super().__init__('osc_bridge')
        self.host: str = self.declare('host', '127.0.0.1', 'Address VRChat listens on for OSC input.')
        self.port: int = self.declare('port', 9000, 'UDP port VRChat listens on for OSC input.',
                                      low=1, high=65535)
        velocity = list(self.declare(
            'velocity', [1.0, 1.0, 1.0],
            'Factors for [Vertical, Horizontal, LookHorizontal]: the value sent is '
            'clamp(axis * factor, -1, 1).'))
        if len(velocity) != len(AXES) or not all(math.isfinite(v) and v >= 0 for v in velocity):
            raise ValueError(f'parameter velocity={velocity} must hold 3 non-negative numbers, '
                             'one per axis [Vertical, Horizontal, LookHorizontal], e.g. [1.0, 1.0, 1.0]')
        self.velocity: list[float] = [float(v) for v in velocity]
        self.release_after: float = self.declare(
            'release_after', 0.5, 'Seconds without an action before every input is released.',
            low=0.05, high=10.0)
        self.client: SimpleUDPClient | None = None
        # What VRChat was last told, per address: sends go out only on change.
        self.sent: dict[str, float | int] = {}
        self.last_action: float | None = None  # monotonic time; None = released, nothing pending
        self._subscription = None
        self._timer = None
        self._shutdown_released = False
        self.rate = RateMeter()
        self.actions = 0  # taken (valid, while active)
        self.ignored = 0  # invalid ones
        self.messages_sent = 0
        self.send_errors = 0
        self.releases = 0
        self.send_error: tuple[float, str] | None = None  # (when, what) of the newest failure
        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)
        self.diagnostics.set(target=f'{self.host}:{self.port}')

    # -- lifecycle --------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.client = SimpleUDPClient(self.host, self.port)
        except OSError as exc:  # an unresolvable host name
            self.get_logger().error(
                f'cannot use OSC host {self.host!r}:{self.port} ({exc}); set host:=<address of the '
                'machine running VRChat> (127.0.0.1 when it runs here)')
            return TransitionCallbackReturn.FAILURE
        self._subscription = self.create_subscription(Joy, 'action', self._on_action, 10)
        # Check staleness a few times per release_after, so the release comes
        # at most a quarter late (and never slower than 4 Hz).
        self._timer = self.create_timer(min(0.25, self.release_after / 4), self._check_stale)
        self.get_logger().info(f'sending VRChat OSC input to {self.host}:{self.port}')
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release('activated')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_deactivate(state)
        self.release('paused')
        return result

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_shutdown(state)
        if self.client is not None:
            self.release('shutting down')
            self._shutdown_released = True
        return result

    def on_exit(self) -> None:
        # SIGINT/SIGTERM end the spin without a lifecycle transition: this is
        # the last chance to stop the avatar. ROS may be down; UDP still works.
        if self.client is not None and not self._shutdown_released:
            # The node's own logger would also try /rosout through the dead
            # context and print an error line about that: use a plain logger.
            self.release('exiting', rclpy.logging.get_logger(f'{self.get_name()}.exit'))
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self._timer is not None:
                self.destroy_timer(self._timer)
            if self._subscription is not None:
                self.destroy_subscription(self._subscription)
        except Exception:  # the context is already gone at exit
            pass
        self._timer = self._subscription = None
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- sending ----------------------------------------------------------
    def release(self, why: str, logger: Any = None) -> None:
        """Send every input released, whatever was sent before."""
        self.last_action = None
        self.releases += 1
        self._send(RELEASED, only_changed=False, logger=logger)
        (logger or self.get_logger()).info(f'released every input ({why})')

    def _send(self, values: dict[str, float | int], only_changed: bool, logger: Any = None) -> None:
        if self.client is None:
            return
        for address, value in values.items():
            if only_changed and self.sent.get(address) == value:
                continue
            try:
                self.client.send_message(address, value)
            except OSError as exc:  # e.g. no route to host: keep going, the next send retries
                self.send_errors += 1
                self.send_error = (time.monotonic(), str(exc))
                (logger or self.get_logger()).error(
                    f'cannot send OSC to {self.host}:{self.port}: {exc}; check host and port',
                    throttle_duration_sec=5.0)
                self.sent.pop(address, None)  # unknown on the other side: resend next time
                continue
            self.sent[address] = value
            self.messages_sent += 1

    def _on_action(self, msg: Joy) -> None:
        if not self.is_active:
            return
        problem = joy_problem(msg)
        if problem is not None:
            self.ignored += 1
            kind, reason = problem
            # Throttled per kind of fault: a flood of bad actions gives one
            # line every 2 s, and a second kind of fault is not hidden.
            self.warn_throttled(
                f'action-{kind}',
                f'ignored action: {reason}; send sensor_msgs/Joy with axes [Vertical, Horizontal, '
                'LookHorizontal] in [-1, 1] and buttons [Jump, Run] in {0, 1}', period=2.0)
            return
        self.last_action = time.monotonic()
        self.actions += 1
        self.rate.tick(self.last_action)
        self._send(action_to_osc(msg, self.velocity), only_changed=True)

    def _update_diagnostics(self) -> None:
        self.diagnostics.set(action_rate_hz=self.rate.rate(), actions=self.actions,
                             ignored_actions=self.ignored, osc_messages=self.messages_sent,
                             send_errors=self.send_errors, releases=self.releases,
                             active=self.is_active)
        if self.send_error is not None and time.monotonic() - self.send_error[0] < 5.0:
            self.diagnostics.warn(f'cannot send OSC to {self.host}:{self.port}: {self.send_error[1]}')
        else:
            self.diagnostics.ok()

    def _check_stale(self) -> None:
        if (self.is_active and self.last_action is not None
                and time.monotonic() - self.last_action >= self.release_after):
            self.release(f'no action for {self.release_after:g} s')


def main(args: Sequence[str] | None = None) -> int:
    return run(OscBridge, args)


if __name__ == '__main__':
    sys.exit(main())
