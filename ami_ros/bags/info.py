"""What `ami-ros bag info` prints: the fields and layout of `ros2 bag info`, plus recovery."""

from __future__ import annotations

from datetime import datetime

from ami_ros.bags.reading import Bag

LABEL_WIDTH = 19  # `ros2 bag info` aligns its values after 'Topic information: '


def human_size(size: int) -> str:
    """Bytes as ros2 bag info writes them (B, KiB, MiB, GiB)."""
    value = float(size)
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if value < 1024 or unit == 'GiB':
            return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    return f'{size} B'


def stamp(ns: int) -> str:
    """A time as `ros2 bag info` shows it: local date and time, then seconds since the epoch."""
    seconds, rest = divmod(ns, 10**9)
    local = datetime.fromtimestamp(seconds).strftime('%b %e %Y %H:%M:%S')
    return f'{local}.{rest:09d} ({seconds}.{rest:09d})'


def describe(bag: Bag) -> str:
    """The info text of an open bag."""
    rows: list[tuple[str, str]] = []

    def row(label: str, value: str) -> None:
        rows.append((label, value))

    files = [f.name for f in bag.files]
    row('Files:', files[0] if files else '')
    rows.extend(('', name) for name in files[1:])
    row('Bag size:', human_size(bag.size))
    row('Storage id:', bag.storage)
    if bag.recovered:
        row('Recovered:', bag.recovery_note)
    row('Duration:', f'{bag.duration_ns / 1e9:.9f}s')
    if bag.message_count:
        row('Start:', stamp(bag.start_ns))
        row('End:', stamp(bag.end_ns))
    row('Messages:', str(bag.message_count))
    topics = sorted(bag.topics.values(), key=lambda t: t.name)
    width = max((len(t.name) for t in topics), default=0)
    for i, topic in enumerate(topics):
        row('Topic information:' if i == 0 else '',
            f'Topic: {topic.name:<{width}} | Type: {topic.type} | Count: {topic.count} | '
            f'Serialization Format: {topic.serialization_format}')
    if not topics:
        row('Topic information:', '')
    return '\n'.join(f'{label:<{LABEL_WIDTH}}{value}'.rstrip() for label, value in rows) + '\n'
