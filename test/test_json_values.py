"""One JSON sanitiser: plain types through, numpy scalars as Python's, the rest refused by name."""

import json
import math

import numpy as np
import pytest
import torch

from ami_ros.core.json_values import plain_json


def test_plain_values_come_through_and_tuples_become_lists():
    value = {'rounds': 3, 'lr': 1e-3, 'name': 'vae', 'on': True, 'none': None,
             'betas': (0.9, 0.999), 'groups': [{'params': (0, 1)}]}
    out = plain_json(value)
    assert out == {'rounds': 3, 'lr': 1e-3, 'name': 'vae', 'on': True, 'none': None,
                   'betas': [0.9, 0.999], 'groups': [{'params': [0, 1]}]}
    assert type(out['betas']) is list and type(out['groups'][0]['params']) is list
    assert json.loads(json.dumps(out)) == out


def test_numpy_scalars_become_python_numbers():
    out = plain_json({'a': np.float32(0.5), 'b': np.int64(7), 'c': np.bool_(True), 'd': [np.uint8(3)]})
    assert out == {'a': 0.5, 'b': 7, 'c': True, 'd': [3]}
    assert [type(out[k]) for k in 'abc'] == [float, int, bool]
    assert type(out['d'][0]) is int


def test_integer_keys_become_strings_as_json_writes_them():
    state = {0: {'step': 4}, np.int64(2): {'step': 5}}
    out = plain_json(state)
    assert out == {'0': {'step': 4}, '2': {'step': 5}}
    assert out == json.loads(json.dumps({0: {'step': 4}, 2: {'step': 5}}))


def test_non_finite_floats_kept_or_nulled():
    value = {'nan': math.nan, 'inf': [math.inf, -math.inf], 'np': np.float64('nan'), 'ok': 1.5}
    kept = plain_json(value)
    assert math.isnan(kept['nan']) and kept['inf'] == [math.inf, -math.inf] and math.isnan(kept['np'])
    # Python's json reads back what it wrote, NaN included (checkpoints rely on it).
    again = json.loads(json.dumps(kept))
    assert math.isnan(again['nan']) and again['inf'] == [math.inf, -math.inf]
    nulled = plain_json(value, non_finite='null')
    assert nulled == {'nan': None, 'inf': [None, None], 'np': None, 'ok': 1.5}
    json.dumps(nulled, allow_nan=False)  # strict JSON: would raise on any NaN left


@pytest.mark.parametrize('bad, type_name', [
    (torch.zeros(2), 'Tensor'),
    (np.zeros(2), 'ndarray'),
    ({1, 2}, 'set'),
    (b'raw', 'bytes'),
    (object(), 'object'),
    (np.complex64(1 + 2j), 'complex'),
])
def test_anything_else_is_refused_naming_where_and_what(bad, type_name):
    with pytest.raises(ValueError) as err:
        plain_json({'state': {'inner': [1, bad]}}, where='trainers/vae/state.json')
    assert 'trainers/vae/state.json' in str(err.value)
    assert type_name in str(err.value)


def test_keys_that_are_not_strings_or_integers_are_refused():
    for key in ((1, 2), 1.5, None, True):
        with pytest.raises(ValueError, match='summary.json'):
            plain_json({key: 1}, where='summary.json')


def test_unknown_non_finite_choice_is_refused():
    with pytest.raises(ValueError, match='non_finite'):
        plain_json(1.0, non_finite='drop')
