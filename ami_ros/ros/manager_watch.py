"""Whether the graph's manager has shut the graph down: for nodes that serve the graph unmanaged.

web_api-like nodes (the viewer) are not among the manager's nodes, so no
lifecycle shutdown reaches them; they end once the manager has said
`shutting_down` on its latched ami/state and has left the graph, so a launch
ends with its graph. Standalone (no manager ever seen) they run on.
"""

from __future__ import annotations

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from std_msgs.msg import String

STATE_TOPIC = 'ami/state'


class ManagerWatch:
    """Follows ami/state; `graph_shut_down()` once the manager said shutting_down and is gone."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.state: str | None = None
        self._seen = False
        self._shutting_down = False
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(String, STATE_TOPIC, self._on_state, latched)

    def _on_state(self, msg: String) -> None:
        self.state = msg.data
        self._shutting_down |= msg.data == 'shutting_down'

    def graph_shut_down(self) -> bool:
        # The graph cache can learn of a publisher after its first message: gone means seen before.
        present = self.node.count_publishers(STATE_TOPIC) > 0
        self._seen |= present
        return self._seen and not present and self._shutting_down
