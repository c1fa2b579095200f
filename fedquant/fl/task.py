"""The built-in federated-learning task shared by the Flower apps and the in-process runner.

Data, models, local training and evaluation, with no Flower runtime and no gRPC in it, so
that ``fedquant fl`` (in-process), the Flower ``ClientApp`` and the Flower ``ServerApp`` call
literally the same functions (the protocol itself, seeds, compression and aggregation, is
:mod:`fedquant.fl.protocol`):

* data: scikit-learn's bundled digits (real, offline), a synthetic linear regression, or a
  Hugging Face dataset by name (``hf:ylecun/mnist``; needs the network), partitioned IID or
  Dirichlet(alpha) with flwr-datasets partitioners over an in-memory ``datasets.Dataset``;
* models: logistic regression, a small MLP, a small CNN (images), linear regression;
* :func:`train_local` and :func:`evaluate`: local SGD and held-out loss/accuracy;
* :func:`quantize_final`: post-training quantization of the final global model.

Example::

    task = load_task("digits", seed=0)
    x, y = client_data(task, "dirichlet", 10, 0.5, partition_id=3)
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fedquant as fq

DATASETS = ("digits", "linreg")  # plus "hf:<name>" for a Hugging Face dataset
MODELS = ("logreg", "mlp", "cnn", "linear")
PARTITIONINGS = ("iid", "dirichlet")


# ---- data -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A dataset split into a training pool (to partition) and a held-out test split."""

    name: str
    kind: str  # "classification" or "regression"
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int  # 1 for regression
    image_shape: tuple[int, ...] | None = None  # (channels, height, width) for images

    @property
    def num_features(self) -> int:
        return int(np.prod(self.train_x.shape[1:]))


def _split(name: str, kind: str, x: np.ndarray, y: np.ndarray, seed: int, num_classes: int,
           image_shape: tuple[int, ...] | None = None, test_fraction: float = 0.2) -> Task:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    y_dtype = torch.int64 if kind == "classification" else torch.float32
    return Task(name, kind, x[train], y[train], torch.as_tensor(x[test], dtype=torch.float32),
                torch.as_tensor(y[test], dtype=y_dtype), num_classes, image_shape)


def _digits(seed: int) -> Task:
    """scikit-learn's bundled digits (1797 8x8 images), read from the file load_digits
    reads, without importing scikit-learn: every Flower ClientApp process loads it, and
    importing sklearn costs seconds there."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.exists():
        table = np.loadtxt(path, delimiter=",")
        data, target = table[:, :-1], table[:, -1]
    else:  # a future layout: fall back to the public API
        from sklearn.datasets import load_digits

        data, target = load_digits(return_X_y=True)
    x = (data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> [0, 1]
    return _split("digits", "classification", x, target.astype(np.int64), seed, 10,
                  image_shape=(1, 8, 8))


def _linreg(seed: int, n: int = 2000, d: int = 100, noise: float = 0.1) -> Task:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d) / math.sqrt(d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x @ w + noise * rng.standard_normal(n)).astype(np.float32)
    return _split("linreg", "regression", x, y, seed, 1)


def _huggingface(name: str, seed: int) -> Task:
    """A Hugging Face image-classification dataset with an image column and a label column."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # network errors come in many types (requests, OSError, ...)
        raise RuntimeError(f"could not load Hugging Face dataset {name!r} ({err}); it needs "
                           f"network access; offline, use dataset = 'digits' or 'linreg'") from err
    image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(f"Hugging Face dataset {name!r} has columns {ds.column_names}; "
                         "expected an 'image' (or 'img') and a 'label' column")
    ds = ds.with_format("numpy")
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in ds[image_col]])
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # to (N, C, H, W)
    y = np.asarray(ds[label_col], dtype=np.int64)
    return _split(name, "classification", x.reshape(len(x), -1), y, seed, int(y.max()) + 1,
                  image_shape=tuple(x.shape[1:]))


@functools.lru_cache(maxsize=4)
def load_task(dataset: str, seed: int = 0) -> Task:
    """The dataset `dataset` ("digits", "linreg" or "hf:<name>") split with `seed`."""
    if dataset == "digits":
        return _digits(seed)
    if dataset == "linreg":
        return _linreg(seed)
    if dataset.startswith("hf:") and len(dataset) > 3:
        return _huggingface(dataset[3:], seed)
    raise ValueError(f"dataset must be one of {DATASETS} or 'hf:<name>', got {dataset!r}")


