"""Correlated quantization: the round's clients share a stratified dither, so the errors of
their estimates cancel in the mean.

Suresh, Sun, Ro and Yu, "Correlated quantization for distributed mean estimation and
optimization", ICML 2022, https://proceedings.mlr.press/v162/suresh22a.html: its
OneDimOneBitCQ / OneDimKLevelsCQ quantizers give client i of n the threshold
U_i = (pi_i + gamma_i) / n, with pi a random permutation of 0..n-1 shared by the clients
and gamma_i a client's own uniform, so that each U_i is uniform (every client stays
unbiased) while the n thresholds cover [0, 1) once each (their rounding errors cancel);
its WalshHadamardCQ and EntropyCQ put this after a shared random rotation and before a
variable-length code.

Here the same stratified uniforms are the dither of the entropy-coded dithered quantizer
(:mod:`fedquant.codecs.ecdq`): client i of coordinate j uses

    u_ij = (pi_j(i) + gamma_ij) / n - 1/2,

with a random permutation pi_j per coordinate, pi_j(i) = (a_j i + s_j) mod n (a_j a
random unit mod n, s_j a random shift), and gamma_ij uniform from the client's own stream.
The paper draws pi uniformly from all permutations; the affine family keeps the two
properties each coordinate needs (every pi_j(i) is uniform, so every client is unbiased;
the n places are distinct, so the dithers are stratified) at O(1) cost per coordinate,
where ranking n hashes would cost O(n) per coordinate and O(n^2 d) per round. Each
client's estimate is exactly an ECDQ estimate (unbiased, vNMSE = step^2 / 12, the same
entropy-coded rate), but when the clients' rotated vectors are close, their errors
step * (round(t + u_ij) - t - u_ij) sample the sawtooth at n evenly spread points and the
error of the mean falls like 1 / n^2 instead of 1 / n. On dissimilar clients the errors are
nearly uncorrelated (within O(1 / n)), as with independent dithers.

Use: every client of a round encodes with the SAME seed (the round seed: one shared
rotation, one shared permutation per coordinate) and its own ``client`` index in
0..clients-1; ``fq.decode_mean`` of the payloads is the unbiased mean. The index travels
in a one-word section "client" (so all payloads of a round have equal codec parameters).
A client that drops out leaves a gap in the strata: the mean of the others stays unbiased
(each dither is still uniform on its own), only the cancellation is partial.

Example::

    codec = fq.get_codec("correlated", bits=1.0, clients=32, client=i)
    enc = codec.encode(update_i, seed=round_seed)
"""

from __future__ import annotations

import functools
import math

import torch

from fedquant import random as fqr
from fedquant.codecs.base import register_codec
from fedquant.codecs.ecdq import ECDQ
from fedquant.wire import Encoded, Section, WireError

MAX_CLIENTS = 1 << 16
_A_START = 1 << 40  # counter offset of the multipliers' stream (the shifts start at 0)


def check_clients(clients: int, client: int) -> tuple[int, int]:
    """(clients, client) if 1 <= clients <= 2^16 and 0 <= client < clients, else
    ValueError."""
    if isinstance(clients, bool) or not isinstance(clients, int) or not (
            1 <= clients <= MAX_CLIENTS):
        raise ValueError(f"clients must be an integer in 1..{MAX_CLIENTS}, got {clients!r}")
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < clients:
        raise ValueError(f"client must be an integer in 0..clients-1 = 0..{clients - 1}, "
                         f"got {client!r}")
    return clients, client


@functools.lru_cache(maxsize=64)  # bounded: `clients` comes from the wire
def units(n: int) -> torch.Tensor:
    """The multipliers a in 1..n-1 (0 for n = 1) with gcd(a, n) = 1, int64."""
    return torch.tensor([a for a in range(1, n) if math.gcd(a, n) == 1] or [0],
                        dtype=torch.int64)


def stratum(seed: int, clients: int, client: int, n: int) -> torch.Tensor:
    """pi_j(client) for j in [0, n) (int64, CPU): pi_j(i) = (a_j * i + s_j) mod clients with
    a_j a uniform unit mod clients and s_j uniform in 0..clients-1, both from the shared
    stream (seed, SHARED_INDEX). Each pi_j is a permutation (the places are distinct) and
    pi_j(i) is uniform for every i (so each client's dither is uniform), at O(1) cost per
    coordinate whatever the number of clients."""
    shift = fqr.integers(seed, fqr.Purpose.SHARED_INDEX, n, clients)
    table = units(clients)
    a = table[fqr.integers(seed, fqr.Purpose.SHARED_INDEX, n, table.numel(), start=_A_START)]
    return (a * client + shift) % clients


@register_codec
class Correlated(ECDQ):
    """ECDQ whose clients share a stratified dither (Suresh et al., ICML 2022; see the
    module docstring): unbiased per client, with negatively correlated errors.

    Args:
        bits (float, default 1.0): bits per coordinate on the wire, header included.
        clients (int, default 1): n, the number of clients of the round (1..65536).
        client (int, default 0): this sender's index in 0..n-1 (not a wire parameter: it
            travels in the "client" section).
        rotations (int | str, default "auto"): composed RHTs, 0..3 or "auto".
    """

    name = "correlated"

    def __init__(self, bits: float = 1.0, clients: int = 1, client: int = 0,
                 rotations: str = "auto"):
        super().__init__(bits=bits, rotations=rotations)
        self.clients, self.client = check_clients(clients, client)

    def wire_params(self) -> dict[str, str]:
        # the index is per client: keep it out of the params so that the payloads of one
        # round match (fq.decode_mean requires equal params)
        params = super().wire_params()
        params.pop("client")
        return params

    def dither(self, seed: int, n: int, client: int = 0) -> torch.Tensor:
        gamma = fqr.uniforms(fqr.derive_seed(seed, client), fqr.Purpose.DITHER, n)
        if self.clients == 1:
            return gamma.to(torch.float64) - 0.5
        place = stratum(seed, self.clients, client, n).to(torch.float64)
        return (place + gamma.to(torch.float64)) / self.clients - 0.5

    def extra_sections(self) -> dict[str, Section]:
        return {"client": Section.from_raw("client", torch.tensor([self.client],
                                                                  dtype=torch.int32))}

    def client_of(self, enc: Encoded) -> int:
        section = enc.section("client")
        if section.bits != 32 or section.count != 1:
            raise WireError("sections['client']: expected one 32-bit integer")
        client = int(section.raw("int")[0])
        if not 0 <= client < self.clients:
            raise WireError(f"sections['client']: index {client} outside 0..clients-1 = "
                            f"0..{self.clients - 1}")
        return client

    def validate(self, enc: Encoded) -> None:
        super().validate(enc)
        self.client_of(enc)


__all__ = ["Correlated", "check_clients", "stratum", "units"]
