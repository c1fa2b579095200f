"""The wire format: :class:`Encoded` and its defensive protobuf parser.

An ``Encoded`` is the in-memory form of one ``fedquant.v1.EncodedUpdate``
(``proto/fedquant/v1/update.proto``). It is self-describing: codec name and parameters,
shape, dtype, seed, rotation count, float64 scales and packed sections. Bandwidth is always
``len(enc.to_bytes())`` (``enc.nbytes``).

``Encoded.from_bytes`` validates everything it can before any large allocation: sizes are
checked against declared limits, every packed section's length against its element count,
scales for NaN/Inf, and finally the codec checks that the sections it needs are present and
consistent with the shape. Anything malformed raises :class:`WireError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from google.protobuf.message import DecodeError

from fedquant._proto import update_pb2
from fedquant.packing import pack, packed_len, unpack

FORMAT_VERSION = 1
DEFAULT_MAX_ELEMENTS = 2**31
MAX_DIMS = 8
MAX_PARAMS = 32
MAX_PARAM_LEN = 64
MAX_SCALES = 4096
MAX_SECTIONS = 16
# Larger scales overflow the float32 reconstruction (float32 max is about 2^128).
MAX_SCALE = 2.0**126
RAW_BITS = (16, 32, 64)

DTYPES = {torch.float32: update_pb2.FLOAT32, torch.float16: update_pb2.FLOAT16,
          torch.bfloat16: update_pb2.BFLOAT16}
DTYPES_BY_WIRE = {v: k for k, v in DTYPES.items()}
_RAW_NUMPY = {("float", 32): np.float32, ("float", 64): np.float64, ("float", 16): np.float16,
              ("int", 16): np.int16, ("int", 32): np.int32, ("int", 64): np.int64}


class WireError(ValueError):
    """Raised for malformed, inconsistent or oversized encoded bytes."""


@dataclass(frozen=True)
class Section:
    """A packed array: `count` elements of `bits` bits (1..8 packed, or raw 16/32/64)."""

    name: str
    bits: int
    count: int
    data: bytes

    @classmethod
    def from_ints(cls, name: str, values: torch.Tensor, bits: int) -> Section:
        """Pack unsigned integers in [0, 2^bits), bits in 1..8."""
        return cls(name, bits, values.numel(), pack(values, bits))

    @classmethod
    def from_raw(cls, name: str, values: torch.Tensor) -> Section:
        """Store a float16/32/64 or int16/32/64 tensor as little-endian words."""
        arr = values.detach().reshape(-1).cpu().numpy()
        bits = arr.dtype.itemsize * 8
        return cls(name, bits, arr.size, arr.astype(arr.dtype.newbyteorder("<")).tobytes())

    def ints(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The packed values as int64 (bits 1..8, or raw integer words)."""
        if self.bits in RAW_BITS:
            return self.raw("int", device).to(torch.int64)
        return unpack(self.data, self.bits, self.count, device)

    def raw(self, kind: str = "float", device: torch.device | str | None = None) -> torch.Tensor:
        """Raw words as a tensor of `kind` ("float" or "int") of this section's width."""
        if self.bits not in RAW_BITS:
            raise WireError(f"section '{self.name}': expected raw 16/32/64-bit words, "
                            f"got bits={self.bits}")
        dt = np.dtype(_RAW_NUMPY[(kind, self.bits)]).newbyteorder("<")
        arr = np.frombuffer(self.data, dtype=dt).astype(dt.newbyteorder("="))
        return torch.from_numpy(arr).to(device)


