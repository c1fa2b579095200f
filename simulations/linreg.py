"""`fedquant linreg`: quantized SGD in high-dimensional linear regression (Zhang, Su and Zou).

Zhang, Su and Zou (Zhang, Su, Zou, "Learning under Quantization for High-Dimensional Linear
Regression") analyses one-pass SGD with Polyak-Ruppert averaging when five places of the
pipeline are quantized: data features Q_d, labels Q_l, parameters Q_p, activations Q_a (the
predictions) and output gradients Q_o (the residuals). One quantized step with batch B is

    r_j = Q_o( Q_a(Q_d(x_j)^T Q_p(w)) - Q_l(y_j) ),   w <- w - lr / B * sum_j r_j Q_d(x_j),

rebuilt from the summary's "Quantization Components" table (the paper's own update lost its
symbols in conversion); with every Q the identity it is plain SGD. Quantizers are the
additive and multiplicative models of :mod:`simulations.quantizers`.

The problem: x ~ N(0, H), H = diag(lambda_i), lambda_i = i^-decay; y = x^T w* + noise with
w* ~ N(0, I) (seeded); excess risk of w is (w - w*)^T H (w - w*). Chains run in parallel
(`repeats` of them) with common random numbers: every configuration sees the same data stream,
so the quantization penalty is measured as a paired difference.

The seed's claims, each a plot and a PASS/FAIL line of ``report.md``:

1. additive activation and gradient quantization add a penalty that shrinks like 1/B;
2. additive data quantization distorts the data spectrum (small eigenvalues lifted, condition
   number collapses) while the multiplicative model keeps its shape;
3. parameter, activation and gradient quantization amplify the noise of the averaged iterate
   but do not shift its mean (the optimum), unlike additive data quantization.

A federated variant sends each client's gradient through a project codec (``fq.get_codec``)
and plots excess risk against the uplink bytes actually serialized.

Example::

    fedquant linreg --quick
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from fedquant.simulations.common import check_keys, one_thread, write_csv, write_json
from fedquant.simulations.quantizers import Exact, make_quantizer

import fedquant as fq

PLACES = ("data", "labels", "params", "activations", "gradients")
MODELS = ("additive", "multiplicative")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "linreg.toml"

# Allowed keys: section -> key -> type. `quick` holds overrides with the same layout.
SCHEMA: dict[str, Any] = {
    "name": str,
    "seed": int,
    "device": str,
    "problem": {"dim": int, "decay": float, "noise_std": float},
    "sgd": {"lr_scale": float, "steps": int, "batch": int, "repeats": int,
            "batches": list, "batch_steps": int},
    "quantization": {"additive_step": float, "mantissa_bits": int},
    "spectrum": {"samples": int},
    "federated": {"clients": int, "rounds": int, "batch": int, "lr_scale": float,
                  "codecs": list},
}


# ---- configuration ----------------------------------------------------------------------
def merge(base: dict, override: dict) -> dict:
    """`base` with the tables of `override` merged in, recursively."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def load_checked(path: Path, schema: dict) -> dict:
    """Read a TOML config and validate its keys (including its `quick` overrides)."""
    config = tomllib.loads(Path(path).read_text())
    quick = config.pop("quick", {})
    check_keys(config, schema)
    check_keys(quick, schema, "quick.")
    if quick:
        config["quick"] = quick
    return config


def load_config(path: Path | str = DEFAULT_CONFIG) -> dict:
    """The linreg config; ValueError names any unknown key and the allowed ones."""
    config = load_checked(Path(path), SCHEMA)
    for key in ("problem", "sgd", "quantization", "spectrum", "federated"):
        if key not in config:
            raise ValueError(f"config {path} lacks the [{key}] table")
    return config


def effective(config: dict, quick: bool) -> dict:
    return merge(config, config.get("quick", {})) if quick else config


# ---- outputs shared with simulations.innerprod ------------------------------------------
def check_row(experiment: str, claim: str, measured: str, passed: bool) -> dict:
    return {"experiment": experiment, "claim": claim, "measured": measured,
            "result": "PASS" if passed else "FAIL"}


