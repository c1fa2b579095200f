"""The federated-learning protocol that every fedquant integration shares.

One place for what a client and a server of a compressed FL round must agree on, with no
Flower and no gRPC in it: the seeds (:func:`round_seed`, :func:`client_seed`), compressing
an update (:func:`encode_update`), flattening named arrays into one vector
(:func:`flatten_arrays`), and checking and averaging the clients' payloads
(:func:`check_payload`, :func:`aggregate_payloads`). The Flower mod and strategy wrapper
(``fedquant.flower``), the apps in ``server/`` and ``clients/`` and the in-process runner of
``fedquant fl`` all call these functions; built-in training tasks live in
``fedquant.fl.tasks``.
"""

from fedquant.fl.arrays import flatten_arrays, is_raw_key, split_keys, unflatten_arrays
from fedquant.fl.protocol import (
    SEED_POLICIES,
    Aggregate,
    Payload,
    aggregate_payloads,
    check_payload,
    client_seed,
    codec_for_round,
    encode_update,
    round_seed,
)

__all__ = ["SEED_POLICIES", "Aggregate", "Payload", "aggregate_payloads", "check_payload",
           "client_seed", "codec_for_round", "encode_update", "flatten_arrays", "is_raw_key",
           "round_seed", "split_keys", "unflatten_arrays"]
