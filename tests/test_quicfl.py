"""QUIC-FL: tables, wire format, outliers, unbiasedness, vNMSE and the rotated-domain mean."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binom, norm

import fedquant as fq
from fedquant.codecs import positions as position_code
from fedquant.codecs import quicfl, rotated
from fedquant.packing import packed_len
from fedquant.random import derive_seed
from fedquant.rotation import padded_size, rotate, slice_layout
from fedquant.wire import Section

P = 2.0**-9
T = float(norm.isf(P / 2))
SHIPPED = [(b, sb) for b, top in quicfl.DEFAULT_SHARED_BITS.items() for sb in range(top + 1)]
# REFERENCE.md: QUIC-FL vNMSE with the default shared bits (6/5/4/4) and without (l = 0)
TARGET = {1: 1.467, 2: 0.2149, 3: 0.0431, 4: 0.00968}
TARGET_L0 = {1: 8.60, 2: 0.573, 3: 0.093, 4: 0.0195}


def codec(**kw) -> quicfl.QuicFL:
    return fq.get_codec("quic-fl", **kw)


# ---- tables --------------------------------------------------------------------------------
def test_threshold_matches_p() -> None:
    assert quicfl.quic_tables(2, 5).threshold == pytest.approx(3.0973, abs=1e-4)
    assert 2 * (1 - norm.cdf(quicfl.quic_tables(2, 5).threshold)) == pytest.approx(P, rel=1e-9)


@pytest.mark.parametrize(("bits", "shared_bits"), SHIPPED)
def test_shipped_tables_are_unbiased(bits: int, shared_bits: int) -> None:
    tab = quicfl.quic_tables(bits, shared_bits)
    assert tab.receiver.shape == (2**bits, 2**shared_bits)
    assert bool((tab.receiver.diff(dim=0) > 0).all())
    assert bool(((tab.up >= 0) & (tab.up <= 1)).all())
    assert int(tab.lo.min()) >= 0 and int(tab.lo.max()) <= 2**bits - 1
    # the grid points, every midpoint between them, and random points of [-T, T]
    z = torch.cat([tab.grid, (tab.grid[1:] + tab.grid[:-1]) / 2,
                   torch.rand(5000, dtype=torch.float64) * 2 * T - T])
    assert float((tab.expected_value(z) - z).abs().max()) < 1e-6


def test_sampling_follows_the_table() -> None:
    """The codec's sampler has mean z for fixed z (over h and its private uniforms)."""
    tab = quicfl.quic_tables(1, 6)
    gen = torch.Generator().manual_seed(0)
    z = torch.tensor([-T, -2.0, -0.3, 0.0, 0.77, 1.5, 3.0, T], dtype=torch.float64)
    reps = 40000
    t = z.repeat_interleave(reps)
    h = torch.randint(0, 64, t.shape, generator=gen)
    u1 = torch.rand(t.shape, generator=gen, dtype=torch.float64)
    u2 = torch.rand(t.shape, generator=gen, dtype=torch.float64)
    values = tab.receiver[tab.sample(t, h, u1, u2), h].reshape(len(z), reps)
    sd = values.std(dim=1) / math.sqrt(reps)
    assert bool(((values.mean(dim=1) - z).abs() < 5 * sd + 1e-9).all())


# ---- round trip and wire -------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_bit_exact(bits: int, dtype: torch.dtype) -> None:
    x = torch.randn(37, 101).to(dtype)  # not a power of two: slices plus a padded tail
    c = codec(bits=bits, round_seed=11)
    enc = c.encode(x, seed=5)
    blob = enc.to_bytes()
    assert enc.nbytes == len(blob)
    parsed = fq.Encoded.from_bytes(blob)
    assert parsed.to_bytes() == blob
    assert c.encode(x, seed=5).to_bytes() == blob  # deterministic for a seed
    y, y2 = fq.decode(enc), fq.decode(parsed)
    assert y.shape == x.shape and y.dtype == dtype and torch.equal(y, y2)
    assert parsed.params["shared_bits"] == str(quicfl.DEFAULT_SHARED_BITS[bits])


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="bits"):
        codec(bits=5)
    with pytest.raises(ValueError, match="shared_bits"):
        codec(bits=2, shared_bits=9)
    with pytest.raises(ValueError, match="p must be"):
        codec(p=0.01)
    with pytest.raises(ValueError, match="round_seed"):
        codec(round_seed=-5)
    with pytest.raises(ValueError, match="rotations"):
        codec(rotations="4")