def progress_bar(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=True)


def write_claims_report(path: Path, header: str, checks: list[dict],
                        sections: list[str]) -> None:
    """report.md: the header, one PASS/FAIL line per claim, then the sections."""
    summary = "| claim | measured | result |\n|---|---|---|\n" + "".join(
        f"| {c['claim']} | {c['measured']} | {c['result']} |\n" for c in checks)
    path.write_text(header + summary + "\n" + "\n".join(sections))


def print_checks(title: str, checks: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in ("claim", "measured", "result"):
        table.add_column(col)
    for row in checks:
        table.add_row(row["claim"], row["measured"], row["result"])
    Console().print(table)


# ---- the regression problem and quantized SGD -------------------------------------------
@dataclass(frozen=True)
class Problem:
    """x ~ N(0, diag(eigenvalues)), y = x^T w_star + noise_std * N(0, 1)."""

    eigenvalues: torch.Tensor
    w_star: torch.Tensor
    noise_std: float

    def excess_risk(self, w: torch.Tensor) -> torch.Tensor:
        """(w - w*)^T H (w - w*) along the last axis."""
        return ((w - self.w_star) ** 2 * self.eigenvalues).sum(-1)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator):
        d = self.eigenvalues.numel()
        device = self.eigenvalues.device
        x = torch.randn(*shape, d, generator=generator, device=device) * self.eigenvalues.sqrt()
        noise = torch.randn(*shape, generator=generator, device=device) * self.noise_std
        return x, x @ self.w_star + noise


def make_problem(dim: int, decay: float, noise_std: float, seed: int,
                 device: str | torch.device = "cpu") -> Problem:
    if dim < 2 or decay <= 0 or noise_std < 0:
        raise ValueError(f"need dim >= 2, decay > 0, noise_std >= 0; got {dim}, {decay}, "
                         f"{noise_std}")
    eig = torch.arange(1, dim + 1, dtype=torch.float32, device=device) ** (-float(decay))
    gen = torch.Generator(device=device).manual_seed(seed)
    w_star = torch.randn(dim, generator=gen, device=device)
    return Problem(eig, w_star, float(noise_std))


def checkpoints(steps: int, count: int = 24) -> list[int]:
    """About `count` log-spaced step counts in [1, steps], always ending at `steps`."""
    pts = {max(1, round(steps ** (i / (count - 1)))) for i in range(count)}
    return sorted(pts | {steps})


def quantized_sgd(problem: Problem, quantizers: dict[str, Any], steps: int, batch: int,
                  lr: float, repeats: int, seed: int) -> dict[str, torch.Tensor]:
    """`repeats` independent one-pass SGD chains with Polyak-Ruppert averaging.

    Returns ``risk`` (checkpoints x repeats excess risk of the averaged iterate),
    ``steps`` (the checkpoints), ``w_bars`` (checkpoints x repeats x d averaged iterates)
    and ``w_bar`` (repeats x d, the final ones).
    The data stream depends only on `seed`, so configurations are paired.
    """
    with one_thread():
        return _quantized_sgd(problem, quantizers, steps, batch, lr, repeats, seed)


def _quantized_sgd(problem: Problem, quantizers: dict[str, Any], steps: int, batch: int,
                   lr: float, repeats: int, seed: int) -> dict[str, torch.Tensor]:
    q = {p: quantizers.get(p, Exact()) for p in PLACES}
    device = problem.eigenvalues.device
    data_gen = torch.Generator(device=device).manual_seed(seed)
    quant_gen = torch.Generator(device=device).manual_seed(seed + 1)
    w = torch.zeros(repeats, problem.w_star.numel(), device=device)
    w_sum = torch.zeros_like(w)
    marks, risks, w_bars = checkpoints(steps), [], []
    for t in range(1, steps + 1):
        x, y = problem.sample((repeats, batch), data_gen)
        xq = q["data"](x, quant_gen)
        yq = q["labels"](y, quant_gen)
        wq = q["params"](w, quant_gen)
        act = q["activations"](torch.einsum("rbd,rd->rb", xq, wq), quant_gen)
        residual = q["gradients"](act - yq, quant_gen)
        w = w - (lr / batch) * torch.einsum("rb,rbd->rd", residual, xq)
        w_sum += w
        if t == marks[len(risks)]:
            w_bars.append(w_sum / t)
            risks.append(problem.excess_risk(w_bars[-1]))
    return {"risk": torch.stack(risks), "steps": torch.tensor(marks), "w_bar": w_sum / steps,
            "w_bars": torch.stack(w_bars)}


