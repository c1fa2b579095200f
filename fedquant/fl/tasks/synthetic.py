"""Built-in task ``synthetic``: LEAF/FedProx Synthetic(alpha, beta), non-IID by construction.

The benchmark of FedProx (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020, https://arxiv.org/abs/1812.06127; also in LEAF, Caldas et al.,
https://arxiv.org/abs/1812.01097), generated here (no download). Client k draws
u_k ~ N(0, alpha), B_k ~ N(0, beta); its model W_k ~ N(u_k, 1) (60 x 10), b_k ~ N(u_k, 1);
its inputs x ~ N(v_k, diag(j^-1.2)) with v_k ~ N(B_k, 1); labels y = argmax(x W_k + b_k).
alpha sets how much the clients' models differ, beta how much their inputs do. Client k
has lognormal(4, 2) + 50 examples as in FedProx, capped at ``max_samples`` (1000) here to
bound memory at 1000 clients; 90% train, 10% test. The model is multinomial logistic
regression (60 -> 10); FedProx trains it with SGD, lr 0.01, batch 10.

Client k's data depend on (data_seed, k) only, not on the number of clients. The
``synthetic_alpha`` and ``synthetic_beta`` options (``task_args`` in ``fedquant fl``) set
alpha and beta (default 1, 1: FedProx's most heterogeneous setting).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedquant.fl.tasks import _common
from fedquant.fl.tasks._common import test, train

__all__ = ["Net", "client_data", "load_centralized_dataset", "load_data", "test", "train"]

DIMENSION, NUM_CLASSES = 60, 10


class Net(nn.Sequential):
    """Multinomial logistic regression, 60 features -> 10 classes."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(DIMENSION, NUM_CLASSES))


def _check(alpha: float, beta: float, max_samples: int) -> None:
    for name, value in (("synthetic_alpha", alpha), ("synthetic_beta", beta)):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 60:
        raise ValueError(f"max_samples must be an integer >= 60, got {max_samples!r}")


@functools.lru_cache(maxsize=4096)
def client_data(client: int, alpha: float = 1.0, beta: float = 1.0, data_seed: int = 0,
                max_samples: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Client `client`'s examples (x float32 of shape (n, 60), y int64), from
    (data_seed, client) only."""
    _check(alpha, beta, max_samples)
    rng = np.random.default_rng([int(data_seed), int(client)])
    n = min(int(rng.lognormal(4, 2)) + 50, max_samples)
    u, b_shift = rng.normal(0, alpha), rng.normal(0, beta)
    v = rng.normal(b_shift, 1, DIMENSION)
    w = rng.normal(u, 1, (DIMENSION, NUM_CLASSES))
    b = rng.normal(u, 1, NUM_CLASSES)
    std = np.arange(1, DIMENSION + 1) ** -0.6  # diag(j^-1.2) covariance
    x = v + std * rng.standard_normal((n, DIMENSION))
    y = np.argmax(x @ w + b, axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def _split(client: int, alpha: float, beta: float, data_seed: int, max_samples: int):
    x, y = client_data(client, float(alpha), float(beta), int(data_seed), int(max_samples))
    n_train = int(0.9 * len(x))
    return (torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train]),
            torch.from_numpy(x[n_train:]), torch.from_numpy(y[n_train:]))


def load_data(partition_id: int, num_partitions: int, synthetic_alpha: float = 1.0,
              synthetic_beta: float = 1.0, data_seed: int = 0, batch_size: int = 10,
              max_samples: int = 1000) -> tuple[DataLoader, DataLoader]:
    """Client `partition_id`'s 90% train split and its own 10% test split."""
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or \
            not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be an int in 0..{num_partitions - 1}, "
                         f"got {partition_id!r}")
    x, y, tx, ty = _split(partition_id, synthetic_alpha, synthetic_beta, data_seed,
                          max_samples)
    return (_common.tensors_loader(x, y, int(batch_size), True, partition_id),
            _common.tensors_loader(tx, ty, _common.TEST_BATCH, False))


def load_centralized_dataset(num_partitions: int, synthetic_alpha: float = 1.0,
                             synthetic_beta: float = 1.0, data_seed: int = 0,
                             max_samples: int = 1000) -> DataLoader:
    """The union of the `num_partitions` clients' test splits."""
    parts = [_split(k, synthetic_alpha, synthetic_beta, data_seed, max_samples)[2:]
             for k in range(num_partitions)]
    return _common.tensors_loader(torch.cat([p[0] for p in parts]),
                                  torch.cat([p[1] for p in parts]), _common.TEST_BATCH, False)
