"""Process priority: a trainer process gives the CPUs to the acting agent (niceness, CPU set).

Both apply to every thread of the process, those rclpy and DDS started
before the node existed included; threads started later inherit them from
their creator on Linux, so a node applies them before it starts its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def yield_cpu(nice: int) -> None:
    """Lower every thread of this process so the acting agent wins the CPU.

    Linux keeps a niceness per thread: os.nice() alone would miss the DDS
    threads rclpy started before the node existed. At nice 19 the threads
    also go to SCHED_IDLE, which runs them only when no normal task wants
    the core.
    """
    def lower(tid: int) -> None:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        if nice >= 19 and hasattr(os, 'SCHED_IDLE'):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))

    _for_every_thread(lower)


def _for_every_thread(apply: Callable[[int], None]) -> None:
    """`apply(tid)` to every thread of this process that still exists."""
    for tid in os.listdir('/proc/self/task'):
        try:
            apply(int(tid))
        except (OSError, ValueError):  # a thread that just ended
            pass


def parse_cpu_list(spec: str) -> set[int]:
    """CPU ids from a taskset-style list ('1', '1-3', '0,2-3'); empty = none given."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(','))):
        low, _, high = part.partition('-')
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"cpus {spec!r}: {part!r} is not a CPU id or a range like '1-3'") \
                from None
        if first < 0 or last < first:
            raise ValueError(f"cpus {spec!r}: {part!r} is not a range of CPU ids")
        cpus.update(range(first, last + 1))
    return cpus


def pin_cpus(cpus: set[int]) -> None:
    """Run every thread of this process on `cpus` only (later threads inherit it)."""
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise ValueError(f'cpus {sorted(cpus)} are not all usable here; this process may use '
                         f'{sorted(usable)}')
    _for_every_thread(lambda tid: os.sched_setaffinity(tid, cpus))
