"""`fedquant linreg` (seed 002): quantizer models, quantized SGD and the claims, measured."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedquant.simulations import linreg
from fedquant.simulations.quantizers import Additive, Exact, Multiplicative, make_quantizer


def _moments(quantizer, value, count=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.full((count,), value, dtype=torch.float64)
    err = quantizer(v, g) - v
    return float(err.mean()), float(err.var()), math.sqrt(float(err.var()) / count)


@pytest.mark.parametrize("value", [0.013, 0.37, -2.61, 41.9])
def test_additive_is_unbiased_with_bounded_value_free_variance(value):
    q = Additive(step=0.25)
    mean, var, se = _moments(q, value)
    assert abs(mean) < 5 * se + 1e-12
    frac = (value / 0.25) % 1  # error variance p (1 - p) step^2 depends on the grid position only
    assert var == pytest.approx(frac * (1 - frac) * 0.25**2, rel=0.02)
    assert var <= 0.25**2 / 4


def test_additive_variance_does_not_grow_with_magnitude():
    q = Additive(step=0.1)
    small = _moments(q, 0.033)[1]
    large = _moments(q, 1000.033)[1]
    assert large == pytest.approx(small, rel=0.05)


def test_multiplicative_is_unbiased_and_relative_variance_is_scale_free():
    q = Multiplicative(mantissa_bits=3)
    rel = []
    for value in (1.3 * 2.0**-10, 1.3, -1.3 * 2.0**14):  # same mantissa, other binades
        mean, var, se = _moments(q, value)
        assert abs(mean) < 5 * se
        rel.append(var / value**2)
        assert var <= value**2 * 4.0**-3 / 4
    assert max(rel) / min(rel) == pytest.approx(1.0, abs=0.05)
    assert float(q(torch.zeros(4), torch.Generator())[0]) == 0.0


def test_quantizer_arguments_are_checked():
    with pytest.raises(ValueError, match="step"):
        Additive(0)
    with pytest.raises(ValueError, match="mantissa_bits"):
        Multiplicative(-1)
    with pytest.raises(ValueError, match="additive"):
        make_quantizer("log", 0.1, 2)


def test_paired_runs_share_the_data_stream():
    problem = linreg.make_problem(32, 1.5, 0.5, seed=1)
    a = linreg.quantized_sgd(problem, {}, 50, 2, 0.1, 3, seed=5)
    b = linreg.quantized_sgd(problem, {"labels": Exact()}, 50, 2, 0.1, 3, seed=5)
    assert torch.equal(a["w_bar"], b["w_bar"])
    # SGD learns: the averaged iterate's excess risk falls well below the start's ||w*||_H^2
    assert float(a["risk"][-1].mean()) < 0.5 * float(problem.excess_risk(0 * problem.w_star))


def test_spectrum_additive_lifts_tail_multiplicative_keeps_shape():
    """Claim 2 on its own."""
    problem = linreg.make_problem(48, 1.5, 0.5, seed=3)
    fp = linreg.spectrum(problem, Exact(), 3000, seed=1)
    add = linreg.spectrum(problem, Additive(0.25), 3000, seed=1)
    mul = linreg.spectrum(problem, Multiplicative(2), 3000, seed=1)
    assert linreg.condition_number(add) < 0.5 * linreg.condition_number(fp)
    assert linreg.condition_number(mul) / linreg.condition_number(fp) == pytest.approx(1, abs=0.1)
    assert float(add[-1]) > 3 * float(fp[-1])  # the smallest eigenvalue is lifted


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linreg")
    checks = linreg.run_linreg(linreg.load_config(), out, quick=True, progress=False)
    return out, checks


def test_quick_run_passes_every_claim(quick_run):
    _, checks = quick_run
    claims = [c["claim"] for c in checks]
    assert len(checks) == 5 and claims[0].startswith("1") and claims[2].startswith("3")
    assert all(c["result"] == "PASS" for c in checks), checks


def test_quick_run_writes_reports(quick_run):
    out, checks = quick_run
    for name in ("risk_vs_steps", "risk_vs_batch", "spectrum", "federated"):
        assert (out / f"{name}.csv").stat().st_size > 100
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    for heading in ("## Claim 1", "## Claim 2", "## Claim 3", "## Federated"):
        assert heading in report
    assert report.count("PASS") >= len(checks)
    saved = json.loads((out / "results.json").read_text())
    assert saved["checks"] == checks and saved["quick"] is True


def test_federated_uplink_is_measured_bytes(quick_run):
    out, _ = quick_run
    rows = [r for r in (out / "federated.csv").read_text().splitlines()[1:]]
    fp32 = [r.split(",") for r in rows if r.startswith("fp32,")]
    cfg = linreg.effective(linreg.load_config(), True)
    fc = cfg["federated"]
    dim = fc.get("dim", cfg["problem"]["dim"])
    last = fp32[-1]
    # fp32 sends raw words plus a header: a little over 32 bits per coordinate
    raw_bits = 32 * dim * fc["clients"] * fc["rounds"]
    assert int(last[1]) == fc["rounds"]
    assert raw_bits < int(last[2]) < 1.5 * raw_bits
    eden = [r.split(",") for r in rows if r.startswith("eden(bits=2)")]
    assert 0 < int(eden[-1][2]) < int(last[2])


def _claim3_runs(problem, lr, steps=150, batch=4, repeats=24, overrides=None):
    configs = linreg.variants({"additive_step": 0.25, "mantissa_bits": 2})
    configs.update(overrides or {})
    return {label: linreg.quantized_sgd(problem, q, steps, batch, lr, repeats, seed=7)
            for label, q in configs.items()}


def test_averaged_sgd_variance_matches_simulation():
    """The closed form against Monte Carlo: additive gradient quantization's paired penalty."""
    problem = linreg.make_problem(16, 1.5, 0.5, seed=2)
    lr = 0.25 / float(problem.eigenvalues.sum())
    fp = linreg.quantized_sgd(problem, {}, 150, 4, lr, 200, seed=3)
    q = linreg.quantized_sgd(problem, {"gradients": Additive(0.25)}, 150, 4, lr, 200, seed=3)
    pen = linreg.paired_penalty(problem, q, fp, "gradients")
    pred = linreg.averaged_sgd_variance(problem.eigenvalues, lr, 4, 150,
                                        linreg.additive_noise_cov(problem, "gradients", 0.25, 4))
    se = float(pen.std()) / math.sqrt(pen.numel())
    assert abs(float(pen.mean()) - pred) <= 3 * se + 0.05 * pred
    # the 1/B law is in the prediction too
    pred16 = linreg.averaged_sgd_variance(
        problem.eigenvalues, lr, 16, 150, linreg.additive_noise_cov(problem, "gradients", 0.25, 16))
    assert pred16 == pytest.approx(pred / 4, rel=0.05)
    with pytest.raises(ValueError, match="start"):
        linreg.averaged_sgd_variance(problem.eigenvalues, lr, 4, 10, 1.0, start=11)


