"""b-bit packing: round trips, numba == torch bytes, the bit layout, rejected bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedquant.packing import pack, packed_len, unpack

LENGTHS = [0, 1, 7, 8, 9, 15, 17, 1001, 4099]


def _values(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + n * 10 + bits)
    return torch.randint(0, 1 << bits, (n,), generator=g)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_and_backends_agree(bits):
    for n in LENGTHS:
        v = _values(n, bits)
        blob = pack(v, bits, backend="numba")
        assert len(blob) == packed_len(n, bits)
        assert blob == pack(v, bits, backend="torch"), (bits, n)
        assert blob == pack(v, bits)  # auto picks numba on CPU
        for backend in ("numba", "torch"):
            got = unpack(blob, bits, n, backend=backend)
            assert got.dtype == torch.int64
            assert torch.equal(got, v), (bits, n, backend)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_layout_is_lsb_first_little_endian(bits):
    # value i occupies bits [i*b, (i+1)*b) of the little-endian bit stream
    v = _values(37, bits, seed=3)
    stream = sum(int(x) << (i * bits) for i, x in enumerate(v.tolist()))
    want = stream.to_bytes(packed_len(37, bits), "little")
    assert pack(v, bits) == want


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_other_integer_dtypes_pack_alike(dtype):
    v = _values(333, 3)
    assert pack(v.to(dtype), 3) == pack(v, 3) == pack(v.to(dtype), 3, backend="torch")


def test_multidimensional_and_noncontiguous_input():
    v = _values(64, 4).reshape(8, 8)
    assert pack(v.T, 4) == pack(v.T.reshape(-1), 4, backend="torch")


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bad", [[0, 4], [-1, 0], [0, 1 << 40]])
def test_out_of_range_values_rejected(backend, bad):
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        pack(torch.tensor(bad), 2, backend=backend)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(b"\x00", bits, 1)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="backend"):
        pack(torch.zeros(4, dtype=torch.int64), 2, backend="cuda")
    with pytest.raises(ValueError, match="expected 1"):
        unpack(b"\x00\x00", 2, 4)
    with pytest.raises(ValueError, match="count"):
        unpack(b"", 2, -1)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_property_round_trip(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    v = torch.tensor(values, dtype=torch.int64)
    blob = pack(v, bits)
    assert blob == pack(v, bits, backend="torch")
    assert torch.equal(unpack(blob, bits, len(values)), v)
    assert torch.equal(unpack(blob, bits, len(values), backend="torch"), v)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300),
       slack=st.sampled_from([0, 0, 0, -1, 1, 5]), data=st.data())
def test_property_unpack_arbitrary_bytes(bits, count, slack, data):
    # any bytes of the right length unpack to in-range values and re-pack to themselves
    # once the final byte's padding bits are cleared; any other length is a ValueError
    size = max(packed_len(count, bits) + slack, 0)
    blob = data.draw(st.binary(min_size=size, max_size=size))
    if size != packed_len(count, bits):
        for backend in ("numba", "torch"):
            with pytest.raises(ValueError, match="bytes"):
                unpack(blob, bits, count, backend=backend)
        return
    got = unpack(blob, bits, count)
    assert torch.equal(got, unpack(blob, bits, count, backend="torch"))
    assert bool(((got >= 0) & (got < 1 << bits)).all())
    stream = int.from_bytes(blob, "little") & ((1 << (count * bits)) - 1)
    assert pack(got, bits) == stream.to_bytes(len(blob), "little")


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [8, 64, 4096])
def test_uint8_word_packer_matches_the_generic_one(bits, n):
    # uint8 values, a multiple of 8 of them: the shift-and-mask packer (_pack_bytes)
    v = _values(n, bits, seed=n).to(torch.uint8)
    assert pack(v, bits) == pack(v.to(torch.int64), bits) == pack(v, bits, backend="torch")
    bad = v.clone()
    bad[n // 2 + 1] = 1 << bits  # one value just out of range, inside a word
    with pytest.raises(ValueError, match=f"in \\[0, {1 << bits}\\)"):
        pack(bad, bits)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bits", range(1, 9))  # 1, 2, 4, 8: the whole-byte loops
def test_unpack_to_uint8(backend, bits):
    for n in LENGTHS:
        v = _values(n, bits, seed=5)
        got = unpack(pack(v, bits), bits, n, backend=backend, dtype=torch.uint8)
        assert got.dtype == torch.uint8 and torch.equal(got.long(), v), (bits, n)
    with pytest.raises(ValueError, match="dtype"):
        unpack(pack(v, bits), bits, v.numel(), dtype=torch.int32)
