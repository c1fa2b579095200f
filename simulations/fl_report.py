"""`fedquant fl`'s results: per-codec summaries over seeds, time to accuracy, plots, report.

Every figure follows :mod:`fedquant.simulations.evaluation` (a run's accuracy, the paired
interval against fp32, the target, when a run reaches it) and
:mod:`fedquant.simulations.network` (wall-clock rounds on each configured link).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fedquant.simulations import evaluation, network
from fedquant.simulations.common import markdown_table
from fedquant.simulations.evaluation import Interval

CSV_COLUMNS = ("label", "codec", "params", "seed", "round", "accuracy", "loss", "uplink_bytes",
               "cum_uplink_bytes", "downlink_bytes", "clients", "dropped", "wall_s", "numel",
               "model_bytes", "server_s")
PTQ_COLUMNS = ("label", "final_ptq", "bits", "calib_size", "accuracy_before", "accuracy_after",
               "accuracy_drop", "loss_before", "loss_after", "fp32_bytes", "ptq_bytes")


# ---- grouping -----------------------------------------------------------------------------
def runs_by_label(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """{label: {seed: that run's rows sorted by round}}, labels in the order they ran."""
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["label"], {}).setdefault(r["seed"], []).append(r)
    for runs in out.values():
        for seed in runs:
            runs[seed].sort(key=lambda r: r["round"])
    return out


def reference_label(rows: list[dict]) -> str | None:
    """The fp32 run's label (the baseline of every comparison), if one ran."""
    return next((r["label"] for r in rows if r["codec"] == "fp32"), None)


def links_of(cfg: dict) -> tuple[network.Link, ...]:
    """The links of a `fedquant fl` config (or compare's [fl] table); the defaults if unset."""
    return network.parse_links(cfg.get("links") or network.DEFAULT_LINKS)


def _timed(run: list[dict]) -> bool:
    return all(r.get("client_s") is not None for r in run)


def _bits_per_coord(run: list[dict]) -> float:
    sent = [r for r in run if r["round"] > 0 and r["clients"]]
    if not sent or not sent[0].get("numel"):
        return math.nan
    payloads = sum(len(r["client_bytes"]) if r.get("client_bytes") is not None
                   else r["clients"] for r in sent)
    return 8 * sum(r["uplink_bytes"] for r in sent) / (payloads * sent[0]["numel"])


# ---- summary ------------------------------------------------------------------------------
def summarize(cfg: dict, rows: list[dict]) -> list[dict]:
    """One dict per codec over its seeds: accuracy interval, paired difference to fp32 and
    its verdict, uplink, bits per coordinate, and per link the seconds and uplink bytes to
    the target accuracy (fp32's accuracy minus ``target_points``)."""
    points = float(cfg.get("target_points", evaluation.TARGET_POINTS))
    runs = runs_by_label(rows)
    ref = reference_label(rows)
    acc = {lab: {s: evaluation.run_accuracy([r["accuracy"] for r in run])
                 for s, run in by_seed.items()} for lab, by_seed in runs.items()}
    # the target of each seed is fp32's accuracy on that seed (same data, model, clients)
    targets = {s: a - points / 100 for s, a in acc[ref].items()} if ref else {}
    target = sum(targets.values()) / len(targets) if targets else None
    ref_mb = (sum(run[-1]["cum_uplink_bytes"] for run in runs[ref].values()) / len(runs[ref])
              / 1e6 if ref else math.nan)
    out = []
    for lab, by_seed in runs.items():
        first = next(iter(by_seed.values()))
        uplink_mb = sum(run[-1]["cum_uplink_bytes"] for run in by_seed.values()) / len(by_seed)
        uplink_mb /= 1e6
        item: dict[str, Any] = {
            "label": lab, "codec": first[0]["codec"], "seeds": sorted(by_seed),
            "accuracy": evaluation.mean_ci(list(acc[lab].values())),
            "uplink_mb": uplink_mb, "uplink_vs_fp32": uplink_mb / ref_mb if ref_mb else math.nan,
            "bits_per_coord": sum(_bits_per_coord(run) for run in by_seed.values()) / len(by_seed),
            "wall_s": sum(r["wall_s"] for run in by_seed.values() for r in run),
            "rounds": first[-1]["round"], "target": target, "targets": targets,
            "late_gain": evaluation.mean_ci([_late_gain(run) for run in by_seed.values()]),
            "difference": None,
            "verdict": None, "to_target": {}}
        if ref:
            item["difference"] = evaluation.paired_difference(acc[lab], acc[ref])
            item["verdict"] = evaluation.verdict(item["difference"], points)
            item["to_target"] = _to_target(by_seed, targets, links_of(cfg))
        out.append(item)
    return out


def _late_gain(run: list[dict], fraction: float = 0.2) -> float:
    """How much a run's accuracy rose over its last `fraction` of rounds (a run that has
    converged gains about nothing)."""
    accs = [r["accuracy"] for r in run]
    cut = max(1, round(len(accs) * (1 - fraction)))
    return evaluation.run_accuracy(accs) - evaluation.run_accuracy(accs[:cut])


def convergence_text(summary: list[dict]) -> str:
    """One sentence on whether fp32 converged: its gain over the last 20% of rounds."""
    ref = next((s for s in summary if s["codec"] == "fp32"), None)
    if ref is None:
        return ""
    gain = ref["late_gain"]
    return (f"Convergence: fp32's accuracy rose {gain.text(100, signed=True)} points over the "
            f"last 20% of the {ref['rounds']} rounds"
            + (" (still climbing: more rounds would raise it)." if gain.mean > 0.01 else "."))


def _to_target(by_seed: dict[int, list[dict]], targets: dict[int, float],
               links: tuple[network.Link, ...]) -> dict[str, dict]:
    """Per link (and "rounds"): how many seeds reached their target, and the interval of the
    seconds (or rounds) and uplink MB it took them (seeds fp32 did not run count as not
    reached)."""
    reached = {s: evaluation.first_reach([r["accuracy"] for r in run], targets[s])
               if s in targets else None for s, run in by_seed.items()}
    hit = {s: i for s, i in reached.items() if i is not None}
    out: dict[str, dict] = {}
    base = {"reached": len(hit), "seeds": len(by_seed)}
    mb = [by_seed[s][i]["cum_uplink_bytes"] / 1e6 for s, i in hit.items()]
    out["rounds"] = {**base, "value": evaluation.mean_ci(
        [by_seed[s][i]["round"] for s, i in hit.items()]) if hit else None,
        "uplink_mb": evaluation.mean_ci(mb) if hit else None}
    if not all(_timed(run) for run in by_seed.values()):
        return out
    for link in links:
        secs = [network.elapsed_seconds(by_seed[s], link)[i] for s, i in hit.items()]
        out[link.name] = {**base, "value": evaluation.mean_ci(secs) if hit else None,
                          "uplink_mb": out["rounds"]["uplink_mb"]}
    return out


def reach_text(entry: dict | None, unit: str = "s", digits: int = 3) -> str:
    """"12.3 s [10.1, 14.5]" when every seed reached the target, "2/3 seeds: 12.3 s" when
    some did, "not reached" when none did."""
    if not entry or entry["value"] is None:
        return "not reached"
    v: Interval = entry["value"]
    unit = f" {unit}" if unit else ""
    text = f"{v.mean:.{digits}g}{unit}"
    if v.n >= 2:  # rounds, bytes and seconds are >= 0: the t-interval's low end clipped
        text += f" [{max(0.0, v.low):.{digits}g}, {v.high:.{digits}g}]"
    if entry["reached"] < entry["seeds"]:
        text = f"{entry['reached']}/{entry['seeds']} seeds: {text}"
    return text


def short_reach(entry: dict | None) -> str:
    if not entry or entry["value"] is None:
        return "-"
    seeds = "" if entry["reached"] == entry["seeds"] else f" ({entry['reached']}/{entry['seeds']})"
    return f"{entry['value'].mean:.3g} s{seeds}"


def verdict_text(item: dict, points: float) -> str:
    """The paired difference to fp32 and what it says, e.g. "-0.3 [-0.9, +0.4]: within"."""
    if item["difference"] is None:
        return "-"
    if item["codec"] == "fp32":
        return "reference"
    diff = item["difference"].text(100, signed=True)
    words = {evaluation.WITHIN: f"within {points:g} pt", evaluation.LAGS: f"lags > {points:g} pt",
             evaluation.INCONCLUSIVE: "inconclusive", evaluation.UNDETERMINED: "1 seed"}
    return f"{diff}: {words[item['verdict']]}"


# ---- curves and plots ---------------------------------------------------------------------
def mean_curve(by_seed: dict[int, list[dict]], ys: str | None = None,
               xs: Any = "round") -> tuple[list[float], list[Interval]]:
    """(x per round averaged over seeds, accuracy interval per round); `xs` is a row key
    or a function run -> list of x values."""
    runs = list(by_seed.values())
    n = min(len(run) for run in runs)
    xcol = [(xs(run) if callable(xs) else [r[xs] for r in run])[:n] for run in runs]
    x = [sum(col[i] for col in xcol) / len(xcol) for i in range(n)]
    y = [evaluation.mean_ci([run[i][ys or "accuracy"] for run in runs]) for i in range(n)]
    return x, y


def _draw(ax, by_seed: dict, label: str, xs: Any, scale: float = 1.0,
          skip_zero: bool = False) -> None:
    from fedquant.simulations.plotting import codec_color, codec_linestyle

    x, y = mean_curve(by_seed, xs=xs)
    keep = [i for i in range(len(x)) if not (skip_zero and x[i] <= 0)]
    xv = [x[i] / scale for i in keep]
    color = codec_color(label)
    ax.plot(xv, [100 * y[i].mean for i in keep], color=color, ls=codec_linestyle(label),
            label=label, lw=1.4)
    if all(y[i].n >= 2 for i in keep):
        ax.fill_between(xv, [max(0.0, 100 * y[i].low) for i in keep],
                        [min(100.0, 100 * y[i].high) for i in keep], color=color, alpha=0.12,
                        lw=0)


def plot_results(cfg: dict, rows: list[dict], out_dir: Path, title: str,
                 target: float | None = None) -> list[str]:
    """accuracy_vs_rounds.png, accuracy_vs_uplink.png and, when the runs were timed,
    accuracy_vs_time.png (one panel per link), with the mean `target` as a dotted line;
    returns the file names written."""
    from fedquant.simulations.plotting import legend_outside, plt, save

    runs = runs_by_label(rows)
    seeds = max(len(v) for v in runs.values())
    band = f"mean of {seeds} seeds, 95% interval shaded" if seeds > 1 else "one seed"
    written = []
    for name, xs, scale, xlabel, logx in (
            ("accuracy_vs_rounds.png", "round", 1, "round", False),
            ("accuracy_vs_uplink.png", "cum_uplink_bytes", 1e6,
             "cumulative uplink of all clients (MB, log)", True)):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for lab, by_seed in runs.items():
            _draw(ax, by_seed, lab, xs, scale, skip_zero=logx)
        _finish(ax, xlabel, f"{title}: {band}", target, logx)
        legend_outside(ax)
        save(fig, out_dir / name)
        written.append(name)
    links = links_of(cfg)
    if all(_timed(run) for by_seed in runs.values() for run in by_seed.values()):
        fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links) + 1.5, 4.2),
                                 sharey=True, squeeze=False)
        for ax, link in zip(axes[0], links, strict=True):
            for lab, by_seed in runs.items():
                _draw(ax, by_seed, lab, lambda run, lk=link: network.elapsed_seconds(run, lk),
                      skip_zero=True)
            _finish(ax, "simulated wall-clock (s, log)", f"uplink {link.uplink_mbps:g} / "
                    f"downlink {link.downlink_mbps:g} Mbit/s, {link.latency_ms:g} ms",
                    target, True)
        legend_outside(axes[0][-1])
        fig.suptitle(f"{title}: accuracy against simulated time ({band})", fontsize=10)
        save(fig, out_dir / "accuracy_vs_time.png")
        written.append("accuracy_vs_time.png")
    return written


