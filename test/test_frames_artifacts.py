"""The frames/ pictures of a run, read back from MLflow: the real agent predicts, the real recorder logs.

Each frames/step_<step>.png is camera t | predicted t+1 | camera t+1, each
84x84 image scaled three times (nearest) under an 18-pixel label, with
4-pixel gaps between the panels.
"""

import re
import signal
import time

import cv2
import numpy as np
from ros_harness import FrameFeeder, NodeStatus, wait_for

SCALE, LABEL, GAP = 3, 18, 4
PANEL = 84 * SCALE


def _panels(picture):
    """The three 84x84 RGB images of a picture, scaled back down."""
    return [picture[LABEL::SCALE, i * (PANEL + GAP):i * (PANEL + GAP) + PANEL:SCALE] for i in range(3)]


def _sent_index(frames, image):
    """The index of the frame sent with exactly these pixels, or None."""
    return next((i for i, sent in enumerate(list(frames)) if np.array_equal(sent, image)), None)


def test_frame_samples_are_logged_into_the_run(launch, test_node, tmp_path):
    from mlflow import MlflowClient

    uri = f'sqlite:///{tmp_path}/mlflow.db'
    launch('agent', parameters={'preset': 'cpu'})
    recorder = launch('recorder', parameters={
        'tracking_uri': uri, 'experiment': 'frames', 'artifact_location': (tmp_path / 'artifacts').as_uri(),
        'image_interval': 1.0, 'flush_interval': 0.5})
    health = NodeStatus(test_node)
    frames = FrameFeeder(test_node, keep_frames=True)
    try:
        wait_for(lambda: health.number('recorder', 'images_logged') >= 3, 60,
                 message=lambda: f"three frame samples logged: {health.status.get('recorder')}")
    finally:
        frames.close()
    time.sleep(2.0)  # the agent's diagnostics (every second) now count its last step
    steps = health.number('agent', 'steps')
    assert recorder.stop(signal.SIGINT) == 0, recorder.output()

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name('frames').experiment_id])
    assert len(runs) == 1 and runs[0].info.status == 'FINISHED'
    run_id = runs[0].info.run_id
    logged = [a.path for a in client.list_artifacts(run_id, 'frames')]
    assert len(logged) >= 3, logged
    full = 0
    for path in logged:
        match = re.fullmatch(r'frames/step_(\d{8})\.png', path)
        assert match, path
        assert 1 <= int(match.group(1)) <= steps, (path, steps)  # named by the agent's step
        picture = cv2.cvtColor(cv2.imread(client.download_artifacts(run_id, path, str(tmp_path))),
                               cv2.COLOR_BGR2RGB)
        assert picture.shape[0] == LABEL + PANEL, picture.shape
        if picture.shape[1] != 3 * PANEL + 2 * GAP:  # a frame lost on the way: fewer panels
            assert picture.shape[1] in (PANEL, 2 * PANEL + GAP), picture.shape
            continue
        full += 1
        assert not picture[:, PANEL:PANEL + GAP].any()  # the gaps are black
        assert picture[:LABEL].max() > 100  # a label is written above the panels
        before, predicted, after = _panels(picture)
        # The camera panels are frames the test sent, in their colours, the
        # second one sent after the first; the prediction is the agent's own.
        first, second = _sent_index(frames.frames, before), _sent_index(frames.frames, after)
        assert first is not None and second is not None, path
        assert first < second <= first + 5, (first, second)
        assert not np.array_equal(predicted, before) and not np.array_equal(predicted, after)
        assert _sent_index(frames.frames, predicted) is None
    assert full >= 1, logged
