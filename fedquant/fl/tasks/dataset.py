"""Built-in task ``dataset``: the task named by the config's ``dataset`` and ``model`` keys.

``dataset``: "digits", "linreg", a local file or folder (a .csv or .parquet file with
``features`` / ``label`` columns, a ``save_to_disk`` folder, an image folder) or
"hf:<name>" (the Hugging Face Hub; needs the network). ``model``: logreg, mlp (``hidden``
units), cnn (images; ``width`` channels), linear (regression). Partitioned by
``partitioning`` (iid | dirichlet, ``alpha``) with flwr-datasets; ``data_seed`` seeds the
train/test split and the partition. This is what ``fedquant fl`` runs when no ``task`` is
set (the default digits MLP).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from fedquant.fl import task as fl_task
from fedquant.fl.tasks import _common
from fedquant.fl.tasks._common import test, train

__all__ = ["Net", "load_centralized_dataset", "load_data", "test", "train"]


def _columns(features: Any) -> tuple[str, ...] | None:
    """Feature column names from a TOML list or a comma-separated run-config string."""
    if features is None or features == "" or features == []:
        return None
    if isinstance(features, str):
        return tuple(c.strip() for c in features.split(",") if c.strip())
    if isinstance(features, list | tuple) and all(isinstance(c, str) for c in features):
        return tuple(features)
    raise ValueError(f"features must be a list of column names or a comma-separated string, "
                     f"got {features!r}")


def _task(dataset: str, data_seed: int, features: Any, label: str) -> fl_task.Task:
    return fl_task.load_task(dataset, int(data_seed), _columns(features), str(label))


def Net(dataset: str = "digits", model: str = "mlp", hidden: int = 128, width: int = 16,  # noqa: N802
        seed: int = 0, data_seed: int = 0, features: Any = None,
        label: str = "label") -> nn.Module:
    """The model `model` for the dataset (a function here: the architecture depends on
    the data; the built-in modules with one dataset define a class)."""
    return fl_task.make_model(_task(dataset, data_seed, features, label), model, int(hidden),
                              seed=seed, width=int(width))


def load_data(partition_id: int, num_partitions: int, dataset: str = "digits",
              partitioning: str = "dirichlet", alpha: float = 0.5, data_seed: int = 0,
              batch_size: int = 32, features: Any = None, label: str = "label",
              partition_cache: Any = None) -> tuple[DataLoader, DataLoader]:
    """The partition's trainloader and the common held-out testloader (`partition_cache`:
    see :func:`fedquant.fl.tasks._common.partition_loaders`)."""
    task = _task(dataset, data_seed, features, label)
    return _common.partition_loaders(task, partition_id, num_partitions, partitioning,
                                     float(alpha), int(data_seed), int(batch_size),
                                     partition_cache)


def load_centralized_dataset(dataset: str = "digits", data_seed: int = 0, features: Any = None,
                             label: str = "label") -> DataLoader:
    """The held-out test split (20% of the rows, chosen by `data_seed`)."""
    return _common.test_loader(_task(dataset, data_seed, features, label))
