"""Rotations: slice layout, padding cost, exact inverse, the auto check, and REFERENCE.md's
"Number of composed RHTs" table."""

import math

import pytest
import torch

import fedquant as fq
from fedquant.rotation import (
    auto_rotations,
    padded_size,
    resolve_rotations,
    rotate,
    rotate_checked,
    slice_layout,
    unrotate,
)
from fedquant.simulations.inputs import make_input

SPECIAL_D = [4096, 4097, 4225, 6143, 6144, 8191, 8193, 12289, 2**15 - 1, 2**15 + 1,
             2**16 - 1, 2**16 + 1, 2**16 + 2**9 + 3, 100_003, 2**20 - 1, 2**20 + 1]


@pytest.mark.parametrize("d", [1, 2, 3, 7, 100, 128, 129, 130, 1000, 4095, *SPECIAL_D])
def test_slice_layout_covers_d_exactly(d):
    slices = slice_layout(d)
    start = offset = 0
    for i, s in enumerate(slices):
        assert (s.start, s.offset) == (start, offset)
        assert s.size & (s.size - 1) == 0 and s.length <= s.size
        assert s.length == s.size or i == len(slices) - 1  # only the tail is padded
        start, offset = start + s.length, offset + s.size
    assert start == d and offset == padded_size(d)


def test_padding_under_3_percent_for_every_d_from_4096():
    ds = [*range(4096, 20_000), *range(20_000, 2**21, 97), *SPECIAL_D]
    worst = max(padded_size(d) / d for d in ds)
    assert worst <= 1.03, worst


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_payload_bytes_within_3_percent_of_power_of_two(bits):
    """Real payload section bytes per coordinate versus the nearest power of two."""
    codec = fq.get_codec("eden", bits=bits, rotations=1)
    for d in [4097, 4225, 6143, 8191, 8193, 2**14 + 1, 2**15 - 1]:
        p = 1 << round(math.log2(d))
        got = sum(len(s.data) for s in codec.encode(torch.randn(d), seed=1).sections.values())
        ref = sum(len(s.data) for s in codec.encode(torch.randn(p), seed=1).sections.values())
        assert got / d <= 1.03 * ref / p, (d, got, ref)


@pytest.mark.parametrize("d", [1, 3, 64, 129, 1000, 4097, 6143, 2**13])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rotate_unrotate_inverse_and_norm(d, k):
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    z = rotate(x, seed=99, rotations=k)
    assert z.numel() == padded_size(d)
    assert float(z.norm()) == pytest.approx(float(x.norm()), rel=1e-5)
    torch.testing.assert_close(unrotate(z, 99, k, d), x, atol=1e-5, rtol=1e-5)


def test_torch_backend_gives_the_same_rotation():
    x = torch.randn(6143)
    torch.testing.assert_close(rotate(x, 5, 2, backend="torch"), rotate(x, 5, 2),
                               atol=1e-5, rtol=1e-5)


def test_rotations_differ_with_seed_and_layer():
    x = torch.randn(4096)
    assert not torch.allclose(rotate(x, 1, 1), rotate(x, 2, 1))
    assert not torch.allclose(rotate(x, 1, 1), rotate(x, 1, 2))


@pytest.mark.parametrize("name,scalar,vector", [("normal", 1, 2), ("two-spikes", 2, 3),
                                                 ("onehot", 2, 3), ("block8", 2, 3)])
def test_auto_rotations(name, scalar, vector):
    x = make_input(name, 2**14, seed=3)
    assert auto_rotations(x, "scalar") == scalar
    assert auto_rotations(x, "vector") == vector
    assert resolve_rotations("auto", x, "scalar") == scalar


@pytest.mark.parametrize("spec", [4, -1, "two", None, "1.5"])
def test_bad_rotation_specs_rejected(spec):
    with pytest.raises(ValueError, match="rotations"):
        resolve_rotations(spec, torch.ones(4))


