"""digitsapp: a small CNN with BatchNorm on scikit-learn's 8x8 digits, in the shape of
Flower's quickstart-pytorch ``task.py`` (``Net``, ``load_data``, ``train``, ``test``)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a two-layer head (about 38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(y, dtype=torch.int64)


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32):
    """This client's IID share of 80% of digits, and the common 20% test split."""
    x, y = _digits()
    order = np.random.default_rng(0).permutation(len(x))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    mine = np.array_split(train, num_partitions)[partition_id]
    trainloader = DataLoader(TensorDataset(x[mine], y[mine]), batch_size=batch_size,
                             shuffle=True, generator=torch.Generator().manual_seed(partition_id))
    testloader = DataLoader(TensorDataset(x[test], y[test]), batch_size=256)
    return trainloader, testloader


def train(net: nn.Module, trainloader: DataLoader, epochs: int, device: str,
          lr: float = 0.05) -> float:
    """SGD with momentum; returns the average training loss."""
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in trainloader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def test(net: nn.Module, testloader: DataLoader, device: str) -> tuple[float, float]:
    """(average loss, accuracy) on `testloader`."""
    net.to(device).eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in testloader:
        out = net(x.to(device))
        loss += nn.functional.cross_entropy(out, y.to(device), reduction="sum").item()
        correct += int((out.argmax(1) == y.to(device)).sum())
        n += len(y)
    return loss / n, correct / n
