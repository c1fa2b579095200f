"""`fedquant compare`: the quick comparison end to end, its numbers, and config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedquant as fq
from fedquant.simulations import compare
from fedquant.simulations.inputs import make_input

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "simulations" / "examples" / "my_compare.toml"


def _tiny_config() -> dict:
    """The --quick config, made smaller still so the test stays within seconds."""
    cfg = compare.load_config(EXAMPLE, "quick")
    cfg["dme"].update(d=2048, inputs=["normal", "two-spikes"], rotations=[1, 2, "auto"])
    cfg["fl"]["scenarios"][0].update(rounds=4)
    cfg["speed"].update(d=4096, repeats=2)
    return cfg


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = _tiny_config()
    return cfg, out, compare.run_compare(cfg, out, progress=False, log=lambda _: None)


def test_quick_compare_writes_every_file(quick_run):
    _, out, results = quick_run
    scenario = compare.scenario_dir(cfg_name(out))
    for name in ("report.md", "results.json", "config.json", "dme.csv", "fl.csv", "speed.csv",
                 "dme_vnmse_vs_bits.png", "speed.png", f"{scenario}/accuracy_vs_time.png",
                 f"{scenario}/accuracy_vs_rounds.png", f"{scenario}/report.md"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for needle in ("## Recommendation", "![vNMSE vs bits]", "## Configuration and versions",
                   "Seed 2026", "absmax8", "Which codec for my bandwidth and my bit budget",
                   f"]({scenario}/accuracy_vs_time.png)", "`config.json`", "GB/s"):
        assert needle in report, needle
    assert "```json" not in report  # the configuration is attached, not pasted
    assert "## Checks against the papers' claims" in report  # the DME reference check
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["seed"] == 2026 and stored["best_per_budget"]


def cfg_name(out: Path) -> str:
    return json.loads((out / "config.json").read_text())["fl"]["scenarios"][0]["name"]


def test_report_claims_only_what_ran(quick_run):
    """The DME recommendation names the inputs that ran; the rotation table has a column
    only for rotation counts that ran."""
    _, out, _ = quick_run
    report = (out / "report.md").read_text()
    assert "natural inputs that ran (N(0,1))" in report
    assert "LogNormal" not in report.split("## 1.")[0]
    from fedquant.simulations.compare_report import rotation_table

    rows = [{"input": i, "label": "eden b=1", "rotations": k, "vnmse": 0.5}
            for i in ("two-spikes", "normal") for k in ("1", "2", "auto")]
    table = rotation_table(rows)
    assert "| input | 1 RHT | 2 RHT | auto RHT |" in table and "3 RHT" not in table
    assert "two-spikes" in table and "normal" not in table


def test_user_codec_from_plugin_takes_part_in_every_section(quick_run):
    _, _, results = quick_run
    for section in ("dme", "fl", "speed"):
        assert any(r["label"].startswith("absmax8") for r in results[section]), section


def test_dme_numbers_match_the_library_on_the_same_seeds(quick_run):
    """A report row is exactly what fq's own functions give for the same inputs and seeds."""
    from fedquant.simulations import dme

    cfg, _, results = quick_run
    row = next(r for r in results["dme"] if r["label"] == "eden b=2"
               and r["input"] == "normal" and r["rotations"] == "auto")
    codec = fq.get_codec("eden", bits=2, rotations="auto")
    d, n = cfg["dme"]["d"], cfg["dme"]["clients"]
    xs = [make_input("normal", d, dme._input_seed(cfg["seed"], 0, 0, i)) for i in range(n)]
    round_seed = fq.random.derive_seed(cfg["seed"], 0)  # trial 0
    encs = [codec.encode(x, seed=fq.random.derive_seed(round_seed, i)) for i, x in enumerate(xs)]
    vn = sum(fq.vnmse(x, fq.decode(e)) for x, e in zip(xs, encs, strict=True)) / n
    assert row["vnmse"] == pytest.approx(vn, rel=1e-9)
    assert row["nmse"] == pytest.approx(fq.nmse(xs, fq.decode_mean(encs)), rel=1e-9)
    assert row["bits_per_coord"] == pytest.approx(
        8 * sum(len(e.to_bytes()) for e in encs) / n / d, rel=1e-12)


