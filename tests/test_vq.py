"""VQ over three RHTs (seed 003 section 6): codebooks, wire, vNMSE against EDEN, Lemma 3 /
Theorem 6 by measurement, fuzzed parsing."""

import math

import numpy as np
import pytest
import torch
from helpers_kernels import torch_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedquant as fq
from fedquant import vq_kernel
from fedquant._proto import update_pb2
from fedquant.codecs.eden import lloyd_max_centroids
from fedquant.codecs.vq import _TABLE, SUPPORTED, codebook, nearest_block
from fedquant.rotation import padded_size
from fedquant.simulations.vq_study import (
    correlation_rows,
    exact_conditional_correlation,
    layers,
    sampled_correlation,
    two_spikes,
)
from fedquant.wire import Encoded

EDEN_BIASED = {1: 1 - 2 / math.pi, 2: 0.1175}  # REFERENCE.md


def _stored_distortion(dim: int, bits: int) -> float:
    with np.load(_TABLE) as table:
        return float(table[f"k{dim}_b{bits}_mse"])


def _scalar_distortion(bits: int) -> float:
    c = lloyd_max_centroids(bits)
    z = torch.randn(2**18, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    q = c[torch.bucketize(z, (c[1:] + c[:-1]) / 2)]
    return float(((z - q) ** 2).mean())


@pytest.mark.parametrize("dim,bits", SUPPORTED)
def test_codebooks_are_gaussian_kmeans(dim, bits):
    """Each shipped codebook quantizes fresh N(0, I) samples with its stored distortion and
    is no worse than the product of scalar Lloyd-Max quantizers at the same bits."""
    c = codebook(dim, bits)
    assert c.shape == (2 ** (dim * bits), dim) and c.dtype == torch.float32
    z = torch.randn(2**15, dim, generator=torch.Generator().manual_seed(dim * 10 + bits))
    err = float(((z - c[nearest_block(z, c)]) ** 2).mean())
    stored = _stored_distortion(dim, bits)
    assert err == pytest.approx(stored, rel=0.03)
    assert stored < _scalar_distortion(bits) * 1.005


def test_chunked_search_is_exact():
    c = codebook(4, 2)
    blocks = torch.randn(3000, 4, generator=torch.Generator().manual_seed(1))
    brute = torch.cdist(blocks, c).argmin(1)
    assert torch.equal(nearest_block(blocks, c, chunk=256 * 100), brute)


def test_round_trip_and_b_bits_per_coordinate():
    x = torch.randn(7, 333).to(torch.float16)
    codec = fq.get_codec("vq", bits=2, dim=4)
    enc = codec.encode(x, seed=11)
    blob = enc.to_bytes()
    assert enc.nbytes == len(blob)
    again = Encoded.from_bytes(blob)
    assert again.to_bytes() == blob
    out = fq.decode(again)
    assert out.shape == x.shape and out.dtype == x.dtype
    q = enc.section("q")
    assert q.bits == 8 and len(q.data) == padded_size(x.numel()) * 2 // 8  # 2 bits/coord
    assert enc.rotations == 3


def _vnmse(codec, d, trials):
    g = torch.Generator().manual_seed(7)
    errs, bits = [], []
    for t in range(trials):
        x = torch.randn(d, generator=g)
        blob = codec.encode(x, seed=t).to_bytes()
        errs.append(fq.vnmse(x, fq.decode(Encoded.from_bytes(blob))))
        bits.append(8 * len(blob) / d)
    return sum(errs) / trials, sum(bits) / trials


@pytest.mark.parametrize("bits,dim", [(1, 8), (2, 4)])
def test_vq_beats_eden_biased_at_equal_bits(bits, dim):
    """The biased VQ's vNMSE equals its codebook's Gaussian distortion (the figure the study
    reports) and beats EDEN's biased vNMSE at the same measured bits per coordinate."""
    d = 2**15
    vq, vq_bits = _vnmse(fq.get_codec("vq", bits=bits, dim=dim, scale="biased"), d, 2)
    eden, eden_bits = _vnmse(fq.get_codec("eden", bits=bits, scale="biased"), d, 2)
    assert abs(vq_bits - eden_bits) < 0.002
    assert vq == pytest.approx(_stored_distortion(dim, bits), rel=0.03)
    assert eden == pytest.approx(EDEN_BIASED[bits], rel=0.03)
    assert vq < eden


def test_unbiased_vq_averages_out():
    codec = fq.get_codec("vq", bits=1, dim=4)
    assert codec.is_unbiased and not fq.get_codec("vq", scale="biased").is_unbiased
    x = torch.randn(512, generator=torch.Generator().manual_seed(5)).exp()
    n = 60
    decodes = [fq.decode(codec.encode(x, seed=s)) for s in range(n)]
    vnmse = sum(fq.vnmse(x, y) for y in decodes) / n
    err_mean = fq.vnmse(x, torch.stack(decodes).mean(0))
    assert vnmse / n / 3 < err_mean < 3 * vnmse / n


def test_lemma3_and_theorem6_by_measurement():
    """Two-spike input e0 + e1, pair (0, 1): correlation +-1 with 2 RHTs (Lemma 3), near 0
    with 3 (Theorem 6), sampled over sign draws and from the rebuilt covariance formula."""
    draws = 400
    rows = correlation_rows(128, draws, 2)
    two = [r["value"] for r in rows if r["rotations"] == 2]  # sampled, exact, block RMS
    three = [r["value"] for r in rows if r["rotations"] == 3]
    assert two[0] == pytest.approx(1.0, abs=1e-6) and two[1] == pytest.approx(1.0, abs=1e-9)
    assert two[2] == pytest.approx(math.sqrt(4 / 28), abs=1e-9)  # 4 of 28 pairs are +-1
    assert abs(three[0]) < 3 / math.sqrt(2 * draws)
    assert three[1] < 1e-9 and three[2] < 0.5 * two[2]


def test_covariance_formula_matches_sampling():
    """The rebuilt C.1 step-5 formula against Monte Carlo for a generic (non-sparse) w."""
    w = layers(torch.randn(64, generator=torch.Generator().manual_seed(2)).exp(), [3])
    for pair in [(0, 1), (2, 7), (5, 6)]:
        exact = exact_conditional_correlation(w, pair)
        sampled = sampled_correlation(w, 1, 4000, seed=9, pair=pair)
        assert sampled == pytest.approx(exact, abs=4 / math.sqrt(4000))


@pytest.mark.parametrize("bits,dim", [(3, 2), (2, 4)])
def test_two_rhts_hurt_vq_on_the_two_spike_input(bits, dim):
    """Lemma 3's blocks lie on a subspace with 2 RHTs: the Gaussian codebook does worse."""
    x = two_spikes(2**12)

    def err(rotations):
        codec = fq.get_codec("vq", bits=bits, dim=dim, scale="biased", rotations=rotations)
        return sum(fq.vnmse(x, fq.decode(codec.encode(x, seed=s))) for s in range(3)) / 3

    three = err(3)
    assert err(2) > 1.15 * three
    assert three == pytest.approx(_stored_distortion(dim, bits), rel=0.05)


def test_auto_rotations_use_the_l4_check():
    codec = fq.get_codec("vq", rotations="auto")
    assert codec.encode(two_spikes(4096), seed=1).rotations == 3  # the check sees the spikes
    assert codec.encode(torch.randn(4096), seed=1).rotations == 2


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="supported"):
        fq.get_codec("vq", bits=2, dim=8)
    with pytest.raises(ValueError, match="scale"):
        fq.get_codec("vq", scale="lsq")
    with pytest.raises(ValueError, match="rotations"):
        fq.get_codec("vq", rotations=4)


