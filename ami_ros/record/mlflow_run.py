"""One MLflow run per launch, written without ROS.

One process (the `recorder` node) writes the run, so several processes never
write one run and the agent never waits on the tracking store.

- `resolve_tracking_uri`, `default_artifact_location`: where the run goes.
- `RunRecorder`: opens (or creates) the experiment, marked as model training
  so MLflow's UI shows it there, and the run; buffers metrics and writes them
  with one `log_batch` per flush (each single `log_metric` costs ~3 ms of
  store round trip); logs params, PNG, JSON and text artifacts and ends the
  run. Every store failure becomes a `RecordError` that says which URI
  failed and what to do.
- `BackgroundRecorder`: a `RunRecorder` on a thread of its own. The caller
  only appends to a buffer; opening the store, flushes every
  `flush_interval` seconds, artifacts and the final summary all happen on
  that thread.
- `run_page_url`: where a browser shows the run in the model-training view.
- `parse_float`, `iter_numeric`: diagnostic values as metric values.

mlflow is imported where a store is opened, so importing this module stays
cheap.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ami_ros.core.json_values import plain_json

DEFAULT_TRACKING_URI = 'sqlite:///mlflow.db'  # full mlflow's default store, in the working directory
DEFAULT_UI_URL = 'http://127.0.0.1:5000'  # where `mlflow ui` serves by default
# MLflow refuses a log_batch of more than 1000 metrics (and 100 params).
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
_KEY_BAD_CHARS = re.compile(r'[^\w./\- ]')
# MLflow 3's UI splits experiments into GenAI and model training. A run with
# no logged model counts as a GenAI "evaluation" unless the experiment's kind
# tag says model training (the UIs that read the tag) or the page is opened
# with workflowType=machine_learning (3.9 and later, whose sidebar switch
# otherwise defaults to GenAI).
EXPERIMENT_KIND_TAG = 'mlflow.experimentKind'
MODEL_TRAINING_KIND = 'custom_model_development'
MODEL_TRAINING_WORKFLOW = 'machine_learning'


class RecordError(RuntimeError):
    """The tracking store cannot be used; the message says which and what to do."""


# -- where the run goes -------------------------------------------------------
def resolve_tracking_uri(uri: str = '', env: Mapping[str, str] | None = None,
                         cwd: str | Path | None = None) -> str:
    """The store to write to: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.

    A relative sqlite path is made absolute against `cwd`, so the URI that is
    logged ("open with: mlflow ui --backend-store-uri ...") works from any
    directory.
    """
    env = os.environ if env is None else env
    uri = (uri or env.get('MLFLOW_TRACKING_URI', '') or DEFAULT_TRACKING_URI).strip()
    prefix = 'sqlite:///'
    if uri.startswith(prefix) and not uri.startswith(prefix + '/') and uri != prefix + ':memory:':
        path = Path(cwd or os.getcwd()) / uri[len(prefix):]
        uri = prefix + str(path.resolve())
    return uri


def default_artifact_location(tracking_uri: str, experiment: str) -> str:
    """Artifacts of a new experiment next to a sqlite store: <db dir>/mlruns/<experiment>.

    MLflow's own default is ./mlruns in the working directory, which would
    put a run stored elsewhere (a test's tmp dir, ~/ami_runs) into whatever
    directory the graph was started from. '' (MLflow decides) for servers.
    """
    prefix = 'sqlite:///'
    if not tracking_uri.startswith(prefix) or tracking_uri == prefix + ':memory:':
        return ''
    db = Path(tracking_uri[len(prefix):])
    return (db.resolve().parent / 'mlruns' / metric_key(experiment).replace('/', '_')).as_uri()


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str, ui_url: str = DEFAULT_UI_URL) -> str:
    """The run's page in the model-training view: on the tracking server itself
    for an http(s) store, else on `ui_url` (where `mlflow ui` serves)."""
    base = tracking_uri if tracking_uri.startswith(('http://', 'https://')) else ui_url
    return (f'{base.rstrip("/")}/#/experiments/{experiment_id}/runs/{run_id}'
            f'?workflowType={MODEL_TRAINING_WORKFLOW}')


# -- metrics ------------------------------------------------------------------
def parse_float(value: str) -> float | None:
    """A diagnostic value as a finite float, or None (text, 'True', nan, inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def iter_numeric(values: Iterable[tuple[str, str]]) -> dict[str, float]:
    """The (key, text) pairs whose text is a finite float, as {key: float}."""
    out: dict[str, float] = {}
    for key, text in values:
        number = parse_float(text)
        if number is not None:
            out[key] = number
    return out


def metric_key(key: str) -> str:
    """`key` with the characters MLflow refuses in metric names replaced by '_'."""
    return _KEY_BAD_CHARS.sub('_', key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0] if text else ""}'.rstrip(': ')


def store_error(uri: str, exc: BaseException) -> RecordError:
    return RecordError(
        f'cannot record to MLflow at {uri}: {_first_line(exc)}. Set the recorder\'s tracking_uri '
        f'parameter (or MLFLOW_TRACKING_URI) to a writable store, e.g. sqlite:///mlflow.db or '
        f'the http://host:port of a running `mlflow server`')


# -- the run ------------------------------------------------------------------
class RunRecorder:
    """One MLflow run: buffered metrics, artifacts, a final status.

    `add_metric` only appends to a buffer (thread-safe); `flush` writes the
    buffer with as few `log_batch` calls as MLflow's batch limit allows.
    Every store failure raises `RecordError`.
    """

    def __init__(self, tracking_uri: str, experiment: str = 'ami_ros', run_name: str = '',
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                 artifact_location: str = '') -> None:
        self.tracking_uri = tracking_uri
        self._buffer: list[tuple[str, float, int, int]] = []
        self._lock = threading.Lock()
        self.metrics_logged = 0
        self.artifacts_logged = 0
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)
            experiment_obj = self.client.get_experiment_by_name(experiment)
            if experiment_obj is None:
                try:
                    location = artifact_location or default_artifact_location(tracking_uri, experiment)
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=location or None,
                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
                except Exception:  # another recorder created it meanwhile
                    experiment_obj = self.client.get_experiment_by_name(experiment)
                    if experiment_obj is None:
                        raise
            if experiment_obj is not None:
                self.experiment_id = experiment_obj.experiment_id
                # One made before this tag was set, or by hand: without it the UI asks, or guesses GenAI.
                if experiment_obj.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG,
                                                   MODEL_TRAINING_KIND)
            run_name = run_name or time.strftime('%Y-%m-%d_%H-%M-%S')
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id: str = run.info.run_id
            self.run_name: str = run.info.run_name
            self.artifact_uri: str = run.info.artifact_uri
            self.log_params(params or {})
        except RecordError:
            raise
        except Exception as exc:
            raise store_error(tracking_uri, exc) from exc

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Run params (values as text, cut to MLflow's limit). MLflow keeps a
        param once: logging it again with another value raises."""
        from mlflow.entities import Param

        items = [Param(metric_key(str(k)), str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_BATCH_PARAMS])

    # -- metrics --------------------------------------------------------------
    def add_metric(self, key: str, value: float, step: int, timestamp: float | None = None) -> None:
        """Buffer one value; `timestamp` in seconds since the epoch (now if None)."""
        stamp_ms = int((time.time() if timestamp is None else timestamp) * 1000)
        with self._lock:
            self._buffer.append((metric_key(key), float(value), int(step), stamp_ms))

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def flush(self) -> int:
        """Write every buffered metric; the number written.

        On a store failure the unwritten metrics stay buffered for the next
        flush and `RecordError` is raised.
        """
        from mlflow.entities import Metric

        with self._lock:
            batch, self._buffer = self._buffer, []
        written = 0
        try:
            for i in range(0, len(batch), MAX_BATCH_METRICS):
                chunk = batch[i:i + MAX_BATCH_METRICS]
                self.client.log_batch(self.run_id, metrics=[
                    Metric(key, value, stamp, step) for key, value, step, stamp in chunk])
                written += len(chunk)
        except Exception as exc:
            with self._lock:
                self._buffer[:0] = batch[written:]
            raise store_error(self.tracking_uri, exc) from exc
        finally:
            self.metrics_logged += written
        return written

    # -- artifacts ------------------------------------------------------------
    def _log_file(self, name: str, write: Callable[[Path], None]) -> None:
        """Write artifact `name` ('dir/file.ext') through a temporary file."""
        artifact_dir, _, filename = name.rpartition('/')
        try:
            with tempfile.TemporaryDirectory(prefix='ami_ros_artifact_') as tmp:
                path = Path(tmp) / filename
                write(path)
                self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_dir or None)
        except RecordError:
            raise
        except Exception as exc:
            raise store_error(self.tracking_uri, exc) from exc
        self.artifacts_logged += 1

    def log_image(self, name: str, rgb: np.ndarray) -> None:
        """An HxWx3 uint8 RGB array as PNG artifact `name` (e.g. 'frames/step_1.png')."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f'expected HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}')

        def write(path: Path) -> None:
            if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):  # cv2 wants BGR
                raise RecordError(f'cannot encode {name} as PNG')

        self._log_file(name, write)

    def log_json(self, name: str, obj: Any) -> None:
        """`obj` as JSON artifact `name` (non-finite floats become null)."""
        text = json.dumps(plain_json(obj, name, non_finite='null'), indent=2, sort_keys=True)
        self._log_file(name, lambda path: path.write_text(text + '\n'))

    def log_text(self, name: str, text: str) -> None:
        """`text` as artifact `name`; a later call with the same name replaces it."""
        self._log_file(name, lambda path: path.write_text(text))

    def finish(self, summary: Mapping[str, Any] | None = None, status: str = 'FINISHED') -> None:
        """Flush, write `summary.json` (if given) and end the run with `status`."""
        self.flush()
        if summary is not None:
            self.log_json('summary.json', summary)
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            raise store_error(self.tracking_uri, exc) from exc


