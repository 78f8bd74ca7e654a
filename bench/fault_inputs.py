"""Bad input for every entry point of the graph, from a seeded generator (bench/faults.py, test_faults.py).

Each function returns `n` inputs built from `rng` (numpy's Generator), so a
seed replays a run exactly. They are hostile or broken in the ways a wrong
peer, a bit error or a fuzzer would be: random bytes, valid framing with
wrong types, sizes, addresses, huge or non-finite values, truncation and
flipped bits of a valid message. None of them is a valid command: nothing here
pauses, saves or stops the graph by being well-formed.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

VRCHAT_INPUTS = ('/input/Vertical', '/input/Horizontal', '/input/LookHorizontal', '/input/Jump',
                 '/input/Run', '/input/MoveForward', '/input/LookLeft')
STRANGE_NUMBERS = (math.nan, math.inf, -math.inf, 1e300, -1e-300, 2**31 - 1, -2**31, 2**62, 0, -0.0)


def _bytes(rng: np.random.Generator, size: int) -> bytes:
    return rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def _flip_bits(blob: bytes, rng: np.random.Generator, flips: int, start: int = 0) -> bytes:
    data = bytearray(blob)
    for _ in range(flips):
        where = int(rng.integers(start, len(data)))
        data[where] ^= 1 << int(rng.integers(0, 8))
    return bytes(data)


def _cut(blob: bytes, rng: np.random.Generator) -> bytes:
    return blob[:int(rng.integers(0, len(blob)))]


# -- OSC datagrams, to doom_world's (VRChat's) UDP port ------------------------
def osc_datagrams(rng: np.random.Generator, n: int) -> list[bytes]:
    """Raw bytes, truncated or bit-flipped OSC, and OSC with wrong addresses, types and values."""
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder

    def message(address: str, values: list[Any]) -> bytes:
        builder = OscMessageBuilder(address=address)
        for value in values:  # a float beyond float32 goes as an OSC double ('d')
            big = isinstance(value, float) and math.isfinite(value) and abs(value) > 3e38
            builder.add_arg(value, 'd' if big else None)
        return builder.build().dgram

    def value() -> Any:
        pick = int(rng.integers(0, 7))
        return [lambda: float(rng.choice(STRANGE_NUMBERS)), lambda: int(rng.integers(-2**31, 2**31)),
                lambda: 'x' * int(rng.integers(0, 300)), lambda: _bytes(rng, int(rng.integers(1, 64))),
                lambda: bool(rng.integers(0, 2)), lambda: None, lambda: float(rng.normal() * 1e6)][pick]()

    out = []
    for _ in range(n):
        kind = int(rng.integers(0, 7))
        address = str(rng.choice(VRCHAT_INPUTS)) if rng.random() < 0.7 else \
            '/' + _bytes(rng, int(rng.integers(0, 40))).decode('latin-1').replace('\0', '')
        if kind == 0:
            out.append(_bytes(rng, int(rng.integers(1, 1400))))
        elif kind == 1:
            out.append(_cut(message(address, [value()]), rng) or b'/')
        elif kind == 2:
            out.append(_flip_bits(message(address, [value(), value()]), rng, 3))
        elif kind == 3:  # a well-formed bundle of wrong messages, or one that says it is longer
            bundle = OscBundleBuilder(IMMEDIATELY)
            for _ in range(int(rng.integers(1, 4))):
                bundle.add_content(OscMessageBuilder(address=str(rng.choice(VRCHAT_INPUTS))).build())
            blob = bundle.build().dgram
            out.append(blob if rng.random() < 0.5 else blob[:16] + b'\x7f\xff\xff\xff' + blob[20:])
        else:  # valid framing, wrong types / counts / values, at the real addresses
            out.append(message(address, [value() for _ in range(int(rng.integers(0, 4)))]))
    return out


# -- camera frames, to camera/image_raw (the agent, vae_trainer, recorder) -----------
def bad_images(rng: np.random.Generator, n: int) -> list[Any]:
    """sensor_msgs/Image with wrong sizes, encodings, steps, byte orders and truncated data."""
    from sensor_msgs.msg import Image

    encodings = ('rgb8', 'bgr8', 'rgba8', 'mono8', 'mono16', '16UC1', '32FC1', 'yuv422', 'bayer_rggb8',
                 '', 'RGB8', 'rgb8\0', 'x' * 300)
    out = []
    for _ in range(n):
        msg = Image()
        msg.header.frame_id = 'fuzz'
        msg.height = int(rng.choice([0, 1, 3, 84, 85, 480, 2**16, 2**31, 2**32 - 1]))
        msg.width = int(rng.choice([0, 1, 7, 84, 640, 2**16, 2**32 - 1]))
        msg.encoding = str(rng.choice(encodings))
        msg.is_bigendian = int(rng.integers(0, 256))
        msg.step = int(rng.choice([0, 1, msg.width * 3 % 2**32, msg.width * 3 + 1, 2**32 - 1]))
        expected = msg.height * msg.step
        size = int(rng.choice([0, 1, 252, 84 * 84 * 3 - 1, 84 * 84 * 3 + 5, 50_000]))
        if 0 < expected <= 200_000 and rng.random() < 0.5:
            size = int(rng.integers(0, expected + 1))  # truncated, or exactly as claimed
        msg.data = _bytes(rng, size)
        out.append(msg)
    return out


# -- experience envelopes, to the experience topic (dynamics_trainer, policy_trainer) --
def bad_experiences(rng: np.random.Generator, n: int, valid: bytes, preset_name: str) -> list[bytes]:
    """Random bytes and `valid` (a real step) truncated, bit-flipped, re-made with wrong tensors
    (shapes, dtypes, NaN, out-of-range actions) or wrong metadata (preset, step, flags)."""
    import torch

    from ami_ros.core.envelope import decode, encode
    from ami_ros.core.schemas import EXPERIENCE_SCHEMA

    env = decode(valid, EXPERIENCE_SCHEMA)
    header = 8 + int.from_bytes(valid[:8], 'little')

    def remade() -> bytes:
        tensors = {k: v.clone() for k, v in env.tensors.items()}
        meta = {k: v for k, v in env.metadata.items() if k not in ('schema', 'envelope_version')}
        name = str(rng.choice(sorted(tensors)))
        pick = int(rng.integers(0, 8))
        if pick == 0:
            tensors[name] = torch.zeros(int(rng.integers(0, 5)), 2, dtype=tensors[name].dtype)
        elif pick == 1:
            t = tensors[name]
            tensors[name] = torch.view_as_real(t) if t.is_complex() else t.to(
                torch.float64 if t.is_floating_point() else torch.int32)
        elif pick == 2 and (tensors[name].is_floating_point() or tensors[name].is_complex()):
            tensors[name].view(-1)[0] = float(rng.choice([math.nan, math.inf, -math.inf]))
        elif pick == 3:  # actions and previous actions outside every head's choices
            tensors['action'] = torch.tensor(rng.choice([-1, 7, 2**40], 5), dtype=torch.int64)
            tensors['previous_action'] = torch.tensor(rng.choice([-5, 99], 5), dtype=torch.int64)
        elif pick == 4:
            del tensors[name]
        elif pick == 5:
            tensors[f'extra_{name}'] = tensors[name].clone()
        elif pick == 6:
            meta[str(rng.choice(['preset', 'step', 'continues', 'reward_valid', 'version_policy']))] = \
                str(rng.choice(['ami', '', '-1', '1e99', 'nan', '9' * 40, 'x']))
        else:
            meta['step'], meta['continues'] = str(int(rng.integers(-2**62, 2**62))), '1'
        return encode(tensors, EXPERIENCE_SCHEMA, meta)

    out = []
    for _ in range(n):
        kind = int(rng.integers(0, 6))
        if kind == 0:
            out.append(_bytes(rng, int(rng.integers(0, 4096))))
        elif kind == 1:
            out.append(_cut(valid, rng))
        elif kind == 2:
            out.append(_flip_bits(valid, rng, int(rng.integers(1, 8)), start=0 if rng.random() < 0.5
                                  else header))
        elif kind == 3:  # a header that claims a huge length
            out.append(int(rng.choice([2**63 - 1, 2**32, len(valid)])).to_bytes(8, 'little') + valid[8:])
        else:
            out.append(remade())
    return out


# -- SetParameters requests, to agent/sync_weights and <node>/save_checkpoint ----------
def bad_parameter_requests(rng: np.random.Generator, n: int, weights: dict[str, bytes],
                           checkpoint_dir: Path) -> list[list[Any]]:
    """Parameter lists of random names, types and values: damaged weights envelopes (truncated,
    flipped header, NaN), paths outside every allowed folder, links, devices, huge strings."""
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue

    strings = ['', 'file://', 'file:///etc/passwd', 'file:///dev/zero', 'file:///proc/self/mem',
               f'file://{checkpoint_dir}', str(checkpoint_dir), str(checkpoint_dir / '..'),
               str(checkpoint_dir / '.none.partial'), str(checkpoint_dir / '.none.partial' / '..' / '..'),
               '/', '/tmp', '../../etc', 'x' * 100_000, '\0', 'directory']
    names = ['encoder', 'decoder', 'dynamics', 'policy', 'directory', '', 'x' * 500, 'policy.weight']

    from ami_ros.core.envelope import EnvelopeError, decode, specs_of
    from ami_ros.core.schemas import weights_schema

    def still_valid(model: str, blob: bytes, valid: bytes) -> bool:
        # A flipped bit in the data (or in a version digit) leaves a well-formed envelope of finite
        # weights, which the agent rightly takes: weights carry no checksum. Not bad input.
        try:
            decode(blob, weights_schema(model), specs_of(decode(valid).tensors))
        except EnvelopeError:
            return False
        return True

    def damaged_weights() -> bytes:
        model = str(rng.choice(sorted(weights)))
        blob = weights[model]
        header = 8 + int.from_bytes(blob[:8], 'little')
        while True:
            pick = int(rng.integers(0, 4))
            if pick == 0:
                damaged = _cut(blob, rng)
            elif pick == 1:
                damaged = _flip_bits(blob[:header], rng, 2, start=8) + blob[header:]
            elif pick == 2:  # the first float of the data made NaN: decoding must refuse non-finite
                damaged = blob[:header] + b'\x00\x00\xc0\x7f' + blob[header + 4:]
            else:
                damaged = _bytes(rng, int(rng.integers(0, 2048)))
            if not still_valid(model, damaged, blob):
                return damaged

    def value() -> Any:
        kind = int(rng.integers(0, 9))
        v = ParameterValue(type=[ParameterType.PARAMETER_NOT_SET, ParameterType.PARAMETER_BOOL,
                                 ParameterType.PARAMETER_INTEGER, ParameterType.PARAMETER_DOUBLE,
                                 ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_BYTE_ARRAY,
                                 ParameterType.PARAMETER_BYTE_ARRAY, ParameterType.PARAMETER_STRING_ARRAY,
                                 ParameterType.PARAMETER_DOUBLE_ARRAY][kind])
        v.bool_value = bool(rng.integers(0, 2))
        v.integer_value = int(rng.integers(-2**62, 2**62))
        v.double_value = float(rng.choice(STRANGE_NUMBERS))
        v.string_value = str(rng.choice(strings))
        if kind == 5:
            v.byte_array_value = [bytes([b]) for b in damaged_weights()]
        elif kind == 6:
            v.byte_array_value = [bytes([b]) for b in _bytes(rng, int(rng.integers(0, 512)))]
        v.string_array_value = [str(rng.choice(strings)) for _ in range(int(rng.integers(0, 3)))]
        v.double_array_value = [float(rng.choice(STRANGE_NUMBERS)) for _ in range(int(rng.integers(0, 3)))]
        if kind == 4 and rng.random() < 0.5:  # the type says string, but every field is set
            v.type = int(rng.integers(0, 256))
        return v

    return [[Parameter(name=str(rng.choice(names)), value=value()) for _ in range(int(rng.integers(0, 4)))]
            for _ in range(n)]


# -- HTTP, to the control API (web_api) --------------------------------------
def bad_http(rng: np.random.Generator, n: int) -> list[bytes]:
    """Malformed requests. A command path only ever comes with a wrong method or a body, so none of
    these pauses, saves or stops the graph."""
    commands = ['/api/pause', '/api/resume', '/api/shutdown', '/api/save-state', '/api/save-checkpoint']
    out = []
    for _ in range(n):
        kind = int(rng.integers(0, 8))
        if kind == 0:
            out.append(_bytes(rng, int(rng.integers(1, 2048))))
        elif kind == 1:
            out.append(b'GET /' + b'A' * int(rng.integers(1000, 70_000)) + b' HTTP/1.1\r\n\r\n')
        elif kind == 2:
            out.append(b'GET /api/status HTTP/1.1\r\n' + b''.join(
                b'X-%d: %s\r\n' % (i, b'y' * 100) for i in range(int(rng.integers(50, 200)))) + b'\r\n')
        elif kind == 3:
            method = rng.choice([b'GET', b'PUT', b'DELETE', b'PATCH', b'OPTIONS', b'get', b'\x00\xff'])
            out.append(method + b' ' + str(rng.choice(commands)).encode() + b' HTTP/1.1\r\n\r\n')
        elif kind == 4:
            length = rng.choice([b'3', b'-1', b'abc', b'99999999999999999999', b'1e9'])
            out.append(b'POST ' + str(rng.choice(commands)).encode() + b' HTTP/1.1\r\nContent-Length: '
                       + length + b'\r\n\r\nabc')
        elif kind == 5:
            out.append(b'GET /api/status HTTP/' + rng.choice([b'9.9', b'x', b'', b'1.1 extra']) + b'\r\n\r\n')
        elif kind == 6:
            out.append(_cut(b'GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n', rng) or b'G')
        else:
            junk = _bytes(rng, 20).replace(b' ', b'').replace(b'\n', b'')
            out.append(b'GET /api/%s HTTP/1.0\r\n\r\n' % junk)
    return out


# -- damaged checkpoints, for checkpoint:= ------------------------------------
def damaged_checkpoints(source: Path, out: Path, rng: np.random.Generator, n: int
                        ) -> list[tuple[Path, str]]:
    """Copies of checkpoint `source`, each with one data file bit-flipped or truncated, or its
    manifest truncated: (directory, what was done)."""
    files = sorted(p for p in source.rglob('*') if p.is_file() and p.name != 'manifest.json')
    damaged = []
    for i in range(n):
        copy = out / f'damaged-{i}'
        shutil.copytree(source, copy)
        kind = i % 3
        target = copy / 'manifest.json' if kind == 2 else copy / str(rng.choice(files)).removeprefix(
            str(source) + '/')
        blob = target.read_bytes()
        if kind == 0 and blob:
            target.write_bytes(_flip_bits(blob, rng, 1))
            what = f'bit flipped in {target.relative_to(copy)}'
        else:
            target.write_bytes(blob[:int(rng.integers(0, max(1, len(blob))))])
            what = f'{target.relative_to(copy)} truncated'
        damaged.append((copy, what))
    return damaged
