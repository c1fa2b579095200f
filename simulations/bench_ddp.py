"""`fedquant bench-ddp`: fedquant's DDP hook against torch's allreduce and PowerSGD hooks.

`world_size` gloo processes on the CPU train the same MLP (64-256-256-10, 85k parameters) on
scikit-learn's digits, each rank on its own half of the training set, with SGD (momentum
0.9) on minibatches drawn from a seeded generator, once per method:

* ``none``: DDP without a hook (its built-in allreduce);
* ``allreduce_hook``: torch's ``default_hooks.allreduce_hook``;
* ``powerSGD r=k``: torch's ``powerSGD_hook`` with ``PowerSGDState(matrix_approximation_rank
  =k, start_powerSGD_iter=start_iter)`` (error feedback and warm start on, its defaults);
* each codec spec: ``fedquant.ddp.codec_hook`` with ``CodecState(codec,
  start_iter=start_iter)`` (error feedback on unless ``--no-error-feedback``).

Every method starts from the same initialization and sees the same minibatches. Reported
per method, as medians over `repeats` training seeds: bytes per step per rank after the
warm-up; ``grad NMSE``, sum ||applied - exact||^2 / sum ||exact||^2 over the compressed
steps, where `exact` is the true mean of the ranks' gradients (an extra allreduce, in a second,
untimed run of the same training; with error feedback `applied` also carries the previous
residual); the training loss over the whole training set and the test accuracy after
`steps` steps; the median ms per step (rank 0, forward + backward + hook + optimizer, one
thread per rank); and whether the replicas ended bit-identical.

Bytes are what one rank hands to the collectives in one step: for allreduce the bucket,
4 * numel (a ring allreduce then transmits 2 (n - 1) / n times that per rank: exactly that
at n = 2); for PowerSGD 4 bytes per element it allreduces, from its own counter
``total_numel_after_compression`` (P and Q factors plus the uncompressed 1-D tensors); for
fedquant ``payload`` is ``len(enc.to_bytes())`` (``CodecState.bytes_sent``) and ``wire``
adds the padding to the longest rank's payload and the 8-byte length of the all-gather
(``CodecState.wire_bytes``; an all-gather transmits (n - 1) times it per rank).

    fedquant bench-ddp --steps 300
    fedquant bench-ddp --no-error-feedback --lr 0.3 --codec eden:bits=1 --powersgd-rank 1
"""

from __future__ import annotations

import datetime
import gc
import pathlib
import statistics
import tempfile
import time
from typing import Annotated, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

import fedquant as fq
from fedquant.ddp import CodecState, codec_hook
from fedquant.simulations.common import write_csv, write_json
from fedquant.simulations.digits_mlp import load_digits_data, make_mlp

DEFAULTS: dict[str, Any] = {
    "steps": 300, "world_size": 2, "codecs": ["eden:bits=1", "eden:bits=2", "quic-fl:bits=2"],
    "powersgd_ranks": [1, 4], "error_feedback": True, "start_iter": 2, "batch": 32,
    "lr": 0.05, "hidden": [256, 256], "seed": 0, "repeats": 3, "timeout_s": 1800,
}
QUICK_STEPS = 40
COLUMNS = ["method", "payload_bytes", "wire_bytes", "x_smaller", "bits_per_coord",
           "grad_nmse", "train_loss", "train_loss_min", "train_loss_max", "test_acc", "ms_per_step",
           "replicas_equal"]
# the printed table's short headers
SHORT = {"method": "method", "payload_bytes": "B/step", "wire_bytes": "wire B/step",
         "x_smaller": "x smaller", "bits_per_coord": "bits/coord", "grad_nmse": "grad NMSE",
         "train_loss": "loss", "test_acc": "test acc", "ms_per_step": "ms/step",
         "replicas_equal": "replicas equal"}


def methods(cfg: dict) -> list[str]:
    """The methods one run compares, in table order."""
    return (["none", "allreduce_hook"] + [f"powerSGD r={r}" for r in cfg["powersgd_ranks"]]
            + list(cfg["codecs"]))


