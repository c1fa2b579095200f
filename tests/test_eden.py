"""EDEN / DRIVE against REFERENCE.md, within sampling error."""

import math

import pytest
import torch

import fedquant as fq
from fedquant.codecs.base import expect_section
from fedquant.codecs.rotated import RotatedCodec, slice_values
from fedquant.rotation import padded_size, slice_layout
from fedquant.wire import Section

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


# The rotated-codec base (fedquant/codecs/rotated.py): a new rotation-based codec is the
# quantizer and its section checks. This one sends sign(z) with the unbiased scale, which
# is DRIVE (||z||^2 / ||z||_1 times the sign), so it must decode exactly like DRIVE.


class RotatedSign(RotatedCodec):
    """1 bit per coordinate: the sign of the rotated vector, one scale per slice."""

    name = "test-rotated-sign"  # not registered: decoded through the instance below

    def __init__(self, scale: str = "unbiased", rotations: str = "auto"):
        self.scale = scale
        self.set_rotations(rotations)

    def quantize(self, z, d, seed, rotations):
        scales = []
        for s in slice_layout(d):
            zs = z[s.offset: s.offset + s.size].double()
            scales.append(self.slice_scale(float(zs.norm()), float(zs.abs().sum()),
                                           lambda n=s.size: float(n)))  # <z, c>, ||c||^2
        return scales, {"q": Section.from_ints("q", (z >= 0).to(torch.uint8), 1)}

    def validate(self, enc):
        super().validate(enc)
        expect_section(enc, "q", padded_size(enc.numel), 1)
        self.expect_slice_scales(enc)

    def decode_rotated(self, enc, device=None):
        signs = enc.section("q").ints(device).double() * 2 - 1
        return signs * slice_values(enc.scales, enc.numel, signs.device)


@pytest.mark.parametrize("scale", ["unbiased", "biased"])
def test_a_thirty_line_rotated_codec_reproduces_drive(scale):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    mine = RotatedSign(scale=scale)
    enc = mine.encode(x, seed=11)
    mine.validate(enc)
    drive = fq.get_codec("drive", scale=scale).encode(x, seed=11)
    assert enc.rotations == drive.rotations
    assert enc.section("q").data == drive.section("q").data  # the same bits on the wire
    torch.testing.assert_close(mine.decode(enc), fq.decode(drive), atol=1e-6, rtol=1e-5)
    assert mine.is_unbiased == (scale == "unbiased")