@functools.lru_cache(maxsize=64)
def _partitioner(dataset: str, seed: int, partitioning: str, num_partitions: int,
                 alpha: float):
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    task = load_task(dataset, seed)
    if partitioning not in PARTITIONINGS:
        raise ValueError(f"partitioning must be one of {PARTITIONINGS}, got {partitioning!r}")
    if not isinstance(num_partitions, int) or not 1 <= num_partitions <= len(task.train_x):
        raise ValueError(f"num_partitions must be an int in 1..{len(task.train_x)}, "
                         f"got {num_partitions!r}")
    label = task.train_y
    if task.kind == "regression":  # Dirichlet over ten quantile bins of the target
        label = np.searchsorted(np.quantile(label, np.linspace(0, 1, 11)[1:-1]), label)
    table = Dataset.from_dict({"row": np.arange(len(label)), "label": label})
    if partitioning == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 for Dirichlet partitioning, got {alpha!r}")
        min_size = min(10, len(label) // (2 * num_partitions))
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=float(alpha), min_partition_size=min_size,
                                    self_balancing=True, seed=seed)
    part.dataset = table
    return part


def partition_rows(task: Task, partitioning: str, num_partitions: int, alpha: float,
                   partition_id: int, seed: int = 0) -> np.ndarray:
    """Indices into the training pool of partition `partition_id` (flwr-datasets)."""
    if not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be an int in 0..{num_partitions - 1}, "
                         f"got {partition_id!r}")
    part = _partitioner(task.name if task.name in DATASETS else f"hf:{task.name}", seed,
                        partitioning, num_partitions, alpha)
    return np.asarray(part.load_partition(partition_id)["row"], dtype=np.int64)


def rows_data(task: Task, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples `rows` as (x, y) tensors."""
    y_dtype = torch.int64 if task.kind == "classification" else torch.float32
    return (torch.as_tensor(task.train_x[rows], dtype=torch.float32),
            torch.as_tensor(task.train_y[rows], dtype=y_dtype))


def client_data(task: Task, partitioning: str, num_partitions: int, alpha: float,
                partition_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples of partition `partition_id` as (x, y) tensors."""
    return rows_data(task, partition_rows(task, partitioning, num_partitions, alpha,
                                          partition_id, seed))


# ---- models ---------------------------------------------------------------------------
class _SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear head; works from 8x8 digits to 32x32 CIFAR."""

    def __init__(self, image_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c = image_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x.reshape(-1, *self.image_shape))
        return self.head(z.flatten(1))


def make_model(task: Task, model: str, hidden: int = 128, seed: int = 0) -> nn.Module:
    """A freshly initialized model for `task` (initialization seeded by `seed`)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if task.kind == "regression" and model != "linear":
        raise ValueError(f"the regression task needs model = 'linear', got {model!r}")
    if task.kind == "classification" and model == "linear":
        raise ValueError("model = 'linear' is for the regression task; use logreg, mlp or cnn")
    if model == "cnn" and task.image_shape is None:
        raise ValueError(f"model = 'cnn' needs an image dataset; {task.name} is not one")
    torch.manual_seed(seed)  # local initialization only, never part of the wire contract
    d, k = task.num_features, task.num_classes
    if model == "mlp":
        return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))
    if model == "cnn":
        return _SmallCNN(task.image_shape, k)
    return nn.Linear(d, k)  # logreg (softmax regression) and linear regression


def get_flat(model: nn.Module) -> torch.Tensor:
    """All parameters as one flat float32 vector (a copy)."""
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy `flat` into the model's parameters (never aliasing it: training must not
    write into the caller's global model)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset: offset + p.numel()].reshape(p.shape))
            offset += p.numel()


