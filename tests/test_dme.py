"""fedquant dme: config validation, a tiny end-to-end run through the real wire, the CLI."""

import csv
import json

import pytest
from typer.testing import CliRunner

import fedquant as fq
from fedquant.simulations.cli import app
from fedquant.simulations.dme import DEFAULT_CONFIG, expand_codecs, load_config, run_dme

TINY = {
    "d": 512, "clients": 3, "trials": 1, "seed": 4,
    "inputs": ["normal", "two-spikes"], "rotations": ["auto", 1],
    "codecs": [{"codec": "eden", "bits": [1, 2]}, {"codec": "fp16"},
               {"codec": "dither", "bits": 2}],
    "studies": False,
}


def test_default_config_loads_and_is_valid():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg["codecs"] == "default" and cfg["clients"] == 10
    assert set(cfg["rotations"]) == {"auto", 1, 2, 3}
    names = {name for name, _ in expand_codecs("default", ["auto"])}
    assert names == set(fq.available_codecs())


@pytest.mark.parametrize("config,key", [
    ({"dimension": 10}, "dimension"),
    ({"quick": {"trails": 1}}, "trails"),
    ({"inputs": ["gaussian"]}, "inputs"),
    ({"rotations": [4]}, "rotations"),
    ({"rotations": "auto"}, "rotations"),
    ({"d": 0}, "'d'"),
    ({"clients": 1.5}, "clients"),
    ({"seed": -1}, "seed"),
    ({"studies": "yes"}, "studies"),
    ({"codecs": [{"codec": "nope"}]}, "nope"),
    ({"codecs": [{"codec": "eden", "colour": "red"}]}, "colour"),
    ({"codecs": [{"codec": "eden", "bits": [1, 12]}]}, "bits"),
    ({"codecs": "all"}, "codecs"),
])
def test_bad_config_raises_value_error_naming_the_key(tmp_path, config, key):
    path = tmp_path / "bad.toml"
    lines = []
    for k, v in config.items():
        if k == "quick":
            continue
        lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, list) or not v
                     or not isinstance(v[0], dict) else
                     f"{k} = [" + ", ".join("{" + ", ".join(f"{a} = {json.dumps(b)}"
                                                          for a, b in e.items()) + "}"
                                            for e in v) + "]")
    if "quick" in config:
        lines += ["[quick]", *[f"{k} = {json.dumps(v)}" for k, v in config["quick"].items()]]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=key):
        load_config(path)
    with pytest.raises(ValueError, match=key):
        run_dme(config, tmp_path / "out", progress=False)


def test_unknown_key_message_lists_allowed_keys(tmp_path):
    with pytest.raises(ValueError, match=r"allowed keys: \['clients', 'codecs'"):
        run_dme({"dimension": 3}, tmp_path, progress=False)


