"""The project's Flower ``ServerApp``: FedAvg wrapped in fedquant's ``CompressedStrategy``.

FedAvg (McMahan et al., https://arxiv.org/abs/1602.05629; FedAvgM's server learning rate
when ``server-lr`` is not 1) over updates that each client sends as one ``fq.Encoded``
(EDEN, Vargaftik et al., ICML 2022, https://arxiv.org/abs/2108.08842, or any codec of
``fq.available_codecs()``), named by the run config's ``codec`` spec, e.g.
``"eden:bits=2,rotations=auto"``.

The model and the central evaluation come from the run's task module (``task``: a built-in
name, a dotted module path or a .py file in the shape of Flower's quickstart ``task.py``;
empty: the built-in ``dataset`` task of the keys dataset, model, hidden;
:mod:`fedquant.fl.tasks`), the one the ClientApps train.

Per round the ServerApp evaluates the global model centrally on the held-out split and
appends one JSON line to ``metrics-path``: round, loss, accuracy, uplink_bytes (sum of
payload sizes as received), downlink_bytes, clients replied/failed/dropped/missing, wall_s.

With ``final-ptq-bits`` > 0 (2..8) the server then quantizes the final global model with
``fedquant.ptq`` (SPFQ, Zhang and Saab, https://arxiv.org/abs/2309.10975; or
``final-ptq-method`` gpfq / msq) on ``final-ptq-calib`` rows of the training pool and
appends one last JSON line (key ``final_ptq``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fedquant.fl import task as fl_task
from fedquant.fl.tasks import BoundTask
from fedquant.flower import CompressedStrategy

app = ServerApp()


def _metrics_path(context: Context) -> Path:
    path = Path(str(context.run_config.get("metrics-path", "") or
                    "results/fl_flower/metrics.jsonl"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the strategy from the run config, run it, write per-round JSON lines."""
    rc = context.run_config
    torch.set_num_threads(int(rc.get("torch-threads", 1)))
    spec = str(rc.get("task", "") or "")
    ptq = (int(rc.get("final-ptq-bits", 0)), str(rc.get("final-ptq-method", "spfq")),
           int(rc.get("final-ptq-calib", 256)))
    fl_task.check_ptq(*ptq, model=None if spec else str(rc.get("model", "mlp")))  # round 1
    task = BoundTask(spec or "dataset", rc)
    device = str(rc.get("device", "cpu"))
    model = task.net(seed=int(rc.get("seed", 0)))
    if ptq[0] and not fl_task.ptq_applies(model):
        raise ValueError(f"'final-ptq-bits' > 0 needs a model of nn.Linear layers; the Net of "
                         f"task {spec!r} is {type(model).__name__} (set final-ptq-bits = 0)")
    testloader = task.central_testloader(int(rc.get("num-partitions", 0)) or
                                         len(list(grid.get_node_ids())) or 1)
    min_nodes, server_lr = int(rc.get("min-nodes", 2)), float(rc.get("server-lr", 1.0))
    sampling = dict(fraction_train=float(rc.get("fraction-train", 1.0)), fraction_evaluate=0.0,
                    min_train_nodes=min_nodes, min_available_nodes=min_nodes)
    inner = (FedAvg(**sampling) if server_lr == 1.0 else
             FedAvgM(**sampling, server_learning_rate=server_lr, server_momentum=0.0))
    strategy = CompressedStrategy(inner, codec=str(rc.get("codec", "eden:bits=2")),
                                  seed_policy=str(rc.get("seed-policy", "per-client")),
                                  error_feedback=bool(rc.get("error-feedback", False)),
                                  run_seed=int(rc.get("seed", 0)))
    out = _metrics_path(context)
    out.write_text("")
    started = {"round": time.perf_counter()}
    model_bytes = sum(4 * p.numel() for p in model.state_dict().values())

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.test(model, testloader, device)
        stats = strategy.round_stats.get(server_round, {})
        replies, dropped = stats.get("replies", 0), len(stats.get("dropped", {}))
        row = {"codec": str(rc.get("codec", "eden:bits=2")), "round": server_round,
               "loss": loss, "accuracy": accuracy,
               "uplink_bytes": stats.get("payload_bytes", 0),
               "downlink_bytes": model_bytes * replies,
               "replied": stats.get("accepted", 0) + dropped, "dropped": dropped,
               "failed": replies - stats.get("accepted", 0) - dropped,
               "wall_s": time.perf_counter() - started["round"]}
        started["round"] = time.perf_counter()
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=int(rc.get("num-server-rounds", 3)),
                            timeout=float(rc.get("round-timeout", 600.0)),
                            train_config=ConfigRecord({
                                "local-epochs": int(rc.get("local-epochs", 1)),
                                "batch-size": int(rc.get("batch-size", 32)),
                                "lr": float(rc.get("lr", 0.1))}),
                            evaluate_fn=central_evaluate)
    if ptq[0]:
        model.load_state_dict(result.arrays.to_torch_state_dict())
        final = task.quantize_final(model, testloader, device, *ptq,
                                    seed=int(rc.get("seed", 0)))
        with out.open("a") as f:
            f.write(json.dumps(final) + "\n")
