"""fedquant: communication-efficient federated learning and distributed mean estimation.

    import fedquant as fq
    codec = fq.get_codec("eden", bits=2, rotations="auto")
    blob = codec.encode(x, seed=1234).to_bytes()
    x_hat = fq.decode(fq.Encoded.from_bytes(blob))
"""

from importlib.metadata import PackageNotFoundError, version

from fedquant import random
from fedquant.codecs import (
    Codec,
    available_codecs,
    codec_spec,
    get_codec,
    parse_codec_spec,
    register_codec,
)
from fedquant.mean import decode, decode_mean
from fedquant.metrics import nmse, vnmse
from fedquant.wire import Encoded, Section, WireError

try:
    __version__ = version("fedquant")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Codec", "Encoded", "Section", "WireError", "available_codecs", "codec_spec",
           "decode", "decode_mean", "get_codec", "nmse", "parse_codec_spec", "random",
           "register_codec", "vnmse"]
