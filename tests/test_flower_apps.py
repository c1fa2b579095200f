"""The Flower ClientApp and FedQuantAvg strategy, called in-process on real Messages.

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
from fedquant.clients import flower_client
from fedquant.server.flower_server import FedQuantAvg
from fedquant.simulations import fl_task
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

import fedquant as fq

NODES = (11, 2**63 + 5)  # node ids are 64-bit in Flower; the second exceeds int64
RUN_CONFIG = {"dataset": "digits", "model": "logreg", "partitioning": "iid", "lr": 0.1,
              "local-epochs": 1, "batch-size": 32, "codec": "eden", "codec-params": "bits=2"}


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


def _train_message(node_id: int, flat: torch.Tensor, round_seed: int, **config) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"flat": Array(flat.numpy())}),
        "config": ConfigRecord({"round-seed": str(round_seed), "server-round": 1, **config})})
    return Message(content, node_id, MessageType.TRAIN)


def _initial_flat() -> torch.Tensor:
    task = fl_task.load_task("digits", 0)
    return fl_task.get_flat(fl_task.make_model(task, "logreg"))


def test_client_app_replies_with_a_decodable_payload_of_the_configured_codec():
    flat, round_seed = _initial_flat(), 12345
    msg = _train_message(NODES[1], flat, round_seed, codec="eden", **{"codec-params": "bits=1"})
    ctx = _context(NODES[1], 1)
    reply = flower_client.app(msg, ctx)
    blob = reply.content.config_records["update"]["payload"]
    metrics = reply.content.metric_records["metrics"]
    enc = fq.Encoded.from_bytes(blob)
    assert (enc.codec, enc.params["bits"], enc.shape) == ("eden", "1", (flat.numel(),))
    assert enc.seed == fq.random.derive_seed(round_seed, NODES[1])
    assert metrics["payload-bytes"] == len(blob) == enc.nbytes
    x, _ = fl_task.client_data(fl_task.load_task("digits", 0), "iid", 2, 0.5, 1)
    assert metrics["num-examples"] == len(x)
    delta = fq.decode(enc)
    assert torch.isfinite(delta).all() and delta.norm() > 0  # training moved the model
    # the partition's rows are kept for the next rounds' (fresh) ClientApp processes
    kept = next(iter(ctx.state["fedquant-partition"].values())).numpy()
    task = fl_task.load_task("digits", 0)
    np.testing.assert_array_equal(kept, fl_task.partition_rows(task, "iid", 2, 0.5, 1))


def test_client_app_error_feedback_keeps_the_residual_in_context_state():
    flat, ctx = _initial_flat(), _context(NODES[0], 0)
    cfg = {"codec": "drive", "codec-params": "", "error-feedback": True}
    reply = flower_client.app(_train_message(NODES[0], flat, 7, **cfg), ctx)
    residual = torch.from_numpy(ctx.state["fedquant-residual"]["residual"].numpy().copy())
    sent = fq.decode(fq.Encoded.from_bytes(reply.content["update"]["payload"]))
    # the residual is exactly what the codec lost: delta - decode(encode(delta))
    task = fl_task.load_task("digits", 0)
    model = fl_task.make_model(task, "logreg")
    fl_task.set_flat(model, flat)
    x, y = fl_task.client_data(task, "iid", 2, 0.5, 0)
    fl_task.train_local(task, model, x, y, fl_task.TrainConfig(1, 32, 0.1),
                        fq.random.derive_seed(7, NODES[0]))
    delta = fl_task.get_flat(model) - flat
    torch.testing.assert_close(residual, delta - sent, atol=1e-6, rtol=0)
    assert residual.norm() > 0


def _strategy(**kwargs) -> FedQuantAvg:
    return FedQuantAvg(codec="eden", codec_params="bits=2", min_train_nodes=2,
                       min_available_nodes=2, fraction_evaluate=0.0, **kwargs)


def test_strategy_aggregate_equals_decode_mean_of_the_replies():
    strategy = _strategy(server_learning_rate=0.5)
    contexts = {n: _context(n, i) for i, n in enumerate(NODES)}
    grid = InProcessGrid(contexts)
    flat = _initial_flat()
    arrays = ArrayRecord({"flat": Array(flat.numpy())})
    messages = strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid)
    replies = grid.send_and_receive(messages)
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    encs = [fq.Encoded.from_bytes(r.content["update"]["payload"]) for r in replies]
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    expected = flat + 0.5 * fq.decode_mean(encs, weights)
    got = torch.from_numpy(new_arrays["flat"].numpy().copy())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert {e.seed for e in encs} == {
        fq.random.derive_seed(strategy.round_seed, n) for n in NODES}
    assert strategy.round_stats["uplink_bytes"] == sum(e.nbytes for e in encs)
    # downlink: the serialized model array, once per sampled client
    assert strategy.round_stats["downlink_bytes"] == 2 * len(arrays["flat"].data)
    assert len(arrays["flat"].data) >= 4 * flat.numel()
    assert "train-loss" in metrics


class _Garbage:
    """A ClientApp stand-in that replies with random bytes as its payload."""

    def __call__(self, msg: Message, context: Context) -> Message:
        junk = np.random.default_rng(0).bytes(300)
        return Message(RecordDict({"update": ConfigRecord({"payload": junk}),
                                   "metrics": MetricRecord({"num-examples": 50})}),
                       reply_to=msg)


class _Raises:
    def __call__(self, msg: Message, context: Context) -> Message:
        raise RuntimeError("client crashed mid-round")


@pytest.mark.parametrize("bad_client", [_Garbage(), _Raises()], ids=["garbage", "raises"])
def test_a_bad_client_is_dropped_and_the_round_completes(bad_client, caplog):
    good, bad = NODES
    contexts = {good: _context(good, 0), bad: _context(bad, 1)}

    class MixedGrid(InProcessGrid):
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

    strategy, flat = _strategy(), _initial_flat()
    grid = MixedGrid(contexts)
    messages = strategy.configure_train(1, ArrayRecord({"flat": Array(flat.numpy())}),
                                        ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    new_arrays, _ = strategy.aggregate_train(1, replies)
    good_reply = next(r for r in replies if r.metadata.src_node_id == good)
    enc = fq.Encoded.from_bytes(good_reply.content["update"]["payload"])
    expected = flat + fq.decode(enc)
    torch.testing.assert_close(torch.from_numpy(new_arrays["flat"].numpy().copy()), expected,
                               atol=1e-6, rtol=0)
    stats = strategy.round_stats
    assert stats["accepted"] == 1 and stats["dropped"] + stats["failed"] == 1


def test_full_strategy_run_in_process_improves_accuracy():
    contexts = {n: _context(n, i) for i, n in enumerate(NODES)}
    task = fl_task.load_task("digits", 0)
    model = fl_task.make_model(task, "logreg")
    accuracy = {}

    def central(server_round, arrays):
        fl_task.set_flat(model, torch.from_numpy(arrays["flat"].numpy().copy()))
        accuracy[server_round] = fl_task.evaluate(task, model)[1]
        return MetricRecord({"accuracy": accuracy[server_round]})

    _strategy().start(InProcessGrid(contexts), ArrayRecord({"flat": Array(
        fl_task.get_flat(model).numpy())}), num_rounds=2, evaluate_fn=central)
    assert accuracy[2] > accuracy[0] + 0.2


def test_strategy_rejects_bad_settings_up_front():
    with pytest.raises(ValueError, match="unknown codec"):
        FedQuantAvg(codec="nope")
    with pytest.raises(ValueError, match="seed-policy"):
        FedQuantAvg(seed_policy="sometimes")
    with pytest.raises(ValueError, match="codec params"):
        FedQuantAvg(codec_params="bits")


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(max_size=400), weight=st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6)))
def test_aggregate_payloads_never_crashes_on_arbitrary_bytes(blob, weight):
    flat = torch.zeros(650)
    good = fq.get_codec("eden", bits=2).encode(torch.randn(650), seed=3).to_bytes()
    result = fl_task.aggregate_payloads(flat, [fl_task.Payload(1, good, 10.0, 3),
                                               fl_task.Payload(2, blob, weight)], "eden")
    assert 1 in result.accepted
    assert (2 in result.accepted) != (2 in result.rejected)
    assert torch.isfinite(result.global_flat).all()
    assert result.uplink_bytes == len(good) + len(blob)


def test_aggregate_payloads_checks_codec_size_and_seed():
    x = torch.randn(650)
    enc = fq.get_codec("eden", bits=2).encode(x, seed=9)
    p = [fl_task.Payload(1, enc.to_bytes(), 5.0, expected_seed=10),  # wrong seed
         fl_task.Payload(2, fq.get_codec("fp32").encode(x).to_bytes(), 5.0),  # other codec
         fl_task.Payload(3, fq.get_codec("eden").encode(x[:600]).to_bytes(), 5.0),  # size
         fl_task.Payload(4, enc.to_bytes(), -1.0)]  # bad weight
    result = fl_task.aggregate_payloads(torch.zeros(650), p, "eden")
    assert result.accepted == []
    assert set(result.rejected) == {1, 2, 3, 4}
    assert "seed" in result.rejected[1] and "codec" in result.rejected[2]
    assert "num-examples" in result.rejected[4]


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=40))
def test_parse_params_either_parses_or_names_the_bad_item(text):
    try:
        params = fl_task.parse_params(text)
    except ValueError as err:
        assert "codec params" in str(err)
    else:
        assert all(k and "=" not in k for k in params)


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
    """`fedquant fl` (in-process) calls the ClientApp's and the strategy's functions: one
    round through FedQuantAvg + ClientApp gives the same model as run_fl's round 1."""
    from fedquant.simulations import fl

    cfg = fl.validate({"model": "logreg", "rounds": 1, "num_clients": 2, "partitioning": "iid",
                       "codecs": [{"name": "eden", "params": {"bits": 2}}]})
    rows = fl.run_fl(cfg, tmp_path, progress=False)
    contexts = {i: _context(i, i, lr=cfg["lr"], partitioning="iid") for i in range(2)}
    task = fl_task.load_task("digits", 0)
    model = fl_task.make_model(task, "logreg", seed=cfg["seed"])
    seen = {}

    def central(server_round, arrays):
        fl_task.set_flat(model, torch.from_numpy(arrays["flat"].numpy().copy()))
        seen[server_round] = fl_task.evaluate(task, model)
        return MetricRecord({"accuracy": seen[server_round][1]})

    strategy = _strategy(run_seed=cfg["seed"])
    strategy.start(InProcessGrid(contexts), ArrayRecord({"flat": Array(
        fl_task.get_flat(model).numpy())}), num_rounds=1, evaluate_fn=central)
    assert strategy.round_stats["uplink_bytes"] == rows[1]["uplink_bytes"]
    assert seen[1][0] == pytest.approx(rows[1]["loss"], abs=1e-5)
    assert seen[1][1] == pytest.approx(rows[1]["accuracy"], abs=1e-9)

