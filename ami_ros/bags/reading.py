"""Open any rosbag2 bag, ours or foreign, and stream its raw messages.

The one place in ami_ros that opens bags. It takes a bag directory (mcap or
sqlite3, with metadata.yaml), a lone `.mcap` or `.db3` file, or a directory
whose recorder was killed before it wrote metadata.yaml. A complete bag is
read through rosbags' Reader (its indexes give counts without a scan); an
MCAP file cut short is read with the `mcap` package's stream reader up to its
last complete record, and the bag says so (`recovered`, `recovery_note`).

Messages come out raw, CDR exactly as recorded: `message_class(msgtype)` and
`deserialize(msgtype, data)` decode them with rclpy when a caller wants to.

    with open_bag(path) as bag:              # BagError (one line, names the file) if unreadable
        bag.topics                           # {name: TopicInfo(name, type, count, serialization_format,
                                             #                  offered_qos_profiles)}
        bag.topic('/ami/action', ['sensor_msgs/msg/Joy'])   # TopicInfo, or BagError naming the topic
        bag.start_ns, bag.end_ns, bag.duration_ns, bag.message_count, bag.files, bag.size, bag.storage
        bag.recovered, bag.recovery_note     # True and one line when read from a file cut short
        for topic, msgtype, timestamp_ns, data in bag.messages(['/ami/camera/image_raw']):
            msg = deserialize(msgtype, data)  # or message_class(msgtype) for rclpy's class
"""

from __future__ import annotations

import heapq
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

BAG_SUFFIXES = ('.mcap', '.db3')