# REFERENCE.md, "Number of composed RHTs" (EDEN unbiased, d = 2^16): 1 / 2 / 3 RHTs.
# block8 at 1 RHT: 0.664 in REFERENCE.md; 8 / E|S_8|^2 - 1 = 0.6718 exactly for our
# block of 8 equal entries (simulations/inputs.py), 1.2% apart: tolerance 3%.
RHT_TABLE = {
    ("lognormal", 1): (0.570, 0.570, 0.571),
    ("two-spikes", 1): (1.000, 0.571, 0.570),
    ("block8", 1): (0.664, 0.571, 0.571),
    ("lognormal", 4): (0.0096, 0.0096, 0.0096),
    ("two-spikes", 4): (0.0105, 0.0096, 0.0096),
}


@pytest.mark.parametrize("case", sorted(RHT_TABLE))
def test_reference_number_of_composed_rhts(case):
    name, bits = case
    for k, ref in zip((1, 2, 3), RHT_TABLE[case], strict=True):
        codec = fq.get_codec("eden", bits=bits, rotations=k)
        vals = [fq.vnmse(x, fq.decode(codec.encode(x, seed=s)))
                for s in range(3) for x in [make_input(name, 2**16, seed=s)]]
        got = sum(vals) / len(vals)
        assert got == pytest.approx(ref, rel=0.03), (name, bits, k, got, ref)


def test_one_rht_fails_on_two_spikes_two_succeed():
    x = make_input("two-spikes", 2**16, seed=0)
    one = fq.vnmse(x, fq.decode(fq.get_codec("drive", rotations=1).encode(x, seed=1)))
    two = fq.vnmse(x, fq.decode(fq.get_codec("drive", rotations=2).encode(x, seed=1)))
    auto = fq.get_codec("drive").encode(x, seed=1)
    assert one > 0.95 and two < 0.6 and auto.rotations == 2


def _layer_signs(x: torch.Tensor, seed: int, k: int) -> list[torch.Tensor]:
    """The sign diagonals D_0..D_{k-1} that rotate(x, seed, k) applied, recovered from its
    outputs: rotate(x, k) = H D_{k-1} rotate(x, k - 1) / sqrt(n) and H / sqrt(n) is its
    own inverse, so D_l = fwht(rotate(x, l + 1)) / rotate(x, l)."""
    from fedquant.hadamard import fwht_torch

    prev, diagonals = x.double(), []
    for layer in range(k):
        cur = rotate(x, seed, layer + 1).double()
        diagonals.append(fwht_torch(cur) / prev)
        prev = cur
    return diagonals


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_composed_layers_have_independent_sign_diagonals(backend, monkeypatch):
    n = 4096
    x = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros
    if backend == "torch":
        from fedquant import hadamard

        monkeypatch.setattr(hadamard, "_use_numba", lambda _x: False)
    diagonals = _layer_signs(x, seed=7, k=3)
    for d in diagonals:  # each layer really is a sign diagonal (float32 rounding aside)
        assert float((d.abs() - 1).abs().median()) < 1e-5
        assert float((d.abs() - 1).abs().quantile(0.99)) < 1e-2
    signs = [d.sign() for d in diagonals]
    # independent fair signs agree on n/2 +- 4.5 sigma (sigma = sqrt(n)/2 = 32) places; a
    # composition that reuses D_0 (or any D_l) agrees on all n of them
    for a in range(3):
        for b in range(a + 1, 3):
            agree = int((signs[a] == signs[b]).sum())
            assert abs(agree - n / 2) < 4.5 * math.sqrt(n) / 2, (a, b, agree)
    # ... and a slice's signs are not its neighbour's: d = n + n/2 is two slices, the
    # second one (at offset n) must not reuse the first slice's leading signs
    m = n // 2
    z = rotate(torch.cat([x, x[:m]]), 7, 1)
    from fedquant.hadamard import fwht_torch

    second = (fwht_torch(z[n:].double()) / x[:m].double()).sign()
    assert abs(int((second == signs[0][:m]).sum()) - m / 2) < 4.5 * math.sqrt(m) / 2


def _k_hot(n: int, k: int) -> torch.Tensor:
    x = torch.zeros(n)
    x[torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k]] = 1.0
    return x


