"""The data, models and training that the built-in federated tasks are made of.

Flower-free and gRPC-free; the built-in task modules of :mod:`fedquant.fl.tasks` (in the
shape of Flower's quickstart ``task.py``) are thin layers over these functions, which
``fedquant fl`` (in-process) and the Flower apps then call alike (the protocol itself,
seeds, compression and aggregation, is :mod:`fedquant.fl.protocol`):

* data: scikit-learn's bundled digits (real, offline), a synthetic linear regression, a
  local file or folder (CSV, parquet, ``save_to_disk`` folder, image folder:
  :mod:`fedquant.fl.datasets`), or a Hugging Face Hub dataset by name (``hf:ylecun/mnist``;
  needs the network), partitioned IID or Dirichlet(alpha) with flwr-datasets
  (:mod:`fedquant.fl.partition`: no client is ever given an empty partition);
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fedquant as fq
from fedquant.fl import datasets as local_datasets
from fedquant.fl.partition import PARTITIONINGS, partition_indices  # noqa: F401 (re-export)

DATASETS = ("digits", "linreg")  # plus "hf:<name>" (the Hub) or a local file or folder
MODELS = ("logreg", "mlp", "cnn", "linear")


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


def _local(spec: str, seed: int, features: tuple[str, ...] | None, label: str) -> Task:
    data = local_datasets.load_local(spec, features, label)
    return _split(spec, data.kind, data.x, data.y, seed, data.num_classes, data.image_shape)


def _huggingface(name: str, seed: int) -> Task:
    """A Hugging Face Hub image-classification dataset (an image and a label column)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # network errors come in many types (requests, OSError, ...)
        raise RuntimeError(f"could not load the Hugging Face Hub dataset {name!r} ({err}); "
                           "loading from the Hub needs network access; a local dataset (a "
                           ".csv or .parquet file, a save_to_disk folder or an image folder) "
                           "is read offline: give its path as the dataset") from err
    image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(f"Hugging Face dataset {name!r} has columns {ds.column_names}; "
                         "expected an 'image' (or 'img') and a 'label' column")
    images = [np.asarray(im) for im in ds[image_col]]
    data = local_datasets._images(Path(name), images, np.asarray(ds[label_col]))
    return _split(name, data.kind, data.x, data.y, seed, data.num_classes, data.image_shape)


@functools.lru_cache(maxsize=4)
def load_task(dataset: str, seed: int = 0, features: tuple[str, ...] | None = None,
              label: str = "label") -> Task:
    """The dataset `dataset` split with `seed` into a training pool and a test split.

    `dataset` is "digits", "linreg", a local path (a .csv or .parquet file, a folder saved
    with ``save_to_disk``, an image folder; `features` and `label` name the columns of a
    table) or "hf:<name>" (the Hugging Face Hub; "hf:<local path>" reads the path).
    """
    if not isinstance(dataset, str):
        raise ValueError(f"dataset must be a string, got {dataset!r}")
    features = tuple(features) if features is not None else None
    if dataset == "digits":
        return _digits(seed)
    if dataset == "linreg":
        return _linreg(seed)
    name = dataset[3:] if dataset.startswith("hf:") else dataset
    if name and local_datasets.is_local(name):
        return _local(name, seed, features, label)
    if dataset.startswith("hf:") and name:
        return _huggingface(name, seed)
    raise ValueError(f"dataset must be one of {DATASETS}, a local file or folder (.csv, "
                     f".parquet, save_to_disk folder, image folder) or 'hf:<name>', "
                     f"got {dataset!r}")


@functools.lru_cache(maxsize=16)
def _partitions(labels: bytes, dtype: str, partitioning: str, num_partitions: int,
                alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    """partition_indices, cached by the labels (as bytes) and the settings."""
    label = np.frombuffer(labels, dtype=dtype)
    return tuple(partition_indices(label, partitioning, num_partitions, alpha, seed))


def _partition_labels(task: Task) -> np.ndarray:
    label = task.train_y
    if task.kind == "regression":  # Dirichlet over ten quantile bins of the target
        label = np.searchsorted(np.quantile(label, np.linspace(0, 1, 11)[1:-1]), label)
    return np.ascontiguousarray(label)


def partition_rows(task: Task, partitioning: str, num_partitions: int, alpha: float,
                   partition_id: int, seed: int = 0) -> np.ndarray:
    """Indices into the training pool of partition `partition_id` (flwr-datasets; never
    empty: :func:`fedquant.fl.partition.partition_indices`)."""
    if isinstance(partition_id, bool) or not isinstance(partition_id, int | np.integer) or \
            not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be an int in 0..{num_partitions - 1}, "
                         f"got {partition_id!r}")
    label = _partition_labels(task)
    parts = _partitions(label.tobytes(), label.dtype.str, partitioning, num_partitions,
                        float(alpha), seed)
    return parts[partition_id]


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

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c = image_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x.reshape(-1, *self.image_shape))
        return self.head(z.flatten(1))


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """`build()` with torch's generator seeded by `seed`, leaving the caller's RNG state as
    it was (local initialization only, never part of the wire contract)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_model(task: Task, model: str, hidden: int = 128, seed: int = 0,
               width: int = 16) -> nn.Module:
    """A freshly initialized model for `task` (initialization seeded by `seed`); `hidden`
    is the MLP's width, `width` the CNN's first channel count (the second is twice it)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if task.kind == "regression" and model != "linear":
        raise ValueError(f"the regression task needs model = 'linear', got {model!r}")
    if task.kind == "classification" and model == "linear":
        raise ValueError("model = 'linear' is for the regression task; use logreg, mlp or cnn")
    if model == "cnn" and task.image_shape is None:
        raise ValueError(f"model = 'cnn' needs an image dataset; {task.name} is not one")
    for key, value in (("hidden", hidden), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    d, k = task.num_features, task.num_classes
    if model == "mlp":
        return seeded(lambda: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(),
                                            nn.Linear(hidden, k)), seed)
    if model == "cnn":
        return seeded(lambda: _SmallCNN(task.image_shape, k, width), seed)
    return seeded(lambda: nn.Linear(d, k), seed)  # logreg and linear regression


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


