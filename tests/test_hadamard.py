"""The numba and torch RHT kernels: same numbers, exact inverse, orthogonal, same signs."""

import math

import pytest
import torch

from fedquant import hadamard, hadamard_numba
from fedquant import random as fqr

SIZES = [1, 2, 4, 8, 16, 2**11, 2**12, 2**13, 2**14, 2**16]
PLACES = [(0, 0), (1, 4096), (2, 12345)]  # (layer, offset) pairs


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed + n))


def test_numba_is_available_and_used_on_cpu():
    assert hadamard_numba.AVAILABLE
    assert hadamard._use_numba(torch.zeros(8))
    assert not hadamard._use_numba(torch.zeros(8, dtype=torch.float64))


def test_auto_backend_on_cpu_runs_the_numba_kernel(monkeypatch):
    # Replace the torch kernel by a failure: the auto path on a float32 CPU tensor must not
    # reach it (the numba path never calls fwht_torch).
    def fail(_):
        raise AssertionError("torch kernel used for a float32 CPU tensor")

    monkeypatch.setattr(hadamard, "fwht_torch", fail)
    x = _x(2**12)
    hadamard.rht(x, 3, 0)
    hadamard.inverse_rht(x, 3, 0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("layer, offset", PLACES)
def test_numba_matches_torch(n, layer, offset):
    x = _x(n)
    want = hadamard.rht(x, 77, layer, offset, backend="torch")
    got = hadamard_numba.rht(x, 77, layer, offset)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    want_inv = hadamard.inverse_rht(x, 77, layer, offset, backend="torch")
    got_inv = hadamard_numba.inverse_rht(x, 77, layer, offset)
    torch.testing.assert_close(got_inv, want_inv, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [2**12, 2**15, 2**18])
def test_parallel_kernel_matches_serial(n):
    x = _x(n)
    torch.testing.assert_close(hadamard_numba.rht(x, 5, 1, 64, parallel=True),
                               hadamard_numba.rht(x, 5, 1, 64), atol=0, rtol=0)
    torch.testing.assert_close(hadamard_numba.inverse_rht(x, 5, 1, 64, parallel=True),
                               hadamard_numba.inverse_rht(x, 5, 1, 64), atol=0, rtol=0)


def test_two_pass_sizes_match_torch():
    # the two-pass schedule with one column group (2^17) and with 8 narrow groups (2^20)
    for n in (2**17, 2**20):
        x = _x(n)
        torch.testing.assert_close(hadamard_numba.rht(x, 9, 2, 2**20),
                                   hadamard.rht(x, 9, 2, 2**20, backend="torch"),
                                   atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 8, 2**12, 2**16])
def test_exact_inverse_and_norm_preserved(n):
    x = _x(n, seed=1)
    y = hadamard_numba.rht(x, 11, 0, 32)
    assert math.isclose(float(y.norm()), float(x.norm()), rel_tol=1e-5)
    torch.testing.assert_close(hadamard_numba.inverse_rht(y, 11, 0, 32), x,
                               atol=1e-5, rtol=1e-5)


def test_rows_are_orthonormal():
    # RHT as a matrix: columns are the images of the basis vectors; M^T M = I.
    n = 64
    m = torch.stack([hadamard_numba.rht(e, 4, 1, 0) for e in torch.eye(n)], dim=1)
    torch.testing.assert_close(m.T @ m, torch.eye(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer, offset", PLACES + [(3, 2**39 - 8)])
def test_signs_are_those_of_fedquant_random(layer, offset):
    # rht(e_i)[0] * sqrt(n) = H[0, i] * sign_i = sign_i (the first row of H is all ones)
    n = 16
    got = torch.stack([hadamard_numba.rht(e, 21, layer, offset)[0] * math.sqrt(n)
                       for e in torch.eye(n)])
    want = fqr.signs(21, fqr.Purpose.ROTATION, n,
                     start=fqr.rotation_sign_index(layer, offset))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_large_counter_indices_use_uint64():
    # an index near 2^63 must hash like the reference Python-int definition
    offset, n = (1 << 62) + 5, 8
    got = torch.stack([hadamard_numba.rht(e, 2, 0, offset)[0] * math.sqrt(n)
                       for e in torch.eye(n)])
    ref = [1 - 2 * (fqr.hash64(2, fqr.Purpose.ROTATION, offset + i) >> 63) for i in range(n)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), atol=1e-6, rtol=0)


def test_input_is_not_modified_and_views_work():
    base = _x(2**13)
    x = base[2**12:]  # a contiguous view with a storage offset
    before = x.clone()
    y = hadamard_numba.rht(x, 1, 0)
    torch.testing.assert_close(x, before, atol=0, rtol=0)
    torch.testing.assert_close(y, hadamard.rht(before, 1, 0, backend="torch"),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(12), torch.zeros(0), torch.zeros(4, 4),
                                 torch.zeros(8, dtype=torch.float64)])
