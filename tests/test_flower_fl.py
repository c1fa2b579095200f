"""`fedquant fl`: config validation, the in-process runner and its outputs."""

from __future__ import annotations

import csv
import json

import pytest
import typer
from typer.testing import CliRunner

import fedquant as fq
from fedquant.fl import task as fl_task
from fedquant.simulations import fl


def test_shipped_config_is_valid_and_names_the_issue_compressors():
    cfg = fl.load_config()
    assert (cfg["dataset"], cfg["num_clients"], cfg["partitioning"], cfg["alpha"],
            cfg["rounds"]) == ("digits", 10, "dirichlet", 0.5, 30)
    labels = [c["label"] for c in cfg["codecs"]]
    for label in ("fp32", "eden b=1", "eden b=2", "quic-fl b=2", "drive", "stochastic b=2"):
        assert label in labels


@pytest.mark.parametrize("change,message", [
    ({"roundz": 3}, "unknown config key"),
    ({"engine": "ray"}, "'engine'"),
    ({"partitioning": "sorted"}, "'partitioning'"),
    ({"rounds": 0}, "'rounds'"),
    ({"fraction_train": 1.5}, "'fraction_train'"),
    ({"codecs": [{"name": "eden", "params": {"bitz": 2}}]}, "bitz"),
    ({"codecs": [{"name": "nope"}]}, "codecs[0].name"),
    ({"codecs": [{"name": "eden", "colour": 1}]}, "colour"),
    ({"quick": {"codecs": ["missing"]}}, "quick.codecs"),
    ({"dataset": "cifar"}, "'dataset'"),
])
def test_bad_config_keys_are_named(change, message):
    with pytest.raises(ValueError) as err:
        fl.validate(change)
    assert message in str(err.value)


def test_optional_codec_missing_from_the_registry_is_skipped():
    cfg = fl.validate({"codecs": [{"name": "fp32"}, {"name": "not-yet", "optional": True}]})
    assert [c["name"] for c in cfg["codecs"]] == ["fp32", "not-yet"]


def test_run_fl_quick_writes_rows_reports_and_plots(tmp_path):
    cfg = fl.validate({"model": "logreg", "rounds": 2, "num_clients": 3, "lr": 0.2,
                       "codecs": [{"name": "fp32"},
                                  {"label": "eden b=2", "name": "eden", "params": {"bits": 2}},
                                  {"label": "drive+EF", "name": "drive",
                                   "error_feedback": True}]})
    rows = fl.run_fl(cfg, tmp_path, progress=False)
    assert set(rows[0]) == set(fl.COLUMNS)
    task = fl_task.load_task("digits", 0)
    d = task.num_features * task.num_classes + task.num_classes
    for label, codec in (("fp32", fq.get_codec("fp32")), ("eden b=2", fq.get_codec("eden"))):
        mine = [r for r in rows if r["label"] == label]
        assert [r["round"] for r in mine] == [0, 1, 2]
        size = codec.encode(fl_task.get_flat(fl_task.make_model(task, "logreg")),
                            seed=2**64 - 1).nbytes  # the longest varint seed
        for r in mine[1:]:  # every client sends one Encoded of the whole update; its
            # size varies by a few bytes with the varint-coded seed
            assert 3 * (size - 9) <= r["uplink_bytes"] <= 3 * size and r["clients"] == 3
            assert r["downlink_bytes"] == 3 * 4 * d
        assert mine[2]["cum_uplink_bytes"] == mine[1]["uplink_bytes"] + mine[2]["uplink_bytes"]
        assert mine[2]["accuracy"] > mine[0]["accuracy"] + 0.2
    with (tmp_path / "rows.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["rows"] == rows and saved["summary"][0]["label"] == "fp32"
    report = (tmp_path / "report.md").read_text()
    assert "| eden b=2 |" in report and "| drive+EF |" in report and "Target accuracy" in report
    for png in ("accuracy_vs_rounds.png", "accuracy_vs_uplink.png", "accuracy_vs_time.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_run_fl_is_reproducible(tmp_path):
    cfg = fl.validate({"model": "logreg", "rounds": 1, "num_clients": 2,
                       "codecs": [{"name": "eden", "params": {"bits": 1}}]})
    timed = ("wall_s", "client_s", "server_s")  # measured seconds differ run to run
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timed} for r in rows]  # noqa: E731
    assert strip(fl.run_fl(cfg, tmp_path / "a", progress=False)) == strip(
        fl.run_fl(cfg, tmp_path / "b", progress=False))


def test_fl_command_quick(tmp_path):
    app = typer.Typer()
    fl.register(app)
    app.command("noop")(lambda: None)  # keep `fl` a named subcommand
    result = CliRunner().invoke(app, ["fl", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "fedquant fl" in result.output and (tmp_path / "report.md").exists()
    bad = CliRunner().invoke(app, ["fl", "--quick", "--engine", "ray"])
    assert bad.exit_code != 0 and "engine" in bad.output


def test_flower_engine_finds_the_local_deployment_runner_without_the_repo_on_sys_path():
    # the console script runs without the checkout on sys.path; `--engine flower` loads
    # scripts/local_deployment.py by file (the runner itself is tested in
    # test_flower_runtime.py)
    module = fl._local_deployment()
    assert callable(module.run_app) and module.FLWR_VERSION == "1.41.0"
