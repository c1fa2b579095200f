"""`fedquant compare`: which compressor should I use, and what does it cost me?

One command runs three measurements on the embedded default (no download, no flags) and
writes one report a person wants to read:

1. DME: vNMSE and NMSE(n = 10) against measured bits per coordinate for every codec and bit
   budget, on N(0,1), LogNormal(0,1), a real gradient of the digits model and adversarial
   inputs, with 1, 2, 3 and auto RHTs (``simulations.dme``).
2. Federated training: digits, 10 clients, Dirichlet(0.5), accuracy against rounds and
   against cumulative uplink megabytes (``simulations.fl``).
3. Speed: encode and decode of each codec at d = 2^20 with a read+write pass of the same
   array as the baseline of the same run (``simulations.bench``).

``--quick`` runs a small version in about a minute, ``--full`` the long one (and the seed
studies). ``--config my.toml`` runs a user's own comparison; a config's ``plugins`` list
names modules to import first, so codecs registered there with ``fq.register_codec`` take
part (see ``simulations/examples/``).
"""

from __future__ import annotations

import copy
import importlib
import json
import platform
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

import fedquant as fq

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "compare.toml"
TOP_KEYS = {"name", "seed", "plugins", "dme", "fl", "speed", "studies", "quick", "full"}
SPEED_KEYS = {"d", "repeats", "codecs"}
SECTION_KEYS = {  # the keys of each table; [quick] and [full] hold the same tables
    "dme": {"d", "clients", "trials", "inputs", "rotations", "codecs"},
    "fl": {"task", "dataset", "model", "clients", "alpha", "rounds", "codecs"},
    "speed": SPEED_KEYS,
}
BUDGETS = (1, 2, 3, 4)


class ConfigError(ValueError):
    """A bad compare config; the message names the key and the allowed values."""


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Path | None = None, mode: str = "default") -> dict[str, Any]:
    """Read a compare TOML (default: the embedded one) and apply its [quick]/[full] overrides.

    User configs are layered on the embedded default (with its [quick]/[full] overrides
    for those modes), so they name only what they change, and --quick/--full never replace
    what the user's file sets; the file's own [quick]/[full] tables apply last. Unknown keys
    are refused at every level, naming the key and the allowed ones.
    """
    if mode not in ("default", "quick", "full"):
        raise ConfigError(f"mode must be 'default', 'quick' or 'full', got {mode!r}")
    cfg = tomllib.loads(DEFAULT_CONFIG.read_text())
    if mode != "default":  # the embedded [quick]/[full] first: the user's file wins over them
        cfg = _merge(cfg, cfg.get(mode, {}))
    if path is not None:
        try:
            user = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        _check_tables("", user)
        cfg = _merge(cfg, user)
        if mode != "default":  # the user's own [quick]/[full] overrides, if any
            cfg = _merge(cfg, user.get(mode, {}))
    import_plugins(cfg)
    validate_config(cfg)
    return cfg


def import_plugins(cfg: dict[str, Any]) -> None:
    """Import the config's `plugins` modules, where users register their own codecs."""
    plugins = cfg.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins must be a list of module names, got {plugins!r}")
    for mod in plugins:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {mod!r}: {e}") from None


def _check_keys(where: str, table: dict, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"unknown key '{where}{key}'; allowed: {sorted(allowed)}")


def _check_tables(where: str, cfg: dict, top: set[str] = TOP_KEYS) -> None:
    """ConfigError naming any unknown key, at every level (the sections, and the same
    sections inside [quick] and [full])."""
    _check_keys(where, cfg, top)
    for key, table in cfg.items():
        if key in SECTION_KEYS or key in ("quick", "full"):
            if not isinstance(table, dict):
                raise ConfigError(f"'{where}{key}' must be a table")
            if key in SECTION_KEYS:
                _check_keys(f"{where}{key}.", table, SECTION_KEYS[key])
            else:
                _check_tables(f"{where}{key}.", table, TOP_KEYS - {"quick", "full"})


