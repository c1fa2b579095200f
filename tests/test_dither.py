"""Subtractive dither: step^2 / 12 error whatever the input, REFERENCE.md vNMSE, unbiasedness."""

import math

import pytest
import torch
from helpers_kernels import torch_path
from scipy import integrate, stats

import fedquant as fq
from fedquant import cpu_kernels
from fedquant.codecs.dither import value_blocks
from fedquant.rotation import rotate

# REFERENCE.md, "RHT + subtractive dither (min-max range)", d = 2^20
REFERENCE_2_20 = {1: 7.9, 2: 0.87, 3: 0.16, 4: 0.035}


def _rotated(x, enc):
    flat = x.reshape(-1).float()
    return rotate(flat, enc.seed, enc.rotations) if enc.rotations else flat


def _expected_sq_error(enc):
    """sum over slices of (slice length) * step^2 / 12, from the steps actually sent."""
    blocks = value_blocks(enc.numel, enc.rotations)
    return sum((hi - lo) * step**2 / 12 for (lo, hi), step in zip(blocks, enc.scales[1::2],
                                                                   strict=True))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_error_is_step_squared_over_12(bits):
    g = torch.Generator().manual_seed(bits)
    codec = fq.get_codec("dither", bits=bits, rotations=1)
    measured = expected = 0.0
    for seed in range(3):
        x = torch.randn(2**16, generator=g)
        enc = codec.encode(x, seed=seed)
        measured += float(((fq.decode(enc).double() - x.double()) ** 2).sum())
        expected += _expected_sq_error(enc)
    # sum of 3 * 2^16 uniform squared errors: relative std 0.2%
    assert abs(measured / expected - 1) < 0.02, (measured, expected)


def expected_max(n):
    """E[max of n i.i.d. N(0, 1)], by quadrature."""
    density = lambda t: t * n * stats.norm.pdf(t) * stats.norm.cdf(t) ** (n - 1)  # noqa: E731
    return integrate.quad(density, -2, 12, limit=200)[0]


def minmax_dither_vnmse(n, bits):
    """step^2 / 12 for N(0, 1) with the min-max grid: range 2 E[max], step range/(2^b-1)."""
    return (2 * expected_max(n)) ** 2 / 12 / (2**bits - 1) ** 2


def test_reference_is_the_minmax_formula_at_d_2_20():
    for bits, ref in REFERENCE_2_20.items():
        assert minmax_dither_vnmse(2**20, bits) == pytest.approx(ref, rel=0.03)


