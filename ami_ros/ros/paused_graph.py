"""Keeps a paused graph paused when one of its nodes is restarted.

A restarted node (the launcher's supervision, launch_ros's respawn) configures
and activates itself (`autostart`): in a running graph that is where it belongs,
but in a paused one it would act, forward actions or train on its own. While
the manager's graph is paused, every `interval` seconds each managed node that
is found active is deactivated again, as ami/pause would have done.
"""

from __future__ import annotations

from typing import Any

from lifecycle_msgs.msg import State, Transition
from rclpy.task import Future


class PausedGraphKeeper:
    """Deactivates the managed nodes found active while `manager`'s graph is paused."""

    def __init__(self, manager: Any, callback_group: Any, interval: float = 0.5) -> None:
        self.manager = manager
        self._checking = False
        manager.create_timer(interval, self.check, callback_group=callback_group)

    def _idle(self) -> bool:
        m = self.manager
        return m.state == 'paused' and m._moving.done() and not m._saving

    async def check(self) -> None:
        m = self.manager
        if self._checking or not self._idle():
            return
        self._checking = True
        try:
            for name in m.managed:
                # A node that is gone costs nothing here: it is not asked.
                if not m._get[name].service_is_ready() or not self._idle():
                    continue
                if await m._get_state(name) != State.PRIMARY_STATE_ACTIVE or not self._idle():
                    continue
                # Held as a pause or resume holds it: an ami/resume waits for this to finish.
                m._moving = Future()
                try:
                    problem = await m._transition(name, Transition.TRANSITION_DEACTIVATE,
                                                  State.PRIMARY_STATE_ACTIVE)
                finally:
                    m._moving.set_result(None)
                m.get_logger().info(f'{name} came back active while the graph is paused: '
                                    + (problem or 'deactivated'))
        finally:
            self._checking = False
