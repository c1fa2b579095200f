"""Regenerate the Python stubs in fedquant/_proto/ from proto/fedquant/v1/*.proto.

Run `make proto` after editing a .proto file; tests/test_proto_stubs.py fails when the
committed stubs drift from the sources.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "fedquant" / "_proto"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Generate stubs for every .proto into out_dir/fedquant/v1 and return their paths."""
    sources = sorted(PROTO_DIR.glob("fedquant/v1/*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + [str(s) for s in sources]) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "fedquant" / "v1").glob("*.py"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(pathlib.Path(tmp)):
            text = path.read_text()
            # Generated modules import each other as `fedquant.v1.x_pb2`; point them at the
            # package-local copy instead.
            text = text.replace("from fedquant.v1 import", "from fedquant._proto import")
            (OUT_DIR / path.name).write_text(text)
            print(f"wrote {OUT_DIR / path.name}")


if __name__ == "__main__":
    sys.exit(main())
