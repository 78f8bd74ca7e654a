"""Values as plain JSON types, for files this project writes (checkpoint state, run records).

One sanitiser for every JSON file: mappings become dicts with string keys,
tuples lists, numpy scalars Python numbers; anything JSON cannot hold (a
tensor, an array, an object) is refused with the place it was found, rather
than written as a surprise or failing later inside `json.dumps`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

NonFinite = Literal['keep', 'null']


def plain_json(value: Any, where: str = 'value', non_finite: NonFinite = 'keep') -> Any:
    """`value` as None, bool, int, float, str, list and dict (with str keys) only.

    `non_finite` says what NaN and ±inf become: 'keep' leaves them (Python's
    json writes and reads them back, as checkpoints need), 'null' makes them
    None (strict JSON readers, such as MLflow's UI, refuse NaN). Raises
    ValueError naming `where` and the type of anything else.
    """
    if non_finite not in ('keep', 'null'):
        raise ValueError(f"non_finite must be 'keep' or 'null', not {non_finite!r}")
    return _plain(value, where, non_finite == 'null')


def _plain(value: Any, where: str, null_non_finite: bool) -> Any:
    if isinstance(value, np.generic):
        value = value.item()  # numpy bool/int/float to Python's; anything else is refused below
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if null_non_finite and not math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {_key(k, where): _plain(v, where, null_non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, null_non_finite) for v in value]
    raise ValueError(f'{where}: a {type(value).__name__} is not a JSON value')


def _key(key: Any, where: str) -> str:
    """Object keys are strings in JSON; integers (optimiser parameter ids) are written as theirs."""
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise ValueError(f'{where}: a {type(key).__name__} key is not a JSON object key')
