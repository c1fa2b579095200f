"""Built-in task ``digits-cnn``: a small CNN (two 3x3 convolutions of ``width`` and
2 * ``width`` channels, a linear head) on scikit-learn's 8x8 digits; the data, split and
partitions of ``digits-mlp``."""

from __future__ import annotations

from fedquant.fl import task as fl_task
from fedquant.fl.tasks._common import test, train
from fedquant.fl.tasks.digits_mlp import load_centralized_dataset, load_data

__all__ = ["Net", "load_centralized_dataset", "load_data", "test", "train"]


class Net(fl_task._SmallCNN):
    """The CNN of ``fl_task.make_model(.., "cnn")`` for (1, 8, 8) images and 10 classes."""

    def __init__(self, width: int = 16) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        super().__init__((1, 8, 8), 10, width)
