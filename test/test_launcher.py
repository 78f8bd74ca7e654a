"""`ami-ros launch`: its status line on a terminal and in a pipe, and the
order in which it stops the graph (real processes)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from ros_harness import free_udp_port, stop_process, wait_for

from ami_ros.launcher import STATUS_WIDTH, GraphStatus, StatusPrinter

# A run days long on a fast machine: every value as wide as it gets.
LONG = GraphStatus(state='shutting_down', uptime=123 * 3600 + 45 * 60 + 6, frames_hz=30.0,
                   actions_hz=29.94, latency_ms=123.456, reward=-0.000123456, steps='123456789',
                   losses={'vae': '1.23456e-05', 'dyn': '0.0733947', 'ppo': '12345.6'})
# The main job after 40 minutes.
TYPICAL = GraphStatus(state='running', uptime=39 * 60 + 12, frames_hz=10.0, actions_hz=9.96,
                      latency_ms=4.32, reward=0.1184, steps='23456',
                      losses={'vae': '0.0243674', 'dyn': '0.0733947', 'ppo': '23.3092'})


# -- the status line -----------------------------------------------------------
def test_the_main_jobs_status_shows_every_field_within_120_columns():
    text = TYPICAL.render()
    assert len(text) <= STATUS_WIDTH, len(text)
    assert text.split(' | ') == ['running 0:39:12', '10.0 fps', '10.0 actions/s in 4.3 ms',
                                 'reward 0.118', 'step 23456', 'loss vae 0.0244 dyn 0.0734 ppo 23.3']


@pytest.mark.parametrize('width', [STATUS_WIDTH, 100, 80, 60, 30])
def test_a_long_status_drops_whole_fields_least_needed_first(width):
    fields = LONG.fields()
    assert len(' | '.join(t for _, t in fields)) > STATUS_WIDTH  # too long as it is
    text = LONG.render(width)
    assert len(text) <= width
    kept = text.split(' | ')
    texts = [t for _, t in fields]
    assert kept[0] == 'shutting_down 123:45:06'  # the state and uptime stay
    assert all(part in texts for part in kept), kept  # whole fields, never a cut one
    assert [t for t in texts if t in kept] == kept  # in their order
    kept_ranks = [rank for rank, t in fields if t in kept]
    dropped_ranks = [rank for rank, t in fields if t not in kept]
    assert dropped_ranks and min(dropped_ranks) >= max(kept_ranks)
    if width == STATUS_WIDTH:  # how it acts and the losses stay on a 120-column line
        assert '29.9 actions/s in 123.5 ms' in kept and 'loss vae 1.23e-05 dyn 0.0734 ppo 1.23e+04' in kept


def test_unknown_values_are_left_out_or_shown_as_a_dash():
    text = GraphStatus(uptime=2.5).render()
    assert text == 'starting 0:00:02 | 0.0 fps | 0.0 actions/s | reward -'
    assert GraphStatus(losses={'vae': '', 'dyn': 'nan'}).fields()[-1][1] == 'loss vae - dyn -'


def test_with_several_agents_the_line_shows_each_agents_rate():
    text = GraphStatus(frames_hz=19.9, actions_hz=19.9, agents_hz=(10.0, 9.9), latency_ms=4.0).render()
    assert '19.9 actions/s (10.0 9.9) in 4.0 ms' in text
    assert '(' not in GraphStatus(actions_hz=10.0).render()  # one agent: no list


def test_in_a_pipe_the_status_is_a_plain_line_every_interval_and_at_the_end():
    stream = io.StringIO()
    printer = StatusPrinter(stream, plain_interval=10.0)
    assert not printer.tty
    t0 = printer.last_plain
    printer.line('[agent] INFO agent ready')
    printer.status(TYPICAL, now=t0 + 1.0)  # too soon after the start: not printed
    printer.status(LONG, now=t0 + 10.5)
    printer.line('[agent] INFO new weights: policy v2')
    printer.status(TYPICAL, now=t0 + 15.0)  # too soon after the last one
    printer.close()  # the last one is printed at the end
    lines = stream.getvalue().split('\n')
    assert lines == ['[agent] INFO agent ready', '[status] ' + LONG.render(STATUS_WIDTH - 9),
                     '[agent] INFO new weights: policy v2', '[status] ' + TYPICAL.render(STATUS_WIDTH - 9),
                     '']
    assert all(len(line) <= STATUS_WIDTH for line in lines)
    assert '\x1b' not in stream.getvalue() and '\r' not in stream.getvalue()


def _screen(output: str, columns: int) -> list[str]:
    """The rows a terminal of `columns` shows for `output`: just what the
    launcher writes (text, CR, LF, ESC[K), wrapping as a terminal does."""
    rows, row, col = [''], 0, 0
    for token in re.findall(r'\x1b\[K|[\r\n]|[^\x1b\r\n]', output):
        if token == '\r':
            col = 0
        elif token == '\n':
            row, col = row + 1, 0
        elif token == '\x1b[K':
            rows[row] = rows[row][:col]
        else:
            if col == columns:  # the row is full: the terminal wraps
                row, col = row + 1, 0
                if row == len(rows):
                    rows.append('')
            rows[row] = rows[row][:col].ljust(col) + token + rows[row][col + 1:]
            col += 1
        if row == len(rows):
            rows.append('')
    return rows


def _terminal(columns: int):
    """A real pseudo-terminal of `columns`: (what the launcher writes to, a read of what it shows)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 30, columns, 0, 0))
    stream = open(slave, 'w', encoding='utf-8')

    def read() -> str:
        data = b''
        while select.select([master], [], [], 0.2)[0]:
            data += os.read(master, 65536)
        return data.decode().replace('\r\n', '\n')  # the terminal's own CR before each LF

    return stream, read, master