# ---- outliers ------------------------------------------------------------------------------
def _scaled(x: torch.Tensor) -> torch.Tensor:
    """t = x * sqrt(n) / ||x|| for a power-of-two x (what the codec sees with 0 RHTs)."""
    return x.double() * math.sqrt(x.numel()) / torch.linalg.vector_norm(x.double())


def test_outliers_sent_exactly() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=gen)
    x[[7, 900, 901, 4095]] = torch.tensor([40.0, -55.5, 60.25, 33.0])
    x[::16] *= 6  # and dozens of moderate outliers
    c = codec(bits=2, rotations=0)
    enc = fq.Encoded.from_bytes(c.encode(x, seed=3).to_bytes())
    expected = torch.nonzero(_scaled(x).abs() > T).reshape(-1)
    assert expected.numel() > 40
    pos = quicfl.outlier_positions(enc, 4096, enc.section("outlier_values").count)
    assert torch.equal(pos, expected)
    y = fq.decode(enc)
    assert torch.equal(y[expected], x[expected])  # bit-exact float32 values
    assert c.stats(enc)["outlier_fraction"] == expected.numel() / 4096
    # the shorter coding was chosen (sum t^2 = n caps outliers at n / T^2: gaps win here)
    gaps = position_code.varint_bytes(np.diff(expected.numpy(), prepend=-1) - 1)
    assert len(enc.section("outlier_gaps").data) == len(gaps) < packed_len(4096, 1)


@pytest.mark.parametrize(("step", "name"), [(700, "outlier_gaps"), (2, "outlier_bitmap")])
def test_position_coding_picks_the_shorter(step: int, name: str) -> None:
    n = 4096
    positions = torch.arange(3, n, step)
    (section,) = quicfl.OUTLIER_POSITIONS.encode(positions, n).values()
    gaps = position_code.varint_bytes(np.diff(positions.numpy(), prepend=-1) - 1)
    assert section.name == name
    assert len(section.data) == min(len(gaps), packed_len(n, 1))
    enc = fq.Encoded("quic-fl", {}, (n,), torch.float32, 0, sections={name: section})
    assert torch.equal(quicfl.outlier_positions(enc, n, positions.numel()), positions)


def test_varint_round_trip() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**31, 2**35 - 1], dtype=np.int64)
    data = position_code.varint_bytes(values)
    assert np.array_equal(position_code.parse_varints(data, "f"), values)


# ---- statistics: unbiasedness and vNMSE ----------------------------------------------------
@pytest.mark.parametrize("bits", [1, 3])
def test_unbiased_by_measurement(bits: int) -> None:
    """Mean of n clients' estimates of one x: NMSE about vNMSE / n (no bias floor)."""
    x = torch.randn(2048).exp()  # lognormal: large mean, skewed
    n = 200
    c = codec(bits=bits, round_seed=77)
    encs = [c.encode(x, seed=derive_seed(77, i)) for i in range(n)]
    mean = fq.decode_mean(encs)
    per_client = float(np.mean([float(fq.vnmse(x, fq.decode(e))) for e in encs[:20]]))
    nmse = float(torch.sum((mean - x) ** 2) / torch.sum(x**2))
    assert nmse == pytest.approx(per_client / n, rel=0.3)


def _measured_vnmse(c: quicfl.QuicFL, d: int, reps: int) -> float:
    gen = torch.Generator().manual_seed(2)
    vals = []
    for r in range(reps):
        x = torch.randn(d, generator=gen)
        vals.append(float(fq.vnmse(x, fq.decode(c.encode(x, seed=100 + r)))))
    return float(np.mean(vals))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vnmse_matches_reference(bits: int) -> None:
    measured = _measured_vnmse(codec(bits=bits), 2**15, 4)
    assert measured <= TARGET[bits] * 1.03
    assert measured == pytest.approx(quicfl.quic_tables(bits, quicfl.DEFAULT_SHARED_BITS[bits])
                                     .vnmse, rel=0.03)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vnmse_without_shared_randomness(bits: int) -> None:
    measured = _measured_vnmse(codec(bits=bits, shared_bits=0), 2**15, 3)
    assert measured == pytest.approx(TARGET_L0[bits], rel=0.03)


def test_bits_on_the_wire() -> None:
    """b bits per coordinate plus about p * (32 + 16) for outliers: about 0.1 bit."""
    enc = codec(bits=2).encode(torch.randn(2**16), seed=4)
    assert 2.05 < enc.bits_per_coordinate < 2.16