def validate(cfg: dict) -> dict:
    """ValueError naming a bad setting (codec specs are parsed here, before any process)."""
    for key in ("steps", "world_size", "start_iter", "batch", "repeats"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "start_iter" else 1):
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    if not 2 <= cfg["world_size"] <= 8:
        raise ValueError(f"world_size must be in 2..8, got {cfg['world_size']}")
    if cfg["start_iter"] < 2 or cfg["steps"] <= cfg["start_iter"] + 1:
        raise ValueError(f"need 2 <= start_iter < steps - 1 (PowerSGD and error feedback "
                         f"start at step 2 at the earliest), got start_iter="
                         f"{cfg['start_iter']}, steps={cfg['steps']}")
    if not 0 < cfg["lr"] <= 10:
        raise ValueError(f"lr must be in (0, 10], got {cfg['lr']!r}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1
           for r in cfg["powersgd_ranks"]):
        raise ValueError(f"powersgd ranks must be positive integers, got {cfg['powersgd_ranks']}")
    for spec in cfg["codecs"]:
        fq.get_codec(spec)  # ValueError naming the codec or parameter
    return cfg


# ---- one rank -----------------------------------------------------------------------------
def _hook(method: str, cfg: dict) -> tuple[Any, Any]:
    """(state, hook) of a method; (None, None) for DDP's built-in allreduce."""
    if method == "none":
        return None, None
    if method == "allreduce_hook":
        return None, default_hooks.allreduce_hook
    if method.startswith("powerSGD r="):
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(method.split("=")[1]),
            start_powerSGD_iter=cfg["start_iter"], random_seed=cfg["seed"])
        return state, powerSGD_hook.powerSGD_hook
    state = CodecState(fq.get_codec(method), error_feedback=cfg["error_feedback"],
                       start_iter=cfg["start_iter"], seed=cfg["seed"])
    return state, codec_hook


def _measured(hook: Any, world: int, log: dict[str, float]) -> Any:
    """`hook`, plus the exact mean of the ranks' buckets by an extra allreduce: adds the
    squared error of the hook's output and the squared norm of the exact mean to `log`."""
    def measured_hook(state, bucket):  # unannotated: DDP checks annotations as objects
        exact = bucket.buffer().clone()  # before the hook: PowerSGD adds its error in place
        dist.all_reduce(exact)
        exact /= world
        out = hook(state, bucket).wait()
        log["err"] += float((out - exact).double().pow(2).sum())
        log["norm"] += float(exact.double().pow(2).sum())
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(out)
        return fut
    return measured_hook


def _bytes_per_step(state: Any, numel: int, cfg: dict) -> tuple[float, float]:
    """(payload, wire) bytes per compressed step of one rank (see the module docstring)."""
    compressed = cfg["steps"] - cfg["start_iter"]
    warmup = 4 * numel * cfg["start_iter"]
    if state is None:
        return 4.0 * numel, 4.0 * numel
    if isinstance(state, CodecState):
        return ((state.bytes_sent - warmup) / compressed, (state.wire_bytes - warmup) / compressed)
    nbytes = 4.0 * state.total_numel_after_compression / compressed
    return nbytes, nbytes


def _run_method(rank: int, method: str, cfg: dict, data, measure: bool) -> dict:
    """Train with one method from cfg['seed'] (init, batches, hook seeds); this rank's row.

    With `measure` the hook is wrapped by :func:`_measured` for the gradient NMSE; the
    timed run is a separate one without the wrapper (the trajectories are identical)."""
    world = cfg["world_size"]
    model = DistributedDataParallel(make_mlp(cfg["hidden"], cfg["seed"]))
    state, hook = _hook(method, cfg)
    log = {"err": 0.0, "norm": 0.0}
    if hook is not None:
        model.register_comm_hook(state, _measured(hook, world, log) if measure else hook)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    x, y = data.x_train[rank::world], data.y_train[rank::world]
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    times, losses = [], []
    err = norm = 0.0
    for step in range(cfg["steps"]):
        idx = torch.randint(0, len(y), (cfg["batch"],), generator=gen)
        log.update(err=0.0, norm=0.0)
        start = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if measure and hook is not None and step >= cfg["start_iter"]:
            err, norm = err + log["err"], norm + log["norm"]
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    numel = params.numel()
    payload, wire = _bytes_per_step(state, numel, cfg)
    with torch.no_grad():
        net = model.module.eval()
        train_loss = float(nn.functional.cross_entropy(net(data.x_train), data.y_train))
        test_acc = float((net(data.x_test).argmax(dim=1) == data.y_test).float().mean())
    return {"method": method, "seed": cfg["seed"], "numel": numel, "payload_bytes": payload,
            "wire_bytes": wire,
            "x_smaller": 4 * numel / wire, "bits_per_coord": 8 * payload / numel,
            "grad_nmse": err / norm if norm > 0 else 0.0,
            "train_loss": train_loss, "test_acc": test_acc,
            "ms_per_step": statistics.median(times[cfg["start_iter"]:]) * 1e3,
            "replicas_equal": all(torch.equal(g, params) for g in gathered),
            "minibatch_loss": losses}


