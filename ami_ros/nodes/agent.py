"""agent: acts on every camera frame with the curiosity agent.

Subscribes:
  camera/image_raw        sensor_msgs/Image (rgb8 84x84; bgr8, rgba8, bgra8,
                          mono8 and other sizes are converted; keeps only the
                          newest frame, never a queue)
Publishes:
  action                  sensor_msgs/Joy, stamped with the frame's stamp; sent
                          as soon as the policy has chosen it, before the
                          step's encoder (unless the preset's policy acts on
                          the latent), reward and dynamics work
  reward                  std_msgs/Float32, intrinsic reward of the previous action
  prediction_error        std_msgs/Float32, MSE of the latent prediction
  prediction/image_raw    sensor_msgs/Image, the decoded predicted next frame
                          (only while someone subscribes)
  experience              std_msgs/UInt8MultiArray, one envelope per step (see
                          ami_ros/core/schemas.py): everything a trainer needs
  /diagnostics            rate, latency (frame stamp -> action out: latency_*,
                          frame received -> action out: step_*), steps,
                          model versions
Serves:
  agent/sync_weights      rcl_interfaces/srv/SetParameters: one Parameter per
                          model ('encoder', 'decoder', 'dynamics', 'policy'),
                          its byte_array_value a weights envelope, or its
                          string_value 'sha256:<hex>' naming one sent on
                          agent/sync_weights_payload (ros/weight_payload.py:
                          another machine), or 'file:///path' of one (same
                          machine: no copy through DDS), read only from the private
                          folder of sync_dir (core/private_files.py: a regular
                          file of this user, no symlinks, at most the size the
                          model needs). The whole request is checked
                          before anything changes; the new models are built
                          on a worker thread in the idle time after a step
                          and swapped in between two steps.

  agent/save_checkpoint   its part of a checkpoint (models/, interaction/<state_name>/)

Parameters: preset, device, seed, sampling_seed, reward, deterministic, persistence,
torch_threads, publish_prediction, sync_dir, state_name, checkpoint, checkpoint_dir
(see docs/parameters.md).
"""

from __future__ import annotations

import gc
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

import rclpy
import torch
from rcl_interfaces.msg import ParameterType, SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Float32, UInt8MultiArray

from ami_ros.core.action import action_to_controls
from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint import load_manifest
from ami_ros.core.envelope import EnvelopeError, size_limit, specs_of
from ami_ros.core.observation import to_uint8_chw
from ami_ros.core.policy import MAX_PERSISTENCE
from ami_ros.core.presets import DEFAULT_PRESET, PRESETS
from ami_ros.core.private_files import read_confined, weights_root
from ami_ros.core.rewards import reward_names
from ami_ros.core.schemas import ExperienceStep, encode_experience
from ami_ros.core.timing import LatencyWindow, RateMeter
from ami_ros.ros.checkpoint_part import CheckpointPart
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.images import FrameReader, rgb_to_image, stamp_ns
from ami_ros.ros.managed_node import ManagedNode, run
from ami_ros.ros.pacing import StepGap
from ami_ros.ros.weight_payload import FILE_NOT_HERE, PREFIX, PayloadError, PayloadReceiver

# The newest frame only: a late agent skips frames instead of queueing them.
# Best effort is compatible with publishers of either reliability.
NEWEST_FRAME = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                          reliability=ReliabilityPolicy.BEST_EFFORT)
# A sync waits at most this long for idle time between steps (at 10 Hz a gap
# comes within a frame; a faster camera may leave none).
SYNC_GAP_WAIT = 0.25
# How long a sync waits for the payloads it names (sent just before the request).
PAYLOAD_WAIT = 5.0


