"""The project's Flower apps (ClientApp + CompressedStrategy(FedAvg)) and the FL protocol,
called in-process on real Messages.

The grid below is Flower's own `Grid` interface delivering messages to our real ClientApp
(same process), so the strategy and the client run unchanged; the real-process runs live in
test_flower_runtime.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

import fedquant as fq
from fedquant.clients import flower_client
from fedquant.fl import Payload, aggregate_payloads, client_seed, round_seed
from fedquant.fl import task as fl_task
from fedquant.flower import PAYLOAD_KEY, CompressedStrategy

NODES = (11, 2**63 + 5)  # node ids are 64-bit in Flower; the second exceeds int64
RUN_CONFIG = {"dataset": "digits", "model": "logreg", "partitioning": "iid", "lr": 0.1,
              "local-epochs": 1, "batch-size": 32}


@pytest.fixture(autouse=True)
def _server_identity():
    """Messages are stamped with the sending task's identity, which Flower's runtime sets
    in a ServerApp process; set it (the SuperLink's node id 1) for these in-process calls."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _context(node_id: int, partition: int, **run_config) -> Context:
    return Context(run_id=1, node_id=node_id,
                   node_config={"partition-id": partition, "num-partitions": len(NODES)},
                   state=RecordDict(), run_config={**RUN_CONFIG, **run_config})


class InProcessGrid(Grid):
    """Flower's Grid interface, delivering each message to the ClientApp in this process."""

    def __init__(self, contexts: dict[int, Context], client_app=flower_client.app):
        self.contexts, self.client_app = contexts, client_app

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # what Flower does with a raising ClientApp
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=msg))
        return replies


def _initial_arrays(model: str = "logreg") -> ArrayRecord:
    task = fl_task.load_task("digits", 0)
    return ArrayRecord(fl_task.make_model(task, model).state_dict())


def _flat(arrays: ArrayRecord) -> torch.Tensor:
    return torch.cat([torch.from_numpy(a.copy()).reshape(-1) for a in arrays.to_numpy_ndarrays()])


def _strategy(codec: str = "eden:bits=2", server_lr: float = 1.0, nodes: int = 2, **kwargs):
    from flwr.serverapp.strategy import FedAvg, FedAvgM

    sampling = dict(min_train_nodes=nodes, min_available_nodes=nodes, fraction_evaluate=0.0)
    inner = FedAvg(**sampling) if server_lr == 1.0 else FedAvgM(
        **sampling, server_learning_rate=server_lr)
    return CompressedStrategy(inner, codec=codec, **kwargs)


def _payload(reply: Message) -> bytes:
    return bytes(reply.content["arrays"][PAYLOAD_KEY].data)