def test_bad_input_is_rejected(bad):
    with pytest.raises(ValueError):
        hadamard_numba.rht(bad, 1, 0)


@pytest.mark.parametrize("n", [16, 2**12, 2**18])  # one block, in-L2 block, two passes
def test_out_and_in_place_give_the_same_numbers(n):
    x = _x(n, seed=3)
    want, want_inv = hadamard_numba.rht(x, 8, 1, 64), hadamard_numba.inverse_rht(x, 8, 1, 64)
    out = torch.empty(n)
    assert hadamard_numba.rht(x, 8, 1, 64, out=out) is out
    assert torch.equal(out, want)
    y = x.clone()
    hadamard_numba.rht(y, 8, 1, 64, out=y)  # in place
    assert torch.equal(y, want)
    y = x.clone()
    hadamard_numba.inverse_rht(y, 8, 1, 64, out=y)
    assert torch.equal(y, want_inv)
    # the torch path honours out= too
    t = torch.empty(n)
    hadamard.rht(x, 8, 1, 64, backend="torch", out=t)
    torch.testing.assert_close(t, want, atol=3e-6, rtol=1e-5)


def test_bad_out_rejected():
    x = _x(64)
    with pytest.raises(ValueError, match="out"):
        hadamard_numba.rht(x, 1, 0, out=torch.empty(32))
    with pytest.raises(ValueError, match="out"):
        hadamard_numba.rht(x, 1, 0, out=torch.empty(64, dtype=torch.float64))
    buf = torch.zeros(96)
    with pytest.raises(ValueError, match="overlaps"):
        hadamard_numba.rht(buf[:64], 1, 0, out=buf[32:])


def test_strided_and_grad_inputs_transform_like_plain_ones():
    x = _x(128)
    want = hadamard_numba.rht(x[::2].clone(), 3, 0)
    assert torch.equal(hadamard_numba.rht(x[::2], 3, 0), want)  # a strided view: copied
    buf = x.clone()
    out = buf[:64]  # overlaps the strided input's storage, which was copied first
    assert torch.equal(hadamard_numba.rht(buf[::2], 3, 0, out=out), want)
    g = x[:64].clone().requires_grad_(True)
    assert torch.equal(hadamard_numba.rht(g, 3, 0), hadamard_numba.rht(x[:64], 3, 0))


@pytest.mark.parametrize("n", [16, 2**12, 2**18])  # one block, in-L2 block, two passes
@pytest.mark.parametrize("parallel", [False, True])
def test_rht_stats_sums_the_input_moments(n, parallel):
    x = _x(n, seed=5) * torch.linspace(0.1, 3.0, n)  # not flat: the three moments differ
    out, m = hadamard_numba.rht_stats(x, 4, 1, 32, moments=3, parallel=parallel)
    assert torch.equal(out, hadamard_numba.rht(x, 4, 1, 32))  # the same transform
    u = x.double()
    for got, want in zip(m, (u.square().sum(), u.abs().pow(3).sum(), u.pow(4).sum()),
                         strict=True):
        assert math.isclose(got, float(want), rel_tol=1e-12)
    # fewer moments: a prefix of the same sums
    assert hadamard_numba.rht_stats(x, 4, 1, 32, moments=2)[1] == pytest.approx(m[:2])
    assert hadamard_numba.rht_stats(x, 4, 1, 32, moments=1)[1] == pytest.approx(m[:1])


def test_rht_stats_refuses_in_place_and_bad_counts():
    x = _x(64)
    with pytest.raises(ValueError, match="out-of-place"):
        hadamard_numba.rht_stats(x, 1, 0, out=x)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="moments"):
            hadamard_numba.rht_stats(x, 1, 0, moments=bad)
