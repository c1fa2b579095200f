"""QUIC-FL study for `fedquant dme`: outliers versus the number of RHTs, and shared randomness.

Two measurements (the RHT paper section 5; REFERENCE.md, "QUIC-FL"):

* outlier fraction: the measured fraction of coordinates sent exactly (|t| > T_p) with 1 and
  2 RHTs on the adversarial inputs of ``simulations.inputs`` plus ``spikes60`` (60 equal
  entries). Theorem 4: with 2 RHTs it is the Gaussian p for every input. With 1 RHT each
  coordinate of k equal spikes is a sum of k random signs / sqrt(k), whose tail beyond T is
  not Gaussian: k = 60 is the worst equal-weight case at T = 3.0973 (1.37 p), while two
  spikes (|t| <= sqrt 2) or eight (|t| <= 2.83) never exceed T at all.
* vNMSE with the default shared-randomness index (6/5/4/4 bits) and without it (l = 0),
  for b = 1..4 on Gaussian inputs, next to REFERENCE.md's figures.

``run_outlier_study(out_dir, quick)`` writes quicfl_study.csv / .json and two PNG plots into
out_dir and returns the rows (one schema for both parts).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from contextlib import nullcontext

import numpy as np
import torch
from scipy.stats import binom

import fedquant as fq
from fedquant.codecs.quicfl import DEFAULT_SHARED_BITS, quic_tables
from fedquant.simulations.inputs import INPUTS, make_input

P = 2.0**-9
SPIKES = 60
REFERENCE_VNMSE = {  # REFERENCE.md: (default shared bits, l = 0)
    1: (1.467, 8.60), 2: (0.2149, 0.573), 3: (0.0431, 0.093), 4: (0.00968, 0.0195),
}
FIELDS = ["measure", "input", "rotations", "bits", "shared_bits", "measured", "expected",
          "ratio", "bits_per_coord", "trials", "d"]


def spikes_input(d: int, k: int, seed: int) -> torch.Tensor:
    """k equal entries (1) at random positions of the first power-of-two slice."""
    n = 1 << (d.bit_length() - 1)
    x = torch.zeros(d)
    x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = 1.0
    return x


def rademacher_tail(k: int, threshold: float) -> float:
    """P(|S_k| / sqrt(k) > T) for S_k a sum of k random signs: the one-RHT outlier rate of
    k equal spikes."""
    b = np.arange(k + 1)
    return float(binom.pmf(b, k, 0.5)[np.abs(2 * b - k) > threshold * math.sqrt(k)].sum())


def _progress(total: int):
    try:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
    except Exception:  # e.g. another live display is active: run without a bar
        return nullcontext(), None
    return progress, progress.add_task("QUIC-FL study", total=total)


def _outlier_rows(d: int, trials: int, advance) -> list[dict]:
    threshold = quic_tables(1, 0).threshold
    rows = []
    for name in [*INPUTS, f"spikes{SPIKES}"]:
        for rotations in (1, 2):
            codec = fq.get_codec("quic-fl", bits=1, rotations=rotations)
            fractions, bits = [], []
            for trial in range(trials):
                x = (spikes_input(d, SPIKES, trial) if name.startswith("spikes")
                     else make_input(name, d, trial))
                enc = codec.encode(x, seed=1000 + trial)
                fractions.append(codec.stats(enc)["outlier_fraction"])
                bits.append(enc.bits_per_coordinate)
                advance()
            expected = P
            if rotations == 1 and name.startswith("spikes"):
                expected = rademacher_tail(SPIKES, threshold)
            measured = float(np.mean(fractions))
            rows.append({"measure": "outlier_fraction", "input": name, "rotations": rotations,
                         "bits": 1, "shared_bits": DEFAULT_SHARED_BITS[1],
                         "measured": measured, "expected": expected, "ratio": measured / P,
                         "bits_per_coord": float(np.mean(bits)), "trials": trials, "d": d})
    return rows


def _vnmse_rows(d: int, trials: int, advance) -> list[dict]:
    rows = []
    for bits in (1, 2, 3, 4):
        for shared_bits, reference in zip((DEFAULT_SHARED_BITS[bits], 0),
                                          REFERENCE_VNMSE[bits], strict=True):
            codec = fq.get_codec("quic-fl", bits=bits, shared_bits=shared_bits)
            errors, sizes = [], []
            for trial in range(trials):
                x = make_input("normal", d, 500 + trial)
                enc = codec.encode(x, seed=2000 + trial)
                errors.append(float(fq.vnmse(x, fq.decode(enc))))
                sizes.append(enc.bits_per_coordinate)
                advance()
            measured = float(np.mean(errors))
            rows.append({"measure": "vnmse", "input": "normal", "rotations": 2, "bits": bits,
                         "shared_bits": shared_bits, "measured": measured,
                         "expected": reference, "ratio": measured / reference,
                         "bits_per_coord": float(np.mean(sizes)), "trials": trials, "d": d})
            rows[-1]["design"] = quic_tables(bits, shared_bits).vnmse
    return rows


def _plot(rows: list[dict], out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outl = [r for r in rows if r["measure"] == "outlier_fraction"]
    names = list(dict.fromkeys(r["input"] for r in outl))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for j, rotations in enumerate((1, 2)):
        vals = [next(r["ratio"] for r in outl if r["input"] == n and r["rotations"] == rotations)
                for n in names]
        ax.bar(np.arange(len(names)) + (j - 0.5) * width, vals, width,
               label=f"{rotations} RHT{'s' if rotations > 1 else ''}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="Gaussian p")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("outlier fraction / p")
    ax.set_title("QUIC-FL: coordinates sent exactly (p = 2^-9)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "quicfl_outliers.png", dpi=120)
    plt.close(fig)

    vn = [r for r in rows if r["measure"] == "vnmse"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pick in (("shared randomness (6/5/4/4 bits)", lambda r: r["shared_bits"] > 0),
                        ("no shared randomness (l = 0)", lambda r: r["shared_bits"] == 0)):
        sel = [r for r in vn if pick(r)]
        ax.semilogy([r["bits_per_coord"] for r in sel], [r["measured"] for r in sel], "o-",
                    label=label)
        ax.semilogy([r["bits"] for r in sel], [r["expected"] for r in sel], "x", color="gray")
    ax.set_xlabel("bits per coordinate on the wire (x: REFERENCE.md at b)")
    ax.set_ylabel("vNMSE")
    ax.set_title("QUIC-FL vNMSE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "quicfl_vnmse.png", dpi=120)
    plt.close(fig)


def run_outlier_study(out_dir: pathlib.Path, quick: bool = False) -> list[dict]:
    """Measure the outlier fraction (1 vs 2 RHTs) and vNMSE (with / without shared
    randomness); write quicfl_study.csv/.json and PNGs into out_dir; return the rows."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d, trials = (2**12, 2) if quick else (2**16, 8)
    vn_d, vn_trials = (2**12, 1) if quick else (2**16, 3)
    total = (len(INPUTS) + 1) * 2 * trials + 8 * vn_trials
    bar, task = _progress(total)
    with bar:
        def advance() -> None:
            if task is not None:
                bar.advance(task)

        rows = _outlier_rows(d, trials, advance) + _vnmse_rows(vn_d, vn_trials, advance)
    for r in rows:
        r.setdefault("design", "")
    fields = [*FIELDS, "design"]
    with open(out_dir / "quicfl_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "quicfl_study.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out_dir)
    return rows


if __name__ == "__main__":  # python -m simulations.quicfl_study [--quick]
    import sys

    for row in run_outlier_study(pathlib.Path("results/quicfl_study"), "--quick" in sys.argv):
        print(row)
