"""Recording a launch's training in MLflow, without ROS.

One MLflow run per launch, written by one process (the `recorder` node), so
several processes never write one run and the agent never waits on the
tracking store. What is here:

- `resolve_tracking_uri`, `default_artifact_location`, `parse_params`,
  `parse_float`: the recorder's parameters and diagnostic values into MLflow
  terms; `node_params` and `parameters_file`: the nodes' own parameters as
  run params and as a ROS 2 parameters file.
- `RunRecorder`: opens (or creates) the experiment and the run, buffers
  metrics and writes them with one `log_batch` per flush (each single
  `log_metric` costs ~3 ms of store round trip), logs params, PNG, JSON and
  text artifacts
  and ends the run. Every store failure becomes a `RecordError` that says
  which URI failed and what to do.
- `BackgroundRecorder`: a `RunRecorder` on a thread of its own. The caller
  only appends to a buffer; opening the store, flushes every
  `flush_interval` seconds, artifacts and the final summary all happen on
  that thread.
- `ExplorationMap`: the grid cells a position visited (coverage of the
  world) and a picture of them with the trajectory.
- `RunStats`: latest diagnostic values and recent rewards -> the end-of-run
  summary (`summary_line` formats it for a log).
- `side_by_side`: camera frame | predicted next frame | actual next frame,
  as one labelled RGB picture.

mlflow is imported where a store is opened, so importing this module (for
the map, say) stays cheap.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DEFAULT_TRACKING_URI = 'sqlite:///mlflow.db'  # full mlflow's default store, in the working directory
# MLflow refuses a log_batch of more than 1000 metrics (and 100 params).
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length
_KEY_BAD_CHARS = re.compile(r'[^\w./\- ]')


class RecordError(RuntimeError):
    """The tracking store cannot be used; the message says which and what to do."""


# -- parameters ---------------------------------------------------------------
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


def parse_params(value: str | Sequence[str] | None) -> dict[str, str]:
    """Run params from 'k=v;k=v' or ['k=v', ...]; entries without '=' are refused."""
    if value is None:
        return {}
    items = value.split(';') if isinstance(value, str) else list(value)
    params: dict[str, str] = {}
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        key, sep, val = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f'run param {item!r} is not key=value (use "preset=small;world=doom")')
        params[key.strip()] = val.strip()
    return params


def param_text(value: Any) -> str:
    """A parameter value as a run param: strings as they are, the rest as
    JSON (true, 0.8, [1.0, 1.0]), the way a parameters file would spell them."""
    return value if isinstance(value, str) else json.dumps(value)


def node_params(node: str, parameters: Mapping[str, Any]) -> dict[str, str]:
    """One node's parameters as run params `<node>/<name>`, like its metrics."""
    return {f'{node}/{name}': param_text(value) for name, value in parameters.items()}


def parameters_file(nodes: Mapping[str, Mapping[str, Any]]) -> str:
    """A ROS 2 parameters file (YAML) holding each node's parameters, keyed by
    its fully qualified name (`ros2 param dump`'s layout): what the run ran
    with, to pass back as `params_file:=`."""
    import yaml

    return yaml.safe_dump({name: {'ros__parameters': dict(sorted(params.items()))}
                           for name, params in sorted(nodes.items())}, sort_keys=False)


