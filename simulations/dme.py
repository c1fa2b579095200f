"""`fedquant dme`: vNMSE and NMSE(n) versus measured bits per coordinate.

For every codec setting, input kind (simulations.inputs) and rotation count (1, 2, 3 and
"auto" for codecs with a ``rotations`` parameter), each trial draws ``clients`` independent
inputs, encodes each with its own client seed (``fq.random.derive_seed(round_seed, i)``),
sends it through the real wire (``to_bytes`` / ``Encoded.from_bytes``) and measures

* vNMSE = ||x_hat - x||^2 / ||x||^2, averaged over clients and trials;
* NMSE(n) of ``fq.decode_mean`` against the true mean (about vNMSE / n when unbiased;
  REFERENCE.md "Biased vs unbiased once averaged");
* bits per coordinate = 8 * len(blob) / numel, the bytes actually sent;
* ``codec.stats(enc)`` (e.g. QUIC-FL's outlier fraction), averaged, as ``stat_*`` columns.

It writes rows.csv, rows.json, vnmse_vs_bits.png and report.md to the output folder and
prints a summary table. ``run_dme`` is the function behind the command (``fedquant
compare`` calls it); ``load_config`` reads and validates the TOML config.

Example::

    fedquant dme --quick --out results/dme-quick
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import itertools
import json
import math
import pathlib
import statistics
import time
import tomllib
import warnings
from typing import Annotated, Any

import torch
import typer

import fedquant as fq
from fedquant import random as fqr
from fedquant.simulations.common import markdown_table
from fedquant.simulations.inputs import INPUTS, make_input
from fedquant.simulations.linreg import check_row, print_checks, write_claims_report

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / "configs" / "dme.toml"
DEFAULTS: dict[str, Any] = {
    "d": 65536, "clients": 10, "trials": 3, "seed": 0, "inputs": list(INPUTS),
    "rotations": ["auto", 1, 2, 3], "codecs": "default", "studies": True,
}
QUICK_DEFAULTS: dict[str, Any] = {"d": 2048, "clients": 3, "trials": 1,
                                  "inputs": ["normal", "two-spikes"], "rotations": ["auto", 1]}
ALLOWED_KEYS = sorted([*DEFAULTS, "quick"])
ROTATION_SPECS = ("auto", 0, 1, 2, 3)
#: sensible settings per codec for codecs = "default"; other codecs run with defaults
DEFAULT_SETTINGS: dict[str, dict[str, list]] = {
    "eden": {"bits": [1, 2, 3, 4], "scale": ["unbiased", "biased"]},
    "drive": {"scale": ["unbiased", "biased"]},
    "dither": {"bits": [1, 2, 3, 4]},
    "stochastic": {"bits": [1, 2, 3, 4]},
}
#: other engineers' studies, run when their modules exist: (module, function, title)
STUDIES = (("fedquant.simulations.quicfl_study", "run_outlier_study", "QUIC-FL outlier study"),
           ("fedquant.simulations.vq_study", "run_vq_study", "Vector quantization study"))
_INPUT_PURPOSE = 100  # hash64 stream of the input seeds (experiment data, not wire)

#: vNMSE of one vector rotated to near N(0, 1), large d, by bits (REFERENCE.md's first table:
#: DRIVE, Vargaftik et al., NeurIPS 2021; EDEN, Vargaftik et al., ICML 2022; QUIC-FL, Ben Basat
#: et al., 2024, with p = 2^-9 and its default shared-randomness index).
REFERENCE_GAUSSIAN: dict[str, dict[int, float]] = {
    "unbiased": {1: math.pi / 2 - 1, 2: 0.1331, 3: 0.0358, 4: 0.00959, 5: 0.00251, 6: 0.000645},
    "biased": {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.0346, 4: 0.00950},
    "quic-fl": {1: 1.467, 2: 0.2149, 3: 0.0431, 4: 0.00968},
}
#: EDEN unbiased after one RHT on inputs where one RHT is not enough (REFERENCE.md "Number of
#: composed RHTs"; "Quantizing With Randomized Hadamard Transforms", Theorems 1-3), by
#: (input, bits). With two or three RHTs (or the adaptive "auto") these inputs give the
#: Gaussian figures.
REFERENCE_ONE_RHT: dict[tuple[str, int], float] = {
    ("lognormal", 1): 0.570, ("lognormal", 4): 0.0096, ("two-spikes", 1): 1.000,
    ("two-spikes", 4): 0.0105, ("block8", 1): 0.664,
}
#: allowance on top of 3 standard errors: the table's rounding and its large-d limit
REFERENCE_SLACK = 0.02


# ---- configuration --------------------------------------------------------------------
def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config key '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rotation(value: Any) -> int | str:
    if isinstance(value, bool) or value not in ROTATION_SPECS:
        raise ValueError(f"config key 'rotations' has {value!r}; allowed values: "
                         f"{list(ROTATION_SPECS)}")
    return value


def _check_table(table: dict, where: str) -> dict:
    """Validate the keys and values of one config level (top level or [quick])."""
    allowed = ALLOWED_KEYS if where == "config" else sorted(DEFAULTS)
    for key in table:
        if key not in allowed:
            raise ValueError(f"unknown {where} key '{key}'; allowed keys: {allowed}")
    out = dict(table)
    for key in ("d", "clients", "trials"):
        if key in out:
            _positive_int(key, out[key])
    if "d" in out and out["d"] < 8:
        raise ValueError(f"config key 'd' must be at least 8, got {out['d']}")
    if "seed" in out:
        _positive_int("seed", out["seed"], minimum=0)
        if out["seed"] >= 2**64:
            raise ValueError(f"config key 'seed' must be below 2^64, got {out['seed']}")
    if "inputs" in out:
        if not isinstance(out["inputs"], list) or not out["inputs"]:
            raise ValueError(f"config key 'inputs' must be a non-empty list of {list(INPUTS)}")
        for name in out["inputs"]:
            if name not in INPUTS:
                raise ValueError(f"config key 'inputs' has {name!r}; allowed values: "
                                 f"{list(INPUTS)}")
    if "rotations" in out:
        if not isinstance(out["rotations"], list) or not out["rotations"]:
            raise ValueError(f"config key 'rotations' must be a non-empty list of "
                             f"{list(ROTATION_SPECS)}")
        for value in out["rotations"]:
            _check_rotation(value)
    if "studies" in out and not isinstance(out["studies"], bool):
        raise ValueError(f"config key 'studies' must be true or false, got {out['studies']!r}")
    if "codecs" in out:
        expand_codecs(out["codecs"], out.get("rotations", DEFAULTS["rotations"]))
    if "quick" in out:
        if not isinstance(out["quick"], dict):
            raise ValueError("config key 'quick' must be a table of overrides")
        _check_table(out["quick"], "[quick]")
    return out


def validate_config(config: dict) -> dict:
    """The config with unknown keys and bad values rejected (ValueError naming the key)."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a table, got {type(config).__name__}")
    return _check_table(config, "config")