def test_vnmse_matches_reference_formula_at_d_2_16():
    """Measured at a quick size against the same formula at d = 2^16 (the range, hence the
    vNMSE, grows slowly with d: 6.14 at 2^16 vs 7.9 at 2^20 for b = 1)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2**16, generator=g) for _ in range(10)]
    for bits in REFERENCE_2_20:
        codec = fq.get_codec("dither", bits=bits, rotations=1)
        got = sum(fq.vnmse(x, fq.decode(codec.encode(x, seed=i)))
                  for i, x in enumerate(xs)) / len(xs)
        # the squared range varies ~9% per draw: 10 draws give ~3%
        assert got == pytest.approx(minmax_dither_vnmse(2**16, bits), rel=0.1), bits


def test_error_independent_of_input_and_within_half_step():
    """Without rotation, on a skewed input: error/step uniform on [-1/2, 1/2)."""
    x = torch.randn(2**14, generator=torch.Generator().manual_seed(1)).exp()
    enc = fq.get_codec("dither", bits=3, rotations=0).encode(x, seed=3)
    lo, step = enc.scales
    err = (fq.decode(enc).double() - x.double()) / step
    assert float(err.abs().max()) <= 0.5 + 1e-4
    assert abs(float(err.mean())) < 4 * math.sqrt(1 / 12 / err.numel())
    assert abs(float((err**2).mean()) * 12 - 1) < 0.03


@pytest.mark.parametrize("rotations", [0, 2])
def test_unbiased_by_averaging_many_seeds(rotations):
    """mean over T seeds - x has per-coordinate variance var_i / T: a chi-square check."""
    d, trials = 512, 300
    x = torch.randn(d, generator=torch.Generator().manual_seed(2)).exp()
    codec = fq.get_codec("dither", bits=2, rotations=rotations)
    draws = torch.stack([fq.decode(codec.encode(x, seed=s)).double() for s in range(trials)])
    bias2 = ((draws.mean(0) - x.double()) ** 2).sum()
    noise = draws.var(0).sum() / trials
    ratio = float(bias2 / noise)
    assert 0.6 < ratio < 1.4, ratio  # chi-square with d dof / d: std sqrt(2/d) = 0.06


def test_given_range_clips_outside_and_is_unbiased_inside():
    x = torch.linspace(-3, 3, 61)
    codec = fq.get_codec("dither", bits=3, rotations=0, range=2.0)
    enc = codec.encode(x, seed=0)
    assert enc.scales == (-2.0, 4.0 / 7)
    mean = torch.stack([fq.decode(codec.encode(x, seed=s)) for s in range(300)]).mean(0)
    # E[x_hat] = clip(x, -R, R); each mean has std <= step / sqrt(12 * 300) = 0.0095
    torch.testing.assert_close(mean, x.clamp(-2, 2), atol=0.04, rtol=0)
    assert fq.Encoded.from_bytes(enc.to_bytes()).params["range"] == "2.0"


def test_constant_and_zero_inputs_are_exact():
    for x in (torch.full((300,), 1.25), torch.zeros(40)):
        enc = fq.get_codec("dither", bits=1, rotations=0).encode(x, seed=5)
        assert torch.equal(fq.decode(enc), x)


def test_dither_is_shared_randomness():
    """Same seed, same bytes; another seed draws another dither."""
    x = torch.randn(1000)
    codec = fq.get_codec("dither", bits=2)
    assert codec.encode(x, seed=1).to_bytes() == codec.encode(x, seed=1).to_bytes()
    assert codec.encode(x, seed=1).to_bytes() != codec.encode(x, seed=2).to_bytes()


def test_shape_dtype_and_measured_bits():
    x = torch.randn(4, 33, 9).to(torch.float16)
    enc = fq.get_codec("dither", bits=4, rotations=1).encode(x, seed=8)
    out = fq.decode(fq.Encoded.from_bytes(enc.to_bytes()))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert enc.nbytes == len(enc.to_bytes())


@pytest.mark.parametrize("kwargs", [{"bits": 0}, {"bits": 9}, {"bits": 2.5}, {"bits": True},
                                    {"range": "-1"}, {"range": "wide"}, {"range": "nan"},
                                    {"range": 0.0}, {"rotations": 4}, {"rotations": "two"}])
def test_bad_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        fq.get_codec("dither", **kwargs)


def test_negative_step_on_the_wire_is_rejected():
    enc = fq.get_codec("dither", bits=2, rotations=0).encode(torch.randn(100), seed=1)
    enc.scales = (enc.scales[0], -enc.scales[1])
    with pytest.raises(fq.WireError, match="scales"):
        fq.Encoded.from_bytes(enc.to_bytes())


def test_rotated_values_are_what_is_quantized():
    """The grid spans the min-max range of the rotated vector (the codec's contract)."""
    x = torch.randn(3000)
    enc = fq.get_codec("dither", bits=2, rotations=2).encode(x, seed=4)
    z = _rotated(x, enc)
    for (lo_i, hi_i), lo, step in zip(value_blocks(x.numel(), 2), enc.scales[0::2],
                                      enc.scales[1::2], strict=True):
        assert lo == pytest.approx(float(z[lo_i:hi_i].min()))
        assert lo + 3 * step == pytest.approx(float(z[lo_i:hi_i].max()))


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("name", ["dither", "stochastic"])
@pytest.mark.parametrize("params", [{"rotations": "auto"}, {"rotations": "0"},
                                    {"rotations": "2", "range": "1.5"},
                                    {"rotations": "0", "range": "0.7"}])
def test_numba_kernels_equal_the_torch_path(name, params, monkeypatch):
    """fedquant.grid_kernels: the same bytes on the wire and the same float32 values back
    as the torch lines, at every width, with tails and clipping (range 0.7 clips)."""
    for d in (1, 5, 129, 4133, 2**16 + 37):
        for bits in (1, 2, 3, 8):
            x = torch.randn(d, generator=torch.Generator().manual_seed(d + bits)) * 3
            codec = fq.get_codec(name, bits=bits, **params)
            fast = codec.encode(x, seed=11)
            fast_values = fq.decode(fast)
            slow, slow_values = torch_path(monkeypatch, codec, x, 11, fast)
            assert fast.to_bytes() == slow.to_bytes(), (d, bits)
            assert torch.equal(fast_values, slow_values), (d, bits)
