"""A small MLP on scikit-learn's bundled digits (8 x 8 images, 10 classes), trained quickly.

The digits and their train/test split are those of the built-in FL task ``digits-mlp``
(:func:`fedquant.fl.tasks.digits_mlp.digits`): ``fedquant fl``, ``fedquant lplr``,
``fedquant ptq`` and the ``digits-grad`` DME input all see the same split.

Shared by ``fedquant lplr`` and ``fedquant ptq``, with the few lines of experiment plumbing
they also share (config checking, CSV/JSON output, the summary table). Everything is
deterministic given `seed`: the train/test split, the initialization and the training.
``train_fedavg`` runs a short in-process FedAvg (no Flower) whose client updates travel
through any fedquant codec, so uplink bytes are the real ``len(enc.to_bytes())``.

Example::

    data = load_digits_data(seed=0)
    model = train_mlp(data, hidden=(64,), seed=0)
    print(accuracy(model, data.x_test, data.y_test))
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import fedquant as fq
from fedquant.fl.tasks import digits_mlp as digits_task
from fedquant.simulations.common import check_keys, one_thread


@dataclass(frozen=True)
class DigitsData:
    """Pixels scaled to [0, 1] (float32) and labels (int64), split into train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(seed: int = 0) -> DigitsData:
    """The 1797 digits split by `seed` as the ``digits-mlp`` FL task splits them (80% train,
    20% test); pixels divided by 16."""
    task = digits_task.digits(seed)
    return DigitsData(torch.as_tensor(task.train_x), torch.as_tensor(task.train_y),
                      task.test_x, task.test_y)


def make_mlp(hidden: Sequence[int] = (64,), seed: int = 0) -> nn.Sequential:
    """64 -> hidden... -> 10 with ReLU between layers, initialized from `seed`."""
    torch.manual_seed(seed)
    sizes = [64, *hidden, 10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def train_mlp(data: DigitsData, hidden: Sequence[int] = (64,), steps: int = 100,
              lr: float = 0.02, seed: int = 0) -> nn.Sequential:
    """Full-batch Adam on the training split (under a second on a CPU; ~97% test accuracy)."""
    model = make_mlp(hidden, seed)
    with one_thread():
        _fit(model, data.x_train, data.y_train, steps, lr)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on (x, y)."""
    return float((model(x).argmax(dim=1) == y).float().mean())


#: encode one client's update: (named tensors, seed) -> named encodings
UpdateEncoder = Callable[[dict[str, torch.Tensor], int], dict[str, fq.Encoded]]


@dataclass(frozen=True)
class RoundResult:
    round: int
    accuracy: float
    uplink_bytes: int  # cumulative, all clients, len(to_bytes()) of every encoding


def train_fedavg(data: DigitsData, encoder: UpdateEncoder, rounds: int = 20,
                 clients: int = 10, local_steps: int = 10, lr: float = 0.01,
                 hidden: Sequence[int] = (64,), seed: int = 0) -> tuple[nn.Sequential,
                                                                        list[RoundResult]]:
    """FedAvg on an IID split of the training set; each client update goes through `encoder`.

    Each round every client starts from the global model, takes `local_steps` full-batch Adam
    steps on its shard, and sends update = local - global encoded; the server decodes every
    update (``fq.decode``), averages them weighted by shard size and adds the mean.
    """
    model = make_mlp(hidden, seed)
    shards = torch.arange(len(data.y_train)).chunk(clients)
    history, sent = [], 0
    with one_thread():
        for r in range(rounds):
            glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
            total = {k: torch.zeros_like(v) for k, v in glob.items()}
            for c, idx in enumerate(shards):
                model.load_state_dict(glob)
                _fit(model, data.x_train[idx], data.y_train[idx], local_steps, lr)
                update = {k: v.detach() - glob[k] for k, v in model.state_dict().items()}
                encs = encoder(update, fq.random.derive_seed(seed + r, c))
                sent += sum(len(e.to_bytes()) for e in encs.values())
                for k, e in encs.items():
                    total[k] += fq.decode(e) * (len(idx) / len(data.y_train))
            model.load_state_dict({k: glob[k] + total[k] for k in glob})
            acc = accuracy(model.eval(), data.x_test, data.y_test)
            history.append(RoundResult(r + 1, acc, sent))
    return model.eval(), history


# ---- experiment plumbing shared by `fedquant lplr` and `fedquant ptq` ------------------
def load_config(path: Path, schema: dict, quick: bool) -> dict[str, Any]:
    """Read a TOML config, check it against `schema` and apply its [quick] overrides."""
    raw = tomllib.loads(Path(path).read_text())
    overrides = raw.pop("quick", {})
    check_keys(raw, schema)
    check_keys(overrides, schema, "quick.")
    if quick:
        for key, value in overrides.items():
            if isinstance(value, dict):
                raw[key] = {**raw.get(key, {}), **value}
            else:
                raw[key] = value
    return raw


def print_table(title: str, rows: list[dict], columns: Sequence[str]) -> None:
    """A rich table of `columns` of `rows` (floats to 4 significant digits)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                        for c in columns))
    Console().print(table)
