"""`fedquant bench mean`: the server's mean of n updates, fast path against n decodes.

For each n it times (medians, ms, in one process and one run):

* ``decode_mean``: ``fq.decode_mean(encs)``. For QUIC-FL with a shared ``round_seed`` this
  adds the clients' values in the rotated domain and inverts the rotation once:
  n * (dequantize) + 1 * (inverse RHTs);
* ``separate``: n calls of ``fq.decode`` summed and divided by n: n * (dequantize + RHTs);
* ``rw_pass``: one read+write pass of a d-float32 array (``y.copy_(x)``), the memory floor;
* ``plain_adds``: n plain float32 additions ``acc.add_(x_i)`` of d-vectors, what an
  uncompressed server does at the least;
* ``inverse_rht``: one inverse RHT of d (d a power of two) times n, what a server that
  decodes n differently rotated clients pays at the least.

It reports ``speedup`` = separate / decode_mean, ``x_rw`` = decode_mean / (n * rw_pass),
``x_adds`` = decode_mean / plain_adds and ``x_inverse_rht`` = decode_mean / (n inverse RHTs),
and checks that both means agree. ``codec`` may be one spec or a list of them. Encodings are
made from ``distinct`` client vectors and reused cyclically up to n (decoding cost does not
depend on the values). Config: ``simulations/configs/bench_mean.toml``.

    fedquant bench mean --quick
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import statistics
import time
import tomllib
from collections.abc import Callable
from typing import Annotated, Any

import torch
import typer

import fedquant as fq
from fedquant import hadamard
from fedquant.codecs.base import codec_class
from fedquant.random import derive_seed
from fedquant.simulations.bench import print_targets, target, target_lines

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "bench_mean.toml"
DEFAULTS: dict[str, Any] = {"codec": ["eden:bits=2", "quic-fl:bits=2", "fp32"], "d": 2**20,
                            "clients": [10, 100, 1000], "repeats": 3, "distinct": 10,
                            "threads": 1, "seed": 0}
QUICK_KEYS = ("d", "clients", "repeats", "distinct")
FIELDS = ["codec", "d", "n", "decode_mean_ms", "separate_ms", "rw_pass_ms", "plain_adds_ms",
          "inverse_rht_ms", "speedup", "x_rw", "x_adds", "x_inverse_rht", "max_abs_diff",
          "bits_per_coord"]


# ---- config -------------------------------------------------------------------------------
def _codec_spec(text: str) -> tuple[str, dict[str, str]]:
    """'quic-fl:bits=2' -> ('quic-fl', {'bits': '2'}); ValueError names a bad codec/key."""
    name, _, rest = str(text).partition(":")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"config key 'codec': expected name:key=value,..., got {text!r}")
        params[key.strip()] = value.strip()
    try:
        codec_class(name).from_params(params)
    except ValueError as e:
        raise ValueError(f"config key 'codec' = {text!r}: {e}") from None
    return name, params


def validate_config(table: dict) -> dict:
    """ValueError naming any unknown key or bad value."""
    allowed = sorted([*DEFAULTS, "quick"])
    unknown = set(table) - set(allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; allowed keys: {allowed}")
    quick = table.get("quick", {})
    bad = set(quick) - set(QUICK_KEYS)
    if bad:
        raise ValueError(f"unknown key(s) {sorted(bad)} in [quick]; allowed: {list(QUICK_KEYS)}")
    for source in (table, quick):
        for key in ("d", "repeats", "distinct", "threads"):
            v = source.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**28:
                raise ValueError(f"config key '{key}' must be an integer in [1, 2^28], "
                                 f"got {v!r}")
        n = source.get("clients", [1])
        if not isinstance(n, list) or not n or any(
                isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 10_000 for c in n):
            raise ValueError(f"config key 'clients' must be a non-empty list of integers in "
                             f"[1, 10000], got {n!r}")
    for spec in _specs(table.get("codec", DEFAULTS["codec"])):
        _codec_spec(spec)
    return table


def _specs(codec: str | list[str]) -> list[str]:
    """The config's codec key as a list of specs."""
    if isinstance(codec, str):
        return [codec]
    if not isinstance(codec, list) or not codec or not all(isinstance(c, str) for c in codec):
        raise ValueError(f"config key 'codec' must be a spec or a non-empty list of specs, "
                         f"got {codec!r}")
    return codec


