"""`fedquant compare`: the quick comparison end to end, its numbers, and config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fedquant.simulations import compare
from fedquant.simulations.inputs import make_input

import fedquant as fq

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "simulations" / "examples" / "my_compare.toml"


def _tiny_config() -> dict:
    """The --quick config, made smaller still so the test stays within seconds."""
    cfg = compare.load_config(EXAMPLE, "quick")
    cfg["dme"].update(d=2048, inputs=["normal", "two-spikes"], rotations=[1, 2, "auto"])
    cfg["fl"].update(rounds=3)
    cfg["speed"].update(d=4096, repeats=2)
    return cfg


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = _tiny_config()
    return cfg, out, compare.run_compare(cfg, out, progress=False, log=lambda _: None)


def test_quick_compare_writes_every_file(quick_run):
    _, out, results = quick_run
    for name in ("report.md", "results.json", "dme.csv", "fl.csv", "speed.csv",
                 "dme_vnmse_vs_bits.png", "fl_accuracy_vs_rounds.png",
                 "fl_accuracy_vs_uplink.png", "speed.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for needle in ("## Recommendation", "![vNMSE vs bits]", "## Configuration", "## Versions",
                   "Seed 2026", "absmax8"):
        assert needle in report, needle
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["seed"] == 2026 and stored["best_per_budget"]


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
    again = compare.run_compare({**small, "fl": {**small["fl"], "codecs": [{"codec": "drive"}],
                                                 "rounds": 2}},
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
    fl_rows = [{"label": lab, "round": k, "accuracy": acc, "cum_uplink_bytes": k * mb}
               for lab, acc, mb in (("fp32", 0.90, 100), ("eden b=2", 0.895, 7), ("sign", 0.7, 3))
               for k in (1, 2, 3)]
    cheap = compare.cheapest_within(fl_rows)
    assert cheap["label"] == "eden b=2"
    assert torch.isclose(torch.tensor(cheap["uplink_mb"]), torch.tensor(21e-6))


def test_full_mode_seed_studies_run_and_write_reports(tmp_path):
    """--full adds the four seed studies; their quick versions run through the same path."""
    from fedquant.simulations import compare_sections

    cfg = compare.load_config(None, "full")
    assert sorted(cfg["studies"]) == ["innerprod", "linreg", "lplr", "ptq"]
    out = compare_sections.run_studies(cfg, tmp_path, progress=False, quick=True)
    for name, study in out.items():
        assert (tmp_path / study["report"]).stat().st_size > 0, name
