"""One agent a trainer pushes weights to: its client, pending slot, transport and counters.

`ros/weight_push.py` encodes each round's weights once and offers them to
every target; each target sends them on its own (its own call in flight,
retry time and transport), so an agent that is dead, missing or paused
never holds up another: its call times out or its service is missing, and
only its own retries wait. Its pending slot always holds the newest weights
until it takes them, so an agent that appears late gets the newest version
at its next try (within `sync_retry`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.task import Future

from ami_ros.graph import relative_name
from ami_ros.ros.weight_payload import FILE_NOT_HERE, PayloadSender

if TYPE_CHECKING:
    from ami_ros.ros.managed_node import ManagedNode

NOTHING_YET = 'nothing pushed yet'


@dataclass
class PendingWeights:
    """Encoded weights of one version, waiting to be sent."""

    version: int
    envelopes: dict[str, bytes]  # model name -> weights envelope
    urls: dict[str, str] | None = None  # model name -> its file's 'file://' URL, where written

    def values(self, transport: str, sender: PayloadSender) -> list[ParameterValue]:
        """What the request carries per model with `transport` (sends the payloads first)."""
        if transport in ('auto', 'file') and self.urls is not None:
            return [ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=self.urls[name])
                    for name in self.envelopes]
        if transport == 'bytes':
            return [ParameterValue(type=ParameterType.PARAMETER_BYTE_ARRAY, byte_array_value=blob)
                    for blob in self.envelopes.values()]
        return [ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=sender.send(blob))
                for blob in self.envelopes.values()]


class WeightTarget:
    """The weight service `service` of the agent in `namespace`, pushed to from `node`.

    `offer` may be called from any thread; `tick` and the rest run on the node's executor.
    """

    def __init__(self, node: ManagedNode, namespace: str, service: str, transport: str,
                 retry: float, timeout: float) -> None:
        self.node = node
        self.namespace = namespace
        self.transport = transport  # 'auto' may become 'topic' for this agent alone
        self.retry, self.timeout = retry, timeout
        self.payloads = PayloadSender(node, relative_name(namespace, service))
        self.client = node.create_client(SetParameters, relative_name(namespace, service))
        self._lock = threading.Lock()
        self._pending: PendingWeights | None = None  # under _lock
        self._in_flight: tuple[Future, PendingWeights, float] | None = None
        self._next_try = 0.0
        self.pushes_ok = 0
        self.pushes_failed = 0
        self.pushed_version = -1  # the last version this agent took
        self.last_sync = NOTHING_YET

    @property
    def who(self) -> str:
        """The agent, for log lines."""
        return f'agent {self.namespace}' if self.namespace else 'agent'

    def offer(self, pending: PendingWeights) -> None:
        """Send `pending` next, in place of older weights not yet sent."""
        with self._lock:
            self._pending = pending

    @property
    def pending(self) -> PendingWeights | None:
        with self._lock:
            return self._pending

    def failing(self) -> bool:
        return self.last_sync not in ('ok', NOTHING_YET)

    def tick(self, now: float) -> None:
        if self._in_flight is not None:
            future, pending, sent_at = self._in_flight
            if not future.done() and now - sent_at > self.timeout:
                self._failed(pending, f'no answer within {self.timeout:.1f} s')
                self.client.remove_pending_request(future)
                future.cancel()
            return
        if now < self._next_try:
            return
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        if not self.client.service_is_ready():
            self._failed(pending, f'{self.client.service_name} not available')
            return
        if self.transport == 'topic' and not self.payloads.matched():
            self._failed(pending, f'{self.payloads.publisher.topic_name} has no subscriber yet')
            return
        values = pending.values(self.transport, self.payloads)
        request = SetParameters.Request(parameters=[
            Parameter(name=name, value=value) for name, value in zip(pending.envelopes, values, strict=True)])
        future = self.client.call_async(request)
        self._in_flight = (future, pending, now)
        future.add_done_callback(self._on_done)

    def _on_done(self, future: Future) -> None:
        if self._in_flight is None or self._in_flight[0] is not future:
            return  # timed out earlier and already counted
        _, pending, _ = self._in_flight
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._failed(pending, f'call failed: {exc}')
            return
        results = future.result().results
        refused = [r.reason for r in results if not r.successful]
        if self.transport == 'auto' and refused and all(FILE_NOT_HERE in r for r in refused):
            # This agent runs on another machine: from now on its weights go over the topic.
            self.node.get_logger().info(f"{self.who} cannot read this machine's weight files "
                                        f"({refused[0]}); sending weights over "
                                        f'{self.payloads.publisher.topic_name}')
            self.transport = 'topic'
            self._in_flight = None
            with self._lock:
                if self._pending is None:
                    self._pending = pending
            return
        if refused or len(results) != len(pending.envelopes):
            self._failed(pending, 'refused: ' + ('; '.join(refused) or
                                                 f'{len(results)} results for '
                                                 f'{len(pending.envelopes)} models'))
            return
        self._in_flight = None
        self.pushes_ok += 1
        self.pushed_version = pending.version
        if self.last_sync != 'ok':  # the first, or the first after failures
            self.node.get_logger().info(f'{self.who} took version {pending.version} of '
                                        f'{", ".join(pending.envelopes)} ({self.transport})')
        else:
            self.node.get_logger().debug(f'{self.who} took version {pending.version}')
        self.last_sync = 'ok'

    def _failed(self, pending: PendingWeights, reason: str) -> None:
        """Count, log (throttled per agent) and schedule the retry with the newest weights."""
        self._in_flight = None
        self.pushes_failed += 1
        self.last_sync = reason
        self._next_try = time.monotonic() + self.retry
        with self._lock:
            if self._pending is None:  # a newer round would replace it anyway
                self._pending = pending
        self.node.warn_throttled(f'sync {self.namespace}', f'pushing version {pending.version} to '
                                 f'{self.who} failed ({reason}); retrying every {self.retry:g} s')
