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
    "simulations.compare",    # fedquant compare
    "simulations.dme",        # fedquant dme
    "simulations.bench",      # fedquant bench [server]
    "simulations.fl",         # fedquant fl
    "server.cli",             # fedquant serve
    "clients.cli",            # fedquant push
    "simulations.linreg",     # fedquant linreg
    "simulations.innerprod",  # fedquant innerprod
    "simulations.lplr",       # fedquant lplr
    "simulations.ptq",        # fedquant ptq
)

for _name in COMMAND_MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
