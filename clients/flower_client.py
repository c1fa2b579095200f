"""The Flower ``ClientApp``: train locally, compress the update with fedquant, reply bytes.

On a ``train`` message the client loads the global model (one flat array), trains on its
partition (``partition-id`` / ``num-partitions`` from the node config), computes
delta = local - global, adds its error-feedback residual when enabled (kept in
``context.state``), encodes the whole delta as ONE ``fq.Encoded`` with the codec the server
named in the message config, and replies with the payload bytes in a ConfigRecord plus
``num-examples`` and ``payload-bytes`` in a MetricRecord. Its seed is
``fq.random.derive_seed(round_seed, node_id)`` (seed policy "per-client"), so the server can
check it. The work itself is :func:`simulations.fl_task.client_update`, which the in-process
runner of ``fedquant fl`` calls too.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml): dataset, model, hidden,
partitioning, alpha, data-seed, torch-threads; the server sends codec, codec-params,
rotations, seed-policy, error-feedback, local-epochs, batch-size, lr and round-seed.
"""

from __future__ import annotations

import numpy as np
import torch
from fedquant.simulations import fl_task
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

#: keys of the reply: the ConfigRecord holding the payload and the MetricRecord
UPDATE_KEY, PAYLOAD_KEY, METRICS_KEY = "update", "payload", "metrics"
_RESIDUAL_KEY, _PARTITION_KEY = "fedquant-residual", "fedquant-partition"


def _setting(msg_config: ConfigRecord, context: Context, key: str, default):
    """A setting from the message config (server's word), else the run config, else default."""
    if key in msg_config:
        return msg_config[key]
    return context.run_config.get(key, default)


def _partition(context: Context) -> tuple[fl_task.Task, torch.Tensor, torch.Tensor]:
    """The node's partition; its row indices are kept in context.state, so later rounds
    (a fresh ClientApp process each under process isolation) skip the partitioner."""
    rc = context.run_config
    task = fl_task.load_task(str(rc.get("dataset", "digits")), int(rc.get("data-seed", 0)))
    args = (str(rc.get("partitioning", "dirichlet")),
            int(context.node_config.get("num-partitions", rc.get("num-partitions", 2))),
            float(rc.get("alpha", 0.5)), int(context.node_config.get("partition-id", 0)),
            int(rc.get("data-seed", 0)))
    key = f"{task.name}|{args}"
    kept = context.state.array_records.get(_PARTITION_KEY)
    if kept is not None and kept.get(key) is not None:
        rows = kept[key].numpy()
    else:
        rows = fl_task.partition_rows(task, *args)
        context.state[_PARTITION_KEY] = ArrayRecord({key: Array(rows)})
    x, y = fl_task.rows_data(task, rows)
    return task, x, y


def _global_flat(msg: Message) -> torch.Tensor:
    arrays = msg.content.array_records["arrays"]
    return torch.from_numpy(np.ascontiguousarray(arrays["flat"].numpy(), dtype=np.float32))


def _model(task: fl_task.Task, context: Context) -> torch.nn.Module:
    rc = context.run_config
    return fl_task.make_model(task, str(rc.get("model", "mlp")), int(rc.get("hidden", 128)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training + compression of the update; see the module docstring."""
    torch.set_num_threads(int(context.run_config.get("torch-threads", 1)))
    cfg = msg.content.config_records["config"]
    task, x, y = _partition(context)
    global_flat = _global_flat(msg)
    codec = fl_task.make_codec(str(_setting(cfg, context, "codec", "eden")),
                               str(_setting(cfg, context, "codec-params", "bits=2")),
                               str(_setting(cfg, context, "rotations", "")))
    round_seed = int(str(cfg["round-seed"]))
    seed = fl_task.client_seed(round_seed, context.node_id,
                               str(_setting(cfg, context, "seed-policy", "per-client")))
    residual = None
    if bool(_setting(cfg, context, "error-feedback", False)):
        kept = context.state.array_records.get(_RESIDUAL_KEY)
        residual = (torch.from_numpy(kept["residual"].numpy().copy()) if kept is not None
                    else torch.zeros_like(global_flat))
    train_cfg = fl_task.TrainConfig(int(_setting(cfg, context, "local-epochs", 1)),
                                    int(_setting(cfg, context, "batch-size", 32)),
                                    float(_setting(cfg, context, "lr", 0.1)))
    update = fl_task.client_update(task, _model(task, context), global_flat, x, y, train_cfg,
                                   codec, seed, residual, round_seed)
    if update.residual is not None:
        context.state[_RESIDUAL_KEY] = ArrayRecord({"residual": Array(update.residual.numpy())})
    content = RecordDict({
        UPDATE_KEY: ConfigRecord({PAYLOAD_KEY: update.payload}),
        METRICS_KEY: MetricRecord({"num-examples": update.num_examples,
                                   "payload-bytes": len(update.payload),
                                   "train-loss": update.train_loss}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on the client's own partition."""
    task, x, y = _partition(context)
    model = _model(task, context)
    fl_task.set_flat(model, _global_flat(msg))
    local = fl_task.Task(task.name, task.kind, task.train_x, task.train_y, x, y,
                         task.num_classes, task.image_shape)
    loss, accuracy = fl_task.evaluate(local, model)
    metrics = MetricRecord({"num-examples": len(x), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)