# ---- the rotated-domain mean ---------------------------------------------------------------
@pytest.mark.parametrize("round_seed", [123, -1])
def test_decode_mean_equals_mean_of_decodes(round_seed: int, monkeypatch) -> None:
    calls = []
    real_unrotate = quicfl.unrotate

    def counting_unrotate(*args, **kwargs):
        calls.append(args[1])
        return real_unrotate(*args, **kwargs)

    x = [torch.randn(3000) for _ in range(6)]
    c = codec(bits=2, round_seed=round_seed)
    encs = [c.encode(xi, seed=derive_seed(9, i)) for i, xi in enumerate(x)]
    weights = [1.0, 2.0, 0.5, 3.0, 1.0, 0.25]
    separate = sum(w * fq.decode(e) for w, e in zip(weights, encs, strict=True)) / sum(weights)
    monkeypatch.setattr(quicfl, "unrotate", counting_unrotate)  # the rotated-domain sum
    monkeypatch.setattr(rotated, "unrotate", counting_unrotate)  # per-client decodes
    mean = fq.decode_mean(encs, weights)
    assert torch.allclose(mean, separate, atol=1e-5, rtol=1e-4)
    # one shared rotation: one inverse; per-client rotations: one each
    assert len(calls) == (1 if round_seed >= 0 else len(encs))


@pytest.mark.parametrize("shared_bits", [-1, 0])
def test_cpu_kernel_matches_torch_path(shared_bits: int) -> None:
    """The numba receiver (h hashed inline) equals the plain torch one used on other devices."""
    c = codec(bits=3, shared_bits=shared_bits)
    x = torch.randn(5000)
    x[17] = 300.0  # an outlier in the first slice
    enc = c.encode(x, seed=6)
    out = torch.zeros(padded_size(5000), dtype=torch.float64)
    c.accumulate(out, enc, 0.5)
    assert torch.allclose(out, 0.5 * c.decode_rotated(enc), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("bits", "shared_bits", "d"), [(1, -1, 511), (2, 0, 5000), (4, -1, 70000)])
def test_cpu_quantizer_matches_torch_path(bits: int, shared_bits: int, d: int) -> None:
    """The numba sender sends the same messages and outliers as the torch one, bit for bit."""
    c = codec(bits=bits, shared_bits=shared_bits)
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    x[3] = 80.0
    z = rotate(x, 5, 0)  # padded, unrotated: the spike stays an outlier
    scales = [float(torch.linalg.vector_norm(z[s.offset: s.offset + s.size].double()))
              / math.sqrt(s.size) for s in slice_layout(d)]
    m1, p1 = c._sample_messages_cpu(z, scales, 9, d)
    m2, p2 = c.sample_messages(z, scales, 9, d)
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and p1.numel() >= 1


@pytest.mark.parametrize(("bits", "d"), [(2, 3), (3, 7), (1, 16 * quicfl.SAMPLE_CHUNK + 40)])
def test_cpu_quantizer_outlier_runs_match_torch_path(bits: int, d: int) -> None:
    """The numba sender's chunk logic: slices shorter than one gather (d = 3, 7), outliers
    side by side, on both sides of a chunk boundary, at the very start and end, and a chunk
    of outliers only (134 equal spikes in a slice of 2048: |t| = 3.9 > T); the packed
    section equals the plain packer's. (A slice of 4 or 8 has |t| <= sqrt(8) < T: no
    outliers.)"""
    c = codec(bits=bits)
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    chunk = quicfl.SAMPLE_CHUNK
    spikes = [0, 1, d - 1] + ([chunk - 1, chunk, chunk + 1, 2 * chunk - 1]
                              + list(range(2 * chunk, 3 * chunk)) if d > 3 * chunk else [])
    x[spikes] = 1e4
    z = rotate(x, 5, 0)  # unrotated: the spikes stay outliers
    scales = [float(torch.linalg.vector_norm(z[s.offset: s.offset + s.size].double()))
              / math.sqrt(s.size) for s in slice_layout(d)]
    m1, p1 = c._sample_messages_cpu(z, scales, 4, d)
    m2, p2 = c.sample_messages(z, scales, 4, d)
    assert torch.equal(m1, m2) and torch.equal(p1, p2)
    assert set(spikes) <= set(p1.tolist()) or d < T**2
    buf, count, _ = c._sample_cpu(z, scales, 4, d)
    assert quicfl._pack_messages(buf, count, bits) == Section.from_ints("q", m2, bits).data


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_encode_bytes_without_the_numba_sender(monkeypatch: pytest.MonkeyPatch,
                                               bits: int) -> None:
    """The whole encoding (messages packed from the kernel's buffer, outliers) is the same
    byte for byte when the sender falls back to the torch path (no numba)."""
    c = codec(bits=bits)
    x = torch.randn(70001, generator=torch.Generator().manual_seed(bits))
    x[5] = 500.0
    fused = c.encode(x, seed=3).to_bytes()
    monkeypatch.setattr(quicfl, "_sample_numba", None)
    assert c.encode(x, seed=3).to_bytes() == fused