def _finish(ax, xlabel: str, title: str, target: float | None, logx: bool) -> None:
    from matplotlib.ticker import NullFormatter

    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlaps
    ax.set_ylim(0, 100)
    if target is not None:
        ax.axhline(100 * target, color="0.4", lw=0.8, ls=":", label="target")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


# ---- tables -------------------------------------------------------------------------------
def summary_table(cfg: dict, summary: list[dict]) -> list[str]:
    """The markdown table of accuracy, difference to fp32, bytes and time to target."""
    points = float(cfg.get("target_points", evaluation.TARGET_POINTS))
    names = [lk.name for lk in links_of(cfg)]
    timed = any(lk in s["to_target"] for s in summary for lk in names)
    headers = ["codec", "accuracy % (95% CI)", "vs fp32, points", "bits/coord", "uplink MB",
               "rounds to target", "uplink MB to target"]
    headers += [f"time to target, {n}" for n in names] if timed else []
    body = []
    for s in summary:
        tt = s["to_target"]
        rounds = tt.get("rounds")
        megabytes = {**rounds, "value": rounds["uplink_mb"]} if rounds else None
        row = [s["label"], s["accuracy"].text(100), verdict_text(s, points),
               f"{s['bits_per_coord']:.3g}", f"{s['uplink_mb']:.3g}",
               reach_text(rounds, ""), reach_text(megabytes, "")]
        row += [reach_text(tt.get(n)) for n in names] if timed else []
        body.append(row)
    return markdown_table(headers, body)


