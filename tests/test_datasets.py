"""Local datasets read offline: CSV, parquet, a save_to_disk folder, an image folder; the
files are made here. Errors name the file and what was expected."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.fl import task as fl_task
from fedquant.fl.datasets import is_local, load_local

N = 60


def _table(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, N)
    return {"a": rng.standard_normal(N) + y, "b": rng.integers(0, 5, N), "note": ["x"] * N,
            "species": np.array(["setosa", "versicolor", "virginica"])[y], "y": y}


def _write_csv(path, table) -> None:
    cols = list(table)
    lines = [",".join(cols)] + [",".join(str(table[c][i]) for c in cols) for i in range(N)]
    path.write_text("\n".join(lines) + "\n")


def _expected(table, features, label):
    x = np.stack([np.asarray(table[c], dtype=np.float32) for c in features], axis=1)
    return x, np.asarray(table[label])


def test_csv_with_named_feature_and_label_columns(tmp_path):
    table, path = _table(), tmp_path / "clients.csv"
    _write_csv(path, table)
    data = load_local(path, features=("a", "b"), label="y")
    x, y = _expected(table, ("a", "b"), "y")
    np.testing.assert_allclose(data.x, x, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)
    assert (data.kind, data.num_classes, data.image_shape) == ("classification", 3, None)
    # string labels are numbered in sorted order: the same classes as y here
    named = load_local(path, features=("a", "b"), label="species")
    np.testing.assert_array_equal(named.y, y)


def test_parquet_and_default_features_are_every_other_numeric_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _table(1)
    del table["note"], table["species"]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table(table), path)
    data = load_local(path, label="y")
    x, y = _expected(table, ("a", "b"), "y")
    np.testing.assert_allclose(data.x, x, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)


def test_float_labels_make_a_regression(tmp_path):
    path = tmp_path / "reg.csv"
    table = {"u": np.arange(N) / 7.0, "target": np.arange(N) * 0.5 + 0.25}
    _write_csv(path, table)
    data = load_local(path, label="target")
    assert (data.kind, data.num_classes) == ("regression", 1)
    np.testing.assert_allclose(data.y, table["target"], rtol=1e-6)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    table = _table(2)
    del table["note"], table["species"]
    ds = datasets.Dataset.from_dict({k: list(v) for k, v in table.items()})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    x, y = _expected(table, ("a", "b"), "y")
    for folder in ("saved", "saved_dict"):
        data = load_local(tmp_path / folder, features=["a", "b"], label="y")
        np.testing.assert_allclose(data.x, x, rtol=1e-6)
        np.testing.assert_array_equal(data.y, y)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match="expected a 'train' split"):
        load_local(tmp_path / "no_train", label="y")


def _write_images(root, shape=(6, 5), mode="L"):
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = {}
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, shape if mode == "L" else (*shape, 3), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"{i}.png")
            pixels[(k, i)] = arr
    return pixels


def test_image_folder_gives_classes_by_subfolder_and_channels_first(tmp_path):
    pixels = _write_images(tmp_path / "gray")
    data = load_local(tmp_path / "gray")
    assert data.image_shape == (1, 6, 5) and data.x.shape == (6, 30)
    np.testing.assert_array_equal(data.y, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(data.x[4], pixels[(1, 1)].reshape(-1) / 255.0, rtol=1e-6)
    rgb = _write_images(tmp_path / "rgb", mode="RGB")
    data = load_local(tmp_path / "rgb")
    assert data.image_shape == (3, 6, 5)
    np.testing.assert_allclose(data.x[0].reshape(3, 6, 5),
                               rgb[(0, 0)].transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_saved_image_dataset_reads_images(tmp_path):
    import datasets
    from PIL import Image

    imgs = [Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0, 1]},
                                    features=datasets.Features({
                                        "image": datasets.Image(),
                                        "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "imgs"))
    data = load_local(tmp_path / "imgs")
    assert data.image_shape == (1, 4, 4)
    np.testing.assert_allclose(data.x[:, 0], [40 * i / 255.0 for i in range(4)], rtol=1e-6)


@pytest.mark.parametrize("make,kwargs,message", [
    (lambda p: None, {}, "does not exist"),
    (lambda p: p.write_text("a,b\n1,2\n"), {"label": "y"}, "expected a label column 'y'"),
    (lambda p: p.write_text("a,y\n1,2\n"), {"features": ["a", "zz"], "label": "y"},
     r"missing \['zz'\]"),
    (lambda p: p.write_text("a,y\nhi,2\n"), {"label": "y"}, "not numeric"),
    (lambda p: p.write_text("a,y\n1,2\n,3\n"), {"label": "y"}, "NaN"),
])
def test_table_errors_name_the_file_and_what_was_expected(tmp_path, make, kwargs, message):
    path = tmp_path / "t.csv"
    make(path)
    with pytest.raises(ValueError, match=message) as err:
        load_local(path, **kwargs)
    assert str(path) in str(err.value) and "network" not in str(err.value)


def test_unknown_file_and_empty_folder_errors(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a .csv or .parquet"):
        load_local(tmp_path / "x.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a dataset saved with save_to_disk"):
        load_local(tmp_path / "empty")


def test_load_task_reads_local_files_offline_and_hf_prefix_too(tmp_path):
    table, path = _table(4), tmp_path / "d.csv"
    _write_csv(path, table)
    task = fl_task.load_task(str(path), 0, ("a", "b"), "y")
    assert len(task.train_x) + len(task.test_x) == N and task.num_classes == 3
    assert fl_task.load_task(f"hf:{path}", 0, ("a", "b"), "y").num_features == 2
    assert is_local(str(path)) and not is_local("ylecun/mnist")
    with pytest.raises(ValueError, match="does not exist") as err:
        fl_task.load_task(str(tmp_path / "missing.csv"))
    assert "network" not in str(err.value)