class BackgroundRecorder:
    """A `RunRecorder` opened and driven by a thread of its own.

    The producer calls `add_metric` and `submit` (cheap, never blocking on
    the store); the thread opens the run, flushes every `flush_interval`
    seconds and runs submitted artifact jobs. `close` hands the final job to
    the thread, which flushes, runs it, ends the run, and returns.
    A store that cannot be opened is reported once through `on_error`, and
    everything after is dropped: the caller keeps running without a record.
    """

    def __init__(self, open_run: Callable[[], RunRecorder], flush_interval: float = 5.0,
                 on_open: Callable[[RunRecorder], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 max_pending: int = 200_000) -> None:
        self._open_run = open_run
        self.flush_interval = flush_interval
        self._on_open = on_open or (lambda rec: None)
        self._on_error = on_error or (lambda text: None)
        self.max_pending = max_pending
        self.recorder: RunRecorder | None = None
        self.error: str | None = None
        self.dropped = 0
        self._metrics: list[tuple[str, float, int, float]] = []
        self._jobs: deque[Callable[[RunRecorder], None]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._final: Callable[[RunRecorder], None] | None = None
        self._closing = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name='mlflow_writer', daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        return self.error is not None and self.recorder is None

    @property
    def pending(self) -> int:
        return len(self._metrics) + (self.recorder.pending if self.recorder else 0)

    @property
    def metrics_logged(self) -> int:
        return self.recorder.metrics_logged if self.recorder else 0

    def add_metric(self, key: str, value: float, step: int, timestamp: float | None = None) -> None:
        if self.failed or self._closing:
            return
        with self._lock:
            if len(self._metrics) >= self.max_pending:  # a store that stopped answering: bound memory
                drop = len(self._metrics) // 10 + 1
                del self._metrics[:drop]
                self.dropped += drop
            self._metrics.append((key, value, step, time.time() if timestamp is None else timestamp))

    def submit(self, job: Callable[[RunRecorder], None]) -> None:
        """Run `job(recorder)` on the writer thread (artifacts); dropped if recording failed."""
        if not self.failed and not self._closing:
            self._jobs.append(job)
            self._wake.set()

    def close(self, final: Callable[[RunRecorder], None] | None = None, timeout: float = 8.0) -> bool:
        """Flush, run `final(recorder)`, end the run; False if that did not finish in time."""
        self._final = final
        self._closing = True
        self._wake.set()
        return self._done.wait(timeout)

    # -- the writer thread ----------------------------------------------------
    def _report(self, text: str) -> None:
        self.error = text
        self._on_error(text)

    def _drain(self, rec: RunRecorder) -> None:
        with self._lock:
            metrics, self._metrics = self._metrics, []
        for key, value, step, stamp in metrics:
            rec.add_metric(key, value, step, stamp)
        while self._jobs:
            job = self._jobs.popleft()
            try:
                job(rec)
            except Exception as exc:  # one bad artifact must not end the recording
                self._on_error(f'MLflow artifact failed: {exc}')
        rec.flush()

    def _run(self) -> None:
        try:
            try:
                rec = self._open_run()
            except Exception as exc:
                self._report(str(exc))
                return
            self.recorder = rec
            self._on_open(rec)
            failing = False
            while not self._closing:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                if self._closing:
                    break
                try:
                    self._drain(rec)
                    if failing:
                        self._on_error(f'MLflow store {rec.tracking_uri} answers again')
                    failing = False
                except Exception as exc:  # RecordError, or a bug: the writer must live on
                    if not failing:  # once per outage, not once per flush
                        self._on_error(f'{exc}; keeping metrics to retry')
                    failing = True
            try:
                self._drain(rec)
                if self._final is not None:
                    self._final(rec)
                rec.finish(None)
            except Exception as exc:
                self._report(f'could not end MLflow run {rec.run_id}: {exc}')
        finally:
            self._done.set()