def test_tiny_end_to_end_run(tmp_path):
    rows = run_dme(TINY, tmp_path, progress=False)
    # 2 inputs x (eden 2 bits x 2 rotation specs + dither x 2 + fp16)
    assert len(rows) == 2 * (2 * 2 + 2 + 1)
    for name in ("rows.csv", "rows.json", "vnmse_vs_bits.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "rows.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert json.loads((tmp_path / "rows.json").read_text())[0]["input"] == "normal"
    by = {(r["input"], r["label"], r["rotations"]): r for r in rows}
    for r in rows:  # measured, not formula: 8 * bytes / d, headers included
        assert r["bits_per_coord"] == pytest.approx(8 * r["bytes"] / 512)
    one, two = (by[("normal", f"eden bits={b}", "auto")]["bits_per_coord"] for b in (1, 2))
    assert 1 < one < 3  # d = 512: the header and scales are a visible overhead
    assert two - one == pytest.approx(1.0, abs=0.05)  # one more packed bit (+ varints)
    assert by[("normal", "fp16", "-")]["vnmse"] < 1e-6
    # one RHT fails on two spikes, auto picks two
    assert by[("two-spikes", "eden bits=1", "1")]["vnmse"] > 0.95
    assert by[("two-spikes", "eden bits=1", "auto")]["rotations_used"] == 2
    assert by[("two-spikes", "eden bits=1", "auto")]["vnmse"] < 0.75
    report = (tmp_path / "report.md").read_text()
    assert "## two-spikes (rotations=auto)" in report and "eden bits=2" in report


def test_runs_are_reproducible(tmp_path):
    cfg = {**TINY, "codecs": [{"codec": "stochastic", "bits": 1}], "inputs": ["lognormal"]}
    a = run_dme(cfg, tmp_path / "a", progress=False)
    b = run_dme(cfg, tmp_path / "b", progress=False)
    assert [r["vnmse"] for r in a] == [r["vnmse"] for r in b]
    assert [r["nmse"] for r in a] == [r["nmse"] for r in b]


def test_cli_runs_a_config_and_rejects_a_bad_one(tmp_path):
    good = tmp_path / "tiny.toml"
    good.write_text('d = 256\nclients = 2\ntrials = 1\ninputs = ["normal"]\n'
                    'rotations = ["auto"]\nstudies = false\n'
                    'codecs = [{codec = "drive"}, {codec = "fp32"}]\n')
    result = CliRunner().invoke(app, ["dme", "--config", str(good), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "drive" in result.output and (tmp_path / "out" / "rows.csv").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("trials = 1\nbogus = 3\n")
    result = CliRunner().invoke(app, ["dme", "--config", str(bad)])
    assert result.exit_code != 0 and "bogus" in result.output


def test_correlated_rounds_share_one_seed_and_beat_independent_codecs_on_similar_clients():
    """fedquant dme runs a correlated codec as one round (shared seed, strata 0..n-1): on
    clients within 10% of a common vector its NMSE of the mean is far below ecdq's at the
    same bits; on independent inputs it is no worse than independent stochastic rounding."""
    from fedquant.simulations.dme import _measure
    from fedquant.simulations.inputs import make_input

    for name, ratio in (("similar", 2.0), ("normal", None)):
        xs = [make_input(name, 4096, 100 + c) for c in range(16)]
        cq = _measure(fq.get_codec("correlated:bits=1.0"), xs, round_seed=5)
        ind = _measure(fq.get_codec("ecdq:bits=1.0"), xs, round_seed=5)
        sto = _measure(fq.get_codec("stochastic:bits=1"), xs, round_seed=5)
        if ratio:
            assert cq["nmse"] * ratio < ind["nmse"]
        else:
            assert cq["nmse"] < sto["nmse"]


_REF = {
    "d": 4096, "clients": 4, "trials": 1, "seed": 1,
    "inputs": ["normal", "two-spikes"], "rotations": ["auto"],
    "codecs": [{"codec": "eden", "bits": [1, 4], "scale": ["unbiased", "biased"]},
               {"codec": "drive"}],
    "studies": False,
}


def _reference_result(cfg):
    from fedquant.simulations.dme import measure_all, reference_claim, resolve_config

    rows, _ = measure_all(resolve_config(cfg), progress=False)
    checks, text = reference_claim(rows)
    return checks, text


def test_reference_check_passes_for_the_real_codecs():
    checks, text = _reference_result(_REF)
    assert len(checks) == 1 and checks[0]["result"] == "PASS", text
    assert text.count("[PASS]") == 10  # 5 settings x 2 inputs, each against the table


def test_reference_check_fails_for_a_codec_that_returns_zeros(monkeypatch):
    decode = fq.decode
    monkeypatch.setattr(fq, "decode", lambda enc, *a, **k: 0 * decode(enc, *a, **k))
    checks, text = _reference_result({**_REF, "inputs": ["normal"]})
    assert checks[0]["result"] == "FAIL" and "[PASS]" not in text


def test_reference_check_fails_when_the_rotation_is_the_identity(monkeypatch):
    from fedquant.codecs import rotated

    rotate, unrotate = rotated.rotate, rotated.unrotate
    monkeypatch.setattr(rotated, "fused_available", lambda x: False)  # encode via rotate
    monkeypatch.setattr(rotated, "rotate", lambda x, seed, k, *a, **kw: rotate(x, seed, 0))
    monkeypatch.setattr(rotated, "unrotate",
                        lambda z, seed, k, d, *a, **kw: unrotate(z, seed, 0, d, *a, **kw))
    checks, text = _reference_result(_REF)
    assert checks[0]["result"] == "FAIL"
    # Gaussian inputs need no rotation; the two spikes do
    assert "[FAIL]" not in "".join(t for t in text.splitlines() if t.startswith("- normal"))
    assert "[PASS]" not in "".join(t for t in text.splitlines() if t.startswith("- two-spikes"))


def test_reference_figures_apply_only_where_the_table_has_them():
    from fedquant.simulations.dme import reference_vnmse

    def row(codec, params, input_name="normal", rotations="auto"):
        return {"codec": codec, "params": json.dumps(params), "input": input_name,
                "rotations": rotations}

    assert reference_vnmse(row("eden", {"bits": 2})) == 0.1331
    assert reference_vnmse(row("drive", {"scale": "biased"})) == pytest.approx(0.3634, abs=1e-4)
    assert reference_vnmse(row("quic-fl", {"bits": 2})) == 0.2149
    assert reference_vnmse(row("quic-fl", {"bits": 2, "shared_bits": 3})) is None
    assert reference_vnmse(row("eden", {"bits": 1}, "two-spikes", "1")) == 1.0
    assert reference_vnmse(row("eden", {"bits": 1}, "two-spikes", "0")) is None
    assert reference_vnmse(row("eden", {"bits": 1}, "digits-grad")) is None
    assert reference_vnmse(row("dither", {"bits": 2})) is None
