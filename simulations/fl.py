"""`fedquant fl`: federated training with compressed updates, accuracy versus uplink bytes.

For each compressor in the config, ``num_clients`` clients train the model on their
partition (Dirichlet(alpha) label skew by default) for ``rounds`` rounds; each sends its
whole update as one ``fq.Encoded`` and the server averages with ``fq.decode_mean``. Rows
record accuracy and loss on the held-out split, uplink bytes (sum of ``len(payload)``),
their running total, downlink bytes and wall time per round (round 0 = the initial model).

The task is a module in the shape of Flower's quickstart ``task.py`` (``Net``,
``load_data``, ``train``, ``test``; :mod:`fedquant.fl.tasks`, docs/tasks.md): ``task`` names
a built-in one (``digits-mlp``, ``digits-cnn``, ``linreg``, ``synthetic``), a dotted module
path or a ``.py`` file; empty (the default) runs the built-in ``dataset`` task of the
``dataset`` and ``model`` keys. Its functions get the config's keys they name as keyword
arguments (``lr``, ``batch_size``, ``hidden``, ... and the ``task_args`` table).

Two engines run the same rounds:

* ``inprocess`` (default, seconds): calls the task module's ``Net``, ``load_data``,
  ``train`` and ``test`` and runs the protocol of :mod:`fedquant.fl` (the seeds,
  ``encode_update``, ``aggregate_payloads``) directly, without the Flower runtime. Downlink
  is counted as the raw fp32 model (4 bytes per value of the state) per sampled client.
* ``flower``: ``flwr run`` of the Flower app on Flower's simulation engine, one run per
  compressor (``scripts/local_deployment.py``); downlink is the serialized model array.

With ``final_ptq_bits`` > 0 (2..8), after the last round the final global model of each
compressor is quantized with ``fedquant.ptq`` (``final_ptq_method``: spfq, seed 004
Algorithm 1; gpfq; msq) on ``final_ptq_calib`` rows of the training pool, and the accuracy
before and after, the drop and the model's size in bytes (fp32 vs quantized) go to
final_ptq.csv, rows.json, report.md and the printed summary
(:meth:`fedquant.fl.tasks.BoundTask.quantize_final`, which the ServerApp calls too).

It writes rows.csv, rows.json, accuracy_vs_rounds.png, accuracy_vs_uplink.png and
report.md, and prints a summary table. ``run_fl`` is the function behind the command
(``fedquant compare`` calls it); ``load_config`` reads and validates the TOML config.

Example::

    fedquant fl --quick --out results/fl-quick
    fedquant fl --task path/to/task.py --quick
"""

from __future__ import annotations

import copy
import math
import time
import tomllib
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

import fedquant as fq
from fedquant.fl import datasets as local_datasets
from fedquant.fl import protocol
from fedquant.fl import task as fl_task
from fedquant.fl.arrays import flatten_arrays, split_keys, unflatten_arrays
from fedquant.fl.tasks import BoundTask, get_state, load_task_module, set_state
from fedquant.fl.tasks.bound import num_examples
from fedquant.simulations import evaluation, fl_report, network
from fedquant.simulations.common import one_thread

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "fl.toml"
DEFAULTS: dict[str, Any] = {
    "name": "fl", "task": "", "task_args": {}, "device": "cpu",
    "dataset": "digits", "model": "mlp", "hidden": 128, "num_clients": 10,
    "partitioning": "dirichlet", "alpha": 0.5, "rounds": 30, "fraction_train": 1.0,
    "local_epochs": 1, "batch_size": 32, "lr": 0.1, "server_lr": 1.0, "seed": 0,
    "rotations": "", "seed_policy": "per-client", "engine": "inprocess",
    "final_ptq_bits": 0, "final_ptq_method": "spfq", "final_ptq_calib": 256,
    "repeats": 1, "target_points": evaluation.TARGET_POINTS,
    "links": [{k: getattr(lk, k) for k in network.LINK_KEYS} for lk in network.DEFAULT_LINKS],
    "codecs": [{"label": "fp32", "name": "fp32"},
               {"label": "eden b=2", "name": "eden", "params": {"bits": 2}}],
}
ALLOWED_KEYS = sorted([*DEFAULTS, "quick"])
CODEC_KEYS = ("label", "codec", "name", "params", "error_feedback", "optional")
QUICK_KEYS = ("rounds", "num_clients", "codecs", "local_epochs", "repeats")
ENGINES = ("inprocess", "flower")
# a round row: fl_report.CSV_COLUMNS (rows.csv) and CLIENT_COLUMNS, the per-client lists
# for the network model (rows.json only): compute seconds (training + encoding) and
# len(payload) of each sampled client; None with engine = "flower"
CLIENT_COLUMNS = ("client_s", "client_bytes")
COLUMNS = (*fl_report.CSV_COLUMNS, *CLIENT_COLUMNS)


