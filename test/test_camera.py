"""camera as a real process, reading video files written here.

There is no OBS virtual camera (nor any V4L2 device) on the test machine, so
the device path is exercised only through its failure: the clear error and
the retrying. Files stand in for the frames; solid colours on 16-pixel-
aligned regions keep MJPG's compression from blurring them.
"""

from __future__ import annotations

import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from ros_harness import NodeStatus, wait_for
from sensor_msgs.msg import Image

from ami_ros.nodes.camera import frame_to_rgb, parse_source
from ami_ros.ros.images import FrameReader, image_to_rgb

# BGR, as OpenCV writes them, and the RGB the topic must carry.
COLOURS_BGR = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255)]
COLOURS_RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), fps, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def solid(colour_bgr: tuple[int, int, int], w: int = 160, h: int = 120) -> np.ndarray:
    return np.full((h, w, 3), colour_bgr, np.uint8)


def near(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> bool:
    return bool(np.abs(rgb.astype(int) - np.array(colour)).max() <= tol)


def change_state(test_node, transition: int) -> None:
    req = ChangeState.Request()
    req.transition.id = transition
    assert test_node.call(ChangeState, 'camera/change_state', req).success


def test_file_frames_rate_colours_pause(launch, test_node, tmp_path):
    video = write_video(tmp_path / 'colours.avi',
                        [solid(COLOURS_BGR[i % 4]) for i in range(12)])
    frames = test_node.collect(Image, 'camera/image_raw')
    proc = launch('camera', parameters={'source': str(video), 'fps': 10.0})

    status = NodeStatus(test_node)
    wait_for(lambda: frames, 15, message='a first frame')
    first = len(frames) - 1
    # Measure the rate over 2 s of arrivals (12 frames: the file loops too).
    wait_for(lambda: frames[-1][0] - frames[first][0] >= 2.0, 10, message='2 s of frames')
    got = list(frames[first:])
    rate = (len(got) - 1) / (got[-1][0] - got[0][0])
    assert 7.0 <= rate <= 13.0, rate

    stamps = []
    for _, msg in got:
        assert (msg.width, msg.height, msg.encoding, msg.step) == (84, 84, 'rgb8', 252)
        assert msg.header.frame_id == 'camera'
        stamps.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
        rgb = image_to_rgb(msg)
        assert any(near(rgb, c) for c in COLOURS_RGB), rgb[42, 42]
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), stamps
    # BGR (0, 0, 255) must arrive as RGB red, not blue.
    assert any(near(image_to_rgb(m), (255, 0, 0)) for _, m in got)
    assert any(near(image_to_rgb(m), (0, 0, 255)) for _, m in got)
    # Its /diagnostics: frames going out, no warning.
    wait_for(lambda: status.number('camera', 'frames') >= len(got), 5,
             message=lambda: f'the frames in the diagnostics: {status.status.get("camera")}')
    assert status.level['camera'] == 0 and status.get('camera', 'target_rate_hz') == '10.000'

    change_state(test_node, Transition.TRANSITION_DEACTIVATE)  # pause
    # Observing absence needs a wait: let frames already in flight land first.
    time.sleep(0.3)
    paused_at = len(frames)
    time.sleep(0.7)
    assert len(frames) == paused_at
    change_state(test_node, Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: len(frames) > paused_at + 2, 10, message='frames after resume')

    assert proc.stop(signal.SIGINT) == 0
    assert 'Traceback' not in proc.log_path.read_text()


def test_wide_source_is_centre_cropped_and_end_without_loop(launch, test_node, tmp_path):
    # 256x128: a green centre square 128 wide between red bars 64 wide.
    frame = solid((0, 255, 0), 256, 128)
    frame[:, :64] = frame[:, 192:] = (0, 0, 255)
    video = write_video(tmp_path / 'wide.avi', [frame] * 5)
    frames = test_node.collect(Image, 'camera/image_raw')
    # Driven through its lifecycle, so that the 5 frames of the file go out
    # only once this test's subscription can hear them.
    proc = launch('camera', parameters={'source': str(video), 'fps': 20.0, 'loop': False,
                                        'width': 64, 'height': 64, 'frame_id': 'obs',
                                        'autostart': False})
    change_state(test_node, Transition.TRANSITION_CONFIGURE)
    wait_for(lambda: test_node.node.count_publishers('camera/image_raw') > 0, 10,
             message='the camera publisher')
    change_state(test_node, Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: len(frames) >= 5, 10, message='the 5 frames of the file')
    for _, msg in frames:
        assert (msg.width, msg.height, msg.step, msg.header.frame_id) == (64, 64, 192, 'obs')
        rgb = image_to_rgb(msg)
        assert near(rgb, (0, 255, 0)), rgb[:, [0, 63]]  # the red bars are gone, edges included
    wait_for(lambda: 'loop is false' in proc.output(), 10, message='the end-of-file line')
    # Observing absence needs a wait: no frame may follow the end of the file.
    time.sleep(0.5)
    assert len(frames) == 5 and proc.alive()