class _Recording(InProcessGrid):
    """Keeps a copy of every reply's payload (the strategy decodes replies in place)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.payloads = {r.metadata.src_node_id: _payload(r) for r in replies
                         if not r.has_error()}
        self.weights = {r.metadata.src_node_id: r.content["metrics"]["num-examples"]
                        for r in replies if not r.has_error()}
        return replies


def test_client_app_replies_with_a_decodable_payload_of_the_configured_codec():
    arrays, contexts = _initial_arrays(), {NODES[1]: _context(NODES[1], 1)}
    strategy, grid = _strategy("eden:bits=1", nodes=1), _Recording(contexts)
    grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    enc = fq.Encoded.from_bytes(grid.payloads[NODES[1]])
    numel = _flat(arrays).numel()
    assert (enc.codec, enc.params["bits"], enc.shape) == ("eden", "1", (numel,))
    assert enc.seed == client_seed(round_seed(0, 1), NODES[1])
    x, _ = fl_task.client_data(fl_task.load_task("digits", 0), "iid", 2, 0.5, 1)
    assert grid.weights[NODES[1]] == len(x)
    delta = fq.decode(enc)
    assert torch.isfinite(delta).all() and delta.norm() > 0  # training moved the model
    # the partition's rows are kept for the next rounds' (fresh) ClientApp processes
    kept = next(iter(contexts[NODES[1]].state["fedquant-partition"].values())).numpy()
    task = fl_task.load_task("digits", 0)
    np.testing.assert_array_equal(kept, fl_task.partition_rows(task, "iid", 2, 0.5, 1))


def test_client_app_error_feedback_keeps_the_residual_in_context_state():
    arrays, ctx = _initial_arrays(), _context(NODES[0], 0)
    strategy = _strategy("drive", nodes=1, error_feedback=True)
    grid = _Recording({NODES[0]: ctx})
    grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    residual = torch.from_numpy(ctx.state["fedquant.residual"]["residual"].numpy().copy())
    sent = fq.decode(fq.Encoded.from_bytes(grid.payloads[NODES[0]]))
    # the residual is exactly what the codec lost: delta - decode(encode(delta))
    task = fl_task.load_task("digits", 0)
    model = fl_task.make_model(task, "logreg")
    flat = _flat(arrays)
    fl_task.set_flat(model, flat)
    x, y = fl_task.client_data(task, "iid", 2, 0.5, 0)
    fl_task.train_local(task, model, x, y, fl_task.TrainConfig(1, 32, 0.1),
                        client_seed(round_seed(0, 1), NODES[0]))
    delta = fl_task.get_flat(model) - flat
    torch.testing.assert_close(residual, delta - sent, atol=1e-6, rtol=0)
    assert residual.norm() > 0


def test_strategy_aggregate_equals_the_weighted_mean_of_the_decoded_replies():
    strategy = _strategy(server_lr=0.5)
    grid = _Recording({n: _context(n, i) for i, n in enumerate(NODES)})
    arrays = _initial_arrays()
    flat = _flat(arrays)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    encs = [fq.Encoded.from_bytes(grid.payloads[n]) for n in NODES]
    expected = flat + 0.5 * fq.decode_mean(encs, [grid.weights[n] for n in NODES])
    torch.testing.assert_close(_flat(new_arrays), expected, atol=1e-6, rtol=0)
    assert {e.seed for e in encs} == {client_seed(round_seed(0, 1), n) for n in NODES}
    stats = strategy.round_stats[1]
    assert stats["payload_bytes"] == metrics["fedquant-payload-bytes"] == sum(
        e.nbytes for e in encs)
    assert stats["payload_bytes"] < 2 * 4 * flat.numel() / 8  # 2 clients, far below fp32
    assert "train-loss" in metrics


class _Garbage:
    """A ClientApp stand-in that replies with random bytes as its payload."""

    def __call__(self, msg: Message, context: Context) -> Message:
        junk = np.random.default_rng(0).bytes(300)
        payload = Array(dtype="uint8", shape=(300,), stype="fedquant.v1.EncodedUpdate",
                        data=junk)
        return Message(RecordDict({"arrays": ArrayRecord({PAYLOAD_KEY: payload}),
                                   "metrics": MetricRecord({"num-examples": 50})}),
                       reply_to=msg)


class _Raises:
    def __call__(self, msg: Message, context: Context) -> Message:
        raise RuntimeError("client crashed mid-round")


@pytest.mark.parametrize("bad_client", [_Garbage(), _Raises()], ids=["garbage", "raises"])
def test_a_bad_client_is_dropped_and_the_round_completes(bad_client):
    good, bad = NODES
    contexts = {good: _context(good, 0), bad: _context(bad, 1)}

    class MixedGrid(_Recording):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive([m for m in messages
                                                if m.metadata.dst_node_id == good])
            b = next(m for m in messages if m.metadata.dst_node_id == bad)
            try:
                replies.append(bad_client(b, contexts[bad]))
            except RuntimeError as err:
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=b))
            return replies

    strategy, arrays = _strategy(), _initial_arrays()
    grid = MixedGrid(contexts)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    new_arrays, _ = strategy.aggregate_train(1, replies)
    expected = _flat(arrays) + fq.decode(fq.Encoded.from_bytes(grid.payloads[good]))
    torch.testing.assert_close(_flat(new_arrays), expected, atol=1e-6, rtol=0)
    stats = strategy.round_stats[1]
    assert stats["accepted"] == 1 and stats["replies"] == 2
    assert len(stats["dropped"]) == (1 if isinstance(bad_client, _Garbage) else 0)


def test_full_strategy_run_in_process_improves_accuracy():
    contexts = {n: _context(n, i) for i, n in enumerate(NODES)}
    task = fl_task.load_task("digits", 0)
    model = fl_task.make_model(task, "logreg")
    accuracy = {}

    def central(server_round, arrays):
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy[server_round] = fl_task.evaluate(task, model)[1]
        return MetricRecord({"accuracy": accuracy[server_round]})

    _strategy().start(InProcessGrid(contexts), ArrayRecord(model.state_dict()), num_rounds=2,
                      evaluate_fn=central)
    assert accuracy[2] > accuracy[0] + 0.2


def test_strategy_rejects_bad_settings_up_front():
    from flwr.serverapp.strategy import FedAvg

    with pytest.raises(ValueError, match="unknown codec"):
        CompressedStrategy(FedAvg(), codec="nope")
    with pytest.raises(ValueError, match="seed_policy"):
        CompressedStrategy(FedAvg(), seed_policy="sometimes")
    with pytest.raises(ValueError, match="bad item"):
        CompressedStrategy(FedAvg(), codec="eden:bits")
    with pytest.raises(TypeError, match="wraps a flwr Strategy"):
        CompressedStrategy("FedAvg")


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(max_size=400), weight=st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6)))
def test_aggregate_payloads_never_crashes_on_arbitrary_bytes(blob, weight):
    flat = torch.zeros(650)
    codec = fq.get_codec("eden", bits=2)
    good = codec.encode(torch.randn(650), seed=3).to_bytes()
    result = aggregate_payloads(flat, [Payload(1, good, 10.0, 3), Payload(2, blob, weight)],
                                codec)
    assert 1 in result.accepted
    assert (2 in result.accepted) != (2 in result.rejected)
    assert torch.isfinite(result.global_flat).all()
    assert result.uplink_bytes == len(good) + len(blob)


def test_aggregate_payloads_checks_codec_parameters_size_and_seed():
    x = torch.randn(650)
    codec = fq.get_codec("eden", bits=2)
    enc = codec.encode(x, seed=9)
    p = [Payload(1, enc.to_bytes(), 5.0, expected_seed=10),  # wrong seed
         Payload(2, fq.get_codec("fp32").encode(x).to_bytes(), 5.0),  # other codec
         Payload(3, codec.encode(x[:600]).to_bytes(), 5.0),  # size
         Payload(4, enc.to_bytes(), -1.0),  # bad weight
         Payload(5, fq.get_codec("eden", bits=3).encode(x).to_bytes(), 5.0)]  # other bits
    result = aggregate_payloads(torch.zeros(650), p, codec)
    assert result.accepted == []
    assert set(result.rejected) == {1, 2, 3, 4, 5}
    assert "seed" in result.rejected[1] and "codec" in result.rejected[2]
    assert "num-examples" in result.rejected[4] and "bits=3" in result.rejected[5]


def test_partitions_cover_the_training_pool_once():
    task = fl_task.load_task("digits", 0)
    for partitioning in ("iid", "dirichlet"):
        sizes = [len(fl_task.client_data(task, partitioning, 5, 0.5, i)[0]) for i in range(5)]
        assert sum(sizes) == len(task.train_x) and min(sizes) > 0
    with pytest.raises(ValueError, match="partitioning"):
        fl_task.client_data(task, "sorted", 5, 0.5, 0)
    with pytest.raises(ValueError, match="partition_id"):
        fl_task.client_data(task, "iid", 5, 0.5, 5)


@pytest.mark.parametrize("dataset,model", [("digits", "mlp"), ("digits", "cnn"),
                                           ("linreg", "linear")])
def test_every_model_learns_its_task(dataset, model):
    task = fl_task.load_task(dataset, 0)
    net = fl_task.make_model(task, model, hidden=32)
    before = fl_task.evaluate(task, net)[0]
    x, y = fl_task.client_data(task, "iid", 1, 0.5, 0)
    fl_task.train_local(task, net, x, y, fl_task.TrainConfig(3, 32, 0.2), seed=1)
    after = fl_task.evaluate(task, net)[0]
    assert math.isfinite(after) and after < 0.7 * before


def test_unknown_dataset_and_offline_hub_give_clear_errors():
    with pytest.raises(ValueError, match="dataset must be one of"):
        fl_task.load_task("mnist")
    with pytest.raises(ValueError, match="needs model = 'linear'"):
        fl_task.make_model(fl_task.load_task("linreg", 0), "mlp")


def test_flower_apps_and_the_in_process_runner_compute_the_same_round(tmp_path):
    """`fedquant fl` (in-process) runs the same protocol functions as the Flower apps: one
    round through CompressedStrategy(FedAvg) + the ClientApp gives run_fl's round 1."""
    from fedquant.simulations import fl

    cfg = fl.validate({"model": "logreg", "rounds": 1, "num_clients": 2, "partitioning": "iid",
                       "codecs": [{"name": "eden", "params": {"bits": 2}}]})
    rows = fl.run_fl(cfg, tmp_path, progress=False)
    contexts = {i: _context(i, i, lr=cfg["lr"], partitioning="iid") for i in range(2)}
    task = fl_task.load_task("digits", 0)
    model = fl_task.make_model(task, "logreg", seed=cfg["seed"])
    seen = {}

    def central(server_round, arrays):
        model.load_state_dict(arrays.to_torch_state_dict())
        seen[server_round] = fl_task.evaluate(task, model)
        return MetricRecord({"accuracy": seen[server_round][1]})

    strategy = _strategy(run_seed=cfg["seed"])
    strategy.start(InProcessGrid(contexts), ArrayRecord(model.state_dict()), num_rounds=1,
                   evaluate_fn=central, train_config=ConfigRecord({"lr": cfg["lr"]}))
    assert strategy.round_stats[1]["payload_bytes"] == rows[1]["uplink_bytes"]
    assert seen[1][0] == pytest.approx(rows[1]["loss"], abs=1e-5)
    assert seen[1][1] == pytest.approx(rows[1]["accuracy"], abs=1e-9)
