"""Built-in task ``linreg``: linear regression on a synthetic y = x w + noise (2000 rows,
100 features, generated from ``data_seed``); "accuracy" is the R^2 on the test split.
Dirichlet partitions skew over ten quantile bins of the target."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from fedquant.fl import task as fl_task
from fedquant.fl.tasks import _common
from fedquant.fl.tasks._common import test, train

__all__ = ["Net", "load_centralized_dataset", "load_data", "test", "train"]


class Net(nn.Sequential):
    """One linear layer, 100 features -> 1 output."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(100, 1))


def load_data(partition_id: int, num_partitions: int, partitioning: str = "dirichlet",
              alpha: float = 0.5, data_seed: int = 0, batch_size: int = 32,
              partition_cache: Any = None) -> tuple[DataLoader, DataLoader]:
    """The partition's trainloader and the common held-out testloader (`partition_cache`:
    see :func:`fedquant.fl.tasks._common.partition_loaders`)."""
    return _common.partition_loaders(fl_task.load_task("linreg", int(data_seed)), partition_id,
                                     num_partitions, partitioning, float(alpha),
                                     int(data_seed), int(batch_size), partition_cache)


def load_centralized_dataset(data_seed: int = 0) -> DataLoader:
    """The held-out 20% of the rows."""
    return _common.test_loader(fl_task.load_task("linreg", int(data_seed)))