def test_missing_sources_are_reported_and_retried(launch, test_node, tmp_path):
    status = NodeStatus(test_node)
    # Both at once, to wait for the back-off only once.
    procs = {'/dev/video99': launch('camera', name='cam_device', parameters={'source': '/dev/video99'}),
             'missing.avi': launch('camera', name='cam_file', parameters={'source': 'missing.avi'})}
    for source, reason in (('/dev/video99', 'no such device'), ('missing.avi', 'no such file')):
        proc = procs[source]
        wait_for(lambda p=proc: 'next try in 2 s' in p.output(), 15, message=f'the second try of {source}')
        out = proc.output()
        error = next(line for line in out.splitlines() if 'cannot open camera source' in line)
        assert '[ERROR]' in error and f'source {source}: {reason}' in error, error
        assert 'V4L2 devices here: ' in error and 'set source:=' in error and 'Retrying in 1 s' in error
        assert 'still unavailable' in out and proc.alive()
        assert out.count('cannot open camera source') == 1  # retries are one short line each
    # rqt_robot_monitor shows the outage: a warning saying why, the failed tries counted.
    for name, source in (('cam_device', '/dev/video99'), ('cam_file', 'missing.avi')):
        wait_for(lambda n=name: status.number(n, 'source_failures') >= 2, 10,
                 message=lambda n=name: f'{n} diagnostics: {status.status.get(n)}')
        assert status.level[name] == 1 and f'cannot open {source}' in status.message[name]
        assert status.get(name, 'frames') == '0'


class MjpegServer:
    """A live HTTP MJPEG stream of one solid colour at 30 fps (a network camera)."""

    def __init__(self, colour_bgr: tuple[int, int, int], port: int = 0) -> None:
        jpeg = cv2.imencode('.jpg', solid(colour_bgr))[1].tobytes()
        part = b'--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n' % (
            len(jpeg), jpeg)
        stop = self._stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header('Content-Type', 'multipart/x-mixed-replace; boundary=frame')
                self.end_headers()
                try:
                    while not stop.is_set():
                        self.wfile.write(part)
                        stop.wait(1 / 30)  # the camera's frame rate, not synchronisation
                except OSError:  # the client went away
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(('127.0.0.1', port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._stop.set()  # ends the stream: the client sees it end
        self.httpd.shutdown()
        self.httpd.server_close()


def test_live_stream_lost_and_back(launch, test_node):
    # No V4L2 device here: a live HTTP stream takes the live path instead
    # (continuous reads, newest frame each period, reopen after a loss).
    server = MjpegServer((0, 255, 0))
    frames = test_node.collect(Image, 'camera/image_raw')
    proc = launch('camera', parameters={'source': f'http://127.0.0.1:{server.port}/cam', 'fps': 10.0})
    try:
        wait_for(lambda: frames, 20, message='a first frame of the stream')
        first = len(frames) - 1
        wait_for(lambda: frames[-1][0] - frames[first][0] >= 1.5, 10, message='1.5 s of frames')
        got = frames[first:]
        rate = (len(got) - 1) / (got[-1][0] - got[0][0])
        assert 7.0 <= rate <= 13.0, rate  # 10 Hz out of a 30 fps source
        assert near(image_to_rgb(got[-1][1]), (0, 255, 0))

        server.close()  # the camera goes away ...
        wait_for(lambda: 'stopped delivering frames' in proc.output(), 15, message='the loss line')
        lost_at = len(frames)
        server = MjpegServer((0, 0, 255), server.port)  # ... and comes back, now red
        wait_for(lambda: 'is back; publishing again' in proc.output(), 15, message='the back line')
        wait_for(lambda: any(near(image_to_rgb(m), (255, 0, 0)) for _, m in frames[lost_at:]), 10,
                 message='frames of the returned stream')
    finally:
        server.close()
    assert proc.alive()


def test_frame_conversion_and_source_parsing():
    bgra = np.zeros((30, 40, 4), np.uint8)
    bgra[..., 2] = 255  # red in BGRA
    assert near(frame_to_rgb(bgra, 8, 8), (255, 0, 0))
    assert frame_to_rgb(np.full((30, 40), 7, np.uint8), 8, 8).shape == (8, 8, 3)
    assert parse_source('').kind == 'obs'
    assert parse_source('3').target == 3
    assert parse_source('/dev/video2').kind == 'device'
    assert parse_source('rtsp://cam/stream').kind == 'stream'
    assert parse_source('clip.mp4').kind == 'file'


def test_frame_reader_gives_the_models_frame_and_counts_what_it_drops():
    # 120x60 BGR: the centre square (columns 30-90) is red | blue under a white
    # top band; the green outside it must be cropped away.
    bgr = np.zeros((60, 120, 3), np.uint8)
    bgr[:, :30] = bgr[:, 90:] = (0, 255, 0)
    bgr[:, 30:60] = (0, 0, 255)
    bgr[:, 60:90] = (255, 0, 0)
    bgr[:10, 30:90] = (255, 255, 255)
    msg = Image(height=60, width=120, encoding='bgr8', step=360, data=bgr.tobytes())
    warnings = []
    frames = FrameReader(lambda kind, text: warnings.append(kind))
    rgb = frames.observation(msg)
    assert rgb.shape == (84, 84, 3) and rgb.dtype == np.uint8
    assert near(rgb[0], (255, 255, 255)) and not near(rgb[-1], (255, 255, 255))  # not upside down
    assert near(rgb[20:, :40], (255, 0, 0)) and near(rgb[20:, 44:], (0, 0, 255))
    assert not ((rgb[..., 1] > 128) & (rgb[..., 0] < 128)).any()  # no green: cropped away
    assert frames.dropped == 0 and warnings == []

    too_short = Image(height=84, width=84, encoding='rgb8', step=252, data=b'\x00' * 100)
    other = Image(height=84, width=84, encoding='yuv422', step=168, data=b'\x00' * 84 * 168)
    assert frames.observation(too_short) is None and frames.observation(other) is None
    assert frames.dropped == 2 and warnings == ['frame-data', 'frame-unsupported']