def load_config(path: str | pathlib.Path = DEFAULT_CONFIG, quick: bool = False) -> dict:
    with open(path, "rb") as f:
        table = validate_config(tomllib.load(f))
    cfg = {**DEFAULTS, **{k: v for k, v in table.items() if k != "quick"}}
    if quick:
        cfg.update(table.get("quick", {}))
    return cfg


# ---- measurement --------------------------------------------------------------------------
def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` in ms over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _separate_mean(encs: list[fq.Encoded]) -> torch.Tensor:
    total = torch.zeros(encs[0].shape, dtype=torch.float64)
    for enc in encs:
        total += fq.decode(enc).to(torch.float64)
    return (total / len(encs)).to(torch.float32)


def bench_mean(cfg: dict, step: Callable[[str], None] = lambda _: None) -> list[dict]:
    """One row per (codec, n) of cfg['codec'] x cfg['clients'] (see the module docstring)."""
    d = cfg["d"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    vectors = [torch.randn(d, generator=gen)
               for _ in range(min(cfg["distinct"], max(cfg["clients"])))]
    x, y = torch.randn(d, generator=gen), torch.empty(d)
    rw_ms = median_ms(lambda: y.copy_(x), max(cfg["repeats"], 20))
    inverse_ms = None
    if d & (d - 1) == 0:
        inverse_ms = median_ms(lambda: hadamard.inverse_rht(x, 1, 0, out=y),
                               max(cfg["repeats"], 10))
    rows = []
    for spec in _specs(cfg["codec"]):
        rows += _codec_rows(spec, cfg, vectors, rw_ms, inverse_ms, step)
    return rows


def _plain_adds(vectors: list[torch.Tensor], n: int) -> torch.Tensor:
    acc = torch.zeros_like(vectors[0])
    for i in range(n):
        acc.add_(vectors[i % len(vectors)])
    return acc


def _codec_rows(spec: str, cfg: dict, vectors: list[torch.Tensor], rw_ms: float,
                inverse_ms: float | None, step: Callable[[str], None]) -> list[dict]:
    name, params = _codec_spec(spec)
    klass = codec_class(name)
    if "round_seed" in klass._defaults() and "round_seed" not in params:
        params["round_seed"] = str(cfg["seed"] + 1)  # one rotation for the whole round
    codec = klass.from_params(params)
    d = cfg["d"]
    pool = []
    for i, v in enumerate(vectors):
        pool.append(codec.encode(v, seed=derive_seed(cfg["seed"], i)))
        step(f"{spec}: encoding client {i + 1}")
    rows = []
    for n in cfg["clients"]:
        encs = [pool[i % len(pool)] for i in range(n)]
        fast = fq.decode_mean(encs)
        slow = _separate_mean(encs)
        mean_ms = median_ms(lambda encs=encs: fq.decode_mean(encs), cfg["repeats"])
        separate_ms = median_ms(lambda encs=encs: _separate_mean(encs),
                                1 if n >= 100 else cfg["repeats"])
        adds_ms = median_ms(lambda n=n: _plain_adds(vectors, n), cfg["repeats"])
        rows.append({"codec": spec, "d": d, "n": n, "decode_mean_ms": mean_ms,
                     "separate_ms": separate_ms, "rw_pass_ms": rw_ms,
                     "plain_adds_ms": adds_ms,
                     "inverse_rht_ms": None if inverse_ms is None else n * inverse_ms,
                     "speedup": separate_ms / mean_ms, "x_rw": mean_ms / (n * rw_ms),
                     "x_adds": mean_ms / adds_ms,
                     "x_inverse_rht": None if inverse_ms is None else mean_ms / (n * inverse_ms),
                     "max_abs_diff": float((fast - slow).abs().max()),
                     "bits_per_coord": pool[0].bits_per_coordinate})
        step(f"{spec}: n = {n}")
    return rows


# ---- outputs ------------------------------------------------------------------------------
def _plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for spec in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == spec]
        ax.loglog([r["n"] for r in mine], [r["decode_mean_ms"] for r in mine], "o-",
                  label=f"decode_mean {spec}")
    first = [r for r in rows if r["codec"] == rows[0]["codec"]]
    n = [r["n"] for r in first]
    ax.loglog(n, [r["plain_adds_ms"] for r in first], "k--", label="n plain fp32 adds")
    if first[0]["inverse_rht_ms"] is not None:
        ax.loglog(n, [r["inverse_rht_ms"] for r in first], "k:", label="n inverse RHTs")
    ax.set_xlabel("clients n")
    ax.set_ylabel("ms")
    ax.set_title(f"d = {rows[0]['d']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TARGET_X = 2.0  # decode_mean within 2x of its baseline


def targets(rows: list[dict]) -> list[dict]:
    """The server-mean targets, where measured: an identity codec (fp32 / fp16 / bf16)
    within 2x of n plain fp32 adds at every n; EDEN b=2 within 2x of n inverse RHTs at
    n = 1000."""
    out = []
    for r in rows:
        name = r["codec"].split(":")[0]
        if name in ("fp32", "fp16", "bf16"):
            value, what = r["x_adds"], "n plain fp32 adds"
        elif r["codec"] == "eden:bits=2" and r["n"] == 1000 and r["x_inverse_rht"] is not None:
            value, what = r["x_inverse_rht"], "n inverse RHTs"
        else:
            continue
        out.append(target(f"{r['codec']} decode_mean at n={r['n']} <= {TARGET_X:g}x {what}",
                          value, TARGET_X))
    return out


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def write_outputs(rows: list[dict], cfg: dict, out_dir: pathlib.Path) -> None:
    """rows.csv, rows.json, bench_mean.png and report.md in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count()}
    (out_dir / "rows.json").write_text(json.dumps({"config": cfg, "environment": env,
                                                   "rows": rows}, indent=1))
    _plot(rows, out_dir / "bench_mean.png")
    lines = ["# fedquant bench mean", "",
             f"d = {cfg['d']}, {env['threads']} torch thread(s), decode_mean over "
             f"{env['cpus']} CPU(s), medians of {cfg['repeats']} runs. `separate` decodes "
             "each client and sums; `plain adds` is n float32 `add_` of uncompressed "
             "vectors; `inverse RHTs` is n times one inverse RHT.", "",
             "| codec | n | decode_mean ms | separate ms | plain adds ms | n inverse RHTs ms "
             "| / plain adds | / inverse RHTs | speedup | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['codec']} | {r['n']} | {r['decode_mean_ms']:.2f} | "
              f"{r['separate_ms']:.2f} | {r['plain_adds_ms']:.2f} | "
              f"{_fmt(r['inverse_rht_ms'])} | {r['x_adds']:.2f} | "
              f"{_fmt(r['x_inverse_rht'])} | {r['speedup']:.2f} | "
              f"{r['max_abs_diff']:.2g} |" for r in rows]
    lines += target_lines(targets(rows))
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def print_summary(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedquant bench mean, d = {rows[0]['d']}")
    for col in ("codec", "n", "decode_mean ms", "separate ms", "/ plain adds",
                "/ inverse RHTs", "speedup"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["codec"], str(r["n"]), f"{r['decode_mean_ms']:.2f}",
                      f"{r['separate_ms']:.2f}", f"{r['x_adds']:.2f}",
                      _fmt(r["x_inverse_rht"]), f"{r['speedup']:.2f}x")
    console = Console()
    console.print(table)
    print_targets(console, targets(rows))


def run_bench_mean(cfg: dict, out_dir: pathlib.Path, progress: bool = True) -> list[dict]:
    """Run the benchmark for a resolved config and write its outputs."""
    from rich.progress import Progress

    torch.set_num_threads(cfg["threads"])
    steps = (min(cfg["distinct"], max(cfg["clients"])) + len(cfg["clients"])) * len(
        _specs(cfg["codec"]))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("bench mean", total=steps)
        rows = bench_mean(cfg, lambda what: bar.update(task, advance=1, description=what))
    write_outputs(rows, cfg, pathlib.Path(out_dir))
    return rows


def bench_mean_command(
    quick: Annotated[bool, typer.Option("--quick", help="n = 1, 10 at d = 2^16.")] = False,
    config: Annotated[pathlib.Path, typer.Option(help="TOML config.")] = DEFAULT_CONFIG,
    out: Annotated[pathlib.Path, typer.Option(help="Output folder.")] = pathlib.Path(
        "results/bench_mean"),
) -> None:
    """decode_mean for n = 10, 100, 1000 at d = 2^20 against n separate decodes, n plain
    fp32 adds and n inverse RHTs."""
    try:
        cfg = load_config(config, quick)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
        raise typer.BadParameter(str(e), param_hint="--config") from None
    rows = run_bench_mean(cfg, out)
    print_summary(rows)
    typer.echo(f"wrote {out}/rows.csv, rows.json, bench_mean.png, report.md")


def register_bench(bench_app: typer.Typer) -> None:
    """Add ``mean`` to the ``fedquant bench`` command group."""
    bench_app.command("mean")(bench_mean_command)


__all__ = ["bench_mean", "load_config", "register_bench", "run_bench_mean", "validate_config"]