BLOB = fq.get_codec("vq", bits=2, dim=2).encode(torch.randn(700), seed=4).to_bytes()


def _parse_and_decode(blob: bytes) -> None:
    try:
        enc = Encoded.from_bytes(blob)
    except fq.WireError:
        return
    fq.decode(enc)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_vq_blobs(data):
    if data.draw(st.booleans()):
        blob = bytearray(BLOB)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        _parse_and_decode(bytes(blob[: data.draw(st.integers(0, len(blob)))]))
        return
    msg = update_pb2.EncodedUpdate.FromString(BLOB)
    field = data.draw(st.sampled_from(["count", "bits", "data", "shape", "rotations", "params"]))
    if field == "count":
        msg.sections[0].count = data.draw(st.integers(0, 2**64 - 1))
    elif field == "bits":
        msg.sections[0].bits = data.draw(st.integers(0, 70))
    elif field == "data":
        msg.sections[0].data = data.draw(st.binary(max_size=200))
    elif field == "shape":
        msg.shape[:] = data.draw(st.lists(st.integers(0, 2**33), max_size=3))
    elif field == "rotations":
        msg.rotations = data.draw(st.integers(0, 2**32 - 1))
    else:
        msg.params["dim"] = data.draw(st.sampled_from(["1", "3", "4", "8", "x", "-2"]))
    _parse_and_decode(msg.SerializeToString())


