"""fedquant.ddp: the DDP communication hook, on 2 gloo processes on the CPU.

One spawn of two ranks trains a small MLP under several hook configurations and records, for
every bucket, the hook's input, residual and output; the parent then re-encodes every rank's
input with the seeds the hook must have used and checks the outputs against
``fq.decode_mean`` of those encodings, the error-feedback residuals, the byte counts and that
the replicas stayed identical.
"""

from __future__ import annotations

import datetime
import gc
import math
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fedquant as fq
from fedquant.ddp import CodecState, codec_for_step, codec_hook, rank_seed, step_seed
from fedquant.simulations import bench_ddp

WORLD = 2
SEED = 5
SCENARIOS = {
    # name: (codec name, codec params, error_feedback, start_iter, steps)
    "eden_ef": ("eden", {"bits": 2}, True, 2, 5),
    "quicfl": ("quic-fl", {"bits": 2}, False, 0, 3),
}


# ---- what each rank runs ------------------------------------------------------------------
def _model() -> nn.Module:
    # DDP broadcasts rank 0's parameters at construction, so the ranks start equal
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


def _train(rank: int, codec: fq.Codec, error_feedback: bool, start_iter: int,
           steps: int) -> dict:
    # 8 KB buckets: several buckets, each with its own seeds and residual
    model = DistributedDataParallel(_model(), bucket_cap_mb=0.008)
    state = CodecState(codec, error_feedback=error_feedback, start_iter=start_iter, seed=SEED)
    records: list[dict] = []
    params = list(model.parameters())

    def recording_hook(state, bucket):  # no string annotations: DDP checks them as objects
        index = bucket.index()
        residual = state.residuals.get(index)
        rec = {"step": state.iter, "index": index, "grad": bucket.buffer().clone(),
               "residual": None if residual is None else residual.clone(),
               "params": [next(i for i, p in enumerate(params) if p.data_ptr() == b.data_ptr())
                          for b in bucket.parameters()]}
        fut = codec_hook(state, bucket)
        rec["out"] = fut.wait().clone()
        after = state.residuals.get(index)
        rec["residual_after"] = None if after is None else after.clone()
        records.append(rec)
        return fut

    model.register_comm_hook(state, recording_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(steps):
        x = torch.randn(32, 16, generator=gen)
        y = torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for rec in records:
            if rec["step"] == step:  # the gradients DDP handed to the parameters
                rec["param_grads"] = torch.cat([params[i].grad.reshape(-1)
                                                for i in rec["params"]])
        opt.step()
    return {"records": records, "params": [p.detach().clone() for p in params],
            "bytes_sent": state.bytes_sent, "wire_bytes": state.wire_bytes,
            "iter": state.iter, "numel": sum(p.numel() for p in params)}


def _mismatch(rank: int) -> str:
    """Rank 0 runs EDEN b=2, rank 1 b=1: every rank must fail with the same clear error."""
    model = DistributedDataParallel(_model())
    codec = fq.get_codec("eden", bits=2 if rank == 0 else 1)
    model.register_comm_hook(CodecState(codec, error_feedback=False, start_iter=0), codec_hook)
    try:
        model(torch.randn(8, 16)).sum().backward()
    except Exception as e:  # DDP re-raises the hook's error through autograd
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _train(rank, fq.get_codec(codec, **params), ef, start, steps)
                   for name, (codec, params, ef, start, steps) in SCENARIOS.items()}
        results["mismatch"] = _mismatch(rank)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        # DDP models sit in reference cycles (hooks hold their state); collected only at
        # interpreter exit, after the process group is gone, gloo aborts the rank
        # ("terminate called without an active exception", about 1 run in 10).
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "init"), str(tmp)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "a DDP rank did not finish within 120 s"
    assert [p.exitcode for p in procs] == [0] * WORLD, "a DDP rank failed (see its stderr)"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- the hook on two ranks ----------------------------------------------------------------
def _pairs(ranks: list[dict], name: str):
    """(rank 0 record, rank 1 record) per (step, bucket)."""
    other = {(r["step"], r["index"]): r for r in ranks[1][name]["records"]}
    recs = ranks[0][name]["records"]
    assert recs and len(recs) == len(other)
    return [(r, other[(r["step"], r["index"])]) for r in recs]


