"""Splitting a training pool among clients with flwr-datasets, at 10 or at 1000 clients.

:func:`partition_indices` returns one array of row indices per client:

* ``iid``: the contiguous shards of ``IidPartitioner``;
* ``dirichlet``: each class's rows split among the clients in Dirichlet(alpha) proportions
  (``DirichletPartitioner``; Yurochkin et al., "Bayesian Nonparametric Federated Learning
  of Neural Networks", ICML 2019, https://arxiv.org/abs/1905.12022), so client sizes vary;
* ``inner-dirichlet``: clients of equal size, each drawing its own label proportions from
  Dirichlet(alpha) over the classes (``InnerDirichletPartitioner``; Hsu et al., "Measuring
  the Effects of Non-Identical Data Distribution for Federated Visual Classification",
  2019, https://arxiv.org/abs/1909.06335; as in FedDyn, Acar et al., ICLR 2021). It
  splits small pools among many clients at any alpha: 1438 digits rows among 100 clients
  at alpha 0.1, where ``dirichlet`` leaves some client empty.

No client is ever given an empty partition:

* more clients than rows is refused up front, with the largest client count that fits;
* the Dirichlet split asks for a minimum partition size adapted to the data,
  ``min(10, rows // (4 * clients))`` and never below 1, and, when flwr-datasets finds no
  split after its 10 retries, halves it down to 1 before giving up;
* when even a minimum of 1 row fails (e.g. 1437 digits rows among 1000 clients), it stops
  with a ValueError that names a client count and an alpha that do work for these labels.

Example::

    parts = partition_indices(labels, "dirichlet", num_partitions=100, alpha=0.5, seed=0)
    assert min(len(p) for p in parts) >= 1
"""

from __future__ import annotations

import warnings

import numpy as np

PARTITIONINGS = ("iid", "dirichlet", "inner-dirichlet")


def adapted_min_size(num_rows: int, num_partitions: int) -> int:
    """The minimum Dirichlet partition size asked of flwr-datasets: a quarter of the
    average partition, at most 10 and at least 1."""
    return max(1, min(10, num_rows // (4 * num_partitions)))


def _check(labels: np.ndarray, partitioning: str, num_partitions: int, alpha: float) -> None:
    if partitioning not in PARTITIONINGS:
        raise ValueError(f"partitioning must be one of {PARTITIONINGS}, got {partitioning!r}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int | np.integer):
        raise ValueError(f"num_partitions must be an int, got {num_partitions!r}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(f"{num_partitions} clients for {len(labels)} training rows would leave "
                         f"clients without data; use at most {len(labels)} clients")
    if partitioning != "iid" and not (isinstance(alpha, int | float)
                                            and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number for Dirichlet partitioning, "
                         f"got {alpha!r}")


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, seed: int,
               min_size: int) -> list[np.ndarray] | None:
    """flwr-datasets' Dirichlet split, or None when its 10 retries found none."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                alpha=float(alpha), min_partition_size=min_size,
                                self_balancing=True, seed=seed)
    part.dataset = Dataset.from_dict({"label": labels})
    with warnings.catch_warnings():  # one warning per retry; the failure is handled here
        warnings.simplefilter("ignore")
        try:
            part._determine_partition_id_to_indices_if_needed()
        except ValueError as err:
            if "max number of attempts" in str(err):
                return None
            raise
    return [np.asarray(part._partition_id_to_indices[i], dtype=np.int64)
            for i in range(num_partitions)]


def _inner_dirichlet(labels: np.ndarray, num_partitions: int, alpha: float,
                     seed: int) -> list[np.ndarray]:
    """flwr-datasets' InnerDirichletPartitioner with near-equal partition sizes."""
    from datasets import Dataset
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    sizes = [len(s) for s in np.array_split(np.arange(len(labels)), num_partitions)]
    part = InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label",
                                     alpha=float(alpha), seed=seed)
    # it indexes classes 0..K-1: map any label values onto that range
    part.dataset = Dataset.from_dict({"label": np.unique(labels, return_inverse=True)[1]})
    part.load_partition(0)  # draws the assignment of every partition at once
    return [np.asarray(part._partition_id_to_indices[i], dtype=np.int64)
            for i in range(num_partitions)]


def _suggestion(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> str:
    """A client count (halving) and an alpha (2, 8 or 32 times larger) that work."""
    clients = next((n for n in (num_partitions // 2 ** k for k in range(1, 30)) if n >= 1 and
                    _dirichlet(labels, n, alpha, seed, 1) is not None), 1)
    good_alpha = next((a for a in (alpha * m for m in (2, 8, 32))
                       if _dirichlet(labels, num_partitions, a, seed, 1) is not None), None)
    text = f"num_clients <= {clients} (at alpha = {alpha:g})"
    if good_alpha is not None:
        text += f", or alpha >= {good_alpha:g} (at {num_partitions} clients)"
    return text + ", or partitioning = 'iid'"


def partition_indices(labels: np.ndarray, partitioning: str, num_partitions: int,
                      alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Row indices of each of `num_partitions` clients; every client gets at least one row.

    `labels` (one per row; for regression, bins of the target) drive the Dirichlet split.
    Raises ValueError naming the bad setting, or, for a Dirichlet split that cannot give every
    client a row, a client count and an alpha that would work.
    """
    labels = np.asarray(labels)
    _check(labels, partitioning, num_partitions, alpha)
    if partitioning == "iid":
        # flwr-datasets' IidPartitioner's contiguous near-equal shards (``Dataset.shard(...,
        # contiguous=True)``), all at once: 1000 clients in microseconds, none empty
        return np.array_split(np.arange(len(labels), dtype=np.int64), num_partitions)
    if partitioning == "inner-dirichlet":
        return _inner_dirichlet(labels, num_partitions, alpha, seed)
    min_size = adapted_min_size(len(labels), num_partitions)
    while True:
        parts = _dirichlet(labels, num_partitions, alpha, seed, min_size)
        if parts is not None:
            return parts
        if min_size == 1:
            break
        min_size //= 2
    raise ValueError(
        f"a Dirichlet(alpha = {alpha:g}) split of {len(labels)} rows among {num_partitions} "
        f"clients leaves some client without data (flwr-datasets retried 10 times); use "
        f"{_suggestion(labels, num_partitions, alpha, seed)}")
