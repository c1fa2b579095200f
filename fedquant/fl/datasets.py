"""Local datasets for federated tasks, read offline: no network, no Hugging Face cache.

:func:`load_local` reads one of

* a Hugging Face dataset saved with ``save_to_disk`` (a folder with ``dataset_info.json``,
  ``state.json`` or ``dataset_dict.json``; a ``DatasetDict`` gives its ``train`` split);
* a ``.parquet`` or ``.csv`` file;
* an image folder: one subfolder per class (``root/cat/001.png``), images of one size.

Tables (CSV, parquet, a saved dataset without an image column) give named numeric feature
columns (default: every column but the label) and a label column (default ``"label"``):
integer or string labels make a classification task (strings are numbered in sorted order),
other numbers a regression. Images are scaled to [0, 1] and kept as (channels, height, width).
Errors name the file and what was expected.

Example::

    data = load_local("clients.csv", features=("x1", "x2"), label="y")
    data.x.shape, data.kind, data.num_classes   # (N, 2), "classification", 3
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class LocalData:
    """Rows of features (float32, images flattened) and their labels."""

    x: np.ndarray
    y: np.ndarray
    kind: str  # "classification" or "regression"
    num_classes: int  # 1 for regression
    image_shape: tuple[int, ...] | None = None  # (channels, height, width)


def is_local(spec: str) -> bool:
    """Whether the dataset spec names a local file or folder (rather than a Hub name)."""
    path = Path(spec).expanduser()
    return path.exists() or path.suffix.lower() in (".csv", ".parquet") or spec.startswith(
        ("/", "./", "../", "~"))


def load_local(spec: str | Path, features: Sequence[str] | None = None,
               label: str = "label") -> LocalData:
    """The local dataset at `spec` (see the module docstring); ValueError names the file."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"dataset file {str(path)!r} does not exist; expected a .csv or "
                         ".parquet file, a folder saved with save_to_disk, or an image folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _from_columns(path, _read_csv(path), features, label)
        if suffix == ".parquet":
            return _from_columns(path, _read_parquet(path), features, label)
        raise ValueError(f"dataset file {str(path)!r}: expected a .csv or .parquet file, "
                         f"got {suffix or 'no suffix'}")
    if any((path / m).exists() for m in SAVED_MARKERS):
        return _saved(path, features, label)
    if any(p.is_dir() for p in path.iterdir()):
        return _image_folder(path)
    raise ValueError(f"dataset folder {str(path)!r} is neither a dataset saved with save_to_disk "
                     f"(no {' / '.join(SAVED_MARKERS)}) nor an image folder (no class "
                     "subfolders)")


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.csv

    try:
        table = pyarrow.csv.read_csv(path)
    except Exception as err:  # pyarrow.lib.ArrowInvalid and friends
        raise ValueError(f"dataset file {str(path)!r} is not a readable CSV table with a "
                         f"header row ({err})") from err
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as err:
        raise ValueError(f"dataset file {str(path)!r} is not a readable parquet file "
                         f"({err})") from err
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names}


def _saved(path: Path, features: Sequence[str] | None, label: str) -> LocalData:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ValueError(f"dataset folder {str(path)!r} could not be read with "
                         f"datasets.load_from_disk ({err})") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"dataset folder {str(path)!r} holds the splits {list(ds)}; "
                             "expected a 'train' split")
        ds = ds["train"]
    image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
    if image_col is not None and features is None:
        if label not in ds.column_names:
            raise ValueError(f"dataset folder {str(path)!r} has columns {ds.column_names}; "
                             f"expected a label column {label!r}")
        images = [np.asarray(im) for im in ds[image_col]]
        return _images(path, images, np.asarray(ds[label]))
    columns = {c: np.asarray(ds[c]) for c in ds.column_names}
    return _from_columns(path, columns, features, label)


def _labels(path: Path, y: np.ndarray) -> tuple[np.ndarray, str, int]:
    if y.dtype.kind in "OUS":  # strings: classes in sorted order
        classes, codes = np.unique(y.astype(str), return_inverse=True)
        return codes.astype(np.int64), "classification", len(classes)
    if y.dtype.kind in "iub":
        if y.min() < 0:
            raise ValueError(f"dataset {str(path)!r}: integer labels must be >= 0, "
                             f"got {int(y.min())}")
        return y.astype(np.int64), "classification", int(y.max()) + 1
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise ValueError(f"dataset {str(path)!r}: the label column has NaN or infinite "
                             "values")
        return y.astype(np.float32), "regression", 1
    raise ValueError(f"dataset {str(path)!r}: labels of type {y.dtype} are neither numbers "
                     "nor strings")


def _from_columns(path: Path, columns: dict[str, np.ndarray], features: Sequence[str] | None,
                  label: str) -> LocalData:
    names = list(columns)
    if label not in columns:
        raise ValueError(f"dataset {str(path)!r} has columns {names}; expected a label column "
                         f"{label!r} (set label = '<column>')")
    wanted = [c for c in names if c != label] if features is None else list(features)
    missing = [c for c in wanted if c not in columns]
    if missing or not wanted:
        raise ValueError(f"dataset {str(path)!r} has columns {names}; expected the feature "
                         f"columns {wanted}" + (f" (missing {missing})" if missing else ""))
    bad = [c for c in wanted if np.asarray(columns[c]).dtype.kind not in "iubf"]
    if bad:
        raise ValueError(f"dataset {str(path)!r}: feature columns {bad} are not numeric; "
                         "expected numbers (choose numeric columns with features = [...])")
    x = np.stack([np.asarray(columns[c], dtype=np.float32) for c in wanted], axis=1)
    if not np.isfinite(x).all():
        raise ValueError(f"dataset {str(path)!r}: the feature columns have NaN or infinite "
                         "values (empty cells?)")
    y, kind, num_classes = _labels(path, np.asarray(columns[label]))
    if len(x) == 0:
        raise ValueError(f"dataset {str(path)!r} has no rows")
    return LocalData(x, y, kind, num_classes)


def _images(path: Path, images: list[np.ndarray], y: np.ndarray) -> LocalData:
    if not images:
        raise ValueError(f"dataset {str(path)!r} has no images")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"dataset {str(path)!r}: images of different sizes {sorted(shapes)}; "
                         "expected one size")
    x = np.stack(images).astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # to (N, C, H, W)
    y, kind, num_classes = _labels(path, y)
    if kind != "classification":
        raise ValueError(f"dataset {str(path)!r}: image labels must be classes")
    return LocalData(x.reshape(len(x), -1), y, kind, num_classes, tuple(x.shape[1:]))


def _image_folder(path: Path) -> LocalData:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    images, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    gray = im.mode in ("1", "L", "I", "I;16", "F")
                    images.append(np.asarray(im.convert("L" if gray else "RGB")))
                labels.append(k)
    if not images:
        raise ValueError(f"image folder {str(path)!r} has class subfolders {classes} but no "
                         f"images ({', '.join(IMAGE_SUFFIXES)}) in them")
    return _images(path, images, np.asarray(labels, dtype=np.int64))
