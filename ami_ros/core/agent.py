"""The acting agent, ROS-free: one step per camera frame.

Each step samples the five-part action from the policy, hands it out at
once (the action only needs the policy, so it leaves before the rest of the
step is done; a policy on the latent needs the encoder first), then encodes
the frame (unless the policy already did), scores the previous step's
prediction against it (the intrinsic reward, core/rewards/: curiosity by
default) and predicts the next latent with the forward dynamics, carrying
the dynamics' hidden state explicitly from step to step. The agent node is a
thin shell around this class; benchmarks drive it directly.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ami_ros.core.checkpoint import read_json, read_tensors, write_json, write_tensors
from ami_ros.core.envelope import EnvelopeError, TensorSpec, specs_of
from ami_ros.core.models import MODEL_NAMES, build_models
from ami_ros.core.observation import to_observation
from ami_ros.core.policy import MAX_PERSISTENCE, policy_observation, with_persistence
from ami_ros.core.presets import IMAGE_SHAPE, Preset, get_preset
from ami_ros.core.rewards import make_reward
from ami_ros.core.schemas import decode_weights, weights_schema


@dataclass
class AgentStep:
    """What one step produced; tensors are on the CPU."""

    action: Tensor  # int64 [5]
    log_prob: Tensor  # float32 [5], per head
    value: float
    reward: float  # of the previous action, NaN on the first step (nothing predicted yet)
    prediction_error: float  # mean squared error of the previous prediction, NaN likewise
    latent: Tensor  # float32 [L], z_t
    hidden: Tensor  # complex64 [depth, dim], the state the dynamics used at this step
    versions: dict[str, int]  # of the weights that produced this step
    # The action held from the step before and how likely each head kept it
    # (policy.with_persistence): with log_prob, what PPO needs to recompute it.
    # Zeros and 0.0 where nothing was held (the first step, after a pause).
    previous_action: Tensor  # int64 [5]
    persistence: float


def resolve_device(name: str) -> torch.device:
    """A torch device from a parameter value, refused clearly when absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'device {name!r} is not a torch device; use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} asked for, but this torch has no usable CUDA; '
                         'use device:=cpu or install a CUDA build of torch')
    return device


