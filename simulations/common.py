"""Plumbing shared by the experiments: config key checks, CSV/JSON output, one-thread torch.

Kept in one place so every `fedquant` subcommand rejects bad configs the same way and writes
the same file formats.
"""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def check_keys(config: dict, schema: dict, where: str = "") -> None:
    """ValueError naming any unknown or mistyped key, with the allowed keys or values.

    `schema` maps each key to a type (float accepts ints), a nested schema dict, a tuple
    of allowed values (a list value must hold only allowed values), or a one-element list
    ``[table_schema]`` for a list of tables, each checked against `table_schema`.
    """
    for key, value in config.items():
        path = f"{where}{key}"
        if key not in schema:
            raise ValueError(f"unknown config key {path!r}; allowed: {sorted(schema)}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {path!r} must be a table with keys "
                                 f"{sorted(expected)}")
            check_keys(value, expected, f"{path}.")
        elif isinstance(expected, list):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"config key {path!r} must be a list of tables with keys "
                                 f"{sorted(expected[0])}")
            for i, item in enumerate(value):
                check_keys(item, expected[0], f"{path}[{i}].")
        elif isinstance(expected, tuple):
            items = value if isinstance(value, list) else [value]
            bad = [v for v in items if v not in expected]
            if bad:
                raise ValueError(f"config key {path!r}: {bad} not allowed; allowed values: "
                                 f"{list(expected)}")
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"config key {path!r} must be a number, got {value!r}")
        elif isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
            raise ValueError(f"config key {path!r} must be {expected.__name__}, got {value!r}")


def write_csv(path: Path, rows: list[dict]) -> None:
    """One CSV with the union of the rows' keys as columns."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(headers: list[str], body: list[list[Any]]) -> list[str]:
    """A markdown table's lines; a "|" inside a cell (|x|) is escaped so it does not end it."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
              for row in body)]


def write_json(path: Path, payload: Any) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, restoring the caller's setting after.

    The experiments' tensors are small: on a busy 2-core machine OpenMP's parallel regions
    made a 4096-element torch.floor take 25 ms instead of 30 us, and one thread also keeps
    float reductions in a machine-independent order.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start_local_server(data_dir: Path, *flags: str, log_level: str = "warning",
                       timeout_s: float = 120.0) -> tuple[subprocess.Popen, int]:
    """`fedquant serve --insecure` on 127.0.0.1 with an ephemeral port, for the benchmarks;
    returns (process, port) once it serves. Stop it by its PID (SIGTERM)."""
    port_file = Path(data_dir) / "port"
    args = [sys.executable, "-m", "fedquant.server.cli", "--data-dir", str(data_dir),
            "--insecure", "--port", "0", "--port-file", str(port_file),
            "--log-level", log_level, *flags]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start (see {data_dir})")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """A process's peak (VmHWM) or current (VmRSS) resident memory in KiB (0 if unknown)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