def _ptq_lines(ptqs: list[dict]) -> list[str]:
    """report.md's final-PTQ table (none when final_ptq_bits is 0)."""
    if not ptqs:
        return []
    p0 = ptqs[0]
    lines = ["", f"Final global model of the first seed quantized after training with "
             f"{p0['final_ptq']} at {p0['bits']} bits per weight (fedquant.ptq), calibration "
             f"batch of {p0['calib_size']} training rows; accuracy on the held-out split.", ""]
    return lines + markdown_table(
        ["compressor", "accuracy fp32", "accuracy PTQ", "drop (points, + = lost)",
         "fp32 bytes", "PTQ bytes", "fp32 / PTQ"],
        [[p["label"], f"{100 * p['accuracy_before']:.2f}%", f"{100 * p['accuracy_after']:.2f}%",
          f"{100 * p['accuracy_drop']:+.2f}", p["fp32_bytes"], p["ptq_bytes"],
          f"{p['fp32_bytes'] / p['ptq_bytes']:.2f}"] for p in ptqs])


def describe(cfg: dict) -> str:
    """One sentence: the task, clients, participation, split, rounds, seeds."""
    what = f"task {cfg['task']}" if cfg["task"] else f"{cfg['dataset']} / {cfg['model']}"
    per_round = max(1, int(cfg["fraction_train"] * cfg["num_clients"]))
    split = cfg["partitioning"] + ("" if cfg["partitioning"] == "iid"
                                   else f" (alpha {cfg['alpha']:g})")
    if cfg["task"] and not _task_takes(cfg["task"], "partitioning"):
        split = "the task's own split"
    seeds = ", ".join(str(cfg["seed"] + i) for i in range(cfg["repeats"]))
    return (f"{what}: {cfg['num_clients']} clients, {per_round} per round, {split}, "
            f"{cfg['rounds']} rounds of {cfg['local_epochs']} local epoch(s), lr {cfg['lr']:g}, "
            f"batch {cfg['batch_size']}, engine {cfg['engine']}; seeds {seeds}.")


