"""Real bit budgets: eden-mix (EDEN's shared-randomness sparsification below 1 bit, two
adjacent integer budgets over slices above) and ecdq (a continuous step)."""

import math

import pytest
import torch

import fedquant as fq

D = 1 << 15


def _x(kind: str = "lognormal", d: int = D, seed: int = 0) -> torch.Tensor:
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return x.exp() if kind == "lognormal" else x


def _wire(codec, x, seed=3):
    blob = codec.encode(x, seed=seed).to_bytes()
    return fq.Encoded.from_bytes(blob), 8 * len(blob) / x.numel()


@pytest.mark.parametrize("name", ["eden-mix", "ecdq"])
@pytest.mark.parametrize("bits", [0.5, 1.5, 2.0, 2.5])
@pytest.mark.parametrize("kind", ["normal", "lognormal"])
def test_measured_bits_within_2_percent_of_the_request(name, bits, kind):
    # bits counted on the serialized blob, header included: catches sizing from a formula
    x = _x(kind)
    enc, measured = _wire(fq.get_codec(name, bits=bits), x)
    assert abs(measured - bits) <= 0.02 * bits, measured
    assert fq.decode(enc).shape == x.shape


@pytest.mark.parametrize("name", ["eden-mix", "ecdq"])
def test_error_falls_as_the_budget_grows(name):
    x = _x()
    errs = [fq.vnmse(x, fq.decode(_wire(fq.get_codec(name, bits=b), x)[0]))
            for b in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_eden_mix_between_its_integer_neighbours():
    # 1.5 bits mixes 1- and 2-bit EDEN: its error lies between theirs (a part dropped or
    # scaled twice would leave that interval)
    x = _x()
    e1 = fq.vnmse(x, fq.decode(fq.get_codec("eden", bits=1).encode(x, seed=3)))
    e2 = fq.vnmse(x, fq.decode(fq.get_codec("eden", bits=2).encode(x, seed=3)))
    mix = fq.vnmse(x, fq.decode(_wire(fq.get_codec("eden-mix", bits=1.5), x)[0]))
    assert e2 < mix < e1


@pytest.mark.parametrize("name, bits", [("eden-mix", 0.5), ("eden-mix", 1.5),
                                        ("ecdq", 0.5), ("ecdq", 1.5)])
def test_unbiased_over_seeds(name, bits):
    x, k = _x(d=1 << 12), 48
    codec = fq.get_codec(name, bits=bits)
    decs = [fq.decode(codec.encode(x, seed=s)) for s in range(k)]
    v = sum(fq.vnmse(x, y) for y in decs) / k
    assert fq.vnmse(x, torch.stack(decs).mean(0)) < 2.0 * v / k


def test_sparsified_eden_mix_sends_a_shared_random_subset():
    # below 1 bit: only the kept coordinates are non-zero, rescaled by d / k
    x = _x()
    enc, _ = _wire(fq.get_codec("eden-mix", bits=0.5), x)
    out = fq.decode(enc)
    k = int(enc.scales[0])
    subset = fq.random.random_subset(enc.seed, fq.random.Purpose.SUBSET, x.numel(), k)
    outside = torch.ones(x.numel(), dtype=torch.bool)
    outside[subset] = False
    assert set(enc.sections) == {"q_hi"} and not bool(out[outside].any())
    assert int((out[subset] != 0).sum()) > 0.99 * k
    assert 0.45 * x.numel() < k <= 0.5 * x.numel()


def _tamper(change):
    enc = fq.get_codec("eden-mix", bits=1.5).encode(_x(d=1 << 12), seed=3)
    change(enc)
    return enc.to_bytes()


@pytest.mark.parametrize("change, field", [
    (lambda e: setattr(e, "scales", (1e9, *e.scales[1:])), "part size"),
    (lambda e: setattr(e, "scales", (0.5, *e.scales[1:])), "part size"),
    (lambda e: setattr(e, "scales", e.scales[:-1]), "scales"),
    (lambda e: e.sections.pop("q_hi"), "sections"),
    (lambda e: setattr(e, "rotations", 7), "rotations"),
])
def test_inconsistent_payloads_are_wire_errors(change, field):
    with pytest.raises(fq.WireError, match=field):
        fq.Encoded.from_bytes(_tamper(change))


@pytest.mark.parametrize("bits", [0.0, 0.01, 9.0, float("inf")])
def test_bad_budgets_raise_value_error(bits):
    with pytest.raises(ValueError, match="bits"):
        fq.get_codec("eden-mix", bits=bits)


@pytest.mark.parametrize("bits", [0.5, 1.5, 2.5])
def test_eden_itself_takes_a_real_budget(bits):
    """`eden` with a real bits is EDEN over mixed integer budgets (eden-mix), on budget."""
    x = torch.randn(1 << 16)
    for codec in (fq.get_codec(f"eden:bits={bits}"), fq.get_codec("eden", bits=bits)):
        assert codec.name == "eden-mix" and codec.params()["bits"] == bits
        enc = codec.encode(x, seed=11)
        assert abs(8 * enc.nbytes / x.numel() - bits) <= 0.02 * bits
        err = float(fq.vnmse(x, fq.decode(fq.Encoded.from_bytes(enc.to_bytes()))))
        lower = fq.vnmse(x, fq.decode(fq.get_codec("eden", bits=math.ceil(bits)).encode(x, 11)))
        assert float(lower) < err  # a fractional budget costs error against the next integer
    with pytest.raises(ValueError, match="scale='unbiased'"):
        fq.get_codec("eden", bits=bits, scale="biased")
    assert fq.get_codec("eden:bits=2.0").name == "eden"  # an integral real stays plain EDEN


@pytest.mark.parametrize("d", [1, 100, 5000, 65537])
@pytest.mark.parametrize("bits", [0.3, 1.5, 3.7])
def test_the_planned_wire_size_is_the_encodings(d, bits):
    """The planner sizes a plan without quantizing; that size must be the bytes the plan's
    encoding then sends, or the budget it aims at is not the one it meets."""
    codec = fq.get_codec("eden", bits=bits)
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    budget = math.floor(bits * d / 8)
    for overhead in (0.0, 48.0, 400.0):
        plan = codec.plan(d, budget, overhead)
        enc = codec._encode_plan(x, x, 3, 1, plan)
        assert codec._wire_size(x, 3, 1, d, plan) == enc.nbytes
