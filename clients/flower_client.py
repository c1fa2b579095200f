"""The project's Flower ``ClientApp``: the built-in task plus fedquant's ``compression_mod``.

On a train message the client loads the global model (``ArrayRecord(model.state_dict())``),
trains on its partition (``partition-id`` / ``num-partitions`` from the node config) and
replies with its model; :func:`fedquant.flower.compression_mod` turns that reply into one
compressed update with the codec the server's :class:`fedquant.flower.CompressedStrategy`
named. The data, model and training are :mod:`fedquant.fl.task`, which the in-process
runner of ``fedquant fl`` uses too.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml): dataset, model, hidden,
partitioning, alpha, data-seed, torch-threads; the server sends local-epochs, batch-size
and lr in the train config.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedquant.fl import client_seed
from fedquant.fl import task as fl_task
from fedquant.flower import compression_mod
from fedquant.flower.keys import ROUND_SEED_KEY, SEED_POLICY_KEY

app = ClientApp(mods=[compression_mod])

_PARTITION_KEY = "fedquant-partition"


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


def _model(task: fl_task.Task, context: Context, msg: Message) -> torch.nn.Module:
    rc = context.run_config
    model = fl_task.make_model(task, str(rc.get("model", "mlp")), int(rc.get("hidden", 128)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD from the global model; the mod compresses the reply."""
    torch.set_num_threads(int(context.run_config.get("torch-threads", 1)))
    cfg = msg.content["config"]
    task, x, y = _partition(context)
    model = _model(task, context, msg)
    # local shuffling uses the client's protocol seed, as the in-process runner does
    seed = client_seed(int(str(cfg[ROUND_SEED_KEY])), context.node_id,
                       str(cfg.get(SEED_POLICY_KEY, "per-client")))
    train_cfg = fl_task.TrainConfig(int(cfg.get("local-epochs", 1)),
                                    int(cfg.get("batch-size", 32)), float(cfg.get("lr", 0.1)))
    loss = fl_task.train_local(task, model, x, y, train_cfg, seed)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(x),
                                                   "train-loss": loss})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on the client's own partition."""
    task, x, y = _partition(context)
    model = _model(task, context, msg)
    local = fl_task.Task(task.name, task.kind, task.train_x, task.train_y, x, y,
                         task.num_classes, task.image_shape)
    loss, accuracy = fl_task.evaluate(local, model)
    metrics = MetricRecord({"num-examples": len(x), "loss": loss, "accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
