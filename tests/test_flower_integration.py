"""fedquant.flower in an ordinary Flower app: compression_mod + CompressedStrategy.

The app is simulations/examples/flower_app (a CNN with BatchNorm on digits,
``ArrayRecord(model.state_dict())``, Flower's FedAvg / FedAdam). In-process tests drive its
real ClientApp through Flower's Grid interface; the acceptance test runs the app, plain and
compressed, on Flower's simulation engine with real processes.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import arrays_size_mod, message_size_mod
from flwr.serverapp.strategy import FedAdam, FedAvg, FedTrimmedAvg
from test_flower_apps import InProcessGrid, _server_identity  # noqa: F401

import fedquant as fq
from fedquant.flower import PAYLOAD_KEY, CompressedStrategy, compression_mod
from fedquant.robust import NormPolicy

APP_DIR = Path(__file__).resolve().parents[1] / "simulations" / "examples" / "flower_app"
sys.path.insert(0, str(APP_DIR))
from digitsapp import client_app, client_app_fedquant, task  # noqa: E402

NODES = (3, 2**63 + 9, 17)


def _contexts(n: int = 2) -> dict[int, Context]:
    return {node: Context(run_id=1, node_id=node, state=RecordDict(),
                          node_config={"partition-id": i, "num-partitions": n},
                          run_config={"local-epochs": 1})
            for i, node in enumerate(NODES[:n])}


def _global() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(task.Net().state_dict())


class _Grid(InProcessGrid):
    """Delivers to the example ClientApp; keeps the raw replies' payload sizes."""

    def __init__(self, contexts, app=client_app_fedquant.app, tamper=None):
        super().__init__(contexts, app)
        self.tamper = tamper  # (node, reply) -> reply, a misbehaving client

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for reply in super().send_and_receive(messages, timeout=timeout):
            if self.tamper is not None and not reply.has_error():
                reply = self.tamper(reply.metadata.src_node_id, reply)
            replies.append(reply)
        return replies


def _round(strategy, grid, arrays=None):
    arrays = arrays or _global()
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    return arrays, strategy.aggregate_train(1, grid.send_and_receive(messages))


def test_replies_decode_to_the_original_keys_shapes_and_dtypes():
    seen = {}

    def keep(node, reply):  # what the client sent: payload + raw arrays only
        seen[node] = {k: (a.dtype, tuple(a.shape)) for k, a in reply.content["arrays"].items()}
        return reply

    class SeeReplies(FedAvg):
        def aggregate_train(self, server_round, replies):
            self.seen = [m.content["arrays"] for m in replies]
            return super().aggregate_train(server_round, self.seen and replies)

    inner = SeeReplies(fraction_evaluate=0.0)
    strategy = CompressedStrategy(inner, codec="eden:bits=2")
    arrays, (new, metrics) = _round(strategy, _Grid(_contexts(), tamper=keep))
    assert list(new.keys()) == list(arrays.keys())
    for record in inner.seen:  # the inner strategy sees ordinary ArrayRecords
        assert list(record.keys()) == list(arrays.keys())
        for key, ref in arrays.items():
            assert (record[key].dtype, tuple(record[key].shape)) == (ref.dtype,
                                                                   tuple(ref.shape)), key
    sent = seen[NODES[0]]
    assert PAYLOAD_KEY in sent and "features.0.weight" not in sent  # conv weights compressed
    assert {k for k in sent if k != PAYLOAD_KEY} == {
        k for k in arrays.keys() if "running" in k or "num_batches" in k}  # BN stats raw
    # running_var travels raw: it stays positive whatever the codec does
    for key in (k for k in new.keys() if k.endswith("running_var")):
        assert (new[key].numpy() > 0).all()
    assert int(new["features.1.num_batches_tracked"].numpy()) > 0  # averaged by FedAvg
    assert metrics["fedquant-dropped"] == 0
    fp32 = sum(4 * a.numpy().size for a in arrays.values())
    assert 12 * metrics["fedquant-uplink-bytes"] < 2 * fp32  # two clients, >12x smaller


def test_the_mean_is_the_uncompressed_mean_up_to_the_codec_error():
    arrays = _global()
    plain_grid = _Grid(_contexts(), app=client_app.app)
    plain, _ = FedAvg(fraction_evaluate=0.0).aggregate_train(
        1, plain_grid.send_and_receive(FedAvg(fraction_evaluate=0.0).configure_train(
            1, arrays, ConfigRecord(), plain_grid)))
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), codec="eden:bits=4")
    _, (new, _) = _round(strategy, _Grid(_contexts()), arrays)
    key = "head.1.weight"
    delta_plain = plain[key].numpy() - arrays[key].numpy()
    delta_comp = new[key].numpy() - arrays[key].numpy()
    err = np.linalg.norm(delta_comp - delta_plain) ** 2 / np.linalg.norm(delta_plain) ** 2
    assert 0 < err < 0.05  # EDEN b=4: vNMSE about 0.0096 per client, halved by 2 clients


