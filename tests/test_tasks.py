"""Task modules in the shape of Flower's quickstart task.py: a user's module written outside
the repository (a small model and a CSV made here) trains with `fedquant fl --task` and with
the Flower apps; the built-in tasks; finding a task and calling it with config options."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from test_flower_apps import InProcessGrid, _server_identity  # noqa: F401
from typer.testing import CliRunner

from fedquant.fl import task as fl_task
from fedquant.fl.tasks import BUILTIN_TASKS, BoundTask, load_task_module
from fedquant.fl.tasks import synthetic as synthetic_task
from fedquant.server import flower_server
from fedquant.simulations import fl
from fedquant.simulations.cli import app

USER_TASK = '''
"""A user's task: a small MLP on points.csv, next to this file."""
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DATA = Path(__file__).with_name("points.csv")
SEEN = {}


class Net(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.body(x)


def load_data(partition_id, num_partitions):
    table = np.loadtxt(DATA, delimiter=",", skiprows=1)
    x = torch.tensor(table[:, :2], dtype=torch.float32)
    y = torch.tensor(table[:, 2], dtype=torch.int64)
    mine = np.array_split(np.arange(60, len(x)), num_partitions)[partition_id]
    return (DataLoader(TensorDataset(x[mine], y[mine]), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(x[:60], y[:60]), batch_size=64))


def train(net, trainloader, epochs, device, lr=0.01):
    SEEN["lr"] = lr
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in trainloader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
    return total / steps


@torch.no_grad()
def test(net, testloader, device):
    loss, correct, n = 0.0, 0, 0
    for x, y in testloader:
        out = net(x.to(device))
        loss += nn.functional.cross_entropy(out, y.to(device), reduction="sum").item()
        correct += int((out.argmax(1) == y.to(device)).sum())
        n += len(y)
    return loss / n, correct / n
'''


@pytest.fixture
def user_task(tmp_path):
    """points.csv (three Gaussian blobs, 360 rows) and task.py, in a folder of their own."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 360)
    centers = np.array([[0.0, 3.0], [3.0, -2.0], [-3.0, -2.0]])
    x = centers[y] + rng.standard_normal((360, 2))
    lines = ["x1,x2,label"] + [f"{a:.5f},{b:.5f},{c}" for (a, b), c in zip(x, y, strict=True)]
    (folder / "points.csv").write_text("\n".join(lines) + "\n")
    path = folder / "task.py"
    path.write_text(USER_TASK)
    return path


def _numel(hidden: int) -> int:
    return 2 * hidden + hidden + hidden * 3 + 3


def test_user_task_trains_two_rounds_with_fedquant_fl(tmp_path, user_task):
    config = tmp_path / "mine.toml"
    config.write_text(textwrap.dedent("""
        name = "mine"
        num_clients = 3
        rounds = 2
        local_epochs = 3
        lr = 0.2
        partitioning = "iid"
        task_args = { hidden = 12 }
        [[codecs]]
        name = "fp32"
        [[codecs]]
        label = "eden b=2"
        name = "eden"
        params = { bits = 2 }
    """))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["fl", "--config", str(config), "--task", str(user_task),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "rows.json").read_text())
    assert saved["config"]["task"] == str(user_task)
    module = load_task_module(str(user_task))
    assert module.SEEN["lr"] == 0.2  # train() named lr: the config's value
    for label in ("fp32", "eden b=2"):
        rows = [r for r in saved["rows"] if r["label"] == label]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[2]["accuracy"] > rows[0]["accuracy"] + 0.2
        assert all(r["clients"] == 3 for r in rows[1:])
    fp32 = [r for r in saved["rows"] if r["label"] == "fp32"][1]["uplink_bytes"]
    eden = [r for r in saved["rows"] if r["label"] == "eden b=2"][1]["uplink_bytes"]
    assert fp32 >= 3 * 4 * _numel(12) > eden  # hidden = 12 from task_args reached Net
    assert "task " + str(user_task) in (out / "report.md").read_text()


def test_user_task_trains_two_rounds_with_the_flower_apps(tmp_path, user_task):
    metrics = tmp_path / "metrics.jsonl"
    run_config = {"task": str(user_task), "hidden": 12, "lr": 0.2, "local-epochs": 3,
                  "num-server-rounds": 2, "codec": "eden:bits=2", "min-nodes": 2,
                  "metrics-path": str(metrics)}
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=run_config,
                           node_config={"partition-id": i, "num-partitions": 2})
                for i, n in enumerate((5, 9))}
    flower_server.app(InProcessGrid(contexts), Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert all(r["replied"] == 2 and r["failed"] == 0 for r in rows[1:])
    assert 0 < rows[1]["uplink_bytes"] < 2 * 4 * _numel(12)
    assert load_task_module(str(user_task)).SEEN["lr"] == 0.2


@pytest.mark.parametrize("spec,options,drop", [
    ("digits-mlp", {"lr": 0.2}, 0.7), ("digits-cnn", {"lr": 0.2}, 0.7),
    ("linreg", {"lr": 0.05}, 0.7), ("synthetic", {"lr": 0.01}, 0.7),
    ("dataset", {"model": "logreg", "lr": 0.2}, 0.7)])
def test_every_builtin_task_learns(spec, options, drop):
    task = BoundTask(spec, {"partitioning": "iid", **options})
    net = task.net(seed=0)
    trainloader, testloader = task.load_data(0, 1)
    before = task.test(net, testloader, "cpu")[0]
    for epoch in range(3):
        task.train(net, trainloader, 1, "cpu", seed=epoch)
    after = task.test(net, testloader, "cpu")[0]
    assert np.isfinite(after) and after < drop * before


def test_digits_mlp_task_is_the_default_digits_mlp():
    """The built-in module and the config's dataset/model path build and train the same."""
    a, b = BoundTask("digits-mlp", {"hidden": 32}), BoundTask("dataset", {"hidden": 32})
    nets = [t.net(seed=3) for t in (a, b)]
    torch.testing.assert_close(fl_task.get_flat(nets[0]), fl_task.get_flat(nets[1]))
    loaders = [t.load_data(1, 4)[0] for t in (a, b)]
    for t, net, loader in zip((a, b), nets, loaders, strict=True):
        t.train(net, loader, 1, "cpu", seed=11)
    torch.testing.assert_close(fl_task.get_flat(nets[0]), fl_task.get_flat(nets[1]))
    # and the model the old make_model gave, from the same seed
    ref = fl_task.make_model(fl_task.load_task("digits", 0), "mlp", 32, seed=3)
    torch.testing.assert_close(fl_task.get_flat(BoundTask("digits-mlp", {"hidden": 32})
                                                .net(seed=3)), fl_task.get_flat(ref))


def test_synthetic_clients_are_non_iid_and_independent_of_the_client_count():
    x0, y0 = synthetic_task.client_data(0)
    a = synthetic_task.load_data(7, 10)[0].dataset.tensors
    b = synthetic_task.load_data(7, 1000)[0].dataset.tensors
    torch.testing.assert_close(a[0], b[0])
    assert x0.shape[1] == 60 and 50 <= len(x0) <= 1000
    hist = np.stack([np.bincount(synthetic_task.client_data(k)[1], minlength=10) / len(
        synthetic_task.client_data(k)[1]) for k in range(20)])
    tv = [0.5 * np.abs(hist[i] - hist[j]).sum() for i in range(20) for j in range(i)]
    assert np.mean(tv) > 0.4  # label mixes differ a lot between clients
    iid = np.stack([np.bincount(np.random.default_rng(k).integers(0, 10, 200), minlength=10)
                    / 200 for k in range(20)])
    tv_iid = [0.5 * np.abs(iid[i] - iid[j]).sum() for i in range(20) for j in range(i)]
    assert np.mean(tv) > 2 * np.mean(tv_iid)
    central = synthetic_task.load_centralized_dataset(1000)
    assert len(central.dataset) == sum(
        len(synthetic_task.client_data(k)[0]) - int(0.9 * len(synthetic_task.client_data(k)[0]))
        for k in range(1000))
    with pytest.raises(ValueError, match="synthetic_alpha"):
        synthetic_task.client_data(0, alpha=-1.0)


def test_task_modules_are_found_by_name_dotted_path_and_file(tmp_path, user_task):
    for name, module in BUILTIN_TASKS.items():
        assert load_task_module(name).__name__ == module
    assert load_task_module("fedquant.fl.tasks.linreg").__name__ == BUILTIN_TASKS["linreg"]
    assert load_task_module(str(user_task)).DATA.name == "points.csv"
    with pytest.raises(ValueError, match="does not exist"):
        load_task_module(str(tmp_path / "nope.py"))
    with pytest.raises(ValueError, match="not a built-in task"):
        load_task_module("no_such_package.task")
    partial = tmp_path / "partial.py"
    partial.write_text("class Net:\n    pass\n\ndef load_data(p, n):\n    pass\n")
    with pytest.raises(ValueError, match="does not define train, test") as err:
        load_task_module(str(partial))
    assert str(partial) in str(err.value)
    broken = tmp_path / "broken.py"
    broken.write_text("import not_installed_anywhere\n")
    with pytest.raises(ValueError, match="failed to import: ModuleNotFoundError"):
        load_task_module(str(broken))
    with pytest.raises(ValueError, match="does not exist"):
        fl.validate({"task": str(tmp_path / "missing.py")})


def test_bound_task_fills_named_options_and_positional_fallbacks(tmp_path):
    path = tmp_path / "odd.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        CALLS = []
        def Net(width):
            return torch.nn.Linear(width, 2)
        def load_data(pid, n, batch_size=4):
            x = torch.zeros(8, 3)
            return DataLoader(TensorDataset(x, x[:, 0].long()), batch_size=batch_size), None
        def train(model, loader, num_epochs, dev, seed=None, momentum=0.0):
            CALLS.append((num_epochs, dev, seed, momentum, loader.batch_size))
            return 0.5
        def test(model, loader, dev):
            return 1.0, 0.5
    '''))
    task = BoundTask(str(path), {"width": 3, "batch-size": 2, "momentum": 0.9, "unused": 1})
    assert task.net(seed=0).in_features == 3
    loader, _ = task.load_data(0, 1)
    assert task.train(task.net(), loader, 2, "cpu", seed=5) == 0.5
    assert task.module.CALLS == [(2, "cpu", 5, 0.9, 2)]
    assert task.test(task.net(), loader, "cpu") == (1.0, 0.5)
    with pytest.raises(ValueError, match="Net\\(\\) needs the parameter 'width'"):
        BoundTask(str(path)).net()


