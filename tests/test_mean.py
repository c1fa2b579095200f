"""decode_mean: unbiased averaging (NMSE(n) about vNMSE / n), REFERENCE.md's biased vs
unbiased figures, weights, and rejected mismatches."""


import pytest
import torch

import fedquant as fq
from fedquant.codecs import identity
from fedquant.random import derive_seed
from fedquant.simulations.inputs import make_input

N = 10


def _clients(name, d, seed=0):
    return [make_input(name, d, seed=1000 * seed + i) for i in range(N)]


def _vnmse_and_nmse(codec, xs, round_seed):
    encs = [fq.Encoded.from_bytes(codec.encode(x, seed=derive_seed(round_seed, i)).to_bytes())
            for i, x in enumerate(xs)]
    vnmse = sum(fq.vnmse(x, fq.decode(e)) for x, e in zip(xs, encs, strict=True)) / len(xs)
    return vnmse, fq.nmse(xs, fq.decode_mean(encs))


@pytest.mark.parametrize("name,params", [("eden", {"bits": 2}), ("dither", {"bits": 2}),
                                         ("stochastic", {"bits": 3}), ("drive", {})])
def test_unbiased_codecs_average_out(name, params):
    codec = fq.get_codec(name, **params)
    assert codec.is_unbiased
    vnmse, nmse = _vnmse_and_nmse(codec, _clients("lognormal", 2**14), round_seed=5)
    # independent client seeds: the errors are uncorrelated, NMSE(n) = vNMSE / n
    assert nmse * N == pytest.approx(vnmse, rel=0.12), (nmse, vnmse)


# REFERENCE.md, "Biased vs unbiased once averaged" (n = 10, LogNormal, b = 1)
@pytest.mark.parametrize("scale,ref_vnmse,ref_nmse", [("biased", 0.363, 0.080),
                                                      ("unbiased", 0.571, 0.057)])
def test_reference_biased_vs_unbiased_once_averaged(scale, ref_vnmse, ref_nmse):
    codec = fq.get_codec("drive", scale=scale)
    results = [_vnmse_and_nmse(codec, _clients("lognormal", 2**15, seed=t), round_seed=t)
               for t in range(2)]
    vnmse = sum(r[0] for r in results) / len(results)
    nmse = sum(r[1] for r in results) / len(results)
    assert vnmse == pytest.approx(ref_vnmse, rel=0.04)
    assert nmse == pytest.approx(ref_nmse, rel=0.06)