class AgentNode(ManagedNode):
    def __init__(self) -> None:
        super().__init__('agent')
        preset = self.declare('preset', DEFAULT_PRESET, 'Model preset: sizes and what the policy sees '
                              '(core/presets.py).', choices=tuple(PRESETS))
        device = self.declare('device', 'cpu', 'Torch device: cpu, cuda or cuda:N.')
        seed = self.declare('seed', 0, 'Seed of the initial weights and of action sampling.',
                            low=0, high=2**31 - 1)
        reward = self.declare(
            'reward', 'curiosity', 'Intrinsic reward, one module of core/rewards/ each; curiosity '
            'is the forward model\'s prediction error.', choices=reward_names())
        deterministic = self.declare('deterministic', False,
                                     'Act with the most likely action instead of sampling.')
        persistence = self.declare(
            'persistence', 0.0, 'Chance that each action part repeats the step before instead '
            'of a fresh draw from the policy, so inputs are held like keys (0 = none; part of '
            'the acting policy PPO trains: the experience carries it). Read at start.',
            low=0.0, high=MAX_PERSISTENCE, read_only=True)
        threads = self.declare('torch_threads', 1, 'Torch intra-op threads of this process.',
                               low=1, high=64)
        window = self.declare('latency_window', 1000, 'Steps over which /diagnostics gives the '
                              'latency percentiles (the newest ones). Read at start.',
                              low=10, high=100000, read_only=True)
        self.publish_prediction = self.declare(
            'publish_prediction', True, 'Decode and publish the predicted next frame '
            '(only while prediction/image_raw has subscribers).')
        self.state_name = self.declare(
            'state_name', 'agent', "This agent's name in a checkpoint: its hidden state, sampling "
            "state and counters go to interaction/<state_name>/ (agents:=N gives agent_<i>; models/ "
            'is shared). Read at start.', read_only=True)
        if not re.fullmatch('[A-Za-z][A-Za-z0-9_]{0,63}', self.state_name):
            raise ValueError(f'state_name={self.state_name!r} is not a name (letters, digits, _)')
        sampling_seed = self.declare(
            'sampling_seed', -1, "Seed of action sampling; -1 = seed. Several agents share seed (the "
            "trainers' initial weights) and each gets its own sampling_seed.", low=-1, high=2**31 - 1)
        torch.set_num_threads(threads)
        self.agent = CuriosityAgent(preset, device=device, seed=seed, reward=reward,
                                    deterministic=deterministic, persistence=persistence,
                                    sampling_seed=None if sampling_seed < 0 else sampling_seed)
        self.action_pub = self.create_lifecycle_publisher(Joy, 'action', 10)
        self.reward_pub = self.create_lifecycle_publisher(Float32, 'reward', 10)
        self.error_pub = self.create_lifecycle_publisher(Float32, 'prediction_error', 10)
        self.prediction_pub = self.create_lifecycle_publisher(Image, 'prediction/image_raw', 1)
        # Deep enough that a trainer busy for a moment loses no step.
        self.experience_pub = self.create_lifecycle_publisher(UInt8MultiArray, 'experience', 100)
        # Anyone on the domain may call sync_weights: files are read from the
        # trainers' private folder only, and no blob larger than its model needs is read.
        self.weights_root = weights_root(self.declare(
            'sync_dir', '', "Folder whose ami_ros_weights folder holds the trainers' weight files "
            "(the trainers' sync_dir); '' = $XDG_RUNTIME_DIR, else /dev/shm. 'file://' weights "
            'are read from there only. Read at start.', read_only=True))
        self.weights_limit = {name: size_limit(specs_of(model.state_dict()))
                              for name, model in self.agent.models.items()}
        self.syncs_ok = 0
        self.syncs_refused = 0
        self.step_gap = StepGap()
        self._prepare_seconds = 0.03  # how long building new models takes (smoothed)
        self.rate = RateMeter()
        self.latency = LatencyWindow(window)  # frame stamp -> action out (with the frame's hop)
        self.step_latency = LatencyWindow(window)  # frame received -> action out (the step alone)
        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)
        self.diagnostics.set(preset=preset, device=device)
        # Restores weights, versions, hidden state and sampling state before
        # the first frame can arrive; serves agent/save_checkpoint.
        self.checkpoints = CheckpointPart(
            self, lambda stage: self.agent.save_checkpoint(stage, self.state_name), self._restore,
            preset=preset, after_save=self.diagnostics.report)
        # After the restore: a refused checkpoint then leaves no sync thread in rclpy, whose exit
        # would abort the process instead of its one-line refusal.
        self._start_sync_service()
        self.continues = False  # the next step follows the previous one without a gap
        self.frames = FrameReader(self.warn_throttled)
        self.create_subscription(Image, 'camera/image_raw', self.on_frame, NEWEST_FRAME)
        # Everything built so far lives as long as the process: out of the
        # collector's sight, so a collection during a step stays short.
        gc.collect()
        gc.freeze()
        self.get_logger().info(f'agent ready: preset {preset} on {device}, {threads} torch thread(s)')

    def _restore(self, ckpt: Path) -> None:
        """The checkpoint's models, and this agent's state where the checkpoint has it: an agent
        it never saw (a checkpoint of fewer agents) takes the models and starts its state fresh."""
        node = 'agent' if self.state_name == 'agent' else f'{self.state_name}/agent'
        saved = load_manifest(ckpt).get('nodes', [])
        if node in saved:
            self.agent.load_checkpoint(ckpt, self.state_name)
            return
        self.agent.load_checkpoint(ckpt, None)
        self.get_logger().info(f'checkpoint {ckpt} holds no state of {node} (it saved '
                               f'{", ".join(saved) or "none"}): models restored, hidden state fresh')

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.agent.forget_prediction()  # its frame will not be the next one after the pause
        self.continues = False
        return super().on_deactivate(state)

    def on_frame(self, msg: Image) -> None:
        if not self.is_active:
            return
        received = self.get_clock().now().nanoseconds
        self.step_gap.step_started()
        try:
            self._act(msg, received)
        finally:
            self.step_gap.step_ended()

    def _act(self, msg: Image, received: int) -> None:
        rgb = self.frames.observation(msg)
        if rgb is None:
            return
        stamp = stamp_ns(msg)

        def publish_action(action) -> None:
            axes, buttons = action_to_controls(action.tolist())
            joy = Joy(axes=axes, buttons=buttons)
            joy.header.stamp = msg.header.stamp
            joy.header.frame_id = msg.header.frame_id
            self.action_pub.publish(joy)
            now = self.get_clock().now().nanoseconds
            self.step_latency.add((now - received) / 1e6)
            if stamp:
                self.latency.add((now - stamp) / 1e6)

        step = self.agent.step(rgb, on_action=publish_action)
        self.rate.tick()
        if not math.isnan(step.reward):
            self.reward_pub.publish(Float32(data=step.reward))
            self.error_pub.publish(Float32(data=step.prediction_error))
        self._publish_experience(rgb, step, stamp)
        if self.publish_prediction and self.prediction_pub.get_subscription_count() > 0:
            frame = self.agent.predicted_frame()
            if frame is not None:
                self.prediction_pub.publish(rgb_to_image(frame, msg.header.stamp, 'prediction'))

    def _publish_experience(self, rgb, step, stamp_ns: int) -> None:
        blob = encode_experience(ExperienceStep(
            observation=to_uint8_chw(rgb), latent=step.latent, hidden=step.hidden,
            action=step.action, log_prob=step.log_prob, value=step.value,
            reward=None if math.isnan(step.reward) else step.reward, stamp_ns=stamp_ns,
            step=self.agent.steps, continues=self.continues, versions=step.versions,
            preset=self.agent.preset.name, previous_action=step.previous_action,
            persistence=step.persistence))
        self.experience_pub.publish(UInt8MultiArray(data=blob))
        self.continues = True

    # -- weight sync --------------------------------------------------------
    def _start_sync_service(self) -> None:
        """Serve <agent name>/sync_weights from a second node on its own thread.

        Weights are decoded and the new models built on that thread, so a
        sync never waits for a step nor a step for a sync (a coroutine
        handler on the agent's executor would be re-run in a busy loop by
        rclpy while it waits). The helper node ignores the process's global
        remaps, which name the agent.
        """
        self._sync_node = rclpy.create_node(
            f'{self.get_name()}_weight_sync', namespace=self.get_namespace(),
            context=self.context, use_global_arguments=False, start_parameter_services=False)
        self._sync_node.create_service(SetParameters, f'{self.get_name()}/sync_weights',
                                       self.on_sync_weights)
        self._sync_executor = SingleThreadedExecutor(context=self.context)
        self._sync_executor.add_node(self._sync_node)
        self._sync_thread = threading.Thread(target=self._spin_sync, args=(self._sync_executor,),
                                             name='sync_weights', daemon=True)
        self._sync_thread.start()
        # Payload chunks arrive on a node and thread of their own: the sync handler waits for them.
        self._payload_node = rclpy.create_node(
            f'{self.get_name()}_weight_payload', namespace=self.get_namespace(),
            context=self.context, use_global_arguments=False, start_parameter_services=False)
        self.payloads = PayloadReceiver(self._payload_node, f'{self.get_name()}/sync_weights',
                                        self.step_gap, max(self.weights_limit.values()))
        self._payload_executor = SingleThreadedExecutor(context=self.context)
        self._payload_executor.add_node(self._payload_node)
        self._payload_thread = threading.Thread(target=self._spin_sync, args=(self._payload_executor,),
                                                name='weight_payload', daemon=True)
        self._payload_thread.start()

    @staticmethod
    def _spin_sync(executor: SingleThreadedExecutor) -> None:
        try:
            executor.spin()
        except (ExternalShutdownException, RuntimeError):  # the process is ending
            pass

    def on_sync_weights(self, request: SetParameters.Request,
                        response: SetParameters.Response) -> SetParameters.Response:
        names = [p.name for p in request.parameters]
        try:
            # Payloads first: waiting for them costs no step anything.
            payloads = {p.name: self._payload(p) for p in request.parameters
                        if p.value.type == ParameterType.PARAMETER_STRING
                        and p.value.string_value.startswith(PREFIX)}
        except (EnvelopeError, PayloadError) as exc:
            payloads, problem = None, str(exc)
        # Build the new models in the idle time after a step, not beside one:
        # they would share the interpreter and the CPU with it.
        self.step_gap.wait(self._prepare_seconds, timeout=SYNC_GAP_WAIT)
        started = time.monotonic()
        try:
            if payloads is None:
                raise EnvelopeError(problem)
            blobs = {p.name: payloads[p.name] if p.name in payloads else self._envelope_bytes(p)
                     for p in request.parameters}
            if len(blobs) != len(names):
                raise EnvelopeError('a model is named twice in one request')
            if not blobs:
                raise EnvelopeError('the request holds no weights')
            prepared = self.agent.prepare_weights(blobs)
            self.agent.swap(prepared)
            del prepared
            # The old models and the decoding leave garbage behind; collect it
            # here, still in the gap, not in the middle of a later step.
            gc.collect()
            self._prepare_seconds = 0.7 * self._prepare_seconds + 0.3 * (time.monotonic() - started)
            problem = None
        except (EnvelopeError, ValueError, OSError, RuntimeError) as exc:
            problem = str(exc)
        del payloads
        if problem is None:
            self.syncs_ok += 1
            versions = ', '.join(f'{n} v{self.agent.versions[n]}' for n in names)
            self.get_logger().debug(f'new weights: {versions}')  # each round; /diagnostics has them
            response.results = [SetParametersResult(successful=True) for _ in names]
        else:
            self.syncs_refused += 1
            self.warn_throttled('sync', f'refused weights ({", ".join(names) or "none"}): {problem}')
            response.results = [SetParametersResult(successful=False, reason=problem) for _ in names]
        return response

    def _limit(self, name: str) -> int:
        """The most bytes model `name`'s weights envelope may hold."""
        if name not in self.weights_limit:
            raise EnvelopeError(f'unknown model {name!r}; models: {", ".join(self.weights_limit)}')
        return self.weights_limit[name]

    def _payload(self, parameter) -> bytearray:
        """The weights envelope a 'sha256:' Parameter names, once received whole and checked."""
        try:
            return self.payloads.take(parameter.value.string_value, self._limit(parameter.name),
                                      PAYLOAD_WAIT)
        except PayloadError as exc:
            raise EnvelopeError(f'{parameter.name}: {exc}') from None

    def _envelope_bytes(self, parameter) -> bytes:
        """The weights envelope a sync Parameter carries, inline or in a file, unread if too large."""
        value, name = parameter.value, parameter.name
        limit = self._limit(name)
        if value.type == ParameterType.PARAMETER_BYTE_ARRAY:
            if len(value.byte_array_value) > limit:
                raise EnvelopeError(f'{name}: weights may hold at most {limit} bytes')
            return b''.join(value.byte_array_value)  # rclpy hands byte[] over as a list of bytes
        if value.type == ParameterType.PARAMETER_STRING and value.string_value.startswith('file://'):
            path = value.string_value.removeprefix('file://')
            try:
                return read_confined(path, self.weights_root, limit, what='weights file')
            except ValueError as exc:
                if self._missing_weights_file(path):  # a trainer on another machine: it sends otherwise
                    raise EnvelopeError(f'{name}: {FILE_NOT_HERE} ({exc})') from None
                raise EnvelopeError(f'{name}: {exc}') from None
        raise EnvelopeError(f'{name}: weights come as a byte_array value, a '
                            f"'file://' or '{PREFIX}' string, not parameter type {value.type}")

    def _missing_weights_file(self, path: str) -> bool:
        """Whether `path` names a file inside the weights folder that is not there.

        Only there: it tells no more than read_confined's own refusal, never
        whether a file exists elsewhere."""
        parts = path.split('/')
        inside = Path(path).parts[:len(self.weights_root.parts)] == self.weights_root.parts
        return inside and '.' not in parts and '..' not in parts and not os.path.lexists(path)

    def on_exit(self) -> None:
        # The sync thread must have left rclpy before the node and the
        # context go: destroying them under a thread still waiting in rcl
        # aborts the process ('terminate called without an active exception').
        self._sync_executor.shutdown(timeout_sec=10)
        self._payload_executor.shutdown(timeout_sec=10)
        self._sync_thread.join(timeout=10)
        self._payload_thread.join(timeout=10)
        if self._sync_thread.is_alive() or self._payload_thread.is_alive():
            self.get_logger().warning('a weight-sync thread did not stop; leaving it to the exit')
            return
        self._sync_node.destroy_node()
        self._payload_node.destroy_node()

    def _update_diagnostics(self) -> None:
        lat, step = self.latency.summary(), self.step_latency.summary()
        self.diagnostics.set(rate_hz=self.rate.rate(), latency_p50_ms=lat['p50'],
                             latency_p99_ms=lat['p99'], latency_max_ms=lat['max'],
                             step_p50_ms=step['p50'], step_p99_ms=step['p99'],
                             step_max_ms=step['max'],
                             steps=self.agent.steps, dropped_frames=self.frames.dropped,
                             syncs_ok=self.syncs_ok, syncs_refused=self.syncs_refused,
                             payload_chunks_dropped=self.payloads.dropped,
                             active=self.is_active,
                             **{f'version_{k}': v for k, v in self.agent.versions.items()})


def main(args: list[str] | None = None) -> int:
    return run(AgentNode, args)


if __name__ == '__main__':
    sys.exit(main())
