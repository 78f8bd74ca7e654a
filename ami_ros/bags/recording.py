"""Writing rosbag2 bags: MCAP files with metadata.yaml, as `ros2 bag record` writes them.

`BagWriter` knows nothing of ROS: it takes raw CDR with its topic, type and
the publishers' offered QoS (rosbags' Qos objects) and writes the ros2 MCAP
profile (schemas in `ros2msg`, channels with `offered_qos_profiles` and
`topic_type_hash`) through the `mcap` package, split into numbered files by
size or duration, zstd chunk compression by default. Message definitions and
type hashes come from rosbags' typestore, filled from the `.msg` files of the
installed ROS packages for types it does not know.

`QueuedBagWriter` puts the writing on its own thread behind a bounded queue,
so a subscription callback never waits for the disk; what a full queue drops
is counted and shown, never silent.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TOPICS = ('camera/image_raw', 'action', 'experience', 'reward', 'prediction_error',
                  'world/pose', 'world/episode')
CHUNK_BYTES = 1 << 20  # uncompressed chunk size: what a SIGKILL can lose at most, per file
BAG_VERSION = 9  # rosbag2's metadata version of Jazzy and Kilted


@dataclass
class _Topic:
    type: str
    qos_yaml: str
    qos: list[Any]
    definition: str
    type_hash: str
    count: int = 0


@dataclass
class _File:
    path: Path
    start_ns: int = 2**63 - 1
    end_ns: int = 0
    count: int = 0


class BagWriter:
    """A rosbag2 bag directory being written: DIR/DIR_0.mcap, DIR_1.mcap ..., metadata.yaml on close."""

    def __init__(self, directory: str | Path, *, compression: str = 'zstd', max_bytes: int = 0,
                 max_duration_s: float = 0.0, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and any(self.directory.iterdir()):
            raise FileExistsError(f'{self.directory} exists and is not empty; choose a new bag directory')
        if compression not in ('zstd', 'none'):
            raise ValueError(f'compression {compression!r}: use zstd or none')
        self.directory.mkdir(parents=True, exist_ok=True)
        self.compression = compression
        self.max_bytes = max_bytes
        self.max_duration_ns = int(max_duration_s * 1e9)
        self.chunk_bytes = chunk_bytes
        self.topics: dict[str, _Topic] = {}
        self.files: list[_File] = []
        self.closed_bytes = 0  # bytes of the files already finished
        self._stream: Any = None
        self._mcap: Any = None
        self._channels: dict[str, int] = {}
        self._typestore: Any = None
        self._open_next_file()

    # -- topics and messages -----------------------------------------------
    def add_topic(self, topic: str, msgtype: str, offered_qos: Sequence[Any] = ()) -> None:
        """Register a topic (once); its schema and channel go into every file from now on."""
        if topic in self.topics:
            return
        from rosbags.rosbag2.metadata import dump_qos_v9

        qos = list(offered_qos)
        qos_yaml = yaml.safe_dump(dump_qos_v9(qos), default_flow_style=False).strip() if qos else ''
        definition, type_hash = self._definition(msgtype)
        self.topics[topic] = _Topic(msgtype, qos_yaml, qos, definition, type_hash)
        self._register(topic)

    def write(self, topic: str, timestamp_ns: int, data: bytes) -> None:
        current = self.files[-1]
        if current.count and self._should_split(current, timestamp_ns):
            self._finish_file()
            self._open_next_file()
            current = self.files[-1]
        self._mcap.add_message(self._channels[topic], log_time=timestamp_ns, data=data,
                               publish_time=timestamp_ns, sequence=current.count)
        self.topics[topic].count += 1
        current.count += 1
        current.start_ns = min(current.start_ns, timestamp_ns)
        current.end_ns = max(current.end_ns, timestamp_ns)

    def flush(self) -> None:
        """Hand what Python buffers to the OS, so a SIGKILL loses only the chunk being built."""
        self._stream.flush()

    @property
    def size(self) -> int:
        """Bytes written so far (the chunk being built not counted)."""
        stream = self._stream  # the writer thread may be switching files meanwhile
        try:
            return self.closed_bytes + (stream.tell() if stream is not None else 0)
        except ValueError:  # closed between the two lines
            return self.closed_bytes

    @property
    def message_count(self) -> int:
        return sum(f.count for f in self.files)

    def close(self) -> None:
        """Finish the last file (summary and index) and write metadata.yaml."""
        if self._mcap is None:
            return
        self._finish_file()
        if self.files and not self.files[-1].count and len(self.files) > 1:
            self.files[-1].path.unlink()
            self.files.pop()
        meta = self._metadata()
        tmp = self.directory / 'metadata.yaml.tmp'
        tmp.write_text(yaml.safe_dump(meta, default_flow_style=False, sort_keys=False))
        tmp.replace(self.directory / 'metadata.yaml')

    # -- files -------------------------------------------------------------
    def _should_split(self, current: _File, timestamp_ns: int) -> bool:
        if self.max_bytes and self._stream.tell() >= self.max_bytes:
            return True
        return bool(self.max_duration_ns and timestamp_ns - current.start_ns >= self.max_duration_ns)

    def _open_next_file(self) -> None:
        from mcap.writer import CompressionType, Writer

        path = self.directory / f'{self.directory.name}_{len(self.files)}.mcap'
        self._stream = path.open('xb')
        compression = CompressionType.ZSTD if self.compression == 'zstd' else CompressionType.NONE
        self._mcap = Writer(self._stream, chunk_size=self.chunk_bytes, compression=compression)
        self._mcap.start(profile='ros2', library='ami_ros bag record (mcap python)')
        self.files.append(_File(path))
        self._channels = {}
        for topic in self.topics:
            self._register(topic)

    def _register(self, topic: str) -> None:
        info = self.topics[topic]
        schema = self._mcap.register_schema(info.type, 'ros2msg', info.definition.encode())
        metadata = {'offered_qos_profiles': info.qos_yaml}
        if info.type_hash:
            metadata['topic_type_hash'] = info.type_hash
        self._channels[topic] = self._mcap.register_channel(topic, 'cdr', schema, metadata)

    def _finish_file(self) -> None:
        self._mcap.add_metadata('rosbag2', {'serialized_metadata': yaml.safe_dump(
            self._metadata()['rosbag2_bagfile_information'], sort_keys=False)})
        self._mcap.finish()
        self._stream.close()
        self.closed_bytes += self.files[-1].path.stat().st_size
        self._mcap, self._stream = None, None

    def _metadata(self) -> dict[str, Any]:
        from rosbags.rosbag2.metadata import dump_qos_v9

        counted = [f for f in self.files if f.count]
        start = min((f.start_ns for f in counted), default=0)
        end = max((f.end_ns for f in counted), default=0)
        return {'rosbag2_bagfile_information': {
            'version': BAG_VERSION,
            'storage_identifier': 'mcap',
            'relative_file_paths': [f.path.name for f in self.files],
            'duration': {'nanoseconds': end - start},
            'starting_time': {'nanoseconds_since_epoch': start},
            'message_count': self.message_count,
            'topics_with_message_count': [
                {'topic_metadata': {'name': name, 'type': t.type, 'serialization_format': 'cdr',
                                    'offered_qos_profiles': dump_qos_v9(t.qos),
                                    'type_description_hash': t.type_hash},
                 'message_count': t.count}
                for name, t in self.topics.items()],
            'compression_format': '',
            'compression_mode': '',
            'files': [{'path': f.path.name,
                       'starting_time': {'nanoseconds_since_epoch': f.start_ns if f.count else 0},
                       'duration': {'nanoseconds': f.end_ns - f.start_ns if f.count else 0},
                       'message_count': f.count} for f in self.files],
            'custom_data': None,
            'ros_distro': 'ami_ros',
        }}

    # -- message definitions -----------------------------------------------
    def _definition(self, msgtype: str) -> tuple[str, str]:
        """The ros2msg definition (with its dependencies) and RIHS01 hash of `msgtype`."""
        from rosbags.typesys import Stores, get_typestore

        if self._typestore is None:
            self._typestore = get_typestore(Stores.ROS2_JAZZY)
        store = self._typestore
        try:
            if msgtype not in store.fielddefs:
                _register_installed_type(store, msgtype)
            definition, _ = store.generate_msgdef(msgtype, ros_version=2)
            return definition, store.hash_rihs01(msgtype)
        except Exception:  # a type without an installed .msg: the bag still holds its messages
            return '', ''


def _register_installed_type(store: Any, msgtype: str, seen: set[str] | None = None) -> None:
    """Add `msgtype` and the types it uses to `store` from the installed share/<pkg>/msg files."""
    from rosbags.typesys import get_types_from_msg

    seen = set() if seen is None else seen
    if msgtype in store.fielddefs or msgtype in seen:
        return
    seen.add(msgtype)
    package, _, name = msgtype.split('/')
    for prefix in (Path(sys.prefix), *map(Path, _ament_prefixes())):
        path = prefix / 'share' / package / 'msg' / f'{name}.msg'
        if path.exists():
            types = get_types_from_msg(path.read_text(), msgtype)
            break
    else:
        raise LookupError(f'no definition of {msgtype} installed')
    for _, fields in types.values():
        for _, field in fields:
            for part in _type_names(field):
                if part.count('/') == 2:
                    _register_installed_type(store, part, seen)
    store.register(types)


def _type_names(field: Any) -> list[str]:
    """Every 'pkg/msg/Name' a rosbags field description refers to."""
    if isinstance(field, str):
        return [field]
    if isinstance(field, tuple):
        return [name for item in field for name in _type_names(item)]
    return []


def _ament_prefixes() -> list[str]:
    import os

    return [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]


class QueuedBagWriter:
    """A BagWriter on its own thread: `put` never blocks; a full queue drops and counts."""

    def __init__(self, writer: BagWriter, max_queued: int = 1000) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple[str, int, bytes] | None] = queue.Queue(max_queued)
        self.dropped: dict[str, int] = {}
        self.received_bytes = 0  # CDR bytes received: the size the status shows before a chunk is written
        self.error = ''  # the writer thread's failure, one line
        self.started_ns = time.time_ns()
        self._lock = threading.Lock()  # add_topic (ROS thread) against write (writer thread)
        self._thread = threading.Thread(target=self._run, name='bag-writer', daemon=True)
        self._thread.start()

    def add_topic(self, topic: str, msgtype: str, offered_qos: Sequence[Any] = ()) -> None:
        with self._lock:
            self.writer.add_topic(topic, msgtype, offered_qos)

    def put(self, topic: str, timestamp_ns: int, data: bytes) -> None:
        self.received_bytes += len(data)
        try:
            self.queue.put_nowait((topic, timestamp_ns, data))
        except queue.Full:
            self.dropped[topic] = self.dropped.get(topic, 0) + 1

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                with self._lock:
                    if not self.error:
                        self.writer.write(*item)
                        if self.queue.empty():
                            self.writer.flush()
            except Exception as exc:  # a full disk: say it in the status, keep the ROS side alive
                self.error = f'writing failed: {exc}'
            finally:
                self.queue.task_done()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then finish the bag (metadata.yaml)."""
        self.queue.put(None)
        self._thread.join(timeout)
        with self._lock:
            self.writer.close()

    def status(self) -> str:
        """One line: duration, size, messages per topic, drops and errors."""
        seconds = (time.time_ns() - self.started_ns) / 1e9
        counts = ' '.join(f'{name}={t.count}' for name, t in sorted(self.writer.topics.items()))
        dropped = sum(self.dropped.values())
        line = (f'bag {self.writer.directory.name}: {seconds:.0f}s {self.received_bytes / 1e6:.1f}MB in, '
                f'{self.writer.size / 1e6:.1f}MB written in '
                f'{len(self.writer.files)} file(s) | {counts or "no messages yet"}')
        if dropped:
            line += f' | DROPPED {dropped} (disk too slow)'
        if self.error:
            line += f' | {self.error}'
        return line
