"""EDEN / DRIVE against REFERENCE.md, within sampling error."""

import math

import pytest
import torch

import fedquant as fq

# REFERENCE.md, "vNMSE per scheme and bit budget"
EDEN_UNBIASED = {1: math.pi / 2 - 1, 2: 0.1331, 3: 0.0358, 4: 0.00959}
EDEN_BIASED = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.0346, 4: 0.00950}


def _mean_vnmse(codec, d, trials, seed0=0):
    g = torch.Generator().manual_seed(seed0)
    vals = []
    for t in range(trials):
        x = torch.randn(d, generator=g)
        vals.append(fq.vnmse(x, fq.decode(codec.encode(x, seed=t))))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", ["unbiased", "biased"])
def test_eden_vnmse_matches_reference(bits, scale):
    ref = (EDEN_UNBIASED if scale == "unbiased" else EDEN_BIASED)[bits]
    got = _mean_vnmse(fq.get_codec("eden", bits=bits, scale=scale), 2**16, 4)
    assert abs(got - ref) / ref < 0.03, (got, ref)


@pytest.mark.parametrize("scale", ["unbiased", "biased"])
def test_drive_equals_eden_one_bit(scale):
    x = torch.randn(5000)
    a = fq.decode(fq.get_codec("drive", scale=scale).encode(x, seed=9))
    b = fq.decode(fq.get_codec("eden", bits=1, scale=scale).encode(x, seed=9))
    torch.testing.assert_close(a, b)


def test_eden_round_trip_shape_dtype_and_bytes():
    x = torch.randn(3, 70, 11).to(torch.bfloat16)
    enc = fq.get_codec("eden", bits=3).encode(x, seed=5)
    blob = enc.to_bytes()
    assert enc.nbytes == len(blob)
    again = fq.Encoded.from_bytes(blob)
    assert again.to_bytes() == blob
    out = fq.decode(again)
    assert out.shape == x.shape and out.dtype == x.dtype