def variants(qconf: dict) -> dict[str, dict[str, Any]]:
    """'fp' plus one configuration per (place, model): that place quantized, the rest exact."""
    out: dict[str, dict[str, Any]] = {"fp": {}}
    for model in MODELS:
        for place in PLACES:
            out[f"{place}/{model}"] = {
                place: make_quantizer(model, qconf["additive_step"], qconf["mantissa_bits"])}
    return out


# ---- claims -------------------------------------------------------------------------------
def loglog_slope(xs: list[float], ys: list[float]) -> float:
    lx = torch.tensor([math.log(v) for v in xs], dtype=torch.float64)
    ly = torch.tensor([math.log(max(v, 1e-300)) for v in ys], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def batch_penalty_slopes(penalties: dict[float, torch.Tensor], seed: int,
                         resamples: int = 200) -> tuple[float, float]:
    """Log-log slope of the mean paired penalty against B, and its bootstrap standard error
    over repeats (the tolerance of claim 1 comes from this spread)."""
    batches = sorted(penalties)
    slope = loglog_slope(batches, [float(penalties[b].mean()) for b in batches])
    gen = torch.Generator().manual_seed(seed)
    reps = penalties[batches[0]].numel()
    boot = []
    for _ in range(resamples):
        idx = torch.randint(reps, (reps,), generator=gen)
        means = [float(penalties[b].cpu()[idx].mean()) for b in batches]
        if min(means) > 0:
            boot.append(loglog_slope(batches, means))
    se = float(torch.tensor(boot).std()) if len(boot) > 2 else float("inf")
    return slope, se


def paired_penalty(problem: Problem, quantized: dict, exact: dict, place: str) -> torch.Tensor:
    """Per-repeat excess-risk penalty of a quantized run over its paired exact run.

    For labels, parameters, activations and gradients the quantizer is unbiased and enters
    the update linearly, so the deviation D = w_q - w_fp has conditional mean zero given
    the data and E[risk_q - risk_fp] = E||D||_H^2: the cross term 2 (w_fp - w*)^T H D
    vanishes in expectation. Measuring ||D||_H^2 drops that noisy cross term (the bias of
    w_fp is large early on). Data quantization changes E[x x^T], so there the plain risk
    difference is used.
    """
    if place == "data":
        return quantized["risk"] - exact["risk"]
    return problem.excess_risk(quantized["w_bar"] - exact["w_bar"] + problem.w_star)


def shift_and_spread(problem: Problem, w_q: torch.Tensor, w_fp: torch.Tensor) -> dict:
    """Claim 3's statistics from paired final averaged iterates (repeats x d).

    With D_r = w_q,r - w_fp,r (same data, so D is the quantizer's doing):
    shift = ||mean_r D_r||_H^2 and null_level = sum_r ||D_r - mean D||_H^2 / (R (R - 1)), its
    expectation if the mean did not move, so shift / null_level is about 1 under no shift;
    noise = mean_r ||D_r - mean D||_H^2, the variance the quantizer adds, and
    amplification = (spread of w_fp + noise) / spread of w_fp.
    """
    h = problem.eigenvalues
    diff = w_q - w_fp
    reps = diff.shape[0]
    mean_diff = diff.mean(0)
    shift = float((mean_diff ** 2 * h).sum())
    noise = float((((diff - mean_diff) ** 2) * h).sum() / (reps - 1))
    null_level = noise / reps
    spread_fp = float((((w_fp - w_fp.mean(0)) ** 2) * h).sum() / (reps - 1))
    return {"shift": shift, "null_level": null_level, "shift_ratio": shift / null_level,
            "noise": noise, "spread_fp": spread_fp,
            "amplification": (spread_fp + noise) / spread_fp}


def spectrum(problem: Problem, quantizer: Any, samples: int, seed: int) -> torch.Tensor:
    """Eigenvalues (descending, float64) of the empirical covariance of quantized features."""
    gen = torch.Generator(device=problem.eigenvalues.device).manual_seed(seed)
    x, _ = problem.sample((samples,), gen)
    xq = quantizer(x, torch.Generator(device=x.device).manual_seed(seed + 1)).to(torch.float64)
    cov = xq.T @ xq / samples
    return torch.linalg.eigvalsh(cov).flip(0)


def condition_number(eig: torch.Tensor) -> float:
    return float(eig[0] / eig[-1])


# ---- federated variant ----------------------------------------------------------------------
def federated_run(problem: Problem, codec: fq.Codec | None, clients: int, rounds: int,
                  batch: int, lr: float, seed: int) -> list[dict]:
    """FedSGD: each round every client sends its mini-batch gradient through `codec`
    (serialized, parsed, decoded by ``fq.decode_mean``); the server steps and averages
    iterates. Returns one row per checkpoint with cumulative uplink bits = 8 * len(bytes)."""
    device = problem.eigenvalues.device
    data_gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.zeros_like(problem.w_star)
    w_sum = torch.zeros_like(w)
    uplink_bytes, rows, marks = 0, [], set(checkpoints(rounds))
    for t in range(1, rounds + 1):
        x, y = problem.sample((clients, batch), data_gen)
        grads = torch.einsum("cb,cbd->cd", x @ w - y, x) / batch
        if codec is None:
            mean = grads.mean(0)
            uplink_bytes += grads.numel() * 4
        else:
            round_seed = fq.random.derive_seed(seed, 1_000_000 + t)
            blobs = [codec.encode(g, seed=fq.random.derive_seed(round_seed, c)).to_bytes()
                     for c, g in enumerate(grads)]
            uplink_bytes += sum(len(b) for b in blobs)
            mean = fq.decode_mean([fq.Encoded.from_bytes(b) for b in blobs], device=device)
        w = w - lr * mean
        w_sum += w
        if t in marks:
            rows.append({"round": t, "uplink_bits": 8 * uplink_bytes,
                         "excess_risk": float(problem.excess_risk(w_sum / t))})
    return rows


def codec_label(spec: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({params})" if params else spec["name"]


# ---- the experiment -------------------------------------------------------------------------
def run_linreg(config: dict, out_dir: Path, quick: bool = False,
               progress: bool = True) -> list[dict]:
    """Run every part of the study, write CSV/JSON/PNG/report.md to `out_dir`, and return
    the claim checks (one dict per check: experiment, claim, measured, result)."""
    with one_thread():
        return _run_linreg(config, Path(out_dir), quick, progress)


def _run_linreg(config: dict, out_dir: Path, quick: bool, progress: bool) -> list[dict]:
    cfg = effective(config, quick)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed, device = int(cfg.get("seed", 0)), cfg.get("device", "cpu")
    pc, sc, qc, fc = cfg["problem"], cfg["sgd"], cfg["quantization"], cfg["federated"]
    problem = make_problem(pc["dim"], pc["decay"], pc["noise_std"], seed, device)
    trace = float(problem.eigenvalues.sum())
    lr = sc["lr_scale"] / trace
    configs = variants(qc)
    fed_specs = [s for s in fc["codecs"] if s.get("name") in fq.available_codecs()]
    skipped = [codec_label(s) for s in fc["codecs"] if s.get("name") not in fq.available_codecs()]
    batches = sorted(set(sc["batches"]))
    if len(batches) < 2 or min(batches) < 1:
        raise ValueError(f"sgd.batches needs at least two batch sizes >= 1, got {batches}")

    with progress_bar(progress) as bar:
        total = len(configs) * (1 + len(batches)) + 2 + len(fed_specs) + 1
        task = bar.add_task("linreg", total=total)
        # excess risk against steps, every place and model at the base batch size
        by_steps: dict[str, dict] = {}
        for label, quants in configs.items():
            bar.update(task, description=f"steps: {label}")
            by_steps[label] = quantized_sgd(problem, quants, sc["steps"], sc["batch"], lr,
                                            sc["repeats"], seed + 10)
            bar.advance(task)
        # excess risk against batch size at a fixed number of steps
        by_batch: dict[str, dict[int, dict]] = {label: {} for label in configs}
        for b in batches:
            for label, quants in configs.items():
                bar.update(task, description=f"batch {b}: {label}")
                res = quantized_sgd(problem, quants, sc["batch_steps"], b, lr, sc["repeats"],
                                    seed + 20)
                by_batch[label][b] = {"risk": res["risk"][-1], "w_bar": res["w_bar"]}
                del res
                bar.advance(task)
        # spectrum of the quantized data covariance
        bar.update(task, description="spectrum")
        spectra = {"fp": spectrum(problem, Exact(), cfg["spectrum"]["samples"], seed + 30)}
        for model in MODELS:
            quant = make_quantizer(model, qc["additive_step"], qc["mantissa_bits"])
            spectra[model] = spectrum(problem, quant, cfg["spectrum"]["samples"], seed + 30)
            bar.advance(task)
        # federated variant
        fed: dict[str, list[dict]] = {}
        fed_lr = fc["lr_scale"] / trace
        for spec in [{"name": "fp32"}] + fed_specs:
            label = codec_label(spec)
            bar.update(task, description=f"federated: {label}")
            params = {k: v for k, v in spec.items() if k != "name"}
            codec = fq.get_codec(spec["name"], **params)
            fed[label] = federated_run(problem, codec, fc["clients"], fc["rounds"], fc["batch"],
                                       fed_lr, seed + 40)
            bar.advance(task)

    checks, sections = claims(problem, by_steps, by_batch, spectra, qc, seed)
    fed_check, fed_text = federated_claim(fed)
    checks.append(fed_check)
    sections.append(fed_text)
    write_outputs(out_dir, cfg, problem, by_steps, by_batch, spectra, fed, checks, sections,
                  skipped, lr, quick)
    return checks


def claims(problem: Problem, by_steps: dict, by_batch: dict, spectra: dict, qc: dict,
           seed: int) -> tuple[list[dict], list[str]]:
    """The PASS/FAIL checks of claims 1-3 and the report text for each."""
    checks, sections = [], []
    # claim 1: additive activation / gradient penalty ~ 1/B
    lines, ok_all, slopes = [], True, {}
    for place in PLACES:
        pen = {b: paired_penalty(problem, by_batch[f"{place}/additive"][b],
                                 by_batch["fp"][b], place)
               for b in by_batch["fp"]}
        slope, se = batch_penalty_slopes(pen, seed)
        slopes[place] = slope
        if place in ("activations", "gradients"):
            tol = max(0.2, 3 * se)
            ok = math.isfinite(tol) and abs(slope + 1) <= tol
            ok_all &= ok
            lines.append(f"- {place}: slope {slope:.2f} (bootstrap se {se:.2f}); "
                         f"check |slope + 1| <= {tol:.2f}: {'PASS' if ok else 'FAIL'}")
        else:
            lines.append(f"- {place} (contrast, no claim): slope {slope:.2f} (se {se:.2f})")
    measured = "; ".join(f"{place} {slopes[place]:.2f}" for place in ("activations",
                                                                      "gradients"))
    checks.append(check_row("linreg", "1: additive activation/gradient penalty ~ 1/B",
                            measured, ok_all))
    sections.append("## Claim 1: additive activation and gradient penalties shrink like 1/B\n\n"
                    "Penalty = mean excess-risk increase over the paired full-precision run at a "
                    "fixed number of steps, measured as ||w_q - w_fp||_H^2 (see "
                    "`paired_penalty`); slope of log penalty against log B (plot "
                    "`risk_vs_batch.png`). Tolerance max(0.2, 3 bootstrap standard errors over "
                    "repeats).\n\n" + "\n".join(lines) + "\n")
    # claim 2: spectrum distortion
    fp = spectra["fp"]
    cond_fp = condition_number(fp)
    ratio_add = condition_number(spectra["additive"]) / cond_fp
    ratio_mul = condition_number(spectra["multiplicative"]) / cond_fp
    shape_mul = spectra["multiplicative"] / fp
    spread_mul = float(shape_mul.max() / shape_mul.min())
    ok = ratio_add < 0.5 and 0.8 <= ratio_mul <= 1.25
    measured = (f"cond ratio additive {ratio_add:.3f}, multiplicative {ratio_mul:.3f}; "
                f"multiplicative eigenvalue ratio spread {spread_mul:.3f}")
    checks.append(check_row("linreg", "2: additive data quantization distorts the spectrum, "
                            "multiplicative keeps its shape", measured, ok))
    sections.append(
        "## Claim 2: data quantization and the spectrum\n\n"
        "Eigenvalues of the empirical covariance of quantized features against those of the "
        "same unquantized samples (`spectrum.png`). Additive error adds about a constant to "
        "every eigenvalue, lifting the tail; multiplicative error scales each coordinate's "
        "variance by about the same factor (H is diagonal here).\n\n"
        f"- condition number: full precision {cond_fp:.3g}, additive "
        f"{condition_number(spectra['additive']):.3g}, multiplicative "
        f"{condition_number(spectra['multiplicative']):.3g}\n"
        f"- multiplicative eigenvalue ratio lambda_q / lambda: min {float(shape_mul.min()):.3f},"
        f" max {float(shape_mul.max()):.3f}\n"
        f"- check additive cond ratio < 0.5 and multiplicative cond ratio in [0.8, 1.25]: "
        f"{'PASS' if ok else 'FAIL'}\n")
    # claim 3: noise amplification, not a shifted optimum
    lines, ok_all = [], True
    w_fp = by_steps["fp"]["w_bar"]
    stats = {}
    for model in MODELS:
        for place in PLACES:
            label = f"{place}/{model}"
            st = shift_and_spread(problem, by_steps[label]["w_bar"], w_fp)
            stats[label] = st
            if place in ("params", "activations", "gradients"):
                ok = st["shift_ratio"] < 4 and st["amplification"] > 1
                ok_all &= ok
                tag = "PASS" if ok else "FAIL"
            else:
                tag = "contrast"
            lines.append(f"- {label}: shift/null {st['shift_ratio']:.2f}, amplification "
                         f"{st['amplification']:.3f} [{tag}]")
    contrast = stats["data/additive"]["shift_ratio"]
    ok_contrast = contrast > 4  # the same bound: a shift is what exceeds it
    ok_all &= ok_contrast
    noisy = [stats[f"{p}/{m}"] for m in MODELS for p in ("params", "activations", "gradients")]
    checks.append(check_row(
        "linreg", "3: params/activations/gradients amplify noise, no shift",
        f"max shift/null {max(st['shift_ratio'] for st in noisy):.2f}, min amplification "
        f"{min(st['amplification'] for st in noisy):.3f}, data/additive shift/null "
        f"{contrast:.1f}", ok_all))
    sections.append(
        "## Claim 3: noise amplification rather than a shifted optimum\n\n"
        "From paired final averaged iterates over repeats (D = w_q - w_fp, same data): "
        "shift = ||mean D||_H^2 divided by its expected value if the mean did not move (about 1 "
        "under no shift); amplification = (spread of w_fp + spread of D) / spread of w_fp in "
        "the H norm (see `shift_and_spread`). Check: shift/null < 4 and amplification > 1 for "
        "params, activations and gradients; the additive data quantizer is the contrast that "
        "must show a shift (shift/null > 4, the same bound). Multiplicative data quantization "
        "shifts too: it keeps the spectrum's shape but scales E[x x^T] by (1 + c) while E[x y] "
        "is unchanged, so the optimum shrinks to w* / (1 + c).\n\n"
        + "\n".join(lines) + f"\n- contrast data/additive shift/null > 4: "
        f"{'PASS' if ok_contrast else 'FAIL'}\n- overall: {'PASS' if ok_all else 'FAIL'}\n")
    return checks, sections


def federated_claim(fed: dict[str, list[dict]]) -> tuple[dict, str]:
    """Unbiased codecs keep the optimum: at the final round every codec's excess risk is
    within a factor 1.5 of fp32's while its uplink is smaller."""
    base = fed["fp32"][-1]
    lines, ok_all = [], True
    for label, rows in fed.items():
        last = rows[-1]
        ratio = last["excess_risk"] / base["excess_risk"]
        bits = last["uplink_bits"] / base["uplink_bits"]
        ok = label == "fp32" or (ratio < 1.5 and bits < 1)
        ok_all &= ok
        lines.append(f"- {label}: final excess risk {last['excess_risk']:.4g} ({ratio:.2f}x "
                     f"fp32) with {last['uplink_bits'] / 8e6:.3f} MB uplink ({bits:.3f}x fp32)")
    text = ("## Federated variant: excess risk against uplink bits\n\n"
            "FedSGD over the same problem; each client's gradient is serialized by the codec "
            "and the server averages ``fq.decode_mean`` of the parsed bytes "
            "(`federated.png`, x axis = 8 * len(bytes) summed over clients and rounds). "
            "Check: after the same number of rounds each codec's excess risk is within 1.5x "
            "of fp32's, with less uplink.\n\n" + "\n".join(lines)
            + f"\n- check: {'PASS' if ok_all else 'FAIL'}\n")
    worst = max(r[-1]["excess_risk"] / base["excess_risk"] for r in fed.values())
    return check_row("linreg", "federated: codecs reach fp32's risk (1.5x) with fewer bits",
                     f"worst risk ratio {worst:.2f} over {len(fed) - 1} codecs", ok_all), text


def write_outputs(out_dir: Path, cfg: dict, problem: Problem, by_steps: dict, by_batch: dict,
                  spectra: dict, fed: dict, checks: list[dict], sections: list[str],
                  skipped: list[str], lr: float, quick: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_rows = []
    for label, res in by_steps.items():
        fp_res = by_steps["fp"]
        for i, t in enumerate(res["steps"].tolist()):
            pen = paired_penalty(problem, {"risk": res["risk"][i], "w_bar": res["w_bars"][i]},
                                 {"risk": fp_res["risk"][i], "w_bar": fp_res["w_bars"][i]},
                                 label.split("/")[0])
            r = res["risk"][i]
            steps_rows.append({"config": label, "step": t, "excess_risk_mean": float(r.mean()),
                               "excess_risk_se": float(r.std() / math.sqrt(r.numel())),
                               "penalty_mean": float(pen.mean())})
    batch_rows = []
    for label, per_b in by_batch.items():
        place = label.split("/")[0]
        for b, res in per_b.items():
            pen = paired_penalty(problem, res, by_batch["fp"][b], place)
            batch_rows.append({"config": label, "batch": b,
                               "excess_risk_mean": float(res["risk"].mean()),
                               "excess_risk_se": float(res["risk"].std()
                                                       / math.sqrt(res["risk"].numel())),
                               "penalty_mean": float(pen.mean()),
                               "penalty_se": float(pen.std() / math.sqrt(pen.numel()))})
    spec_rows = [{"index": i + 1, "fp": float(spectra["fp"][i]),
                  "additive": float(spectra["additive"][i]),
                  "multiplicative": float(spectra["multiplicative"][i])}
                 for i in range(spectra["fp"].numel())]
    fed_rows = [{"codec": label, **row} for label, rows in fed.items() for row in rows]
    write_csv(out_dir / "risk_vs_steps.csv", steps_rows)
    write_csv(out_dir / "risk_vs_batch.csv", batch_rows)
    write_csv(out_dir / "spectrum.csv", spec_rows)
    write_csv(out_dir / "federated.csv", fed_rows)
    write_json(out_dir / "results.json", {"config": cfg, "quick": quick, "lr": lr,
                                          "checks": checks, "skipped_codecs": skipped})

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    fp_res = by_steps["fp"]
    for col, model in enumerate(MODELS):
        for label in ["fp"] + [f"{p}/{model}" for p in PLACES]:
            res = by_steps[label]
            steps = res["steps"].numpy()
            # one colour per place in both panels (C0 is full precision)
            color = "C0" if label == "fp" else f"C{PLACES.index(label.split('/')[0]) + 1}"
            axes[0, col].loglog(steps, res["risk"].mean(1).cpu().numpy(), label=label,
                                ls="--" if label == "fp" else "-", color=color)
            if label != "fp":
                pen = [float(paired_penalty(problem, {"risk": r, "w_bar": w},
                                            {"risk": rf, "w_bar": wf},
                                            label.split("/")[0]).mean())
                       for r, w, rf, wf in zip(res["risk"], res["w_bars"], fp_res["risk"],
                                               fp_res["w_bars"], strict=True)]
                axes[1, col].loglog(steps, [max(v, 1e-12) for v in pen], label=label,
                                    color=color)
        axes[0, col].set(title=f"{model} quantization", ylabel="excess risk of averaged iterate")
        axes[1, col].set(xlabel="SGD steps", ylabel="penalty over paired full precision")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "risk_vs_steps.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    batches = sorted(by_batch["fp"])
    for ax, model in zip(axes, MODELS, strict=True):
        for place in PLACES:
            pen = [float(paired_penalty(problem, by_batch[f"{place}/{model}"][b],
                                        by_batch["fp"][b], place).mean()) for b in batches]
            ax.plot(batches, [max(v, 1e-12) for v in pen], marker="o", label=place)
            if place == "activations":
                ax.plot(batches, [pen[0] * batches[0] / b for b in batches], "k:",
                        label="1/B through activations' first point")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(title=f"{model}: penalty over full precision", xlabel="batch size B",
               ylabel="excess risk penalty")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "risk_vs_batch.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    idx = range(1, spectra["fp"].numel() + 1)
    for key in ("fp", "additive", "multiplicative"):
        ax.loglog(idx, spectra[key].clamp_min(1e-12).cpu().numpy(), label=key)
    ax.set(title="eigenvalues of the quantized data covariance", xlabel="index i",
           ylabel="eigenvalue")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "spectrum.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, rows in fed.items():
        ax.loglog([r["uplink_bits"] for r in rows], [r["excess_risk"] for r in rows],
                  marker=".", label=label)
    ax.set(title="federated linear regression", xlabel="uplink bits (measured)",
           ylabel="excess risk of averaged iterate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "federated.png", dpi=120)
    plt.close(fig)

    pc, sc, qc = cfg["problem"], cfg["sgd"], cfg["quantization"]
    header = (f"# Learning under quantization: linear regression (Zhang, Su and Zou)\n\n"
              f"{'Quick mode. ' if quick else ''}d = {pc['dim']}, lambda_i = i^-{pc['decay']}, "
              f"noise std {pc['noise_std']}, lr = {lr:.4g} ({sc['lr_scale']} / tr H), "
              f"{sc['repeats']} paired repeats, {sc['steps']} steps at B = {sc['batch']}; "
              f"batch sweep {sorted(by_batch['fp'])} at {sc['batch_steps']} steps. Quantizers: "
              f"additive step {qc['additive_step']}, multiplicative {qc['mantissa_bits']} "
              f"mantissa bits. Plot `risk_vs_steps.png` shows every place and model.\n\n")
    if skipped:
        header += f"Codecs not registered in this build (skipped): {', '.join(skipped)}.\n\n"
    write_claims_report(out_dir / "report.md", header, checks, sections)


def register(app: typer.Typer) -> None:
    @app.command("linreg")
    def linreg_command(
        config: Annotated[Path, typer.Option(help="TOML config")] = DEFAULT_CONFIG,
        out: Annotated[Path | None, typer.Option(help="output folder (default "
                                                      "results/<name>)")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="small sizes, seconds")] = False,
    ) -> None:
        """Quantized SGD in linear regression: the five places, additive vs multiplicative."""
        cfg = load_config(config)
        out_dir = out or Path("results") / cfg.get("name", "linreg")
        checks = run_linreg(cfg, out_dir, quick=quick)
        print_checks(f"linreg -> {out_dir}", checks)