@pytest.mark.parametrize("inner", [FedAdam(fraction_evaluate=0.0, eta=0.1, tau=0.01),
                                   FedTrimmedAvg(fraction_evaluate=0.0, beta=0.0)],
                         ids=["FedAdam", "FedTrimmedAvg"])
def test_any_strategy_can_be_wrapped(inner):
    arrays, (new, metrics) = _round(CompressedStrategy(inner, codec="eden:bits=2"),
                                    _Grid(_contexts()))
    assert list(new.keys()) == list(arrays.keys())
    moved = sum(float(np.abs(new[k].numpy() - arrays[k].numpy()).sum()) for k in arrays.keys()
                if np.issubdtype(arrays[k].numpy().dtype, np.floating))
    assert math.isfinite(moved) and moved > 0 and metrics["fedquant-dropped"] == 0


def _replace_payload(blob: bytes):
    def tamper(node, reply):
        if node == NODES[1]:
            reply.content["arrays"][PAYLOAD_KEY] = Array(
                dtype="uint8", shape=(len(blob),), stype="fedquant.v1.EncodedUpdate", data=blob)
        return reply
    return tamper


@pytest.mark.parametrize("attack", ["other-bits", "garbage", "scaled-1e30"])
def test_one_bad_client_is_dropped_and_the_round_completes_for_the_others(attack):
    arrays = _global()
    numel = sum(a.numpy().size for k, a in arrays.items() if "running" not in k
                and "num_batches" not in k)
    seed = fq.random.derive_seed(
        __import__("fedquant.fl", fromlist=["round_seed"]).round_seed(0, 1), NODES[1])
    if attack == "other-bits":  # a valid eden b=3 payload in a b=2 round
        blob = fq.get_codec("eden", bits=3).encode(torch.randn(numel), seed=seed).to_bytes()
    elif attack == "garbage":
        blob = np.random.default_rng(1).bytes(500)
    else:  # a valid payload of a huge (finite) update
        blob = fq.get_codec("eden", bits=2).encode(1e30 * torch.randn(numel),
                                                     seed=seed).to_bytes()
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), codec="eden:bits=2",
                                  norm_policy=NormPolicy(median_multiple=5.0))
    _, (new, metrics) = _round(strategy, _Grid(_contexts(3), tamper=_replace_payload(blob)),
                               arrays)
    dropped = strategy.round_stats[1]["dropped"]
    assert list(dropped) == [NODES[1]] and metrics["fedquant-dropped"] == 1
    assert strategy.round_stats[1]["accepted"] == 2
    for key in arrays.keys():
        value = new[key].numpy()
        assert np.isfinite(value).all() and np.abs(value).max() < 100, key


def test_mod_without_the_wrapper_is_an_error_that_names_it():
    grid = _Grid(_contexts(1))
    messages = FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1
                      ).configure_train(1, _global(), ConfigRecord(), grid)
    (reply,) = grid.send_and_receive(messages)
    assert reply.has_error() and "CompressedStrategy" in reply.error.reason


def test_works_with_flowers_size_mods_and_no_empty_config_strings():
    app = ClientApp(mods=[message_size_mod, arrays_size_mod, compression_mod])
    app.train()(client_app_fedquant.train_fn)
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), codec="eden:bits=2",
                                  raw_patterns=())
    grid = _Grid(_contexts(), app=app)
    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), grid))
    config = messages[0].content["config"]
    assert all(v != "" for v in config.values())
    new, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert new is not None and metrics["fedquant-dropped"] == 0


def test_error_feedback_keeps_the_residual_per_node():
    contexts = _contexts()
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), codec="sign",
                                  error_feedback=True)
    _round(strategy, _Grid(contexts))
    for ctx in contexts.values():
        residual = ctx.state["fedquant.residual"]["residual"].numpy()
        assert residual.shape[0] > 1000 and np.isfinite(residual).all()
        assert np.abs(residual).sum() > 0


# ---- acceptance: the example app, plain and compressed, on Flower's simulation engine ----
def _changed_lines(a: Path, b: Path) -> int:
    diff = difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), n=0)
    return sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def test_adding_fedquant_to_the_app_changes_at_most_four_lines():
    app = APP_DIR / "digitsapp"
    added = (_changed_lines(app / "client_app.py", app / "client_app_fedquant.py")
             + _changed_lines(app / "server_app.py", app / "server_app_fedquant.py"))
    # a changed line counts once as removed and once as added: 1 changed + 3 added = 5
    assert added <= 5