def parse_float(value: str) -> float | None:
    """A diagnostic value as a finite float, or None (text, 'True', nan, inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


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


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


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
                        experiment, artifact_location=location or None)
                except Exception:  # another recorder created it meanwhile
                    experiment_obj = self.client.get_experiment_by_name(experiment)
                    if experiment_obj is None:
                        raise
                    self.experiment_id = experiment_obj.experiment_id
            else:
                self.experiment_id = experiment_obj.experiment_id
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
        text = json.dumps(_json_safe(obj), indent=2, sort_keys=True)
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


# -- exploration --------------------------------------------------------------
class ExplorationMap:
    """Grid cells of `cell_size` map units that a position has visited.

    Cell (i, j) holds x in [i*cell_size, (i+1)*cell_size), likewise y, so
    negative coordinates fall into negative cells. The trajectory keeps
    points at least a quarter cell apart, and halves itself (every other
    point) past `max_points`, so memory stays bounded on a run of days.
    """

    def __init__(self, cell_size: float = 64.0, max_points: int = 20_000) -> None:
        if not cell_size > 0:
            raise ValueError(f'cell_size must be > 0, got {cell_size}')
        self.cell_size = float(cell_size)
        self.visits: dict[tuple[int, int], int] = {}
        self.trajectory: list[tuple[float, float]] = []
        self.max_points = max_points
        self._min_move = self.cell_size / 4.0

    def cell(self, x: float, y: float) -> tuple[int, int]:
        return math.floor(x / self.cell_size), math.floor(y / self.cell_size)

    def visit(self, x: float, y: float) -> bool:
        """Count one visit; True if the cell is new. Non-finite positions are ignored."""
        if not (math.isfinite(x) and math.isfinite(y)):
            return False
        cell = self.cell(x, y)
        new = cell not in self.visits
        self.visits[cell] = self.visits.get(cell, 0) + 1
        if not self.trajectory or math.dist(self.trajectory[-1], (x, y)) >= self._min_move:
            self.trajectory.append((float(x), float(y)))
            if len(self.trajectory) > self.max_points:
                self.trajectory = self.trajectory[::2] + ([] if len(self.trajectory) % 2 else
                                                          [self.trajectory[-1]])
        return new

    @property
    def cells_visited(self) -> int:
        return len(self.visits)

    def to_json(self) -> dict[str, Any]:
        return {'cell_size': self.cell_size, 'cells_visited': self.cells_visited,
                'cells': [[i, j, n] for (i, j), n in sorted(self.visits.items())]}

    def render(self, max_size: int = 512) -> np.ndarray:
        """An RGB uint8 picture: visited cells shaded by visit count, the trajectory on top.

        +x to the right, +y up (map convention); one empty cell of margin
        around the visited ones; start in green, last position in red.
        """
        if not self.visits:
            return np.full((64, 64, 3), 32, np.uint8)
        cells = np.array(list(self.visits), dtype=np.int64)
        lo = cells.min(axis=0) - 1
        hi = cells.max(axis=0) + 1
        nx, ny = (hi - lo + 1).tolist()
        px = int(max(2, min(32, max_size // max(nx, ny))))
        image = np.full((ny * px, nx * px, 3), 32, np.uint8)
        counts = np.array(list(self.visits.values()), dtype=np.float64)
        shade = np.log1p(counts) / math.log1p(counts.max()) if counts.max() > 0 else counts
        # Viridis from a third of the way up: one visit still stands out from the background.
        lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_VIRIDIS)
        colors = lut[(80 + 175 * shade).astype(np.int64), 0, ::-1]  # BGR -> RGB
        for (i, j), color in zip(self.visits, colors, strict=True):
            col, row = i - lo[0], hi[1] - j  # y up: the highest cell row is image row 0
            image[row * px:(row + 1) * px, col * px:(col + 1) * px] = color
        if px >= 4:  # grid lines where cells are big enough to see them
            image[::px, :] //= 2
            image[:, ::px] //= 2

        def to_pixel(x: float, y: float) -> tuple[int, int]:
            u = (x / self.cell_size - lo[0]) * px
            v = (hi[1] + 1 - y / self.cell_size) * px
            return int(round(u)), int(round(v))

        points = np.array([to_pixel(x, y) for x, y in self.trajectory], dtype=np.int32)
        if len(points) > 1:
            # Half transparent: where cells are a few pixels the path would hide them.
            path = image.copy()
            cv2.polylines(path, [points.reshape(-1, 1, 2)], False, (235, 235, 235), 1, cv2.LINE_AA)
            image = cv2.addWeighted(image, 0.5, path, 0.5, 0.0)
        radius = max(2, px // 5)
        cv2.circle(image, tuple(points[0].tolist()), radius, (40, 200, 40), -1)
        cv2.circle(image, tuple(points[-1].tolist()), radius, (230, 40, 40), -1)
        return image


# -- images -------------------------------------------------------------------
def side_by_side(panels: Sequence[tuple[str, np.ndarray]], height: int = 252) -> np.ndarray:
    """Labelled RGB panels in one row, each scaled to `height` (nearest: pixels stay visible)."""
    if not panels:
        raise ValueError('no panels')
    label_h = 18
    tiles = []
    for label, rgb in panels:
        width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
        tile = np.full((height + label_h, width, 3), 16, np.uint8)
        tile[label_h:] = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_NEAREST)
        cv2.putText(tile, label, (4, label_h - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1,
                    cv2.LINE_AA)
        tiles.append(tile)
        tiles.append(np.full((height + label_h, 4, 3), 0, np.uint8))  # a thin gap
    return np.concatenate(tiles[:-1], axis=1)


# -- the summary --------------------------------------------------------------
class RunStats:
    """What the end-of-run summary needs: the latest diagnostic values and recent rewards.

    A node counts as a trainer when its diagnostics report `rounds`; every
    key containing 'loss' is a final loss.
    """

    def __init__(self, window: int = 100, step_node: str = 'agent') -> None:
        self.latest: dict[str, dict[str, float]] = {}
        self.rewards: deque[float] = deque(maxlen=max(1, window))
        self.reward_count = 0
        self.step_node = step_node
        self.started = time.time()

    def update(self, node: str, values: Mapping[str, float]) -> None:
        self.latest.setdefault(node, {}).update(values)

    def add_reward(self, value: float) -> None:
        if math.isfinite(value):
            self.rewards.append(float(value))
            self.reward_count += 1

    @property
    def steps(self) -> int | None:
        steps = self.latest.get(self.step_node, {}).get('steps')
        return None if steps is None else int(steps)

    def summary(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        rounds = {node: int(v['rounds']) for node, v in sorted(self.latest.items()) if 'rounds' in v}
        losses = {f'{node}/{key}': value for node, values in sorted(self.latest.items())
                  for key, value in sorted(values.items()) if 'loss' in key}
        mean = sum(self.rewards) / len(self.rewards) if self.rewards else None
        return {
            'steps': self.steps,
            'duration_s': round(time.time() - self.started, 3),
            'rounds': rounds,
            'losses': losses,
            'reward_mean_last_n': mean,
            'reward_window': len(self.rewards),
            'reward_count': self.reward_count,
            **dict(extra or {}),
        }


def summary_line(summary: Mapping[str, Any]) -> str:
    """One log line: steps, rounds per trainer, final losses, cells, recent reward."""
    def fmt(value: Any) -> str:
        return f'{value:.4g}' if isinstance(value, float) else str(value)

    steps = summary.get('steps')
    parts = [f'{steps} agent steps' if steps is not None else 'no agent steps heard']
    parts[0] += f' in {summary.get("duration_s", 0):.0f} s'
    rounds = summary.get('rounds') or {}
    parts.append('rounds ' + (', '.join(f'{k} {v}' for k, v in rounds.items()) if rounds else 'none'))
    losses = summary.get('losses') or {}
    if losses:
        parts.append('losses ' + ', '.join(f'{k} {fmt(v)}' for k, v in losses.items()))
    if summary.get('cells_visited') is not None:
        parts.append(f'{summary["cells_visited"]} cells visited')
    if summary.get('reward_mean_last_n') is not None:
        parts.append(f'reward mean {fmt(summary["reward_mean_last_n"])} over the last '
                     f'{summary.get("reward_window")} steps')
    return '; '.join(parts)


def iter_numeric(values: Iterable[tuple[str, str]]) -> dict[str, float]:
    """The (key, text) pairs whose text is a finite float, as {key: float}."""
    out: dict[str, float] = {}
    for key, text in values:
        number = parse_float(text)
        if number is not None:
            out[key] = number
    return out