def test_claim3_passes_and_fails_when_the_noise_is_wrong():
    problem = linreg.make_problem(16, 1.5, 0.5, seed=4)
    lr = 0.25 / float(problem.eigenvalues.sum())
    good = _claim3_runs(problem, lr)
    check, _ = linreg.noise_claim(problem, good, 0.25, lr, 4, 150)
    assert check["result"] == "PASS", check
    # a quantizer with twice the step (4x the variance) misses the prediction
    loud = _claim3_runs(problem, lr, overrides={"activations/additive":
                                                {"activations": Additive(0.5)}})
    check, text = linreg.noise_claim(problem, loud, 0.25, lr, 4, 150)
    assert check["result"] == "FAIL" and "activations/additive" in text
    # a place that is not quantized at all adds no noise: no longer "amplified"
    silent = _claim3_runs(problem, lr, overrides={"params/multiplicative": {}})
    assert linreg.noise_claim(problem, silent, 0.25, lr, 4, 150)[0]["result"] == "FAIL"


class _Scaled:
    """A codec that sends factor * g through `inner`: 0 is a codec that sends zeros."""

    def __init__(self, factor, inner):
        self.factor, self.inner = factor, inner

    def encode(self, g, seed):
        return self.inner.encode(self.factor * g, seed=seed)


def test_federated_claim_fails_unconverged_fp32_and_a_zeros_codec():
    import fedquant as fq

    fc = {"clients": 4, "batch": 8, "rounds": 240, "repeats": 3, "lr_scale": 4.0}
    problem = linreg.federated_problem({"dim": 64, "decay": 0.5, "noise_std": 0.5}, {}, 0)
    lr = fc["lr_scale"] / float(problem.eigenvalues.sum())
    fed = {"fp32": linreg.federated_runs(problem, fq.get_codec("fp32"), fc, lr, 40),
           "fp16": linreg.federated_runs(problem, fq.get_codec("fp16"), fc, lr, 40),
           "zeros": linreg.federated_runs(problem, _Scaled(0.0, fq.get_codec("fp16")), fc,
                                          lr, 40)}
    (fp_check, codec_check), text = linreg.federated_claim(problem, fed, lr, fc)
    assert fp_check["result"] == "PASS", fp_check
    assert codec_check["result"] == "FAIL"
    assert "- fp16:" in text and "[PASS]" in text.split("- fp16:")[1].splitlines()[0]
    assert "[FAIL]" in text.split("- zeros:")[1].splitlines()[0]
    # too few rounds: the tail average still carries the initial bias
    short = {**fc, "rounds": 40}
    fed = {"fp32": linreg.federated_runs(problem, fq.get_codec("fp32"), short, lr, 40)}
    assert linreg.federated_claim(problem, fed, lr, short)[0][0]["result"] == "FAIL"


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(linreg.DEFAULT_CONFIG.read_text().replace("decay =", "decayy ="))
    with pytest.raises(ValueError, match="decayy.*allowed"):
        linreg.load_config(path)
    path.write_text(linreg.DEFAULT_CONFIG.read_text().replace("batch_steps = 100", "stepz = 3"))
    with pytest.raises(ValueError, match="stepz"):
        linreg.load_config(path)
    path.write_text(linreg.DEFAULT_CONFIG.read_text().replace("dim = 512", 'dim = "x"'))
    with pytest.raises(ValueError, match="problem.dim"):
        linreg.load_config(path)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="[]=.\"' \nabcdeimnpqrstuk0123456789-_{},", max_size=120))
def test_config_parser_rejects_garbage_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text(text)
    try:
        linreg.load_config(path)
    except ValueError:
        pass  # tomllib.TOMLDecodeError is a ValueError too


def test_cli_registers_command():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    linreg.register(app)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "--quick" in result.output