# ---- configuration --------------------------------------------------------------------
def _check(key: str, value: Any, kind: type | tuple, allowed: tuple | None = None) -> None:
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"config key '{key}' must be {kind}, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"config key '{key}' must be a {names}, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"config key '{key}' is {value!r}; allowed values: {list(allowed)}")


def _check_codec(i: int, entry: Any) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"config key 'codecs[{i}]' must be a table, got {entry!r}")
    unknown = set(entry) - set(CODEC_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in 'codecs[{i}]'; "
                         f"allowed: {list(CODEC_KEYS)}")
    if "codec" in entry:  # the codec spec "eden:bits=2", instead of name + params
        if {"name", "params"} & set(entry):
            raise ValueError(f"'codecs[{i}]' sets both 'codec' and 'name'/'params'; use one")
        name, params = fq.parse_codec_spec(str(entry["codec"]))
        entry = {k: v for k, v in entry.items() if k != "codec"} | {"name": name,
                                                                     "params": params}
    if not isinstance(entry.get("name"), str):
        raise ValueError(f"config key 'codecs[{i}].name' must be a codec name; "
                         f"available: {fq.available_codecs()}")
    entry = {"label": entry["name"], "params": {}, "error_feedback": False,
             "optional": False, **entry}
    _check(f"codecs[{i}].params", entry["params"], dict)
    _check(f"codecs[{i}].error_feedback", entry["error_feedback"], bool)
    _check(f"codecs[{i}].optional", entry["optional"], bool)
    if entry["name"] in fq.available_codecs():
        make_codec(entry["name"], entry["params"])  # ValueError names a bad param
    elif not entry["optional"]:
        raise ValueError(f"config key 'codecs[{i}].name' is {entry['name']!r}; available: "
                         f"{fq.available_codecs()} (or set optional = true)")
    return entry


