"""The tensor envelope codec: round trips and every refusal has its reason."""

import json
import struct

import pytest
import torch

from ami_ros.core.envelope import EnvelopeError, TensorSpec, decode, encode, read_header, specs_of

DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64, torch.bool]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_round_trip_every_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        t = torch.rand(3, 4, generator=gen) > 0.5
    elif dtype.is_complex:
        t = torch.randn(3, 4, dtype=dtype, generator=gen)
    elif dtype.is_floating_point:
        t = torch.randn(3, 4, generator=gen).to(dtype)
    else:
        t = torch.randint(0, 100, (3, 4), generator=gen).to(dtype)
    blob = encode({'x': t, 'scalar': torch.tensor(7, dtype=torch.int64)}, 'test/schema',
                  {'version': 12})
    env = decode(blob, 'test/schema', {'x': TensorSpec(dtype, (3, None)),
                                       'scalar': TensorSpec(torch.int64, ())})
    assert env.tensors['x'].dtype == dtype
    assert torch.equal(env.tensors['x'], t)
    assert env.int_meta('version') == 12
    assert env.schema == 'test/schema'


def test_state_dict_round_trip_is_bit_identical():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = model.state_dict()
    env = decode(encode(sd, 'weights/test'), 'weights/test', specs_of(sd))
    assert set(env.tensors) == set(sd)
    for name, t in sd.items():
        assert torch.equal(env.tensors[name], t), name


def _blob():
    return encode({'w': torch.ones(2, 3), 'b': torch.zeros(3)}, 'weights/m', {'version': 1})


EXPECTED = {'w': TensorSpec(torch.float32, (2, 3)), 'b': TensorSpec(torch.float32, (3,))}


@pytest.mark.parametrize('cut', [0, 5, 40, -1])
def test_truncated_blob_is_refused(cut):
    blob = _blob()
    with pytest.raises(EnvelopeError, match='truncated'):
        decode(blob[:cut] if cut >= 0 else blob[:-4], 'weights/m', EXPECTED)


def test_wrong_shape_is_refused():
    blob = encode({'w': torch.ones(3, 3), 'b': torch.zeros(3)}, 'weights/m')
    with pytest.raises(EnvelopeError, match=r'w has shape \[3, 3\], expected float32\[2,3\]'):
        decode(blob, 'weights/m', EXPECTED)


def test_wrong_dtype_is_refused():
    blob = encode({'w': torch.ones(2, 3, dtype=torch.float64), 'b': torch.zeros(3)}, 'weights/m')
    with pytest.raises(EnvelopeError, match='w has dtype float64, expected float32'):
        decode(blob, 'weights/m', EXPECTED)


def test_missing_key_is_refused():
    blob = encode({'w': torch.ones(2, 3)}, 'weights/m')
    with pytest.raises(EnvelopeError, match='missing b'):
        decode(blob, 'weights/m', EXPECTED)


def test_unexpected_key_is_refused_unless_allowed():
    blob = encode({'w': torch.ones(2, 3), 'b': torch.zeros(3), 'extra': torch.ones(1)}, 'weights/m')
    with pytest.raises(EnvelopeError, match='unexpected extra'):
        decode(blob, 'weights/m', EXPECTED)
    assert 'extra' in decode(blob, 'weights/m', EXPECTED, allow_extra=True).tensors


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
def test_non_finite_weights_are_refused(bad):
    w = torch.ones(2, 3)
    w[1, 2] = bad
    blob = encode({'w': w, 'b': torch.zeros(3)}, 'weights/m')
    with pytest.raises(EnvelopeError, match='w holds NaN or infinite'):
        decode(blob, 'weights/m', EXPECTED)


def test_wrong_schema_is_refused():
    with pytest.raises(EnvelopeError, match="schema is 'weights/m', expected 'experience'"):
        decode(_blob(), 'experience')


def test_plain_safetensors_and_garbage_are_refused():
    from safetensors.torch import save

    with pytest.raises(EnvelopeError, match='not an ami_ros envelope'):
        decode(save({'w': torch.ones(1)}))
    garbage = struct.pack('<Q', 4) + b'nope'
    with pytest.raises(EnvelopeError, match='not valid JSON'):
        decode(garbage)


def test_damaged_offsets_are_refused():
    blob = _blob()
    header, meta = read_header(blob)
    (n,) = struct.unpack('<Q', blob[:8])
    header['w']['data_offsets'] = [0, 8]  # 8 bytes cannot hold 2x3 float32
    header['__metadata__'] = meta
    raw = json.dumps(header).encode()
    with pytest.raises(EnvelopeError, match='damaged'):
        decode(struct.pack('<Q', len(raw)) + raw + blob[8 + n:])


def test_metadata_reserved_and_int_meta_errors():
    with pytest.raises(ValueError, match='reserved'):
        encode({}, 's', {'schema': 'x'})
    env = decode(encode({}, 's', {'v': 'abc'}))
    with pytest.raises(EnvelopeError, match='not an integer'):
        env.int_meta('v')
    with pytest.raises(EnvelopeError, match="no 'missing' entry"):
        env.int_meta('missing')
    assert env.int_meta('missing', 0) == 0
