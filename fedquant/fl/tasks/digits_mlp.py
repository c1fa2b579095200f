"""Built-in task ``digits-mlp``: an MLP (64 -> ``hidden`` -> 10) on scikit-learn's bundled
8x8 digits (1797 images, offline), 80/20 train/test split by ``data_seed``, partitioned IID
or Dirichlet(``alpha``) among the clients with flwr-datasets.

``fedquant lplr``, ``fedquant ptq`` and the ``digits-grad`` DME input load their digits
through :func:`digits` too, so every experiment sees one split.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from fedquant.fl import task as fl_task
from fedquant.fl.tasks import _common
from fedquant.fl.tasks._common import test, train

__all__ = ["Net", "digits", "load_centralized_dataset", "load_data", "test", "train"]


def digits(data_seed: int = 0) -> fl_task.Task:
    """The digits split: train_x/train_y (the pool the clients share), test_x/test_y."""
    return fl_task.load_task("digits", int(data_seed))


class Net(nn.Sequential):
    """64 -> hidden -> 10 with a ReLU (the layers of ``fl_task.make_model(.., "mlp")``)."""

    def __init__(self, hidden: int = 128) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        super().__init__(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def load_data(partition_id: int, num_partitions: int, partitioning: str = "dirichlet",
              alpha: float = 0.5, data_seed: int = 0, batch_size: int = 32,
              partition_cache: Any = None) -> tuple[DataLoader, DataLoader]:
    """The partition's trainloader and the common held-out testloader (`partition_cache`:
    see :func:`fedquant.fl.tasks._common.partition_loaders`)."""
    return _common.partition_loaders(digits(data_seed), partition_id, num_partitions,
                                     partitioning, float(alpha), int(data_seed),
                                     int(batch_size), partition_cache)


def load_centralized_dataset(data_seed: int = 0) -> DataLoader:
    """The held-out 20% of the digits."""
    return _common.test_loader(digits(data_seed))
