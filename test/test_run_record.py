"""The MLflow record without ROS: batching, artifacts, the exploration map, the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ami_ros.record.admission import NodeAdmission
from ami_ros.record.agent_track import AgentTrack, tracks_status, tracks_summary
from ami_ros.record.mlflow_run import (
    BackgroundRecorder,
    RecordError,
    RunRecorder,
    parse_float,
    resolve_tracking_uri,
    run_page_url,
)
from ami_ros.record.pictures import ExplorationMap, side_by_side
from ami_ros.record.run_params import node_params, parameters_file, parse_params
from ami_ros.record.summary import RunStats, summary_line

EXPERIMENT = 'test_run_record'


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes ~1.5 s), artifacts in tmp."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp('mlflow')
    uri = 'sqlite:///' + str(root / 'mlflow.db')
    client = MlflowClient(uri)
    client.create_experiment(EXPERIMENT, artifact_location=(root / 'artifacts').as_uri())
    return uri, client


def _artifact_dir(rec: RunRecorder) -> Path:
    assert rec.artifact_uri.startswith('file://')
    return Path(rec.artifact_uri[len('file://'):])


def test_many_metrics_are_written_by_one_flush(store):
    uri, client = store
    rec = RunRecorder(uri, EXPERIMENT, 'batching', params={'preset': 'cpu', 'world': 'doom'})
    calls = []
    log_batch = rec.client.log_batch
    rec.client.log_batch = lambda *a, **k: (calls.append(len(k.get('metrics', []))), log_batch(*a, **k))
    for step in range(1200):
        rec.add_metric('reward', step * 0.5, step)
        rec.add_metric('agent/latency_p99_ms', 10.0, step)
    assert calls == []  # nothing written before a flush
    assert rec.flush() == 2400
    assert calls == [1000, 1000, 400]  # MLflow's batch limit, nothing per metric
    assert rec.pending == 0 and rec.flush() == 0

    history = sorted(client.get_metric_history(rec.run_id, 'reward'), key=lambda m: m.step)
    assert len(history) == 1200
    assert history[3].step == 3 and history[3].value == 1.5
    assert len(client.get_metric_history(rec.run_id, 'agent/latency_p99_ms')) == 1200
    run = client.get_run(rec.run_id)
    assert run.data.params == {'preset': 'cpu', 'world': 'doom'}
    assert run.info.run_name == 'batching'


def test_artifacts_summary_and_finished_status(store):
    uri, client = store
    rec = RunRecorder(uri, EXPERIMENT)
    assert rec.run_name  # a timestamp when none is given
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :, 0] = 200  # red in RGB
    rec.log_image('frames/step_00000001.png', rgb)
    rec.add_metric('world/cells_visited', 4, 7)
    rec.finish({'steps': 7, 'cells_visited': 4, 'reward_mean_last_n': float('nan')})

    run = client.get_run(rec.run_id)
    assert run.info.status == 'FINISHED'
    assert run.data.metrics['world/cells_visited'] == 4
    root = _artifact_dir(rec)
    png = cv2.imread(str(root / 'frames' / 'step_00000001.png'))
    assert png.shape == (10, 20, 3) and tuple(png[0, 0]) == (0, 0, 200)  # BGR on disk: red stays red
    summary = json.loads((root / 'summary.json').read_text())
    assert summary == {'steps': 7, 'cells_visited': 4, 'reward_mean_last_n': None}


def test_a_new_experiment_keeps_artifacts_next_to_the_sqlite_store(store):
    uri, client = store
    rec = RunRecorder(uri, 'fresh/experiment')
    db_dir = Path(uri[len('sqlite:///'):]).parent
    assert _artifact_dir(rec) == db_dir / 'mlruns' / 'fresh_experiment' / rec.run_id / 'artifacts'


def test_the_experiment_is_marked_as_model_training(store, tmp_path):
    """MLflow 3's UI lists a run with no logged model as a GenAI evaluation
    unless its experiment's kind tag says model training: a new experiment is
    made with it, one made without it (by an older recorder, by hand) or
    marked otherwise gets it."""
    uri, client = store
    kind = 'mlflow.experimentKind'
    client.create_experiment('made_untagged', artifact_location=(tmp_path / 'a').as_uri())
    client.create_experiment('marked_genai', artifact_location=(tmp_path / 'b').as_uri(),
                             tags={kind: 'genai_development'})
    for name in ('made_untagged', 'marked_genai', 'made_by_the_recorder'):
        rec = RunRecorder(uri, name)
        experiment = client.get_experiment_by_name(name)
        assert experiment.experiment_id == client.get_run(rec.run_id).info.experiment_id
        assert experiment.tags.get(kind) == 'custom_model_development', name
    # MLflow 3.9+ decides the view by its sidebar switch (GenAI by default); the page link sets it.
    url = run_page_url(uri, rec.experiment_id, rec.run_id)
    assert url.startswith('http://127.0.0.1:5000/#/experiments/' + rec.experiment_id + '/runs/' + rec.run_id)
    assert url.endswith('?workflowType=machine_learning')
    assert run_page_url('http://tracking:8080/', '3', 'r').startswith('http://tracking:8080/#/experiments/3/')


def test_an_unusable_store_fails_with_what_to_do(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    uri = 'sqlite:///' + str(blocker / 'mlflow.db')
    with pytest.raises(RecordError) as err:
        RunRecorder(uri, EXPERIMENT)
    text = str(err.value)
    assert text.startswith(f'cannot record to MLflow at {uri}: ')
    assert 'tracking_uri' in text and 'MLFLOW_TRACKING_URI' in text and '\n' not in text


def test_background_recorder_flushes_and_finishes(store):
    uri, client = store
    opened, errors = [], []
    writer = BackgroundRecorder(lambda: RunRecorder(uri, EXPERIMENT, 'background'), flush_interval=0.2,
                                on_open=opened.append, on_error=errors.append)
    for step in range(50):
        writer.add_metric('prediction_error', float(step), step)
    deadline = time.monotonic() + 20
    while writer.metrics_logged < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.metrics_logged == 50 and len(opened) == 1
    writer.add_metric('prediction_error', 99.0, 50)  # still pending at close: the last flush takes it
    assert writer.close(lambda rec: rec.log_json('summary.json', {'steps': 51}))
    assert errors == []
    run_id = opened[0].run_id
    assert client.get_run(run_id).info.status == 'FINISHED'
    assert len(client.get_metric_history(run_id, 'prediction_error')) == 51
    assert json.loads((_artifact_dir(opened[0]) / 'summary.json').read_text()) == {'steps': 51}


def test_background_recorder_reports_a_bad_store_once_and_drops_the_rest():
    errors = []

    def open_run():
        raise RecordError('cannot record to MLflow at foo://bar: nope')

    writer = BackgroundRecorder(open_run, on_error=errors.append)
    assert writer.close(timeout=5)
    assert errors == ['cannot record to MLflow at foo://bar: nope'] and writer.failed
    writer.add_metric('reward', 1.0, 1)  # a no-op, never an exception
    assert writer.pending == 0


def test_exploration_cells_follow_floor_boundaries():
    grid = ExplorationMap(cell_size=64)
    assert grid.visit(0.0, 0.0)
    assert not grid.visit(63.9, 63.9)  # same cell [0, 64)
    assert grid.visit(64.0, 0.0)  # the boundary starts the next cell
    assert grid.visit(-0.1, 0.0)  # negatives go to cell -1, not 0
    assert not grid.visit(-64.0, 10.0)
    assert grid.visit(-64.1, 10.0)  # cell -2
    assert not grid.visit(float('nan'), 0.0)
    assert grid.cell(-64.1, -0.5) == (-2, -1)
    assert grid.cells_visited == 4
    assert grid.visits[(0, 0)] == 2
    assert grid.to_json()['cells'][0] == [-2, 0, 1]


def test_exploration_map_renders_visited_cells():
    grid = ExplorationMap(cell_size=10)
    empty = grid.render()
    assert empty.dtype == np.uint8 and empty.ndim == 3 and empty.shape[2] == 3
    for x in range(0, 100, 5):  # a walk along x: cells 0..9 of row 0
        grid.visit(float(x), 5.0)
    picture = grid.render(max_size=240)
    # 10 cells + a margin cell on each side = 12 wide, 3 high; 240 // 12 = 20 px a cell.
    assert picture.shape == (60, 240, 3) and picture.dtype == np.uint8
    visited = picture[30, 20 * 5 + 10]  # middle of cell 5 on the row of the trajectory
    assert visited.astype(int).sum() > 3 * 32  # brighter than the unvisited background
    assert tuple(picture[5, 5]) == (32, 32, 32)  # an unvisited margin cell
    assert tuple(picture[0, 5]) == (16, 16, 16)  # on a grid line: darker


def test_trajectory_memory_stays_bounded():
    grid = ExplorationMap(cell_size=4, max_points=100)
    for i in range(1000):
        grid.visit(float(i), 0.0)
    assert len(grid.trajectory) <= 100
    assert grid.trajectory[0] == (0.0, 0.0) and grid.trajectory[-1] == (999.0, 0.0)


def test_run_stats_summary():
    stats = RunStats()
    stats.update('agent', {'steps': 100.0, 'latency_p99_ms': 12.0})
    stats.update('agent', {'steps': 120.0})
    stats.update('vae_trainer', {'rounds': 3.0, 'loss': 0.25, 'kl': 0.1})
    stats.update('policy_trainer', {'rounds': 1.0, 'policy_loss': -0.5})
    track = AgentTrack('', cell_size=10, window=3)
    for value in (1.0, 2.0, 3.0, 4.0, float('nan')):
        track.rewards.add(value)
    for x in range(0, 50, 10):
        track.visit(float(x), 0.0)
    summary = stats.summary(tracks_summary([track]))
    assert summary['steps'] == 120
    assert summary['rounds'] == {'policy_trainer': 1, 'vae_trainer': 3}
    assert summary['losses'] == {'policy_trainer/policy_loss': -0.5, 'vae_trainer/loss': 0.25}
    assert summary['reward_mean_last_n'] == 3.0 and summary['reward_window'] == 3
    assert summary['reward_count'] == 4 and summary['cells_visited'] == 5
    line = summary_line(summary)
    assert '120 agent steps' in line and 'vae_trainer 3' in line and '5 cells visited' in line
    assert 'reward mean 3 over the last 3 steps' in line


def test_parameters_and_values():
    assert parse_params('preset=cpu; world=doom;;device=cuda:0') == {
        'preset': 'cpu', 'world': 'doom', 'device': 'cuda:0'}
    assert parse_params(['a=1', 'b=x=y']) == {'a': '1', 'b': 'x=y'}
    with pytest.raises(ValueError, match='not key=value'):
        parse_params('preset')
    assert [parse_float(v) for v in ('1.5', '3', 'True', 'nan', 'inf', 'cpu')] == [
        1.5, 3.0, None, None, None, None]


def test_node_parameters_as_run_params_and_as_a_parameters_file(store):
    import yaml

    agent = {'persistence': 0.8, 'preset': 'cpu', 'deterministic': False, 'seed': 0}
    bridge = {'velocity': [1.0, 0.5, 1.0], 'host': '127.0.0.1'}
    params = {**node_params('agent', agent), **node_params('osc_bridge', bridge)}
    assert params == {'agent/persistence': '0.8', 'agent/preset': 'cpu',
                      'agent/deterministic': 'false', 'agent/seed': '0',
                      'osc_bridge/velocity': '[1.0, 0.5, 1.0]', 'osc_bridge/host': '127.0.0.1'}
    text = parameters_file({'/osc_bridge': bridge, '/agent': agent})
    # A ROS 2 parameters file that gives back every value with its type.
    assert yaml.safe_load(text) == {'/agent': {'ros__parameters': agent},
                                    '/osc_bridge': {'ros__parameters': bridge}}
    uri, client = store
    rec = RunRecorder(uri, EXPERIMENT, params={'world': 'doom'})
    rec.log_params(params)
    rec.log_params(params)  # the same values again (a node asked twice) are no conflict
    rec.log_text('parameters.yaml', 'old\n')
    rec.log_text('parameters.yaml', text)  # replaces it
    rec.finish()
    run = client.get_run(rec.run_id)
    assert run.data.params == {'world': 'doom', **params}
    assert (_artifact_dir(rec) / 'parameters.yaml').read_text() == text


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    assert resolve_tracking_uri('', cwd=tmp_path) == 'sqlite:///' + str(tmp_path / 'mlflow.db')
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'http://127.0.0.1:5000')
    assert resolve_tracking_uri('') == 'http://127.0.0.1:5000'
    assert resolve_tracking_uri('sqlite:////abs/x.db') == 'sqlite:////abs/x.db'


def test_side_by_side_panels():
    a = np.zeros((84, 84, 3), np.uint8)
    b = np.full((42, 42, 3), 255, np.uint8)
    picture = side_by_side([('camera t', a), ('predicted t+1', b)], height=168)
    assert picture.shape == (168 + 18, 168 + 4 + 168, 3)
    assert picture[100, 200].tolist() == [255, 255, 255]


def test_several_agents_keep_their_own_maps_episodes_and_rewards():
    tracks = [AgentTrack('agent_0', cell_size=10, window=2), AgentTrack('agent_1', cell_size=10, window=2)]
    assert tracks[1].key('world/cells_visited') == 'agent_1/world/cells_visited'
    assert tracks[1].start_episode(1) is None  # the latched current episode only starts the count
    for x in (0.0, 15.0, 25.0):
        tracks[1].visit(x, 0.0)
    tracks[0].visit(5.0, 5.0)
    assert [t.new_cells() for t in tracks] == [1, 3] and tracks[1].new_cells() is None
    assert tracks[1].start_episode(2) == 3 and tracks[1].start_episode(3) is None  # episode 2 saw none
    for value in (1.0, 2.0, 3.0):
        tracks[0].rewards.add(value)
    tracks[1].rewards.add(10.0)
    summary = tracks_summary(tracks)
    assert summary['cells_visited'] == 4 and summary['reward_count'] == 4
    assert summary['reward_mean_last_n'] == (2.0 + 3.0 + 10.0) / 3 and summary['reward_window'] == 3
    assert summary['agents']['agent_1'] == {'cells_visited': 3, 'reward_mean_last_n': 10.0,
                                            'reward_window': 1, 'reward_count': 1}
    assert tracks_status(tracks) == {
        'agent_0/cells_visited': 1, 'agent_0/episode': -1, 'agent_0/episode_cells': 1,
        'agent_1/cells_visited': 3, 'agent_1/episode': 3, 'agent_1/episode_cells': 0, 'cells_visited': 4}
    assert '4 cells visited (agent_0 1, agent_1 3)' in summary_line(summary)
    # One agent in the recorder's own namespace: today's keys, no `agents`.
    own = AgentTrack('', cell_size=10, window=2)
    assert set(tracks_status([own])) == {'cells_visited', 'episode', 'episode_cells'}
    assert tracks_summary([own]) == {'cells_visited': None, 'reward_mean_last_n': None,
                                     'reward_window': 0, 'reward_count': 0}


def test_nested_status_names_are_taken_only_as_known_nodes():
    known = ['agent_0/agent', 'agent_1/agent', 'vae_trainer']
    for namespace in ('/', '/ns'):
        head = namespace.rstrip('/')
        admission = NodeAdmission(namespace, f'{head}/recorder', known)
        assert admission.node_of(f'{head}/agent_1/agent') == 'agent_1/agent'
        assert admission.problem('agent_1/agent') is None
        assert admission.node_of(f'{head}/vae_trainer') == 'vae_trainer'
        assert admission.node_of(f'{head}/agent_7/agent') is None  # not this graph's
        assert admission.node_of(f'{head}/agent_1/agent/x') is None
        assert admission.node_of(f'{head}/recorder') is None
        assert admission.problem('stranger') is not None  # a plain name not of the graph
    assert NodeAdmission('/ns', '/ns/recorder', known).node_of('/agent_1/agent') is None
    # Told no nodes, the recorder takes no nested name at all.
    assert NodeAdmission('/', '/recorder').node_of('/agent_1/agent') is None
