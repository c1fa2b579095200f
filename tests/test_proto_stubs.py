"""The committed stubs in fedquant/_proto/ are exactly what scripts/gen_proto.py makes from
proto/fedquant/v1/*.proto (every .proto present, so new services are covered too)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUBS = ROOT / "fedquant" / "_proto"


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """{file name: text} of freshly generated stubs, with gen_proto's import rewrite."""
    out = tmp_path_factory.mktemp("proto")
    return {path.name: path.read_text().replace("from fedquant.v1 import",
                                                "from fedquant._proto import")
            for path in _gen_proto().generate(out)}


def test_every_proto_has_generated_stubs(regenerated):
    protos = sorted((ROOT / "proto" / "fedquant" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        assert f"{proto.stem}_pb2.py" in regenerated
        assert f"{proto.stem}_pb2_grpc.py" in regenerated


def test_committed_stubs_match_the_proto_sources(regenerated):
    for name, text in regenerated.items():
        committed = STUBS / name
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == text, f"{committed} drifted: run `make proto`"


def test_no_stale_stubs(regenerated):
    stale = {p.name for p in STUBS.glob("*_pb2*.py")} - set(regenerated)
    assert not stale, f"stubs without a .proto source: {sorted(stale)}"
