"""The Flower ``ServerApp`` and :class:`FedQuantAvg`, FedAvg over fedquant-compressed updates.

FedAvg (McMahan et al., https://arxiv.org/abs/1602.05629) where each client sends its model
update (delta) as one ``fq.Encoded`` (EDEN/DRIVE: seed 003 section 4; or any registered
codec) and the server averages them with ``fq.decode_mean`` weighted by examples, then
applies global += server_lr * mean. The aggregation itself is
:func:`simulations.fl_task.aggregate_payloads`, shared with the in-process runner.

Per round the ServerApp evaluates the global model centrally on the held-out split and
appends one JSON line to ``metrics-path``: round, loss, accuracy, uplink_bytes (sum of
payload sizes as received), downlink_bytes, clients sent/replied/failed/dropped, wall_s.

With ``final-ptq-bits`` > 0 (2..8) the server then quantizes the final global model with
``fedquant.ptq`` (SPFQ, seed 004 Algorithm 1; or ``final-ptq-method`` gpfq / msq) on
``final-ptq-calib`` rows of the training pool, and appends one last JSON line (key
``final_ptq``): accuracy before and after, the drop, fp32_bytes and ptq_bytes
(:func:`simulations.fl_task.quantize_final`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from fedquant.simulations import fl_task
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

UPDATE_KEY, PAYLOAD_KEY = "update", "payload"  # as the ClientApp replies


class FedQuantAvg(FedAvg):
    """FedAvg whose clients send compressed deltas, decoded with ``fq.decode_mean``.

    Parameters
    ----------
    codec : str (default: "eden")
        Registry name of the codec the clients use (``fq.available_codecs()``).
    codec_params : str (default: "bits=2")
        The codec's parameters as text, e.g. "bits=2,scale=unbiased".
    rotations : str (default: "")
        Composed RHTs (0-3 or "auto") for codecs that take a ``rotations`` parameter;
        "" keeps each codec's own default.
    seed_policy : str (default: "per-client")
        "per-client": seed = fq.random.derive_seed(round_seed, node_id); "shared": all
        clients use the round seed (one shared rotation).
    error_feedback : bool (default: False)
        Ask clients to keep and re-send their compression residual.
    server_learning_rate : float (default: 1.0)
        global += server_learning_rate * decoded weighted mean delta.
    run_seed : int (default: 0)
        Seed from which every round seed is derived.
    final_ptq_bits : int (default: 0)
        0: off; 2..8: :meth:`quantize_final` quantizes the final model to this many bits.
    final_ptq_method : str (default: "spfq")
        "spfq", "gpfq" or "msq" (``fedquant.ptq``).
    final_ptq_calib : int (default: 256)
        Calibration batch size (rows of the training pool, never of the test split).
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (fraction_train, min_train_nodes,
        min_available_nodes, ...).
    """

    def __init__(self, codec: str = "eden", codec_params: str = "bits=2",
                 rotations: str = "", seed_policy: str = "per-client",
                 error_feedback: bool = False, server_learning_rate: float = 1.0,
                 run_seed: int = 0, final_ptq_bits: int = 0, final_ptq_method: str = "spfq",
                 final_ptq_calib: int = 256, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        fl_task.make_codec(codec, codec_params, rotations)  # ValueError now, not in round 1
        fl_task.client_seed(0, 0, seed_policy)
        fl_task.check_ptq(final_ptq_bits, final_ptq_method, final_ptq_calib)
        self.final_ptq = (final_ptq_bits, final_ptq_method, final_ptq_calib)
        self.codec, self.codec_params, self.rotations = codec, codec_params, rotations
        self.seed_policy, self.error_feedback = seed_policy, bool(error_feedback)
        self.server_learning_rate, self.run_seed = float(server_learning_rate), int(run_seed)
        self.current_arrays: ArrayRecord | None = None
        self.round_seed: int | None = None
        self.round_stats: dict = {}

    def summary(self) -> None:
        log(INFO, "\t├──> FedQuantAvg: codec %s(%s), rotations %s, seeds %s, error feedback "
            "%s, server lr %s", self.codec, self.codec_params, self.rotations,
            self.seed_policy, self.error_feedback, self.server_learning_rate)
        super().summary()

    def quantize_final(self, task: fl_task.Task, model: torch.nn.Module,
                       arrays: ArrayRecord) -> dict | None:
        """The final step: PTQ of the global model `arrays` (None when final-ptq-bits is 0).

        `model` (the task's architecture) is loaded with the arrays; the result is
        :func:`simulations.fl_task.quantize_final`'s, seeded by the run seed.
        """
        bits, method, calib = self.final_ptq
        if not bits:
            return None
        flat = torch.from_numpy(np.ascontiguousarray(arrays["flat"].numpy(), dtype=np.float32))
        result = fl_task.quantize_final(task, model, flat, bits, method, calib, self.run_seed)
        log(INFO, "final PTQ (%s, %d bits): accuracy %.4f -> %.4f, %d -> %d bytes", method,
            bits, result["accuracy_before"], result["accuracy_after"], result["fp32_bytes"],
            result["ptq_bytes"])
        return result

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling, plus the round seed and codec settings in the config."""
        self.current_arrays = arrays
        self.round_seed = fl_task.round_seed(self.run_seed, server_round)
        config["round-seed"] = str(self.round_seed)  # uint64 does not fit a sint64 field
        config["codec"], config["codec-params"] = self.codec, self.codec_params
        config["rotations"], config["seed-policy"] = self.rotations, self.seed_policy
        config["error-feedback"] = self.error_feedback
        messages = list(super().configure_train(server_round, arrays, config, grid))
        model_bytes = sum(len(a.data) for a in arrays.values())
        self.round_stats = {"round": server_round, "started": time.perf_counter(),
                            "sent": [m.metadata.dst_node_id for m in messages],
                            "downlink_bytes": model_bytes * len(messages)}
        return messages

    def _payload(self, msg: Message) -> fl_task.Payload:
        node = msg.metadata.src_node_id
        content = msg.content
        data = content.config_records[UPDATE_KEY][PAYLOAD_KEY]
        weight = next(iter(content.metric_records.values()))[self.weighted_by_key]
        expected = fl_task.client_seed(self.round_seed, node, self.seed_policy)
        return fl_task.Payload(node, data, weight, expected)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """fq.decode_mean of the payloads weighted by num-examples; bad replies dropped."""
        if self.current_arrays is None or self.round_seed is None:
            raise RuntimeError("FedQuantAvg has no global model for this round. Ensure that "
                               "`configure_train` has been called before aggregation.")
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        payloads, dropped = [], {}
        for msg in valid:
            try:
                payloads.append(self._payload(msg))
            except (KeyError, StopIteration, TypeError, ValueError) as err:
                dropped[msg.metadata.src_node_id] = f"reply lacks a payload or weight ({err!r})"
        global_flat = torch.from_numpy(
            np.ascontiguousarray(self.current_arrays["flat"].numpy(), dtype=np.float32))
        result = fl_task.aggregate_payloads(global_flat, payloads, self.codec,
                                            self.server_learning_rate)
        dropped.update(result.rejected)
        for node, reason in dropped.items():
            log(WARNING, "aggregate_train: dropped the reply of node %d: %s", node, reason)
        accepted = set(result.accepted)
        self.round_stats.update(
            replied=len(replies) - len(errors), failed=len(errors), dropped=len(dropped),
            missing=len(set(self.round_stats.get("sent", [])) -
                        {m.metadata.src_node_id for m in replies}),
            accepted=len(accepted), uplink_bytes=result.uplink_bytes)
        if not accepted:
            return None, None
        kept = [m.content for m in valid if m.metadata.src_node_id in accepted]
        metrics = self.train_metrics_aggr_fn(kept, self.weighted_by_key)
        arrays = ArrayRecord({"flat": Array(result.global_flat.numpy())})
        self.current_arrays = arrays
        return arrays, metrics


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
    task = fl_task.load_task(str(rc.get("dataset", "digits")), int(rc.get("data-seed", 0)))
    model = fl_task.make_model(task, str(rc.get("model", "mlp")), int(rc.get("hidden", 128)),
                               seed=int(rc.get("seed", 0)))
    min_nodes = int(rc.get("min-nodes", 2))
    strategy = FedQuantAvg(
        codec=str(rc.get("codec", "eden")), codec_params=str(rc.get("codec-params", "bits=2")),
        rotations=str(rc.get("rotations", "")),
        seed_policy=str(rc.get("seed-policy", "per-client")),
        error_feedback=bool(rc.get("error-feedback", False)),
        server_learning_rate=float(rc.get("server-lr", 1.0)), run_seed=int(rc.get("seed", 0)),
        final_ptq_bits=int(rc.get("final-ptq-bits", 0)),
        final_ptq_method=str(rc.get("final-ptq-method", "spfq")),
        final_ptq_calib=int(rc.get("final-ptq-calib", 256)),
        fraction_train=float(rc.get("fraction-train", 1.0)), fraction_evaluate=0.0,
        min_train_nodes=min_nodes, min_available_nodes=min_nodes)
    fl_task.check_ptq(*strategy.final_ptq, model=str(rc.get("model", "mlp")))  # before round 1
    out = _metrics_path(context)
    out.write_text("")
    run_start = time.perf_counter()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        fl_task.set_flat(model, torch.from_numpy(arrays["flat"].numpy().copy()))
        loss, accuracy = fl_task.evaluate(task, model)
        stats = strategy.round_stats if server_round > 0 else {}
        row = {"codec": strategy.codec, "params": strategy.codec_params, "round": server_round,
               "loss": loss, "accuracy": accuracy,
               "uplink_bytes": stats.get("uplink_bytes", 0),
               "downlink_bytes": stats.get("downlink_bytes", 0),
               **{k: stats.get(k, 0) for k in ("replied", "failed", "dropped", "missing")},
               "wall_s": time.perf_counter() - stats.get("started", run_start)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    initial = ArrayRecord({"flat": Array(fl_task.get_flat(model).numpy())})
    result = strategy.start(grid=grid, initial_arrays=initial,
                            num_rounds=int(rc.get("num-server-rounds", 3)),
                            timeout=float(rc.get("round-timeout", 600.0)),
                            train_config=ConfigRecord({
                                "local-epochs": int(rc.get("local-epochs", 1)),
                                "batch-size": int(rc.get("batch-size", 32)),
                                "lr": float(rc.get("lr", 0.1))}),
                            evaluate_fn=central_evaluate)
    ptq = strategy.quantize_final(task, model, result.arrays)
    if ptq is not None:
        with out.open("a") as f:
            f.write(json.dumps(ptq) + "\n")
