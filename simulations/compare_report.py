"""The files `fedquant compare` writes: CSVs, PNG plots, report.md, and the terminal summary.

Rows come from ``simulations.compare_sections``; the keys read here are
DME {label, input, rotations, bits_per_coord, vnmse, nmse}, FL {label, round, accuracy,
cum_uplink_bytes}, speed {label, d, encode_ms, decode_ms, rw_pass_ms, encode_x_rw,
decode_x_rw}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
from fedquant.simulations.common import write_csv
from fedquant.simulations.compare import fl_finals

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _by_label(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def plot_dme(rows: list[dict], path: Path, input_name: str = "normal") -> None:
    """vNMSE against measured bits per coordinate (log-log), one line per codec family,
    at auto (or no) rotations; the 16/32-bit baselines are left out to keep the scale."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r["input"] == input_name and r["rotations"] in ("auto", "-") \
                and r["bits_per_coord"] <= 8:
            biased = json.loads(r["params"]).get("scale") == "biased"
            families.setdefault(r["codec"] + (" biased" if biased else ""), []).append(r)
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours, markers vary too
    for i, (fam, rs) in enumerate(sorted(families.items())):
        rs = sorted(rs, key=lambda r: r["bits_per_coord"])
        ax.plot([r["bits_per_coord"] for r in rs], [r["vnmse"] for r in rs], "-",
                marker="osD^v<>"[i % 7], color=colors[i % 20], label=fam)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("measured bits per coordinate (8 * len(bytes) / d)")
    ax.set_ylabel("vNMSE")
    ax.set_title(f"Error vs bandwidth, input {input_name}, auto rotations")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fl(rows: list[dict], path_rounds: Path, path_mb: Path) -> None:
    """Accuracy against rounds, and against cumulative uplink megabytes (log x)."""
    for path, xkey, xlabel, logx in (
        (path_rounds, "round", "round", False),
        (path_mb, "cum_uplink_bytes", "cumulative uplink MB (all clients)", True),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for lab, rs in sorted(_by_label(rows).items()):
            # round 0 (the initial model, nothing sent yet) has no place on a log axis
            rs = sorted((r for r in rs if not logx or r[xkey] > 0), key=lambda r: r["round"])
            xs = [r[xkey] / (1e6 if xkey != "round" else 1) for r in rs]
            ax.plot(xs, [100 * r["accuracy"] for r in rs], label=lab)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def plot_speed(rows: list[dict], path: Path) -> None:
    """Encode and decode time per codec, as multiples of one read+write pass."""
    fig, ax = plt.subplots(figsize=(8, 5))
    labs = [r["label"] for r in rows]
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r["encode_x_rw"] for r in rows], 0.4, label="encode")
    ax.barh([y + 0.2 for y in ys], [r["decode_x_rw"] for r in rows], 0.4, label="decode")
    ax.set_yticks(list(ys), labs)
    ax.set_xscale("log")
    ax.set_xlabel("time / one read+write pass of the same array (lower is faster)")
    ax.set_title(f"Speed at d = {rows[0]['d'] if rows else '?'}")
    ax.legend()
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def dme_summary(rows: list[dict], input_name: str = "normal") -> list[dict]:
    """One row per codec setting at auto rotations: bits, vNMSE, NMSE(n)."""
    return sorted((r for r in rows if r["input"] == input_name
                   and r["rotations"] in ("auto", "-")),
                  key=lambda r: (r["bits_per_coord"], r["vnmse"]))


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    """report.md, the CSVs and the plots."""
    dme, fl, speed = results["dme"], results["fl"], results["speed"]
    write_csv(out_dir / "dme.csv", dme)
    write_csv(out_dir / "fl.csv", fl)
    write_csv(out_dir / "speed.csv", speed)
    if dme:
        plot_dme(dme, out_dir / "dme_vnmse_vs_bits.png")
    if fl:
        plot_fl(fl, out_dir / "fl_accuracy_vs_rounds.png", out_dir / "fl_accuracy_vs_uplink.png")
    if speed:
        plot_speed(speed, out_dir / "speed.png")
    cfg = results["config"]
    n = cfg.get("dme", {}).get("clients", 10)
    parts = [f"# fedquant compare: {cfg.get('name', 'compare')}", "",
             f"Seed {cfg['seed']}. Bandwidth is measured: 8 * len(bytes) / coordinates, "
             "headers, scales and padding included. Same command and config give the "
             "same numbers.", ""]
    parts += ["## Recommendation", ""]
    rec = results.get("best_per_budget") or []
    if rec:
        parts += ["Lowest worst-case NMSE over the natural inputs (N(0,1), LogNormal(0,1), "
                  "digits gradients) at each bit budget, auto rotations:", ""]
        parts.append(_table(["bit budget", "lowest-error codec", "bits/coord",
                             f"worst NMSE(n={n})", "on input", "vNMSE there"],
                            [[r["budget"], r["codec"], _fmt(r["bits_per_coord"], 3),
                              _fmt(r["nmse"]), r["worst_input"], _fmt(r["vnmse"])]
                             for r in rec]))
    cheap = results.get("cheapest_within_1pt")
    if cheap:
        parts += ["", f"Cheapest codec within 1 accuracy point of fp32 in federated training "
                  f"(accuracy = mean of the last 3 rounds, to damp round-to-round noise): "
                  f"**{cheap['label']}**, {100 * cheap['tail_accuracy']:.1f}% "
                  f"(fp32 {100 * cheap['fp32_accuracy']:.1f}%) with "
                  f"{cheap['uplink_mb']:.3g} MB uplink (fp32 {cheap['fp32_uplink_mb']:.3g} MB, "
                  f"{cheap['fp32_uplink_mb'] / max(cheap['uplink_mb'], 1e-12):.1f}x less)."]
    parts += ["", "## 1. Distributed mean estimation", "",
              f"Input N(0,1), rotations auto; NMSE over n = {n} clients. "
              "Full table (every input and rotation count): `dme.csv`.", "",
              "![vNMSE vs bits](dme_vnmse_vs_bits.png)", ""]
    parts.append(_table(["codec", "bits/coord", "vNMSE", f"NMSE(n={n})", "RHTs used"],
                        [[r["label"], _fmt(r["bits_per_coord"], 3), _fmt(r["vnmse"]),
                          _fmt(r["nmse"]), r.get("rotations_used", "")]
                         for r in dme_summary(dme)]))
    adv = [r for r in dme if r["input"] != "normal" and r["label"].startswith("eden b=1")
           and "biased" not in r["label"]]
    if adv:
        parts += ["", "EDEN b=1 (unbiased) by input and number of RHTs (RHT paper: one RHT fails "
                  "on structured inputs, two restore the Gaussian figure 0.571):", ""]
        inputs = sorted({r["input"] for r in adv})
        rots = ["1", "2", "3", "auto"]
        cell = {(r["input"], r["rotations"]): r["vnmse"] for r in adv}
        parts.append(_table(["input"] + [f"{k} RHT" for k in rots],
                            [[i] + [_fmt(cell[(i, k)]) if (i, k) in cell else "-" for k in rots]
                             for i in inputs]))
    parts += ["", "## 2. Federated training", "",
              f"{cfg.get('fl', {}).get('dataset', 'digits')}, "
              f"{cfg.get('fl', {}).get('clients', 10)} clients, Dirichlet alpha "
              f"{cfg.get('fl', {}).get('alpha', 0.5)}.", "",
              "![accuracy vs rounds](fl_accuracy_vs_rounds.png)",
              "![accuracy vs uplink](fl_accuracy_vs_uplink.png)", ""]
    parts.append(_table(["codec", "final accuracy", "mean of last 3 rounds", "uplink MB",
                         "rounds"],
                        [[f["label"], f"{100 * f['accuracy']:.1f}%",
                          f"{100 * f['tail_accuracy']:.1f}%", _fmt(f["uplink_mb"]), f["rounds"]]
                         for f in fl_finals(fl)]))
    parts += ["", "## 3. Speed", "", "Median times on one thread; the baseline is one read+write "
              "pass of the same array, measured in the same run.", "", "![speed](speed.png)", ""]
    parts.append(_table(["codec", "d", "encode ms", "decode ms", "read+write ms",
                         "encode / rw", "decode / rw"],
                        [[r["label"], r["d"], _fmt(r["encode_ms"]), _fmt(r["decode_ms"]),
                          _fmt(r["rw_pass_ms"]), _fmt(r["encode_x_rw"], 3),
                          _fmt(r["decode_x_rw"], 3)] for r in speed]))
    for name, study in (results.get("studies") or {}).items():
        parts += ["", f"## Seed study: {name}", "", f"See `{study['report']}`."]
    parts += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=1), "```", "",
              "## Versions", "", _table(["package", "version"],
                                        [[k, v] for k, v in results["versions"].items()]),
              "", "Section wall times (s): " + json.dumps(results["timings_s"]), ""]
    (out_dir / "report.md").write_text("\n".join(parts))


def print_summary(results: dict[str, Any], console) -> None:
    """The terminal summary: the recommendation and the FL finals."""
    from rich.table import Table

    t = Table(title="Lowest worst-case NMSE per bit budget (natural inputs)")
    for h in ("budget", "codec", "bits/coord", "worst NMSE", "on input"):
        t.add_column(h)
    for r in results.get("best_per_budget") or []:
        t.add_row(str(r["budget"]), r["codec"], _fmt(r["bits_per_coord"], 3), _fmt(r["nmse"]),
                  r["worst_input"])
    console.print(t)
    t = Table(title="Federated training (digits)")
    for h in ("codec", "final acc", "last-3 mean", "uplink MB"):
        t.add_column(h)
    for f in fl_finals(results["fl"]):
        t.add_row(f["label"], f"{100 * f['accuracy']:.1f}%", f"{100 * f['tail_accuracy']:.1f}%",
                  _fmt(f["uplink_mb"]))
    console.print(t)
    cheap = results.get("cheapest_within_1pt")
    if cheap:
        console.print(f"Cheapest within 1 point of fp32: [bold]{cheap['label']}[/bold] "
                      f"({cheap['uplink_mb']:.3g} MB vs {cheap['fp32_uplink_mb']:.3g} MB)")