def _worker(rank: int, cfg: dict, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=cfg["world_size"],
                            timeout=datetime.timedelta(seconds=300))
    try:
        data = load_digits_data(cfg["seed"])  # one split; the repeats vary the training seed
        rows = []
        for i in range(cfg["repeats"]):
            for m in methods(cfg):
                seeded = {**cfg, "seed": cfg["seed"] + i}
                row = _run_method(rank, m, seeded, data, measure=False)
                measured = _run_method(rank, m, seeded, data, measure=True)
                row["grad_nmse"] = measured["grad_nmse"]
                # the wrapper changes nothing but the timing: the same training results
                row["same_with_measurement"] = measured["train_loss"] == row["train_loss"]
                rows.append(row)
        torch.save(rows, f"{out_dir}/rank{rank}.pt")
    finally:
        # DDP models sit in reference cycles (hooks hold their state); collected only at
        # interpreter exit, after the process group is gone, gloo aborts the rank
        # ("terminate called without an active exception", about 1 run in 10).
        gc.collect()
        dist.destroy_process_group()


# ---- the run ------------------------------------------------------------------------------
def summarize(runs: list[dict], cfg: dict) -> list[dict]:
    """One row per method: medians over the repeats (loss also its min and max)."""
    rows = []
    for method in methods(cfg):
        mine = [r for r in runs if r["method"] == method]
        row = {k: statistics.median(r[k] for r in mine)
               for k in ("payload_bytes", "wire_bytes", "x_smaller", "bits_per_coord",
                         "grad_nmse", "train_loss", "test_acc", "ms_per_step")}
        row.update(method=method, numel=mine[0]["numel"],
                   train_loss_min=min(r["train_loss"] for r in mine),
                   train_loss_max=max(r["train_loss"] for r in mine),
                   replicas_equal=all(r["replicas_equal"] for r in mine),
                   same_with_measurement=all(r["same_with_measurement"] for r in mine))
        rows.append(row)
    return rows


def bench_ddp(cfg: dict) -> list[dict]:
    """One row per (repeat, method): rank 0's measurements (see the module docstring)."""
    validate(cfg)
    with tempfile.TemporaryDirectory(prefix="fedquant-bench-ddp-") as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, cfg, f"{tmp}/init", tmp), daemon=True)
                 for r in range(cfg["world_size"])]
        for p in procs:
            p.start()
        deadline = time.monotonic() + cfg["timeout_s"]
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a rank failed or timed out after {cfg['timeout_s']} s "
                               f"(exit codes {[p.exitcode for p in procs]}); see its stderr")
        return torch.load(f"{tmp}/rank0.pt", weights_only=False)


def write_outputs(runs: list[dict], cfg: dict, out_dir: pathlib.Path) -> list[dict]:
    """rows.csv (medians), runs.json (every run, with its per-step minibatch losses) and
    report.md; returns the summary rows."""
    rows = summarize(runs, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "rows.csv", [{c: r[c] for c in COLUMNS} for r in rows])
    env = {"torch": torch.__version__, "fedquant": fq.__version__, "backend": "gloo (CPU)",
           "threads_per_rank": 1}
    write_json(out_dir / "runs.json", {"config": cfg, "environment": env, "rows": rows,
                                       "runs": runs})
    lines = ["# fedquant bench-ddp", "",
             f"{cfg['world_size']} gloo ranks, MLP 64-{'-'.join(map(str, cfg['hidden']))}-10 "
             f"({rows[0]['numel']} parameters) on digits, {cfg['steps']} SGD steps of batch "
             f"{cfg['batch']} per rank, lr {cfg['lr']}, momentum 0.9, compression from step "
             f"{cfg['start_iter']}, fedquant error feedback "
             f"{'on' if cfg['error_feedback'] else 'off'}. Bytes per compressed step per rank "
             "(x smaller: 4 * numel / wire bytes). Medians over "
             f"{cfg['repeats']} training seeds from {cfg['seed']} (loss also min..max); "
             "ms per step is rank 0's median step.", "",
             "| method | payload B/step | wire B/step | x smaller | bits/coord | grad NMSE "
             "| train loss (min..max) | test acc | ms/step | replicas equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['payload_bytes']:.0f} | {r['wire_bytes']:.0f} | "
              f"{r['x_smaller']:.1f} | {r['bits_per_coord']:.2f} | {r['grad_nmse']:.3g} | "
              f"{r['train_loss']:.4f} "
              f"({r['train_loss_min']:.4f}..{r['train_loss_max']:.4f}) | {r['test_acc']:.4f} | "
              f"{r['ms_per_step']:.2f} | {r['replicas_equal']} |" for r in rows]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return rows


