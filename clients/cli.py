"""``fedquant push``: encode a tensor with a round's codec and push it to the server.

    fedquant push --target 127.0.0.1:50051 --insecure --round r1 --client-id 3 --tensor g.pt
    fedquant push --target host:443 --root-cert ca.pem --token-file tok --round r1 \
        --client-id 3 --random --seed 7 --wait-mean 60 --mean-out mean.pt

The tensor comes from ``--tensor`` (a ``torch.save``'d tensor or a ``.npy`` array, of the
round's shape) or, with ``--random``, is a standard normal vector of the round's shape drawn
from ``fq.random.normals(seed)``. The seed of the encoding is
``derive_seed(round_seed, client_id)``, except in a correlated round (codec ``correlated``),
where it is the round seed and ``--stratum`` (default: the client's position in the round's
sorted cohort; required when the round has no cohort) is this client's index in
0..clients-1.

A failed call is one line on stderr with the status and what went wrong, e.g.
``UNAVAILABLE: nothing listening at 127.0.0.1:50051``, and exit code 1; ``--retries 0``
makes exactly one attempt.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Annotated

import grpc
import numpy as np
import torch
import typer

import fedquant as fq
from fedquant.clients.grpc_client import AggregatorClient, PushConflict


def load_tensor(path: pathlib.Path) -> torch.Tensor:
    """A tensor from a ``.npy`` file or a ``torch.save``'d tensor (weights_only)."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, got {type(value).__name__}")
    return value


def push(
    round_id: Annotated[str, typer.Option("--round", help="Round id.")],
    client_id: Annotated[int, typer.Option(help="This client's id.")],
    target: Annotated[str, typer.Option(help="Server host:port.")] = "127.0.0.1:50051",
    tensor: Annotated[pathlib.Path | None, typer.Option(
        help="Tensor to push (.pt via torch.save, or .npy).")] = None,
    random: Annotated[bool, typer.Option(
        "--random", help="Push a normal random vector of the round's shape.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random.")] = 0,
    weight: Annotated[float, typer.Option(help="Weight of this update in the mean.")] = 1.0,
    insecure: Annotated[bool, typer.Option(help="Plaintext channel (no TLS).")] = False,
    root_cert: Annotated[pathlib.Path | None, typer.Option(help="Server CA (PEM).")] = None,
    client_cert: Annotated[pathlib.Path | None, typer.Option(
        help="Client certificate for mutual TLS (PEM).")] = None,
    client_key: Annotated[pathlib.Path | None, typer.Option(help="Client key (PEM).")] = None,
    token_file: Annotated[pathlib.Path | None, typer.Option(
        help="File holding this client's bearer token.")] = None,
    retries: Annotated[int, typer.Option(help="Retries on UNAVAILABLE.")] = 5,
    wait_mean: Annotated[float, typer.Option(
        help="After pushing, wait this many seconds for the round's mean (0: don't).")] = 0.0,
    mean_out: Annotated[pathlib.Path | None, typer.Option(
        help="Save the fetched mean here (torch.save).")] = None,
    stratum: Annotated[int | None, typer.Option(
        help="Correlated rounds: this client's stratum in 0..clients-1 (default: its "
             "position in the round's cohort).")] = None,
) -> None:
    """Encode a tensor with the round's codec and seed, and push it to the server."""
    if (tensor is None) == (not random):
        raise typer.BadParameter("pass exactly one of --tensor FILE or --random")
    if retries < 0:
        raise typer.BadParameter(f"--retries must be >= 0, got {retries}")
    x = None
    if tensor is not None:
        try:
            x = load_tensor(tensor)
        except (OSError, ValueError, RuntimeError) as e:
            raise typer.BadParameter(f"--tensor {tensor}: {e}") from None
    try:
        token = token_file.read_text().strip() if token_file else None
    except OSError as e:
        raise typer.BadParameter(f"--token-file {token_file}: {e.strerror}") from None
    try:
        summary = _push(target, round_id, client_id, x, seed, weight, token, retries,
                        wait_mean, mean_out, stratum, insecure=insecure, root_cert=root_cert,
                        client_cert=client_cert, client_key=client_key)
    except grpc.RpcError as e:
        print(describe_error(e, target), file=sys.stderr, flush=True)
        raise typer.Exit(1) from None
    except (PushConflict, OSError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise typer.Exit(1) from None
    print(json.dumps(summary))


def _push(target: str, round_id: str, client_id: int, x: torch.Tensor | None, seed: int,
          weight: float, token: str | None, retries: int, wait_mean: float,
          mean_out: pathlib.Path | None, stratum: int | None = None, **tls) -> dict:
    with AggregatorClient(target, token=token, retries=retries, **tls) as client:
        if x is None:  # --random: a vector of the round's shape
            shape = tuple(client.round_status(round_id).shape)
            x = fq.random.normals(seed, fq.random.Purpose.PRIVATE, math.prod(shape))
            x = x.reshape(shape)
        try:
            enc = client.encode(round_id, client_id, x, stratum)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        result = client.push(round_id, client_id, enc, weight)
        summary = {"round": result.round_id, "client": result.client_id,
                   "bytes": result.nbytes, "bits_per_coordinate": 8 * result.nbytes / x.numel(),
                   "sha256": result.sha256, "already_recorded": result.already_recorded}
        if wait_mean > 0:
            mean = client.get_mean(round_id, wait_s=wait_mean)
            summary["mean_norm"] = float(torch.linalg.vector_norm(mean))
            if mean_out is not None:
                torch.save(mean, mean_out)
    return summary


def describe_error(e: grpc.RpcError, target: str) -> str:
    """One line for a failed call: ``STATUS: what went wrong``."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    details = " ".join(str(details or "").split())
    name = code.name if code is not None else "ERROR"
    lowered = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE and ("connection refused" in lowered
                                                or "failed to connect" in lowered):
        return f"UNAVAILABLE: nothing listening at {target}"
    return f"{name}: {details}"


def register(app: typer.Typer) -> None:
    app.command("push")(push)


if __name__ == "__main__":
    typer.run(push)