def test_scalar_auto_threshold_just_below_and_above():
    # u = x / ||x|| of a k-hot x has ||u||_3^3 = 1 / sqrt(k); the bound 3^(3/4) / sqrt(n)
    # is crossed between k = 3153 and 3154 at n = 2^14 (k* = n / 3^1.5 = 3153.1)
    n = 2**14
    assert 3153 < n / 3**1.5 < 3154
    assert auto_rotations(_k_hot(n, 3153), "scalar") == 2  # just above the bound
    assert auto_rotations(_k_hot(n, 3154), "scalar") == 1  # just below it
    # the check runs per slice with the slice's own size: a flat 2^14 slice followed by a
    # spiky 4096 + 3 tail needs 2
    tail = torch.cat([_k_hot(n, 3154), _k_hot(4096, 1), torch.zeros(3)])
    assert auto_rotations(tail, "scalar") == 2


def test_vector_auto_threshold_just_below_at_and_above():
    # ||u||_4^4 = 1 / k for a k-hot x; the bound 4 / n is met exactly at k = n / 4
    n = 2**14
    assert auto_rotations(_k_hot(n, n // 4 - 1), "vector") == 3  # just above the bound
    assert auto_rotations(_k_hot(n, n // 4), "vector") == 2  # on it: <= passes
    assert auto_rotations(_k_hot(n, n // 4 + 1), "vector") == 2


def _check_rotate_checked(x: torch.Tensor, rotations, kind: str) -> int:
    """rotate_checked against rotate + auto_rotations + per-slice float64 norms."""
    z, k, squares = rotate_checked(x, 9, rotations, kind)
    want_k = auto_rotations(x, kind) if rotations == "auto" else rotations
    assert k == want_k
    assert torch.equal(z, rotate(x, 9, k))  # the same RHTs, bit for bit
    for s, q in zip(slice_layout(x.numel()), squares, strict=True):
        assert math.isclose(q, float(x[s.start: s.start + s.length].double().square().sum()),
                            rel_tol=1e-12)
        # ||x|| of the slice is ||z|| up to the float32 rounding of the RHTs
        assert math.isclose(q, float(z[s.offset: s.offset + s.size].double().square().sum()),
                            rel_tol=1e-5)
    return k


def test_rotate_checked_takes_the_auto_check_in_the_first_rht():
    n = 2**14
    # the same thresholds as auto_rotations, from the moments summed in the RHT's pass 1
    assert _check_rotate_checked(_k_hot(n, 3153), "auto", "scalar") == 2
    assert _check_rotate_checked(_k_hot(n, 3154), "auto", "scalar") == 1
    tail = torch.cat([_k_hot(n, 3154), _k_hot(4096, 1), torch.zeros(3)])
    assert _check_rotate_checked(tail, "auto", "scalar") == 2
    assert _check_rotate_checked(_k_hot(n, n // 4 - 1), "auto", "vector") == 3
    assert _check_rotate_checked(_k_hot(n, n // 4), "auto", "vector") == 2
    x = torch.randn(2**18 + 5000, generator=torch.Generator().manual_seed(4))  # two passes
    assert _check_rotate_checked(x, "auto", "scalar") == 1
    for k in (1, 2, 3):
        _check_rotate_checked(x[:5000], k, "scalar")


def test_rotate_checked_refuses_nan_and_inf_but_not_huge_values():
    big = torch.full((300,), 1e30)  # its float32 squares would overflow, float64 ones do not
    _check_rotate_checked(big, "auto", "scalar")
    fq.get_codec("eden", bits=2).encode(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5000)
        x[4999] = bad  # in the padded tail slice
        for rotations in ("auto", 1, 2):
            with pytest.raises(ValueError, match="NaN or Inf"):
                rotate_checked(x, 1, rotations, "scalar")
        with pytest.raises(ValueError, match="NaN or Inf"):
            fq.get_codec("eden", bits=2).encode(x)
    with pytest.raises(ValueError, match="rotation"):
        rotate_checked(torch.randn(64), 1, 0)