class CuriosityAgent:
    """Acts on frames with the encoder, policy and forward dynamics of one preset."""

    def __init__(self, preset: Preset | str = 'cpu', device: str = 'cpu', seed: int = 0,
                 reward: str = 'curiosity', deterministic: bool = False,
                 persistence: float = 0.0, sampling_seed: int | None = None) -> None:
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.device = resolve_device(device)
        self.models = {name: m.to(self.device).eval()
                       for name, m in build_models(self.preset, seed=seed).items()}
        self.versions = dict.fromkeys(MODEL_NAMES, 0)
        self.reward_name = reward
        self.reward_fn = make_reward(reward)
        self.deterministic = deterministic
        if not 0.0 <= persistence <= MAX_PERSISTENCE:
            raise ValueError(f'persistence {persistence} is outside 0..{MAX_PERSISTENCE}; '
                             'it is the chance that each action part repeats the step before')
        self.persistence = float(persistence)
        # The last action, held with `persistence`; None before the first step
        # and after a pause (the bridge released every input).
        self.previous_action: Tensor | None = None
        self.policy_input = self.preset.policy.input
        self.policy_on_latent = self.policy_input == 'latent'
        # Agents of one graph share `seed` (the trainers' initial weights) but not their draws.
        self.generator = torch.Generator(device='cpu').manual_seed(seed if sampling_seed is None
                                                                   else sampling_seed)
        self.hidden = self.models['dynamics'].initial_hidden(1, self.device)
        self.prediction: Tensor | None = None  # mean of z_{t+1} predicted at step t
        self.steps = 0
        # Held by step() and swap(): new weights go in between two steps, never during one.
        self._lock = threading.Lock()
        self._specs = {name: specs_of(m.state_dict()) for name, m in self.models.items()}

    @property
    def encoder(self):
        return self.models['encoder']

    def step(self, rgb: np.ndarray,
             on_action: Callable[[Tensor], None] | None = None) -> AgentStep:
        """Act on one HxWx3 uint8 RGB frame of the preset's image size.

        `on_action(action)` (int64 [5], CPU) is called as soon as the action
        is sampled, before the encoder (unless the policy acts on the latent),
        reward and dynamics run: the frame to action latency is the policy's alone.
        """
        if rgb.shape != (IMAGE_SHAPE[1], IMAGE_SHAPE[2], 3):
            raise ValueError(f'frame must be {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}x3, got {rgb.shape}')
        with self._lock:
            return self._step(rgb, on_action)

    @torch.inference_mode()
    def _step(self, rgb: np.ndarray, on_action: Callable[[Tensor], None] | None) -> AgentStep:
        obs = to_observation(rgb).unsqueeze(0).to(self.device)
        # A policy on the latent acts on z: then the encoder runs before the action leaves.
        z = self.models['encoder'].encode_mean(obs) if self.policy_on_latent else None
        dist, value = self.models['policy'](policy_observation(self.policy_input, obs, z))
        persistence = 0.0
        previous = self.previous_action
        if self.persistence and previous is not None and not self.deterministic:
            persistence = self.persistence
            dist = with_persistence(dist, previous.to(self.device).unsqueeze(0), persistence)
        if self.deterministic:
            action = dist.mode()
        else:
            # Sample on the CPU from our own generator: reproducible and
            # restorable from a checkpoint, whatever the device.
            action = dist.sample(self.generator)
        action_cpu = action[0].cpu()
        self.previous_action = action_cpu
        if on_action is not None:
            on_action(action_cpu)
        log_prob = dist.log_prob(action)
        if z is None:
            z = self.models['encoder'].encode_mean(obs)
        if self.prediction is not None:
            reward = float(self.reward_fn(self.prediction, z)[0])
            error = float(torch.mean((self.prediction - z) ** 2))
        else:
            reward = error = math.nan
        hidden_used = self.hidden
        self.prediction, self.hidden = self.models['dynamics'].step(z, hidden_used, action)
        self.steps += 1
        return AgentStep(action=action_cpu, log_prob=log_prob[0].cpu(),
                         value=float(value[0]), reward=reward, prediction_error=error,
                         latent=z[0].cpu(), hidden=hidden_used[0].cpu(),
                         versions=dict(self.versions),
                         previous_action=(torch.zeros_like(action_cpu) if previous is None
                                          else previous),
                         persistence=persistence)

    @torch.inference_mode()
    def predicted_frame(self) -> np.ndarray | None:
        """The decoded prediction of the next frame, HxWx3 uint8 (None before step 1)."""
        if self.prediction is None:
            return None
        image = self.models['decoder'](self.prediction)[0]
        return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()

    def forget_prediction(self) -> None:
        """After a pause the last prediction no longer refers to the next frame,
        and no input is held any more (the bridge released them)."""
        self.prediction = None
        self.previous_action = None

    # -- weight sync --------------------------------------------------------
    def weight_specs(self, name: str) -> dict[str, TensorSpec]:
        return self._specs[name]

    def prepare_weights(self, blobs: Mapping[str, bytes]) -> dict[str, tuple[torch.nn.Module, int]]:
        """Validate weight envelopes and build the models they describe, off to the side.

        Every blob is checked (model name, preset, tensor names, dtypes,
        shapes, finite values) before any model is built; the first problem
        raises EnvelopeError naming the model. Nothing the agent runs is
        touched: `swap()` puts the result in.
        """
        decoded = {}
        for name, blob in blobs.items():
            if name not in self.models:
                raise EnvelopeError(f'unknown model {name!r}; models: {", ".join(MODEL_NAMES)}')
            try:
                decoded[name] = decode_weights(blob, name, self._specs[name], self.preset)
            except EnvelopeError as exc:
                raise EnvelopeError(f'{name}: {exc}') from None
        prepared = {}
        for name, (state, version) in decoded.items():
            model = copy.deepcopy(self.models[name])
            model.load_state_dict(state)
            prepared[name] = (model.to(self.device).eval(), version)
        return prepared

    def swap(self, prepared: Mapping[str, tuple[torch.nn.Module, int]]) -> None:
        """Put prepared models in, all together, between two steps."""
        with self._lock:
            for name, (model, version) in prepared.items():
                self.models[name] = model
                self.versions[name] = version

    # -- checkpoints --------------------------------------------------------
    # models/<model>.safetensors           weights envelope (schema weights/<model>)
    # interaction/<name>/state.safetensors hidden state, sampling generator, prediction,
    #                                      the action held (persistence), the reward's
    #                                      own state (reward/...)
    # interaction/<name>/state.json        steps, versions, preset
    # <name> is 'agent', or with several agents each one's own ('agent_1'). They share
    # models/: the trainers push the same weights to all, and the first agent saved writes them.
    def save_checkpoint(self, stage, name: str = 'agent') -> None:
        """Write the agent's part of a checkpoint into a staging directory."""
        state_dir = f'interaction/{name}'
        with self._lock:  # between two steps, and never during a swap
            for model_name, model in self.models.items():
                if (Path(stage) / f'models/{model_name}.safetensors').exists():
                    continue  # another agent of the graph saved the shared models first
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                write_tensors(stage, f'models/{model_name}.safetensors', state, weights_schema(model_name),
                              {'preset': self.preset.name, 'model': model_name,
                               'version': self.versions[model_name]})
            tensors = {'hidden': self.hidden.cpu(), 'generator': self.generator.get_state()}
            if self.prediction is not None:
                tensors['prediction'] = self.prediction.cpu()
            if self.previous_action is not None:
                tensors['previous_action'] = self.previous_action
            # A reward with memory is agent state too (IntrinsicReward.state_dict).
            tensors.update({f'reward/{k}': v for k, v in self.reward_fn.state_dict().items()})
            write_tensors(stage, f'{state_dir}/state.safetensors', tensors, 'agent/state')
            write_json(stage, f'{state_dir}/state.json',
                       {'preset': self.preset.name, 'steps': self.steps, 'versions': self.versions,
                        'has_prediction': self.prediction is not None, 'reward': self.reward_name})

    def load_checkpoint(self, ckpt, name: str | None = 'agent') -> None:
        """Restore weights and versions, and the hidden state, sampling state and counters
        saved as `name` (None: the checkpoint has none for this agent; they start fresh)."""
        with self._lock:
            for model_name in MODEL_NAMES:
                env = read_tensors(ckpt, f'models/{model_name}.safetensors', weights_schema(model_name),
                                   self._specs[model_name], require_finite=True)
                self.models[model_name].load_state_dict(env.tensors)
                self.versions[model_name] = env.int_meta('version')
            if name is None:
                return
            info = read_json(ckpt, f'interaction/{name}/state.json')
            state = read_tensors(ckpt, f'interaction/{name}/state.safetensors', 'agent/state',
                                 allow_extra=True,
                                 expected={'hidden': TensorSpec(torch.complex64,
                                                                tuple(self.hidden.shape)),
                                           'generator': TensorSpec(torch.uint8, (None,))})
            self.hidden = state.tensors['hidden'].to(self.device)
            self.generator.set_state(state.tensors['generator'].contiguous())
            prediction = state.tensors.get('prediction')
            self.prediction = prediction.to(self.device) if prediction is not None else None
            previous = state.tensors.get('previous_action')
            self.previous_action = previous.long() if previous is not None else None
            self.steps = int(info['steps'])
            # The memory of another reward function means nothing to this one.
            reward_state = {k.split('/', 1)[1]: v for k, v in state.tensors.items()
                            if k.startswith('reward/')}
            if info.get('reward') == self.reward_name:
                self.reward_fn.load_state_dict(reward_state)
