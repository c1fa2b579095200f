"""Correlated rounds (correlated quantization, Suresh et al., ICML 2022) against a real
server subprocess on 127.0.0.1: every client encodes with the round seed and its own
stratum; the served mean equals fq.decode_mean of the payloads and beats independent
dithers (ECDQ) on similar clients; derived seeds, a stratum used twice (also after a
restart) and a round whose `clients` differs from its expected count are refused; the
`fedquant push --stratum` CLI."""

from __future__ import annotations

import grpc
import pytest
import torch
import typer
from helpers_server import ServerProcess
from typer.testing import CliRunner

import fedquant as fq
from fedquant.clients import cli as clients_cli
from fedquant.clients.grpc_client import AggregatorClient

D, N = 4096, 8
S = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("correlated"), "--insecure")
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    with AggregatorClient(server.target, insecure=True, token=server.admin_token,
                          retries=0) as c:
        yield c


def _similar(seed: int) -> list[torch.Tensor]:
    """N vectors within 10% (in norm) of a common one."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=gen)
    return [base + 0.1 * torch.randn(D, generator=gen) for _ in range(N)]


def _code(call) -> tuple[S, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return S.OK, ""


def test_correlated_round_serves_decode_mean_and_beats_independent_dithers(client):
    xs = _similar(0)
    true = torch.stack(xs).mean(0)
    cohort = [100 + 7 * i for i in range(N)]
    client.open_round("cq", "correlated",
                      {"bits": 1, "clients": N}, round_seed=5, shape=[D], cohort=cohort)
    client.open_round("ind", "ecdq", {"bits": 1}, round_seed=5, shape=[D], expected=N)
    # the cohort gives the strata: client cohort[i] gets stratum i by default
    encs = [client.encode("cq", cid, xs[i]) for i, cid in enumerate(cohort)]
    assert [fq.get_codec("correlated", bits=1.0, clients=N).client_of(e) for e in encs] == \
        list(range(N))
    assert all(e.seed == 5 for e in encs)
    for i, cid in enumerate(cohort):
        client.push("cq", cid, encs[i])
    ind = [client.encode("ind", i, xs[i]) for i in range(N)]
    for i in range(N):
        client.push("ind", i, ind[i])
    mean = client.get_mean("cq", wait_s=30)
    assert len(client.round_status("cq").pushes) == N
    torch.testing.assert_close(mean, fq.decode_mean(encs), rtol=1e-5, atol=1e-6)
    err_cq = float((mean - true).square().sum())
    err_ind = float((client.get_mean("ind", wait_s=30) - true).square().sum())
    assert err_cq * 2 < err_ind, (err_cq, err_ind)  # 2.8x to 3.0x lower over 12 seeds
    assert float((mean - true).norm()) < float(true.norm())  # sanity: not a zero codec


def test_derived_seed_duplicate_stratum_and_bad_stratum_are_refused(client):
    xs = _similar(1)
    client.open_round("cq2", "correlated", {"bits": 1, "clients": N}, round_seed=9,
                      shape=[D], expected=N)
    with pytest.raises(ValueError, match="stratum"):  # no cohort: the stratum is required
        client.encode("cq2", 0, xs[0])
    derived = fq.get_codec("correlated", bits=1.0, clients=N, client=0).encode(
        xs[0], seed=fq.random.derive_seed(9, 0))
    code, details = _code(lambda: client.push("cq2", 0, derived))
    assert code == S.FAILED_PRECONDITION and "round seed" in details
    pushed = [client.encode("cq2", 0, xs[0], stratum=3)]
    client.push("cq2", 0, pushed[0], 1.0)
    code, details = _code(lambda: client.push("cq2", 1, client.encode("cq2", 1, xs[1],
                                                                      stratum=3)))
    assert code == S.FAILED_PRECONDITION and "stratum 3" in details
    pushed.append(client.encode("cq2", 1, xs[1], stratum=4))
    client.push("cq2", 1, pushed[1], 3.0)
    with pytest.raises(ValueError, match="client"):  # outside 0..clients-1
        client.encode("cq2", 2, xs[2], stratum=N)
    status = client.close_round("cq2")
    assert sorted(p.client_id for p in status.pushes) == [0, 1]
    # the weighted mean of the accepted pushes (strata 3 and 4 of 8: a partial round)
    torch.testing.assert_close(client.get_mean("cq2"), fq.decode_mean(pushed, [1.0, 3.0]),
                               rtol=1e-5, atol=1e-6)


def test_round_whose_clients_differ_from_its_expected_count_is_refused(client):
    code, details = _code(lambda: client.open_round(
        "cq3", "correlated", {"bits": 1, "clients": 4}, round_seed=1, shape=[D], expected=8))
    assert code == S.INVALID_ARGUMENT and "clients=4" in details
    code, details = _code(lambda: client.open_round(
        "cq4", "correlated", {"bits": 1, "clients": 4}, round_seed=1, shape=[D],
        cohort=[1, 2, 3]))
    assert code == S.INVALID_ARGUMENT and "clients=4" in details
    # without an expected count, any clients is fine; a stratum on a plain round is refused
    client.open_round("cq5", "correlated", {"bits": 1, "clients": 4}, round_seed=1,
                      shape=[D])
    client.open_round("plain", "ecdq", {"bits": 1}, round_seed=1, shape=[D], expected=2)
    with pytest.raises(ValueError, match="only for correlated"):
        client.encode("plain", 0, torch.randn(D), stratum=0)


def test_strata_survive_a_restart_and_the_push_cli_takes_a_stratum(tmp_path):
    xs = _similar(2)
    proc = ServerProcess(tmp_path / "data", "--insecure")
    try:
        with AggregatorClient(proc.target, insecure=True, token=proc.admin_token,
                              retries=0) as c:
            c.open_round("cqr", "correlated", {"bits": 1, "clients": 4}, round_seed=3,
                         shape=[D], expected=4)
            c.push("cqr", 10, c.encode("cqr", 10, xs[0], stratum=0))
    finally:
        proc.stop()
    proc = ServerProcess(tmp_path / "data", "--insecure")
    try:
        with AggregatorClient(proc.target, insecure=True, token=proc.admin_token,
                              retries=0) as c:
            code, details = _code(lambda: c.push("cqr", 11, c.encode("cqr", 11, xs[1],
                                                                      stratum=0)))
            assert code == S.FAILED_PRECONDITION and "stratum 0" in details
            app = typer.Typer()
            clients_cli.register(app)
            app.command("noop")(lambda: None)  # two commands: `push` stays a subcommand
            args = ["push", "--target", proc.target, "--insecure", "--round", "cqr",
                    "--client-id", "11", "--random", "--seed", "4"]
            missing = CliRunner().invoke(app, args)  # no cohort: --stratum is required
            assert missing.exit_code != 0 and "stratum" in missing.output
            run = CliRunner().invoke(app, [*args, "--stratum", "1"])
            assert run.exit_code == 0, run.output
            assert sorted(p.client_id for p in c.round_status("cqr").pushes) == [10, 11]
    finally:
        proc.stop()
