"""The AMI control API (web_api node) against a running doom graph, over real HTTP.

One graph serves every check in order, as a console user would drive it:
status, refusals, a second server on the busy port, pause, resume, save, a
burst of 200 requests, an HTTP and a ROS pause at once, and the shutdown.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from ros_harness import NodeStatus, free_tcp_port, free_udp_port, start_graph, stop_graph, wait_for
from sensor_msgs.msg import Joy
from std_srvs.srv import Trigger

from ami_ros import graph as graph_description
from ami_ros.control.web_api import SystemStatus
from ami_ros.core.checkpoint import MANIFEST

MANAGED = ('doom_world', 'agent', 'osc_bridge')


def request(port: int, method: str, path: str, body: bytes | None = None,
            timeout: float = 30.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b'null')
    finally:
        conn.close()


def status(port: int) -> int:
    code, body = request(port, 'GET', '/api/status')
    assert code == 200, body
    return body['status']


def lifecycle(test_node) -> tuple[str, set[str]]:
    """The manager's state and the set of its nodes' lifecycle states (ami/status)."""
    # Early on, the manager may not have discovered a node's get_state yet: it says unreachable.
    message = wait_for(lambda: (m := test_node.call(Trigger, 'ami/status', timeout=20).message)
                       and 'unreachable' not in m and m, 30, interval=0.5,
                       message='every node reachable by the manager')
    state, _, nodes = message.partition(': ')
    found = dict(re.findall(r'(\w+)=(\w+)', nodes))
    assert set(found) == set(MANAGED), message
    return state, set(found.values())


def consistent(test_node, port: int) -> str:
    """The graph's one state, asserted to agree everywhere: manager, every node, HTTP."""
    state, nodes = lifecycle(test_node)
    expected = {'running': ({'active'}, SystemStatus.ACTIVE), 'paused': ({'inactive'}, SystemStatus.PAUSED)}
    assert state in expected, state
    assert nodes == expected[state][0], (state, nodes)
    assert status(port) == expected[state][1]
    return state


@pytest.fixture
def graph(tmp_path):
    port = free_tcp_port()
    # With a bag: the launch must also end when the graph is shut down from outside.
    proc = start_graph(tmp_path, 'world:=doom', 'train:=false', 'record:=false',
                       f'vrchat_port:={free_udp_port()}', f'web_api_port:={port}',
                       f'bag:={tmp_path / "bag"}')
    proc.web_api_port = port
    yield proc
    stop_graph(proc, timeout=60)