def validate(config: dict) -> dict:
    """Fill defaults and check every key; ValueError names the key and the allowed values."""
    unknown = set(config) - set(ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; allowed: {ALLOWED_KEYS}")
    cfg = {**DEFAULTS, **config}
    for key in ("hidden", "num_clients", "rounds", "local_epochs", "batch_size", "seed",
                "repeats"):
        _check(key, cfg[key], int)
        if cfg[key] < (0 if key == "seed" else 1):
            raise ValueError(f"config key '{key}' must be >= 1, got {cfg[key]!r}")
    _check("task", cfg["task"], str)
    _check("task_args", cfg["task_args"], dict)
    _check("device", cfg["device"], str)
    if cfg["task"]:
        load_task_module(cfg["task"])  # ValueError names a missing file or function
    if cfg["engine"] == "flower" and cfg["task_args"]:
        raise ValueError("config key 'task_args' works with engine = 'inprocess'; with "
                         "engine = 'flower' a task's options are run-config keys "
                         "([tool.flwr.app.config] in pyproject.toml)")
    try:
        fl_task.check_ptq(cfg["final_ptq_bits"], cfg["final_ptq_method"],
                          cfg["final_ptq_calib"], None if cfg["task"] else cfg["model"],
                          sep="_")
    except ValueError as err:
        raise ValueError(f"config key {err}") from None
    for key in ("alpha", "lr", "server_lr", "fraction_train", "target_points"):
        _check(key, cfg[key], (int, float))
        if not (math.isfinite(cfg[key]) and cfg[key] > 0) or (
                key == "fraction_train" and cfg[key] > 1):
            raise ValueError(f"config key '{key}' must be a positive number"
                             f"{' <= 1' if key == 'fraction_train' else ''}, got {cfg[key]!r}")
    _check("name", cfg["name"], str)
    network.parse_links(cfg["links"], "config key 'links'")
    _check("dataset", cfg["dataset"], str)
    if cfg["dataset"] not in fl_task.DATASETS and not cfg["dataset"].startswith("hf:") and \
            not local_datasets.is_local(cfg["dataset"]):
        raise ValueError(f"config key 'dataset' is {cfg['dataset']!r}; allowed values: "
                         f"{list(fl_task.DATASETS)}, a local file or folder (.csv, .parquet, "
                         "save_to_disk folder, image folder) or 'hf:<name>'")
    _check("model", cfg["model"], str, fl_task.MODELS)
    _check("partitioning", cfg["partitioning"], str, fl_task.PARTITIONINGS)
    _check("seed_policy", cfg["seed_policy"], str, protocol.SEED_POLICIES)
    _check("engine", cfg["engine"], str, ENGINES)
    _check("rotations", cfg["rotations"], (str, int))
    if str(cfg["rotations"]) not in ("", "auto", "0", "1", "2", "3"):
        raise ValueError(f"config key 'rotations' is {cfg['rotations']!r}; allowed values: "
                         "['', 'auto', 0, 1, 2, 3]")
    _check("codecs", cfg["codecs"], list)
    cfg["codecs"] = [_check_codec(i, e) for i, e in enumerate(cfg["codecs"])]
    labels = [c["label"] for c in cfg["codecs"]]
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"config key 'codecs' needs distinct labels, got {labels}")
    quick = cfg.get("quick", {})
    _check("quick", quick, dict)
    bad = set(quick) - set(QUICK_KEYS)
    if bad:
        raise ValueError(f"unknown key(s) {sorted(bad)} in 'quick'; allowed: {list(QUICK_KEYS)}")
    for label in quick.get("codecs", []):
        if label not in labels:
            raise ValueError(f"config key 'quick.codecs' names {label!r}; allowed: {labels}")
    return cfg


def load_config(path: Path | str = DEFAULT_CONFIG) -> dict:
    """Read and validate a TOML config (see simulations/configs/fl.toml)."""
    with Path(path).open("rb") as f:
        return validate(tomllib.load(f))


def _apply_quick(cfg: dict) -> dict:
    quick = dict(cfg.get("quick", {}))
    labels = quick.pop("codecs", None)
    cfg = {**cfg, **quick}
    if labels is not None:
        cfg["codecs"] = [c for c in cfg["codecs"] if c["label"] in labels]
    return cfg


def make_codec(name: str, params: dict, rotations: str = "") -> fq.Codec:
    """The codec `name` with the TOML table `params` (values parsed by the codec's types);
    a non-empty `rotations` fills in the codec's ``rotations`` parameter where it has one
    and `params` does not set it."""
    klass = fq.codecs.codec_class(name)
    text = {k: fq.codecs.base._to_text(v) for k, v in params.items()}
    if rotations and "rotations" in klass._defaults() and "rotations" not in text:
        text["rotations"] = str(rotations)
    return klass.from_params(text)


# ---- the in-process engine ------------------------------------------------------------
def task_options(cfg: dict) -> dict:
    """The options a task module's functions may name (config keys, then ``task_args``)."""
    return {"dataset": cfg["dataset"], "model": cfg["model"], "hidden": cfg["hidden"],
            "partitioning": cfg["partitioning"], "alpha": float(cfg["alpha"]),
            "data_seed": cfg["seed"], "batch_size": cfg["batch_size"], "lr": float(cfg["lr"]),
            **cfg["task_args"]}


def bound_task(cfg: dict) -> BoundTask:
    """The config's task module with its options (the built-in ``dataset`` task when the
    config names none)."""
    return BoundTask(cfg["task"] or "dataset", task_options(cfg))


