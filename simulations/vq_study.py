"""Vector quantization over 2 vs 3 RHTs (the RHT paper Lemma 3, Theorem 6) and VQ vs EDEN.

Three measurements, all seeded:

1. **Conditional correlation (Lemma 3, Theorem 6).** Input: the two-spike vector of
   appendix C.1, step 6, x = e_0 + e_1 (d a power of two), and the named pair (i, k) = (0, 1)
   (i XOR k = 1 = the XOR of the spike positions). With 2 RHTs, conditioned on the first
   RHT's signs, the correlation of z_0 and z_1 over the second RHT's signs is exactly +-1.
   With 3 RHTs, conditioned on the first RHT, the correlation over the last two RHTs' signs
   is near 0, and so is Theorem 6's conditional correlation (given the first two RHTs, over
   the last), whose RMS decays with d. Each is measured by Monte Carlo over sign draws
   and also computed exactly from the covariance formula of appendix C.1, step 5, which the
   text lost and we rebuilt from steps 2-3:

       Cov(z_i, z_k | w) = (1/d) sum_j H[i XOR k, j] w_j^2,   Var(z_i | w) = ||w||^2 / d,

   for z = H D w / sqrt(d) with w the vector entering the last RHT (Sylvester H with +-1
   entries). So corr = sum_j H[i XOR k, j] w_j^2 / ||w||^2 = sqrt(d) * FWHT(w^2)[i XOR k]
   / ||w||^2 with the normalized FWHT. ``tests/test_vq.py`` checks the formula against the
   Monte Carlo estimate.
2. **VQ error, 2 vs 3 RHTs**, on the same two-spike input: with 2 RHTs every aligned block
   pair (2m, 2m + 1) is +-equal, so the blocks lie in a subspace the Gaussian codebook was
   not made for.
3. **VQ vs EDEN at equal measured bits** (8 * len(blob) / d) on N(0, 1) inputs, b = 1, 2,
   against ``fq.get_codec("eden", bits=b, scale="biased")`` (REFERENCE.md 0.3634 / 0.1175).

``run_vq_study(out_dir, quick)`` writes vq_study.csv, vq_study.json and two PNG plots into
out_dir and returns the rows; ``fedquant dme`` calls it.

    python -m simulations.vq_study results/vq --quick
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import statistics
import sys

import torch

import fedquant as fq
from fedquant import random as fqr
from fedquant.hadamard import fwht_torch, rht

FULL = {"d_corr": 1024, "corr_draws": 2000, "cond_draws": 8, "d_vq": 2**16, "vq_trials": 4}
QUICK = {"d_corr": 128, "corr_draws": 300, "cond_draws": 2, "d_vq": 2**11, "vq_trials": 2}
PAIR = (0, 1)
VQ_SETTINGS = ((1, 2), (1, 4), (1, 8), (2, 2), (2, 4))  # (bits, dim)
COLUMNS = ("experiment", "scheme", "rotations", "bits", "dim", "bits_per_coord", "metric",
           "value", "stderr", "trials")


def two_spikes(d: int) -> torch.Tensor:
    """x = e_0 + e_1, the input of the RHT paper appendix C.1, step 6."""
    x = torch.zeros(d)
    x[0] = x[1] = 1.0
    return x


def layers(x: torch.Tensor, seeds: list[int], first_layer: int = 0) -> torch.Tensor:
    """Composed RHTs with independent signs: layer first_layer + j uses seeds[j]."""
    for j, seed in enumerate(seeds):
        x = rht(x, seed, first_layer + j, 0, "torch")
    return x


def exact_conditional_correlation(w: torch.Tensor, pair: tuple[int, int] = PAIR) -> float:
    """corr(z_i, z_k | w) over the signs of one RHT applied to w (rebuilt C.1 step 5)."""
    w64 = w.to(torch.float64)
    energy = float((w64 * w64).sum())
    spectrum = fwht_torch(w64 * w64) * math.sqrt(w.numel())
    return float(spectrum[pair[0] ^ pair[1]]) / energy


def fwht_rows(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of every row of a (B, n) tensor."""
    rows, n = x.shape
    y, h = x, 1
    while h < n:
        y = y.reshape(rows, -1, 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(rows, n) / math.sqrt(n)


def sampled_correlation(w: torch.Tensor, random_layers: int, draws: int, seed: int,
                        pair: tuple[int, int] = PAIR) -> float:
    """Pearson correlation of (z_i, z_k) over `draws` independent draws of the signs of
    `random_layers` RHTs applied to the fixed vector w (the output of the fixed RHTs)."""
    z = w.to(torch.float64).expand(draws, -1)
    for layer in range(random_layers):
        signs = fqr.signs(seed, fqr.Purpose.ROTATION, draws * w.numel(),
                          start=layer << 40).view(draws, -1)
        z = fwht_rows(z * signs)
    return float(torch.corrcoef(z[:, list(pair)].T)[0, 1])


def block_pair_rms(w: torch.Tensor, dim: int = 8) -> float:
    """RMS over the pairs inside an aligned block of `dim` coordinates of the exact
    conditional correlation over one more RHT (it depends on the pair only by i XOR k)."""
    w64 = w.to(torch.float64)
    spectrum = fwht_torch(w64 * w64) * math.sqrt(w.numel()) / float((w64 * w64).sum())
    corr = [float(spectrum[i ^ k]) for i in range(dim) for k in range(i + 1, dim)]
    return math.sqrt(statistics.fmean(c * c for c in corr))


def correlation_rows(d: int, draws: int, cond_draws: int) -> list[dict]:
    """Part 1: Lemma 3 (2 RHTs) and Theorem 6 (3 RHTs) on the two-spike input."""
    x = two_spikes(d)
    stats: dict[str, list[float]] = {key: [] for key in ("2s", "2e", "2b", "3s", "3e", "3b")}
    for c in range(cond_draws):
        first = layers(x, [7919 * (c + 1)])
        stats["2s"].append(abs(sampled_correlation(first, 1, draws, 31 * c + 1)))
        stats["2e"].append(abs(exact_conditional_correlation(first)))
        stats["2b"].append(block_pair_rms(first))
        stats["3s"].append(sampled_correlation(first, 2, draws, 31 * c + 2))
        for j in range(4):  # Theorem 6: given the first two RHTs, over the last one
            w = layers(first, [104729 * (j + 1) + c], first_layer=1)
            stats["3e"].append(abs(exact_conditional_correlation(w)))
            stats["3b"].append(block_pair_rms(w))
    mc = 1 / math.sqrt(draws)
    base = {"experiment": "lemma3_theorem6", "scheme": f"two-spikes e0+e1, d={d}",
            "bits": "", "dim": 8, "bits_per_coord": ""}
    metrics = (
        (2, "2s", "|corr(z0,z1)| over the last RHT given the first, sampled", mc),
        (2, "2e", "|corr(z0,z1)| over the last RHT given the first, exact", 0.0),
        (2, "2b", "RMS corr of pairs in 8-blocks over the last RHT, exact", 0.0),
        (3, "3s", "corr(z0,z1) over the last two RHTs given the first, sampled",
         mc / math.sqrt(cond_draws)),
        (3, "3e", "|corr(z0,z1)| over the last RHT given the first two, exact", 0.0),
        (3, "3b", "RMS corr of pairs in 8-blocks over the last RHT, exact", 0.0),
    )
    return [{**base, "rotations": rotations, "metric": metric,
             "value": statistics.fmean(stats[key]), "stderr": err, "trials": len(stats[key])}
            for rotations, key, metric, err in metrics]


def _measure(codec: fq.Codec, inputs: list[torch.Tensor]) -> tuple[float, float, float]:
    """(mean vNMSE, its standard error, bits per coordinate) through the real wire."""
    errs, bits = [], []
    for t, x in enumerate(inputs):
        blob = codec.encode(x, seed=1000 + t).to_bytes()
        errs.append(fq.vnmse(x, fq.decode(fq.Encoded.from_bytes(blob))))
        bits.append(8 * len(blob) / x.numel())
    se = statistics.stdev(errs) / math.sqrt(len(errs)) if len(errs) > 1 else 0.0
    return statistics.fmean(errs), se, statistics.fmean(bits)


def _row(experiment: str, scheme: str, rotations, bits, dim, measured, trials) -> dict:
    value, se, bpc = measured
    return {"experiment": experiment, "scheme": scheme, "rotations": rotations, "bits": bits,
            "dim": dim, "bits_per_coord": round(bpc, 4), "metric": "vnmse", "value": value,
            "stderr": se, "trials": trials}


def rotation_rows(d: int, trials: int) -> list[dict]:
    """Part 2: VQ vNMSE with 2 vs 3 RHTs (and "auto") on the two-spike input."""
    inputs = [two_spikes(d)] * trials
    rows = []
    for bits, dim in VQ_SETTINGS:
        for rotations in (2, 3, "auto"):
            codec = fq.get_codec("vq", bits=bits, dim=dim, scale="biased", rotations=rotations)
            rows.append(_row("vq_rotations", "vq biased, two-spikes", rotations, bits, dim,
                             _measure(codec, inputs), trials))
    return rows


def eden_rows(d: int, trials: int) -> list[dict]:
    """Part 3: VQ vs EDEN (biased and unbiased each) at b = 1, 2 on N(0, 1) inputs."""
    g = torch.Generator().manual_seed(12345)
    inputs = [torch.randn(d, generator=g) for _ in range(trials)]
    rows = []
    for bits in (1, 2):
        for scale in ("biased", "unbiased"):
            eden = fq.get_codec("eden", bits=bits, scale=scale)
            rows.append(_row("vq_vs_eden", f"eden {scale}", "auto", bits, 1,
                             _measure(eden, inputs), trials))
        for b, dim in VQ_SETTINGS:
            if b != bits:
                continue
            for scale in ("biased", "unbiased"):
                codec = fq.get_codec("vq", bits=bits, dim=dim, scale=scale)
                rows.append(_row("vq_vs_eden", f"vq {scale}", 3, bits, dim,
                                 _measure(codec, inputs), trials))
    return rows


def _plots(rows: list[dict], out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rot = [r for r in rows if r["experiment"] == "vq_rotations"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = sorted({(r["bits"], r["dim"]) for r in rot})
    for i, rotations in enumerate((2, 3)):
        vals = [next(r["value"] for r in rot if (r["bits"], r["dim"]) == lab
                     and r["rotations"] == rotations) for lab in labels]
        ax.bar([j + 0.4 * i for j in range(len(labels))], vals, width=0.4,
               label=f"{rotations} RHTs")
    ax.set_xticks([j + 0.2 for j in range(len(labels))], [f"b={b}, k={k}" for b, k in labels])
    ax.set_ylabel("vNMSE (two-spike input)")
    ax.set_title("VQ on the Lemma 3 input: 2 vs 3 RHTs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "vq_rotations.png", dpi=120)
    plt.close(fig)

    eden = [r for r in rows if r["experiment"] == "vq_vs_eden"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for scheme in sorted({r["scheme"] for r in eden}):
        pts = [r for r in eden if r["scheme"] == scheme]
        ax.scatter([r["bits_per_coord"] for r in pts], [r["value"] for r in pts], label=scheme)
        for r in pts:
            if scheme.startswith("vq"):
                ax.annotate(f"k={r['dim']}", (r["bits_per_coord"], r["value"]), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("measured bits per coordinate (8 * len(blob) / d)")
    ax.set_ylabel("vNMSE, N(0, 1) input")
    ax.set_title("VQ over 3 RHTs vs EDEN")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "vq_vs_eden.png", dpi=120)
    plt.close(fig)


def run_vq_study(out_dir: pathlib.Path, quick: bool = False) -> list[dict]:
    """Run the three measurements, write vq_study.csv/.json and PNGs to out_dir."""
    cfg = QUICK if quick else FULL
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = correlation_rows(cfg["d_corr"], cfg["corr_draws"], cfg["cond_draws"])
    rows += rotation_rows(cfg["d_vq"], cfg["vq_trials"])
    rows += eden_rows(cfg["d_vq"], cfg["vq_trials"])
    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            for r in rows]
    with open(out_dir / "vq_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "vq_study.json").write_text(json.dumps(rows, indent=1))
    _plots(rows, out_dir)
    return rows


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "results/vq_study")
    for row in run_vq_study(target, quick="--quick" in sys.argv):
        print(row)
