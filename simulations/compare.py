"""`fedquant compare`: which compressor should I use, and what does it cost me?

One command runs three measurements on the embedded default (no download, no flags) and
writes one report a person wants to read:

1. DME: vNMSE and NMSE(n = 10) against measured bits per coordinate for every codec and bit
   budget, on N(0,1), LogNormal(0,1), a real gradient of the digits model and adversarial
   inputs, with 1, 2, 3 and auto RHTs (``simulations.dme``).
2. Federated training: each scenario of ``[fl]`` (a task, clients, participation, split)
   over several seeds, every codec on the same seeds; accuracy with 95% intervals, the
   verdict against fp32, and bytes and simulated time to the target accuracy on each
   network link (``simulations.fl``, ``simulations.evaluation``, ``simulations.network``).
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
import re
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
    "fl": {"repeats", "target_points", "links", "scenarios", "codecs"},
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
    scenario_configs(cfg)  # each scenario is a valid `fedquant fl` config
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


SCENARIO_FIXED = ("codecs", "repeats", "links", "target_points", "seed", "quick")


def scenario_configs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One validated `fedquant fl` config per ``[[fl.scenarios]]`` table: the scenario's
    keys plus the section's codecs, repeats, links and target_points and the top-level
    seed. ConfigError names the scenario and the key."""
    from fedquant.simulations import fl

    table = cfg.get("fl", {})
    scenarios = table.get("scenarios", [])
    if not isinstance(scenarios, list) or not scenarios or \
            not all(isinstance(t, dict) for t in scenarios):
        raise ConfigError("fl.scenarios must be a non-empty list of tables "
                          "([[fl.scenarios]] name = ..., task = ..., ...)")
    codecs = []
    for i, spec in enumerate(table.get("codecs", [])):
        name, params = codec_spec(spec, f"fl.codecs[{i}]")
        codecs.append({"label": label(name, params), "name": name, "params": params})
    out = []
    for i, scen in enumerate(scenarios):
        where = f"fl.scenarios[{i}]"
        fixed = sorted(set(scen) & set(SCENARIO_FIXED))
        if fixed:
            raise ConfigError(f"{where}: {fixed} are set for all scenarios in [fl] (or seed at "
                              "the top level), not per scenario")
        if not isinstance(scen.get("name"), str) or not scen["name"]:
            raise ConfigError(f"{where}.name: every scenario needs a name")
        fl_cfg = {**scen, "codecs": codecs, "seed": cfg["seed"],
                  **{k: table[k] for k in ("repeats", "links", "target_points") if k in table}}
        try:
            out.append(fl.validate(fl_cfg))
        except ValueError as e:
            raise ConfigError(f"{where} ({scen['name']}): {e}") from None
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"fl.scenarios: names must be distinct, got {names}")
    return out


def scenario_dir(name: str) -> str:
    """The folder of a scenario's own `fedquant fl` report, relative to the output folder."""
    return "fl/" + "-".join(re.findall(r"[A-Za-z0-9_.]+", name))


def fl_summaries(cfg: dict[str, Any], fl_rows: list[dict]) -> dict[str, list[dict]]:
    """{scenario name: fl_report.summarize of its rows}, in config order."""
    from fedquant.simulations import fl_report

    return {sc["name"]: fl_report.summarize(sc, [r for r in fl_rows
                                                  if r["scenario"] == sc["name"]])
            for sc in scenario_configs(cfg)}