@dataclass
class Encoded:
    """One compressed tensor, ready for the wire (see the module docstring)."""

    codec: str
    params: dict[str, str]
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int
    rotations: int = 0
    scales: tuple[float, ...] = ()
    sections: dict[str, Section] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def section(self, name: str) -> Section:
        """The section called `name`; WireError if it is missing."""
        try:
            return self.sections[name]
        except KeyError:
            raise WireError(f"sections: missing section '{name}' for codec "
                            f"'{self.codec}'") from None

    def to_proto(self) -> update_pb2.EncodedUpdate:
        msg = update_pb2.EncodedUpdate(
            format_version=FORMAT_VERSION, codec=self.codec, shape=list(self.shape),
            dtype=DTYPES[self.dtype], seed=self.seed, rotations=self.rotations,
            scales=list(self.scales),
        )
        msg.params.update(self.params)
        for s in self.sections.values():
            msg.sections.add(name=s.name, bits=s.bits, count=s.count, data=s.data)
        return msg

    def to_bytes(self) -> bytes:
        """The serialized ``fedquant.v1.EncodedUpdate`` (deterministic field order)."""
        return self.to_proto().SerializeToString(deterministic=True)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: exactly ``len(self.to_bytes())``."""
        return self.to_proto().ByteSize()

    @property
    def bits_per_coordinate(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    @classmethod
    def from_bytes(cls, blob: bytes, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Encoded:
        """Parse and validate; raises WireError naming the first bad field."""
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise WireError(f"expected bytes, got {type(blob).__name__}")
        msg = update_pb2.EncodedUpdate()
        try:
            msg.ParseFromString(bytes(blob))
        except (DecodeError, RuntimeError, ValueError) as e:
            raise WireError(f"not a valid EncodedUpdate message: {e}") from None
        return cls.from_proto(msg, max_elements=max_elements)

    @classmethod
    def from_proto(cls, msg: update_pb2.EncodedUpdate,
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> Encoded:
        """Validate a parsed message field by field (see module docstring)."""
        from fedquant.codecs.base import codec_class  # late import: codecs import wire

        if msg.format_version != FORMAT_VERSION:
            raise WireError(f"format_version: expected {FORMAT_VERSION}, "
                            f"got {msg.format_version}")
        try:
            klass = codec_class(msg.codec)
        except ValueError as e:
            raise WireError(f"codec: {e}") from None
        if len(msg.shape) > MAX_DIMS:
            raise WireError(f"shape: at most {MAX_DIMS} dimensions, got {len(msg.shape)}")
        numel = 1
        for dim in msg.shape:
            numel *= dim
            if numel > max_elements:
                raise WireError(f"shape: {list(msg.shape)} exceeds the element cap "
                                f"{max_elements}")
        if msg.dtype not in DTYPES_BY_WIRE:
            raise WireError(f"dtype: unknown value {msg.dtype}")
        if len(msg.params) > MAX_PARAMS or any(
            len(k) > MAX_PARAM_LEN or len(v) > MAX_PARAM_LEN for k, v in msg.params.items()
        ):
            raise WireError(f"params: at most {MAX_PARAMS} entries of {MAX_PARAM_LEN} chars")
        if len(msg.scales) > MAX_SCALES:
            raise WireError(f"scales: at most {MAX_SCALES}, got {len(msg.scales)}")
        if not all(math.isfinite(s) for s in msg.scales):
            raise WireError("scales: NaN or Inf scale")
        if any(abs(s) > MAX_SCALE for s in msg.scales):
            raise WireError("scales: a scale beyond +-2^126 would overflow the float32 "
                            "reconstruction")
        if len(msg.sections) > MAX_SECTIONS:
            raise WireError(f"sections: at most {MAX_SECTIONS}, got {len(msg.sections)}")
        sections: dict[str, Section] = {}
        for s in msg.sections:
            if s.name in sections:
                raise WireError(f"sections: duplicate section '{s.name}'")
            if not (1 <= s.bits <= 8 or s.bits in RAW_BITS):
                raise WireError(f"sections['{s.name}'].bits: must be 1..8, 16, 32 or 64, "
                                f"got {s.bits}")
            if s.count > 8 * max_elements:
                raise WireError(f"sections['{s.name}'].count: {s.count} exceeds the cap")
            if len(s.data) != packed_len(s.count, s.bits):
                raise WireError(f"sections['{s.name}'].data: {len(s.data)} bytes, expected "
                                f"{packed_len(s.count, s.bits)} for {s.count} x {s.bits} bits")
            sections[s.name] = Section(s.name, s.bits, s.count, s.data)
        try:
            codec = klass.from_params(dict(msg.params))
        except (ValueError, TypeError) as e:
            raise WireError(f"params: {e}") from None
        enc = cls(codec=msg.codec, params=dict(msg.params), shape=tuple(msg.shape),
                  dtype=DTYPES_BY_WIRE[msg.dtype], seed=msg.seed, rotations=msg.rotations,
                  scales=tuple(msg.scales), sections=sections)
        codec.validate(enc)
        return enc