class BagError(RuntimeError):
    """A bag that cannot be read as asked; the message is one line naming the file (and topic)."""


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag: its type, message count, serialization format and offered QoS."""

    name: str
    type: str
    count: int
    serialization_format: str = 'cdr'
    # rosbags.interfaces.Qos objects, as the recording publishers offered them (may be empty).
    offered_qos_profiles: tuple[Any, ...] = ()


class BagMessage(NamedTuple):
    """One recorded message: topic, type ('pkg/msg/Name'), receive time (ns) and its raw CDR."""

    topic: str
    msgtype: str
    timestamp_ns: int
    data: bytes


@dataclass
class Bag:
    """An open bag. Use as a context manager (`with open_bag(path) as bag:`)."""

    path: Path
    files: list[Path]
    storage: str  # 'mcap' or 'sqlite3'
    topics: dict[str, TopicInfo]
    start_ns: int
    end_ns: int
    recovered: bool = False
    recovery_note: str = ''  # why and what was recovered, one line; '' when complete
    _reader: Any = field(default=None, repr=False)
    _recovered_files: list[Path] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        """Bytes on disk of the bag's files."""
        return sum(f.stat().st_size for f in self.files if f.exists())

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns) if self.message_count else 0

    @property
    def message_count(self) -> int:
        return sum(t.count for t in self.topics.values())

    def topic(self, name: str, types: Iterable[str] | None = None) -> TopicInfo:
        """The topic `name`, or BagError naming the file and topic if absent or of another type."""
        info = self.topics.get(name)
        if info is None:
            known = ', '.join(sorted(self.topics)) or 'none'
            raise BagError(f'{self.path}: no topic {name} in this bag (topics: {known})')
        wanted = tuple(types or ())
        if wanted and info.type not in wanted:
            raise BagError(f'{self.path}: topic {name} is {info.type}, expected {" or ".join(wanted)}')
        return info

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
        """The bag's messages (only those of `topics` if given), in time order, streamed."""
        wanted = set(topics) if topics is not None else None
        if self._reader is not None:
            yield from self._reader_messages(wanted)
            return
        streams = [_scan_mcap(f, wanted) for f in self._recovered_files]
        # Each file is in receive order already; merging keeps split files in order too.
        yield from heapq.merge(*streams, key=lambda m: m.timestamp_ns)

    def _reader_messages(self, wanted: set[str] | None) -> Iterator[BagMessage]:
        connections = [c for c in self._reader.connections if wanted is None or c.topic in wanted]
        if not connections:
            return
        try:
            for connection, timestamp, data in self._reader.messages(connections=connections):
                yield BagMessage(connection.topic, connection.msgtype, timestamp, bytes(data))
        except BagError:
            raise
        except Exception as exc:  # rosbags/mcap/sqlite errors mid-read: one line naming the bag
            raise BagError(f'{self.path}: cannot read further: {_one_line(exc)}') from None

    def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                reader.close()
            except Exception:  # closing a half-read foreign bag must not hide the caller's error
                pass

    def __enter__(self) -> Bag:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_bag(path: str | Path) -> Bag:
    """Open the bag at `path` (directory, .mcap or .db3); BagError when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise BagError(f'{path}: no such bag (give a bag directory, a .mcap or a .db3 file)')
    if path.is_dir():
        files = sorted((f for f in path.iterdir() if f.suffix in BAG_SUFFIXES and f.is_file()),
                       key=_split_order)
        if not (path / 'metadata.yaml').exists():
            if not files:
                raise BagError(f'{path}: not a bag directory (no metadata.yaml, no .mcap or .db3 file)')
            if all(f.suffix == '.mcap' for f in files):
                return _recover(path, files, 'no metadata.yaml (the recorder did not close the bag)')
            return _open_with_rosbags(files[0]) if len(files) == 1 else _refuse_many(path, files)
    elif path.suffix not in BAG_SUFFIXES:
        raise BagError(f'{path}: not a bag file (expected a directory, a .mcap or a .db3 file)')
    elif path.stat().st_size == 0:
        raise BagError(f'{path}: empty file, not a bag')
    return _open_with_rosbags(path)


def _refuse_many(path: Path, files: list[Path]) -> Bag:
    raise BagError(f'{path}: {len(files)} storage files and no metadata.yaml; open one file at a time')


def _open_with_rosbags(path: Path) -> Bag:
    from rosbags.rosbag2 import Reader

    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:
        mcaps = _mcap_files(path)
        if mcaps and _starts_as_mcap(mcaps[0]):
            return _recover(path, mcaps, f'not closed cleanly ({_one_line(exc)})')
        raise BagError(f'{path}: not a readable bag: {_one_line(exc)}') from None
    try:
        topics = {}
        for name, info in reader.topics.items():
            conns = info.connections
            qos = tuple(q for c in conns for q in getattr(c.ext, 'offered_qos_profiles', ()) or ())
            fmt = getattr(conns[0].ext, 'serialization_format', 'cdr') if conns else 'cdr'
            topics[name] = TopicInfo(name, info.msgtype or conns[0].msgtype, info.msgcount, fmt, qos)
        storage = _storage_of(path, reader)
        count = reader.message_count
        files = _storage_files(path, reader)
        bag = Bag(path, files, storage, topics, reader.start_time if count else 0,
                  reader.end_time - 1 if count else 0, _reader=reader)  # rosbags: 1 ns after the last
    except Exception as exc:
        reader.close()
        raise BagError(f'{path}: not a readable bag: {_one_line(exc)}') from None
    return bag


def _storage_of(path: Path, reader: Any) -> str:
    if path.is_dir():
        files = _storage_files(path, reader)
        return 'sqlite3' if files and files[0].suffix == '.db3' else 'mcap'
    return 'sqlite3' if path.suffix == '.db3' else 'mcap'


def _storage_files(path: Path, reader: Any) -> list[Path]:
    if not path.is_dir():
        return [path]
    import yaml

    info = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    return [path / Path(name).name for name in info.get('relative_file_paths', [])]


def _mcap_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted((f for f in path.iterdir() if f.suffix == '.mcap' and f.is_file()), key=_split_order)
    return [path] if path.suffix == '.mcap' else []


def _split_order(path: Path) -> tuple[str, int]:
    """bag_2.mcap before bag_10.mcap: split files sort by their number."""
    stem, _, number = path.stem.rpartition('_')
    return (stem, int(number)) if number.isdigit() else (path.stem, -1)


def _starts_as_mcap(path: Path) -> bool:
    from mcap.writer import MCAP0_MAGIC

    with path.open('rb') as f:
        return f.read(len(MCAP0_MAGIC)) == MCAP0_MAGIC


def _recover(path: Path, files: list[Path], why: str) -> Bag:
    """Scan MCAP files record by record up to the last complete one; counts come from the scan."""
    counts: dict[str, int] = {}
    meta: dict[str, tuple[str, str, tuple[Any, ...]]] = {}
    start, end = 2**63 - 1, 0
    stopped: list[str] = []
    for file in files:
        if not _starts_as_mcap(file):
            raise BagError(f'{file}: not an MCAP file (no MCAP magic at its start)')
        for message in _scan_mcap(file, None, meta, stopped):
            counts[message.topic] = counts.get(message.topic, 0) + 1
            start = min(start, message.timestamp_ns)
            end = max(end, message.timestamp_ns)
    topics = {name: TopicInfo(name, meta[name][0], counts.get(name, 0), meta[name][1], meta[name][2])
              for name in meta}
    total = sum(counts.values())
    cut = f'; read up to the last complete record of {", ".join(stopped)}' if stopped else ''
    note = f'recovered {total} messages: {why}{cut}'
    return Bag(path, files, 'mcap', topics, start if total else 0, end, recovered=True,
               recovery_note=note, _recovered_files=files)


def _scan_mcap(file: Path, wanted: set[str] | None,
               meta: dict[str, tuple[str, str, tuple[Any, ...]]] | None = None,
               stopped: list[str] | None = None) -> Iterator[BagMessage]:
    """Messages of one MCAP file in file order, stopping quietly where the file is cut short."""
    from mcap.records import Channel, Message, Schema
    from mcap.stream_reader import StreamReader

    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, str]] = {}
    with file.open('rb') as stream:
        records = StreamReader(stream, record_size_limit=2**31).records
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception:  # a truncated record or chunk: what came before it is the bag
                if stopped is not None:
                    stopped.append(file.name)
                return
            if isinstance(record, Schema):
                schemas[record.id] = record.name
            elif isinstance(record, Channel):
                msgtype = schemas.get(record.schema_id, '')
                channels[record.id] = (record.topic, msgtype)
                if meta is not None and record.topic not in meta:
                    meta[record.topic] = (msgtype, record.message_encoding,
                                          _qos_from_channel(record.metadata))
            elif isinstance(record, Message):
                topic, msgtype = channels.get(record.channel_id, ('', ''))
                if topic and (wanted is None or topic in wanted):
                    yield BagMessage(topic, msgtype, record.log_time, bytes(record.data))


def _qos_from_channel(metadata: dict[str, str]) -> tuple[Any, ...]:
    text = metadata.get('offered_qos_profiles', '')
    if not text:
        return ()
    try:
        import yaml
        from rosbags.rosbag2.metadata import parse_qos

        return tuple(parse_qos(yaml.safe_load(text)))
    except Exception:  # QoS is informative; a foreign writer's odd QoS must not lose the messages
        return ()


def message_class(msgtype: str) -> type:
    """The rclpy message class of 'pkg/msg/Name' (or 'pkg/Name'); BagError if not installed."""
    parts = msgtype.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise BagError(f'message type {msgtype!r} is not of the form pkg/msg/Name')
    try:
        return getattr(importlib.import_module(f'{parts[0]}.{parts[1]}'), parts[2])
    except (ImportError, AttributeError):
        raise BagError(f'message type {msgtype} is not installed for rclpy '
                       f'(pip install the ros-{parts[0].replace("_", "-")} package)') from None


def deserialize(msgtype: str, data: bytes) -> Any:
    """Decode one raw CDR message of `msgtype` with rclpy."""
    from rclpy.serialization import deserialize_message

    return deserialize_message(data, message_class(msgtype))


def _one_line(exc: BaseException) -> str:
    text = ' '.join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + '...'