def test_the_example_flower_apps_task_module_runs_in_fedquant_fl(tmp_path):
    """simulations/examples/flower_app/digitsapp/task.py (a BatchNorm CNN, the quickstart
    shape) runs unchanged; BatchNorm statistics travel raw and are averaged."""
    from pathlib import Path

    path = Path(fl.__file__).parent / "examples" / "flower_app" / "digitsapp" / "task.py"
    cfg = fl.validate({"task": str(path), "rounds": 1, "num_clients": 2, "partitioning": "iid",
                       "final_ptq_bits": 4, "codecs": [{"name": "eden", "params": {"bits": 2}}]})
    with pytest.warns(UserWarning, match="final PTQ skipped"):
        rows, ptqs = fl.run_fl_with_ptq(cfg, tmp_path, progress=False)
    assert ptqs == [] and [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2 and rows[1]["accuracy"] > rows[0]["accuracy"]


def test_raw_arrays_are_averaged_by_examples_and_counters_kept():
    like = {"bn.running_mean": np.zeros(3, np.float32), "bn.num_batches_tracked": np.array(0)}
    states = [({"bn.running_mean": np.array([1.0, 2, 3], np.float32),
                "bn.num_batches_tracked": np.array(4)}, 10.0),
              ({"bn.running_mean": np.array([3.0, 2, 1], np.float32),
                "bn.num_batches_tracked": np.array(9)}, 30.0)]
    out = fl._raw_mean(states, list(like), like)
    np.testing.assert_allclose(out["bn.running_mean"], [2.5, 2.0, 1.5])
    assert out["bn.running_mean"].dtype == np.float32 and int(out["bn.num_batches_tracked"]) == 4
