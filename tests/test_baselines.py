"""Classic baselines: sign, topk, randk, sketch, timeshare, qsgd.

Round trips through the real wire, unbiasedness by measurement (the mean of many
independent decodes converges to x like vNMSE / n, a biased codec's does not), known vNMSE
values, exact top-k positions, and fuzzed parsing (only fq.WireError escapes).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedquant as fq
from fedquant._proto import update_pb2
from fedquant.codecs.sparse import decode_positions, encode_positions
from fedquant.wire import Encoded, Section

D = 1000  # small and not a power of two: exercises the slice layout and tails

CODECS = {
    "sign": {},
    "topk": {"fraction": 0.05},
    "topk-fp16": {"count": 7, "values": "fp16"},
    "randk": {"fraction": 0.1},
    "sketch": {"ratio": 0.1},
    "timeshare": {"bits": 2.0, "inner_bits": 4},
    "qsgd": {"levels": 1},
    "qsgd-linf": {"levels": 7, "norm": "linf"},
}


def _codec(key: str) -> fq.Codec:
    return fq.get_codec(key.split("-")[0], **CODECS[key])


def _x(d: int = D, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", list(CODECS))
def test_round_trip_is_bit_exact(key):
    codec = _codec(key)
    x = _x().reshape(10, 100).to(torch.bfloat16)
    enc = codec.encode(x, seed=7)
    blob = enc.to_bytes()
    assert enc.nbytes == len(blob)
    again = Encoded.from_bytes(blob)
    assert again.to_bytes() == blob
    out = fq.decode(again)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, fq.decode(enc))


def _mean_of_decodes(codec, x, n):
    total = torch.zeros_like(x, dtype=torch.float64)
    errs = []
    for s in range(n):
        x_hat = fq.decode(codec.encode(x, seed=s))
        errs.append(fq.vnmse(x, x_hat))
        total += x_hat.to(torch.float64)
    return fq.vnmse(x, (total / n).to(torch.float32)), sum(errs) / n


@pytest.mark.parametrize("key", ["randk", "sketch", "timeshare", "qsgd", "qsgd-linf"])
def test_unbiased_codecs_average_out(key):
    """E x_hat = x: the mean of n independent decodes has error vNMSE / n (a bias would
    leave a floor); 3x covers the sampling spread of the n-sample mean."""
    codec = _codec(key)
    assert codec.is_unbiased
    x = _x(64 if key == "sketch" else 256, seed=1)  # sketch work grows like d^2
    n = 60 if key == "sketch" else 150
    err_mean, vnmse = _mean_of_decodes(codec, x, n)
    assert err_mean < 3 * vnmse / n, (err_mean, vnmse / n)
    assert err_mean > vnmse / n / 3  # and the decodes really were independent


@pytest.mark.parametrize("key", ["sign", "topk"])
def test_biased_codecs_do_not_average_out(key):
    codec = _codec(key)
    assert not codec.is_unbiased
    x = _x(256, seed=1)
    err_mean, vnmse = _mean_of_decodes(codec, x, 5)
    assert err_mean == pytest.approx(vnmse, rel=1e-6)  # deterministic: no averaging gain


def test_known_vnmse_values():
    """Closed forms on N(0, 1) inputs, within sampling error."""
    d = 4096
    xs = [_x(d, seed=s) for s in range(3)]

    def vnmse(codec):
        return sum(fq.vnmse(x, fq.decode(codec.encode(x, seed=i))) for i, x in enumerate(xs)) / 3

    assert vnmse(fq.get_codec("sign")) == pytest.approx(1 - 2 / math.pi, rel=0.03)
    assert vnmse(fq.get_codec("randk", fraction=0.25)) == pytest.approx(3.0, rel=0.05)
    eden4 = 0.00959  # REFERENCE.md, EDEN unbiased b = 4
    ts = fq.get_codec("timeshare", bits=2.0, inner_bits=4)
    assert vnmse(ts) == pytest.approx((1 + eden4) / 0.5 - 1, rel=0.05)


def test_sketch_variance_is_d_over_m():
    """E||S^T S x / m - x||^2 = (d + 1) / m ||x||^2 for Gaussian S (seed 000 section 3)."""
    d, m = 64, 32
    x = _x(d, seed=2)
    codec = fq.get_codec("sketch", ratio=m / d)
    errs = [fq.vnmse(x, fq.decode(codec.encode(x, seed=s))) for s in range(60)]
    assert sum(errs) / len(errs) == pytest.approx((d + 1) / m, rel=0.15)


def test_qsgd_bits_include_the_sign():
    x = _x(800)
    for levels, bits in ((1, 2), (2, 3), (3, 3), (7, 4), (127, 8)):
        enc = fq.get_codec("qsgd", levels=levels).encode(x, seed=1)
        assert enc.section("levels").bits == bits
        assert len(enc.section("levels").data) == math.ceil(800 * bits / 8)


@pytest.mark.parametrize("fraction", [0.003, 0.05, 0.6])
def test_topk_positions_and_values_exact(fraction):
    x = _x(5000, seed=3)
    enc = fq.get_codec("topk", fraction=fraction).encode(x)
    k = round(fraction * 5000)
    kind = "bitmap" if "bitmap" in enc.sections else "gaps"
    assert kind == ("bitmap" if fraction == 0.6 else "gaps")
    out = fq.decode(Encoded.from_bytes(enc.to_bytes()))
    expect = torch.topk(x.abs(), k).indices
    kept = torch.nonzero(out).reshape(-1)
    assert torch.equal(kept, torch.sort(expect).values)
    assert torch.equal(out[kept], x[kept])  # fp32 values are exact


def test_topk_gap_code_is_smaller_than_positions():
    x = _x(2**16, seed=4)
    enc = fq.get_codec("topk", fraction=0.01).encode(x)
    position_bytes = len(enc.to_bytes()) - 4 * 655
    assert position_bytes * 8 / 655 < 10  # about log2(100) + 2 bits per position


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000).flatmap(
    lambda d: st.tuples(st.just(d), st.sets(st.integers(0, d - 1), max_size=d))))
def test_position_codes_round_trip(case):
    d, chosen = case
    positions = torch.tensor(sorted(chosen), dtype=torch.int64)
    sections = encode_positions(positions, d)
    enc = Encoded("topk", {}, (d,), torch.float32, 0, sections=sections)
    assert torch.equal(decode_positions(enc, len(chosen)), positions)


def test_randk_positions_come_from_the_seed():
    x = torch.arange(1.0, 101.0)
    codec = fq.get_codec("randk", count=10)
    enc = codec.encode(x, seed=5)
    assert list(enc.sections) == ["values"]  # positions are not sent
    out = fq.decode(enc)
    kept = torch.nonzero(out).reshape(-1)
    assert torch.equal(kept, fq.random.random_subset(5, fq.random.Purpose.SUBSET, 100, 10))
    assert torch.allclose(out[kept], x[kept] * 10)


def test_bad_parameters_are_rejected():
    bad = [("topk", {"fraction": 0.0}), ("topk", {"values": "int8"}), ("randk", {"count": -1}),
           ("sketch", {"ratio": 0}), ("timeshare", {"bits": 9.0, "inner_bits": 8}),
           ("timeshare", {"inner_bits": 0}), ("qsgd", {"levels": 0}),
           ("qsgd", {"levels": 128}), ("qsgd", {"norm": "l1"})]
    for name, params in bad:
        with pytest.raises(ValueError, match=next(iter(params))):
            fq.get_codec(name, **params)
    with pytest.raises(ValueError, match="cap"):  # refused before generating the matrix
        fq.get_codec("sketch", ratio=1.0).encode(torch.zeros(2**15))


def _blob(key: str) -> bytes:
    return _codec(key).encode(_x(300, seed=9), seed=3).to_bytes()


BLOBS = {key: _blob(key) for key in CODECS}


def _parse_and_decode(blob: bytes) -> None:
    try:
        enc = Encoded.from_bytes(blob)
    except fq.WireError:
        return
    try:
        fq.decode(enc)  # a blob that parses must decode without any other error ...
    except fq.WireError as e:  # ... but one that decodes to Inf (a huge value times d / k)
        assert "non-finite" in str(e), e


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(list(CODECS)), data=st.data())
def test_fuzz_mutated_blobs(key, data):
    blob = bytearray(BLOBS[key])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    _parse_and_decode(bytes(blob[:cut] if data.draw(st.booleans()) else blob))


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(list(CODECS)), data=st.data())
def test_fuzz_section_fields(key, data):
    """Structured mutations of every section: counts (absurd ones included), widths and
    payload bytes, plus shapes and scales. Only WireError may escape."""
    msg = update_pb2.EncodedUpdate.FromString(BLOBS[key])
    what = data.draw(st.sampled_from(["count", "bits", "data", "shape", "scale", "drop"]))
    if what == "shape":
        msg.shape[:] = [data.draw(st.integers(0, 2**40))]
    elif what == "scale":
        msg.scales.append(data.draw(st.floats(allow_nan=True)))
    else:
        s = msg.sections[data.draw(st.integers(0, len(msg.sections) - 1))]
        if what == "count":
            s.count = data.draw(st.one_of(st.integers(0, 4000), st.integers(0, 2**64 - 1)))
        elif what == "bits":
            s.bits = data.draw(st.integers(0, 70))
        elif what == "data":
            s.data = data.draw(st.binary(max_size=len(s.data) + 8))
        else:
            del msg.sections[0]
    _parse_and_decode(msg.SerializeToString())


def test_absurd_counts_are_rejected_before_allocation():
    msg = update_pb2.EncodedUpdate.FromString(BLOBS["topk"])
    msg.shape[:] = [2**31]
    with pytest.raises(fq.WireError):
        Encoded.from_bytes(msg.SerializeToString())
    msg = update_pb2.EncodedUpdate.FromString(BLOBS["sketch"])
    msg.shape[:] = [2**30]
    with pytest.raises(fq.WireError, match="cap"):
        Encoded.from_bytes(msg.SerializeToString())


def test_position_code_refuses_both_or_neither_and_bad_definitions():
    from fedquant.codecs.positions import PositionCode
    from fedquant.codecs.sparse import KEPT_POSITIONS

    positions = torch.tensor([1, 5, 9])
    gaps = KEPT_POSITIONS._gap_sections(positions)
    bitmap = torch.zeros(16, dtype=torch.uint8)
    bitmap[positions] = 1
    both = {**gaps, "bitmap": Section.from_ints("bitmap", bitmap, 1)}
    for sections, word in ((both, "both"), ({}, "neither")):
        enc = Encoded("topk", {}, (16,), torch.float32, 0, sections=sections)
        with pytest.raises(fq.WireError, match=f"exactly one.*{word}"):
            KEPT_POSITIONS.decode(enc, 16, 3)
    with pytest.raises(ValueError, match="gap_code"):
        PositionCode("gamma", bitmap="b", gaps=("g",), bitmap_on_tie=True)
    with pytest.raises(ValueError, match="2 gap section"):
        PositionCode("rice", bitmap="b", gaps=("g",), bitmap_on_tie=True)


@pytest.mark.parametrize("levels,norm", [(1, "l2"), (7, "linf"), (127, "l2")])
@pytest.mark.parametrize("d", [1, 17, 4099])
def test_qsgd_kernels_match_the_torch_lines_bit_for_bit(monkeypatch, levels, norm, d):
    """The numba sender and receiver make the torch lines' float64 operations: the same
    codes and decoded values (the norm is fixed to one function on both paths, since the
    numba sum of squares adds in another order)."""
    from fedquant.codecs import qsgd
    from tests.helpers_kernels import torch_path

    monkeypatch.setattr(qsgd, "slice_norm", lambda f: float(torch.linalg.vector_norm(f.double())))
    x = _x(d, seed=d)
    x[: d // 3] = 0.0  # zeros (and -0.0) code to s on both paths
    x[d // 3: d // 2] = -0.0
    codec = fq.get_codec("qsgd", levels=levels, norm=norm)
    enc = codec.encode(x, seed=5)
    slow, slow_decode = torch_path(monkeypatch, codec, x, 5, enc)
    assert enc.scales == slow.scales
    assert enc.section("levels").data == slow.section("levels").data
    assert torch.equal(fq.decode(enc), slow_decode)
    codes = enc.section("levels").ints()
    assert codes.max() <= 2 * levels and bool((codes != levels).any())  # not all zeros


def test_qsgd_refuses_codes_past_2s():
    enc = fq.get_codec("qsgd", levels=1).encode(_x(16), seed=1)
    bad = Section.from_ints("levels", torch.full((16,), 3), 2)  # 3 > 2s = 2
    enc.sections["levels"] = bad
    with pytest.raises(fq.WireError, match="exceeds"):
        fq.decode(enc)


@pytest.mark.parametrize("n", [2, 17, 1000, 65537])
def test_topk_kernel_picks_torchs_positions(n):
    from fedquant.codecs.sparse import top_positions

    for k in sorted({1, max(1, n // 100), n // 3, n - 1}):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n + k))  # no ties
        assert torch.equal(top_positions(x, k), torch.sort(torch.topk(x.abs(), k).indices).values)


def test_topk_kernel_breaks_ties_by_the_lowest_position():
    from fedquant.codecs.sparse import top_positions

    x = torch.tensor([1.0, -1.0, 2.0, 1.0, 0.0, -2.0, 1.0, -0.0])
    assert top_positions(x, 3).tolist() == [0, 2, 5]
    assert top_positions(x, 5).tolist() == [0, 1, 2, 3, 5]
    # many ties inside one histogram bin: still the k largest, lowest positions first
    g = torch.Generator().manual_seed(4)
    y = torch.randint(-3, 4, (5000,), generator=g).float() * 0.5
    pos = top_positions(y, 1234)
    rest = torch.ones(5000, dtype=torch.bool)
    rest[pos] = False
    assert pos.numel() == 1234 and torch.equal(pos, torch.sort(pos).values)
    assert float(y[pos].abs().min()) >= float(y[rest].abs().max())
    edge = float(y[pos].abs().min())
    tied = torch.nonzero(y.abs() == edge).flatten()
    assert torch.equal(pos[y[pos].abs() == edge], tied[: int((y[pos].abs() == edge).sum())])
