"""Robust aggregation: screen clients' updates by their L2 norm before they are averaged.

One client can move a plain mean arbitrarily far (a finite update of norm 1e30 shifts it by
1e30 / n). A norm bound removes that lever: an update whose norm exceeds the bound is
rejected (or, with ``action="clip"``, scaled down to the bound, as in DP-FedAvg's clipping,
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018,
https://arxiv.org/abs/1710.06963), and the bound is absolute, a multiple of the round's
median norm (robust to a minority of outliers), or the smaller of the two. An update with a
NaN or Inf anywhere has an infinite norm and is always rejected.

The module is pure torch: the aggregation server (``fedquant.server``) and the Flower
strategy wrapper both call it, the server one push at a time (:meth:`NormPolicy.judge`
against the norms seen so far), the wrapper on a whole round (:func:`screen` or
:func:`robust_mean`).

API::

    policy = NormPolicy(max_norm=10.0, median_multiple=3.0, action="reject")
    norms = {cid: update_norm(u) for cid, u in updates.items()}
    result = screen(norms, policy)           # Screening: verdicts by client
    result.accepted                          # {client: factor}, factor 1.0, or < 1 if clipped
    result.rejected                          # {client: reason}
    mean, result = robust_mean(updates, policy, weights={cid: n_examples, ...})

    # streaming (one update at a time, the server's case)
    verdict = policy.judge(norm, previous_norms)   # Verdict(norm, bound, factor, reason)
    # a fixed bound for a batch (what screen does)
    bound, rule = policy.bound_and_rule(norms.values())
    verdict = policy.verdict(norm, bound, rule)

A Verdict's `factor` is what to multiply the update by (1.0 accepted, in (0, 1) clipped,
0.0 rejected) and its `reason` says why ("" when accepted unchanged); `accepted` and
`clipped` are properties.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)
ACTIONS = ("reject", "clip")


def update_norm(update: torch.Tensor) -> float:
    """The L2 norm of `update` computed in float64 on its own device; ``inf`` when any entry
    is NaN or Inf (so that a poisoned update is never accepted)."""
    if not isinstance(update, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(update).__name__}")
    if update.numel() == 0:
        return 0.0
    norm = float(torch.linalg.vector_norm(update.detach().reshape(-1), dtype=torch.float64))
    return norm if math.isfinite(norm) else math.inf


@dataclass(frozen=True)
class Verdict:
    """What happens to one update.

    Attributes:
        norm (float): its L2 norm (``inf`` if it holds NaN/Inf).
        bound (float): the bound it was judged against (``inf``: no bound applied).
        factor (float): multiply the update by this before adding it: 1.0 accepted as is,
            in (0, 1) clipped to the bound, 0.0 rejected.
        reason (str): "" when accepted unchanged, else why it was clipped or rejected.
    """

    norm: float
    bound: float
    factor: float
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.factor > 0.0

    @property
    def clipped(self) -> bool:
        return 0.0 < self.factor < 1.0


@dataclass(frozen=True)
class NormPolicy:
    """A norm bound on clients' updates.

    Args:
        max_norm (float, default inf): absolute bound on an update's L2 norm.
        median_multiple (float, default inf): bound = this multiple of the median norm of
            the round's (finite) updates; applies once at least `min_count` norms are known.
        action (str, default "reject"): "reject" drops an update above the bound; "clip"
            scales it down to the bound.
        min_count (int, default 3): norms needed before `median_multiple` applies (the
            median of one or two norms says nothing about the others).

    With both bounds infinite (the default) every finite update is accepted unchanged.
    """

    max_norm: float = math.inf
    median_multiple: float = math.inf
    action: str = "reject"
    min_count: int = 3

    def __post_init__(self) -> None:
        for name in ("max_norm", "median_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
                raise ValueError(f"{name} must be a number > 0 (inf: no bound), got {value!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        if not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {self.min_count!r}")

    @property
    def enabled(self) -> bool:
        """Whether any bound is set (non-finite updates are rejected regardless)."""
        return math.isfinite(self.max_norm) or math.isfinite(self.median_multiple)

    @classmethod
    def from_dict(cls, spec: Mapping[str, object]) -> NormPolicy:
        """From a config table with keys max_norm, median_multiple, action, min_count;
        ValueError names an unknown key."""
        allowed = ("max_norm", "median_multiple", "action", "min_count")
        unknown = set(spec) - set(allowed)
        if unknown:
            raise ValueError(f"unknown norm-bound key(s) {sorted(unknown)}; allowed: "
                             f"{list(allowed)}")
        return cls(**spec)  # type: ignore[arg-type]

    def bound(self, norms: Iterable[float]) -> float:
        """The bound for a round whose updates have `norms` (non-finite ones are ignored)."""
        return self.bound_and_rule(norms)[0]

    def bound_and_rule(self, norms: Iterable[float]) -> tuple[float, str]:
        """The bound for a round whose updates have `norms`, and the rule that set it
        ("max_norm" or "K x median norm"), for the reasons of :meth:`verdict`."""
        finite = [n for n in norms if math.isfinite(n)]
        if math.isfinite(self.median_multiple) and len(finite) >= self.min_count:
            by_median = self.median_multiple * statistics.median(finite)
            if by_median < self.max_norm:
                return by_median, f"{self.median_multiple:g} x median norm"
        return self.max_norm, "max_norm"

    def judge(self, norm: float, others: Iterable[float] = ()) -> Verdict:
        """The verdict on one update of norm `norm`, the median (if any) being taken over
        `others` and `norm` itself (the streaming case: the norms seen so far)."""
        return self.verdict(norm, *self.bound_and_rule([*others, norm]))

    def verdict(self, norm: float, bound: float, rule: str = "max_norm") -> Verdict:
        """The verdict on an update of norm `norm` against a given `bound` (from
        :meth:`bound_and_rule`): the batch case, every update against the same bound."""
        if not math.isfinite(norm):
            return Verdict(math.inf, bound, 0.0, "update holds NaN or Inf")
        if norm <= bound:
            return Verdict(norm, bound, 1.0)
        if self.action == "clip" and bound > 0:
            return Verdict(norm, bound, bound / norm,
                           f"norm {norm:.6g} clipped to {bound:.6g} ({rule})")
        return Verdict(norm, bound, 0.0, f"norm {norm:.6g} exceeds the bound {bound:.6g} "
                       f"({rule})")


@dataclass(frozen=True)
class Screening:
    """Verdicts on a round's updates, by client; see :func:`screen`."""

    verdicts: dict = field(default_factory=dict)

    @property
    def accepted(self) -> dict:
        """{client: factor} of the updates to average (factor < 1: clipped)."""
        return {k: v.factor for k, v in self.verdicts.items() if v.accepted}

    @property
    def rejected(self) -> dict:
        """{client: reason} of the updates left out."""
        return {k: v.reason for k, v in self.verdicts.items() if not v.accepted}

    @property
    def clipped(self) -> dict:
        """{client: reason} of the accepted updates that were scaled down."""
        return {k: v.reason for k, v in self.verdicts.items() if v.clipped}