def load_config(path: str | pathlib.Path = DEFAULT_CONFIG) -> dict:
    """Read a dme TOML config and validate it."""
    path = pathlib.Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from None
    return validate_config(config)


def resolve_config(config: dict, quick: bool = False) -> dict:
    """Defaults, then the config, then (with quick) its [quick] overrides."""
    config = validate_config(config)
    merged = {**DEFAULTS, **{k: v for k, v in config.items() if k != "quick"}}
    if quick:
        merged.update(config.get("quick", QUICK_DEFAULTS))
    return merged


def _grid(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand list-valued parameters into their cartesian product."""
    keys = list(params)
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def expand_codecs(spec: str | list, rotations: list) -> list[tuple[str, dict[str, Any]]]:
    """(codec name, params) for every setting of the config's `codecs` entry; codecs with
    a `rotations` parameter get one setting per rotation spec unless they fix it."""
    if spec == "default":
        entries = [{"codec": name, **DEFAULT_SETTINGS.get(name, {})}
                   for name in fq.available_codecs()]
    elif isinstance(spec, list) and spec and all(isinstance(e, dict | str) for e in spec):
        entries = [{"codec": e} if isinstance(e, str) else e for e in spec]
    else:
        raise ValueError(f"config key 'codecs' must be \"default\" or a non-empty list of "
                         f"tables like {{codec = \"eden\", bits = [1, 2]}}, got {spec!r}")
    settings = []
    for entry in entries:
        entry = dict(entry)
        name = entry.pop("codec", None)
        if isinstance(name, str) and ":" in name:  # a codec spec "eden:bits=2"
            name, spec_params = fq.codecs.typed_codec_spec(name)
            entry = {**spec_params, **entry}
        if name not in fq.available_codecs():
            raise ValueError(f"config key 'codecs': codec {name!r} is not registered; "
                             f"allowed: {fq.available_codecs()}")
        klass = fq.codecs.codec_class(name)
        for params in _grid(entry):
            if "rotations" in klass._defaults() and "rotations" not in params:
                variants = [{**params, "rotations": r} for r in rotations]
            else:
                variants = [params]
            for p in variants:
                fq.get_codec(name, **p)  # ValueError naming a bad or unknown parameter
                settings.append((name, p))
    return settings


# ---- measurement ----------------------------------------------------------------------
def _label(name: str, params: dict[str, Any], drop: tuple[str, ...] = ("rotations",)) -> str:
    shown = [f"{k}={v}" for k, v in params.items() if k not in drop]
    return " ".join([name, *shown])


def _input_seed(seed: int, input_index: int, trial: int, client: int) -> int:
    return fqr.hash64(seed, _INPUT_PURPOSE + input_index, (trial << 32) + client)


def _measure(codec: fq.Codec, xs: list[torch.Tensor], round_seed: int) -> dict[str, Any]:
    """One trial: encode every client through the wire, decode, average."""
    encs, blobs, vnmses, encode_s = [], [], [], 0.0
    correlated = {"clients", "client"} <= set(codec.params())
    for i, x in enumerate(xs):
        start = time.perf_counter()
        if correlated:  # correlated quantization: the round's clients take strata 0..n-1
            stratum = type(codec)(**{**codec.params(), "clients": len(xs), "client": i})
            blob = stratum.encode(x, seed=round_seed).to_bytes()  # one shared seed
        else:
            blob = codec.encode(x, seed=fqr.derive_seed(round_seed, i)).to_bytes()
        encode_s += time.perf_counter() - start
        enc = fq.Encoded.from_bytes(blob)
        encs.append(enc)
        blobs.append(blob)
        vnmses.append(fq.vnmse(x, fq.decode(enc)))
    stats: dict[str, list[float]] = {}
    for enc in encs:
        for k, v in codec.stats(enc).items():
            stats.setdefault(k, []).append(float(v))
    return {
        "vnmse": vnmses,
        "nmse": fq.nmse(xs, fq.decode_mean(encs)),
        "bytes": [len(b) for b in blobs],
        "rotations_used": [enc.rotations for enc in encs],
        "encode_ms": 1000 * encode_s / len(xs),
        "stats": stats,
    }


def _row(input_name: str, name: str, params: dict, cfg: dict, trials: list[dict]) -> dict:
    codec = fq.get_codec(name, **params)
    vnmses = [v for t in trials for v in t["vnmse"]]
    nbytes = [b for t in trials for b in t["bytes"]]
    nmse = statistics.fmean(t["nmse"] for t in trials)
    row = {
        "input": input_name,
        "codec": name,
        "label": _label(name, params),
        "series": _label(name, params, drop=("rotations", "bits")),
        "params": json.dumps({k: v for k, v in params.items() if k != "rotations"}),
        "rotations": str(params.get("rotations", "-")),
        "rotations_used": statistics.fmean(r for t in trials for r in t["rotations_used"]),
        "d": cfg["d"],
        "clients": cfg["clients"],
        "trials": cfg["trials"],
        "bytes": statistics.fmean(nbytes),
        "bits_per_coord": 8 * statistics.fmean(nbytes) / cfg["d"],
        "vnmse": statistics.fmean(vnmses),
        "vnmse_se": (statistics.stdev(vnmses) / math.sqrt(len(vnmses))
                     if len(vnmses) > 1 else 0.0),
        "nmse": nmse,
        "n_times_nmse": nmse * cfg["clients"],
        "unbiased": codec.is_unbiased,
        "encode_ms": statistics.fmean(t["encode_ms"] for t in trials),
    }
    keys = sorted({k for t in trials for k in t["stats"]})
    for k in keys:
        row[f"stat_{k}"] = statistics.fmean(v for t in trials for v in t["stats"].get(k, []))
    return row


def measure_all(cfg: dict, progress: bool = True) -> tuple[list[dict], list[str]]:
    """Every (input, codec setting) point of a resolved config, as row dicts, and the
    settings skipped because their codec cannot encode a flat vector (with the reason)."""
    settings = expand_codecs(cfg["codecs"], cfg["rotations"])
    codecs = [fq.get_codec(name, **params) for name, params in settings]
    skipped: dict[int, str] = {}
    results: dict[tuple[int, int], list[dict]] = {}
    total = len(cfg["inputs"]) * cfg["trials"] * len(settings)
    with _progress(progress) as bar:
        task = bar.add_task("fedquant dme", total=total)
        for ii, input_name in enumerate(cfg["inputs"]):
            for trial in range(cfg["trials"]):
                xs = [make_input(input_name, cfg["d"], _input_seed(cfg["seed"], ii, trial, c))
                      for c in range(cfg["clients"])]
                round_seed = fqr.derive_seed(cfg["seed"], trial)
                for si, codec in enumerate(codecs):
                    bar.update(task, description=f"{input_name}: {settings[si][0]}")
                    bar.advance(task)
                    if si in skipped:
                        continue
                    try:
                        results.setdefault((ii, si), []).append(_measure(codec, xs, round_seed))
                    except Exception as e:  # e.g. a codec for 2-D matrices only; one
                        # codec's failure is reported, it does not hide the others' rows
                        skipped[si] = f"{_label(*settings[si])}: {type(e).__name__}: {e}"
                        results.pop((ii, si), None)
    rows = [_row(cfg["inputs"][ii], *settings[si], cfg, trials)
            for (ii, si), trials in sorted(results.items()) if si not in skipped]
    return rows, sorted(set(skipped.values()))


class _NoProgress:
    """Stand-in for rich's Progress when progress=False."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn())


# ---- outputs --------------------------------------------------------------------------
def write_rows(rows: list[dict], out_dir: pathlib.Path, stem: str = "rows") -> None:
    """rows.csv (union of columns, in first-seen order) and rows.json."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1, default=str))


def _plot_rotation(cfg: dict) -> str:
    return "auto" if "auto" in cfg["rotations"] else str(cfg["rotations"][0])


def plot_vnmse_vs_bits(rows: list[dict], cfg: dict, path: pathlib.Path) -> None:
    """One panel per input, one line per codec series, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rot = _plot_rotation(cfg)
    inputs = cfg["inputs"]
    fig, axes = plt.subplots(1, len(inputs), figsize=(4.2 * len(inputs), 4), squeeze=False)
    for ax, input_name in zip(axes[0], inputs, strict=True):
        chosen = [r for r in rows if r["input"] == input_name and r["rotations"] in (rot, "-")]
        for series in sorted({r["series"] for r in chosen}):
            pts = sorted((r["bits_per_coord"], r["vnmse"]) for r in chosen
                         if r["series"] == series and r["vnmse"] > 0)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=series)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{input_name} (rotations={rot})")
        ax.set_xlabel("measured bits per coordinate")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("vNMSE")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"vNMSE vs bits, d={cfg['d']}, {cfg['trials']} trials x {cfg['clients']} "
                 "clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _md_table(headers: list[str], body: list[list[Any]]) -> list[str]:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return markdown_table(headers, [[fmt(v) for v in row] for row in body])