def _reencode(name: str, recs) -> tuple[list[torch.Tensor], list[fq.Encoded]]:
    """Each rank's encoded input and its encoding, with the seeds the hook must use."""
    codec_name, params, ef, _, _ = SCENARIOS[name]
    step, index = recs[0]["step"], recs[0]["index"]
    shared = step_seed(SEED, step, index)
    codec = codec_for_step(fq.get_codec(codec_name, **params), shared)
    inputs = [r["grad"] + r["residual"] if ef and r["residual"] is not None else r["grad"]
              for r in recs]
    return inputs, [codec.encode(x, seed=rank_seed(shared, rank))
                    for rank, x in enumerate(inputs)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_hook_output_is_the_decoded_mean_of_the_ranks(ranks, name):
    start = SCENARIOS[name][3]
    compressed = 0
    for recs in _pairs(ranks, name):
        for r in recs:  # DDP gave the parameters exactly what the hook returned
            assert torch.equal(r["param_grads"], r["out"])
        if recs[0]["step"] < start:  # warm-up: plain allreduce
            torch.testing.assert_close(recs[0]["out"], (recs[0]["grad"] + recs[1]["grad"]) / 2)
            continue
        compressed += 1
        inputs, encs = _reencode(name, recs)
        want = fq.decode_mean(encs)
        assert torch.equal(recs[0]["out"], want) and torch.equal(recs[1]["out"], want)
        torch.testing.assert_close(want, (fq.decode(encs[0]) + fq.decode(encs[1])) / 2)
        # compression happened: the error is about the codec's vNMSE (0.13 for EDEN b = 2,
        # 0.21 for QUIC-FL b = 2) of the ranks' own inputs, not zero and not the whole signal
        plain = (inputs[0] + inputs[1]) / 2
        scale = (inputs[0].norm() ** 2 + inputs[1].norm() ** 2) / 4
        err = float((want - plain).norm() ** 2 / scale)
        assert 0.05 < err < 0.5, err
    assert compressed >= 2
    assert len({recs[0]["index"] for recs in _pairs(ranks, name)}) >= 2  # several buckets


def test_ranks_use_independent_seeds_and_quicfl_shares_its_rotation(ranks):
    for recs in _pairs(ranks, "eden_ef")[-2:]:
        _, encs = _reencode("eden_ef", recs)
        assert encs[0].seed != encs[1].seed
    for recs in _pairs(ranks, "quicfl"):
        _, encs = _reencode("quicfl", recs)
        shared = str(step_seed(SEED, recs[0]["step"], recs[0]["index"]))
        assert encs[0].params["round_seed"] == encs[1].params["round_seed"] == shared
        assert encs[0].seed != encs[1].seed


def test_error_feedback_residual_is_what_the_payload_lost(ranks):
    for recs in _pairs(ranks, "eden_ef"):
        if recs[0]["step"] < SCENARIOS["eden_ef"][3]:
            assert recs[0]["residual_after"] is None
            continue
        inputs, encs = _reencode("eden_ef", recs)
        for r, x, enc in zip(recs, inputs, encs, strict=True):
            torch.testing.assert_close(r["residual_after"], x - fq.decode(enc),
                                       rtol=0, atol=1e-6)
            assert float(r["residual_after"].norm()) > 0
    for recs in _pairs(ranks, "quicfl"):
        assert recs[0]["residual_after"] is None


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replicas_stay_identical(ranks, name):
    for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bytes_sent_are_the_payload_lengths(ranks, name):
    _, _, _, start, steps = SCENARIOS[name]
    pairs = _pairs(ranks, name)
    for rank in range(WORLD):
        got = ranks[rank][name]
        assert got["iter"] == steps
        want = wire = 0
        for recs in pairs:
            if recs[0]["step"] < start:
                want += 4 * recs[0]["grad"].numel()
                wire += 4 * recs[0]["grad"].numel()
                continue
            lengths = [enc.nbytes for enc in _reencode(name, recs)[1]]
            want += lengths[rank]
            wire += max(lengths) + 8
        assert got["bytes_sent"] == want and got["wire_bytes"] == wire
        per_step = (want - 4 * start * got["numel"]) / (steps - start)
        assert per_step < 4 * got["numel"] / 8  # 2 bits per coordinate, not 32


def test_ranks_with_different_codecs_fail_clearly(ranks):
    for r in ranks:
        assert "ValueError" in r["mismatch"] and "must match" in r["mismatch"]


# ---- arguments, seeds, state ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"codec": "no-such-codec"}, "unknown codec"),
    ({"codec": "eden:bits=9"}, "bits"),
    ({"codec": "eden:colour=red"}, "unknown parameter"),
    ({"codec": 3}, "codec must be"),
    ({"codec": "eden", "start_iter": -1}, "start_iter"),
    ({"codec": "eden", "start_iter": True}, "start_iter"),
    ({"codec": "eden", "start_iter": 1}, "start_iter must be >= 2"),
    ({"codec": "eden", "seed": -1}, "seed"),
    ({"codec": "eden", "seed": 2**64}, "seed"),
    ({"codec": "eden", "error_feedback": 1}, "error_feedback"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodecState(**kwargs)


def test_hook_rejects_a_state_that_is_not_a_codec_state():
    with pytest.raises(ValueError, match="CodecState"):
        codec_hook(None, None)


def test_state_by_spec_without_feedback_may_start_at_once():
    state = CodecState("eden:bits=1", error_feedback=False, start_iter=0)
    assert state.codec.name == "eden" and state.codec.bits == 1
    assert state.iter == 0 and state.residuals == {}
    with pytest.raises(AttributeError):
        state.other = 1  # __slots__


def test_state_pickles_without_its_process_group():
    state = CodecState(fq.get_codec("eden", bits=1), seed=9)
    state.residuals[0] = torch.ones(3)
    state.iter, state.bytes_sent = 4, 100
    back = pickle.loads(pickle.dumps(state))
    assert back.process_group is None and back.iter == 4 and back.bytes_sent == 100
    assert back.seed == 9 and back.codec.bits == 1 and torch.equal(back.residuals[0], torch.ones(3))


def test_seeds_differ_by_step_bucket_and_rank():
    seeds = {rank_seed(step_seed(SEED, step, index), rank)
             for step in range(4) for index in range(3) for rank in range(4)}
    shared = {step_seed(SEED, step, index) for step in range(4) for index in range(3)}
    assert len(seeds) == 48 and len(shared) == 12 and not seeds & shared
    assert step_seed(SEED, 1, 0) != step_seed(SEED + 1, 1, 0)
    assert all(0 <= s < 2**64 for s in seeds)


def test_codec_for_step_sets_only_a_round_seed():
    eden = fq.get_codec("eden", bits=2)
    assert codec_for_step(eden, 123) is eden
    quic = codec_for_step(fq.get_codec("quic-fl", bits=2), 123)
    assert quic.round_seed == 123 and quic.bits == 2
    assert math.isfinite(float(quic.encode(torch.randn(64), seed=1).nbytes))


# ---- the benchmark ---------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"codecs": ["eden:bits=0"]}, "bits"),
    ({"world_size": 1}, "world_size"),
    ({"start_iter": 1}, "start_iter"),
    ({"steps": 3}, "start_iter"),
    ({"powersgd_ranks": [0]}, "powersgd"),
    ({"repeats": 0}, "repeats"),
    ({"lr": 0.0}, "lr"),
])
def test_bench_rejects_bad_settings(change, match):
    with pytest.raises(ValueError, match=match):
        bench_ddp.validate({**bench_ddp.DEFAULTS, **change})


def test_bench_runs_every_method_and_counts_bytes(tmp_path):
    cfg = {**bench_ddp.DEFAULTS, "steps": 4, "codecs": ["eden:bits=1"], "powersgd_ranks": [1],
           "repeats": 1, "hidden": [32], "timeout_s": 120}
    rows = bench_ddp.write_outputs(bench_ddp.bench_ddp(cfg), cfg, tmp_path)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["none", "allreduce_hook", "powerSGD r=1", "eden:bits=1"]
    numel = rows[0]["numel"]
    assert by["none"]["wire_bytes"] == by["allreduce_hook"]["wire_bytes"] == 4 * numel
    assert by["allreduce_hook"]["grad_nmse"] < 1e-10
    assert 0 < by["eden:bits=1"]["payload_bytes"] <= by["eden:bits=1"]["wire_bytes"] < numel
    assert by["eden:bits=1"]["grad_nmse"] > 1e-3 and by["powerSGD r=1"]["grad_nmse"] > 1e-3
    assert all(r["replicas_equal"] and r["same_with_measurement"] for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {"rows.csv", "runs.json", "report.md"}
