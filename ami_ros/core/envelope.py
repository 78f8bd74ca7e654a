"""The tensor envelope: one codec for every tensor that crosses a process.

An envelope is a safetensors blob: tensor names, dtypes and shapes live in its
JSON header, the data is raw, and nothing is ever unpickled, so decoding an
envelope from anywhere can never run code. Its metadata holds a `schema` name
(what the envelope is, e.g. ``weights/encoder`` or ``experience``), the
envelope format version, and free string entries such as model versions.

Decoding validates the blob against what the receiver expects (names, dtypes,
shapes, finite values) and raises `EnvelopeError` with a one-line reason
before anything is used.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

ENVELOPE_VERSION = '1'
_RESERVED = ('schema', 'envelope_version')


class EnvelopeError(ValueError):
    """A blob that is not the envelope the receiver expects; the text says why."""


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor; None in `shape` matches any size."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ','.join('*' if d is None else str(d) for d in self.shape)
        return f'{_dtype_name(self.dtype)}[{dims}]'


@dataclass
class Envelope:
    schema: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def int_meta(self, key: str, default: int | None = None) -> int:
        """An integer metadata entry (versions, counters)."""
        if key not in self.metadata:
            if default is None:
                raise EnvelopeError(f'{self.schema} envelope has no {key!r} entry')
            return default
        try:
            return int(self.metadata[key])
        except ValueError:
            raise EnvelopeError(
                f'{self.schema} envelope entry {key!r}={self.metadata[key]!r} is not an integer'
            ) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix('torch.')


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The exact specs of a set of tensors, e.g. of a model's state_dict."""
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def size_limit(expected: Mapping[str, TensorSpec], metadata_bytes: int = 4096) -> int:
    """The most bytes an envelope of exactly these tensors can take, to refuse a larger blob unread.

    The data is exact; the JSON header is bounded generously (names escaped
    at worst, 20-digit numbers) plus `metadata_bytes` for the metadata.
    """
    total = 8 + 8 + metadata_bytes  # header length, header alignment padding
    for name, spec in expected.items():
        if any(d is None for d in spec.shape):
            raise ValueError(f'{name}: the size of {spec.describe()} is not known in advance')
        itemsize = torch.empty((), dtype=spec.dtype).element_size()
        total += math.prod(spec.shape) * itemsize + 6 * len(name) + 96 + 21 * len(spec.shape)
    return total


def encode(tensors: Mapping[str, torch.Tensor], schema: str,
           metadata: Mapping[str, object] | None = None) -> bytes:
    """Pack tensors and string metadata into one envelope blob."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    for key in _RESERVED:
        if key in meta:
            raise ValueError(f'metadata key {key!r} is reserved by the envelope')
    meta['schema'] = schema
    meta['envelope_version'] = ENVELOPE_VERSION
    prepared = {name: t.detach().to('cpu').contiguous() for name, t in tensors.items()}
    return _st_save(prepared, metadata=meta)


def read_header(blob: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and metadata of a blob, checked for truncation."""
    if len(blob) < 8:
        raise EnvelopeError(f'envelope is truncated: {len(blob)} bytes, not even a header length')
    (header_len,) = struct.unpack('<Q', blob[:8])
    if header_len > len(blob) - 8:
        raise EnvelopeError(
            f'envelope is truncated: header says {header_len} bytes, only {len(blob) - 8} follow')
    try:
        header = json.loads(bytes(blob[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f'envelope header is not valid JSON ({exc.__class__.__name__})') from None
    if not isinstance(header, dict):
        raise EnvelopeError('envelope header is not a JSON object')
    metadata = header.pop('__metadata__', None) or {}
    data_len = len(blob) - 8 - header_len
    for name, entry in header.items():
        try:
            end = int(entry['data_offsets'][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise EnvelopeError(f'envelope entry {name!r} has no valid data_offsets') from None
        if end > data_len:
            raise EnvelopeError(
                f'envelope is truncated: tensor {name!r} ends at byte {end}, data has {data_len}')
    return header, metadata


def decode(blob: bytes, schema: str | None = None,
           expected: Mapping[str, TensorSpec] | None = None, *,
           allow_extra: bool = False, require_finite: bool = True,
           max_bytes: int | None = None) -> Envelope:
    """Unpack and validate an envelope.

    `schema`: the schema name the receiver expects (None: any). `expected`:
    the tensors it needs, by name; missing ones, unexpected ones (unless
    `allow_extra`), and any dtype or shape mismatch are refused. With
    `require_finite`, NaN or infinite floating values are refused too. A blob
    longer than `max_bytes` is refused before any of it is read.
    """
    if max_bytes is not None and len(blob) > max_bytes:
        raise EnvelopeError(f'envelope is larger than the {max_bytes} bytes expected')
    blob = bytes(blob)
    _, metadata = read_header(blob)
    got_schema = metadata.get('schema')
    if got_schema is None:
        raise EnvelopeError('blob is safetensors but not an ami_ros envelope (no schema entry)')
    if schema is not None and got_schema != schema:
        raise EnvelopeError(f'envelope schema is {got_schema!r}, expected {schema!r}')
    version = metadata.get('envelope_version')
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(
            f'envelope format version {version!r} is not supported (this build reads {ENVELOPE_VERSION})')
    try:
        tensors = _st_load(blob)
    except SafetensorError as exc:
        raise EnvelopeError(f'envelope data is damaged: {exc}') from None
    if expected is not None:
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise EnvelopeError(f'{got_schema} envelope is missing {", ".join(sorted(missing))}')
        if not allow_extra:
            extra = [name for name in tensors if name not in expected]
            if extra:
                raise EnvelopeError(
                    f'{got_schema} envelope has unexpected {", ".join(sorted(extra))}')
        for name, spec in expected.items():
            t = tensors[name]
            if t.dtype != spec.dtype:
                raise EnvelopeError(
                    f'{got_schema} envelope: {name} has dtype {_dtype_name(t.dtype)}, '
                    f'expected {_dtype_name(spec.dtype)}')
            if len(t.shape) != len(spec.shape) or any(
                    want is not None and want != got for want, got in zip(spec.shape, t.shape, strict=True)):
                raise EnvelopeError(
                    f'{got_schema} envelope: {name} has shape {list(t.shape)}, '
                    f'expected {spec.describe()}')
    if require_finite:
        for name, t in tensors.items():
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                raise EnvelopeError(f'{got_schema} envelope: {name} holds NaN or infinite values')
    user_meta = {k: v for k, v in metadata.items() if k not in _RESERVED}
    return Envelope(schema=got_schema, tensors=tensors, metadata=user_meta)