def report_lines(rows: list[dict], cfg: dict) -> list[str]:
    """The dme part of report.md."""
    rot = _plot_rotation(cfg)
    n = cfg["clients"]
    lines = ["# fedquant dme", "",
             f"d = {cfg['d']}, {n} clients, {cfg['trials']} trials, seed {cfg['seed']}. "
             "Bits per coordinate are measured: 8 * len(bytes sent) / d.",
             "", "![vNMSE vs bits](vnmse_vs_bits.png)", ""]
    for input_name in cfg["inputs"]:
        chosen = [r for r in rows if r["input"] == input_name and r["rotations"] in (rot, "-")]
        lines += [f"## {input_name} (rotations={rot})", ""]
        lines += _md_table(
            ["codec", "bits/coord", "RHTs used", "vNMSE", f"NMSE({n})", f"{n} x NMSE",
             "unbiased"],
            [[r["label"], r["bits_per_coord"], r["rotations_used"], r["vnmse"], r["nmse"],
              r["n_times_nmse"], r["unbiased"]] for r in chosen])
        lines.append("")
    specs = [str(r) for r in cfg["rotations"]]
    if len(specs) > 1:
        lines += ["## vNMSE by number of composed RHTs", ""]
        for input_name in cfg["inputs"]:
            by_label: dict[str, dict[str, float]] = {}
            for r in rows:
                if r["input"] == input_name and r["rotations"] != "-":
                    by_label.setdefault(r["label"], {})[r["rotations"]] = r["vnmse"]
            lines += [f"### {input_name}", ""]
            lines += _md_table(["codec", *[f"rotations={s}" for s in specs]],
                               [[label, *[v.get(s, "") for s in specs]]
                                for label, v in by_label.items()])
            lines.append("")
    return lines


