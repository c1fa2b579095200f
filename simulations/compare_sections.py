"""The sections of `fedquant compare`, each a thin call into the experiment that owns it.

Each ``run_<section>(cfg, out_dir, progress)`` turns the compare config's table into that
experiment's own config, runs it with its raw files in ``out_dir/<section>/``, and returns
rows with the keys ``simulations.compare_report`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedquant.simulations.common import one_thread
from fedquant.simulations.compare import codec_spec, label


def run_dme(cfg: dict[str, Any], out_dir: Path, progress: bool) -> list[dict]:
    """DME sweep (simulations.dme) over the configured codecs, inputs and rotations."""
    from fedquant.simulations import dme

    table = cfg["dme"]
    dme_cfg = {
        "d": table["d"], "clients": table["clients"], "trials": table["trials"],
        "seed": cfg["seed"], "inputs": table["inputs"], "rotations": table["rotations"],
        "codecs": table["codecs"], "studies": False,
    }
    with one_thread():  # small tensors: OpenMP on a busy machine costs 100x (common.py)
        rows = dme.run_dme(dme_cfg, out_dir / "dme", progress=progress)
    for r in rows:  # one naming scheme across the report's sections
        r["label"] = label(r["codec"], json.loads(r["params"]))
    return rows


def run_fl(cfg: dict[str, Any], out_dir: Path, progress: bool) -> list[dict]:
    """Federated training (simulations.fl, in-process engine): every scenario of
    ``[[fl.scenarios]]`` with every codec over ``repeats`` seeds; each scenario writes its own
    report into out_dir/fl/<scenario>/. Rows carry a ``scenario`` key."""
    from fedquant.simulations import fl
    from fedquant.simulations.compare import scenario_configs, scenario_dir

    rows = []
    for scen in scenario_configs(cfg):
        for r in fl.run_fl(scen, out_dir / scenario_dir(scen["name"]), progress=progress):
            rows.append({"scenario": scen["name"], **r})
    return rows


def run_speed(cfg: dict[str, Any], out_dir: Path, progress: bool) -> list[dict]:
    """Encode/decode time at speed.d, one thread, with a read+write pass of the same array
    measured in the same run as the baseline (simulations.bench)."""
    from rich.progress import Progress

    from fedquant.simulations import bench

    table = cfg["speed"]
    specs = [codec_spec(s, f"speed.codecs[{i}]") for i, s in enumerate(table["codecs"])]
    # REFERENCE.md's speeds are one-thread figures; so is the baseline
    with one_thread(), Progress(disable=not progress) as bar:
        job = bar.add_task("speed", total=len(specs))
        started: list[str] = []

        def step(what: str) -> None:  # called as each codec starts
            bar.update(job, description=f"speed: {what}", completed=len(started))
            started.append(what)

        rows = bench.bench_codecs(specs, [table["d"]], table["repeats"], seed=cfg["seed"],
                                  progress=step)
        bar.update(job, completed=len(specs))
    for r in rows:
        r["label"] = label(r["codec"], r["params"])
    return rows


def _linreg(out_dir: Path, quick: bool, progress: bool) -> list[dict]:
    from fedquant.simulations import linreg
    return linreg.run_linreg(linreg.load_config(), out_dir, quick=quick, progress=progress)


def _innerprod(out_dir: Path, quick: bool, progress: bool) -> list[dict]:
    from fedquant.simulations import innerprod
    return innerprod.run_innerprod(innerprod.load_config(), out_dir, quick=quick,
                                   progress=progress)


def _lplr(out_dir: Path, quick: bool, progress: bool) -> list[dict]:
    from fedquant.simulations import digits_mlp, lplr
    return lplr.run_lplr(digits_mlp.load_config(lplr.DEFAULT_CONFIG, lplr.SCHEMA, quick),
                         out_dir)["checks"]


def _ptq(out_dir: Path, quick: bool, progress: bool) -> list[dict]:
    from fedquant.simulations import digits_mlp, ptq
    return ptq.run_ptq(digits_mlp.load_config(ptq.DEFAULT_CONFIG, ptq.SCHEMA, quick),
                       out_dir)["checks"]


STUDIES = {"linreg": _linreg, "innerprod": _innerprod, "lplr": _lplr, "ptq": _ptq}


def run_studies(cfg: dict[str, Any], out_dir: Path, progress: bool,
                quick: bool = False) -> dict[str, dict]:
    """The seed studies named in `studies` (``--full``), each with its own default config
    (``quick``: their quick versions), written to out_dir/<study>/; per study its report
    and its claim checks (experiment, claim, measured, result PASS/FAIL)."""
    out = {}
    for name in cfg.get("studies", []):
        checks = STUDIES[name](out_dir / name, quick, progress)
        out[name] = {"report": str(Path(name) / "report.md"), "checks": checks}
    return out