def test_recommendation_is_the_minimum_of_the_measured_rows(quick_run):
    _, _, results = quick_run
    assert results["best_per_budget"]
    for rec in results["best_per_budget"]:
        worst: dict[str, float] = {}
        for r in results["dme"]:
            if r["input"] in ("normal", "digits-grad") and r["rotations"] in ("auto", "-"):
                worst[r["label"]] = max(worst.get(r["label"], 0.0), r["nmse"])
        bits = {r["label"]: r["bits_per_coord"] for r in results["dme"]}
        fits = [w for lab, w in worst.items() if bits[lab] <= rec["budget"] * 1.05]
        assert rec["nmse"] == min(fits)


def test_same_config_same_numbers(quick_run, tmp_path):
    cfg, _, results = quick_run
    small = json.loads(json.dumps(cfg))
    small["dme"]["codecs"] = [{"codec": "eden", "bits": 2}]
    scenario = {**small["fl"]["scenarios"][0], "rounds": 2}
    again = compare.run_compare({**small, "fl": {**small["fl"], "codecs": [{"codec": "drive"}],
                                                 "scenarios": [scenario]}},
                                tmp_path, progress=False, log=lambda _: None)
    first = {(r["label"], r["input"], r["rotations"]): r["vnmse"] for r in results["dme"]}
    for r in again["dme"]:
        assert r["vnmse"] == first[(r["label"], r["input"], r["rotations"])]


