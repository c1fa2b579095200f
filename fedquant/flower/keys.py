"""The names the fedquant mod and strategy wrapper agree on in Flower messages.

Config keys travel in the train message's ConfigRecord; none is ever an empty string
(Flower rejects empty strings in a ConfigRecord).
"""

CODEC_KEY = "fedquant.codec"                # the round's codec spec, "eden:bits=2,..."
ROUND_SEED_KEY = "fedquant.round-seed"      # uint64 as text (does not fit a sint64)
SEED_POLICY_KEY = "fedquant.seed-policy"    # "per-client" or "shared"
RAW_KEYS_KEY = "fedquant.raw-keys"          # comma-separated glob patterns, or "none"
ERROR_FEEDBACK_KEY = "fedquant.error-feedback"  # bool
CLIENT_INDEX_KEY = "fedquant.client-index"  # a client's index in 0..n-1 (correlated codecs)

#: the reply's compressed update: an Array of raw bytes (the serialized fq.Encoded)
PAYLOAD_KEY = "fedquant.payload"
PAYLOAD_STYPE = "fedquant.v1.EncodedUpdate"

#: the node's error-feedback residual in ``context.state``
RESIDUAL_KEY = "fedquant.residual"


def raw_patterns_text(patterns: tuple[str, ...] | list[str]) -> str:
    """The raw-key patterns as config text ("none" for no pattern: never an empty string)."""
    for p in patterns:
        if not p or "," in p:
            raise ValueError(f"raw-key patterns must be non-empty globs without ',', got {p!r}")
    return ",".join(patterns) if patterns else "none"


def raw_patterns_from_text(text: str) -> tuple[str, ...]:
    return () if text == "none" else tuple(p for p in text.split(",") if p)
