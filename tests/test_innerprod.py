"""`fedquant innerprod` (seed 000): the schemes' distortion, the post's table, the reports."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedquant.codecs.eden import lloyd_max_centroids
from fedquant.simulations import innerprod as ip


def _lloyd_max_mse(bits):
    table = json.loads((ip.Path(ip.fq.__file__).parent / "data" / "lloyd_max.json").read_text())
    return table[str(bits)]["mse"]


def test_dither_error_is_uniform_and_input_free():
    """Subtractive dither: error in [-D/2, D/2), mean 0, variance D^2 / 12, for any input."""
    step = 0.7
    seed = ip.stream_seed(3, 0)
    for v in (torch.randn(8, 4096, dtype=torch.float64), torch.full((8, 4096), 2.2,
                                                                    dtype=torch.float64)):
        v_hat, _ = ip.dither_step_estimate(v, step, seed, 2)
        err = (v_hat - v).flatten()
        assert float(err.abs().max()) <= step / 2 + 1e-12
        assert abs(float(err.mean())) < 5 * step / math.sqrt(12 * err.numel())
        assert float(err.var()) == pytest.approx(step**2 / 12, rel=0.05)


def test_dither_step_calibration_hits_the_rate():
    a, _ = ip.gaussian_pairs(6, 1024, 0, "cpu")
    seed = ip.stream_seed(0, 0)
    for rate in (0.2, 1.0, 3.0):
        step = ip.calibrate_dither_step(a, rate, seed)
        _, index = ip.dither_step_estimate(a, step, seed, 2)
        assert ip.entropy_bits(index) == pytest.approx(rate, abs=0.01)


@pytest.mark.parametrize("rate,bits", [(0.5, 1), (1.0, 2), (2.0, 2)])
def test_timeshare_matches_the_rebuilt_formula(rate, bits):
    """Section 6's lost formula, rebuilt: MSE / n = kappa (2 D_b - D_b^2) + 1 - kappa."""
    n, trials = 1024, 150
    a, b = ip.gaussian_pairs(trials, n, 11, "cpu")
    est, actual = ip.timeshare(a, b, rate, bits, ip.stream_seed(5, 0))
    got = ip.summarize(est, a, b)
    kappa = rate / bits
    d = _lloyd_max_mse(bits)
    expected = kappa * (2 * d - d * d) + 1 - kappa
    assert actual == pytest.approx(rate, abs=1 / n)
    assert abs(got["mse_over_n"] - expected) < 4 * got["se_over_n"], (got, expected)


def test_deterministic_hits_fractional_rates_and_is_deterministic():
    a, b = ip.gaussian_pairs(4, 1000, 1, "cpu")
    for rate in (0.3, 1.0, 2.5):
        est1, actual = ip.deterministic(a, b, rate)
        est2, _ = ip.deterministic(a, b, rate)
        assert actual == pytest.approx(rate, abs=1e-3) and torch.equal(est1, est2)
    assert ip.lloyd_max(torch.tensor([10.0]), 1).item() == pytest.approx(
        float(lloyd_max_centroids(1)[-1]))


def test_sketch_is_unbiased_with_variance_n_squared():
    """Proposition 2: E C_hat = A^T B and Var = |A|^2 |B|^2 + (A^T B)^2 for fixed A, B."""
    n, trials = 64, 3000
    a, b = ip.gaussian_pairs(1, n, 4, "cpu")
    a, b = a.expand(trials, n), b.expand(trials, n)
    est, bits = ip.sketch(a, b, ip.stream_seed(9, 0))
    c = float((a[0] * b[0]).sum())
    var = float(a[0].dot(a[0]) * b[0].dot(b[0])) + c * c
    assert abs(float(est.mean()) - c) < 5 * math.sqrt(var / trials)
    assert float(est.var()) == pytest.approx(var, rel=0.15)
    assert bits == 64 / n


def test_gamma_is_the_rebuilt_time_sharing_hull():
    knee = ip.gamma_knee()
    assert knee == pytest.approx(0.906, abs=0.002)
    assert ip.gamma(1e-9) == pytest.approx(1.0)
    # continuous and tangent at the knee: the line from (0, 1) meets the curve there
    h = 1e-6
    assert ip.gamma(knee - h) == pytest.approx(ip.gamma(knee + h), abs=1e-5)
    slope_curve = (ip.gamma(knee + 2 * h) - ip.gamma(knee + h)) / h
    assert slope_curve == pytest.approx((ip.gamma(knee) - 1) / knee, rel=1e-3)
    rates = [0.1 * i for i in range(1, 40)]
    assert all(ip.gamma(x) > ip.gamma(y) for x, y in zip(rates, rates[1:], strict=False))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("innerprod")
    checks = ip.run_innerprod(ip.load_config(), out, quick=True, progress=False)
    return out, checks


def test_quick_run_passes_the_posts_table(quick_run):
    _, checks = quick_run
    claims = " ".join(c["claim"] for c in checks)
    for word in ("sketch", "dithering", "deterministic", "time-sharing"):
        assert word in claims
    assert all(c["result"] == "PASS" for c in checks), checks


def test_quick_run_writes_reports(quick_run):
    out, checks = quick_run
    for png in ("mse_vs_rate.png", "mse_vs_n.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["checks"] == checks
    schemes = {r["scheme"] for r in saved["rows"]}
    assert {"deterministic", "dither", "timeshare", "sketch"} <= schemes
    assert any(s.startswith("eden") for s in schemes)  # a project codec landed somewhere
    report = (out / "report.md").read_text()
    assert report.count("## ") >= 4 and "PASS" in report
    header = (out / "innerprod.csv").read_text().splitlines()[0]
    assert "mse_over_n" in header and "rate_actual" in header


def test_project_codec_rate_is_measured_bytes(quick_run):
    out, _ = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        if r["scheme"].startswith("eden"):
            # a codec never exceeds the budget it was fitted to (bytes, header included)
            assert r["rate_actual"] <= r["rate_target"] + 1e-9


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(ip.DEFAULT_CONFIG.read_text().replace("max_bits =", "maxbits ="))
    with pytest.raises(ValueError, match="maxbits.*allowed"):
        ip.load_config(path)
    path.write_text("n = 10\n")
    with pytest.raises(ValueError, match="lacks"):
        ip.load_config(path)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["n", "rates", "trials", "bogus", "quick", "seed"]),
                       st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.booleans(),
                                 st.lists(st.integers(), max_size=2),
                                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
                       max_size=4))
def test_schema_check_rejects_bad_keys_and_types_cleanly(config):
    from fedquant.simulations.common import check_keys

    try:
        check_keys(config, ip.SCHEMA)
    except ValueError as err:
        assert any(repr(k) in str(err) or k in str(err) for k in config)
    else:
        assert set(config) <= set(ip.SCHEMA)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="[]=.\"' \nabcdeimnpqrstuk0123456789-_{},", max_size=120))
def test_config_parser_rejects_garbage_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError):
        ip.load_config(path)  # garbage, or a valid table lacking the required keys