@pytest.mark.parametrize("name", ["vq", "eden", "quic-fl", "dither"])
def test_empty_tensor_round_trips(name):
    # d = 0: no slices, no scales (slice_values of an empty layout must not fail)
    x = torch.zeros(0, 3)
    enc = fq.Encoded.from_bytes(fq.get_codec(name).encode(x, seed=1).to_bytes())
    out = fq.decode(enc)
    assert out.shape == (0, 3) and out.dtype == torch.float32


# ---- the numba kernel against the torch lines ------------------------------------------
KERNEL_SIZES = [1, 7, 100, 129, 4133, 2**16 + 37]  # tails: partial blocks and < 16 blocks


@pytest.mark.skipif(not vq_kernel.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("d", KERNEL_SIZES)
@pytest.mark.parametrize("dim,bits", SUPPORTED)
def test_kernel_encode_and_decode_equal_the_torch_path(dim, bits, d, monkeypatch):
    """Same indices (bitwise) and scales (float64 sums in another order) as the torch
    search, and a bit-identical reconstruction."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(d + dim + bits))
    codec = fq.get_codec("vq", bits=bits, dim=dim)
    assert vq_kernel.usable(x, codebook(dim, bits))
    fast = codec.encode(x, seed=3)
    fast_values = fq.decode(fast)
    slow, slow_values = torch_path(monkeypatch, codec, x, 3, fast)
    assert torch.equal(fast.section("q").ints(), slow.section("q").ints())
    assert fast.scales == pytest.approx(slow.scales, rel=1e-9)
    assert torch.equal(fast_values, slow_values)


@pytest.mark.skipif(not vq_kernel.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("x", [torch.zeros(300), torch.tensor([1e-45, -1e-45, 0.0] * 100)])
def test_kernel_and_torch_path_agree_on_zero_and_subnormal_slices(x, monkeypatch):
    """A zero slice has factor 0 on both paths (not sqrt(n) / 1e-300, inf in float32, whose
    0 * inf made the torch search's distances NaN); a subnormal one overflows alike."""
    codec = fq.get_codec("vq")
    fast = codec.encode(x, seed=2)
    monkeypatch.setattr(vq_kernel, "usable", lambda *_: False)
    assert fast.to_bytes() == codec.encode(x, seed=2).to_bytes()
    assert torch.isfinite(fq.decode(fast)).all()


@pytest.mark.skipif(not vq_kernel.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("count", [3, 16, 20, 256])
def test_kernel_search_finds_the_nearest_codeword_and_the_first_of_a_tie(count):
    """Any codebook size (one lane group or many, not a multiple of 16): each block's
    codeword is the exact float64 nearest up to float32 rounding, and a duplicated
    codeword never wins over its first copy."""
    gen = torch.Generator().manual_seed(count)
    centroids = torch.randn(count, 4, generator=gen)
    centroids[-1] = centroids[0]  # a tie: index 0 must win
    z = torch.randn(1024 + 12, generator=gen)  # 259 blocks + a partial one
    out = torch.empty(-(-z.numel() // 4), dtype=torch.uint8)
    norm, dot, sq = vq_kernel.vq_quantize(z, centroids, out)
    t = torch.nn.functional.pad(z * (math.sqrt(z.numel()) / norm), (0, 4 * out.numel()
                                                                    - z.numel()))
    dist = torch.cdist(t.view(-1, 4).double(), centroids.double()) ** 2
    chosen = dist.gather(1, out.long()[:, None])[:, 0]
    assert (chosen <= dist.min(1).values + 1e-4).all()
    assert not (out == count - 1).any()
    c = centroids.double()[out.long()].reshape(-1)[: z.numel()]
    assert norm == pytest.approx(float(z.double().norm()), rel=1e-12)
    assert dot == pytest.approx(float(z.double() @ c), rel=1e-9)
    assert sq == pytest.approx(float(c @ c), rel=1e-9)


@pytest.mark.skipif(not vq_kernel.AVAILABLE, reason="numba missing")
def test_kernel_refuses_inconsistent_sizes():
    c = codebook(2, 1)
    with pytest.raises(ValueError, match="uint8"):
        vq_kernel.vq_quantize(torch.randn(10), c, torch.empty(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="packed indices"):
        vq_kernel.vq_dequantize(b"\x00", 2, c, [(0, 16, 1.0)], 16)  # 8 blocks need 2 bytes
    with pytest.raises(ValueError, match="packed indices"):
        vq_kernel.vq_dequantize(b"\x00\x00", 2, c, [(0, 32, 1.0)], 16)  # slice past the end