def test_the_control_api_drives_the_whole_graph(graph, test_node, launch, tmp_path):
    port = graph.web_api_port
    log = lambda: graph.log_path.read_text()[-3000:]  # noqa: E731
    actions = test_node.collect(Joy, 'action')
    health = NodeStatus(test_node)
    wait_for(lambda: len(actions) >= 5, 90, message=lambda: f'actions; log:\n{log()}')
    # OFFLINE (or refused) until the manager's state has reached the API.
    wait_for(lambda: _status_or_none(port) == SystemStatus.ACTIVE, 30,
             message=lambda: f'the control API to say active; log:\n{log()}')

    # Unknown paths, wrong methods and bodies are refused, and change nothing.
    assert request(port, 'GET', '/api/nothing') == (404, {'error': 'Invalid API endpoint'})
    assert request(port, 'POST', '/api/pause/now') == (404, {'error': 'Invalid API endpoint'})
    for method, path in (('POST', '/api/status'), ('GET', '/api/pause'), ('DELETE', '/api/shutdown'),
                         ('PUT', '/api/save-state'), ('BREW', '/api/resume')):
        assert request(port, method, path) == (405, {'error': 'Invalid API method'}), (method, path)
    assert request(port, 'POST', '/api/shutdown', body=b'{"force": true}')[0] == 400
    assert consistent(test_node, port) == 'running'

    # A second API on the busy port: one line, it exits 0, the graph runs on and still answers.
    second = launch('web_api', name='web_api_second', parameters={'web_api_port': port})
    assert second.wait(60) == 0, second.output()
    busy = [line for line in second.output().splitlines() if f'127.0.0.1:{port}' in line]
    assert len(busy) == 1 and 'in use' in busy[0] and 'web_api_port:=' in busy[0], second.output()
    count = len(actions)
    wait_for(lambda: len(actions) >= count + 5, 30, message='actions after the busy port')
    assert status(port) == SystemStatus.ACTIVE

    # Pause: nothing acts, the bridge released every input, the API says paused.
    releases = int(health.get('osc_bridge', 'releases', '0'))
    assert request(port, 'POST', '/api/pause') == (200, {'result': 'ok'})
    assert status(port) == SystemStatus.PAUSED
    wait_for(lambda: health.get('osc_bridge', 'active') == 'False'
             and int(health.get('osc_bridge', 'releases', '0')) > releases, 10,
             message=lambda: f'the bridge inactive and released: {health.status.get("osc_bridge")}')
    time.sleep(0.5)  # an action already on its way
    count = len(actions)
    time.sleep(2.0)  # two seconds of pause: nothing may act
    assert len(actions) == count, 'the agent acted while paused'
    assert consistent(test_node, port) == 'paused'

    # Resume: it acts again.
    assert request(port, 'POST', '/api/resume') == (200, {'result': 'ok'})
    assert status(port) == SystemStatus.ACTIVE
    wait_for(lambda: len(actions) >= count + 5, 30, message='actions after resume')

    # Save (pamiq's save-state and ami's save-checkpoint): a checkpoint directory each.
    def saved() -> set:
        return {p for p in (tmp_path / 'checkpoints').glob('*') if (p / MANIFEST).exists()}

    for number, path in enumerate(('/api/save-state', '/api/save-checkpoint'), start=1):
        assert request(port, 'POST', path) == (200, {'result': 'ok'})
        wait_for(lambda n=number: len(saved()) >= n, 60,
                 message=lambda p=path: f'a new checkpoint after {p}; log:\n{log()}')
    assert consistent(test_node, port) == 'running'

    # 200 requests at once: every one answered (200, or 503 while the queue is full), the
    # graph in one state after them.
    calls = [('POST', ('/api/pause', '/api/resume')[i // 4 % 2]) if i % 4 == 0 else ('GET', '/api/status')
             for i in range(200)]
    with ThreadPoolExecutor(max_workers=200) as pool:
        answers = list(pool.map(lambda call: request(port, *call, timeout=60), calls))
    codes = {code for code, _ in answers}
    assert codes <= {200, 503}, codes
    posted = [answer for answer, (method, _) in zip(answers, calls, strict=True) if method == 'POST']
    # 50 commands at once against a queue of one: some run, the rest are refused, not queued.
    assert any(code == 200 for code, _ in posted) and any(code == 503 for code, _ in posted), posted
    assert all(body == {'error': 'Command queue is full, try again later'} for code, body in posted
               if code == 503)
    assert all(set(body) == {'status'} and 1 <= body['status'] <= 4 for code, body in answers
               if code == 200 and body and 'status' in body)
    wait_for(lambda: status(port) in (SystemStatus.ACTIVE, SystemStatus.PAUSED), 30, message='settled')
    consistent(test_node, port)
    request(port, 'POST', '/api/resume')
    assert consistent(test_node, port) == 'running'

    # A pause over HTTP and one over the ROS service at the same moment: paused, everywhere.
    over_ros: list = []
    ros_call = threading.Thread(target=lambda: over_ros.append(
        test_node.call(Trigger, 'ami/pause', timeout=30)))
    ros_call.start()
    assert request(port, 'POST', '/api/pause') == (200, {'result': 'ok'})
    ros_call.join(40)
    assert over_ros and over_ros[0].success, over_ros
    assert consistent(test_node, port) == 'paused'

    # Shutdown: answered, then every process of the launch ends cleanly, the API and the
    # bag recorder with them (the bag closed: metadata.yaml written).
    assert request(port, 'POST', '/api/shutdown', timeout=60) == (200, {'result': 'ok'})
    assert graph.wait(90) == 0, log()
    text = graph.log_path.read_text()
    assert '[launch] web_api exited' in text and '[launch] all nodes stopped cleanly' in text, log()
    assert (tmp_path / 'bag' / 'metadata.yaml').is_file(), log()
    with pytest.raises(OSError):
        request(port, 'GET', '/api/status', timeout=5)


def _status_or_none(port: int) -> int | None:
    try:
        return status(port)
    except OSError:  # refused, or a timeout
        return None


def test_port_zero_starts_no_control_api_and_bad_ports_are_refused():
    names = [spec.name for spec in graph_description.describe({'world': 'doom', 'web_api_port': '0'})]
    assert 'web_api' not in names and 'manager' in names
    spec = next(s for s in graph_description.describe({'world': 'doom'}) if s.name == 'web_api')
    assert spec.parameters == {'web_api_host': '127.0.0.1', 'web_api_port': 8391}
    for bad in ('-1', '65536', 'http', ''):
        with pytest.raises(graph_description.GraphArgumentError, match='web_api_port'):
            graph_description.resolve_arguments({'web_api_port': bad})
