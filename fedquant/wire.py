"""The wire format: :class:`Encoded` and its defensive protobuf parser.

An ``Encoded`` is the in-memory form of one ``fedquant.v1.EncodedUpdate``
(``proto/fedquant/v1/update.proto``). It is self-describing: codec name and parameters,
shape, dtype, seed, rotation count, float64 scales and packed sections. Bandwidth is always
``len(enc.to_bytes())`` (``enc.nbytes``).

``Encoded.from_bytes`` validates everything it can before any large allocation: sizes are
checked against declared limits, the declared element count against the payload's size (an
expansion cap per codec, :data:`MAX_EXPANSION`), every packed section's length against its
element count and its padding bits (zero, as :func:`fedquant.packing.pack` writes them),
scales for NaN/Inf and for magnitudes that would overflow float32 once multiplied by a
level, then the codec checks that the sections it needs are present and consistent with the
shape, and finally every raw floating-point section is checked for NaN/Inf (see
:func:`raw_float_dtype`). Anything malformed raises :class:`WireError` naming the field.

So a payload that parses never carries a non-finite number, and its decode allocates at
most ``max(EXPANSION_FLOOR, ratio * len(blob))`` elements' worth of output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
# A scale times the largest level any codec uses (an 8-bit index: < 2^8) times the largest
# growth an inverse rotation can give one coordinate (sqrt(2^31) < 2^16) stays below 2^124,
# finite in float32 (max about 2^128) with room for a sum of a few such terms.
MAX_SCALE = 2.0**100
RAW_BITS = (16, 32, 64)
# Elements a payload may declare per byte of its serialized size, by codec (see
# Encoded.from_bytes). Scalar and vector quantizers send >= 1 bit per coordinate (<= 8
# elements per byte); sparse, sketched, low-rank and time-shared codecs send far fewer bits,
# and their defaults allow down to about 1/128 bit per coordinate (top-k or rand-k keeping
# 0.1% of the coordinates, a 0.1% sketch, LPLR of rank 8 on a 4096 x 4096 matrix).
DEFAULT_MAX_EXPANSION = 64.0
MAX_EXPANSION: dict[str, float] = {
    "fp32": 1.0, "fp16": 1.0, "bf16": 1.0,
    "randk": 1024.0, "topk": 1024.0, "sketch": 1024.0, "lplr": 1024.0, "timeshare": 1024.0,
    "ecdq": 256.0, "correlated": 256.0,  # entropy-coded, >= 1/16 bit per coordinate (padded)
    "eden-mix": 1024.0,  # EDEN at real budgets down to 1/32 bit (a shared random subset)
}
# Payloads declaring at most this many elements pass the expansion cap whatever their size:
# decoding them costs little, and tiny tensors have relatively large headers.
EXPANSION_FLOOR = 1 << 16

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
        little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # no copy if it is
        return cls(name, bits, arr.size, little.tobytes())

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
    def from_bytes(cls, blob: bytes, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   max_expansion: float | Mapping[str, float] | None = None) -> Encoded:
        """Parse and validate; raises WireError naming the first bad field.

        Args:
            blob: the serialized ``fedquant.v1.EncodedUpdate``.
            max_elements (int, default 2^31): cap on the declared element count.
            max_expansion (float | mapping | None, default None): cap on declared elements
                per byte of `blob` (payloads of at most ``EXPANSION_FLOOR`` elements always
                pass): one number for every codec, a ``{codec name: ratio}`` mapping that
                overrides :data:`MAX_EXPANSION` for the codecs it names, or None for
                :data:`MAX_EXPANSION` (``DEFAULT_MAX_EXPANSION`` for unlisted codecs).
        """
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise WireError(f"expected bytes, got {type(blob).__name__}")
        msg = update_pb2.EncodedUpdate()
        try:
            msg.ParseFromString(blob)  # bytes-like, parsed in place (no copy of the blob)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise WireError(f"not a valid EncodedUpdate message: {e}") from None
        return cls.from_proto(msg, max_elements=max_elements, max_expansion=max_expansion,
                              payload_bytes=len(blob))

    @classmethod
    def from_proto(cls, msg: update_pb2.EncodedUpdate,
                   max_elements: int = DEFAULT_MAX_ELEMENTS,
                   max_expansion: float | Mapping[str, float] | None = None,
                   payload_bytes: int | None = None) -> Encoded:
        """Validate a parsed message field by field (see the module docstring and
        :meth:`from_bytes`); `payload_bytes` is its serialized size (computed if None)."""
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
        if any(dim == 0 for dim in msg.shape):
            numel = 0
        size = msg.ByteSize() if payload_bytes is None else payload_bytes
        _check_expansion(msg.codec, list(msg.shape), numel, size, max_expansion)
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
            raise WireError("scales: a scale beyond +-2^100 would overflow the float32 "
                            "reconstruction once multiplied by a level")
        if len(msg.sections) > MAX_SECTIONS:
            raise WireError(f"sections: at most {MAX_SECTIONS}, got {len(msg.sections)}")
        sections: dict[str, Section] = {}
        for s in msg.sections:
            data = s.data  # each read of a bytes field makes a new bytes object: read once
            if s.name in sections:
                raise WireError(f"sections: duplicate section '{s.name}'")
            if not (1 <= s.bits <= 8 or s.bits in RAW_BITS):
                raise WireError(f"sections['{s.name}'].bits: must be 1..8, 16, 32 or 64, "
                                f"got {s.bits}")
            if s.count > 8 * max_elements:
                raise WireError(f"sections['{s.name}'].count: {s.count} exceeds the cap")
            if len(data) != packed_len(s.count, s.bits):
                raise WireError(f"sections['{s.name}'].data: {len(data)} bytes, expected "
                                f"{packed_len(s.count, s.bits)} for {s.count} x {s.bits} bits")
            _check_padding(s.name, s.bits, s.count, data)
            sections[s.name] = Section(s.name, s.bits, s.count, data)
        try:
            codec = klass.from_params(dict(msg.params))
        except (ValueError, TypeError) as e:
            raise WireError(f"params: {e}") from None
        enc = cls(codec=msg.codec, params=dict(msg.params), shape=tuple(msg.shape),
                  dtype=DTYPES_BY_WIRE[msg.dtype], seed=msg.seed, rotations=msg.rotations,
                  scales=tuple(msg.scales), sections=sections)
        codec.validate(enc)
        for section in sections.values():
            dtype = raw_float_dtype(codec, section)
            if dtype is not None and not finite_words(section.data, dtype):
                raise WireError(f"sections['{section.name}']: NaN or Inf value "
                                f"({str(dtype).removeprefix('torch.')} words)")
        return enc


def expansion_cap(codec: str, max_expansion: float | Mapping[str, float] | None = None) -> float:
    """Elements per payload byte allowed for `codec` (see :meth:`Encoded.from_bytes`)."""
    if isinstance(max_expansion, int | float):
        return float(max_expansion)
    table = {**MAX_EXPANSION, **(max_expansion or {})}
    return float(table.get(codec, DEFAULT_MAX_EXPANSION))


def _check_expansion(codec: str, shape: list[int], numel: int, size: int,
                     max_expansion: float | Mapping[str, float] | None) -> None:
    """WireError when a small payload declares a huge tensor (its decode would allocate
    elements out of all proportion to the bytes received)."""
    if numel <= EXPANSION_FLOOR:
        return
    cap = expansion_cap(codec, max_expansion)
    if numel > cap * max(size, 1):
        raise WireError(f"shape: {shape} declares {numel} elements in a {size}-byte payload "
                        f"({numel / max(size, 1):.3g} per byte), above the expansion cap of "
                        f"{cap:g} per byte for codec {codec!r}; pass max_expansion to "
                        "Encoded.from_bytes to allow more")


def _check_padding(name: str, bits: int, count: int, data: bytes) -> None:
    """WireError unless the unused high bits of a packed section's last byte are zero, as
    ``pack`` writes them (so a section packed with other bits than it declares is caught
    whenever its length alone cannot tell)."""
    used = (count * bits) % 8
    if bits < 8 and used and data[-1] >> used:
        raise WireError(f"sections['{name}'].data: non-zero padding bits after {count} x "
                        f"{bits}-bit values (packed with a different bit width?)")


def raw_float_dtype(codec: object, section: Section) -> torch.dtype | None:
    """The floating-point type of a raw (16/32/64-bit) section's words, or None for packed
    sections and raw integer words.

    A codec may declare its raw sections with an attribute ``raw_float_dtypes``, a mapping
    of section name to a float dtype, or to None for integer words. Otherwise raw words are
    IEEE floats of their width, except that 16-bit words are bfloat16 for a codec whose
    ``wire_dtype`` is ``torch.bfloat16`` (the ``bf16`` codec).
    """
    if section.bits not in RAW_BITS:
        return None
    declared = getattr(codec, "raw_float_dtypes", None)
    if declared is not None:
        return declared.get(section.name)
    if section.bits == 16:
        bf16 = getattr(codec, "wire_dtype", None) == torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float16
    return torch.float32 if section.bits == 32 else torch.float64


def finite_words(data: bytes, dtype: torch.dtype) -> bool:
    """Whether every little-endian `dtype` word of `data` is finite (no NaN, no Inf).

    float16/32 words are summed in float64 (no overflow is possible, and NaN/Inf
    propagate), so the common case is one pass with no temporary; float64 falls back to an
    exact check when its sum is not finite; bfloat16 checks the exponent bits.
    """
    if not data:
        return True
    if dtype == torch.bfloat16:
        words = np.frombuffer(data, dtype="<u2")
        return not bool(np.any((words & 0x7F80) == 0x7F80))
    kind = {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8"}.get(dtype)
    if kind is None:
        raise ValueError(f"dtype must be a float type, got {dtype}")
    words = np.frombuffer(data, dtype=kind)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is the NaN we look for
        total = float(np.sum(words, dtype=np.float64))
    if math.isfinite(total):
        return True
    return dtype == torch.float64 and bool(np.isfinite(words).all())
