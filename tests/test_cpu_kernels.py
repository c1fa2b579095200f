"""The fused numba encode kernels agree with the torch code they replace on CPU."""

import math

import pytest
import torch

import fedquant as fq
from fedquant import cpu_kernels
from fedquant.codecs.base import check_input
from fedquant.codecs.eden import lloyd_max_centroids, nearest_centroid
from fedquant.rotation import rotate, slice_layout


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_kernels_are_used_for_float32_cpu_only():
    assert cpu_kernels.usable(torch.zeros(4))
    assert not cpu_kernels.usable(torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("x", [_x(1000), _x(4096).exp(), torch.tensor([0.0, 3.0, -4.0])])
def test_moments_match_float64_torch(x):
    s2, s3, s4 = cpu_kernels.moments(x)
    u = x.double()
    assert math.isclose(s2, float((u * u).sum()), rel_tol=1e-12)
    assert math.isclose(s3, float(u.abs().pow(3).sum()), rel_tol=1e-12)
    assert math.isclose(s4, float(u.pow(4).sum()), rel_tol=1e-12)


@pytest.mark.parametrize("bits", range(1, 9))
def test_eden_quantize_matches_torch(bits):
    z = _x(2**13, seed=bits)
    centroids = lloyd_max_centroids(bits)
    idx = torch.empty(z.numel(), dtype=torch.uint8)
    norm, dot = cpu_kernels.eden_quantize(z, centroids, idx)
    want_norm = float(torch.linalg.vector_norm(z.double()))
    want_idx = nearest_centroid(z * (math.sqrt(z.numel()) / want_norm), centroids)
    assert torch.equal(idx.long(), want_idx)
    assert math.isclose(norm, want_norm, rel_tol=1e-12)
    want_dot = float(torch.dot(z.double(), centroids[want_idx]))
    assert math.isclose(dot, want_dot, rel_tol=1e-10)


@pytest.mark.parametrize("bits", [1, 2, 3, 6])
def test_eden_quantize_with_a_norm_hint_gives_the_exact_result(bits):
    # the hint only picks the first try's factor: a hint off by far more than rounding
    # (another float32 factor) is caught by the exact norm summed in the same pass
    z = _x(2**12, seed=bits)
    centroids = lloyd_max_centroids(bits)
    want = torch.empty(z.numel(), dtype=torch.uint8)
    want_norm, want_dot = cpu_kernels.eden_quantize(z, centroids, want)
    for hint in (want_norm, want_norm * (1 + 1e-9), want_norm * 1.3, 0.0):
        idx = torch.full((z.numel(),), 255, dtype=torch.uint8)
        norm, dot = cpu_kernels.eden_quantize(z, centroids, idx, hint)
        assert torch.equal(idx, want)
        assert math.isclose(norm, want_norm, rel_tol=1e-12)
        assert math.isclose(dot, want_dot, rel_tol=1e-10)


def test_eden_quantize_ties_go_to_the_lower_centroid_like_bucketize():
    # t exactly on a midpoint: bucketize (right=False) picks the lower index
    centroids = lloyd_max_centroids(2)
    mids = ((centroids[1:] + centroids[:-1]) / 2).float()
    z = torch.tensor([float(mids[0]), 0.0, float(mids[2]), 5.0])
    factor = math.sqrt(4) / float(torch.linalg.vector_norm(z.double()))
    z = z / factor  # so that z * factor lands (up to rounding) on the midpoints
    idx = torch.empty(4, dtype=torch.uint8)
    cpu_kernels.eden_quantize(z, centroids, idx)
    t = z * (math.sqrt(4) / float(torch.linalg.vector_norm(z.double())))
    assert torch.equal(idx.long(), nearest_centroid(t, centroids))


@pytest.mark.parametrize("bits", [1, 2, 5])
@pytest.mark.parametrize("rotations", [1, "auto"])
def test_eden_encode_fast_path_equals_torch_path_bytes(bits, rotations):
    # the codec's fused path (checks and norms inside the RHTs) against the torch lines it
    # replaced, on a multi-slice d; "auto" on a spiky input that needs 2 RHTs
    x = _x(5000, seed=7)
    if rotations == "auto":
        x[:4096] = x[:4096].pow(5)
    fast = fq.get_codec("eden", bits=bits, rotations=rotations).encode(x, seed=3)
    assert fast.rotations == (2 if rotations == "auto" else 1)
    z = rotate(x, 3, fast.rotations)
    centroids = lloyd_max_centroids(bits)
    want, scales = [], []
    for s in slice_layout(x.numel()):
        zs = z[s.offset: s.offset + s.size]
        norm = float(torch.linalg.vector_norm(zs.double()))
        idx = nearest_centroid(zs * (math.sqrt(s.size) / norm), centroids)
        want.append(idx)
        scales.append(norm * norm / float(torch.dot(zs.double(), centroids[idx])))
    assert torch.equal(fast.section("q").ints(), torch.cat(want))
    for got, expected in zip(fast.scales, scales, strict=True):
        assert math.isclose(got, expected, rel_tol=1e-10)


def test_check_input_rejects_nonfinite_but_accepts_huge_finite_values():
    big = torch.full((8,), 3e38)  # the float32 sum overflows to inf: exact check decides
    assert torch.equal(check_input(big), big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _x(100)
        x[17] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_input(x)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("d", [5000, 4226])
def test_eden_dequantize_matches_torch_lookup(bits, d):
    # 5000: two slices; 4226: 4096 + 128 + a 2-value tail, which is shorter than a byte's
    # worth of values (per-byte table path for the first two, bit reader for the tail)
    x = _x(d, seed=bits)
    codec = fq.get_codec("eden", bits=bits)
    enc = codec.encode(x, seed=1)
    got = codec.decode_rotated(enc)
    values = lloyd_max_centroids(bits)[enc.section("q").ints()]
    scale = torch.empty_like(values)
    for s, sc in zip(slice_layout(d), enc.scales, strict=True):
        scale[s.offset: s.offset + s.size] = sc
    assert torch.equal(got, (values * scale).to(torch.float32))


def test_eden_dequantize_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="bytes"):
        cpu_kernels.eden_dequantize(b"\x00" * 3, 2, lloyd_max_centroids(2), [(0, 16, 1.0)], 16)
    with pytest.raises(ValueError, match="slice"):
        cpu_kernels.eden_dequantize(b"\x00" * 4, 2, lloyd_max_centroids(2), [(8, 16, 1.0)], 16)
