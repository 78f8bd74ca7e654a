"""Each node's health on /diagnostics, for rqt_robot_monitor and the launcher."""

from __future__ import annotations

from collections.abc import Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node


class NodeDiagnostics:
    """Publishes one DiagnosticStatus for a node every `period` seconds.

    Values are set with `set(key=value, ...)` from the node's callbacks, or by
    `update`, called before each publication; `warn(text)` / `ok()` set the
    level and message. `report()` refreshes and publishes at once (after a
    checkpoint save, so the run record ends on the counters the checkpoint holds).
    """

    def __init__(self, node: Node, period: float = 1.0,
                 update: Callable[[], None] | None = None) -> None:
        self.node = node
        self.update = update
        # /diagnostics is absolute by the convention of the diagnostics tools.
        self.publisher = node.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.values: dict[str, str] = {}
        self.level = DiagnosticStatus.OK
        self.message = 'ok'
        self.timer = node.create_timer(period, self.report)

    def set(self, **values: object) -> None:
        for key, value in values.items():
            self.values[key] = f'{value:.3f}' if isinstance(value, float) else str(value)

    def warn(self, message: str) -> None:
        self.level, self.message = DiagnosticStatus.WARN, message

    def ok(self, message: str = 'ok') -> None:
        self.level, self.message = DiagnosticStatus.OK, message

    def report(self) -> None:
        """Refresh the values (`update`) and publish them now."""
        if self.update is not None:
            self.update()
        self.publish()

    def publish(self) -> None:
        status = DiagnosticStatus(
            level=self.level, name=self.node.get_fully_qualified_name(), message=self.message,
            hardware_id='ami_ros',
            values=[KeyValue(key=k, value=v) for k, v in self.values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self.publisher.publish(array)
