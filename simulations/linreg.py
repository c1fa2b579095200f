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
   but do not shift its mean (the optimum), unlike additive data quantization; for additive
   quantization the added excess risk matches a closed-form prediction
   (``averaged_sgd_variance``) made from the grid step alone.

A federated variant sends each client's gradient through a project codec (``fq.get_codec``)
and plots excess risk against the uplink bytes actually serialized. It checks that fp32 has
converged to the noise floor that label noise predicts, and that each codec's added risk
matches the noise its decoded mean measurably carries.

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

import fedquant as fq
from fedquant.simulations.common import check_keys, one_thread, write_csv, write_json
from fedquant.simulations.quantizers import Exact, make_quantizer

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
                  "repeats": int, "dim": int, "decay": float, "noise_std": float,
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
    penalty = mean_r ||D_r||_H^2 (the excess-risk increase, as in `paired_penalty`) and
    penalty_se its standard error over the repeats.
    """
    h = problem.eigenvalues
    diff = w_q - w_fp
    reps = diff.shape[0]
    mean_diff = diff.mean(0)
    shift = float((mean_diff ** 2 * h).sum())
    noise = float((((diff - mean_diff) ** 2) * h).sum() / (reps - 1))
    null_level = noise / reps
    per_repeat = (diff ** 2 * h).sum(-1)
    return {"shift": shift, "null_level": null_level,
            "shift_ratio": shift / null_level if null_level > 0 else math.inf,
            "penalty": float(per_repeat.mean()),
            "penalty_se": float(per_repeat.std() / math.sqrt(reps))}


def averaged_sgd_variance(eigenvalues: torch.Tensor, lr: float, batch: int, steps: int,
                          noise_cov: torch.Tensor | float, start: int = 1) -> float:
    """E||D_bar||_H^2 for the linear recursion of a perturbation of SGD, in closed form.

    D_0 = 0, D_t = (I - lr S_t) D_{t-1} - lr g_t with S_t = (1/B) sum_j x_j x_j^T over B
    fresh samples x ~ N(0, H), H = diag(eigenvalues), and g_t zero-mean noise, independent of
    the past given S_t, with diagonal covariance `noise_cov` (a vector, or a number for
    isotropic noise); D_bar is the mean of D_start..D_steps. This is how an unbiased
    quantizer's error propagates into the averaged iterate of the paired quantized run
    (``paired_penalty``) and how label noise sets the variance term of full-precision SGD.

    Derivation (standard for averaged SGD, e.g. Jain et al., "Parallelizing Stochastic
    Gradient Descent for Least Squares Regression", JMLR 2018): for Gaussian x,
    E[S C S] = H C H + (H C H + tr(H C) H) / B, so C_t = E[D_t D_t^T] stays diagonal:
    C_t = C - 2 lr H C + lr^2 (H C H (1 + 1/B) + tr(H C) H / B) + lr^2 Q. Cross terms are
    E[D_t D_s^T] = (I - lr H)^(t-s) C_s for t > s, so with a = 1 - lr lambda,
    Var(sum D_t)_i = sum_s C_s,i (1 + 2 a (1 - a^(T-s)) / (1 - a)).
    """
    h = eigenvalues.detach().to("cpu", torch.float64)
    q = (noise_cov.detach().to("cpu", torch.float64) if torch.is_tensor(noise_cov)
         else torch.full_like(h, float(noise_cov)))
    if not 1 <= start <= steps or batch < 1 or not lr > 0:
        raise ValueError(f"need 1 <= start <= steps, batch >= 1, lr > 0; got start {start}, "
                         f"steps {steps}, batch {batch}, lr {lr}")
    a = 1 - lr * h
    log_a = torch.log1p(-lr * h)
    contract = 1 - 2 * lr * h + lr * lr * h * h * (1 + 1 / batch)
    cov, total = torch.zeros_like(h), torch.zeros_like(h)
    for s in range(1, steps + 1):
        cov = cov * contract + (lr * lr / batch) * float((h * cov).sum()) * h + lr * lr * q
        if s >= start:
            total += cov * (1 + 2 * a * -torch.expm1((steps - s) * log_a) / (lr * h))
    return float((h * total).sum()) / (steps - start + 1) ** 2


def additive_noise_cov(problem: Problem, place: str, step: float, batch: int) -> torch.Tensor:
    """Covariance of g_t in `averaged_sgd_variance` for additive quantization at `place`.

    Uniform stochastic rounding with grid `step` has error variance step^2 / 6 averaged over
    grid positions (``simulations.quantizers``; exact when the rounded values spread over many
    grid cells, as residuals with label noise std >= 2 steps do). Activation and gradient
    errors e_j add to the residuals, g = (1/B) sum_j e_j x_j: covariance s2 H / B (the 1/B law
    of claim 1). A parameter error e (one draw per step, shared by the batch) gives g = S e:
    covariance s2 E[S^2] = s2 (H^2 (1 + 1/B) + tr(H) H / B).
    """
    s2 = step * step / 6
    h = problem.eigenvalues.to(torch.float64)
    if place in ("activations", "gradients"):
        return s2 * h / batch
    if place == "params":
        return s2 * (h * h * (1 + 1 / batch) + float(h.sum()) * h / batch)
    raise ValueError(f"no additive noise model for place {place!r}")


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
                  batch: int, lr: float, seed: int) -> dict:
    """FedSGD: each round every client sends its mini-batch gradient through `codec`
    (serialized, parsed, decoded by ``fq.decode_mean``); the server steps with the mean.

    The iterate is tail-averaged: at round t the estimate is the mean of the iterates of rounds
    t//2 + 1..t (Jain et al., JMLR 2018), so the initial bias decays geometrically and what
    remains at the end is noise, which is what the codecs add to. Returns ``rows`` (one per
    checkpoint: cumulative uplink bits = 8 * len(bytes), excess risk of the tail average),
    ``w_bar`` (the final tail average), ``noise`` (mean over the final half of the rounds of
    ||decoded mean - true mean||^2 / d: the codec's added noise per coordinate, 0 for fp32)
    and ``vnmse`` (that noise relative to the clients' gradients, clients * sum ||err||^2 /
    sum mean_c ||g_c||^2; about the codec's vNMSE when clients' errors are independent).
    """
    device = problem.eigenvalues.device
    data_gen = torch.Generator(device=device).manual_seed(seed)
    d = problem.w_star.numel()
    w = torch.zeros_like(problem.w_star)
    prefix = [torch.zeros_like(w)]  # prefix[t] = sum of the iterates of rounds 1..t
    uplink_bytes, rows, marks = 0, [], set(checkpoints(rounds))
    err2 = grad2 = 0.0
    for t in range(1, rounds + 1):
        x, y = problem.sample((clients, batch), data_gen)
        grads = torch.einsum("cb,cbd->cd", x @ w - y, x) / batch
        true_mean = grads.mean(0)
        if codec is None:
            mean = true_mean
            uplink_bytes += grads.numel() * 4
        else:
            round_seed = fq.random.derive_seed(seed, 1_000_000 + t)
            blobs = [codec.encode(g, seed=fq.random.derive_seed(round_seed, c)).to_bytes()
                     for c, g in enumerate(grads)]
            uplink_bytes += sum(len(b) for b in blobs)
            mean = fq.decode_mean([fq.Encoded.from_bytes(b) for b in blobs], device=device)
        if t > rounds // 2:
            err2 += float(((mean - true_mean) ** 2).sum())
            grad2 += float((grads ** 2).sum()) / clients
        w = w - lr * mean
        prefix.append(prefix[-1] + w)
        if t in marks:
            half = t // 2
            rows.append({"round": t, "uplink_bits": 8 * uplink_bytes,
                         "excess_risk": float(problem.excess_risk(
                             (prefix[t] - prefix[half]) / (t - half)))})
    half = rounds // 2
    tail = rounds - half
    return {"rows": rows, "w_bar": (prefix[rounds] - prefix[half]) / tail,
            "noise": err2 / (tail * d), "vnmse": clients * err2 / grad2 if grad2 else 0.0}


def federated_runs(problem: Problem, codec: fq.Codec | None, fc: dict, lr: float,
                   seed: int) -> dict:
    """`fc["repeats"]` federated runs (seeds seed, seed + 1, ...: paired across codecs), their
    rows averaged, their final tail averages stacked (``w_bars``, repeats x d)."""
    runs = [federated_run(problem, codec, fc["clients"], fc["rounds"], fc["batch"], lr,
                          seed + r) for r in range(fc.get("repeats", 1))]
    rows = [{"round": row["round"],
             "uplink_bits": round(sum(r["rows"][i]["uplink_bits"] for r in runs) / len(runs)),
             "excess_risk": sum(r["rows"][i]["excess_risk"] for r in runs) / len(runs)}
            for i, row in enumerate(runs[0]["rows"])]
    return {"rows": rows, "w_bars": torch.stack([r["w_bar"] for r in runs]),
            "noise": sum(r["noise"] for r in runs) / len(runs),
            "vnmse": sum(r["vnmse"] for r in runs) / len(runs)}


def federated_problem(pc: dict, fc: dict, seed: int,
                      device: str | torch.device = "cpu") -> Problem:
    """The federated variant's problem: [problem] with any of dim, decay and noise_std that
    [federated] sets instead (a problem small enough that fp32 reaches its noise floor)."""
    return make_problem(fc.get("dim", pc["dim"]), fc.get("decay", pc["decay"]),
                        fc.get("noise_std", pc["noise_std"]), seed, device)


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
        # federated variant, on its own (smaller) problem
        fed_problem = federated_problem(pc, fc, seed, device)
        fed_lr = fc["lr_scale"] / float(fed_problem.eigenvalues.sum())
        fed: dict[str, dict] = {}
        for spec in [{"name": "fp32"}] + fed_specs:
            label = codec_label(spec)
            bar.update(task, description=f"federated: {label}")
            params = {k: v for k, v in spec.items() if k != "name"}
            codec = fq.get_codec(spec["name"], **params)
            fed[label] = federated_runs(fed_problem, codec, fc, fed_lr, seed + 40)
            bar.advance(task)

    checks, sections = claims(problem, by_steps, by_batch, spectra, qc, seed, lr,
                              sc["batch"], sc["steps"])
    fed_checks, fed_text = federated_claim(fed_problem, fed, fed_lr, fc)
    checks += fed_checks
    sections.append(fed_text)
    write_outputs(out_dir, cfg, problem, by_steps, by_batch, spectra, fed, checks, sections,
                  skipped, lr, quick)
    return checks


def claims(problem: Problem, by_steps: dict, by_batch: dict, spectra: dict, qc: dict,
           seed: int, lr: float, batch: int, steps: int) -> tuple[list[dict], list[str]]:
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
    check, text = noise_claim(problem, by_steps, qc["additive_step"], lr, batch, steps)
    checks.append(check)
    sections.append(text)
    return checks, sections


def noise_claim(problem: Problem, by_steps: dict, step: float, lr: float, batch: int,
                steps: int) -> tuple[dict, str]:
    """Claim 3: parameter, activation and gradient quantization add the noise that theory
    predicts and do not shift the optimum.

    Prediction: additive quantization at those places feeds zero-mean noise of known
    covariance (``additive_noise_cov``, from the grid step alone) into SGD, so the paired
    penalty E||w_q - w_fp||_H^2 of the averaged iterate equals ``averaged_sgd_variance`` of
    that noise; nothing is fitted to the run. Check per additive place: |measured -
    predicted| <= 3 standard errors over repeats + 10% (the step^2 / 6 variance is an
    average over grid positions). For all six (place, model) pairs the mean of D must not
    move (shift / null < 4) while the noise is measurable (penalty > 3 standard errors);
    additive data quantization is the contrast that must exceed the same shift bound.
    """
    lines, ok_all = [], True
    w_fp = by_steps["fp"]["w_bar"]
    stats = {}
    for model in MODELS:
        for place in PLACES:
            label = f"{place}/{model}"
            st = shift_and_spread(problem, by_steps[label]["w_bar"], w_fp)
            stats[label] = st
            if place in ("data", "labels"):
                lines.append(f"- {label} (contrast): shift/null {st['shift_ratio']:.2f}, "
                             f"penalty {st['penalty']:.3g}")
                continue
            ok = st["shift_ratio"] < 4 and st["penalty"] > 3 * st["penalty_se"]
            text = (f"- {label}: shift/null {st['shift_ratio']:.2f}, penalty "
                    f"{st['penalty']:.3g} (se {st['penalty_se']:.2g})")
            if model == "additive":
                pred = averaged_sgd_variance(problem.eigenvalues, lr, batch, steps,
                                             additive_noise_cov(problem, place, step, batch))
                st["predicted"] = pred
                tol = 3 * st["penalty_se"] + 0.1 * pred
                within = abs(st["penalty"] - pred) <= tol
                ok &= within
                text += (f", predicted {pred:.3g}, measured / predicted "
                         f"{st['penalty'] / pred:.3f} (tolerance +-{tol / pred:.3f})")
            ok_all &= ok
            lines.append(text + f" [{'PASS' if ok else 'FAIL'}]")
    contrast = stats["data/additive"]["shift_ratio"]
    ok_contrast = contrast > 4  # the same bound: a shift is what exceeds it
    ok_all &= ok_contrast
    noisy = [stats[f"{p}/{m}"] for m in MODELS for p in ("params", "activations", "gradients")]
    ratios = [stats[f"{p}/additive"]["penalty"] / stats[f"{p}/additive"]["predicted"]
              for p in ("params", "activations", "gradients")]
    check = check_row(
        "linreg", "3: params/activations/gradients add the predicted noise, no shift",
        f"additive measured/predicted penalty {min(ratios):.2f}..{max(ratios):.2f}; max "
        f"shift/null {max(st['shift_ratio'] for st in noisy):.2f}; data/additive shift/null "
        f"{contrast:.1f}", ok_all)
    text = (
        "## Claim 3: noise amplification rather than a shifted optimum\n\n"
        "From paired final averaged iterates over repeats (D = w_q - w_fp, same data). "
        "penalty = mean ||D||_H^2, the excess-risk increase. For additive quantization it is "
        "predicted in closed form, independently of the run: the quantizer adds zero-mean "
        "noise of variance step^2 / 6 to the residuals (activations, gradients) or to every "
        "parameter (params), and `averaged_sgd_variance` propagates that noise through "
        "averaged SGD exactly for Gaussian data. Check: |measured - predicted| <= 3 standard "
        "errors + 10%, for params, activations and gradients. shift = ||mean D||_H^2 divided "
        "by its expected value if the mean did not move (about 1 under no shift); check "
        "shift/null < 4 and penalty > 3 standard errors for both models; the additive data "
        "quantizer is the contrast that must show a shift (shift/null > 4, the same bound). "
        "Multiplicative data quantization shifts too: it keeps the spectrum's shape but scales "
        "E[x x^T] by (1 + c) while E[x y] is unchanged, so the optimum shrinks to "
        "w* / (1 + c).\n\n"
        + "\n".join(lines) + f"\n- contrast data/additive shift/null > 4: "
        f"{'PASS' if ok_contrast else 'FAIL'}\n- overall: {'PASS' if ok_all else 'FAIL'}\n")
    return check, text


def federated_claim(problem: Problem, fed: dict[str, dict], lr: float,
                    fc: dict) -> tuple[list[dict], str]:
    """Two checks of the federated variant, each against a prediction made without the
    risk it is compared with.

    1. fp32 converged: its final tail-averaged excess risk (mean over repeats) is within 3
       standard errors + 10% of the variance floor that label noise alone leaves,
       ``averaged_sgd_variance`` with noise covariance sigma^2 H / (clients * batch). A run
       that still carries initial bias lands above it.
    2. Each codec adds the noise it measurably sends: the paired penalty mean_r
       ||w_codec,r - w_fp32,r||_H^2 (same data stream) is within 3 standard errors + 15% of
       ``averaged_sgd_variance`` with isotropic noise of the measured per-coordinate error of
       the decoded mean (rotation-based codecs spread their error evenly over coordinates),
       and it uses fewer uplink bits than fp32.
    """
    clients, batch, rounds = fc["clients"], fc["batch"], fc["rounds"]
    start = rounds // 2 + 1
    eig = problem.eigenvalues
    base = fed["fp32"]
    fp_risks = problem.excess_risk(base["w_bars"])
    reps = fp_risks.numel()
    se = float(fp_risks.std() / math.sqrt(reps)) if reps > 1 else math.inf
    floor = averaged_sgd_variance(eig, lr, clients * batch, rounds,
                                  problem.noise_std ** 2 * eig / (clients * batch), start)
    fp_risk = float(fp_risks.mean())
    ok_fp = abs(fp_risk - floor) <= 3 * se + 0.1 * floor
    fp_check = check_row(
        "linreg", "federated: fp32 converges to its noise floor",
        f"fp32 excess risk {fp_risk:.3g} (se {se:.2g}) vs predicted floor {floor:.3g} "
        f"(x{fp_risk / floor:.2f}, initial {float(problem.excess_risk(0 * problem.w_star)):.3g})",
        ok_fp)
    base_bits = base["rows"][-1]["uplink_bits"]
    lines, ok_all, worst = [], True, 0.0
    for label, res in fed.items():
        if label == "fp32":
            continue
        diff = problem.excess_risk(res["w_bars"] - base["w_bars"] + problem.w_star)
        pen = float(diff.mean())
        pen_se = float(diff.std() / math.sqrt(reps)) if reps > 1 else math.inf
        pred = averaged_sgd_variance(eig, lr, clients * batch, rounds, res["noise"], start)
        bits = res["rows"][-1]["uplink_bits"] / base_bits
        ok = abs(pen - pred) <= 3 * pen_se + 0.15 * pred and bits < 1
        ok_all &= ok
        worst = max(worst, abs(pen / pred - 1) if pred > 0 else math.inf)
        risk = float(problem.excess_risk(res["w_bars"]).mean())
        lines.append(f"- {label}: penalty {pen:.3g} (se {pen_se:.2g}), predicted {pred:.3g} "
                     f"(x{pen / pred:.2f}); measured vNMSE {res['vnmse']:.3g}; excess risk "
                     f"{risk:.3g} ({risk / fp_risk:.2f}x fp32) with "
                     f"{res['rows'][-1]['uplink_bits'] / 8e6:.3f} MB uplink ({bits:.3f}x fp32)"
                     f" [{'PASS' if ok else 'FAIL'}]")
    codec_check = check_row(
        "linreg", "federated: each codec adds the noise its measured error predicts, with "
        "fewer bits", f"worst |penalty / predicted - 1| {worst:.2f} over {len(fed) - 1} codecs",
        ok_all)
    d = eig.numel()
    text = ("## Federated variant: excess risk against uplink bits\n\n"
            f"FedSGD on its own problem (d = {d}, {clients} clients x batch {batch}, {rounds} "
            f"rounds, lr {lr:.4g}, {reps} paired repeats); each client's gradient is "
            "serialized by the codec and the server averages ``fq.decode_mean`` of the parsed "
            "bytes (`federated.png`, x axis = 8 * len(bytes) summed over clients and rounds). "
            "The iterate is tail-averaged over the last half of the rounds, so fp32 reaches "
            "the floor that label noise sets; that floor and each codec's added risk are "
            "predicted by `averaged_sgd_variance` (see `federated_claim`).\n\n"
            f"- fp32: excess risk {fp_risk:.3g} (se {se:.2g}), predicted noise floor "
            f"{floor:.3g}; check |measured - predicted| <= 3 se + 10%: "
            f"{'PASS' if ok_fp else 'FAIL'}\n" + "\n".join(lines)
            + "\n\nCheck per codec: |penalty - predicted| <= 3 se + 15% and fewer bits than "
            f"fp32: {'PASS' if ok_all else 'FAIL'}\n")
    return [fp_check, codec_check], text


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
    fed_rows = [{"codec": label, **row} for label, res in fed.items() for row in res["rows"]]
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
    for label, res in fed.items():
        rows = res["rows"]
        ax.loglog([r["uplink_bits"] for r in rows], [r["excess_risk"] for r in rows],
                  marker=".", label=label)
    ax.set(title="federated linear regression", xlabel="uplink bits (measured)",
           ylabel="excess risk of the tail-averaged iterate")
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
