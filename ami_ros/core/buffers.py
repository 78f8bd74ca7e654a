"""Replay buffers of the learning core: images (VAE) and dynamics steps.

The PPO trajectory buffer is in `core/trajectory.py`; it shares the state
convention and helpers defined here.

Every buffer is thread-safe (one lock per buffer): a ROS node adds from its
executor thread while a training thread reads. Each can be saved and restored
exactly as tensors + JSON-able counters (`state_dict()` /
`load_state_dict()`), so a checkpoint stores it as safetensors + JSON and
never pickles; random generator states travel as uint8 tensors.

Conventions
-----------
- `ImageBuffer`: random replacement when full (a uniformly chosen slot is
  overwritten), as the reference system.
- `DynamicsBuffer`: time-ordered, FIFO when full. The hidden state stored with
  step t is h_t, the forward-dynamics state the agent fed in together with
  (z_t, a_t); a training chunk therefore starts from a stored state. Breaks in
  time (restart, dropped steps) are marked and no chunk spans one.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

StateInfo = dict[str, int | float | str]
BufferState = tuple[dict[str, Tensor], StateInfo]


def _generator_state(gen: torch.Generator) -> Tensor:
    return gen.get_state().clone()


def _set_generator_state(gen: torch.Generator, state: Tensor) -> None:
    gen.set_state(state.to(torch.uint8).contiguous().clone())


def check_kind(info: StateInfo, kind: str) -> None:
    got = info.get('kind')
    if got != kind:
        raise ValueError(f'buffer state is of kind {got!r}, expected {kind!r}')


class _CountedBuffer:
    """Size and new-data counters under one lock, shared by the replay buffers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._size = 0
        self._new = 0  # added since the last mark_trained()
        self._added = 0  # ever added (restored from checkpoints)

    def __len__(self) -> int:
        with self._lock:
            return self._size

    @property
    def new_count(self) -> int:
        """Items added since the last `mark_trained()`."""
        with self._lock:
            return self._new

    @property
    def added(self) -> int:
        """Items ever added (restored from checkpoints)."""
        with self._lock:
            return self._added

    def mark_trained(self) -> None:
        with self._lock:
            self._new = 0


