"""Experiments: each a function plus a TOML config, run by the `fedquant` console script."""
