"""manager: pause, resume, status and shutdown for the whole graph.

Services (std_srvs/srv/Trigger, relative names):
  ami/pause     deactivate every managed node (camera/world first, then the
                agent, then the bridge, which releases every input)
  ami/resume    activate them again, in reverse order (bridge first)
  ami/status    each node's lifecycle state, in `message`
  ami/shutdown  take every node through its lifecycle shutdown, then exit
Topic:
  ami/state     std_msgs/String, latched: running | paused | shutting_down

Parameters:
  managed_nodes   names of the lifecycle nodes, in pause order
  call_timeout    seconds to wait for one node's answer
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import rclpy
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import FloatingPointRange, ParameterDescriptor
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from rclpy.task import Future
from std_msgs.msg import String
from std_srvs.srv import Trigger

_SHUTDOWN_FROM = {
    State.PRIMARY_STATE_UNCONFIGURED: Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
    State.PRIMARY_STATE_INACTIVE: Transition.TRANSITION_INACTIVE_SHUTDOWN,
    State.PRIMARY_STATE_ACTIVE: Transition.TRANSITION_ACTIVE_SHUTDOWN,
}
_STATE_NAMES = {
    State.PRIMARY_STATE_UNKNOWN: 'unknown',
    State.PRIMARY_STATE_UNCONFIGURED: 'unconfigured',
    State.PRIMARY_STATE_INACTIVE: 'inactive',
    State.PRIMARY_STATE_ACTIVE: 'active',
    State.PRIMARY_STATE_FINALIZED: 'finalized',
}


class Manager(Node):
    """Drives the lifecycle of every node of the graph as one system."""

    def __init__(self) -> None:
        super().__init__('manager')
        self.managed: list[str] = list(self.declare_parameter(
            'managed_nodes', ['camera', 'agent', 'osc_bridge'],
            ParameterDescriptor(description='Lifecycle nodes of the graph, in pause order '
                                            '(resume uses the reverse order).')).value)
        self.call_timeout = float(self.declare_parameter(
            'call_timeout', 5.0, ParameterDescriptor(
                description='Seconds to wait for one node to answer a lifecycle call.',
                floating_point_range=[FloatingPointRange(from_value=0.5, to_value=60.0)])).value)
        group = ReentrantCallbackGroup()  # handlers await other services' answers
        self._change = {n: self.create_client(ChangeState, f'{n}/change_state', callback_group=group)
                        for n in self.managed}
        self._get = {n: self.create_client(GetState, f'{n}/get_state', callback_group=group)
                     for n in self.managed}
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._state_pub = self.create_publisher(String, 'ami/state', latched)
        self.state = 'running'
        self.finished = False
        for name, handler in (('pause', self._pause), ('resume', self._resume),
                              ('status', self._status), ('shutdown', self._shutdown)):
            self.create_service(Trigger, f'ami/{name}', handler, callback_group=group)
        self._publish_state()
        self.get_logger().info(f'managing {", ".join(self.managed)}')

    def _publish_state(self) -> None:
        self._state_pub.publish(String(data=self.state))

    async def _call(self, client, request, what: str):
        if not client.service_is_ready():
            return None, f'{what}: not reachable'
        future = client.call_async(request)
        # Bound the wait so one hung node cannot hang the whole graph's control.
        settled = Future()

        def settle(*_) -> None:
            if not settled.done():
                settled.set_result(None)

        timer = self.create_timer(self.call_timeout, settle)
        future.add_done_callback(settle)
        await settled
        self.destroy_timer(timer)
        if not future.done():
            future.cancel()
            return None, f'{what}: no answer within {self.call_timeout:.1f}s'
        return future.result(), None

    async def _get_state(self, name: str) -> int | None:
        result, _ = await self._call(self._get[name], GetState.Request(), name)
        return None if result is None else result.current_state.id

    async def _transition(self, name: str, transition: int, only_from: int | None) -> str | None:
        """Move one node; None on success or when it is not in `only_from`."""
        state = await self._get_state(name)
        if state is None:
            return f'{name}: not reachable'
        if only_from is not None and state != only_from:
            return None
        if transition < 0:  # shutdown: the transition depends on where it is
            transition = _SHUTDOWN_FROM.get(state, -1)
            if transition < 0:
                return None  # already finalized
        result, problem = await self._call(
            self._change[name], ChangeState.Request(transition=Transition(id=transition)), name)
        if problem:
            return problem
        return None if result.success else f'{name}: transition refused'

    async def _apply(self, names: Sequence[str], transition: int, only_from: int | None) -> list[str]:
        problems = []
        for name in names:
            problem = await self._transition(name, transition, only_from)
            if problem:
                problems.append(problem)
        return problems

    async def _move_graph(self, names: Sequence[str], transition: int, only_from: int,
                          state: str, response):
        problems = await self._apply(names, transition, only_from)
        self.state = state
        self._publish_state()
        response.success = not problems
        response.message = state + (f' ({"; ".join(problems)})' if problems else '')
        self.get_logger().info(response.message)
        return response

    async def _pause(self, request, response):
        return await self._move_graph(self.managed, Transition.TRANSITION_DEACTIVATE,
                                      State.PRIMARY_STATE_ACTIVE, 'paused', response)

    async def _resume(self, request, response):
        # Reverse order: the bridge listens before the agent acts, the agent
        # before frames flow.
        return await self._move_graph(list(reversed(self.managed)), Transition.TRANSITION_ACTIVATE,
                                      State.PRIMARY_STATE_INACTIVE, 'running', response)

    async def _status(self, request, response):
        parts, reachable = [], True
        for name in self.managed:
            state = await self._get_state(name)
            reachable &= state is not None
            shown = 'unreachable' if state is None else _STATE_NAMES.get(state, 'unknown')
            parts.append(f'{name}={shown}')
        response.success = reachable
        response.message = f'{self.state}: ' + ' '.join(parts)
        return response

    async def _shutdown(self, request, response):
        self.state = 'shutting_down'
        self._publish_state()
        problems = await self._apply(self.managed, -1, None)
        response.success = not problems
        response.message = 'shut down' + (f' ({"; ".join(problems)})' if problems else '')
        self.get_logger().info(response.message)
        # Let the answer go out before this process ends.
        self.create_timer(0.3, self._finish)
        return response

    def _finish(self) -> None:
        self.finished = True


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = Manager()
    # One thread is enough: the service handlers are coroutines that await
    # the nodes' answers (rclpy's MultiThreadedExecutor would also busy-loop
    # a core the agent needs).
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while rclpy.ok() and not node.finished:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