def loss_fn(kind: str):
    """Cross-entropy for "classification", mean squared error for "regression"."""
    if kind == "classification":
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
    return train_tensors(task.kind, model, x, y, cfg, seed)


def train_tensors(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  cfg: TrainConfig, seed: int) -> float:
    """:func:`train_local` for a task of `kind` ("classification" or "regression"); the
    batches are drawn in an order seeded by `seed` on the model's device."""
    loss = loss_fn(kind)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    order_gen = torch.Generator().manual_seed(seed % 2**63)  # local shuffling only
    total, steps = 0.0, 0
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=order_gen).to(x.device)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            opt.zero_grad()
            value = loss(model(x[idx]), y[idx])
            value.backward()
            opt.step()
            total, steps = total + float(value.detach()), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module) -> tuple[float, float]:
    """(loss, accuracy) on the held-out split; accuracy is R^2 for regression."""
    return evaluate_tensors(task.kind, model, task.test_x, task.test_y)


@torch.no_grad()
def evaluate_tensors(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     ) -> tuple[float, float]:
    """(loss, accuracy) of `model` on (x, y), on the model's device; R^2 for regression."""
    model.eval()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    out = model(x)
    loss = float(loss_fn(kind)(out, y))
    if kind == "classification":
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


def ptq_applies(model: nn.Module) -> bool:
    """Whether final-model PTQ applies: `model` is nn.Linear layers (with ReLUs)."""
    try:
        _linear_stack(model)
    except ValueError:
        return False
    return True


def _linear_stack(model: nn.Module) -> nn.Sequential:
    """The model as the nn.Sequential of Linear layers that fedquant.ptq quantizes."""
    if isinstance(model, nn.Linear):
        return nn.Sequential(model)
    if isinstance(model, nn.Sequential) and all(
            isinstance(m, nn.Linear | nn.ReLU) for m in model):
        return model
    raise ValueError("final PTQ applies to models of nn.Linear layers (logreg, mlp, linear); "
                     f"got {type(model).__name__}")


def calibration_rows(num_rows: int, calib_size: int, seed: int) -> np.ndarray:
    """`calib_size` (at most `num_rows`) row indices for the PTQ calibration batch, chosen by
    ``fq.random.random_subset`` from `seed`."""
    return fq.random.random_subset(seed, fq.random.Purpose.PRIVATE, num_rows,
                                   min(calib_size, num_rows)).numpy()


def quantize_net(model: nn.Module, calib_x: torch.Tensor, bits: int, method: str,
                 evaluate_fn: Callable[[nn.Module], tuple[float, float]], seed: int = 0,
                 ) -> dict:
    """Quantize `model` (nn.Linear layers) with fedquant.ptq on the calibration batch
    `calib_x`; `evaluate_fn(model) -> (loss, accuracy)` measures it before and after.

    Returns the accuracy and loss before and after, the drop (before - after), the
    calibration size and the sizes: fp32 (4 bytes per parameter) and the quantized model's
    packed bytes as ``fedquant.ptq.quantize_model`` counts them.
    """
    from fedquant.ptq import quantize_model  # scipy: only where PTQ is asked for

    check_ptq(bits, method, max(len(calib_x), 1))
    stack = _linear_stack(model)
    device = next(stack.parameters()).device
    loss, accuracy = evaluate_fn(stack)
    q_model, q_bytes = quantize_model(stack, calib_x.to(device), bits, method, seed=seed)
    q_loss, q_accuracy = evaluate_fn(q_model)
    return {"final_ptq": method, "bits": bits, "calib_size": len(calib_x),
            "accuracy_before": accuracy, "accuracy_after": q_accuracy,
            "accuracy_drop": accuracy - q_accuracy, "loss_before": loss, "loss_after": q_loss,
            "fp32_bytes": 4 * sum(p.numel() for p in model.parameters()),
            "ptq_bytes": q_bytes}


def quantize_final(task: Task, model: nn.Module, flat: torch.Tensor, bits: int,
                   method: str = "spfq", calib_size: int = 256, seed: int = 0) -> dict:
    """Quantize the final global model (parameters `flat`) with fedquant.ptq (SPFQ, Zhang
    and Saab, https://arxiv.org/abs/2309.10975; or GPFQ, MSQ): :func:`quantize_net` on
    `calib_size` rows of the training pool (never the test split that accuracy is measured
    on, :func:`calibration_rows`), evaluated on the task's test split; `model` (of the
    task's architecture) is loaded with `flat`.
    """
    check_ptq(bits, method, calib_size)
    set_flat(model, flat)
    calib_x, _ = rows_data(task, calibration_rows(len(task.train_x), calib_size, seed))
    return quantize_net(model, calib_x, bits, method, lambda m: evaluate(task, m), seed)
