"""The FL evaluation's definitions: intervals, verdicts, reaching the target, the network
model and the per-codec summary built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedquant.simulations import evaluation, fl_report, network
from fedquant.simulations.evaluation import Interval


def test_t_interval_covers_the_true_mean_95_percent_of_the_time_at_3_seeds():
    """A normal-quantile interval (1.96 standard errors) would cover about 80% at n = 3."""
    rng = np.random.default_rng(0)
    cover = 0
    trials = 4000
    for _ in range(trials):
        ci = evaluation.mean_ci(rng.normal(5.0, 2.0, 3))
        cover += ci.low <= 5.0 <= ci.high
    assert abs(cover / trials - 0.95) < 0.015


def test_interval_of_one_value_has_no_bounds_and_bad_values_are_named():
    one = evaluation.mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and one.text(100) == "70.0"
    with pytest.raises(ValueError, match="non-finite"):
        evaluation.mean_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        evaluation.mean_ci([])


@pytest.mark.parametrize("low, high, n, expected", [
    (-0.005, 0.004, 3, evaluation.WITHIN),
    (-0.05, -0.02, 3, evaluation.LAGS),
    (-0.03, 0.01, 3, evaluation.INCONCLUSIVE),
    (float("nan"), float("nan"), 1, evaluation.UNDETERMINED),
])
def test_verdict_reads_the_interval_against_minus_one_point(low, high, n, expected):
    assert evaluation.verdict(Interval((low + high) / 2, low, high, n), 1.0) == expected


def test_paired_difference_removes_the_seed_to_seed_spread():
    """Seeds differ by 20 points; the codec is 0.2 points below fp32 on every seed."""
    fp32 = {0: 0.5, 1: 0.7, 2: 0.9}
    codec = {s: a - 0.002 for s, a in fp32.items()}
    unpaired = evaluation.mean_ci(list(codec.values()))
    assert unpaired.high - unpaired.low > 0.4
    diff = evaluation.paired_difference(codec, fp32)
    assert diff.mean == pytest.approx(-0.002) and diff.high - diff.low < 1e-9
    assert evaluation.verdict(diff) == evaluation.WITHIN


def test_first_reach_needs_the_trailing_mean_not_one_lucky_round():
    accs = [0.1, 0.5, 0.95, 0.6, 0.9, 0.92, 0.93]
    assert evaluation.first_reach(accs, 0.9, tail=1) == 2
    assert evaluation.first_reach(accs, 0.9, tail=3) == 6
    assert evaluation.first_reach(accs, 0.99) is None
    assert evaluation.run_accuracy(accs) == pytest.approx((0.9 + 0.92 + 0.93) / 3)


def test_round_time_is_the_slowest_client_plus_the_server():
    link = network.Link("1 Mbit/s", uplink_mbps=1, downlink_mbps=8, latency_ms=50)
    # 1 MB down at 8 Mbit/s = 1 s; 125,000 B up at 1 Mbit/s = 1 s; 2 latencies = 0.1 s
    assert link.client_seconds(1_000_000, 0.5, 125_000) == pytest.approx(2.6)
    t = network.round_seconds(link, 1_000_000, [0.5, 2.0, 0.1], [125_000, 0, 250_000], 0.3)
    assert t == pytest.approx(max(2.6, 1.1 + 2.0, 1.1 + 0.1 + 2.0) + 0.3)
    rows = [{"round": 0}, *({"round": k, "model_bytes": 1_000_000, "client_s": [0.5],
                             "client_bytes": [125_000], "server_s": 0.0} for k in (1, 2))]
    assert network.elapsed_seconds(rows, link) == pytest.approx([0.0, 2.6, 5.2])


@pytest.mark.parametrize("tables, needle", [
    ([], "non-empty list"),
    ([{"uplink_mbps": 0, "downlink_mbps": 1}], "uplink_mbps must be a positive number"),
    ([{"uplink_mbps": 1}], "needs ['downlink_mbps']"),
    ([{"uplink_mbps": 1, "downlink_mbps": 1, "jitter": 3}], "unknown config key 'links[0].jitter'"),
    ([{"uplink_mbps": "fast", "downlink_mbps": 1}], "'links[0].uplink_mbps' must be a number"),
    ([{"uplink_mbps": 1, "downlink_mbps": 1, "latency_ms": -1}], "latency_ms"),
    ([{"uplink_mbps": 1, "downlink_mbps": 1}] * 2, "distinct"),
])
def test_bad_links_are_named(tables, needle):
    with pytest.raises(ValueError) as err:
        network.parse_links(tables)
    assert needle in str(err.value)


def _runs(label: str, codec: str, curve: list[float], up: int, client_s: float,
          seeds=(0, 1, 2), offset=None) -> list[dict]:
    """Rows of fake runs: accuracy `curve` (+ a per-seed offset), `up` bytes per client."""
    rows = []
    for s in seeds:
        shift = 0.1 * s if offset is None else offset[s]
        cum = 0
        for k, acc in enumerate(curve):
            sent = [up, up] if k else []
            cum += sum(sent)
            rows.append({"label": label, "codec": codec, "seed": s, "round": k,
                         "accuracy": acc + shift, "cum_uplink_bytes": cum,
                         "uplink_bytes": sum(sent), "clients": len(sent), "wall_s": 0.0,
                         "numel": 1000, "model_bytes": 4000, "client_s": [client_s] * len(sent),
                         "client_bytes": sent, "server_s": 0.0})
    return rows


def test_summary_calls_lags_and_within_and_times_the_target_on_each_link():
    curve = [0.1, 0.3, 0.5, 0.6, 0.7, 0.7, 0.7]
    rows = (_runs("fp32", "fp32", curve, 4000, 0.01)
            + _runs("eden b=1", "eden", curve, 150, 0.02)
            + _runs("sign", "sign", [a - 0.05 for a in curve], 130, 0.01,
                    offset={0: 0.0, 1: 0.1, 2: 0.19}))
    links = [{"name": "slow", "uplink_mbps": 0.1, "downlink_mbps": 10},
             {"name": "fast", "uplink_mbps": 1000, "downlink_mbps": 1000}]
    cfg = {"target_points": 1.0, "links": links}
    by = {s["label"]: s for s in fl_report.summarize(cfg, rows)}
    assert by["eden b=1"]["verdict"] == evaluation.WITHIN
    assert by["sign"]["verdict"] == evaluation.LAGS
    # the target differs by seed (fp32 + 0.1 * seed - 1 point); every fp32 run reaches it
    assert by["fp32"]["targets"] == pytest.approx({0: 0.69, 1: 0.79, 2: 0.89})
    assert by["fp32"]["to_target"]["rounds"]["reached"] == 3
    assert by["sign"]["to_target"]["rounds"]["value"] is None
    # fp32 and eden reach at the same round; eden is faster on the slow link (32 kbit vs
    # 1.2 kbit per client) and slower on the fast one (its encode time)
    slow = {lab: by[lab]["to_target"]["slow"]["value"].mean for lab in ("fp32", "eden b=1")}
    fast = {lab: by[lab]["to_target"]["fast"]["value"].mean for lab in ("fp32", "eden b=1")}
    assert slow["eden b=1"] < 0.2 * slow["fp32"] and fast["eden b=1"] > fast["fp32"]
    assert by["eden b=1"]["bits_per_coord"] == pytest.approx(8 * 150 / 1000)


def test_convergence_sentence_tells_a_plateau_from_a_climb():
    cfg = {"target_points": 1.0, "links": [{"uplink_mbps": 1, "downlink_mbps": 1}]}
    flat = fl_report.summarize(cfg, _runs("fp32", "fp32", [0.1] + [0.8] * 9, 4000, 0.0))
    climb = fl_report.summarize(cfg, _runs("fp32", "fp32", [0.1 * k for k in range(10)],
                                           4000, 0.0))
    assert flat[0]["late_gain"].mean == pytest.approx(0.0)
    assert "still climbing" not in fl_report.convergence_text(flat)
    assert climb[0]["late_gain"].mean == pytest.approx(0.2)  # rounds 7-9 vs 5-7
    assert "still climbing" in fl_report.convergence_text(climb)


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.text(max_size=5),
                    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers()))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(
    ["name", "uplink_mbps", "downlink_mbps", "latency_ms", "jitter"]), _values), max_size=3))
def test_link_parser_takes_any_table_and_answers_with_links_or_a_value_error(tables):
    try:
        links = network.parse_links(tables)
    except ValueError:
        return
    for link in links:  # what it accepts is usable: a finite, positive round time
        t = network.round_seconds(link, 10**6, [0.1], [1000], 0.0)
        assert math.isfinite(t) and t > 0