def validate_config(cfg: dict[str, Any]) -> None:
    """Check every key and value before any work starts."""
    _check_tables("", cfg)
    if not isinstance(cfg.get("seed"), int) or cfg["seed"] < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.get('seed')!r}")
    speed = cfg.get("speed", {})
    _check_keys("speed.", speed, SPEED_KEYS)
    d = speed.get("d", 2**20)
    if not isinstance(d, int) or d < 1:
        raise ConfigError(f"speed.d must be a positive integer, got {d!r}")
    for section in ("dme", "fl", "speed"):
        for i, spec in enumerate(cfg.get(section, {}).get("codecs", [])):
            codec_spec(spec, f"{section}.codecs[{i}]")
    studies = cfg.get("studies", [])
    allowed_studies = {"linreg", "innerprod", "lplr", "ptq"}
    for s in studies:
        if s not in allowed_studies:
            raise ConfigError(f"studies: unknown study {s!r}; allowed: {sorted(allowed_studies)}")


def codec_spec(spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A codec entry of the config as (name, params): a spec string "eden:bits=2" or a table
    with the same keys, {codec = "eden", bits = 2} (its codec may be a spec too)."""
    if isinstance(spec, str):
        spec = {"codec": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("codec"), str):
        raise ConfigError(f"{where}: expected a codec spec like \"eden:bits=2\" or a table "
                          f"like {{codec = \"eden\", bits = 2}}, got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "codec"}
    try:
        name, spec_params = fq.codecs.typed_codec_spec(spec["codec"])
    except ValueError as e:
        raise ConfigError(f"{where}.codec: {e}") from None
    both = sorted(set(spec_params) & set(params))
    if both:
        raise ConfigError(f"{where}: {both} set both in the codec spec and in the table")
    params = {**spec_params, **params}
    try:
        fq.get_codec(name, **params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return name, params


def label(name: str, params: dict[str, Any]) -> str:
    """A short human name for a codec setting: eden b=2, drive, topk fraction=0.01."""
    shown = {k: v for k, v in params.items() if k not in ("rotations",)}
    if not shown:
        return name
    return name + " " + " ".join(
        f"b={v}" if k == "bits" else f"{k}={v}" for k, v in shown.items())


# ---- the recommendation ---------------------------------------------------------------
NATURAL_INPUTS = ("normal", "lognormal", "digits-grad")


def best_per_budget(dme_rows: list[dict], inputs: tuple[str, ...] = NATURAL_INPUTS) -> list[dict]:
    """For each bit budget, the codec setting (at auto or no rotation) whose worst NMSE(n)
    over the natural inputs is lowest, among settings within that many bits/coord.

    The worst case over inputs matters: a biased codec looks fine on independent N(0,1)
    clients but its error does not average out on inputs with a common mean (LogNormal,
    real gradients; REFERENCE.md "Biased vs unbiased once averaged")."""
    worst: dict[str, dict] = {}
    for r in dme_rows:
        if r.get("input") in inputs and r.get("rotations") in ("auto", "-"):
            w = worst.setdefault(r["label"], {"nmse": 0.0, "inputs": set(), "bits": 0.0})
            if r["nmse"] >= w["nmse"]:
                w.update(nmse=r["nmse"], vnmse=r["vnmse"], input=r["input"])
            w["bits"] = max(w["bits"], r["bits_per_coord"])
            w["inputs"].add(r["input"])
    present = {i for w in worst.values() for i in w["inputs"]}
    complete = {lab: w for lab, w in worst.items() if w["inputs"] == present}
    out = []
    for b in BUDGETS:
        fits = {lab: w for lab, w in complete.items() if w["bits"] <= b * 1.05}
        if fits:
            lab = min(fits, key=lambda k: fits[k]["nmse"])
            w = fits[lab]
            out.append({"budget": b, "codec": lab, "bits_per_coord": w["bits"],
                        "nmse": w["nmse"], "vnmse": w["vnmse"], "worst_input": w["input"]})
    return out


def fl_finals(fl_rows: list[dict], tail: int = 3) -> list[dict]:
    """Per codec: final accuracy, mean accuracy of the last `tail` rounds (damps the
    round-to-round noise), total uplink MB; sorted by uplink."""
    out = []
    for lab in dict.fromkeys(r["label"] for r in fl_rows):
        rs = sorted((r for r in fl_rows if r["label"] == lab), key=lambda r: r["round"])
        last = rs[-tail:]
        out.append({"label": lab, "accuracy": rs[-1]["accuracy"],
                    "tail_accuracy": sum(r["accuracy"] for r in last) / len(last),
                    "uplink_mb": rs[-1]["cum_uplink_bytes"] / 1e6, "rounds": rs[-1]["round"]})
    return sorted(out, key=lambda f: f["uplink_mb"])


def cheapest_within(fl_rows: list[dict], points: float = 1.0) -> dict | None:
    """The codec with the fewest uplink bytes whose last-3-rounds accuracy is within
    `points` accuracy points of fp32's."""
    finals = fl_finals(fl_rows)
    ref = next((f for f in finals if f["label"].startswith("fp32")), None)
    if ref is None:
        return None
    best = next(f for f in finals if f["tail_accuracy"] >= ref["tail_accuracy"] - points / 100)
    return {**best, "fp32_accuracy": ref["tail_accuracy"], "fp32_uplink_mb": ref["uplink_mb"]}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("fedquant", "torch", "numpy", "numba", "flwr", "grpc", "sklearn"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = "not installed"
    return out


def run_compare(cfg: dict[str, Any], out_dir: Path, progress: bool = True,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three sections and write report.md, CSV/JSON and PNG plots into out_dir."""
    from fedquant.simulations import compare_report, compare_sections

    import_plugins(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": cfg, "versions": versions(), "timings_s": {}}
    for section in ("dme", "fl", "speed"):
        t0 = time.perf_counter()
        log(f"[bold]== {section} ==[/bold]")
        results[section] = getattr(compare_sections, f"run_{section}")(cfg, out_dir, progress)
        results["timings_s"][section] = round(time.perf_counter() - t0, 1)
    results["studies"] = compare_sections.run_studies(cfg, out_dir, progress)
    results["best_per_budget"] = best_per_budget(results["dme"])
    results["cheapest_within_1pt"] = cheapest_within(results["fl"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    compare_report.write_report(results, out_dir)
    return results


def register(app: typer.Typer) -> None:
    @app.command()
    def compare(
        config: Annotated[Path | None, typer.Option(
            help="TOML config; default: the embedded one.")] = None,
        quick: Annotated[bool, typer.Option(help="Small version, about a minute.")] = False,
        full: Annotated[bool, typer.Option(help="Long version, plus seed studies.")] = False,
        out: Annotated[Path | None, typer.Option(
            help="Output folder; default results/<name>.")] = None,
    ) -> None:
        """Compare compression schemes end to end: DME error, FL accuracy, bytes, speed."""
        from fedquant.simulations import compare_report
        from rich.console import Console

        console = Console()
        if quick and full:
            raise typer.BadParameter("choose at most one of --quick and --full")
        try:
            cfg = load_config(config, "quick" if quick else "full" if full else "default")
        except ConfigError as e:
            console.print(f"[red]config error:[/red] {e}")
            raise typer.Exit(2) from None
        out_dir = out or Path("results") / cfg.get("name", "compare")
        t0 = time.perf_counter()
        results = run_compare(cfg, out_dir, progress=True, log=console.print)
        compare_report.print_summary(results, console)
        console.print(f"done in {time.perf_counter() - t0:.0f} s; report: "
                      f"{out_dir / 'report.md'}")


__all__ = ["ConfigError", "best_per_budget", "cheapest_within", "fl_finals", "codec_spec", "label",
           "load_config", "run_compare", "validate_config"]