@pytest.mark.timeout(600)
def test_the_example_app_on_the_simulation_engine_plain_and_compressed(tmp_path):
    from scripts import local_deployment as dep

    results = {}
    with dep.flower_processes(tmp_path, simulation=True) as (link, _):
        for strategy in ("fedavg", "fedadam"):
            for variant in ("plain", "fedquant"):
                app = tmp_path / f"app-{strategy}-{variant}"
                shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
                if variant == "plain":
                    pyproject = app / "pyproject.toml"
                    pyproject.write_text(pyproject.read_text().replace("_fedquant:app", ":app"))
                metrics = tmp_path / f"{strategy}-{variant}.jsonl"
                proc = dep.flwr_run(tmp_path, link, {"strategy": strategy,
                                                     "metrics-path": str(metrics)},
                                    simulation=True, app_dir=app, num_supernodes=2,
                                    timeout=300)
                assert proc.returncode == 0, (tmp_path / "logs" / "flwr_run.log").read_text()
                rows = dep.read_metrics(metrics)
                for _ in range(120):  # the stream may end before the file is complete
                    if len(rows) == 5:
                        break
                    __import__("time").sleep(0.5)
                    rows = dep.read_metrics(metrics)
                results[strategy, variant] = rows
    (tmp_path / "results.json").write_text(json.dumps({f"{k[0]}-{k[1]}": v
                                                       for k, v in results.items()}))
    numel = sum(p.numel() for p in task.Net().state_dict().values())
    for strategy in ("fedavg", "fedadam"):
        plain, comp = results[strategy, "plain"], results[strategy, "fedquant"]
        assert [r["round"] for r in comp[:4]] == [0, 1, 2, 3]
        assert all(math.isfinite(r["loss"]) for r in comp[:4] + plain[:4])
        assert comp[3]["accuracy"] > comp[0]["accuracy"] + 0.3  # it learned, compressed
        uplink = [m["fedquant-uplink-bytes"] for m in comp[4]["train_metrics"].values()]
        assert len(uplink) == 3 and all(12 * b <= 2 * 4 * numel for b in uplink)
        # Within 2 points of the uncompressed app at round 3. The compressed run's codec
        # seeds follow the simulation's random node ids; over 20-28 in-process draws of node
        # ids the difference stayed within [-0.56, +0.56] points (FedAvg, 98.6%) and
        # [-0.56, +1.11] (FedAdam eta 0.2, tau 0.02, 97.5%), 4 local epochs.
        assert plain[3]["accuracy"] > 0.95, (strategy, plain)  # both converge in 3 rounds
        assert abs(plain[3]["accuracy"] - comp[3]["accuracy"]) <= 0.02, (strategy, plain, comp)


def test_correlated_quantization_gives_each_sampled_client_its_stratum():
    """Suresh et al.'s correlated quantization through the wrapper: n sampled clients share
    the round seed and take the strata 0..n-1; the round's mean is their decode_mean."""
    sent = {}

    def keep(node, reply):
        sent[node] = bytes(reply.content["arrays"][PAYLOAD_KEY].data)
        return reply

    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), codec="correlated:bits=2")
    assert strategy.seed_policy == "shared"
    arrays, (new, metrics) = _round(strategy, _Grid(_contexts(3), tamper=keep))
    assert metrics["fedquant-dropped"] == 0 and len(sent) == 3
    encs = [fq.Encoded.from_bytes(b) for b in sent.values()]
    assert {e.params["clients"] for e in encs} == {"3"} and len({e.seed for e in encs}) == 1
    codec = fq.codecs.codec_for(encs[0])
    assert sorted(codec.client_of(e) for e in encs) == [0, 1, 2]  # distinct strata
    for key in arrays.keys():
        assert np.isfinite(new[key].numpy()).all()
    # a client that claims another client's stratum is dropped; the others make the round
    first = next(iter(sent))

    def swap(node, reply):  # encode with a stratum other than the one this node was given
        if node != first:
            return reply
        other = (strategy._strata[node] + 1) % 3
        enc = fq.get_codec(fq.codec_spec(codec), client=other).encode(
            torch.zeros(encs[0].numel), seed=encs[0].seed)
        blob = enc.to_bytes()
        reply.content["arrays"][PAYLOAD_KEY] = Array(
            dtype="uint8", shape=(len(blob),), stype="fedquant.v1.EncodedUpdate", data=blob)
        return reply

    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), codec="correlated:bits=2")
    _, (_, metrics) = _round(strategy, _Grid(_contexts(3), tamper=swap))
    assert metrics["fedquant-dropped"] == 1
    assert "stratum" in strategy.round_stats[1]["dropped"][first]
