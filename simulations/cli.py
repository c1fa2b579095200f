"""The `fedquant` console script: one subcommand per experiment or service.

Each command lives in its own module, which exposes ``register(app)``; this file only lists
them, so adding a command never touches another one's code.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="fedquant: compare and run communication-efficient FL compressors.",
                  no_args_is_help=True, add_completion=False)

# Modules that add commands to the app, in the order `fedquant --help` lists them.
COMMAND_MODULES = (
    "fedquant.simulations.compare",    # fedquant compare
    "fedquant.simulations.dme",        # fedquant dme
    "fedquant.simulations.bench",      # fedquant bench [server]
    "fedquant.simulations.fl",         # fedquant fl
    "fedquant.server.cli",             # fedquant serve
    "fedquant.clients.cli",            # fedquant push
    "fedquant.simulations.soak",       # fedquant soak
    "fedquant.simulations.linreg",     # fedquant linreg
    "fedquant.simulations.innerprod",  # fedquant innerprod
    "fedquant.simulations.lplr",       # fedquant lplr
    "fedquant.simulations.ptq",        # fedquant ptq
    "fedquant.simulations.bench_ddp",  # fedquant bench-ddp
)

def _version(value: bool) -> None:
    if value:
        import fedquant

        typer.echo(f"fedquant {fedquant.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print fedquant's version and exit.")) -> None:
    """fedquant: compare and run communication-efficient FL compressors."""


for _name in COMMAND_MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
