"""Codecs, one module per scheme; importing this package registers them all."""

from fedquant.codecs import eden, identity  # noqa: F401  (registration side effect)
from fedquant.codecs.base import (
    Codec,
    available_codecs,
    codec_class,
    codec_for,
    get_codec,
    register_codec,
)

__all__ = ["Codec", "available_codecs", "codec_class", "codec_for", "get_codec",
           "register_codec"]
