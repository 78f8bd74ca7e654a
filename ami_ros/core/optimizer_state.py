"""An optimiser's state as safetensors-ready tensors and plain JSON, and back.

Checkpoints never pickle: `flatten_optimizer` splits a torch optimiser's
state_dict into named tensors (`optimizer/<param id>/<key>`) and a JSON-able
rest; `unflatten_optimizer` joins them again; `load_optimizer` loads the
result while keeping the optimiser's own kernel choices and learning rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into named tensors and a JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, entries in state['state'].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f'optimizer/{pid}/{key}'] = value.detach().to('cpu', copy=True)
            else:
                plain[key] = value
        plain_state[str(pid)] = plain
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state['param_groups']]
    return tensors, {'state': plain_state, 'param_groups': groups}


def unflatten_optimizer(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(plain) for pid, plain in info['state'].items()}
    for name, value in tensors.items():
        if not name.startswith('optimizer/'):
            continue
        _, pid, key = name.split('/', 2)
        state.setdefault(int(pid), {})[key] = value
    # JSON turned tuples (betas) into lists; give optimisers back what they made.
    groups = [{k: (tuple(v) if k == 'betas' else v) for k, v in g.items()} for g in info['param_groups']]
    return {'state': state, 'param_groups': groups}


# Optimiser options that choose kernels, not the maths.
_IMPLEMENTATION_FLAGS = ('fused', 'foreach', 'capturable', 'differentiable')
# Options that are configuration (a trainer's learning_rate parameter), not
# state: a restored optimiser keeps the ones it was built with.
_CONFIGURED = ('lr',)


def load_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, keeping how it computes and its learning rate.

    A checkpoint from before fused kernels must not turn them off, and a
    restart with another learning rate means it.
    """
    groups = state['param_groups']
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f'optimiser state has {len(groups)} parameter groups, expected '
                         f'{len(optimizer.param_groups)}')
    own = [{k: group[k] for k in _IMPLEMENTATION_FLAGS + _CONFIGURED if k in group}
           for group in optimizer.param_groups]
    kept_groups = [{**saved, **kept} for saved, kept in zip(groups, own, strict=True)]
    optimizer.load_state_dict({'state': state['state'], 'param_groups': kept_groups})