def _study_section(title: str, rows: list[dict]) -> list[str]:
    lines = [f"## {title}", ""]
    if not rows:
        return lines + ["(no rows)", ""]
    headers = list(rows[0])
    lines += _md_table(headers, [[r.get(h, "") for h in headers] for r in rows[:60]])
    if len(rows) > 60:
        lines.append(f"\n({len(rows) - 60} more rows in the study's own files)")
    return lines + [""]


def reference_vnmse(row: dict) -> float | None:
    """The reference table's vNMSE for a row's (codec, params, input, rotations), or None
    where the table has no figure (other codecs, other inputs, non-default QUIC-FL)."""
    params = json.loads(row["params"])
    codec, rot, input_name = row["codec"], str(row["rotations"]), row["input"]
    if codec in ("eden", "drive"):
        bits = 1 if codec == "drive" else params.get("bits", 2)
        scale = params.get("scale", "unbiased")
    elif codec == "quic-fl":
        if params.get("shared_bits", -1) != -1 or params.get("p", 2.0**-9) != 2.0**-9:
            return None
        bits, scale = params.get("bits", 2), "quic-fl"
    else:
        return None
    if isinstance(bits, float) and bits.is_integer():
        bits = int(bits)
    gaussian = REFERENCE_GAUSSIAN.get(scale, {}).get(bits)
    if input_name == "normal":
        return gaussian
    if input_name in ("lognormal", "two-spikes", "block8"):
        if rot in ("2", "3", "auto"):
            return gaussian
        if rot == "1" and scale == "unbiased":
            return REFERENCE_ONE_RHT.get((input_name, bits))
    return None


