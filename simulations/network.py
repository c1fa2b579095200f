"""A network model that turns measured bytes and measured compute into wall-clock rounds.

FL compression papers compare schemes by time to accuracy at a given bandwidth, not by bytes
alone: a codec that saves bytes but costs encode time loses on a fast link. Each client of a
synchronous round (FedAvg and its kin) downloads the global model, trains and encodes, and
uploads its payload; the server waits for the slowest client, then decodes and averages::

    round = max over sampled clients k of
              (latency + 8 * model_bytes / downlink
               + compute_k
               + latency + 8 * payload_bytes_k / uplink)
            + server_seconds

``compute_k`` (local training plus encoding) and ``server_seconds`` (decoding and averaging)
are measured in the run; ``payload_bytes_k`` is ``len(payload)`` of what client k sent;
``model_bytes`` is the fp32 model the server broadcasts. Every client has the same link
(a :class:`Link`: uplink and downlink in Mbit/s, one-way latency in ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Link:
    """One client's network link: bandwidths in Mbit/s (10^6 bit/s), latency in ms."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        # bounds that keep every simulated time finite: up to 1 Pbit/s and a day of latency
        for key, what, high in (("uplink_mbps", "a positive number", 1e9),
                                ("downlink_mbps", "a positive number", 1e9),
                                ("latency_ms", "a number >= 0", 86.4e6)):
            value = getattr(self, key)
            low = 0.0 if key == "latency_ms" else 1e-6
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not low <= value <= high:
                raise ValueError(f"link {self.name!r}: {key} must be {what} "
                                 f"(at most {high:g}), got {value!r}")

    def client_seconds(self, model_bytes: int, compute_s: float, payload_bytes: int) -> float:
        """Download, compute and upload of one client on this link."""
        return (2 * self.latency_ms / 1e3 + 8 * model_bytes / (self.downlink_mbps * 1e6)
                + compute_s + 8 * payload_bytes / (self.uplink_mbps * 1e6))


# Uplinks of 1, 10 and 100 Mbit/s (a phone on a weak cell, home broadband, an office or a
# datacenter link); downlinks are faster or equal, as on real access networks.
DEFAULT_LINKS = (
    Link("1 Mbit/s", uplink_mbps=1, downlink_mbps=10, latency_ms=50),
    Link("10 Mbit/s", uplink_mbps=10, downlink_mbps=50, latency_ms=20),
    Link("100 Mbit/s", uplink_mbps=100, downlink_mbps=100, latency_ms=5),
)
LINK_KEYS = ("name", "uplink_mbps", "downlink_mbps", "latency_ms")
LINK_SCHEMA = {"name": str, "uplink_mbps": float, "downlink_mbps": float, "latency_ms": float}


def parse_links(tables: Any, where: str = "links") -> tuple[Link, ...]:
    """Links from config tables ``{name, uplink_mbps, downlink_mbps, latency_ms}``;
    ValueError names the bad entry and key."""
    if not isinstance(tables, list | tuple) or not tables:
        raise ValueError(f"{where} must be a non-empty list of tables, got {tables!r}")
    from fedquant.simulations.common import check_keys

    links = []
    for i, t in enumerate(tables):
        if isinstance(t, Link):
            links.append(t)
            continue
        if not isinstance(t, dict):
            raise ValueError(f"{where}[{i}] must be a table, got {t!r}")
        check_keys(t, LINK_SCHEMA, f"{where}[{i}].")
        missing = {"uplink_mbps", "downlink_mbps"} - set(t)
        if missing:
            raise ValueError(f"{where}[{i}] needs {sorted(missing)}")
        name = t.get("name", f"{t['uplink_mbps']:g} Mbit/s")
        try:
            links.append(Link(name, t["uplink_mbps"], t["downlink_mbps"],
                              t.get("latency_ms", 0.0)))
        except ValueError as err:
            raise ValueError(f"{where}[{i}]: {err}") from None
    names = [lk.name for lk in links]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: link names must be distinct, got {names}")
    return tuple(links)


def round_seconds(link: Link, model_bytes: int, client_compute_s: Sequence[float],
                  client_payload_bytes: Sequence[int], server_s: float) -> float:
    """One synchronous round's wall-clock on `link`: the slowest client, then the server."""
    if len(client_compute_s) != len(client_payload_bytes):
        raise ValueError("one compute time and one payload size per client")
    if not client_compute_s:
        return server_s
    return max(link.client_seconds(model_bytes, c, b)
               for c, b in zip(client_compute_s, client_payload_bytes, strict=True)) + server_s


def elapsed_seconds(rows: Sequence[dict], link: Link) -> list[float]:
    """Simulated wall-clock since the start at each of a run's rows (round 0 = 0 s); rows
    carry ``model_bytes``, ``client_s``, ``client_bytes`` and ``server_s`` (``fedquant fl``,
    in-process engine)."""
    out, total = [], 0.0
    for r in rows:
        if r["round"] > 0:
            total += round_seconds(link, r["model_bytes"], r["client_s"], r["client_bytes"],
                                   r["server_s"])
        out.append(total)
    return out


__all__ = ["DEFAULT_LINKS", "LINK_KEYS", "Link", "elapsed_seconds", "parse_links",
           "round_seconds"]
