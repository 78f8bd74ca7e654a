"""camera: publishes frames of a video source (the OBS virtual camera by default).

A little over 400 lines: the capture thread (open with back-off, read, pace)
is this node's own job and is not shared, so it stays beside the node.

Publishes:
  camera/image_raw   sensor_msgs/Image, rgb8, width x height (default 84x84),
                     header.stamp = capture time (node clock), at `fps`
  /diagnostics       (1 Hz) frames per second and the rate asked for, frames,
                     the source and its failed opens/reads; a warning while
                     the source gives no frames

Parameters:
  source     '' = the V4L2 device named "OBS Virtual Camera" (found by its
             name under /sys/class/video4linux, not by a fixed index);
             '2' = /dev/video2; '/dev/video2'; a video file; a stream URL
             (rtsp://, http://, ...)
  width, height   size of the published image, 8..4096 (default 84x84); the
             source is centre-cropped to this aspect, then resized
  fps        publish rate, 0.1..120 (default 10.0)
  frame_id   header.frame_id (default 'camera')
  loop       restart a video file at its end (default true)
  autostart  configure and activate without the manager (default true)

A source that cannot be opened is reported in one error line (the source, the
V4L2 devices that exist, what to do), then retried with back-off (1 s
doubling to 30 s). A source that stops delivering frames is reopened the same
way, and publishing resumes when it is back. Deactivating (pause) stops
reading and publishing; a live source is let go until activation.

Capture runs in its own thread: opening a stream or reading a device that has
gone quiet can block for seconds, and the executor must stay free to answer
lifecycle requests. The thread paces itself to `fps` against the monotonic
clock (it is the node's frame timer): a file is read one frame per period; a
live source is read continuously, so the frame published each period is the
newest one rather than one that waited in the driver's queue.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.time import Time
from sensor_msgs.msg import Image

from ami_ros.core.observation import center_crop_resize
from ami_ros.core.timing import RateMeter
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.images import rgb_to_image
from ami_ros.ros.managed_node import ManagedNode, run

OBS_LABEL = 'OBS Virtual Camera'
V4L2_ROOT = '/sys/class/video4linux'
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
# Streams: bound how long opening or reading may block, so a dead server is
# noticed and retried rather than waited on forever.
STREAM_TIMEOUT_MS = 10000


class SourceError(Exception):
    """A source that cannot be opened now, with the reason in words."""


@dataclass(frozen=True)
class Source:
    """What the `source` parameter names: kind is obs | device | file | stream."""

    kind: str
    target: str | int  # device index, file path or URL; '' for obs
    label: str

    @property
    def live(self) -> bool:
        return self.kind != 'file'


def parse_source(spec: str) -> Source:
    """Interpret the `source` parameter (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        return Source('obs', '', f'the V4L2 device named {OBS_LABEL!r}')
    if spec.isdigit():
        return Source('device', int(spec), f'/dev/video{int(spec)}')
    if spec.startswith('/dev/'):
        return Source('device', spec, spec)
    if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', spec):
        return Source('stream', spec, spec)
    return Source('file', os.path.expanduser(spec), spec)


def v4l2_devices(root: str = V4L2_ROOT) -> list[tuple[str, str]]:
    """(device path, name) of every V4L2 device, in device-number order."""
    found = []
    for entry in glob.glob(os.path.join(root, 'video*')):
        number = entry.rsplit('video', 1)[1]
        try:
            with open(os.path.join(entry, 'name')) as f:
                name = f.read().strip()
        except OSError:
            name = '?'
        found.append((int(number) if number.isdigit() else 1 << 30,
                      f'/dev/{os.path.basename(entry)}', name))
    return [(path, name) for _, path, name in sorted(found)]


def describe_devices(devices: Sequence[tuple[str, str]]) -> str:
    return ', '.join(f'{path} ({name!r})' for path, name in devices) or 'none'


def _device_index(path: str) -> int:
    # OpenCV's V4L2 backend opens by index only; /dev/v4l/by-id links and
    # the like resolve to /dev/videoN.
    match = re.fullmatch(r'/dev/video(\d+)', os.path.realpath(path))
    if not match:
        raise SourceError(f'{path} is not a V4L2 video device (/dev/videoN)')
    return int(match.group(1))


def _v4l2_index(source: Source) -> int:
    """The /dev/videoN number of a device or OBS source, or SourceError."""
    if source.kind == 'obs':
        matches = [path for path, name in v4l2_devices() if OBS_LABEL.lower() in name.lower()]
        if not matches:
            raise SourceError(f'no V4L2 device is named {OBS_LABEL!r}')
        return _device_index(matches[0])
    path = source.target if isinstance(source.target, str) else f'/dev/video{source.target}'
    if not os.path.exists(path):
        raise SourceError('no such device')
    return _device_index(path)


def open_source(source: Source) -> cv2.VideoCapture:
    """An opened capture for `source`, or SourceError saying why not."""
    if source.kind in ('obs', 'device'):
        cap = cv2.VideoCapture(_v4l2_index(source), cv2.CAP_V4L2)
        # v4l2loopback (exclusive_caps=1) offers no capture until OBS writes to it.
        hint = ('is the OBS virtual camera started?' if source.kind == 'obs' else
                'busy, or not a capture device?')
    elif source.kind == 'stream':
        cap = cv2.VideoCapture(source.target, cv2.CAP_FFMPEG, [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
        hint = 'unreachable, or not a stream OpenCV can decode?'
    else:
        path = str(source.target)
        if not os.path.isfile(path):
            raise SourceError(f'no such file (looked for {os.path.abspath(path)})')
        cap = cv2.VideoCapture(path)
        hint = 'not a video OpenCV can decode?'
    if not cap.isOpened():
        cap.release()
        raise SourceError(f'OpenCV could not open it ({hint})')
    return cap


def frame_to_rgb(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """An OpenCV frame (BGR, BGRA or grey) -> height x width x 3 RGB, centre-cropped."""
    small = center_crop_resize(frame, height, width)  # fewer pixels to convert after
    if small.ndim == 2 or small.shape[2] == 1:
        return cv2.cvtColor(small, cv2.COLOR_GRAY2RGB)
    if small.shape[2] == 4:
        return cv2.cvtColor(small, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


class Grabber(threading.Thread):
    """Owns the capture: opens it with back-off, reads, paces and hands frames on."""

    def __init__(self, node: ManagedNode, source: Source, width: int, height: int, fps: float,
                 loop: bool, deliver: Callable[[Time, np.ndarray], None]) -> None:
        super().__init__(name='camera-grabber', daemon=True)
        self.node, self.source, self.loop, self.deliver = node, source, loop, deliver
        self.width, self.height, self.period = width, height, 1.0 / fps
        self.log = node.get_logger()
        self._cond = threading.Condition()
        self._enabled = False
        self._stopping = False
        self.failures = 0  # failed opens and reads (an outage counts each retry)
        self.problem: str | None = None  # why no frames come now; None while they do
        self.cap: cv2.VideoCapture | None = None

    # -- control (any thread) ---------------------------------------------
    def enable(self, on: bool) -> None:
        with self._cond:
            self._enabled = on
            self._cond.notify_all()

    def stop(self, timeout: float = 3.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.is_alive() and threading.current_thread() is not self:
            # A read stuck on a dead device may outlast this; the thread is a
            # daemon and releases the capture itself when the read returns.
            self.join(timeout)

    def _wait(self, timeout: float | None, until: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or until(), timeout)

    def _release(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    # -- the capture loop (this thread only) --------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug must not pass silently in a thread
            self.log.error(f'camera capture stopped on an unexpected error: {exc!r}; '
                           'restart the node')
        finally:
            self._release()

    def _loop(self) -> None:
        delay = FIRST_RETRY_S
        reported = False  # the full error line was given for this outage
        lost = False  # the source was open before this outage
        ended = False  # a file reached its end with loop:=false
        due = time.monotonic()
        frames_since_open = 0
        rewinding = False  # reopening a file at its end: not news, no log line
        while True:
            self._wait(None, lambda: self._enabled)
            if self._stopping:
                return
            if ended:  # nothing more to read until a cleanup/configure
                self._wait(None, lambda: not self._enabled)
                continue
            if self.cap is None:
                try:
                    self.cap = open_source(self.source)
                except SourceError as exc:
                    self.failures += 1
                    self.problem = f'cannot open {self.source.label}: {exc}'
                    self._report_unavailable(str(exc), delay, reported)
                    reported = True
                    self._wait(delay, lambda: False)
                    delay = min(2 * delay, MAX_RETRY_S)
                    continue
                if lost or reported:
                    self.log.info(f'camera source {self.source.label} is back; publishing again')
                elif not rewinding:
                    self.log.info(self._opened_line())
                if not rewinding:
                    due = time.monotonic()
                reported, lost, rewinding, frames_since_open = False, False, False, 0
            if not self.source.live:
                # A file: one frame per period, read when it is due.
                self._wait(max(0.0, due - time.monotonic()), lambda: not self._enabled)
                if not self._enabled or self._stopping:
                    continue
            ok, frame = self.cap.read()
            now = time.monotonic()
            if not self._enabled:
                if self.source.live:
                    self._release()  # let the device go while paused; reopened on activate
                continue
            if not ok or frame is None or frame.size == 0:
                self._release()
                if not self.source.live and frames_since_open > 0:
                    if self.loop:
                        # Reopening rewinds every container and codec alike
                        # (seeking to frame 0 does not), and costs milliseconds.
                        rewinding = True
                        continue
                    self.log.info(f'video file {self.source.label} ended; loop is false, so no more '
                                  'frames (set loop:=true to repeat it)')
                    ended = True
                    continue
                what = {'file': 'has no frames OpenCV can decode',
                        'stream': 'stopped delivering frames (the stream ended or its server went away?)'
                        }.get(self.source.kind,
                              'stopped delivering frames (unplugged, or the OBS virtual camera stopped?)')
                self.log.warning(f'camera source {self.source.label} {what}; reopening in '
                                 f'{delay:g} s, doubling to {MAX_RETRY_S:g} s')
                self.failures += 1
                self.problem = f'{self.source.label} {what}'
                lost = True
                self._wait(delay, lambda: False)
                delay = min(2 * delay, MAX_RETRY_S)
                continue
            frames_since_open += 1
            self.problem = None
            # The back-off starts over only once frames flow: a source that
            # opens but fails every read is retried ever more slowly.
            delay = FIRST_RETRY_S
            # A live source faster than fps: skip frames until the next one is
            # due. Half a period early counts as on time, or a source running
            # at exactly fps, with jitter, would lose every other frame.
            if now < due - self.period / 2:
                continue
            stamp = self.node.get_clock().now()
            self.deliver(stamp, frame_to_rgb(frame, self.width, self.height))
            due = max(due + self.period, now)  # after a stall, no burst to catch up

    def _report_unavailable(self, reason: str, delay: float, reported: bool) -> None:
        if reported:
            self.log.warning(f'camera source {self.source.label} still unavailable ({reason}); '
                             f'next try in {delay:g} s')
            return
        todo = {'file': 'Check the path',
                'stream': 'Check the URL and that the stream is up'}.get(
                    self.source.kind, 'Start the OBS virtual camera (OBS: Start Virtual Camera)')
        self.log.error(
            f'cannot open camera source {self.source.label}: {reason}. V4L2 devices here: '
            f'{describe_devices(v4l2_devices())}. {todo}, or set source:=<index | /dev/videoN | '
            f'video file | URL>. Retrying in {delay:g} s, doubling to {MAX_RETRY_S:g} s.')

    def _opened_line(self) -> str:
        w = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        src_fps = self.cap.get(cv2.CAP_PROP_FPS)
        return (f'opened camera source {self.source.label} ({w}x{h}, {src_fps:g} fps); publishing '
                f'camera/image_raw {self.width}x{self.height} rgb8 at {1 / self.period:g} Hz')


class Camera(ManagedNode):
    """Publishes camera/image_raw from an OpenCV video source."""

    def __init__(self) -> None:
        super().__init__('camera')
        self.source_spec: str = self.declare(
            'source', '', "'' = the V4L2 device named 'OBS Virtual Camera'; or a device index, "
            'a /dev/videoN path, a video file, or a stream URL (rtsp://, http://).')
        self.width: int = self.declare('width', 84, 'Width of the published image (pixels).',
                                       low=8, high=4096)
        self.height: int = self.declare('height', 84, 'Height of the published image (pixels).',
                                        low=8, high=4096)
        self.fps: float = self.declare('fps', 10.0, 'Frames published per second.', low=0.1, high=120.0)
        self.frame_id: str = self.declare('frame_id', 'camera', 'header.frame_id of the images.')
        self.loop: bool = self.declare('loop', True, 'Restart a video file when it ends.')
        # The node logs each failure in one line; OpenCV's own warnings for
        # the same failure would only add noise.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        # FFmpeg logs through OpenCV at its own level, read when it first
        # opens something: keep only its fatal errors (AV_LOG_FATAL = 8).
        os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '8')
        cv2.setNumThreads(1)  # an 84x84 resize needs no thread pool; the cores are shared
        self.publisher = None
        self.grabber: Grabber | None = None
        self.rate = RateMeter()
        self.frames = 0
        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        source = parse_source(self.source_spec)
        self.publisher = self.create_lifecycle_publisher(Image, 'camera/image_raw', 10)
        self.grabber = Grabber(self, source, self.width, self.height, self.fps, self.loop,
                               self._publish)
        self.grabber.start()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        if self.grabber is not None:
            self.grabber.enable(True)
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.grabber is not None:
            self.grabber.enable(False)
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_grabber()
        if self.publisher is not None:
            self.destroy_lifecycle_publisher(self.publisher)
            self.publisher = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_grabber()
        return super().on_shutdown(state)

    def on_exit(self) -> None:
        self._stop_grabber()

    def _stop_grabber(self) -> None:
        if self.grabber is not None:
            self.grabber.stop()
            self.grabber = None

    def _publish(self, stamp: Time, rgb: np.ndarray) -> None:
        # Called from the grabber thread; rclpy publishers are thread-safe.
        if self.is_active and self.publisher is not None:
            self.publisher.publish(rgb_to_image(rgb, stamp.to_msg(), self.frame_id))
            self.rate.tick()
            self.frames += 1

    def _update_diagnostics(self) -> None:
        grabber = self.grabber
        self.diagnostics.set(rate_hz=self.rate.rate(), target_rate_hz=self.fps, frames=self.frames,
                             source=grabber.source.label if grabber else self.source_spec,
                             source_failures=grabber.failures if grabber else 0,
                             active=self.is_active)
        if self.is_active and grabber is not None and grabber.problem:
            self.diagnostics.warn(grabber.problem)
        else:
            self.diagnostics.ok()


def main(args: Sequence[str] | None = None) -> int:
    return run(Camera, args)


if __name__ == '__main__':
    sys.exit(main())