def test_weights():
    xs = [torch.randn(3, 40) for _ in range(3)]
    codec = fq.get_codec("eden", bits=3)
    encs = [codec.encode(x, seed=i) for i, x in enumerate(xs)]
    decoded = [fq.decode(e).double() for e in encs]
    weights = [1.0, 3.0, 0.0]
    expected = (decoded[0] * 1 + decoded[1] * 3) / 4
    got = fq.decode_mean(encs, weights)
    assert got.shape == (3, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_weighted_mean_is_exact_for_fp32():
    xs = [torch.randn(100) for _ in range(4)]
    encs = [fq.get_codec("fp32").encode(x) for x in xs]
    w = [0.5, 2.0, 1.0, 0.25]
    expected = sum(wi * x.double() for wi, x in zip(w, xs, strict=True)) / sum(w)
    torch.testing.assert_close(fq.decode_mean(encs, w).double(), expected, atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("name", fq.available_codecs())
def test_decode_mean_equals_mean_of_decodes_for_every_codec(name):
    """Covers codec-specific decode_sum fast paths (e.g. sums in the rotated domain)."""
    codec = fq.get_codec(name)
    xs = [torch.randn(64, 48, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    try:
        encs = [codec.encode(x, seed=derive_seed(9, i)) for i, x in enumerate(xs)]
    except ValueError:
        pytest.skip(f"{name} does not encode a 64 x 48 tensor with default parameters")
    expected = sum(fq.decode(e).double() for e in encs) / len(encs)
    scale = float(expected.abs().max()) + 1e-12
    got = fq.decode_mean(encs).double()
    assert float((got - expected).abs().max()) / scale < 1e-4


def test_mismatches_rejected():
    x = torch.randn(100)
    eden2 = fq.get_codec("eden", bits=2).encode(x, seed=1)
    with pytest.raises(ValueError, match="match"):
        fq.decode_mean([eden2, fq.get_codec("eden", bits=3).encode(x, seed=2)])
    with pytest.raises(ValueError, match="match"):
        fq.decode_mean([eden2, fq.get_codec("dither", bits=2).encode(x, seed=2)])
    with pytest.raises(ValueError, match="match"):
        fq.decode_mean([eden2, fq.get_codec("eden", bits=2).encode(torch.randn(101), seed=2)])
    with pytest.raises(ValueError, match="match"):
        fq.decode_mean([eden2, fq.get_codec("eden", bits=2).encode(x.reshape(10, 10), seed=2)])


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")],
                                     [1.0, float("inf")]])
def test_bad_weights_rejected(weights):
    x = torch.randn(50)
    encs = [fq.get_codec("eden").encode(x, seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="weights"):
        fq.decode_mean(encs, weights)


def test_empty_list_rejected():
    with pytest.raises(ValueError, match="at least one"):
        fq.decode_mean([])


def test_weights_whose_sum_overflows_rejected():
    x = torch.randn(50)
    encs = [fq.get_codec("eden").encode(x, seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="sum of the weights"):
        fq.decode_mean(encs, [1e308, 1e308])  # each finite, the sum is inf


def _poisoned_eden(monkeypatch) -> fq.Encoded:
    """A well-formed EDEN payload whose decode yields a NaN: the wire layer already refuses
    scales and raw values that could overflow, so a defect of a decoder is simulated."""
    from fedquant.codecs.eden import Eden

    real = Eden.decode_rotated

    def poisoned(self, enc, device=None):
        values = real(self, enc, device).clone()
        values[3] = float("nan") if enc.seed == 1 else values[3]
        return values

    monkeypatch.setattr(Eden, "decode_rotated", poisoned)
    enc = fq.get_codec("eden", bits=2).encode(torch.randn(300), seed=1)
    return fq.Encoded.from_bytes(enc.to_bytes())  # it parses: the bytes are valid


def test_decode_to_non_finite_is_a_wire_error(monkeypatch):
    with pytest.raises(fq.WireError, match="eden.*non-finite"):
        fq.decode(_poisoned_eden(monkeypatch))


@pytest.mark.parametrize("workers", [1, 2])
def test_decode_mean_to_non_finite_is_a_wire_error(monkeypatch, workers):
    bad = _poisoned_eden(monkeypatch)
    good = fq.get_codec("eden", bits=2).encode(torch.randn(300), seed=2)
    fq.decode_mean([good, good])  # the poison is only in the seed-1 payload
    with pytest.raises(fq.WireError, match="eden.*non-finite"):
        fq.decode_mean([good, bad], workers=workers)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_worker_count_does_not_change_the_mean(workers):
    xs = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    codec = fq.get_codec("eden", bits=2)
    encs = [codec.encode(x, seed=derive_seed(3, i)) for i, x in enumerate(xs)]
    w = [1.0, 0.5, 2.0, 0.0, 1.5, 1.0, 0.25]
    expected = sum(wi * fq.decode(e).double() for wi, e in zip(w, encs, strict=True)) / sum(w)
    got = fq.decode_mean(encs, w, workers=workers).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_accumulate_adds_in_float64_without_changing_its_input():
    total = torch.zeros(5, dtype=torch.float64)
    values = torch.tensor([1.0, 2.0, 3.0, 2.0**-30, -1.0])
    fq.mean.accumulate(total, values, 0.5)
    fq.mean.accumulate(total, values, 0.5)
    torch.testing.assert_close(total, values.double(), atol=0, rtol=0)
    fq.mean.accumulate(total, values.half(), 1.0)  # float16: the torch path
    torch.testing.assert_close(total, 2 * values.half().double() + (values.double()
                               - values.half().double()), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="float64"):
        fq.mean.accumulate(torch.zeros(5), values)


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_identity_sum_reads_payloads_in_place_block_by_block(name, threads, monkeypatch):
    monkeypatch.setattr(identity, "SUM_BLOCK", 2**16)
    if threads:
        monkeypatch.setattr(identity, "PARALLEL_MIN", 0)
    d = 2 * 2**16 + 5  # three blocks of the blocked sum, the last one short
    xs = [torch.randn(d, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    codec = fq.get_codec(name)
    encs = [fq.Encoded.from_bytes(codec.encode(x).to_bytes()) for x in xs]
    w = [0.5, 0.0, 2.0]
    total = sum(wi * fq.decode(e).double() for wi, e in zip(w, encs, strict=True))
    # the same float64 additions in the same order, divided, then rounded once
    assert torch.equal(codec.decode_sum(encs, w), total)
    assert torch.equal(fq.decode_mean(encs, w), (total / 2.5).float())


@pytest.mark.parametrize("spec", [("quic-fl", {"round_seed": 7}), ("quic-fl", {}),
                                  ("eden", {"bits": 2})])
def test_threaded_sums_equal_the_serial_ones(spec, monkeypatch):
    name, params = spec
    codec = fq.get_codec(name, **params)
    xs = [torch.randn(700, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    encs = [codec.encode(x, seed=derive_seed(2, i)) for i, x in enumerate(xs)]
    w = [1.0, 2.0, 0.5, 0.0, 3.0]
    serial = fq.decode_mean(encs, w)
    monkeypatch.setattr(fq.mean, "PARALLEL_MIN", 0)  # threads even for tiny inputs
    threaded = fq.decode_mean(encs, w)
    torch.testing.assert_close(threaded, serial, atol=1e-6, rtol=1e-6)
