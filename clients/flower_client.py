"""The project's Flower ``ClientApp``: a task module plus fedquant's ``compression_mod``.

On a train message the client loads the global model (``ArrayRecord(model.state_dict())``),
trains on its partition (``partition-id`` / ``num-partitions`` from the node config) and
replies with its model; :func:`fedquant.flower.compression_mod` turns that reply into one
compressed update with the codec the server's :class:`fedquant.flower.CompressedStrategy`
named. The task is a module in the shape of Flower's quickstart ``task.py`` (``Net``,
``load_data``, ``train``, ``test``; :mod:`fedquant.fl.tasks`), the one the in-process runner
of ``fedquant fl`` calls too.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml): task (a built-in name, a
dotted module path or a .py file; empty: the built-in ``dataset`` task of the keys dataset,
model, hidden, partitioning, alpha, data-seed), torch-threads, and any key a task function
names (``-`` read as ``_``; Flower accepts the keys that config declares; ``device``
defaults to cpu); the server sends local-epochs, batch-size and lr in the train config.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedquant.fl import client_seed
from fedquant.fl.tasks import BoundTask
from fedquant.fl.tasks.bound import num_examples
from fedquant.flower import compression_mod
from fedquant.flower.keys import ROUND_SEED_KEY, SEED_POLICY_KEY

app = ClientApp(mods=[compression_mod])

_PARTITION_KEY = "fedquant-partition"


class _StateRows:
    """A partition cache in context.state: later rounds (a fresh ClientApp process each
    under process isolation) skip the partitioner (built-in tasks use it)."""

    def __init__(self, context: Context):
        self.context = context

    def get(self, key: str) -> np.ndarray | None:
        kept = self.context.state.array_records.get(_PARTITION_KEY)
        return kept[key].numpy() if kept is not None and kept.get(key) is not None else None

    def __setitem__(self, key: str, rows: np.ndarray) -> None:
        self.context.state[_PARTITION_KEY] = ArrayRecord({key: Array(np.asarray(rows))})


def _task(context: Context, msg: Message) -> BoundTask:
    """The run's task module, with the run config and the round's train config as options."""
    rc = context.run_config
    config = msg.content.config_records.get("config", {})
    options = {**rc, **{k: v for k, v in config.items() if k in ("lr", "batch-size")},
               "partition_cache": _StateRows(context)}
    return BoundTask(str(rc.get("task", "") or "dataset"), options)


def _data(task: BoundTask, context: Context):
    num = int(context.node_config.get("num-partitions",
                                      context.run_config.get("num-partitions", 2)))
    return task.load_data(int(context.node_config.get("partition-id", 0)), num)


def _model(task: BoundTask, msg: Message) -> torch.nn.Module:
    model = task.net(seed=0)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the global model; the mod compresses the reply."""
    torch.set_num_threads(int(context.run_config.get("torch-threads", 1)))
    cfg = msg.content["config"]
    task = _task(context, msg)
    trainloader, _ = _data(task, context)
    model = _model(task, msg)
    # local shuffling uses the client's protocol seed, as the in-process runner does
    seed = client_seed(int(str(cfg[ROUND_SEED_KEY])), context.node_id,
                       str(cfg.get(SEED_POLICY_KEY, "per-client")))
    loss = task.train(model, trainloader, int(cfg.get("local-epochs", 1)),
                      str(context.run_config.get("device", "cpu")), seed)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": num_examples(trainloader),
                                                   "train-loss": loss})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on the client's own training partition."""
    task = _task(context, msg)
    trainloader, _ = _data(task, context)
    model = _model(task, msg)
    loss, accuracy = task.test(model, trainloader, str(context.run_config.get("device", "cpu")))
    metrics = MetricRecord({"num-examples": num_examples(trainloader), "loss": loss,
                            "accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
