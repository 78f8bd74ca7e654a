"""manager: pause, resume, status and shutdown for the whole graph.

Services (std_srvs/srv/Trigger, relative names):
  ami/pause     deactivate every managed node (camera/world first, then the
                agent, then the bridge, which releases every input)
  ami/resume    activate them again, in reverse order (bridge first)
  ami/status    each node's lifecycle state, in `message`
  ami/save_checkpoint  pause, have every node write its part into one new
                checkpoint directory, commit it atomically, resume only if the
                graph was running; answers with the directory in `message`.
                Refused, with the reason, beyond max_manual_checkpoints or when
                the disk lacks the space (min_free_mb); crashed saves' stages
                are removed at start (clean_partials)
  ami/shutdown  pause the graph, save a final checkpoint (save_on_shutdown),
                take every node through its lifecycle shutdown, then exit; so does
                SIGINT/SIGTERM (Ctrl-C on ros2 launch; ros/graceful_stop.py)
Topics:
  ami/state     std_msgs/String, latched: running | paused | shutting_down
  /diagnostics  (1 Hz, and at once after each save) the state, checkpoints
                saved and failed, the newest checkpoint; a warning when the
                last save failed

Parameters: declared in ManagerNode.__init__, each with its description and
range; docs/parameters.md lists them (`ami-ros parameters`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import rclpy
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import (
    Parameter,
    ParameterType,
    ParameterValue,
)
from rcl_interfaces.srv import SetParameters
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ami_ros.core.checkpoint import (
    CheckpointError,
    abort_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
)
from ami_ros.core.checkpoint_store import (
    apply_retention,
    clean_partials,
    save_refusal,
)
from ami_ros.core.private_files import use_private_umask
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.graceful_stop import ManagerStop, StopSignals
from ami_ros.ros.managed_node import declare, prefer_synchronous_publication, spin_until_finished
from ami_ros.ros.paused_graph import PausedGraphKeeper

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
        self.managed: list[str] = list(declare(
            self, 'managed_nodes', ['camera', 'agent', 'osc_bridge'],
            'Lifecycle nodes of the graph, in pause order (resume uses the reverse order).'))
        self.checkpointed = [n for n in declare(
            self, 'checkpointed_nodes', ['agent', 'vae_trainer', 'dynamics_trainer', 'policy_trainer'],
            'Nodes that hold state; those among managed_nodes must take part in every checkpoint.')
            if n in self.managed]
        # With several agents one that died must not cost the others their checkpoints.
        # [''], not []: a parameter left without a value empties `ros2 param dump` and the
        # recorder's reading of every parameter of this node (rclpy's get_parameters).
        self.spare = set(declare(
            self, 'spare_nodes', [''], 'Checkpointed nodes a checkpoint goes without, with a warning, '
            "when they are gone or do not answer (agents:=N: the agents; '' = none); the others must "
            'take part.')) - {''}
        self.call_timeout = float(declare(
            self, 'call_timeout', 5.0, "Seconds to wait for one node to answer a lifecycle call, and "
            "for the nodes' services to be discovered before a transition.", low=0.5, high=60.0))
        # Absolute, so the path ami/save_checkpoint answers is usable anywhere.
        self.checkpoint_dir = str(Path(declare(
            self, 'checkpoint_dir', 'checkpoints',
            'Directory of the checkpoints (relative: to the working directory).')).absolute())
        self.checkpoint_interval = float(declare(
            self, 'checkpoint_interval', 10800.0, 'Seconds between periodic checkpoints; 0 = none.',
            low=0.0, high=1e7))
        self.keep_last = int(declare(
            self, 'keep_last', 5, 'Periodic and final checkpoints kept (0 = all); checkpoints saved '
            'on request are never removed.', low=0, high=100000, step=1))
        self.max_manual = int(declare(
            self, 'max_manual_checkpoints', 20, 'Checkpoints saved on request (ami/save_checkpoint) '
            'kept at most: retention never removes them and anyone on the ROS domain can ask for one, '
            'so one more is refused until some are removed by hand.', low=1, high=100000, step=1))
        self.min_free_mb = int(declare(
            self, 'min_free_mb', 256, "Free disk space (MiB) a checkpoint must leave on checkpoint_dir's "
            "disk; a save that needs more than is free (the newest checkpoint's size plus this) is "
            'refused.', low=0, high=10**7, step=1))
        self.save_on_shutdown = bool(declare(
            self, 'save_on_shutdown', True, 'Save a final checkpoint at ami/shutdown.'))
        self.save_timeout = float(declare(
            self, 'save_timeout', 180.0, "Seconds to wait for one node's part of a checkpoint (a "
            'trainer first finishes a running round).', low=1.0, high=3600.0))
        self.preset = str(declare(
            self, 'preset', '', "The graph's preset, recorded in each checkpoint's manifest."))
        group = ReentrantCallbackGroup()  # handlers await other services' answers
        self._save_part = {n: self.create_client(SetParameters, f'{n}/save_checkpoint',
                                                 callback_group=group) for n in self.managed}
        self._saving = False
        self._save_done = Future()  # completed when the save under way ends
        self._moving = Future()  # completed when the pause or resume under way ends
        self._moving.set_result(None)
        if self.checkpoint_interval > 0:
            self.create_timer(self.checkpoint_interval, self._periodic_save, callback_group=group)
        self._change = {n: self.create_client(ChangeState, f'{n}/change_state', callback_group=group)
                        for n in self.managed}
        self._get = {n: self.create_client(GetState, f'{n}/get_state', callback_group=group)
                     for n in self.managed}
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._state_pub = self.create_publisher(String, 'ami/state', latched)
        self.state = 'running'
        self.finished = False
        self.checkpoints_saved = 0
        self.checkpoints_failed = 0
        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)
        self.diagnostics.set(last_checkpoint='')
        for name, handler in (('pause', self._pause), ('resume', self._resume),
                              ('status', self._status), ('shutdown', self._shutdown),
                              ('save_checkpoint', self._save_checkpoint)):
            self.create_service(Trigger, f'ami/{name}', handler, callback_group=group)
        self._publish_state()
        self.keeper = PausedGraphKeeper(self, group)  # a restarted node rejoins a paused graph paused
        self._clean_partials()
        self.get_logger().info(f'managing {", ".join(self.managed)}')

    def _clean_partials(self) -> None:
        """Remove the stages of saves that crashed (untouched for an hour: not a save under way)."""
        try:
            removed = clean_partials(self.checkpoint_dir)
        except OSError as exc:
            self.get_logger().warning(f'could not clean up unfinished saves in {self.checkpoint_dir}: {exc}')
            return
        if removed:
            self.get_logger().info(f'removed {len(removed)} unfinished save(s) from {self.checkpoint_dir}')

    def _publish_state(self) -> None:
        self._state_pub.publish(String(data=self.state))

    def _update_diagnostics(self) -> None:
        self.diagnostics.set(state=self.state, saving=self._saving,
                             checkpoints_saved=self.checkpoints_saved,
                             checkpoints_failed=self.checkpoints_failed)

    async def _wait(self, timeout: float, future: Future | None = None) -> None:
        """Until `future` is done or `timeout` seconds passed.

        Not time.sleep: the executor keeps serving while a handler waits.
        """
        settled = Future()

        def settle(*_) -> None:
            if not settled.done():
                settled.set_result(None)

        timer = self.create_timer(timeout, settle)
        if future is not None:
            future.add_done_callback(settle)
        await settled
        self.destroy_timer(timer)

    async def _call(self, client, request, what: str, timeout: float | None = None):
        if not client.service_is_ready():
            return None, f'{what}: not reachable'
        future = client.call_async(request)
        # Bound the wait so one hung node cannot hang the whole graph's control.
        timeout = self.call_timeout if timeout is None else timeout
        await self._wait(timeout, future)
        if not future.done():
            future.cancel()
            return None, f'{what}: no answer within {timeout:.1f}s'
        return future.result(), None

    async def _ready(self, clients: Sequence, timeout: float) -> bool:
        """Whether every one of `clients`' services is found within `timeout` seconds.

        A node that has just started, or a manager that has, needs a moment
        before DDS has matched both topics of a service.
        """
        deadline = time.monotonic() + timeout  # a busy executor fires the 0.1 s timer late
        while not all(client.service_is_ready() for client in clients):
            if time.monotonic() >= deadline:
                return False
            await self._wait(0.1)
        return True

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
        # One bounded wait for all of them, so a node that is gone costs
        # call_timeout once, not once per node.
        await self._ready([c for n in names for c in (self._get[n], self._change[n])],
                          self.call_timeout)
        problems = []
        for name in names:
            problem = await self._transition(name, transition, only_from)
            if problem:
                problems.append(problem)
        return problems

    async def _move_graph(self, names: Sequence[str], transition: int, only_from: int,
                          state: str, response):
        # One pause or resume at a time (from ROS or the web API): two at once would
        # race on the same node's transition, and one of them would be refused.
        while not self._moving.done():
            await self._moving
        self._moving = Future()
        try:
            problems = await self._apply(names, transition, only_from)
        finally:
            self._moving.set_result(None)
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
        saved, first = '', self.state != 'shutting_down'
        self.state = 'shutting_down'
        self._publish_state()
        # Paused first, and left so: what acted or trained after the final
        # checkpoint would be lost, and a trainer would push its weights to an
        # agent that is already gone.
        await self._apply(self.managed, Transition.TRANSITION_DEACTIVATE, State.PRIMARY_STATE_ACTIVE)
        if self.save_on_shutdown and first:
            ok, text = await self._save(manual=False)
            saved = f'; final checkpoint {text}' if ok else f'; no final checkpoint: {text}'
        problems = await self._apply(self.managed, -1, None)
        response.success = not problems
        response.message = 'shut down' + (f' ({"; ".join(problems)})' if problems else '') + saved
        self.get_logger().info(response.message)
        # Let the answer go out before this process ends.
        self.create_timer(0.3, self._finish)
        return response

    # -- checkpoints ---------------------------------------------------------
    async def _save_checkpoint(self, request, response):
        ok, text = await self._save(manual=True)
        response.success, response.message = ok, text
        return response

    async def _periodic_save(self) -> None:
        if self.state == 'running':
            await self._save(manual=False, wait=False)  # the next period will do

    async def _save(self, manual: bool, wait: bool = True) -> tuple[bool, str]:
        """One checkpoint of the whole graph; (ok, directory or the reason).

        With `wait` (saves on request, the final one) a save under way is
        waited for and then this one is taken; without, it is skipped.
        """
        if self._saving and not wait:
            return False, 'a checkpoint is being saved already'
        while self._saving:
            await self._save_done
        # Before pausing anything: a refused save leaves the graph as it was.
        problem = save_refusal(self.checkpoint_dir, self.max_manual if manual else None,
                               self.min_free_mb << 20)
        if problem:
            self.get_logger().error(problem)
            return self._save_failed(problem)
        self._saving = True
        self._save_done = Future()
        self.get_logger().info('saving a checkpoint' + (' (on request)' if manual else ''))
        was_running = self.state == 'running'
        try:
            if was_running:  # a consistent picture: nothing acts or trains while parts are written
                await self._apply(self.managed, Transition.TRANSITION_DEACTIVATE,
                                  State.PRIMARY_STATE_ACTIVE)
            try:
                stage = begin_checkpoint(self.checkpoint_dir)
            except (CheckpointError, OSError) as exc:
                return self._save_failed(f'cannot create a checkpoint in {self.checkpoint_dir}: {exc}')
            saved, problems = [], []
            for name in self.managed:
                client = self._save_part[name]
                if name in self.checkpointed:
                    # Just started, its service may not be discovered yet.
                    if not await self._ready([client], self.call_timeout):
                        gone = f'{name}: its save_checkpoint service is not reachable (is the node running?)'
                        if name in self.spare:
                            self.get_logger().warning(f'checkpoint without {gone}')
                        else:
                            problems.append(gone)
                        continue
                elif not client.service_is_ready():
                    continue  # a node without state to keep (camera, bridge, world, recorder)
                request = SetParameters.Request(parameters=[Parameter(
                    name='directory', value=ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                           string_value=str(stage)))])
                # A trainer first lets a running round finish: give it time. An agent saves at once;
                # one just killed still looks reachable until DDS notices (seconds): a short wait.
                timeout = 4 * self.call_timeout if name in self.spare else self.save_timeout
                result, problem = await self._call(client, request, name, timeout)
                if problem is None and not (result.results and result.results[0].successful):
                    problem = f'{name}: ' + (result.results[0].reason if result.results else 'no answer')
                if problem and name in self.spare:
                    self.get_logger().warning(f'checkpoint without {problem}')
                elif problem:
                    problems.append(problem)
                else:
                    saved.append(name)
            if problems or not saved:
                abort_checkpoint(stage)
                reason = '; '.join(problems) or 'no node holds state to save'
                self.get_logger().error(f'checkpoint not saved: {reason}')
                return self._save_failed(f'checkpoint not saved: {reason}')
            path = commit_checkpoint(stage, {'preset': self.preset, 'nodes': saved,
                                             **({'manual': True} if manual else {})})
            removed = apply_retention(self.checkpoint_dir, self.keep_last)
            self.get_logger().info(f'checkpoint saved: {path} ({", ".join(saved)})'
                                   + (f'; removed {len(removed)} old' if removed else ''))
            self.checkpoints_saved += 1
            self.diagnostics.set(last_checkpoint=str(path))
            self.diagnostics.ok()
            return True, str(path)
        finally:
            if was_running:
                await self._apply(list(reversed(self.managed)), Transition.TRANSITION_ACTIVATE,
                                  State.PRIMARY_STATE_INACTIVE)
            self._saving = False
            self._save_done.set_result(None)
            # Now, not at the next tick: after the final save the graph stops
            # within a second, and the run's record should end with this save.
            self.diagnostics.report()

    def _save_failed(self, reason: str) -> tuple[bool, str]:
        self.checkpoints_failed += 1
        self.diagnostics.warn(reason)
        return False, reason

    def _finish(self) -> None:
        self.finished = True


def main(args: list[str] | None = None) -> int:
    use_private_umask()  # checkpoints and logs: the owner's only
    prefer_synchronous_publication()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signals = StopSignals()  # SIGINT/SIGTERM: ami/shutdown's path (ros2 launch's Ctrl-C)
    node = Manager()
    # One thread is enough: the service handlers are coroutines that await
    # the nodes' answers (rclpy's MultiThreadedExecutor would also busy-loop
    # a core the agent needs).
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        spin_until_finished(node, executor, ManagerStop(signals, node, lambda: executor.create_task(
            node._shutdown(Trigger.Request(), Trigger.Response()))))
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
