"""Partitioning with flwr-datasets at 10, 100 and 1000 clients: never an empty partition."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedquant.fl import task as fl_task
from fedquant.fl.partition import adapted_min_size, partition_indices


def _digits_labels() -> np.ndarray:
    return fl_task.load_task("digits", 0).train_y


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    rows = np.concatenate(parts)
    assert min(len(p) for p in parts) >= 1
    assert len(rows) == n and len(np.unique(rows)) == n  # every row exactly once


def _mean_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    out = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10)
        q = counts[counts > 0] / counts.sum()
        out.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(out))


@pytest.mark.parametrize("clients", [10, 100])
def test_dirichlet_on_digits_succeeds_at_10_and_100_clients(clients):
    labels = _digits_labels()
    parts = partition_indices(labels, "dirichlet", clients, alpha=0.5, seed=0)
    assert len(parts) == clients
    _check_cover(parts, len(labels))
    # label skew: the clients' label mixes are far less diverse than IID shares
    iid = partition_indices(labels, "iid", clients)
    _check_cover(iid, len(labels))
    assert _mean_entropy(parts, labels) < 0.8 * _mean_entropy(iid, labels)


def test_dirichlet_at_1000_clients_with_enough_rows_succeeds():
    labels = np.random.default_rng(1).integers(0, 10, 20_000)
    parts = partition_indices(labels, "dirichlet", 1000, alpha=0.5, seed=0)
    _check_cover(parts, len(labels))
    assert adapted_min_size(20_000, 1000) == 5  # asked first, halved when flwr finds none


def test_dirichlet_at_1000_clients_on_digits_stops_with_a_count_that_works():
    labels = _digits_labels()
    with pytest.raises(ValueError, match="without data") as err:
        partition_indices(labels, "dirichlet", 1000, alpha=0.5, seed=0)
    message = str(err.value)
    assert "1000 clients" in message and "alpha = 0.5" in message
    suggested = int(re.search(r"num_clients <= (\d+)", message).group(1))
    assert 1 <= suggested < 1000
    _check_cover(partition_indices(labels, "dirichlet", suggested, 0.5, seed=0), len(labels))


def test_iid_at_1000_clients_gives_every_client_a_row():
    labels = _digits_labels()
    parts = partition_indices(labels, "iid", 1000)
    _check_cover(parts, len(labels))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_iid_shards_are_flwr_datasets_iid_partitions():
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    part = IidPartitioner(num_partitions=7)
    part.dataset = Dataset.from_dict({"row": np.arange(100)})
    parts = partition_indices(np.zeros(100, dtype=np.int64), "iid", 7)
    for i in range(7):
        np.testing.assert_array_equal(parts[i], part.load_partition(i)["row"])


def test_more_clients_than_rows_names_the_largest_count():
    with pytest.raises(ValueError, match="use at most 50 clients"):
        partition_indices(np.zeros(50, dtype=np.int64), "iid", 51)


@pytest.mark.parametrize("kwargs,message", [
    ({"partitioning": "sorted"}, "partitioning"),
    ({"num_partitions": 0}, "num_partitions"),
    ({"num_partitions": 2.0}, "num_partitions"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
])
def test_bad_settings_are_named(kwargs, message):
    args = {"partitioning": "dirichlet", "num_partitions": 4, "alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition_indices(np.arange(100) % 10, **args)


def test_the_task_layer_partitions_through_the_same_function():
    task = fl_task.load_task("digits", 0)
    parts = partition_indices(task.train_y, "dirichlet", 100, 0.5, seed=0)
    for i in (0, 57, 99):
        np.testing.assert_array_equal(fl_task.partition_rows(task, "dirichlet", 100, 0.5, i),
                                      parts[i])


def test_adapted_min_size_is_between_1_and_10():
    assert adapted_min_size(1437, 10) == 10
    assert adapted_min_size(1437, 100) == 3
    assert adapted_min_size(1437, 1000) == 1


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_inner_dirichlet_splits_digits_among_100_equal_skewed_clients(alpha):
    labels = _digits_labels()
    parts = partition_indices(labels, "inner-dirichlet", 100, alpha=alpha, seed=0)
    _check_cover(parts, len(labels))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    iid = partition_indices(labels, "iid", 100)
    assert _mean_entropy(parts, labels) < 0.8 * _mean_entropy(iid, labels)


def test_inner_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _digits_labels()
    skew = {a: _mean_entropy(partition_indices(labels, "inner-dirichlet", 50, a, seed=1), labels)
            for a in (0.1, 10.0)}
    assert skew[0.1] < 0.6 * skew[10.0]