class ImageBuffer(_CountedBuffer):
    """Images for the VAE; random replacement once `capacity` is reached."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}')
        self.capacity = int(capacity)
        self.seed = int(seed)
        super().__init__()
        self._gen = torch.Generator().manual_seed(self.seed)
        self._images: Tensor | None = None  # allocated on the first add, when the shape is known

    def add(self, image: Tensor) -> None:
        """Store one uint8 [3, H, W] image (copied)."""
        if image.dtype != torch.uint8 or image.dim() != 3:
            raise ValueError(f'image must be uint8 [C,H,W], got {image.dtype} {list(image.shape)}')
        with self._lock:
            if self._images is None:
                self._images = torch.empty((self.capacity, *image.shape), dtype=torch.uint8)
            elif image.shape != self._images.shape[1:]:
                raise ValueError(f'image shape {list(image.shape)} differs from the '
                                 f'buffer\'s {list(self._images.shape[1:])}')
            if self._size < self.capacity:
                slot = self._size
                self._size += 1
            else:
                slot = int(torch.randint(self.capacity, (1,), generator=self._gen))
            self._images[slot].copy_(image)
            self._new += 1
            self._added += 1

    def sample(self, batch: int) -> Tensor:
        """`batch` images drawn uniformly with replacement: uint8 [B, 3, H, W]."""
        with self._lock:
            if self._size == 0:
                raise ValueError('cannot sample from an empty image buffer')
            idx = torch.randint(self._size, (batch,), generator=self._gen)
            return self._images[idx]

    def snapshot(self, mark_trained: bool = False) -> Tensor:
        """A copy of every stored image, uint8 [N, 3, H, W]; optionally resets
        `new_count` in the same locked step (so adds during training count)."""
        with self._lock:
            if mark_trained:
                self._new = 0
            if self._images is None:
                return torch.empty((0, 3, 0, 0), dtype=torch.uint8)
            return self._images[:self._size].clone()

    def state_dict(self) -> BufferState:
        with self._lock:
            tensors = {'generator': _generator_state(self._gen)}
            if self._images is not None and self._size:
                tensors['images'] = self._images[:self._size].clone()
            info: StateInfo = {'kind': 'image', 'capacity': self.capacity, 'seed': self.seed,
                               'size': self._size, 'new_count': self._new, 'added': self._added}
            return tensors, info

    def load_state_dict(self, tensors: dict[str, Tensor], info: StateInfo) -> None:
        """Restore contents, counters and generator; the capacity stays this buffer's
        (a larger saved set is cut to it)."""
        check_kind(info, 'image')
        images = tensors.get('images')
        with self._lock:
            if images is None or len(images) == 0:
                self._images, self._size = None, 0
            else:
                n = min(len(images), self.capacity)
                self._images = torch.empty((self.capacity, *images.shape[1:]), dtype=torch.uint8)
                self._images[:n].copy_(images[:n])
                self._size = n
            self._new = int(info.get('new_count', 0))
            self._added = int(info.get('added', self._size))
            _set_generator_state(self._gen, tensors['generator'])


class DynamicsBuffer(_CountedBuffer):
    """Time-ordered (latent, hidden, action) steps for the forward dynamics;
    the oldest step is dropped once `capacity` is reached (FIFO)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(f'capacity must be >= 2, got {capacity}')
        self.capacity = int(capacity)
        super().__init__()
        # Ring storage, allocated on the first add when the shapes are known.
        self._latent: Tensor | None = None
        self._hidden: Tensor | None = None
        self._action: Tensor | None = None
        self._starts: Tensor | None = None  # True where a step does not follow the previous one
        self._head = 0  # ring index of the oldest step
        self._break_next = True  # the very first step starts a sequence

    def break_sequence(self) -> None:
        """The next step does not follow the last one (restart, dropped steps)."""
        with self._lock:
            self._break_next = True

    def _allocate(self, latent: Tensor, hidden: Tensor, action: Tensor) -> None:
        cap = self.capacity
        self._latent = torch.empty((cap, *latent.shape), dtype=torch.float32)
        self._hidden = torch.empty((cap, *hidden.shape), dtype=torch.complex64)
        self._action = torch.empty((cap, *action.shape), dtype=torch.int64)
        self._starts = torch.zeros(cap, dtype=torch.bool)

    def add(self, latent: Tensor, hidden: Tensor, action: Tensor, continues: bool = True) -> None:
        """Append one step: latent z_t [L], hidden h_t [depth, dim] (the state the
        agent used with z_t), action a_t [5]. `continues=False` marks a break."""
        with self._lock:
            if self._latent is None:
                self._allocate(latent, hidden, action)
            for name, got, store in (('latent', latent, self._latent), ('hidden', hidden, self._hidden),
                                     ('action', action, self._action)):
                if got.shape != store.shape[1:]:
                    raise ValueError(
                        f'{name} shape {list(got.shape)} differs from the buffer\'s {list(store.shape[1:])}')
            if self._size < self.capacity:
                slot = (self._head + self._size) % self.capacity
                self._size += 1
            else:  # full: overwrite the oldest, which moves the head on
                slot = self._head
                self._head = (self._head + 1) % self.capacity
            self._latent[slot].copy_(latent.detach())
            self._hidden[slot].copy_(hidden.detach())
            self._action[slot].copy_(action.detach())
            self._starts[slot] = self._break_next or not continues
            self._break_next = False
            self._new += 1
            self._added += 1

    def _ordered(self) -> Tensor:
        """Ring indices of the stored steps, oldest first."""
        return (self._head + torch.arange(self._size)) % self.capacity

    def chunks(self, length: int, mark_trained: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every window of `length` consecutive steps that spans no break.

        For a window starting at step i (T = length - 1 transitions):
        z = latents i..i+T-1 [N,T,L], h0 = hidden of step i [N,depth,dim],
        a = actions i..i+T-1 [N,T,5], target = latents i+1..i+T [N,T,L].
        Windows overlap (stride 1), as the reference's random time-series
        sampler; `mark_trained` resets `new_count` in the same locked step.
        """
        if length < 2:
            raise ValueError(f'chunk length must be >= 2, got {length}')
        with self._lock:
            if mark_trained:
                self._new = 0
            n = self._size
            if self._latent is None or n < length:
                empty = torch.empty(0)
                return empty, empty, empty, empty
            order = self._ordered()
            starts = self._starts[order].to(torch.int64)
            # Breaks inside window i = starts at positions i+1 .. i+length-1.
            csum = torch.cumsum(starts, 0)
            first = torch.arange(n - length + 1)
            inside = csum[first + length - 1] - csum[first]
            first = first[inside == 0]
            window = order[first[:, None] + torch.arange(length)]  # ring indices [N, length]
            latents = self._latent[window]
            # Advanced indexing already copies: nothing returned aliases the ring.
            return latents[:, :-1], self._hidden[window[:, 0]], self._action[window[:, :-1]], latents[:, 1:]

    def state_dict(self) -> BufferState:
        with self._lock:
            tensors: dict[str, Tensor] = {}
            if self._latent is not None and self._size:
                order = self._ordered()
                tensors = {'latent': self._latent[order].clone(), 'hidden': self._hidden[order].clone(),
                           'action': self._action[order].clone(), 'starts': self._starts[order].clone()}
            info: StateInfo = {'kind': 'dynamics', 'capacity': self.capacity, 'size': self._size,
                               'new_count': self._new, 'added': self._added,
                               'break_next': int(self._break_next)}
            return tensors, info

    def load_state_dict(self, tensors: dict[str, Tensor], info: StateInfo) -> None:
        """Restore steps (the newest `capacity` if more were saved) and counters."""
        check_kind(info, 'dynamics')
        with self._lock:
            self._head, self._size = 0, 0
            self._latent = self._hidden = self._action = self._starts = None
            if 'latent' in tensors and len(tensors['latent']):
                keep = slice(max(0, len(tensors['latent']) - self.capacity), None)
                latent, hidden = tensors['latent'][keep], tensors['hidden'][keep]
                action, starts = tensors['action'][keep], tensors['starts'][keep].to(torch.bool)
                self._allocate(latent[0], hidden[0], action[0])
                n = len(latent)
                self._latent[:n].copy_(latent)
                self._hidden[:n].copy_(hidden)
                self._action[:n].copy_(action)
                self._starts[:n].copy_(starts)
                self._starts[0] = True  # whatever preceded it is gone
                self._size = n
            self._new = int(info.get('new_count', 0))
            self._added = int(info.get('added', self._size))
            self._break_next = bool(info.get('break_next', 1))