def reference_claim(rows: list[dict]) -> tuple[list[dict], str]:
    """vNMSE of the reference codecs within sampling error of REFERENCE.md's tables.

    For every row with a reference figure (``reference_vnmse``): |vNMSE - reference| <= 3
    standard errors over the row's clients x trials + 2% (``REFERENCE_SLACK``: the table's
    rounding and its large-d limit). A codec that returns zeros (vNMSE 1), a rotation that
    does nothing (two spikes stay two spikes) or a wrong scale misses by far more. No check
    when no row has a reference figure.
    """
    lines, ok, worst, count = [], True, 0.0, 0
    for r in rows:
        ref = reference_vnmse(r)
        if ref is None:
            continue
        count += 1
        tol = 3 * r["vnmse_se"] + REFERENCE_SLACK * ref
        dev = abs(r["vnmse"] - ref)
        hit = dev <= tol
        ok &= hit
        worst = max(worst, dev / tol)
        lines.append(f"- {r['input']}, {r['label']}, rotations={r['rotations']}: vNMSE "
                     f"{r['vnmse']:.4g} (se {r['vnmse_se']:.2g}) vs reference {ref:.4g}, "
                     f"tolerance {tol:.2g} [{'PASS' if hit else 'FAIL'}]")
    if not count:
        return [], ("## Claim: vNMSE matches the reference table\n\nNo measured setting has a "
                    "reference figure (EDEN, DRIVE or default QUIC-FL on normal, lognormal, "
                    "two-spikes or block8 inputs): no check.\n")
    check = check_row("dme", "vNMSE of EDEN/DRIVE/QUIC-FL within sampling error of the "
                      "reference table", f"{count} settings; worst |deviation| / tolerance "
                      f"{worst:.2f}", ok)
    text = ("## Claim: vNMSE matches the reference table\n\n"
            "REFERENCE.md's vNMSE per scheme and bits (Gaussian after rotation: normal inputs, "
            "and lognormal, two-spikes, block8 with 2, 3 or adaptive RHTs) and EDEN's one-RHT "
            "figures. Check: |measured - reference| <= 3 standard errors + 2% for every "
            "setting (see `reference_claim`).\n\n" + "\n".join(lines)
            + f"\n- check: {'PASS' if ok else 'FAIL'}\n")
    return [check], text