def test_round_seed_argument_overrides_parameter() -> None:
    x = torch.randn(1000)
    a = codec(bits=2).encode(x, seed=1, round_seed=55)
    b = codec(bits=2, round_seed=55).encode(x, seed=1)
    assert a.to_bytes() == b.to_bytes() and a.params["round_seed"] == "55"


# ---- outlier fraction and the number of RHTs (seed 003 Theorem 4) --------------------------
def _outlier_fraction(x: torch.Tensor, rotations: int, seeds: range) -> float:
    c = codec(bits=1, rotations=rotations)
    return float(np.mean([c.stats(c.encode(x, seed=s))["outlier_fraction"] for s in seeds]))


@pytest.mark.parametrize("name", ["two-spikes", "block8", "onehot", "lognormal"])
def test_two_rhts_give_gaussian_outlier_fraction(name: str) -> None:
    inputs = pytest.importorskip("fedquant.simulations.inputs")
    x = inputs.make_input(name, 2**15, 0)
    assert _outlier_fraction(x, 2, range(4)) == pytest.approx(P, rel=0.25)  # sd about 6%


def test_one_rht_outlier_fraction_is_a_rademacher_tail() -> None:
    """With one RHT each coordinate of k equal spikes is a sum of k random signs / sqrt(k):
    its tail beyond T is not the Gaussian p. With k = 60 it is 1.37 p (the worst equal-
    weight case at this T); two spikes can never exceed sqrt(2) < T (fraction 0). Two RHTs
    give p on both."""
    d, k = 2**16, 60
    x = torch.zeros(d)
    x[torch.randperm(d, generator=torch.Generator().manual_seed(3))[:k]] = 1.0
    b = np.arange(k + 1)
    predicted = binom.pmf(b, k, 0.5)[np.abs(2 * b - k) > T * math.sqrt(k)].sum()
    one, two = _outlier_fraction(x, 1, range(6)), _outlier_fraction(x, 2, range(6))
    assert predicted / P == pytest.approx(1.367, abs=0.01)
    assert one == pytest.approx(predicted, rel=0.12)
    assert two == pytest.approx(P, rel=0.12)
    spikes2 = torch.zeros(d)
    spikes2[[5, 40000]] = 1.0
    assert _outlier_fraction(spikes2, 1, range(2)) == 0.0
    assert _outlier_fraction(torch.randn(d).exp(), 0, range(1)) > 5 * P  # no rotation: 8.6 p


# ---- defensive parsing ---------------------------------------------------------------------
@functools.cache
def _valid(many_outliers: bool = False) -> fq.Encoded:
    x = torch.randn(300, generator=torch.Generator().manual_seed(8))
    if many_outliers:
        x[::5] *= 30
    return codec(bits=3, rotations=0 if many_outliers else 2).encode(x, seed=2)


def _with(enc: fq.Encoded, **sections: Section | None) -> bytes:
    new = dict(enc.sections)
    for name, s in sections.items():
        if s is None:
            new.pop(name, None)
        else:
            new[name] = s
    return fq.Encoded(enc.codec, enc.params, enc.shape, enc.dtype, enc.seed, enc.rotations,
                      enc.scales, new).to_bytes()


def test_bad_sections_raise_wire_error_naming_the_field() -> None:
    enc = _valid()
    n = padded_size(300)
    k = enc.section("outlier_values").count
    cases = {
        "outlier_gaps": _with(enc, outlier_gaps=Section("outlier_gaps", 8, 1, b"\x80")),
        "outlier_values": _with(enc, outlier_values=Section.from_raw(
            "outlier_values", torch.full((k,), float("nan")))),
        "exactly one": _with(enc, outlier_bitmap=Section.from_ints(
            "outlier_bitmap", torch.zeros(n, dtype=torch.int64), 1)),
        "'q'": _with(enc, q=Section.from_ints("q", torch.zeros(n, dtype=torch.int64), 3)),
        "unexpected": _with(enc, extra=Section("extra", 8, 0, b"")),
        "position 351": _with(
            enc, outlier_values=Section.from_raw("outlier_values", torch.ones(2)),
            q=Section.from_ints("q", torch.zeros(n - 2, dtype=torch.int64), 3),
            outlier_gaps=Section("outlier_gaps", 8, 3, bytes([0x80 | 122, 1, 100]))),
        "gap 400": _with(enc, outlier_gaps=Section("outlier_gaps", 8, 2, bytes([0x80 | 16, 3]))),
        "non-canonical": _with(enc, outlier_gaps=Section("outlier_gaps", 8, 2, b"\x81\x00")),
    }
    for needle, blob in cases.items():
        with pytest.raises(fq.WireError, match=needle):
            fq.Encoded.from_bytes(blob)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), many=st.booleans())