def _raw_mean(states: list[tuple[dict, float]], keys: list[str], like: dict) -> dict:
    """The arrays sent uncompressed (BatchNorm statistics, counters): the weighted mean of
    the floating ones, the first client's value of the others."""
    out = {}
    for k in keys:
        if np.issubdtype(like[k].dtype, np.floating):
            total = sum(w for _, w in states)
            out[k] = (sum(w * s[k].astype(np.float64) for s, w in states) / total
                      ).astype(like[k].dtype)
        else:
            out[k] = states[0][0][k]
    return out


def _run_codec_inprocess(cfg: dict, spec: dict, task: BoundTask, loaders: list,
                         testloader, advance):
    codec = make_codec(spec["name"], spec["params"], str(cfg["rotations"]))
    device = cfg["device"]
    net = task.net(seed=cfg["seed"])
    global_arrays = get_state(net)
    keys, raw_keys = split_keys(global_arrays)
    global_flat = flatten_arrays(global_arrays, keys)
    residuals: dict = {i: torch.zeros_like(global_flat) for i in range(len(loaders))}
    rng = np.random.default_rng(cfg["seed"])
    per_round = max(1, int(cfg["fraction_train"] * len(loaders)))
    model_bytes = 4 * sum(int(a.size) for a in global_arrays.values())
    loss, acc = task.test(net, testloader, device)
    base = {"label": spec["label"], "codec": spec["name"],
            "params": ",".join(f"{k}={v}" for k, v in spec["params"].items()),
            "seed": cfg["seed"], "numel": int(global_flat.numel()), "model_bytes": model_bytes}
    rows = [{**base, "round": 0, "accuracy": acc, "loss": loss, "uplink_bytes": 0,
             "cum_uplink_bytes": 0, "downlink_bytes": 0, "clients": 0, "dropped": 0,
             "wall_s": 0.0, "server_s": 0.0, "client_s": [], "client_bytes": []}]
    # untimed warm-up: the first training step (torch's lazy set-up), the first encode and
    # the first aggregation (compiled kernels) would otherwise be charged to round 1 of
    # whichever codec runs first
    task.train(copy.deepcopy(net), loaders[0], 1, device, 0)
    warm = protocol.codec_for_round(codec, protocol.round_seed(cfg["seed"], 0))
    protocol.aggregate_payloads(global_flat, [protocol.Payload(
        0, warm.encode(global_flat.clone(), seed=0).to_bytes(), 1.0, 0)], warm, 1.0)
    cum = 0
    for rnd in range(1, cfg["rounds"] + 1):
        start = time.perf_counter()
        round_seed = protocol.round_seed(cfg["seed"], rnd)
        round_codec = protocol.codec_for_round(codec, round_seed)
        sampled = sorted(rng.choice(len(loaders), per_round, replace=False).tolist())
        payloads, raw_states, client_s = [], {}, []
        for node in sampled:
            client_start = time.perf_counter()
            seed = protocol.client_seed(round_seed, node, cfg["seed_policy"])
            set_state(net, global_arrays)
            task.train(net, loaders[node], cfg["local_epochs"], device, seed)
            local = get_state(net)
            enc, residuals[node] = protocol.encode_update(
                flatten_arrays(local, keys) - global_flat, round_codec, seed,
                residuals[node] if spec["error_feedback"] else None)
            weight = num_examples(loaders[node])
            payloads.append(protocol.Payload(node, enc.to_bytes(), weight, seed))
            raw_states[node] = ({k: local[k] for k in raw_keys}, float(weight))
            client_s.append(time.perf_counter() - client_start)
        server_start = time.perf_counter()
        result = protocol.aggregate_payloads(global_flat, payloads, round_codec,
                                             float(cfg["server_lr"]))
        global_flat = result.global_flat
        accepted = [raw_states[n] for n in result.accepted]
        global_arrays = {**global_arrays, **unflatten_arrays(global_flat, global_arrays, keys),
                         **(_raw_mean(accepted, raw_keys, global_arrays) if accepted else {})}
        server_s = time.perf_counter() - server_start
        set_state(net, global_arrays)
        loss, acc = task.test(net, testloader, device)
        cum += result.uplink_bytes
        rows.append({**base, "round": rnd, "accuracy": acc, "loss": loss,
                     "uplink_bytes": result.uplink_bytes, "cum_uplink_bytes": cum,
                     "downlink_bytes": model_bytes * len(sampled),
                     "clients": len(result.accepted), "dropped": len(result.rejected),
                     "wall_s": time.perf_counter() - start, "server_s": server_s,
                     "client_s": client_s, "client_bytes": [len(p.data) for p in payloads]})
        advance()
    ptq = None
    if cfg["final_ptq_bits"]:
        ptq = {"label": spec["label"], **task.quantize_final(
            net, testloader, device, cfg["final_ptq_bits"], cfg["final_ptq_method"],
            cfg["final_ptq_calib"], cfg["seed"])}
    return rows, ptq