def _loss_fn(task: Task):
    if task.kind == "classification":
        return nn.functional.cross_entropy
    return lambda out, y: nn.functional.mse_loss(out.squeeze(-1), y)


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters (the run config's local-epochs, batch-size, lr)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1


def train_local(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                cfg: TrainConfig, seed: int) -> float:
    """Plain SGD for cfg.epochs epochs over (x, y); returns the mean training loss."""
    loss_fn = _loss_fn(task)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    order_gen = torch.Generator().manual_seed(seed % 2**63)  # local shuffling only
    total, steps = 0.0, 0
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=order_gen).to(x.device)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module) -> tuple[float, float]:
    """(loss, accuracy) on the held-out split; accuracy is R^2 for regression."""
    model.eval()
    x, y = task.test_x, task.test_y
    out = model(x)
    loss = float(_loss_fn(task)(out, y))
    if task.kind == "classification":
        return loss, float((out.argmax(-1) == y).float().mean())
    return loss, 1.0 - loss / float(y.var(unbiased=False))


# ---- post-training quantization of the final model --------------------------------------
PTQ_METHODS = ("spfq", "gpfq", "msq")  # fedquant.ptq.METHODS, without importing scipy here


def check_ptq(bits: int, method: str, calib_size: int, model: str | None = None,
              sep: str = "-") -> None:
    """ValueError naming the bad final-PTQ setting (bits 0 = off, else 2..8); the keys are
    spelled final-ptq-* (run config) or, with sep="_", final_ptq_* (TOML config)."""
    def key(name: str) -> str:
        return f"'final{sep}ptq{sep}{name}'"

    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == 0 or 2 <= bits <= 8):
        raise ValueError(f"{key('bits')} must be 0 (off) or an integer in 2..8, got {bits!r}")
    if method not in PTQ_METHODS:
        raise ValueError(f"{key('method')} must be one of {PTQ_METHODS}, got {method!r}")
    if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
        raise ValueError(f"{key('calib')} must be a positive integer, got {calib_size!r}")
    if bits and model == "cnn":
        raise ValueError(f"{key('bits')} > 0 needs a model of nn.Linear layers (logreg, mlp, "
                         "linear); post-training quantization does not apply to model = 'cnn'")


def _linear_stack(model: nn.Module) -> nn.Sequential:
    """The model as the nn.Sequential of Linear layers that fedquant.ptq quantizes."""
    if isinstance(model, nn.Linear):
        return nn.Sequential(model)
    if isinstance(model, nn.Sequential) and all(
            isinstance(m, nn.Linear | nn.ReLU) for m in model):
        return model
    raise ValueError("final PTQ applies to models of nn.Linear layers (logreg, mlp, linear); "
                     f"got {type(model).__name__}")


def quantize_final(task: Task, model: nn.Module, flat: torch.Tensor, bits: int,
                   method: str = "spfq", calib_size: int = 256, seed: int = 0) -> dict:
    """Quantize the final global model (parameters `flat`) with fedquant.ptq (seed 004).

    The calibration batch is `calib_size` rows of the training pool (never the test split
    that accuracy is measured on), chosen by ``fq.random.random_subset``; `model` (of the
    task's architecture) is loaded with `flat` to evaluate it. Returns the
    accuracy and loss on the test split before and after, the drop (before - after, as a
    fraction; R^2 for regression), and the sizes: fp32 (4 bytes per parameter) and the
    quantized model's packed bytes as ``fedquant.ptq.quantize_model`` counts them.
    """
    from fedquant.ptq import quantize_model  # scipy: only where PTQ is asked for

    check_ptq(bits, method, calib_size)
    set_flat(model, flat)
    stack = _linear_stack(model)
    rows = fq.random.random_subset(seed, fq.random.Purpose.PRIVATE, len(task.train_x),
                                   min(calib_size, len(task.train_x)))
    calib_x, _ = rows_data(task, rows.numpy())
    loss, accuracy = evaluate(task, stack)
    q_model, q_bytes = quantize_model(stack, calib_x.to(flat.device), bits, method, seed=seed)
    q_loss, q_accuracy = evaluate(task, q_model)
    return {"final_ptq": method, "bits": bits, "calib_size": len(rows),
            "accuracy_before": accuracy, "accuracy_after": q_accuracy,
            "accuracy_drop": accuracy - q_accuracy, "loss_before": loss, "loss_after": q_loss,
            "fp32_bytes": 4 * flat.numel(), "ptq_bytes": q_bytes}