@pytest.mark.parametrize('columns', [120, 80])
def test_on_a_terminal_the_status_stays_on_the_bottom_row(monkeypatch, columns):
    monkeypatch.setenv('TERM', 'xterm-256color')
    stream, read, master = _terminal(columns)
    try:
        printer = StatusPrinter(stream)
        assert printer.tty and printer.width() == min(STATUS_WIDTH, columns - 1)
        printer.line('[launch] started')
        printer.status(LONG)
        node_line = '[recorder] INFO ' + 'x' * 150  # longer than the terminal: it may wrap
        printer.line(node_line)
        printer.status(TYPICAL)
        printer.line('[agent] INFO new weights: policy v2')
        shown = read()
        screen = _screen(shown, columns)
        status = TYPICAL.render(columns - 1)
        assert screen[-1] == status and len(status) < columns  # drawn in place, no wrap
        text_rows = screen[:-1]
        assert text_rows[0] == '[launch] started'
        assert ''.join(text_rows[1:-1]) == node_line
        assert text_rows[-1] == '[agent] INFO new weights: policy v2'
        assert not any(row.startswith(('shutting_down', 'running')) for row in text_rows), text_rows
        printer.close()  # the last status stays, as an ordinary line
        assert _screen(shown + read(), columns)[-2:] == [status, '']
    finally:
        stream.close()
        os.close(master)


def test_a_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv('TERM', 'dumb')
    stream, _, master = _terminal(120)
    try:
        assert not StatusPrinter(stream).tty
    finally:
        stream.close()
        os.close(master)


# -- the stop order, with real processes -----------------------------------------
# The pause and shutdown order README and manager promise: frames stop first,
# the agent next, the bridge (which releases every input) after the agent,
# then the learners and the recorder.
STOP_ORDER = ['doom_world', 'agent', 'osc_bridge', 'vae_trainer', 'dynamics_trainer',
              'policy_trainer', 'recorder']
CHECKPOINTED = {'agent', 'vae_trainer', 'dynamics_trainer', 'policy_trainer'}


def test_sigterm_pauses_saves_and_shuts_down_the_graph_in_order(test_node, tmp_path):
    from lifecycle_msgs.msg import State, TransitionEvent
    from sensor_msgs.msg import Joy
    from std_srvs.srv import Trigger

    from ami_ros.core.checkpoint_store import latest_checkpoint

    # Every node's lifecycle transitions, stamped by the node as it made them
    # (DDS source time, the system clock all processes share).
    events: list[tuple[int, str, int]] = []
    subscriptions = [test_node.node.create_subscription(
        TransitionEvent, f'/{name}/transition_event',
        lambda msg, info, name=name: events.append((info['source_timestamp'], name, msg.goal_state.id)),
        50) for name in STOP_ORDER]
    actions = test_node.collect(Joy, 'action')
    log_path = tmp_path / 'launch.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'ami_ros.cli', 'launch', 'world:=doom',
             f'vrchat_port:={free_udp_port()}'],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)  # checkpoints/ in tmp_path
    try:
        wait_for(lambda: all(s.get_publisher_count() for s in subscriptions), 90,
                 message=lambda: f'every node up; log:\n{log_path.read_text()[-3000:]}')

        def every_node_active() -> bool:
            states = test_node.call(Trigger, 'ami/status', timeout=30).message.split()
            return all(f'{name}=active' in states for name in STOP_ORDER)

        wait_for(every_node_active, 90, interval=1.0, message='every node active')
        wait_for(lambda: len(actions) >= 5, 30, message='the agent acting')
        stop_requested = time.time_ns()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()[-4000:]
    finally:
        stop_process(proc, signal.SIGINT, 60)  # the launcher stops its nodes on SIGINT; kill only if it hangs
    out = log_path.read_text()
    assert '[launch] all nodes stopped cleanly' in out

    def first(goal: int) -> dict[str, int]:
        """node -> when it first began the transition to `goal` after the stop request."""
        times: dict[str, int] = {}
        for stamp, name, state in sorted(events):
            if state == goal and stamp >= stop_requested:
                times.setdefault(name, stamp)
        return times

    wait_for(lambda: len(first(State.TRANSITION_STATE_SHUTTINGDOWN)) == len(STOP_ORDER), 10,
             message=lambda: f'every shutdown transition; got {sorted(events)}')
    paused = first(State.TRANSITION_STATE_DEACTIVATING)
    shut_down = first(State.TRANSITION_STATE_SHUTTINGDOWN)
    assert sorted(paused, key=paused.get) == STOP_ORDER
    assert sorted(shut_down, key=shut_down.get) == STOP_ORDER

    # The final checkpoint, through ami/shutdown: taken after the whole graph
    # was paused and before any node shut down, of every node that holds state.
    match = re.search(r'^\[launch\] shut down; final checkpoint (\S+)$', out, re.MULTILINE)
    assert match, out[-4000:]
    final = Path(match.group(1))
    assert latest_checkpoint(tmp_path / 'checkpoints') == final
    manifest = final / 'manifest.json'
    assert set(json.loads(manifest.read_text())['nodes']) == CHECKPOINTED
    assert max(paused.values()) < manifest.stat().st_mtime_ns < min(shut_down.values())
