"""fedquant: communication-efficient federated learning and distributed mean estimation.

    import fedquant as fq
    codec = fq.get_codec("eden", bits=2, rotations="auto")
    blob = codec.encode(x, seed=1234).to_bytes()
    x_hat = fq.decode(fq.Encoded.from_bytes(blob))
"""

from fedquant import random
from fedquant.codecs import Codec, available_codecs, get_codec, register_codec
from fedquant.mean import decode, decode_mean
from fedquant.metrics import nmse, vnmse
from fedquant.wire import Encoded, Section, WireError

__version__ = "0.1.0"

__all__ = ["Codec", "Encoded", "Section", "WireError", "available_codecs", "decode",
           "decode_mean", "get_codec", "nmse", "random", "register_codec", "vnmse"]
