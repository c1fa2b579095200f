"""Shared randomness: pinned golden values, torch == numpy == pure Python, derived seeds."""

import pytest
import torch

from fedquant import random as fqr

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def ref_mix(z):
    """SplitMix64's finalizer written out independently (Steele, Lea, Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_hash(seed, purpose, index):
    key = ref_mix((seed ^ ref_mix((purpose * GAMMA) & M64)) & M64)
    return ref_mix((key + (index + 1) * GAMMA) & M64)


# Pinned: changing any of these breaks every stored or in-flight encoding.
GOLDEN = {
    (0, 1, 0): 0x568A9B0B1A2C05EC,
    (1, 1, 0): 0x85C61A300EC70FA1,
    (1234, 2, 7): 0x131292FECCD3CB88,
    (2**64 - 1, 7, 0): 0x6316F5D4A2A1D7DC,
    (2**63 + 5, 1, (3 << 40) + 17): 0x975C7F15AF3181A4,
    (42, 6, 999): 0x2027FA3B914DAA08,
}
GOLDEN_SIGNS_42 = [-1, 1, 1, 1, -1, 1, 1, -1, -1, 1, -1, 1, -1, 1, -1, 1]
GOLDEN_UNIFORMS_42 = [0.044925153255462646, 0.2277413010597229, 0.5039168000221252,
                      0.5893213748931885]
GOLDEN_INTEGERS_42 = [291, 31, 35, 656, 835]


def test_finalizer_is_published_splitmix64():
    # SplitMix64 seeded with 1234567: its first two outputs (the standard test vector)
    assert fqr.fmix64(1234567 + GAMMA) == 6457827717110365317
    assert fqr.fmix64(1234567 + 2 * GAMMA) == 3203168211198807973


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_hash_values(key):
    assert fqr.hash64(*key) == GOLDEN[key]
    assert ref_hash(*key) == GOLDEN[key]


def test_golden_signs_uniforms_integers():
    assert fqr.signs(42, fqr.Purpose.ROTATION, 16).tolist() == GOLDEN_SIGNS_42
    assert fqr.uniforms(42, fqr.Purpose.DITHER, 4).tolist() == GOLDEN_UNIFORMS_42
    assert fqr.integers(42, fqr.Purpose.SUBSET, 5, 1000).tolist() == GOLDEN_INTEGERS_42


@pytest.mark.parametrize("seed,purpose,start", [(0, 1, 0), (2**64 - 1, 2, 5),
                                                (2**63, 7, 1 << 40), (987654321, 5, 3)])
def test_torch_numpy_python_bit_identical(seed, purpose, start):
    n = 300
    ref = [ref_hash(seed, purpose, start + i) for i in range(n)]
    as_torch = [v & M64 for v in fqr.hash64_torch(seed, purpose, start, n).tolist()]
    as_numpy = [int(v) for v in fqr.hash64_numpy(seed, purpose, start, n)]
    assert as_torch == ref and as_numpy == ref


def test_derived_streams_match_their_definitions():
    seed, purpose, n = 2**64 - 3, fqr.Purpose.DITHER, 200
    h = [ref_hash(seed, purpose, i) for i in range(n)]
    assert fqr.signs(seed, purpose, n).tolist() == [1.0 - 2 * (v >> 63) for v in h]
    assert fqr.uniforms(seed, purpose, n).tolist() == [(v >> 40) * 2.0**-24 for v in h]
    assert fqr.uniforms64(seed, purpose, n).tolist() == [(v >> 11) * 2.0**-53 for v in h]
    assert fqr.integers(seed, purpose, n, 77).tolist() == [((v >> 32) * 77) >> 32 for v in h]


def test_start_offsets_continue_the_stream():
    whole = fqr.uniforms(9, fqr.Purpose.DITHER, 100)
    assert torch.equal(fqr.uniforms(9, fqr.Purpose.DITHER, 60, start=40), whole[40:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for fn in (fqr.signs, fqr.uniforms, fqr.uniforms64):
        assert torch.equal(fn(5, 1, 4096, device="cuda").cpu(), fn(5, 1, 4096))


def test_streams_are_balanced():
    n = 200_000
    u = fqr.uniforms(3, fqr.Purpose.DITHER, n).double()
    s = fqr.signs(3, fqr.Purpose.ROTATION, n).double()
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5
    assert abs(float(s.mean())) < 4 / n**0.5
    assert float(u.min()) >= 0 and float(u.max()) < 1


def test_purposes_and_seeds_are_independent_streams():
    a = fqr.hash64_torch(1, fqr.Purpose.ROTATION, 0, 64)
    assert not torch.equal(a, fqr.hash64_torch(1, fqr.Purpose.DITHER, 0, 64))
    assert not torch.equal(a, fqr.hash64_torch(2, fqr.Purpose.ROTATION, 0, 64))


def test_derive_seed():
    assert fqr.derive_seed(7, 3) == ref_hash(7, fqr.Purpose.CLIENT, 3) == 0xC588037B5F3D8CE9
    seeds = [fqr.derive_seed(2**64 - 1, c) for c in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**64 for s in seeds)
    assert fqr.derive_seed(8, 3) != fqr.derive_seed(7, 3)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70])
def test_seeds_out_of_range_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        fqr.hash64(seed, 1, 0)
    with pytest.raises(ValueError, match="seed"):
        fqr.signs(seed, 1, 4)


@pytest.mark.parametrize("n,k", [(1000, 10), (1000, 0), (50, 50), (1, 1)])
def test_random_subset_distinct_sorted(n, k):
    idx = fqr.random_subset(11, fqr.Purpose.SUBSET, n, k)
    assert idx.numel() == k and idx.dtype == torch.int64
    assert len(set(idx.tolist())) == k
    assert torch.equal(idx, torch.sort(idx).values)
    assert k == 0 or (0 <= int(idx.min()) and int(idx.max()) < n)
    assert torch.equal(idx, fqr.random_subset(11, fqr.Purpose.SUBSET, n, k))


@pytest.mark.parametrize("n", [2, 7, 100, 4097, 65537])
def test_random_subset_one_pass_is_the_definition(n):
    """The numba pass (candidates below a threshold, then a partition) returns exactly the
    indices of the k smallest hashes that torch's topk + sort give, at every k."""
    for k in sorted({1, 2, n // 3, n // 2, n - 1}):
        for seed in (0, 3, 2**63 + 5):
            assert torch.equal(fqr.random_subset(seed, fqr.Purpose.SUBSET, n, k),
                               fqr._subset_torch(seed, fqr.Purpose.SUBSET, n, k, None))
    assert fqr._subset_numba(3, fqr.Purpose.SUBSET, n, n // 2) is not None  # it ran


def test_random_subset_varies_and_rejects_bad_k():
    a = fqr.random_subset(1, fqr.Purpose.SUBSET, 10_000, 100)
    assert not torch.equal(a, fqr.random_subset(2, fqr.Purpose.SUBSET, 10_000, 100))
    for k in (-1, 11):
        with pytest.raises(ValueError, match="subset size"):
            fqr.random_subset(1, fqr.Purpose.SUBSET, 10, k)


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_numba_splitmix64_matches_the_golden_values(key):
    import numpy as np

    seed, purpose, index = key
    stream = np.uint64(fqr.stream_key(seed, purpose))
    assert int(fqr.hash64_numba(stream, np.uint64(index))) == GOLDEN[key]
    assert int(fqr.hash64_numba(stream, index)) == GOLDEN[key]  # a signed index too
    z = fqr.counter_numba(stream, np.uint64(index))
    assert float(fqr.sign_numba(np.uint64(z))) == (-1.0 if GOLDEN[key] >> 63 else 1.0)


@pytest.mark.parametrize("seed,purpose,start", [(0, 1, 0), (2**64 - 1, 2, 5),
                                                (2**63, 7, 1 << 40)])
def test_cpu_numba_and_plain_torch_hashes_agree(seed, purpose, start, monkeypatch):
    fast = fqr.hash64_torch(seed, purpose, start, 300)
    monkeypatch.setattr(fqr, "AVAILABLE", False)  # the int64 torch ops every device runs
    plain = fqr.hash64_torch(seed, purpose, start, 300)
    assert fast.dtype == plain.dtype == torch.int64 and torch.equal(fast, plain)
    assert torch.equal(fqr.uniforms(seed, purpose, 50, start=start),
                       (fqr._srl(plain[:50], 40).to(torch.float32) * 2.0**-24))