def run_studies(out_dir: pathlib.Path, quick: bool) -> list[str]:
    """Run the other engineers' studies that exist; their report.md sections."""
    lines: list[str] = []
    for module, function, title in STUDIES:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            study_rows = getattr(importlib.import_module(module), function)(out_dir, quick)
        except Exception as e:  # another area's failure must not hide the dme results
            lines += [f"## {title}", "", f"**{module}.{function} failed:** `{e!r}`", ""]
            continue
        lines += _study_section(title, list(study_rows))
    return lines


def print_summary(rows: list[dict], cfg: dict) -> None:
    """A rich table: one line per codec setting, vNMSE per input (plot rotation)."""
    from rich.console import Console
    from rich.table import Table

    rot = _plot_rotation(cfg)
    table = Table(title=f"fedquant dme: vNMSE (rotations={rot}, d={cfg['d']})")
    table.add_column("codec")
    table.add_column("bits/coord", justify="right")
    for input_name in cfg["inputs"]:
        table.add_column(input_name, justify="right")
    table.add_column(f"NMSE({cfg['clients']}) {cfg['inputs'][0]}", justify="right")
    labels = list(dict.fromkeys(r["label"] for r in rows if r["rotations"] in (rot, "-")))
    for label in labels:
        by_input = {r["input"]: r for r in rows
                    if r["label"] == label and r["rotations"] in (rot, "-")}
        first = by_input[cfg["inputs"][0]]
        table.add_row(label, f"{first['bits_per_coord']:.3f}",
                      *[f"{by_input[i]['vnmse']:.4g}" for i in cfg["inputs"]],
                      f"{first['nmse']:.4g}")
    Console().print(table)


def run_dme(config: dict, out_dir: pathlib.Path, quick: bool = False,
            progress: bool = True) -> list[dict]:
    """Run the sweep of `config` (see configs/dme.toml), write out_dir, return the rows."""
    cfg = resolve_config(config, quick)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = measure_all(cfg, progress)
    for reason in skipped:
        warnings.warn(f"fedquant dme skipped {reason}", stacklevel=2)
    write_rows(rows, out_dir)
    plot_vnmse_vs_bits(rows, cfg, out_dir / "vnmse_vs_bits.png")
    lines = report_lines(rows, cfg)
    if skipped:
        lines += ["## Skipped settings", "", *[f"- {reason}" for reason in skipped], ""]
    if cfg["studies"]:
        lines += run_studies(out_dir, quick)
    checks, claim_text = reference_claim(rows)
    (out_dir / "checks.json").write_text(json.dumps(checks, indent=1))
    header = "\n".join(lines[:3]) + "\n\n"  # title and setup, then the claims
    write_claims_report(out_dir / "report.md", header, checks,
                        [claim_text, "\n".join(lines[4:]) + "\n"])
    return rows


def register(app) -> None:
    """Add `fedquant dme` to the console script."""

    @app.command("dme")
    def dme_command(
        config: Annotated[pathlib.Path, typer.Option(
            "--config", help="TOML config (see configs/dme.toml)")] = DEFAULT_CONFIG,
        out: Annotated[pathlib.Path, typer.Option("--out", help="output folder")] = (
            pathlib.Path("results/dme")),
        quick: Annotated[bool, typer.Option("--quick", help="small sizes, seconds")] = False,
    ) -> None:
        """vNMSE and NMSE(n) versus measured bits per coordinate for every codec."""
        try:
            cfg = load_config(config)
            resolved = resolve_config(cfg, quick)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--config") from None
        rows = run_dme(cfg, out, quick=quick)
        print_summary(rows, resolved)
        print_checks(f"dme claims -> {out}/report.md", reference_claim(rows)[0])
        typer.echo(f"wrote {out}/rows.csv, rows.json, checks.json, vnmse_vs_bits.png, "
                   "report.md")


__all__ = ["load_config", "make_input", "run_dme", "validate_config"]
