"""The files `fedquant compare` writes: CSVs, PNG plots, report.md, and the terminal summary.

Rows come from ``simulations.compare_sections``; the keys read here are
DME {label, codec, params, input, rotations, bits_per_coord, vnmse, nmse}, FL (the rows of
``simulations.fl`` plus ``scenario``), speed {label, d, encode_ms, decode_ms, rw_pass_ms,
encode_x_rw, decode_x_rw}. Every claim in report.md is computed from these rows; every FL
figure follows the definitions of ``simulations.evaluation``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedquant.simulations import fl_report
from fedquant.simulations.common import markdown_table, write_csv
from fedquant.simulations.compare import NATURAL_INPUTS, fl_links, scenario_configs, scenario_dir
from fedquant.simulations.plotting import codec_color, codec_linestyle, legend_outside, plt, save

INPUT_NAMES = {"normal": "N(0,1)", "lognormal": "LogNormal(0,1)",
               "digits-grad": "digits gradients"}


# ---- plots --------------------------------------------------------------------------------
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
    for i, (fam, rs) in enumerate(sorted(families.items())):
        rs = sorted(rs, key=lambda r: r["bits_per_coord"])
        ax.plot([r["bits_per_coord"] for r in rs], [r["vnmse"] for r in rs],
                ls=codec_linestyle(fam), marker="osD^v<>"[i % 7], color=codec_color(fam),
                label=fam)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("measured bits per coordinate (8 * len(bytes) / d)")
    ax.set_ylabel("vNMSE")
    ax.set_title(f"Error vs bandwidth, input {input_name}, auto rotations")
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    save(fig, path)


def plot_speed(rows: list[dict], path: Path) -> None:
    """Encode and decode time per codec in ms (linear axis), each bar labelled with its
    throughput in GB/s (float32 input bytes per second) and its multiple of one read+write
    pass of the same array, measured in the same run (dotted line)."""
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    ys = range(len(rows))
    for offset, key, name, colour in ((-0.2, "encode_ms", "encode", "#1f77b4"),
                                      (0.2, "decode_ms", "decode", "#ff7f0e")):
        ms = [r[key] for r in rows]
        ax.barh([y + offset for y in ys], ms, 0.4, label=name, color=colour)
        for y, r in zip(ys, rows, strict=True):
            gbs = 4 * r["d"] / (r[key] / 1e3) / 1e9
            ax.text(r[key], y + offset, f" {r[key]:.3g} ms, {gbs:.2g} GB/s, "
                    f"{r[key] / r['rw_pass_ms']:.3g}x rw", va="center", fontsize=7)
    if rows:
        ax.axvline(rows[0]["rw_pass_ms"], color="0.3", ls=":", lw=1,
                   label=f"one read+write pass ({rows[0]['rw_pass_ms']:.3g} ms)")
        ax.set_xlim(0, 1.45 * max(max(r["encode_ms"], r["decode_ms"]) for r in rows))
    ax.set_yticks(list(ys), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per call, one thread (lower is faster)")
    ax.set_title(f"Speed at d = {rows[0]['d'] if rows else '?'} (float32)")
    ax.grid(True, axis="x", alpha=0.3)
    legend_outside(ax)
    save(fig, path)


# ---- tables -------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(markdown_table(headers, rows))


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def dme_summary(rows: list[dict], input_name: str = "normal") -> list[dict]:
    """One row per codec setting at auto rotations: bits, vNMSE, NMSE(n)."""
    return sorted((r for r in rows if r["input"] == input_name
                   and r["rotations"] in ("auto", "-")),
                  key=lambda r: (r["bits_per_coord"], r["vnmse"]))


def _dme_lines(results: dict[str, Any], n: int) -> list[str]:
    dme = results["dme"]
    parts = ["## 1. Distributed mean estimation", "",
             f"Input N(0,1), rotations auto; NMSE over n = {n} clients. "
             "Full table (every input and rotation count): `dme.csv`.", "",
             "![vNMSE vs bits](dme_vnmse_vs_bits.png)", ""]
    parts.append(_table(["codec", "bits/coord", "vNMSE", f"NMSE(n={n})", "RHTs used"],
                        [[r["label"], _fmt(r["bits_per_coord"], 3), _fmt(r["vnmse"]),
                          _fmt(r["nmse"]), r.get("rotations_used", "")]
                         for r in dme_summary(dme)]))
    table = rotation_table(dme)
    if table:
        parts += ["", "EDEN b=1 (unbiased) by input and number of RHTs (one RHT fails on "
                  "structured inputs, two restore the Gaussian figure 0.571):", "", table]
    return parts + [""]


def rotation_table(dme: list[dict]) -> str:
    """vNMSE of EDEN b=1 (unbiased) per non-Gaussian input and rotation count, with a
    column only for the rotation counts that ran ("" when EDEN b=1 did not run)."""
    adv = [r for r in dme if r["input"] != "normal" and r["label"] == "eden b=1"]
    if not adv:
        return ""
    inputs = sorted({r["input"] for r in adv})
    cell = {(r["input"], r["rotations"]): r["vnmse"] for r in adv}
    rots = [k for k in ("1", "2", "3", "auto") if any(c[1] == k for c in cell)]
    return _table(["input"] + [f"{k} RHT" for k in rots],
                  [[i] + [_fmt(cell[(i, k)]) if (i, k) in cell else "-" for k in rots]
                   for i in inputs])


def _fl_recommendation_lines(results: dict[str, Any], links: list[str]) -> list[str]:
    rec = results.get("fl_recommendation") or {}
    if not rec:
        return []
    parts = ["### Which codec for my bandwidth and my bit budget", "",
             "Per scenario: the codec with the shortest mean simulated time to the target "
             "accuracy (95% interval over seeds in brackets) among those shown within the "
             "target points of fp32 that reached it on every seed and send at most that many "
             "bits per coordinate (measured, headers included); fp32's time after it. "
             "Overlapping intervals mean the runs do not separate the codecs. The figures "
             "come from the scenario tables in section 2.", ""]
    for scen, rows in rec.items():
        budgets = list(dict.fromkeys(r["budget"] for r in rows))
        cell = {(r["link"], r["budget"]): r for r in rows}
        body = []
        for link in links:
            line = [link]
            for b in budgets:
                r = cell[(link, b)]
                if r["codec"] is None:
                    line.append("none qualifies")
                else:
                    ref = f"; fp32 {r['fp32_seconds']:.3g} s" if r["fp32_seconds"] else ""
                    ci = r["interval"]
                    span = f" [{max(0.0, ci.low):.3g}, {ci.high:.3g}]" if ci and ci.n >= 2 else ""
                    line.append(f"{r['codec']}: {r['seconds']:.3g} s{span}{ref}")
            body.append(line)
        parts += [f"**{scen}**", "", _table(["uplink"] + [f"<= {b} bits/coord" for b in budgets],
                                            body), ""]
    return parts


def _fl_lines(results: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    summaries = results.get("fl_summary") or {}
    scenarios = {sc["name"]: sc for sc in scenario_configs(cfg)}
    parts = ["## 2. Federated training", ""]
    if scenarios:
        parts += [fl_report.definitions(next(iter(scenarios.values()))), "",
                  "Links: " + "; ".join(
                      f"{lk.name} = uplink {lk.uplink_mbps:g} / downlink {lk.downlink_mbps:g} "
                      f"Mbit/s, latency {lk.latency_ms:g} ms" for lk in fl_links(cfg)) + ".", ""]
    for name, summary in summaries.items():
        sc = scenarios[name]
        folder = scenario_dir(name)
        parts += [f"### {name}", "", fl_report.describe(sc), ""]
        parts += fl_report.summary_table(sc, summary)
        parts += ["", fl_report.convergence_text(summary), "",
                  f"![{name}: accuracy vs simulated time]({folder}/accuracy_vs_time.png)",
                  f"![{name}: accuracy vs rounds]({folder}/accuracy_vs_rounds.png)",
                  f"![{name}: accuracy vs uplink]({folder}/accuracy_vs_uplink.png)", "",
                  f"Rows, seeds and per-client times: `{folder}/rows.json`.", ""]
    return parts


def _speed_lines(speed: list[dict]) -> list[str]:
    parts = ["## 3. Speed", "", "Median times on one thread; the baseline is one read+write "
             "pass of the same array, measured in the same run. GB/s = float32 input bytes "
             "per second.", "", "![speed](speed.png)", ""]
    parts.append(_table(["codec", "d", "encode ms", "encode GB/s", "decode ms", "decode GB/s",
                         "read+write ms", "encode / rw", "decode / rw"],
                        [[r["label"], r["d"], _fmt(r["encode_ms"]),
                          _fmt(4 * r["d"] / r["encode_ms"] / 1e6, 3), _fmt(r["decode_ms"]),
                          _fmt(4 * r["d"] / r["decode_ms"] / 1e6, 3), _fmt(r["rw_pass_ms"]),
                          _fmt(r["encode_x_rw"], 3), _fmt(r["decode_x_rw"], 3)]
                         for r in speed]))
    return parts + [""]


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    """report.md, the CSVs and the plots."""
    dme, fl, speed = results["dme"], results["fl"], results["speed"]
    cfg = results["config"]
    write_csv(out_dir / "dme.csv", dme)
    write_csv(out_dir / "fl.csv", [{"scenario": r["scenario"], **{
        k: r.get(k) for k in fl_report.CSV_COLUMNS}} for r in fl])
    write_csv(out_dir / "speed.csv", speed)
    if dme:
        plot_dme(dme, out_dir / "dme_vnmse_vs_bits.png")
    if speed:
        plot_speed(speed, out_dir / "speed.png")
    n = cfg.get("dme", {}).get("clients", 10)
    name = cfg.get("name", "compare")
    links = [lk.name for lk in fl_links(cfg)]
    parts = [f"# fedquant compare{'' if name == 'compare' else f': {name}'}", "",
             f"Seed {cfg['seed']}. Bandwidth is measured: 8 * len(bytes) / coordinates, "
             "headers, scales and padding included. Same command and config give the "
             "same numbers, except measured times.", "", "## Recommendation", ""]
    rec = results.get("best_per_budget") or []
    if rec:
        ran = [i for i in NATURAL_INPUTS if any(r["input"] == i for r in dme)]
        parts += ["### Lowest error per bit budget (mean estimation)", "",
                  "Lowest worst-case NMSE over the natural inputs that ran ("
                  + ", ".join(INPUT_NAMES.get(i, i) for i in ran)
                  + ") at each bit budget, auto rotations:", ""]
        parts.append(_table(["bit budget", "lowest-error codec", "bits/coord",
                             f"worst NMSE(n={n})", "on input", "vNMSE there"],
                            [[r["budget"], r["codec"], _fmt(r["bits_per_coord"], 3),
                              _fmt(r["nmse"]), r["worst_input"], _fmt(r["vnmse"])]
                             for r in rec]))
        parts.append("")
    parts += _fl_recommendation_lines(results, links)
    parts += [_cheapest_line(results, cfg), ""]
    parts += _dme_lines(results, n)
    parts += _fl_lines(results, cfg)
    parts += _speed_lines(speed)
    parts += _checks_lines(results)
    parts += ["## Configuration and versions", "",
              "The full configuration of this run: `config.json` (every key, defaults "
              "included); all results: `results.json`.", "",
              _table(["package", "version"], [[k, v] for k, v in results["versions"].items()]),
              "", "Section wall times (s): " + json.dumps(results["timings_s"]), ""]
    (out_dir / "report.md").write_text("\n".join(parts))


def _checks_lines(results: dict[str, Any]) -> list[str]:
    """One table of every PASS/FAIL check that ran: the DME reference figures and the seed
    studies' claims (each study's report.md has the detail)."""
    rows = [["dme", c["claim"], c["measured"], c["result"], "`dme/report.md`"]
            for c in results.get("dme_checks") or []]
    for name, study in (results.get("studies") or {}).items():
        rows += [[name, c["claim"], c["measured"], c["result"], f"`{study['report']}`"]
                 for c in study.get("checks") or []]
    if not rows:
        return []
    failed = sum(r[3] != "PASS" for r in rows)
    return ["## Checks against the papers' claims", "",
            f"{len(rows) - failed} of {len(rows)} checks PASS"
            + (f"; **{failed} FAIL**." if failed else "."), "",
            _table(["study", "claim", "measured", "result", "detail"], rows), ""]


def _cheapest_line(results: dict[str, Any], cfg: dict[str, Any]) -> str:
    points = cfg.get("fl", {}).get("target_points", 1.0)
    cheap = results.get("cheapest_within")
    if not results.get("fl_summary"):
        return ""
    if cheap is None:
        return (f"No codec was shown within {points:g} point(s) of fp32 in every scenario "
                "(the 95% interval of its seed-paired difference above "
                f"-{points:g}); see section 2.")
    per = "; ".join(f"{scen}: {it['accuracy'].text(100)}%, difference "
                    f"{it['difference'].text(100, signed=True)} points"
                    for scen, it in cheap["scenarios"].items())
    return (f"Cheapest codec shown within {points:g} point(s) of fp32 in every scenario: "
            f"**{cheap['label']}**, at most {cheap['uplink_vs_fp32']:.3g} of fp32's uplink "
            f"({per}).")


def print_summary(results: dict[str, Any], console) -> None:
    """The terminal summary: the DME recommendation, then each FL scenario."""
    from rich.table import Table

    t = Table(title="Lowest worst-case NMSE per bit budget (natural inputs)")
    for h in ("budget", "codec", "bits/coord", "worst NMSE", "on input"):
        t.add_column(h)
    for r in results.get("best_per_budget") or []:
        t.add_row(str(r["budget"]), r["codec"], _fmt(r["bits_per_coord"], 3), _fmt(r["nmse"]),
                  r["worst_input"])
    console.print(t)
    cfg = results["config"]
    points = cfg.get("fl", {}).get("target_points", 1.0)
    links = [lk.name for lk in fl_links(cfg)]
    for scen, summary in (results.get("fl_summary") or {}).items():
        t = Table(title=f"FL {scen}: accuracy %, difference to fp32 (points), time to target")
        for h in ("codec", "accuracy", "vs fp32", "uplink MB", *links):
            t.add_column(h)
        for s in summary:
            t.add_row(s["label"], s["accuracy"].text(100), fl_report.verdict_text(s, points),
                      f"{s['uplink_mb']:.3g}",
                      *(fl_report.short_reach(s["to_target"].get(lk)) for lk in links))
        console.print(t)
    console.print(_cheapest_line(results, cfg))
