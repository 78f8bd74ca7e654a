"""The lifecycle base every ami_ros node builds on, and the `main()` runner.

Every node is a ROS 2 lifecycle node so the manager can pause (deactivate),
resume (activate) and stop (shutdown) the whole graph through the standard
`<node>/change_state` services. With `autostart` (default true) a node
configures and activates itself, so `ros2 run ami_ros <node>` works alone.
SIGINT/SIGTERM end it at once, except a Ctrl-C to a whole ros2 launch: then
a node the manager manages serves the final checkpoint first (graceful_stop.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from ami_ros.core.private_files import use_private_umask
from ami_ros.ros.graceful_stop import SHUTDOWN_GRACE, NodeStop, StopSignals

N = TypeVar('N', bound='ManagedNode')


def declare(node: Node, name: str, default: Any, description: str, *,
            low: float | None = None, high: float | None = None, step: float = 0,
            read_only: bool = False, choices: Sequence[str] | None = None) -> Any:
    """Declare `node`'s parameter with a description and range; return its value.

    Integer and float ranges are enforced by ROS (rqt_reconfigure shows them as
    sliders); `choices` is documented and checked here. An empty list is a
    string array declared without a value until one is given (rclpy cannot
    type an empty list); while it has none, rclpy's get_parameters answers
    nothing for the whole node (`ros2 param dump`), so use [''] where other
    nodes read the parameters. The default is kept in `node.declared_defaults` for
    docs/parameters.md. For every node, managed (ManagedNode.declare) or not.
    """
    desc = ParameterDescriptor(description=description, read_only=read_only)
    if choices:
        desc.additional_constraints = 'one of: ' + ', '.join(choices)
    if low is not None and high is not None:
        if isinstance(default, bool):
            pass
        elif isinstance(default, int):
            desc.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=int(step))]
        elif isinstance(default, float):
            desc.floating_point_range = [FloatingPointRange(
                from_value=float(low), to_value=float(high), step=float(step))]
    if not hasattr(node, 'declared_defaults'):
        node.declared_defaults = {}
    node.declared_defaults[name] = default
    # rclpy cannot tell an empty list's type: say it.
    value = node.declare_parameter(name, Parameter.Type.STRING_ARRAY if default == [] else default,
                                   desc).value
    if default == [] and value is None:
        value = []
    if choices and value not in choices:
        raise ValueError(
            f'parameter {name}={value!r} is not valid; use one of: {", ".join(choices)}')
    return value


class ManagedNode(LifecycleNode):
    """A lifecycle node with `is_active`, described parameters and an exit hook."""

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.is_active = False
        self.finished = False
        self._warned_at: dict[str, float] = {}
        self.declared_defaults: dict[str, Any] = {}  # name -> default as declared (docs/parameters.md)
        self.autostart = self.declare(
            'autostart', True, 'Configure and activate on start, without waiting for the manager.')
        self.shutdown_grace = self.declare(
            'shutdown_grace', SHUTDOWN_GRACE,
            'Seconds a node the manager manages keeps serving after a SIGINT to its whole process '
            "group (Ctrl-C on ros2 launch), for the manager's final checkpoint and shutdown; "
            '0 = exit at once.', low=0.0, high=3600.0)

    # -- parameters -------------------------------------------------------
    def declare(self, name: str, default: Any, description: str, *,
                low: float | None = None, high: float | None = None, step: float = 0,
                read_only: bool = False, choices: Sequence[str] | None = None) -> Any:
        """Declare a parameter with a description and range; return its value (`declare`)."""
        return declare(self, name, default, description, low=low, high=high, step=step,
                       read_only=read_only, choices=choices)

    def warn_throttled(self, kind: str, text: str, period: float = 5.0) -> None:
        """A warning at most every `period` s per kind of problem.

        rclpy's own throttle is per call site, which would hide a second,
        different problem behind the first.
        """
        now = time.monotonic()
        if now - self._warned_at.get(kind, -period) >= period:
            if len(self._warned_at) > 256:  # kinds come from input: bound the memory
                self._warned_at.clear()
            self._warned_at[kind] = now
            self.get_logger().warning(text)

    # -- lifecycle --------------------------------------------------------
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.is_active = True
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.is_active = False
        return super().on_deactivate(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.is_active = False
        self.finished = True
        return TransitionCallbackReturn.SUCCESS

    def on_exit(self) -> None:
        """Last actions after spinning stopped (ROS may be down): release, close."""


def _autostart(node: ManagedNode) -> bool:
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().error('configure failed; the node stays unconfigured')
        return False
    if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().error('activate failed; the node stays inactive')
        return False
    return True


def spin_until_finished(node: Any, executor: Any, stop: Callable[[], bool] = lambda: False) -> None:
    """Spin until `node.finished` (its shutdown), `stop()` (after a signal) or context shutdown."""
    try:
        while rclpy.ok() and not node.finished and not stop():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        # A signal can shut the context down between the ok() check and the
        # wait set spin_once builds (rclpy raises RCLError, a RuntimeError):
        # that is the ordinary way out. Anything else is a real failure.
        if rclpy.ok():
            raise


def prefer_synchronous_publication() -> None:
    """Have Fast DDS send from the publishing thread (call before rclpy.init).

    In asynchronous mode a message waits for a background thread to be
    scheduled, and on a busy 2-core machine that thread competes with the
    agent's own step: the action reached the bridge 2-6 ms later at the
    p99 (docs/experiments.md). A user's own RMW_FASTRTPS_PUBLICATION_MODE
    wins; other RMWs ignore it.
    """
    os.environ.setdefault('RMW_FASTRTPS_PUBLICATION_MODE', 'SYNCHRONOUS')


def run(factory: Callable[[], N], args: Sequence[str] | None = None,
        executor_factory: Callable[[], Any] = SingleThreadedExecutor) -> int:
    """Run a managed node until its lifecycle shutdown or a signal (graceful_stop.NodeStop).

    Returns the process exit code: 0 on a clean stop, 1 if the node could
    not be created.
    """
    use_private_umask()  # every file a node writes (checkpoints, weights, logs): the owner's only
    prefer_synchronous_publication()
    # Not rclpy's handlers: they shut the context down at once, and a SIGINT to the whole
    # launch must leave the node serving the manager's final checkpoint.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signals = StopSignals()
    node: ManagedNode | None = None
    try:
        try:
            node = factory()
        except Exception as exc:  # a bad parameter or a missing device: say it in one line
            print(f'[{getattr(factory, "__name__", "node")}] cannot start: {exc}', file=sys.stderr)
            return 1
        if node.autostart:
            _autostart(node)
        executor = executor_factory()
        executor.add_node(node)
        spin_until_finished(node, executor, NodeStop(node, signals, node.shutdown_grace))
    finally:
        if node is not None:
            node.on_exit()
            try:
                node.destroy_node()
            except Exception:  # already gone with the context
                pass
        rclpy.try_shutdown()
    return 0