def _local_deployment():
    """scripts/local_deployment.py (not an installed package; loaded from the checkout)."""
    import importlib.util
    import sys

    if "scripts.local_deployment" in sys.modules:
        return sys.modules["scripts.local_deployment"]
    path = Path(__file__).resolve().parents[1] / "scripts" / "local_deployment.py"
    if not path.exists():
        raise RuntimeError(f"engine = 'flower' needs {path} (run from a fedquant checkout)")
    spec = importlib.util.spec_from_file_location("fedquant_local_deployment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _portable(task: str) -> str:
    """A task's .py path made absolute (the Flower processes run in other folders)."""
    if task.endswith(".py") or "/" in task:
        return str(Path(task).expanduser().resolve())
    return task


def _run_codec_flower(cfg: dict, spec: dict, out_dir: Path, advance):
    local_deployment = _local_deployment()

    run_config = {
        "num-server-rounds": cfg["rounds"], "task": _portable(cfg["task"]),
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "hidden": cfg["hidden"], "partitioning": cfg["partitioning"],
        "alpha": float(cfg["alpha"]), "seed": cfg["seed"], "data-seed": cfg["seed"],
        "local-epochs": cfg["local_epochs"], "batch-size": cfg["batch_size"],
        "lr": float(cfg["lr"]), "server-lr": float(cfg["server_lr"]),
        "fraction-train": float(cfg["fraction_train"]),
        "codec": fq.codec_spec(make_codec(spec["name"], spec["params"], str(cfg["rotations"]))),
        "seed-policy": cfg["seed_policy"],
        "error-feedback": spec["error_feedback"], "final-ptq-bits": cfg["final_ptq_bits"],
        "final-ptq-method": cfg["final_ptq_method"], "final-ptq-calib": cfg["final_ptq_calib"]}
    safe = "".join(ch if ch.isalnum() else "_" for ch in spec["label"]) + f"-seed{cfg['seed']}"
    raw = local_deployment.run_app(out_dir / "flower" / safe, run_config,
                                   num_supernodes=cfg["num_clients"], simulation=True)
    rows, cum, ptq = [], 0, None
    for r in raw:
        if "final_ptq" in r:  # the ServerApp's last line
            ptq = {"label": spec["label"], **r}
            continue
        cum += r["uplink_bytes"]
        rows.append({"label": spec["label"], "codec": spec["name"],
                     "params": ",".join(f"{k}={v}" for k, v in spec["params"].items()),
                     "round": r["round"],
                     "accuracy": r["accuracy"], "loss": r["loss"],
                     "uplink_bytes": r["uplink_bytes"], "cum_uplink_bytes": cum,
                     "downlink_bytes": r["downlink_bytes"], "clients": r["replied"],
                     "dropped": r["dropped"] + r["failed"], "wall_s": r["wall_s"],
                     "seed": cfg["seed"], "numel": None, "model_bytes": None,
                     "server_s": None, "client_s": None, "client_bytes": None})
    advance(cfg["rounds"])
    return rows, ptq


def run_fl(config: dict, out_dir: Path, quick: bool = False, progress: bool = True,
           ) -> list[dict]:
    """Train once per compressor in `config`; write results to `out_dir`; return the rows.

    Rows: label, codec, params, round (0 = initial model), accuracy, loss, uplink_bytes,
    cum_uplink_bytes, downlink_bytes, clients, dropped, wall_s.
    """
    return run_fl_with_ptq(config, out_dir, quick, progress)[0]


def run_fl_with_ptq(config: dict, out_dir: Path, quick: bool = False, progress: bool = True,
                    ) -> tuple[list[dict], list[dict]]:
    """:func:`run_fl`, also returning one final-PTQ result per compressor (fl_report.PTQ_COLUMNS;
    empty when final_ptq_bits is 0)."""
    from rich.progress import Progress

    cfg = validate({k: v for k, v in config.items()})
    if quick:
        cfg = _apply_quick(cfg)
    specs = [c for c in cfg["codecs"] if c["name"] in fq.available_codecs()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    ptqs: list[dict] = []
    with Progress(disable=not progress) as bar, one_thread():
        job = bar.add_task(f"fl {cfg['name']}",
                           total=len(specs) * cfg["rounds"] * cfg["repeats"])
        advance = lambda n=1: bar.advance(job, n)  # noqa: E731
        if cfg["final_ptq_bits"] and cfg["task"] and not fl_task.ptq_applies(
                bound_task(cfg).net(cfg["seed"])):
            warnings.warn(f"final PTQ skipped: the Net of task {cfg['task']!r} is not an "
                          "nn.Sequential of nn.Linear layers (set final_ptq_bits = 0)",
                          stacklevel=2)
            cfg = {**cfg, "final_ptq_bits": 0}
        for repeat in range(cfg["repeats"]):
            # seed, seed + 1, ...: the data split, initial model, client sample and codec
            # seeds all change with it; every codec runs on the same ones (paired by seed)
            run_cfg = {**cfg, "seed": cfg["seed"] + repeat,
                       "final_ptq_bits": cfg["final_ptq_bits"] if repeat == 0 else 0}
            if cfg["engine"] == "inprocess":
                task = bound_task(run_cfg)
                loaders = [task.load_data(i, cfg["num_clients"])[0]
                           for i in range(cfg["num_clients"])]
                testloader = task.central_testloader(cfg["num_clients"])
            for spec in specs:
                bar.update(job, description=f"fl {cfg['name']}: {spec['label']}, seed "
                                            f"{run_cfg['seed']}")
                if cfg["engine"] == "inprocess":
                    more, ptq = _run_codec_inprocess(run_cfg, spec, task, loaders, testloader,
                                                     advance)
                else:
                    more, ptq = _run_codec_flower(run_cfg, spec, out_dir, advance)
                rows += more
                ptqs += [ptq] if ptq is not None else []
    fl_report.write_results(cfg, rows, out_dir, quick, ptqs)
    return rows, ptqs


def register(app: typer.Typer) -> None:
    @app.command("fl")
    def fl_command(
        config: Annotated[Path, typer.Option(help="TOML config")] = DEFAULT_CONFIG,
        out: Annotated[Path | None, typer.Option(help="output folder")] = None,
        quick: Annotated[bool, typer.Option(help="a few rounds and clients")] = False,
        task: Annotated[str | None, typer.Option(
            help="task module: built-in name (digits-mlp, digits-cnn, linreg, synthetic), "
                 "dotted module path or .py file (Net, load_data, train, test)")] = None,
        engine: Annotated[str | None, typer.Option(
            help="inprocess (fl_task functions, no Flower runtime) or flower (flwr run, "
                 "Flower's simulation engine)")] = None,
    ) -> None:
        """Federated training with compressed updates: accuracy vs rounds and uplink MB."""
        try:
            cfg = load_config(config)
            if engine is not None:
                cfg = validate({**cfg, "engine": engine})
            if task is not None:
                cfg = validate({**cfg, "task": task})
        except (ValueError, OSError, tomllib.TOMLDecodeError) as err:
            raise typer.BadParameter(str(err)) from err
        out_dir = out or Path("results") / (cfg["name"] + ("-quick" if quick else ""))
        rows, ptqs = run_fl_with_ptq(cfg, out_dir, quick=quick)
        fl_report.print_summary(cfg, rows, ptqs)
        typer.echo(f"wrote {out_dir}/rows.csv, rows.json, report.md and plots")
