"""Weights across machines: envelopes as 1 MiB `uint8[]` chunks on a topic, named by sha256.

The 'file' transport needs the agent to read the trainers' files, so only
works on their machine; inline `byte[]` Parameters cross machines but rclpy
turns each byte into a Python object in the agent's interpreter (seconds for
the `ami` set). Here a trainer publishes each envelope on
`<sync service>_payload` (std_msgs/UInt8MultiArray, which rclpy hands over
as an `array.array`, one copy) in chunks, then calls the sync service as
before, each Parameter a string 'sha256:<hex>' naming its envelope. The
agent assembles chunks on a thread of its own, a chunk at a time in the
idle time between steps (each take holds its interpreter for well under a
millisecond), and the service handler waits for the named envelopes, checks
their sha256 and then validates them like any other weights.

A chunk's layout says where it belongs: `layout.dim[0].label` is the
envelope's sha256, `layout.dim[0].size` its length in bytes,
`layout.data_offset` where the chunk starts. Envelopes larger than the
largest model's weights can be are dropped at their first chunk; at most
`KEEP` envelopes are held, the oldest dropped first.
"""

from __future__ import annotations

import array
import hashlib
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import MultiArrayDimension, MultiArrayLayout, UInt8MultiArray

if TYPE_CHECKING:
    from rclpy.node import Node

    from ami_ros.ros.pacing import StepGap

CHUNK_BYTES = 1 << 20
# Reliable, and deep enough for a whole `ami` set (34 chunks) in flight at once.
PAYLOAD_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=64,
                         reliability=ReliabilityPolicy.RELIABLE)
PREFIX = 'sha256:'
# The agent's refusal of a file:// weight that is not on its machine: a trainer on 'auto'
# transport reads it as "send the weights over the payload topic from now on".
FILE_NOT_HERE = 'weights file not on this machine'
# Time a chunk's take and copy needs before the next step is due.
CHUNK_SECONDS = 0.003
_SHA256 = re.compile('[0-9a-f]{64}')


class PayloadError(ValueError):
    """A named payload that did not arrive whole, or not as named; the text says why."""


def payload_topic(service: str) -> str:
    """The payload topic beside a sync service (relative names stay relative)."""
    return f'{service}_payload'


class PayloadSender:
    """A trainer's side: publishes envelopes in chunks; `send` returns the name the service carries."""

    def __init__(self, node: Node, service: str) -> None:
        self.publisher = node.create_publisher(UInt8MultiArray, payload_topic(service), PAYLOAD_QOS)

    def matched(self) -> bool:
        """Whether an agent listens: chunks sent before it does are lost (volatile)."""
        return self.publisher.get_subscription_count() > 0

    def send(self, blob: bytes) -> str:
        digest = hashlib.sha256(blob).hexdigest()
        view = memoryview(blob)
        for offset in range(0, len(blob), CHUNK_BYTES):
            layout = MultiArrayLayout(dim=[MultiArrayDimension(label=digest, size=len(blob), stride=1)],
                                      data_offset=offset)
            # An array.array is taken as it is; anything else is checked byte by byte in Python.
            data = array.array('B')
            data.frombytes(view[offset:offset + CHUNK_BYTES])
            self.publisher.publish(UInt8MultiArray(layout=layout, data=data))
        return PREFIX + digest


class _Assembly:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.parts: dict[int, int] = {}  # offset -> length
        self.filled = 0

    def add(self, offset: int, data: memoryview) -> None:
        self.filled += len(data) - self.parts.get(offset, 0)
        self.parts[offset] = len(data)
        self.data[offset:offset + len(data)] = data

    @property
    def whole(self) -> bool:
        return self.filled >= len(self.data)


class PayloadReceiver:
    """The agent's side: assembles chunks from `<service>_payload` on `node` (spun on its own thread).

    `gap`: the acting loop's idle time; each chunk is taken in it. `max_bytes`:
    the largest envelope accepted at all (the largest model's size limit).
    """

    KEEP = 8  # two whole sets of four models

    def __init__(self, node: Node, service: str, gap: StepGap, max_bytes: int) -> None:
        self.gap = gap
        self.max_bytes = max_bytes
        self.dropped = 0
        self.last_drop = ''
        self._cond = threading.Condition()
        self._assemblies: OrderedDict[str, _Assembly] = OrderedDict()  # under _cond
        node.create_subscription(UInt8MultiArray, payload_topic(service), self._on_chunk, PAYLOAD_QOS)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.last_drop = reason

    def _on_chunk(self, msg: UInt8MultiArray) -> None:
        dims = msg.layout.dim
        if len(dims) != 1 or not _SHA256.fullmatch(dims[0].label):
            self._drop('a chunk without a sha256 label')
            return
        digest, size, offset = dims[0].label, dims[0].size, msg.layout.data_offset
        data = memoryview(msg.data).cast('B')
        if size > self.max_bytes:
            self._drop(f'a {size}-byte payload, larger than any weights ({self.max_bytes} bytes)')
            return
        if offset + len(data) > size:
            self._drop(f'a chunk at {offset}+{len(data)} outside its {size}-byte payload')
            return
        with self._cond:
            assembly = self._assemblies.get(digest)
            if assembly is None or len(assembly.data) != size:
                assembly = self._assemblies[digest] = _Assembly(size)
                while len(self._assemblies) > self.KEEP:
                    self._assemblies.popitem(last=False)
            assembly.add(offset, data)
            if assembly.whole:
                self._cond.notify_all()
        # The executor takes the next chunk when this returns: in the idle time between steps.
        self.gap.wait(CHUNK_SECONDS, timeout=0.1)

    def take(self, name: str, limit: int, timeout: float) -> bytearray:
        """The envelope `name` ('sha256:<hex>') names, once whole and checked; PayloadError if not.

        It is handed over, not copied (a sender sends it again with each try)."""
        digest = name.removeprefix(PREFIX)
        if not name.startswith(PREFIX) or not _SHA256.fullmatch(digest):
            raise PayloadError(f"a payload name looks like 'sha256:<64 hex digits>', not {name[:80]!r}")
        with self._cond:
            if not self._cond.wait_for(lambda: self._whole(digest), timeout):
                assembly = self._assemblies.get(digest)
                got = f'{assembly.filled} of {len(assembly.data)} bytes' if assembly else 'nothing'
                raise PayloadError(f'payload {digest[:12]} not received within {timeout:g} s ({got})')
            data = self._assemblies.pop(digest).data
        if len(data) > limit:
            raise PayloadError(f'payload {digest[:12]} holds {len(data)} bytes, at most {limit} expected')
        if hashlib.sha256(data).hexdigest() != digest:  # hashlib lets go of the interpreter
            raise PayloadError(f'payload {digest[:12]} does not match its sha256')
        return data

    def _whole(self, digest: str) -> bool:
        assembly = self._assemblies.get(digest)
        return assembly is not None and assembly.whole
