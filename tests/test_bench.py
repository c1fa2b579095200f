"""`fedquant bench`: sane rows from bench_codecs, the CLI writes its files, bad specs."""

import json
import math

import pytest
from typer.testing import CliRunner

from fedquant.simulations import bench
from fedquant.simulations.cli import app


def test_bench_codecs_rows_are_sane():
    specs = [("eden", {"bits": 2}), ("fp16", {})]
    rows = bench.bench_codecs(specs, [4096, 5000], repeats=2)
    assert [(r["codec"], r["d"]) for r in rows] == [
        ("eden", 4096), ("eden", 5000), ("fp16", 4096), ("fp16", 5000)]
    for r in rows:
        for key in ("encode_ms", "decode_ms", "rw_pass_ms", "torch_rht_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["encode_x_rw"] == pytest.approx(r["encode_ms"] / r["rw_pass_ms"])
        assert r["torch_rht_x_encode"] == pytest.approx(r["torch_rht_ms"] / r["encode_ms"])
    eden, fp16 = rows[0], rows[2]
    # measured bytes on the wire, not a formula: a little above the nominal bits
    assert 2.0 <= eden["bits_per_coord"] < 2.2
    assert 16.0 <= fp16["bits_per_coord"] < 16.5
    assert eden["torch_encode_ms"] > 0 and fp16["torch_encode_ms"] is None
    # the same d shares one baseline measurement
    assert rows[0]["rw_pass_ms"] == rows[2]["rw_pass_ms"]


def test_torch_eden_baseline_packs_the_same_indices_as_the_codec():
    import torch

    import fedquant as fq

    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    enc = fq.get_codec("eden", bits=2, rotations=1).encode(x, seed=5)
    assert bench.torch_eden_encode(x, 2, 5) == enc.section("q").data


@pytest.mark.parametrize("spec, want", [
    ("eden:bits=3,scale=biased", ("eden", {"bits": 3, "scale": "biased"})),
    ("drive", ("drive", {})),
    (" fp16 ", ("fp16", {})),
])
def test_parse_codec_spec(spec, want):
    assert bench.parse_codec_spec(spec) == want


@pytest.mark.parametrize("spec, match", [
    ("nosuch", "unknown codec"),
    ("eden:bitz=2", "unknown parameter"),
    ("eden:bits", "key=value"),
    ("eden:bits=two", "not a valid int"),
    ("eden:bits=9", "bits"),
])
def test_bad_codec_spec_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_codec_spec(spec)


def test_bad_config_keys_rejected(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[bench]\nrepeat = 3\n")
    with pytest.raises(ValueError, match="allowed keys"):
        bench.load_config(cfg)
    cfg.write_text("[bench]\ndims = [0]\n")
    with pytest.raises(ValueError, match="dims"):
        bench.load_config(cfg)
    with pytest.raises(ValueError, match="repeats"):
        bench.bench_codecs([("fp16", {})], [16], repeats=0)


def test_cli_tiny_run_writes_files(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", "--quick", "--only", "--codec", "eden:bits=2", "--codec", "fp32",
        "--dim", "2048", "--dim", "8192", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("rows.csv", "rows.json", "throughput.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "rows.json").read_text())
    assert [(r["label"], r["d"]) for r in data["rows"]] == [
        ("eden:bits=2", 2048), ("eden:bits=2", 8192), ("fp32", 2048), ("fp32", 8192)]
    assert (out / "rows.csv").read_text().count("\n") == 5
    report = (out / "report.md").read_text()
    assert "encode / rw" in report and "encode / RHT" in report
    assert [r["d"] for r in data["fwht"]] == [2048, 8192]  # the FWHT table, per d
    assert "RHT / fastest C" in report


def test_cli_rejects_bad_codec(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--codec", "eden:bits=0", "--out",
                                      str(tmp_path)])
    assert result.exit_code != 0
    assert "bits" in result.output


def test_bench_fwht_row_and_its_ratios(monkeypatch):
    # a stand-in "C kernel" (the plain torch FWHT on the numpy array): the row reports
    # whatever is importable and the ratio to the fastest of them
    import torch

    from fedquant.hadamard import fwht_torch

    def fake(a):
        a[:] = fwht_torch(torch.from_numpy(a)).numpy()

    monkeypatch.setattr(bench, "external_fwhts", lambda: {"ffht": fake})
    row = bench.bench_fwht(4096, repeats=2)
    for key in ("rht_ms", "inverse_rht_ms", "copy_ms", "ffht_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["fastest_c_ms"] == row["ffht_ms"] and "fht_cpu_ms" not in row
    assert row["rht_x_fastest_c"] == pytest.approx(row["rht_ms"] / row["ffht_ms"])
    monkeypatch.setattr(bench, "external_fwhts", dict)
    assert bench.bench_fwht(1024, repeats=1)["rht_x_fastest_c"] is None  # none installed
    with pytest.raises(ValueError, match="power-of-two"):
        bench.bench_fwht(1000, repeats=1)


def test_codec_rows_report_ratios_to_one_rht():
    rows = bench.bench_codecs([("eden", {"bits": 2})], [4096, 5000], repeats=2)
    for r in rows:
        assert r["encode_x_rht"] == pytest.approx(r["encode_ms"] / r["rht_ms"])
        assert r["decode_x_inverse_rht"] == pytest.approx(r["decode_ms"]
                                                          / r["inverse_rht_ms"])


def test_bench_mean_rows_have_their_baselines(tmp_path):
    from fedquant.simulations import bench_mean

    cfg = {**bench_mean.DEFAULTS, "codec": ["eden:bits=2", "fp32"], "d": 4096,
           "clients": [1, 3], "repeats": 1, "distinct": 2}
    rows = bench_mean.bench_mean(cfg)
    assert [(r["codec"], r["n"]) for r in rows] == [
        ("eden:bits=2", 1), ("eden:bits=2", 3), ("fp32", 1), ("fp32", 3)]
    for r in rows:
        assert r["x_adds"] == pytest.approx(r["decode_mean_ms"] / r["plain_adds_ms"])
        assert r["x_inverse_rht"] == pytest.approx(r["decode_mean_ms"] / r["inverse_rht_ms"])
        assert r["max_abs_diff"] < 1e-5  # decode_mean agrees with the separate decodes
    bench_mean.write_outputs(rows, cfg, tmp_path)
    assert "/ plain adds" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="codec"):
        bench_mean.validate_config({"codec": []})


def _rows(d, **encode_ms):
    """Codec rows at d with the given encode times (ms), one RHT of 1 ms."""
    specs = {"eden": ("eden", {"bits": 2}), "drive": ("drive", {}),
             "quic": ("quic-fl", {"bits": 2}), "vq": ("vq", {"bits": 1, "dim": 8})}
    rows = []
    for key, ms in encode_ms.items():
        name, params = specs[key]
        rows.append({"codec": name, "params": params, "label": bench.label(name, params),
                     "d": d, "encode_ms": ms, "encode_x_rht": ms / 1.0,
                     "decode_x_inverse_rht": 1.4})
    return rows


def test_targets_name_each_ratio_and_judge_it_against_its_bound():
    rows = _rows(2**20, eden=1.4, drive=1.6, quic=2.2, vq=4.1)
    fwht = [{"d": 2**20, "rht_x_fastest_c": 1.25}, {"d": 2**16, "rht_x_fastest_c": None}]
    got = {t["target"]: (round(t["value"], 3), t["met"]) for t in bench.targets(rows, fwht)}
    assert got == {
        "RHT <= 1.2x the fastest C FWHT at d=2^20": (1.25, False),
        "eden b=2 encode <= 1.5x one RHT at d=2^20": (1.4, True),
        "eden b=2 decode <= 1.5x one inverse RHT at d=2^20": (1.4, True),
        "drive encode <= 1.5x one RHT at d=2^20": (1.6, False),
        "drive decode <= 1.5x one inverse RHT at d=2^20": (1.4, True),
        "quic-fl b=2 encode <= 1.5x eden b=2's at d=2^20": (round(2.2 / 1.4, 3), False),
        "vq bits=1,dim=8 encode <= 3x eden b=2's at d=2^20": (round(4.1 / 1.4, 3), True),
    }
    assert bench.targets(_rows(2**20, drive=1.0, quic=1.0)) == [  # no EDEN row: no ratios
        {"target": "drive encode <= 1.5x one RHT at d=2^20", "value": 1.0, "met": True},
        {"target": "drive decode <= 1.5x one inverse RHT at d=2^20", "value": 1.4,
         "met": True}]
    lines = bench.target_lines(bench.targets(rows, fwht))
    assert "4 of 7 met in this run." in lines and lines[1] == "## Targets"


def test_bench_mean_targets():
    from fedquant.simulations import bench_mean

    rows = [{"codec": "fp32", "n": 10, "x_adds": 2.1, "x_inverse_rht": 0.5},
            {"codec": "eden:bits=2", "n": 1000, "x_adds": 4.0, "x_inverse_rht": 1.3},
            {"codec": "eden:bits=2", "n": 10, "x_adds": 4.0, "x_inverse_rht": 3.0}]
    assert [(t["value"], t["met"]) for t in bench_mean.targets(rows)] == [
        (2.1, False), (1.3, True)]
