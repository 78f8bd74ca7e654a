"""A namespace moves a whole agent: `ami-ros launch ... namespace:=robot1`, real processes.

Every node, topic and service of the graph is under /robot1, the agent acts
there and takes the trainers' weights there, `ami-ros --namespace robot1`
controls it, and nothing of the graph is left under the root names but what
ROS keeps absolute by convention.
"""

import pytest
from ros_harness import NodeStatus, ami_ros, free_udp_port, start_graph, stop_graph, wait_for
from sensor_msgs.msg import Joy

NS = '/robot1'
NODES = {'doom_world', 'agent', 'osc_bridge', 'vae_trainer', 'dynamics_trainer', 'policy_trainer',
         'manager'}
TOPICS = {'camera/image_raw', 'action', 'experience', 'reward', 'prediction_error', 'world/pose',
          'ami/state'}
SERVICES = {'agent/sync_weights', 'agent/save_checkpoint', 'vae_trainer/save_checkpoint',
            'ami/pause', 'ami/resume', 'ami/save_checkpoint', 'ami/shutdown', 'agent/get_state'}
# Absolute by ROS convention, shared by every graph on the domain.
ABSOLUTE = {'/rosout', '/parameter_events', '/diagnostics'}


@pytest.fixture
def graph(tmp_path):
    proc = start_graph(tmp_path, 'world:=doom', f'namespace:={NS[1:]}', 'record:=false',
                       f'vrchat_port:={free_udp_port()}')
    yield proc
    stop_graph(proc, timeout=60)


def test_a_namespace_moves_the_whole_agent(graph, test_node):
    probe = test_node.node
    actions = test_node.collect(Joy, f'{NS}/action')
    health = NodeStatus(test_node)
    wait_for(lambda: len(actions) >= 10, 90,
             message=lambda: f'actions on {NS}/action; log:\n{graph.log_path.read_text()[-3000:]}')
    # The trainers push to the agent in the namespace, not to /agent.
    wait_for(lambda: all(health.number(f'{NS[1:]}/agent', f'version_{m}') >= 1
                         for m in ('encoder', 'decoder', 'dynamics', 'policy')), 90,
             message=lambda: f"pushed weights in the agent: {health.status.get(f'{NS[1:]}/agent')}")

    def graph_names() -> tuple[set, set, set]:
        nodes = {(ns, name) for name, ns in probe.get_node_names_and_namespaces()
                 if name != probe.get_name()}
        topics = {name for name, _ in probe.get_topic_names_and_types()}
        services = {name for name, _ in probe.get_service_names_and_types()
                    if not name.startswith(probe.get_fully_qualified_name() + '/')}
        return nodes, topics, services

    def all_seen():
        nodes, topics, services = graph_names()
        return ({(NS, n) for n in NODES} <= nodes and {f'{NS}/{t}' for t in TOPICS} <= topics
                and {f'{NS}/{s}' for s in SERVICES} <= services)

    wait_for(all_seen, 30, interval=0.5, message=lambda: f'the graph under {NS}: {graph_names()}')
    nodes, topics, services = graph_names()
    assert {ns for ns, _ in nodes} == {NS}, nodes
    assert {t for t in topics if not t.startswith(f'{NS}/')} <= ABSOLUTE, topics
    assert not [s for s in services if not s.startswith(f'{NS}/')], services
    assert probe.count_publishers('/action') == 0 and probe.count_subscribers('/camera/image_raw') == 0

    # Controlled through the namespace; no manager answers at the root.
    assert ami_ros('status', '--namespace', NS[1:]).stdout.startswith('running:')
    assert ami_ros('status', '--timeout', '2').returncode == 1
    done = ami_ros('shutdown', '--namespace', NS[1:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert graph.wait(60) == 0, graph.log_path.read_text()[-3000:]
    assert '[launch] all nodes stopped cleanly' in graph.log_path.read_text()
