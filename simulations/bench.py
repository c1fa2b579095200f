"""`fedquant bench`: encode and decode throughput per codec, against in-run baselines.

For every codec setting and every d it measures medians (ms) of

* ``encode``: ``codec.encode(x, seed)`` (rotation, quantization and bit packing);
* ``decode``: ``fq.decode(enc)``;
* ``rw_pass``: one read+write pass over the same float32 array (``y.copy_(x)``), the
  memory floor every other number is divided by (REFERENCE.md, "Speed");
* ``torch_rht``: one RHT with the plain torch reshape-butterfly kernel
  (``fedquant.hadamard.fwht_torch`` with signs), the textbook implementation;
* ``torch_encode`` (EDEN/DRIVE rows): the same EDEN encode written with plain torch ops
  (torch RHT, ``torch.bucketize``, torch bit packing), as public implementations do.

* ``fwht`` (one table per d): fedquant's RHT (signs, scaling and the out-of-place copy
  fused, ``fedquant.hadamard.rht(x, out=y)``) and its inverse, against the fastest C FWHTs
  when they are installed (``ffht`` from PyPI ``ffht-unofficial``, ``fht_cpu`` from
  ``fht-cpu``; in place, unnormalized, no signs; the benchmark installs nothing) and a
  copy pass; every codec row also reports encode / one RHT and decode / one inverse RHT.

All baselines run in the same process and the same run, so ratios stay meaningful on a
shared or throttled machine. Issue 2's targets (2-core CPU, one thread): EDEN b = 2 encode
at d = 2^24 within 15x of one read+write pass, and >= 10x faster than plain torch.

``bench_codecs`` is the function behind the command (``fedquant compare`` calls it for its
speed section). Other modules add subcommands (``fedquant bench server``) through
``register_bench(bench_app)``.

Example::

    fedquant bench --quick --out results/bench-quick
    fedquant bench --codec eden:bits=3 --codec dither:bits=2
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import pathlib
import statistics
import time
import tomllib
from collections.abc import Callable
from typing import Annotated, Any

import torch
import typer

import fedquant as fq
from fedquant import hadamard, packing
from fedquant.codecs.eden import lloyd_max_centroids
from fedquant.rotation import rotate, slice_layout

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / "configs" / "bench.toml"
DEFAULTS: dict[str, Any] = {
    "dims": [2**16, 2**20, 2**24],
    "repeats": 9,
    "codecs": ["fp16", "drive", "eden:bits=1", "eden:bits=2", "eden:bits=4"],
    "threads": 1,
    "seed": 0,
}
QUICK_DEFAULTS: dict[str, Any] = {"dims": [2**16, 2**20], "repeats": 3}
ALLOWED_KEYS = sorted([*DEFAULTS, "quick"])
MAX_D = 2**28
TARGET_D = 2**24
TARGET_RW = 15.0  # EDEN b=2 encode within 15x of one read+write pass (issue 2)
TARGET_TORCH = 10.0  # ... and at least 10x faster than the plain torch implementation
TARGET_FWHT = 1.2  # the RHT within 1.2x of the fastest C FWHT installed
TARGET_FUSED = 1.5  # EDEN / DRIVE encode (decode) within 1.5x of one (inverse) RHT
TARGET_QUIC = 1.5  # QUIC-FL encode within 1.5x of EDEN's
TARGET_VQ = 3.0  # VQ encode within 3x of EDEN's
BASELINE_REPEATS = 3  # the slow torch baselines at most this many times at d >= 2^22


# ---- codec specs ------------------------------------------------------------------------
def parse_codec_spec(text: str) -> tuple[str, dict[str, Any]]:
    """"eden:bits=2,scale=biased" -> ("eden", {"bits": 2, "scale": "biased"})
    (``fq.codecs.typed_codec_spec``)."""
    return fq.codecs.typed_codec_spec(text)


def label(name: str, params: dict[str, Any]) -> str:
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{name}:{inner}" if inner else name


# ---- timing -----------------------------------------------------------------------------
def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` in ms over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_eden_encode(x: torch.Tensor, bits: int, seed: int) -> bytes:
    """EDEN encode in plain torch ops (the baseline): torch RHT, per-slice float64 norm,
    bucketize to the Lloyd-Max centroids, unbiased scale, torch bit packing."""
    z = rotate(x, seed, 1, backend="torch")
    centroids = lloyd_max_centroids(bits).to(z.device)
    mids = ((centroids[1:] + centroids[:-1]) / 2).to(z.dtype)
    idx = torch.empty(z.numel(), dtype=torch.int64, device=z.device)
    scales = []
    for s in slice_layout(x.numel()):
        zs = z[s.offset: s.offset + s.size]
        norm = torch.linalg.vector_norm(zs.to(torch.float64))
        idx[s.offset: s.offset + s.size] = torch.bucketize(zs * (math.sqrt(s.size) / norm), mids)
        dot = torch.dot(zs.to(torch.float64), centroids[idx[s.offset: s.offset + s.size]])
        scales.append(float(norm**2 / dot))
    return packing.pack(idx, bits, backend="torch")


def external_fwhts() -> dict[str, Callable[[Any], Any]]:
    """The C FWHTs importable here (in place on a float32 numpy array), by name."""
    found: dict[str, Callable[[Any], Any]] = {}
    if importlib.util.find_spec("ffht") is not None:
        ffht = importlib.import_module("ffht")
        found["ffht"] = ffht.fht
    if importlib.util.find_spec("fht_cpu") is not None:
        fht_cpu = importlib.import_module("fht_cpu")
        found["fht_cpu"] = lambda a: fht_cpu.fht(a, inplace=True)
    return found


def bench_fwht(d: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """One RHT layer of a power-of-two d: fedquant's kernel (forward and inverse, fused
    signs, scaling and out-of-place copy into a preallocated output), the C FWHTs that are
    installed (in place), and a copy pass, medians in ms, with the ratio to the fastest."""
    if d & (d - 1):
        raise ValueError(f"the FWHT table needs a power-of-two d, got {d}")
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed + d))
    y = torch.empty_like(x)
    row: dict[str, Any] = {
        "d": d,
        "copy_ms": median_ms(lambda: y.copy_(x), max(repeats, 20)),
        "rht_ms": median_ms(lambda: hadamard.rht(x, seed, 0, out=y), repeats),
        "inverse_rht_ms": median_ms(lambda: hadamard.inverse_rht(x, seed, 0, out=y),
                                    repeats),
    }
    arr = x.numpy().copy()
    for name, fht in external_fwhts().items():
        row[f"{name}_ms"] = median_ms(lambda fht=fht: fht(arr), repeats)
    external = [v for k, v in row.items() if k in ("ffht_ms", "fht_cpu_ms")]
    row["fastest_c_ms"] = min(external) if external else None
    row["rht_x_fastest_c"] = row["rht_ms"] / min(external) if external else None
    row["rht_x_copy"] = row["rht_ms"] / row["copy_ms"]
    return row


def _row(name: str, params: dict[str, Any], d: int, repeats: int, seed: int,
         baselines: dict[int, dict[str, float]]) -> dict[str, Any]:
    codec = fq.get_codec(name, **params)
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed + d))
    if d not in baselines:
        y = torch.empty_like(x)
        slow = min(repeats, BASELINE_REPEATS) if d >= 2**22 else repeats
        p2 = 1 << (d.bit_length() - 1)  # one RHT of d's leading power-of-two slice
        xp, yp = x[:p2], torch.empty(p2)
        baselines[d] = {
            "rw_pass_ms": median_ms(lambda: y.copy_(x), max(repeats, 20)),
            "torch_rht_ms": median_ms(lambda: rotate(x, seed, 1, backend="torch"), slow),
            "rht_ms": median_ms(lambda: hadamard.rht(xp, seed, 0, out=yp), repeats),
            "inverse_rht_ms": median_ms(lambda: hadamard.inverse_rht(xp, seed, 0, out=yp),
                                        repeats),
        }
    base = baselines[d]
    enc = codec.encode(x, seed=seed)
    encode_ms = median_ms(lambda: codec.encode(x, seed=seed), repeats)
    decode_ms = median_ms(lambda: fq.decode(enc), repeats)
    torch_encode_ms = None
    if name in ("eden", "drive"):  # once per (d, bits): drive and eden b=1 share it
        key = f"torch_eden_{codec.bits}_ms"
        if key not in base:
            slow = min(repeats, BASELINE_REPEATS) if d >= 2**22 else repeats
            base[key] = median_ms(lambda: torch_eden_encode(x, codec.bits, seed), slow)
        torch_encode_ms = base[key]
    gbytes = d * 4 / 1e9  # the float32 input (encode) or output (decode)
    return {
        "codec": name, "params": dict(params), "label": label(name, params), "d": d,
        "bits_per_coord": 8 * enc.nbytes / d,
        "encode_ms": encode_ms, "decode_ms": decode_ms,
        "rw_pass_ms": base["rw_pass_ms"], "torch_rht_ms": base["torch_rht_ms"],
        "torch_encode_ms": torch_encode_ms,
        "encode_gbps": gbytes / (encode_ms / 1e3), "decode_gbps": gbytes / (decode_ms / 1e3),
        "rht_ms": base["rht_ms"], "inverse_rht_ms": base["inverse_rht_ms"],
        "encode_x_rht": encode_ms / base["rht_ms"],
        "decode_x_inverse_rht": decode_ms / base["inverse_rht_ms"],
        "encode_x_rw": encode_ms / base["rw_pass_ms"],
        "decode_x_rw": decode_ms / base["rw_pass_ms"],
        "torch_rht_x_encode": base["torch_rht_ms"] / encode_ms,
        "torch_encode_x_encode": (torch_encode_ms / encode_ms if torch_encode_ms else None),
    }


def bench_codecs(specs: list[tuple[str, dict]], dims: list[int], repeats: int,
                 seed: int = 0, progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (codec spec, d), spec-major: encode/decode medians (ms), the in-run
    baselines (rw_pass_ms, torch_rht_ms, torch_encode_ms) and their ratios."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_D:
            raise ValueError(f"dims must be integers in [1, 2^28], got {d!r}")
    baselines: dict[int, dict[str, float]] = {}
    rows = []
    for name, params in specs:
        for d in dims:
            if progress:
                progress(f"{label(name, params)} d=2^{math.log2(d):g}")
            rows.append(_row(name, params, d, repeats, seed, baselines))
    return rows


def _find(rows: list[dict], codec: str, d: int, **params: Any) -> dict | None:
    """The row of `codec` at d whose spec is exactly `params` (the codec's defaults)."""
    for r in rows:
        if r["codec"] == codec and r["d"] == d and r["params"] == params:
            return r
    return None


def target(text: str, value: float, limit: float, at_most: bool = True) -> dict[str, Any]:
    """One target's verdict: value <= limit (or >= with at_most=False)."""
    return {"target": text, "value": value,
            "met": value <= limit if at_most else value >= limit}


def targets(rows: list[dict], fwht_rows: list[dict] | None = None) -> list[dict[str, Any]]:
    """The speed targets, each evaluated where its rows were measured:

    * EDEN b=2 at d = 2^24 within 15x of a read+write pass, >= 10x faster than plain torch;
    * per d: the RHT within 1.2x of the fastest C FWHT installed; EDEN b=2 and DRIVE
      encode within 1.5x of one RHT and decode within 1.5x of one inverse RHT; QUIC-FL
      b=2 encode within 1.5x of EDEN b=2's; VQ (default dim 8) within 3x of EDEN b=2's.
    """
    out = []
    for f in fwht_rows or []:
        if f.get("rht_x_fastest_c") is not None:
            out.append(target(f"RHT <= {TARGET_FWHT:g}x the fastest C FWHT at "
                               f"d=2^{math.log2(f['d']):g}", f["rht_x_fastest_c"],
                               TARGET_FWHT))
    for d in sorted({r["d"] for r in rows}):
        at = f"d=2^{math.log2(d):g}"
        eden = _find(rows, "eden", d, bits=2)
        if eden and d == TARGET_D:
            out.append(target(f"eden b=2 encode <= {TARGET_RW:g}x rw pass at {at}",
                               eden["encode_x_rw"], TARGET_RW))
            out.append(target(f"eden b=2 encode >= {TARGET_TORCH:g}x faster than torch "
                               f"at {at}", eden["torch_encode_x_encode"], TARGET_TORCH,
                               at_most=False))
        for name, row in (("eden b=2", eden), ("drive", _find(rows, "drive", d))):
            if row:
                out.append(target(f"{name} encode <= {TARGET_FUSED:g}x one RHT at {at}",
                                   row["encode_x_rht"], TARGET_FUSED))
                out.append(target(f"{name} decode <= {TARGET_FUSED:g}x one inverse RHT at "
                                   f"{at}", row["decode_x_inverse_rht"], TARGET_FUSED))
        if not eden:
            continue
        quic = _find(rows, "quic-fl", d, bits=2)
        if quic:
            out.append(target(f"quic-fl b=2 encode <= {TARGET_QUIC:g}x eden b=2's at {at}",
                               quic["encode_ms"] / eden["encode_ms"], TARGET_QUIC))
        vq = _find(rows, "vq", d, bits=1, dim=8) or _find(rows, "vq", d)
        if vq:
            out.append(target(f"vq {vq['label'][3:] or 'default'} encode <= "
                               f"{TARGET_VQ:g}x eden b=2's at {at}",
                               vq["encode_ms"] / eden["encode_ms"], TARGET_VQ))
    return out


def target_lines(met: list[dict[str, Any]]) -> list[str]:
    """The report's "Targets" section (none if nothing was evaluated)."""
    if not met:
        return []
    return ["", "## Targets", "", f"{sum(t['met'] for t in met)} of {len(met)} met in "
            "this run.", "", *(f"- {t['target']}: {t['value']:.2f} -> "
                               f"{'met' if t['met'] else 'NOT met'}" for t in met)]


def print_targets(console: Any, met: list[dict[str, Any]]) -> None:
    """Each target's value and verdict on a rich console."""
    for t in met:
        console.print(f"{t['target']}: {t['value']:.2f} -> "
                      f"{'[green]met[/green]' if t['met'] else '[red]NOT met[/red]'}")


# ---- configuration ----------------------------------------------------------------------
def validate_config(config: dict) -> dict:
    """ValueError naming any unknown key or bad value."""
    table = config.get("bench", config)
    unknown = set(table) - set(ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; allowed keys: "
                         f"{ALLOWED_KEYS}")
    for key in ("repeats", "threads"):
        v = table.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config key '{key}' must be an integer >= 1, got {v!r}")
    for source in (table, table.get("quick", {})):
        dims = source.get("dims", [])
        if not isinstance(dims, list) or any(
                isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_D
                for d in dims):
            raise ValueError(f"config key 'dims' must be a list of integers in [1, 2^28], "
                             f"got {dims!r}")
    codecs = table.get("codecs", [])
    if not isinstance(codecs, list) or not all(isinstance(c, str) for c in codecs):
        raise ValueError(f"config key 'codecs' must be a list of 'name:key=value,...' "
                         f"strings, got {codecs!r}")
    for c in codecs:
        parse_codec_spec(c)
    quick = table.get("quick", {})
    bad = set(quick) - set(QUICK_DEFAULTS)
    if bad:
        raise ValueError(f"unknown key(s) {sorted(bad)} in [bench.quick]; allowed keys: "
                         f"{sorted(QUICK_DEFAULTS)}")
    return table


def load_config(path: str | pathlib.Path = DEFAULT_CONFIG) -> dict:
    with open(path, "rb") as f:
        return validate_config(tomllib.load(f))


def resolve_config(table: dict, quick: bool = False) -> dict:
    cfg = {**DEFAULTS, **{k: v for k, v in table.items() if k != "quick"}}
    if quick:
        cfg.update({**QUICK_DEFAULTS, **table.get("quick", {})})
    return cfg


# ---- outputs ----------------------------------------------------------------------------
CSV_FIELDS = ["label", "codec", "d", "bits_per_coord", "encode_ms", "decode_ms", "rw_pass_ms",
              "torch_rht_ms", "torch_encode_ms", "rht_ms", "inverse_rht_ms", "encode_x_rht",
              "decode_x_inverse_rht", "encode_gbps", "decode_gbps", "encode_x_rw",
              "decode_x_rw", "torch_rht_x_encode", "torch_encode_x_encode"]
FWHT_FIELDS = ["d", "rht_ms", "inverse_rht_ms", "copy_ms", "ffht_ms", "fht_cpu_ms",
               "fastest_c_ms", "rht_x_fastest_c", "rht_x_copy"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_outputs(rows: list[dict], cfg: dict, out_dir: pathlib.Path,
                  environment: dict[str, Any], fwht_rows: list[dict] | None = None) -> None:
    """rows.csv, fwht.csv, rows.json, throughput.png and report.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fwht_rows = fwht_rows or []
    with open(out_dir / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out_dir / "fwht.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FWHT_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(fwht_rows)
    met = targets(rows, fwht_rows)
    (out_dir / "rows.json").write_text(json.dumps(
        {"config": cfg, "environment": environment, "rows": rows, "fwht": fwht_rows,
         "targets": met}, indent=2))
    _plot(rows, out_dir / "throughput.png")
    lines = ["# fedquant bench", "",
             f"Threads: {environment['threads']}; repeats: {cfg['repeats']} (medians); "
             f"torch {environment['torch']}, numba {environment['numba']}.", "",
             "## FWHT (one RHT layer; C kernels in place without signs, when installed)", "",
             "| d | fedquant RHT ms | inverse ms | ffht ms | fht_cpu ms | copy ms "
             "| RHT / fastest C | RHT / copy |", "|---|---|---|---|---|---|---|---|"]
    for r in fwht_rows:
        lines.append(
            f"| 2^{math.log2(r['d']):g} | {r['rht_ms']:.3f} | {r['inverse_rht_ms']:.3f} "
            f"| {_fmt(r.get('ffht_ms'))} | {_fmt(r.get('fht_cpu_ms'))} | {r['copy_ms']:.3f} "
            f"| {_fmt(r['rht_x_fastest_c'])} | {r['rht_x_copy']:.2f} |")
    lines += ["", "## Codecs", "",
              "| codec | d | bits/coord | encode ms | decode ms | encode / RHT "
              "| decode / inverse RHT | rw pass ms | torch RHT ms | encode / rw "
              "| torch RHT / encode | torch encode / encode |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | 2^{math.log2(r['d']):g} | {r['bits_per_coord']:.3f} "
            f"| {r['encode_ms']:.3f} | {r['decode_ms']:.3f} | {r['encode_x_rht']:.2f} "
            f"| {r['decode_x_inverse_rht']:.2f} | {r['rw_pass_ms']:.3f} "
            f"| {r['torch_rht_ms']:.2f} | {r['encode_x_rw']:.1f} "
            f"| {r['torch_rht_x_encode']:.1f} | {_fmt(r['torch_encode_x_encode'])} |")
    lines += target_lines(met) or ["", "## Targets", "",
                                   "- not evaluated (they need eden bits=2 rows)"]
    lines += ["", "![throughput](throughput.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, len(dims), figsize=(4.5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        by = {r["label"]: r for r in rows if r["d"] == d}
        xs = range(len(labels))
        enc = [by[lb]["encode_gbps"] if lb in by else 0 for lb in labels]
        dec = [by[lb]["decode_gbps"] if lb in by else 0 for lb in labels]
        ax.bar([i - 0.2 for i in xs], enc, 0.4, label="encode")
        ax.bar([i + 0.2 for i in xs], dec, 0.4, label="decode")
        rw = next(r["rw_pass_ms"] for r in rows if r["d"] == d)
        ax.axhline(d * 4 / 1e9 / (rw / 1e3), color="k", ls="--", lw=1,
                   label="read+write pass")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"d = 2^{math.log2(d):g}")
        ax.set_ylabel("GB/s of float32 input")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(rows: list[dict], fwht_rows: list[dict] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 132)  # the table's columns, unwrapped
    if fwht_rows:
        fwht = Table(title="FWHT, one layer (medians, ms)")
        for col in ("d", "fedquant RHT", "inverse", "ffht", "fht_cpu", "copy",
                    "RHT/fastest C", "RHT/copy"):
            fwht.add_column(col, justify="right")
        for r in fwht_rows:
            fwht.add_row(f"2^{math.log2(r['d']):g}", f"{r['rht_ms']:.3f}",
                         f"{r['inverse_rht_ms']:.3f}", _fmt(r.get("ffht_ms")),
                         _fmt(r.get("fht_cpu_ms")), f"{r['copy_ms']:.3f}",
                         _fmt(r["rht_x_fastest_c"]), f"{r['rht_x_copy']:.2f}")
        console.print(fwht)
    table = Table(title="fedquant bench (medians)")
    for col in ("codec", "d", "encode ms", "decode ms", "enc/RHT", "dec/invRHT", "rw ms",
                "torch RHT ms", "enc/rw", "torchRHT/enc", "torchEnc/enc"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["label"], f"2^{math.log2(r['d']):g}", f"{r['encode_ms']:.3f}",
                      f"{r['decode_ms']:.3f}", f"{r['encode_x_rht']:.2f}",
                      f"{r['decode_x_inverse_rht']:.2f}", f"{r['rw_pass_ms']:.3f}",
                      f"{r['torch_rht_ms']:.2f}", f"{r['encode_x_rw']:.1f}",
                      f"{r['torch_rht_x_encode']:.1f}", _fmt(r["torch_encode_x_encode"]))
    console.print(table)
    print_targets(console, targets(rows, fwht_rows))


def run_bench(cfg: dict, out_dir: pathlib.Path,
              progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Run the FWHT and codec benches for a resolved config and write their outputs;
    returns (codec rows, FWHT rows)."""
    import numba
    from rich.progress import Progress

    specs = [parse_codec_spec(c) for c in cfg["codecs"]]
    torch.set_num_threads(cfg["threads"])
    numba.set_num_threads(min(cfg["threads"], numba.config.NUMBA_NUM_THREADS))
    environment = {"threads": cfg["threads"], "torch": torch.__version__,
                   "numba": numba.__version__,
                   "numba_rht": hadamard._use_numba(torch.zeros(1))}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("bench", total=len(specs) * len(cfg["dims"]))

        def step(what: str) -> None:
            bar.update(task, advance=1, description=what)

        fwht_rows = [bench_fwht(d, cfg["repeats"], cfg["seed"]) for d in cfg["dims"]
                     if d & (d - 1) == 0]
        rows = bench_codecs(specs, list(cfg["dims"]), cfg["repeats"], cfg["seed"], step)
    environment["c_fwhts"] = sorted(external_fwhts())
    write_outputs(rows, cfg, out_dir, environment, fwht_rows)
    return rows, fwht_rows


# ---- command line -----------------------------------------------------------------------
bench_app = typer.Typer(invoke_without_command=True, add_completion=False,
                        help="Throughput benchmarks (codecs by default; subcommands below).")


@bench_app.callback()
def bench_command(
    ctx: typer.Context,
    config: Annotated[pathlib.Path, typer.Option(
        "--config", help="TOML config (see configs/bench.toml)")] = DEFAULT_CONFIG,
    out: Annotated[pathlib.Path, typer.Option("--out", help="output folder")] = (
        pathlib.Path("results/bench")),
    quick: Annotated[bool, typer.Option("--quick", help="d = 2^16, 2^20, 3 repeats")] = False,
    codec: Annotated[list[str] | None, typer.Option(
        "--codec", help="extra codec, name:key=val,... (repeatable)")] = None,
    only: Annotated[bool, typer.Option(
        "--only", help="bench only the --codec settings, not the config's list")] = False,
    dims: Annotated[list[int] | None, typer.Option(
        "--dim", help="override the sizes (repeatable)")] = None,
    repeats: Annotated[int | None, typer.Option("--repeats", min=1)] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
) -> None:
    """Encode/decode throughput per codec at d = 2^16, 2^20, 2^24 with in-run baselines."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        cfg = resolve_config(load_config(config), quick)
        extra = list(codec or [])
        for c in extra:
            parse_codec_spec(c)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e), param_hint="--config/--codec") from None
    cfg["codecs"] = extra if only else [*cfg["codecs"], *extra]
    if not cfg["codecs"]:
        raise typer.BadParameter("no codec to bench", param_hint="--codec")
    if dims:
        cfg["dims"] = list(dims)
    if repeats:
        cfg["repeats"] = repeats
    if threads:
        cfg["threads"] = threads
    try:
        rows, fwht_rows = run_bench(cfg, out)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    print_summary(rows, fwht_rows)
    typer.echo(f"wrote {out}/rows.csv, fwht.csv, rows.json, throughput.png, report.md")


def register(app: typer.Typer) -> None:
    """Add `fedquant bench` (and the subcommands of modules that extend it)."""
    for name in ("fedquant.simulations.bench_server", "fedquant.simulations.bench_mean"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register_bench(bench_app)
    app.add_typer(bench_app, name="bench")


__all__ = ["bench_app", "bench_codecs", "bench_fwht", "external_fwhts", "load_config",
           "parse_codec_spec", "register", "run_bench", "torch_eden_encode"]