@pytest.mark.parametrize("text, needle", [
    ("seeds = 3\n", "unknown key 'seeds'"),
    ("[speed]\nsize = 3\n", "unknown key 'speed.size'"),
    ("[fl]\ncodecs = [{ codec = 'nope' }]\n", "fl.codecs[0].codec: unknown codec 'nope'"),
    ("[dme]\ncodecs = [{ codec = 'eden', bits = 11 }]\n", "bits must be"),
    ("[dme]\ncodecs = [{ bits = 2 }]\n", "expected a codec spec"),
    ("studies = ['astrology']\n", "unknown study 'astrology'"),
    ("[fl]\nrounds = 3\n", "unknown key 'fl.rounds'"),
    ("[[fl.scenarios]]\nname = 'x'\nrounds = 0\n", "fl.scenarios[0] (x): config key 'rounds'"),
    ("[[fl.scenarios]]\nname = 'x'\nrepeats = 2\n", "set for all scenarios"),
    ("[[fl.scenarios]]\nrounds = 2\n", "fl.scenarios[0].name"),
    ("[fl]\nlinks = [{ uplink_mbps = 0, downlink_mbps = 1 }]\n", "uplink_mbps must be"),
    ("seed = -1\n", "seed must be a non-negative integer"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(compare.ConfigError, match=None) as err:
        compare.load_config(path)
    assert needle in str(err.value)


def test_cli_reports_bad_config_without_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("colour = 'blue'\n")
    proc = subprocess.run([sys.executable, "-m", "fedquant.simulations.cli", "compare", "--config",
                           str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'colour'" in proc.stdout and "Traceback" not in proc.stderr


def test_best_per_budget_and_cheapest_within_on_known_rows():
    def row(inp, lab, bits, nmse):
        return {"input": inp, "label": lab, "rotations": "auto", "bits_per_coord": bits,
                "nmse": nmse, "vnmse": 10 * nmse}

    # "b" is best on normal but its bias shows on lognormal; "a" is best in the worst case
    dme_rows = [row("normal", "a", 1.0, 0.05), row("lognormal", "a", 1.0, 0.06),
                row("normal", "b", 1.02, 0.03), row("lognormal", "b", 1.02, 0.08),
                row("normal", "c", 2.0, 0.01), row("lognormal", "c", 2.0, 0.01)]
    best = {r["budget"]: (r["codec"], r["worst_input"])
            for r in compare.best_per_budget(dme_rows)}
    assert best[1] == ("a", "lognormal") and best[2][0] == "c"


def _fake_runs(label: str, codec: str, shift, up: int, client_s: float) -> list[dict]:
    """Three seeds of a run that climbs to 0.7 + 0.1 * seed + shift in 6 rounds (`shift`:
    a number, or one per seed)."""
    rows = []
    for seed in (0, 1, 2):
        cum = 0
        for k in range(7):
            sent = [up, up] if k else []
            cum += sum(sent)
            rows.append({"label": label, "codec": codec, "seed": seed, "round": k,
                         "accuracy": min(0.1 * k, 0.7) + 0.1 * seed / 3
                         + (shift[seed] if isinstance(shift, dict) else shift),
                         "cum_uplink_bytes": cum, "uplink_bytes": sum(sent),
                         "clients": len(sent), "wall_s": 0.0, "numel": 1000,
                         "model_bytes": 4000, "client_s": [client_s] * len(sent),
                         "client_bytes": sent, "server_s": 0.0})
    return rows


def test_cheapest_within_and_the_bandwidth_table_read_the_summaries():
    from fedquant.simulations import fl_report

    cfg = {"target_points": 1.0, "links": [
        {"name": "slow", "uplink_mbps": 0.1, "downlink_mbps": 10},
        {"name": "fast", "uplink_mbps": 1000, "downlink_mbps": 1000}]}
    summaries = {
        # "eden b=1" matches fp32 in both scenarios; "sign" is cheaper but lags in one
        "a": fl_report.summarize(cfg, _fake_runs("fp32", "fp32", 0, 4000, 0.001)
                                 + _fake_runs("eden b=1", "eden", 0, 150, 0.01)
                                 + _fake_runs("sign", "sign", 0, 130, 0.001)),
        "b": fl_report.summarize(cfg, _fake_runs("fp32", "fp32", 0, 4000, 0.001)
                                 + _fake_runs("eden b=1", "eden", 0, 150, 0.01)
                                 + _fake_runs("sign", "sign", -0.05, 130, 0.001)),
    }
    cheap = compare.cheapest_within(summaries)
    assert cheap["label"] == "eden b=1"
    assert cheap["uplink_vs_fp32"] == pytest.approx(150 / 4000)
    rec = {(r["link"], r["budget"]): r for r in compare.recommend(summaries, ["slow", "fast"])["a"]}
    # slow uplink: the compressed codec wins at every budget; fast: fp32 (no encode time)
    # wins once 32 bits fit, and "sign" (fastest encode) at <= 1.2 bits
    assert rec[("slow", 32)]["codec"] == "sign" and rec[("slow", 2)]["codec"] == "sign"
    assert rec[("fast", 32)]["codec"] in ("fp32", "sign")
    assert rec[("fast", 32)]["seconds"] <= rec[("fast", 32)]["fp32_seconds"]
    assert rec[("slow", 2)]["seconds"] < 0.2 * rec[("slow", 2)]["fp32_seconds"]
    b = compare.recommend(summaries, ["slow"])["b"]
    assert all(r["codec"] != "sign" for r in b)  # it never reaches the target there
    # a codec that reaches the target on every seed, soonest, but whose accuracy interval
    # does not show it within 1 point of fp32, is not recommended
    lucky = fl_report.summarize(cfg, _fake_runs("fp32", "fp32", 0, 4000, 0.001)
                                + _fake_runs("eden b=1", "eden", 0, 150, 0.01)
                                + _fake_runs("lucky", "qsgd", {0: 0.05, 1: 0.0, 2: 0.1}, 100,
                                             0.001))
    assert next(it for it in lucky if it["label"] == "lucky")["verdict"] == "inconclusive"
    picks = {r["codec"] for r in compare.recommend({"c": lucky}, ["slow", "fast"])["c"]}
    assert "lucky" not in picks and "eden b=1" in picks


def test_full_mode_seed_studies_run_and_write_reports(tmp_path):
    """--full adds the four seed studies; their quick versions run through the same path."""
    from fedquant.simulations import compare_sections

    cfg = compare.load_config(None, "full")
    assert sorted(cfg["studies"]) == ["innerprod", "linreg", "lplr", "ptq"]
    out = compare_sections.run_studies(cfg, tmp_path, progress=False, quick=True)
    for name, study in out.items():
        assert (tmp_path / study["report"]).stat().st_size > 0, name
        assert study["checks"] and all(c["result"] in ("PASS", "FAIL")
                                       for c in study["checks"]), name


def test_a_pipe_in_a_cell_does_not_break_the_table():
    from fedquant.simulations.compare_report import _table

    row = _table(["claim", "measured"], [["x", "worst |deviation| 0.7"]]).splitlines()[-1]
    assert row == "| x | worst \\|deviation\\| 0.7 |"