def test_fuzz_mutated_blobs_raise_only_wire_error(data, many: bool) -> None:
    blob = bytearray(_valid(many).to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        enc = fq.Encoded.from_bytes(bytes(blob))
    except fq.WireError:
        return
    y = fq.decode(enc)
    assert y.shape == enc.shape


@settings(max_examples=150, deadline=None)
@given(gaps=st.binary(max_size=12), values=st.integers(0, 6), bitmap=st.booleans(),
       bits=st.binary(min_size=40, max_size=40))  # 320 bits
def test_fuzz_outlier_sections(gaps: bytes, values: int, bitmap: bool, bits: bytes) -> None:
    enc = _valid()
    n = padded_size(300)
    where = (Section("outlier_bitmap", 1, n, bits) if bitmap
             else Section("outlier_gaps", 8, len(gaps), gaps))
    changes = {"outlier_gaps": None, "outlier_bitmap": None, where.name: where,
               "outlier_values": Section.from_raw("outlier_values", torch.ones(values)),
               "q": Section.from_ints("q", torch.zeros(n - values, dtype=torch.int64), 3)}
    blob = _with(enc, **changes)
    try:
        parsed = fq.Encoded.from_bytes(blob)
    except fq.WireError:
        return
    y = fq.decode(parsed)
    pos = quicfl.outlier_positions(parsed, n, values)
    assert bool((pos.diff() > 0).all()) and (pos.numel() == 0 or int(pos.max()) < n)
    assert y.shape == parsed.shape


# ---- fedquant bench mean (its --quick path, smaller still) ----------------------------------
def test_bench_mean_writes_outputs_and_means_agree(tmp_path) -> None:
    from fedquant.simulations import bench_mean

    cfg = {**bench_mean.DEFAULTS, "codec": "quic-fl:bits=2", "d": 4096, "clients": [1, 4],
           "repeats": 1, "distinct": 2}
    rows = bench_mean.run_bench_mean(cfg, tmp_path, progress=False)
    assert [r["n"] for r in rows] == [1, 4]
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)
    for name in ("rows.csv", "rows.json", "bench_mean.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(ValueError, match="clientz"):
        bench_mean.validate_config({"clientz": [1]})
    with pytest.raises(ValueError, match="config key 'codec'.*bits"):
        bench_mean.validate_config({"codec": "quic-fl:bits=9"})


def test_cpu_receiver_with_outliers_at_slice_edges_and_long_runs() -> None:
    # rotations=0: the rotated domain is x itself (zero-padded), so the outliers sit where
    # the spikes are. Uniform values have no outliers of their own (|t| <= sqrt(3) < T),
    # so the inlier runs are longer than the receiver's cell chunk (quicfl.CELL_CHUNK);
    # the second slice starts with an outlier right after an inlier ends the first one
    d = 2**14 + 2**12 + 100
    x = torch.rand(d, generator=torch.Generator().manual_seed(3)) * 2 - 1
    edges = [0, 2**14, 2**14 + 2**12 - 1, 2**14 + 2**12, d - 1]
    x[edges] = 50.0
    c = codec(bits=2, rotations=0, round_seed=4)
    enc = fq.Encoded.from_bytes(c.encode(x, seed=9).to_bytes())
    positions = quicfl.outlier_positions(enc, padded_size(d),
                                         enc.section("outlier_values").count)
    assert positions.tolist() == edges
    assert quicfl.CELL_CHUNK < 2**14 - 1  # the first slice's run is cut into chunks
    out = torch.zeros(padded_size(d), dtype=torch.float64)
    c.accumulate(out, enc, 0.5)
    assert torch.allclose(out, 0.5 * c.decode_rotated(enc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fq.decode(enc)[edges], x[edges])  # outliers exact
