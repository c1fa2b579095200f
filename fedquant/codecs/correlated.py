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

with an independent uniformly random permutation pi_j per coordinate (client i's place
among n hashes of (seed, j, i')) and gamma_ij uniform from the client's own stream. Each
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

import numpy as np
import torch

from fedquant import random as fqr
from fedquant._numba import AVAILABLE, njit
from fedquant.codecs.base import register_codec
from fedquant.codecs.ecdq import ECDQ
from fedquant.wire import Encoded, Section, WireError

MAX_CLIENTS = 1 << 16
_CHUNK = 1 << 22  # hashes per block when ranking the clients of many coordinates


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


@njit(cache=True, nogil=True)
def _places_numba(key: np.uint64, clients: int, client: int,
                  out: np.ndarray) -> None:  # pragma: no cover - jit
    """out[j] = #{i : h(j, i) < h(j, client), ties by index}, h(j, i) the hash of counter
    j * clients + i in the stream `key`."""
    for j in range(out.size):
        base = np.uint64(j) * np.uint64(clients)
        mine = fqr.hash64_numba(key, base + np.uint64(client))
        below = 0
        for i in range(clients):
            h = fqr.hash64_numba(key, base + np.uint64(i))
            if h < mine or (h == mine and i < client):
                below += 1
        out[j] = below


def stratum(seed: int, clients: int, client: int, n: int) -> torch.Tensor:
    """pi_j(client) for j in [0, n): the client's place (int64, CPU) among the `clients`
    hashes hash64(seed, SHARED_INDEX, j * clients + i'), ties broken by index, so that
    pi_j is a uniformly random permutation of 0..clients-1, independent over j (a numba
    loop; :func:`_places_torch` gives the same numbers without numba)."""
    if AVAILABLE:
        out = np.empty(n, dtype=np.int64)
        _places_numba(np.uint64(fqr.stream_key(seed, fqr.Purpose.SHARED_INDEX)), clients,
                      client, out)
        return torch.from_numpy(out)
    out = torch.empty(n, dtype=torch.int64)
    rows = max(1, _CHUNK // clients)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        h = fqr.hash64_torch(seed, fqr.Purpose.SHARED_INDEX, lo * clients,
                             (hi - lo) * clients).view(hi - lo, clients)
        out[lo:hi] = _places_torch(h, client)
    return out


def _places_torch(h: torch.Tensor, client: int) -> torch.Tensor:
    """Row-wise place of column `client` among int64 hash bits compared as uint64 (flip
    the sign bit, then signed order is unsigned order)."""
    h = h ^ torch.iinfo(torch.int64).min
    mine = h[:, client: client + 1]
    return (h < mine).sum(1) + (h[:, :client] == mine).sum(1)


@register_codec
class Correlated(ECDQ):
    """ECDQ whose clients share a stratified dither (Suresh et al., ICML 2022; see the
    module docstring): unbiased per client, with negatively correlated errors.

    Args:
        bits (float, default 1.0): bits per coordinate on the wire, header included.
        clients (int, default 1): n, the number of clients of the round (1..65536).
        client (int, default 0): this sender's index in 0..n-1 (not a wire parameter: it
            travels in the "client" section).
        rotations (int | str, default "auto"): composed RHTs, 1..3 or "auto".
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


__all__ = ["Correlated", "check_clients", "stratum"]