def _task_takes(task: str, option: str) -> bool:
    """Whether the task module's load_data takes `option` (else it ignores the config's)."""
    import inspect

    from fedquant.fl.tasks import load_task_module

    return option in inspect.signature(load_task_module(task).load_data).parameters


def definitions(cfg: dict) -> str:
    """The report's paragraph on how accuracy, the target and time are defined."""
    points = float(cfg.get("target_points", evaluation.TARGET_POINTS))
    return (f"Accuracy of a run = mean test accuracy of its last {evaluation.TAIL_ROUNDS} "
            f"rounds; intervals are 95% Student-t over seeds; a codec is within {points:g} "
            "point(s) of fp32 only if the interval of its seed-paired difference lies above "
            f"-{points:g}. Target of a seed = fp32's accuracy on that seed - {points:g} "
            f"point(s); a run reaches it at the first round whose {evaluation.TAIL_ROUNDS}-round "
            "trailing mean is at least the target. Bytes are len(payload) of every client's "
            "upload. Time: per round the slowest sampled client's fp32 download + measured "
            "training and encoding + upload on the link (plus 2 latencies), then the measured "
            "server decode (docs/evaluation.md).")


def write_results(cfg: dict, rows: list[dict], out_dir: Path, quick: bool,
                  ptqs: list[dict] = ()) -> list[dict]:
    """rows.csv, rows.json, final_ptq.csv, the plots and report.md; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "rows.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if ptqs:
        with (out_dir / "final_ptq.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=PTQ_COLUMNS)
            writer.writeheader()
            writer.writerows(ptqs)
    summary = summarize(cfg, rows)
    config = {k: v for k, v in cfg.items() if k != "quick"}
    (out_dir / "rows.json").write_text(json.dumps(
        {"config": config, "quick": quick, "summary": summary, "rows": rows,
         "final_ptq": list(ptqs)}, indent=1, default=evaluation.json_default))
    plots = plot_results(cfg, rows, out_dir, cfg["name"],
                         summary[0]["target"] if summary else None)
    lines = [f"# fedquant fl: {cfg['name']}{' (quick)' if quick else ''}", "", describe(cfg),
             "", definitions(cfg), ""]
    if summary and summary[0]["targets"]:
        lines += ["Target accuracy by seed: " + ", ".join(
            f"{s}: {100 * t:.2f}%" for s, t in summary[0]["targets"].items()) + ".", ""]
    lines += summary_table(cfg, summary)
    lines += ["", convergence_text(summary)]
    lines += _ptq_lines(list(ptqs))
    lines += [""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return summary


def print_summary(cfg: dict, rows: list[dict], ptqs: list[dict] = ()) -> None:
    """The terminal table: accuracy, difference to fp32, uplink, time to target."""
    from rich.console import Console
    from rich.table import Table

    points = float(cfg.get("target_points", evaluation.TARGET_POINTS))
    links = [lk.name for lk in links_of(cfg)]
    table = Table(title=f"fedquant fl: {cfg['name']} (time to target on each link)")
    for col in ("compressor", "accuracy %", "vs fp32, points", "uplink MB", *links):
        table.add_column(col, justify="left" if col == "compressor" else "right")
    for s in summarize(cfg, rows):
        table.add_row(s["label"], s["accuracy"].text(100), verdict_text(s, points),
                      f"{s['uplink_mb']:.3g}",
                      *(short_reach(s["to_target"].get(n)) for n in links))
    console = Console()
    console.print(table)
    if ptqs:
        ptq = Table(title=f"final model PTQ ({ptqs[0]['final_ptq']}, {ptqs[0]['bits']} bits)")
        for col in ("compressor", "acc fp32", "acc PTQ", "drop", "fp32 bytes", "PTQ bytes"):
            ptq.add_column(col, justify="left" if col == "compressor" else "right")
        for p in ptqs:
            ptq.add_row(p["label"], f"{100 * p['accuracy_before']:.2f}%",
                        f"{100 * p['accuracy_after']:.2f}%", f"{100 * p['accuracy_drop']:+.2f}",
                        str(p["fp32_bytes"]), str(p["ptq_bytes"]))
        console.print(ptq)


__all__ = ["CSV_COLUMNS", "PTQ_COLUMNS", "describe", "mean_curve", "plot_results",
           "print_summary", "reach_text", "reference_label", "runs_by_label", "summarize",
           "summary_table", "verdict_text", "write_results"]