def cheapest_within(summaries: dict[str, list[dict]]) -> dict | None:
    """The codec with the smallest uplink (as a fraction of fp32's, worst scenario) whose
    verdict is "within" in every scenario (evaluation.verdict: the 95% interval of its
    seed-paired difference to fp32 lies above -target_points); None if no codec is."""
    from fedquant.simulations import evaluation

    by_label: dict[str, list[dict]] = {}
    for items in summaries.values():
        for it in items:
            if it["codec"] != "fp32":
                by_label.setdefault(it["label"], []).append(it)
    ok = {lab: its for lab, its in by_label.items() if len(its) == len(summaries)
          and all(it["verdict"] == evaluation.WITHIN for it in its)}
    if not ok:
        return None
    lab = min(ok, key=lambda k: max(it["uplink_vs_fp32"] for it in ok[k]))
    return {"label": lab, "uplink_vs_fp32": max(it["uplink_vs_fp32"] for it in ok[lab]),
            "scenarios": dict(zip(summaries, ok[lab], strict=True))}


FL_BUDGETS = (1, 2, 4, 8, 32)


def recommend(summaries: dict[str, list[dict]], links: list[str],
              budgets: tuple[int, ...] = FL_BUDGETS) -> dict[str, list[dict]]:
    """Per scenario, per link and bit budget: the codec with the shortest mean simulated
    time to the target among those shown within target_points of fp32 (evaluation.verdict)
    that reached the target on every seed and send at most that many bits per coordinate
    (measured, 5% slack for headers), with fp32's time beside; fp32 itself qualifies."""
    from fedquant.simulations import evaluation

    out: dict[str, list[dict]] = {}
    for scen, items in summaries.items():
        ref = next((it for it in items if it["codec"] == "fp32"), None)
        rows = []
        for link in links:
            def seconds(it, link=link):
                entry = it["to_target"].get(link)
                if not entry or entry["value"] is None or entry["reached"] < entry["seeds"]:
                    return None
                return entry["value"].mean
            fp32_s = seconds(ref) if ref else None
            for b in budgets:
                fits = [(seconds(it), it) for it in items if it["bits_per_coord"] <= b * 1.05
                        and seconds(it) is not None
                        and (it is ref or it["verdict"] == evaluation.WITHIN)]
                best = min(fits, key=lambda t: t[0]) if fits else None
                rows.append({"link": link, "budget": b,
                             "codec": best[1]["label"] if best else None,
                             "seconds": best[0] if best else None, "fp32_seconds": fp32_s,
                             "interval": best[1]["to_target"][link]["value"] if best else None,
                             "bits_per_coord": best[1]["bits_per_coord"] if best else None})
        out[scen] = rows
    return out


def fl_links(cfg: dict[str, Any]):
    """The network links of the FL section (simulations.network.DEFAULT_LINKS if unset)."""
    from fedquant.simulations import fl_report

    return fl_report.links_of(cfg.get("fl", {}))


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
    from fedquant.simulations import compare_report, compare_sections, evaluation

    import_plugins(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": cfg, "versions": versions(), "timings_s": {}}
    for section in ("dme", "fl", "speed"):
        t0 = time.perf_counter()
        log(f"[bold]== {section} ==[/bold]")
        results[section] = getattr(compare_sections, f"run_{section}")(cfg, out_dir, progress)
        results["timings_s"][section] = round(time.perf_counter() - t0, 1)
    results["studies"] = compare_sections.run_studies(cfg, out_dir, progress)
    # the DME reference check (vNMSE within sampling error of REFERENCE.md's table)
    dme_checks = out_dir / "dme" / "checks.json"
    results["dme_checks"] = json.loads(dme_checks.read_text()) if dme_checks.exists() else []
    results["best_per_budget"] = best_per_budget(results["dme"])
    summaries = fl_summaries(cfg, results["fl"])
    results["fl_summary"] = summaries
    results["cheapest_within"] = cheapest_within(summaries)
    results["fl_recommendation"] = recommend(
        summaries, [lk.name for lk in fl_links(cfg)])
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1,
                                                     default=evaluation.json_default))
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
        from rich.console import Console

        from fedquant.simulations import compare_report

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


__all__ = ["ConfigError", "best_per_budget", "cheapest_within", "codec_spec", "fl_links",
           "fl_summaries", "label", "load_config", "recommend", "run_compare", "scenario_configs",
           "scenario_dir", "validate_config"]