def print_summary(rows: list[dict], cfg: dict) -> None:
    """The summary rows as a rich table (wide enough not to truncate in a pipe)."""
    table = Table(title=f"fedquant bench-ddp: {cfg['world_size']} ranks, {cfg['steps']} "
                        f"steps, {rows[0]['numel']} parameters, medians of {cfg['repeats']}")
    for key, head in SHORT.items():
        table.add_column(head, justify="left" if key == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['payload_bytes']:.0f}", f"{r['wire_bytes']:.0f}",
                      f"{r['x_smaller']:.1f}", f"{r['bits_per_coord']:.2f}",
                      f"{r['grad_nmse']:.3g}", f"{r['train_loss']:.4f}",
                      f"{r['test_acc']:.4f}", f"{r['ms_per_step']:.2f}",
                      str(r["replicas_equal"]))
    Console(width=140).print(table)


def register(app: typer.Typer) -> None:
    @app.command("bench-ddp")
    def bench_ddp_command(
        steps: Annotated[int, typer.Option(help="SGD steps per method")] = DEFAULTS["steps"],
        world_size: Annotated[int, typer.Option(help="gloo processes")] = DEFAULTS[
            "world_size"],
        codec: Annotated[list[str] | None, typer.Option(
            help="fedquant codec spec (repeat the option); default eden:bits=1, eden:bits=2, "
                 "quic-fl:bits=2")] = None,
        powersgd_rank: Annotated[list[int] | None, typer.Option(
            help="PowerSGD matrix approximation rank (repeat); default 1 and 4")] = None,
        error_feedback: Annotated[bool, typer.Option(
            help="error feedback in fedquant's hook")] = True,
        start_iter: Annotated[int, typer.Option(
            help="plain allreduce steps before compression")] = DEFAULTS["start_iter"],
        lr: Annotated[float, typer.Option(help="SGD learning rate (momentum 0.9)")] = DEFAULTS[
            "lr"],
        seed: Annotated[int, typer.Option(help="data split, init, batches, codec seeds")] = 0,
        repeats: Annotated[int, typer.Option(
            help="training seeds seed, seed + 1, ...; medians reported")] = DEFAULTS["repeats"],
        quick: Annotated[bool, typer.Option("--quick", help=f"{QUICK_STEPS} steps")] = False,
        out: Annotated[pathlib.Path, typer.Option(help="output folder")] = pathlib.Path(
            "results/bench_ddp"),
    ) -> None:
        """DDP comm hooks: fedquant codecs vs allreduce and PowerSGD (bytes, loss, ms)."""
        cfg = {**DEFAULTS, "steps": QUICK_STEPS if quick else steps, "world_size": world_size,
               "repeats": 1 if quick else repeats, "lr": lr,
               "codecs": codec or DEFAULTS["codecs"],
               "powersgd_ranks": powersgd_rank or DEFAULTS["powersgd_ranks"],
               "error_feedback": error_feedback, "start_iter": start_iter, "seed": seed}
        try:
            validate(cfg)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        rows = write_outputs(bench_ddp(cfg), cfg, out)
        print_summary(rows, cfg)
        typer.echo(f"wrote {out}/rows.csv, runs.json, report.md")


__all__ = ["DEFAULTS", "bench_ddp", "methods", "register", "summarize", "validate",
           "write_outputs"]
