"""Final-model post-training quantization (fedquant.ptq, seed 004) in federated learning:
`fedquant fl`'s in-process runner, the final step (fl_task.quantize_final), and the
ServerApp's last line.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from flwr.app import Context, RecordDict
from test_flower_apps import NODES, InProcessGrid, _context, _server_identity  # noqa: F401

from fedquant.fl import task as fl_task
from fedquant.server import flower_server
from fedquant.simulations import fl


def _numel(model: str) -> int:
    task = fl_task.load_task("digits", 0)
    return fl_task.get_flat(fl_task.make_model(task, model)).numel()


def test_inprocess_run_reports_the_accuracy_drop_and_the_quantized_size(tmp_path):
    cfg = fl.validate({"model": "mlp", "rounds": 2, "num_clients": 3, "lr": 0.2,
                       "final_ptq_bits": 4, "final_ptq_calib": 128,
                       "codecs": [{"label": "eden b=2", "name": "eden", "params": {"bits": 2}}]})
    rows, ptqs = fl.run_fl_with_ptq(cfg, tmp_path, progress=False)
    (ptq,) = ptqs
    assert (ptq["label"], ptq["final_ptq"], ptq["bits"], ptq["calib_size"]) == (
        "eden b=2", "spfq", 4, 128)
    # "before" is the final global model of the run; training got it well above chance
    assert ptq["accuracy_before"] == pytest.approx(rows[-1]["accuracy"], abs=1e-9)
    assert ptq["accuracy_before"] > 0.5
    assert isinstance(ptq["accuracy_drop"], float) and abs(ptq["accuracy_drop"]) < 0.05
    assert ptq["accuracy_drop"] == pytest.approx(ptq["accuracy_before"] - ptq["accuracy_after"])
    assert ptq["fp32_bytes"] == 4 * _numel("mlp")
    assert 0 < ptq["ptq_bytes"] < ptq["fp32_bytes"] / 4  # 4-bit levels: about 1/8
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["final_ptq"] == ptqs and saved["config"]["final_ptq_bits"] == 4
    with (tmp_path / "final_ptq.csv").open() as f:
        assert [r["ptq_bytes"] for r in csv.DictReader(f)] == [str(ptq["ptq_bytes"])]
    report = (tmp_path / "report.md").read_text()
    assert f"| {ptq['fp32_bytes']} | {ptq['ptq_bytes']} |" in report


def test_final_ptq_is_off_by_default(tmp_path):
    cfg = fl.validate({"model": "logreg", "rounds": 1, "num_clients": 2,
                       "codecs": [{"name": "fp32"}]})
    assert fl.run_fl_with_ptq(cfg, tmp_path, progress=False)[1] == []
    assert not (tmp_path / "final_ptq.csv").exists()


def _trained(model: str) -> tuple[fl_task.Task, torch.nn.Module]:
    task = fl_task.load_task("digits", 0)
    net = fl_task.make_model(task, model)
    x, y = fl_task.client_data(task, "iid", 1, 0.5, 0)
    fl_task.train_local(task, net, x, y, fl_task.TrainConfig(3, 32, 0.2), seed=1)
    return task, net


@pytest.mark.parametrize("method", ["spfq", "gpfq", "msq"])
def test_final_step_quantizes_the_final_global_model(method):
    task, net = _trained("mlp")
    flat = fl_task.get_flat(net)
    fresh = fl_task.make_model(task, "mlp", seed=7)  # the server's model object, reloaded

    def quantize():
        return fl_task.quantize_final(task, fresh, flat, 4, method, 64, seed=0)

    result = quantize()
    assert result["accuracy_before"] == pytest.approx(fl_task.evaluate(task, net)[1])
    assert result["accuracy_before"] > 0.85 and abs(result["accuracy_drop"]) < 0.05
    assert result["fp32_bytes"] == 4 * _numel("mlp")
    assert result["ptq_bytes"] < result["fp32_bytes"] / 4
    assert quantize() == result  # seeded


def test_server_app_writes_the_final_ptq_line_after_the_rounds(tmp_path):
    """The real ServerApp main, its strategy driving the real ClientApp through Flower's Grid
    interface in this process (the process runs are in test_flower_runtime.py)."""
    metrics = tmp_path / "metrics.jsonl"
    contexts = {n: _context(n, i, lr=0.2) for i, n in enumerate(NODES)}
    run_config = {"num-server-rounds": 2, "model": "logreg", "codec": "eden:bits=2",
                  "final-ptq-bits": 4, "final-ptq-calib": 128,
                  "metrics-path": str(metrics), "lr": 0.2}
    flower_server.app(InProcessGrid(contexts), Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    *rounds, ptq = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert ptq["final_ptq"] == "spfq" and ptq["bits"] == 4 and "round" not in ptq
    assert ptq["accuracy_before"] == pytest.approx(rounds[-1]["accuracy"], abs=1e-9)
    assert abs(ptq["accuracy_drop"]) < 0.05
    assert ptq["fp32_bytes"] == 4 * _numel("logreg") > 4 * ptq["ptq_bytes"]


@pytest.mark.parametrize("run_config,message", [
    ({"final-ptq-bits": 1}, "'final-ptq-bits'"),
    ({"final-ptq-bits": 9}, "'final-ptq-bits'"),
    ({"final-ptq-bits": 4, "final-ptq-method": "round"}, "'final-ptq-method'"),
    ({"final-ptq-bits": 4, "final-ptq-calib": 0}, "'final-ptq-calib'"),
])
def test_server_app_rejects_bad_ptq_settings_before_round_one(run_config, message):
    grid = InProcessGrid({})  # no node: a round would fail differently
    with pytest.raises(ValueError, match=message):
        flower_server.app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                        run_config=run_config))


@pytest.mark.parametrize("change,message", [
    ({"final_ptq_bits": 3.5}, "'final_ptq_bits'"),
    ({"final_ptq_method": "gptq"}, "'final_ptq_method'"),
    ({"final_ptq_calib": -1}, "'final_ptq_calib'"),
    ({"final_ptq_bits": 4, "model": "cnn"}, "'final_ptq_bits' > 0 needs a model of nn.Linear"),
])
def test_bad_ptq_config_keys_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        fl.validate(change)


def test_a_model_without_linear_layers_only_is_a_clear_error():
    task = fl_task.load_task("digits", 0)
    cnn = fl_task.make_model(task, "cnn")
    with pytest.raises(ValueError, match="nn.Linear layers"):
        fl_task.quantize_final(task, cnn, fl_task.get_flat(cnn), 4)