def screen(norms: Mapping[K, float], policy: NormPolicy) -> Screening:
    """Judge a whole round at once: every update against the same bound (the median taken
    over all the round's finite norms)."""
    bound, rule = policy.bound_and_rule(norms.values())
    return Screening({key: policy.verdict(norm, bound, rule) for key, norm in norms.items()})


def robust_mean(updates: Mapping[K, torch.Tensor], policy: NormPolicy,
                weights: Mapping[K, float] | None = None) -> tuple[torch.Tensor | None, Screening]:
    """The weighted mean of the updates that pass `policy` (clipped ones scaled down), and
    the screening. The mean is None when every update is rejected; it has the updates'
    shape, dtype and device, and is summed in float64.

    Example::

        mean, result = robust_mean({1: u1, 2: u2, 3: u3}, NormPolicy(median_multiple=3))
    """
    if not updates:
        raise ValueError("robust_mean needs at least one update")
    weights = {k: 1.0 for k in updates} if weights is None else dict(weights)
    if set(weights) != set(updates):
        raise ValueError("weights must name exactly the clients of updates")
    for key, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of client {key!r} must be finite and >= 0, got {w}")
    result = screen({k: update_norm(u) for k, u in updates.items()}, policy)
    total, total_weight, first = None, 0.0, next(iter(updates.values()))
    for key, factor in result.accepted.items():
        w = weights[key]
        if w == 0:
            continue
        part = updates[key].detach().to(torch.float64) * (w * factor)
        total = part if total is None else total.add_(part)
        total_weight += w
    if total is None or total_weight == 0 or not math.isfinite(total_weight):
        return None, result
    return (total / total_weight).to(first.dtype), result


__all__ = ["ACTIONS", "NormPolicy", "Screening", "Verdict", "robust_mean", "screen",
           "update_norm"]
