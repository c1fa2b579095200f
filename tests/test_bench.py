"""`fedquant bench`: sane rows from bench_codecs, the CLI writes its files, bad specs."""

import json
import math

import pytest
from fedquant.simulations import bench
from fedquant.simulations.cli import app
from typer.testing import CliRunner


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
    assert "encode / rw" in (out / "report.md").read_text()


def test_cli_rejects_bad_codec(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--codec", "eden:bits=0", "--out",
                                      str(tmp_path)])
    assert result.exit_code != 0
    assert "bits" in result.output
