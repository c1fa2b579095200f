"""Codecs, one module per scheme; importing this package registers them all."""

# Registration side effects: one line per codec module.
from fedquant.codecs import (
    correlated,  # noqa: F401
    dither,  # noqa: F401
    ecdq,  # noqa: F401
    eden,  # noqa: F401
    fractional,  # noqa: F401
    identity,  # noqa: F401
    lattice,  # noqa: F401
    lplr,  # noqa: F401
    qsgd,  # noqa: F401
    quicfl,  # noqa: F401
    sign,  # noqa: F401
    sketch,  # noqa: F401
    sparse,  # noqa: F401
    stochastic,  # noqa: F401
    timeshare,  # noqa: F401
    vq,  # noqa: F401
)
from fedquant.codecs.base import (
    Codec,
    available_codecs,
    codec_class,
    codec_for,
    codec_spec,
    get_codec,
    parse_codec_spec,
    register_codec,
    typed_codec_spec,
)

__all__ = ["Codec", "available_codecs", "codec_class", "codec_for", "codec_spec", "get_codec",
           "parse_codec_spec", "register_codec", "typed_codec_spec"]
