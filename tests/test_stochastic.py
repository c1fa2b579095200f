"""Stochastic rounding: E[f (1 - f)] step^2 error, REFERENCE.md vNMSE, unbiasedness, privacy."""

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import fedquant as fq
from fedquant.codecs.dither import value_blocks
from fedquant.rotation import rotate

# REFERENCE.md, "RHT + stochastic rounding (min-max range)", d = 2^20
REFERENCE_2_20 = {1: 22, 2: 1.9, 3: 0.32, 4: 0.069}


def expected_max(n):
    """E[max of n i.i.d. N(0, 1)], by quadrature."""
    density = lambda t: t * n * stats.norm.pdf(t) * stats.norm.cdf(t) ** (n - 1)  # noqa: E731
    return integrate.quad(density, -2, 12, limit=200)[0]


def minmax_stochastic_vnmse(n, bits):
    """E[f (1 - f)] step^2 for z ~ N(0, 1) on the grid -m + j step, m = E[max]."""
    m = expected_max(n)
    step = 2 * m / (2**bits - 1)
    z = np.linspace(-m, m, 400_001)
    t = (z + m) / step
    f = t - np.floor(t)
    return float(np.trapezoid(f * (1 - f) * stats.norm.pdf(z), z)) * step**2


def _grid_fractions(x, enc):
    """The fractional grid position f of every quantized coordinate, from the sent scales."""
    v = x.reshape(-1).double()
    if enc.rotations:
        v = rotate(x.reshape(-1).float(), enc.seed, enc.rotations).double()
    parts = []
    for (lo_i, hi_i), lo, step in zip(value_blocks(enc.numel, enc.rotations),
                                      enc.scales[0::2], enc.scales[1::2], strict=True):
        t = (v[lo_i:hi_i] - lo) / step
        parts.append((t - t.floor(), step))
    return parts


def test_reference_is_the_minmax_formula_at_d_2_20():
    for bits, ref in REFERENCE_2_20.items():
        assert minmax_stochastic_vnmse(2**20, bits) == pytest.approx(ref, rel=0.05)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_error_is_f_one_minus_f_step_squared(bits):
    """Measured squared error against its exact expectation given x."""
    g = torch.Generator().manual_seed(bits)
    codec = fq.get_codec("stochastic", bits=bits, rotations=1)
    measured = expected = 0.0
    for seed in range(3):
        x = torch.randn(2**16, generator=g)
        enc = codec.encode(x, seed=seed)
        measured += float(((fq.decode(enc).double() - x.double()) ** 2).sum())
        expected += sum(float((f * (1 - f)).sum()) * step**2
                        for f, step in _grid_fractions(x, enc))
    assert abs(measured / expected - 1) < 0.03, (measured, expected)


def test_vnmse_matches_reference_formula_at_d_2_16():
    """At a quick size against the same min-max formula at d = 2^16 (17.4 vs 22.7 at 2^20
    for b = 1: the range grows like sqrt(log d))."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2**16, generator=g) for _ in range(10)]
    for bits in REFERENCE_2_20:
        codec = fq.get_codec("stochastic", bits=bits, rotations=1)
        got = sum(fq.vnmse(x, fq.decode(codec.encode(x, seed=i)))
                  for i, x in enumerate(xs)) / len(xs)
        assert got == pytest.approx(minmax_stochastic_vnmse(2**16, bits), rel=0.1), bits


@pytest.mark.parametrize("rotations", [0, 2])
def test_unbiased_by_averaging_many_seeds(rotations):
    """mean over T seeds - x has per-coordinate variance var_i / T: a chi-square check."""
    d, trials = 512, 300
    x = torch.randn(d, generator=torch.Generator().manual_seed(2)).exp()
    codec = fq.get_codec("stochastic", bits=2, rotations=rotations)
    draws = torch.stack([fq.decode(codec.encode(x, seed=s)).double() for s in range(trials)])
    bias2 = ((draws.mean(0) - x.double()) ** 2).sum()
    noise = draws.var(0).sum() / trials
    assert 0.6 < float(bias2 / noise) < 1.4


def test_rounds_to_a_neighbouring_level_and_decoder_needs_no_coins():
    x = torch.randn(4096)
    enc = fq.get_codec("stochastic", bits=3, rotations=0).encode(x, seed=11)
    lo, step = enc.scales
    t = (x.double() - lo) / step
    q = enc.section("q").ints().double()
    assert bool(((q >= (t - 1e-4).floor()) & (q <= (t + 1e-4).ceil())).all())
    assert 0.3 < float((q == t.ceil()).double().mean()) < 0.7  # both neighbours occur
    # the reconstruction is the grid level itself: lo + q * step, no shared randomness
    torch.testing.assert_close(fq.decode(enc).double(), lo + q * step, atol=1e-5, rtol=0)


def test_given_range_clips_to_end_levels():
    x = torch.tensor([-5.0, -1.0, 0.0, 0.3, 1.0, 5.0])
    codec = fq.get_codec("stochastic", bits=2, rotations=0, range=1.0)
    for seed in range(5):
        out = fq.decode(codec.encode(x, seed=seed))
        assert out[0] == -1.0 and out[-1] == 1.0
        assert out[1] == -1.0 and out[4] == 1.0


def test_private_randomness_differs_by_seed_and_is_reproducible():
    x = torch.randn(4000)
    codec = fq.get_codec("stochastic", bits=1)
    assert codec.encode(x, seed=3).to_bytes() == codec.encode(x, seed=3).to_bytes()
    assert codec.encode(x, seed=3).to_bytes() != codec.encode(x, seed=4).to_bytes()


def test_shape_dtype_round_trip():
    x = torch.randn(7, 300).to(torch.bfloat16)
    enc = fq.get_codec("stochastic", bits=4).encode(x, seed=1)
    out = fq.decode(fq.Encoded.from_bytes(enc.to_bytes()))
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("kwargs", [{"bits": 0}, {"bits": 9}, {"range": "-2"},
                                    {"range": "inf"}, {"rotations": -1}])
def test_bad_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        fq.get_codec("stochastic", **kwargs)
