"""What the built-in task modules share: DataLoaders over a :class:`fedquant.fl.task.Task`,
and ``train``/``test`` that run :func:`fedquant.fl.task.train_tensors` and
:func:`~fedquant.fl.task.evaluate_tensors` on a loader's tensors, so that the in-process
runner and the Flower apps give the same numbers for the same seeds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedquant.fl import task as fl_task

TEST_BATCH = 1024


def tensors_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                   seed: int = 0) -> DataLoader:
    """A DataLoader over (x, y); shuffled loaders draw their order from `seed`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed % 2**63) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)


def partition_loaders(task: fl_task.Task, partition_id: int, num_partitions: int,
                      partitioning: str, alpha: float, data_seed: int, batch_size: int,
                      partition_cache: Any = None) -> tuple[DataLoader, DataLoader]:
    """(the partition's trainloader, the task's common held-out testloader).

    `partition_cache` (optional; ``get(key)`` and ``cache[key] = rows``) keeps the
    partition's row indices, e.g. in a Flower ``Context.state``, so that later rounds in
    fresh ClientApp processes skip flwr-datasets.
    """
    key = f"{task.name}|{partitioning}|{num_partitions}|{alpha}|{partition_id}|{data_seed}"
    rows = partition_cache.get(key) if partition_cache is not None else None
    if rows is None:
        rows = fl_task.partition_rows(task, partitioning, num_partitions, alpha, partition_id,
                                      data_seed)
        if partition_cache is not None:
            partition_cache[key] = rows
    x, y = fl_task.rows_data(task, rows)
    return (tensors_loader(x, y, batch_size, True, partition_id),
            test_loader(task))


def test_loader(task: fl_task.Task) -> DataLoader:
    """The task's held-out split as one DataLoader."""
    return tensors_loader(task.test_x, task.test_y, TEST_BATCH, False)


def _tensors(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors
    xs, ys = zip(*((torch.as_tensor(b[0]), torch.as_tensor(b[1])) for b in loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def kind_of(y: torch.Tensor) -> str:
    """"classification" for integer labels, "regression" for real targets."""
    return "regression" if torch.is_floating_point(y) else "classification"


def train(net: nn.Module, trainloader: Any, epochs: int, device: str | torch.device,
          lr: float = 0.1, seed: int = 0) -> float:
    """Plain SGD (:func:`fedquant.fl.task.train_tensors`) with the loader's batch size, in
    an order drawn from the client's `seed`; cross-entropy for integer labels, MSE for real
    targets. Returns the average training loss."""
    x, y = _tensors(trainloader)
    net.to(device)
    cfg = fl_task.TrainConfig(int(epochs), int(trainloader.batch_size or len(x)), float(lr))
    return fl_task.train_tensors(kind_of(y), net, x, y, cfg, seed)


def test(net: nn.Module, testloader: Any, device: str | torch.device) -> tuple[float, float]:
    """(loss, accuracy) over the whole loader at once; R^2 as accuracy for regression."""
    x, y = _tensors(testloader)
    net.to(device)
    return fl_task.evaluate_tensors(kind_of(y), net, x, y)
