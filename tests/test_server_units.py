"""In-process checks of the server's parts: round configs, rounds files, tokens files, the
durable store and its replay, the refusal to serve plaintext unasked, and a quick bench."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedquant as fq
from fedquant.server.aggregator import ServerConfig, start_server
from fedquant.server.cli import load_rounds
from fedquant.server.rounds import AggregationError, RoundBook, RoundConfig, payload_digest
from fedquant.server.security import load_tokens
from fedquant.server.store import Store
from fedquant.simulations.bench_server import BenchConfig, run


def test_round_config_validation_names_the_problem():
    cfg = RoundConfig.from_dict({"id": "r1", "codec": "eden", "params": {"bits": 3},
                                 "shape": [2, 5], "cohort": [4, 2, 4]})
    assert cfg.params == fq.get_codec("eden", bits=3).wire_params()
    assert cfg.cohort == (2, 4) and cfg.quorum == 2 and cfg.numel == 10
    bad = [({"id": "r", "codec": "eden", "shape": [4], "colour": 1}, "colour"),
           ({"codec": "eden", "shape": [4]}, "'id'"),
           ({"id": "r", "codec": "nope", "shape": [4]}, "unknown codec"),
           ({"id": "r", "codec": "eden", "params": {"bitz": 2}, "shape": [4]}, "bitz"),
           ({"id": "r", "codec": "eden", "shape": [0]}, "shape"),
           ({"id": "a b", "codec": "eden", "shape": [4]}, "round id"),
           ({"id": "r", "codec": "eden", "shape": [4], "cohort": [1], "quorum": 2}, "quorum"),
           ({"id": "r", "codec": "eden", "shape": [4], "round_seed": -1}, "round_seed")]
    for spec, word in bad:
        with pytest.raises(ValueError, match=word):
            RoundConfig.from_dict(spec)


def test_rounds_file(tmp_path):
    path = tmp_path / "rounds.toml"
    path.write_text('[[round]]\nid = "a"\ncodec = "eden"\nshape = [8]\nexpected = 3\n'
                    '[[round]]\nid = "b"\ncodec = "fp16"\nshape = [2, 2]\ndeadline_s = 5\n')
    a, b = load_rounds(path)
    assert (a.round_id, a.quorum, b.codec, b.shape) == ("a", 3, "fp16", (2, 2))
    assert b.deadline_unix > b.opened_unix
    path.write_text('[[round]]\nid = "a"\ncodec = "eden"\nshape = [8]\nqorum = 3\n')
    with pytest.raises(ValueError, match=r"round\[0\].*qorum.*allowed"):
        load_rounds(path)
    path.write_text('[[rounds]]\nid = "a"\n')
    with pytest.raises(ValueError, match="rounds"):
        load_rounds(path)


def test_tokens_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"operator": "op-secret-1", "7": "client-7-secret"}))
    assert load_tokens(path) == {"op-secret-1": "operator", "client-7-secret": "7"}
    for data, word in (({"seven": "client-7-secret"}, "seven"), ({"7": "short"}, "8 char"),
                       ({"1": "same-token-x", "2": "same-token-x"}, "share"), ([1], "object")):
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=word):
            load_tokens(path)


def test_plaintext_only_when_asked(tmp_path):
    with pytest.raises(ValueError, match="--insecure"):
        start_server(ServerConfig(data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="mutual TLS"):
        start_server(ServerConfig(data_dir=str(tmp_path), insecure=True,
                                  tls_client_ca="ca.pem"))


def test_store_replay_rebuilds_the_running_sum_and_refuses_duplicates(tmp_path):
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("r", "eden", {"bits": 2}, 5, [300], expected_count=3))
    encs = []
    for client, weight in ((3, 1.0), (8, 2.5)):
        enc = fq.get_codec("eden", bits=2).encode(torch.randn(300),
                                                 seed=fq.random.derive_seed(5, client))
        blob = enc.to_bytes()
        book.check_payload(rnd, client, enc)
        book.accept(rnd, client, weight, blob, payload_digest(blob),
                    book.decode(rnd, enc, weight), 0.0)
        encs.append(enc)
    with pytest.raises(AggregationError) as err:
        book.check_push(rnd, 3)
    assert err.value.status == "ALREADY_EXISTS"
    with pytest.raises(sqlite3.IntegrityError):  # the log itself refuses a second record
        book.store.record_push("r", 3, 1.0, "digest", b"x", 9)
    bad_seed = fq.get_codec("eden", bits=2).encode(torch.randn(300), seed=1)
    with pytest.raises(AggregationError, match="seed"):
        book.check_payload(rnd, 4, bad_seed)
    book.store.close()

    replayed = RoundBook(Store(tmp_path))  # as after a crash: sums rebuilt from the log
    again = replayed.get("r")
    assert again.state == "open" and sorted(again.pushes) == [3, 8]
    torch.testing.assert_close(again.running_sum, rnd.running_sum, rtol=0, atol=0)
    replayed.close(again, "operator")
    mean = replayed.mean(again)
    torch.testing.assert_close(mean, fq.decode_mean(encs, [1.0, 2.5]))
    replayed.store.close()
    final = RoundBook(Store(tmp_path))  # a closed round keeps its stored mean
    closed = final.get("r")
    assert closed.state == "closed" and closed.close_reason == "operator"
    assert closed.running_sum is None
    assert closed.bytes_received == sum(e.nbytes for e in encs)
    torch.testing.assert_close(final.mean(closed), mean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="in use"):  # one server per data directory
        Store(tmp_path)
    final.store.close()


def test_running_sum_is_decode_means_own_sum(tmp_path):
    """The server adds pushes as fq.decode_mean does (fedquant.mean.accumulate): its float64
    running sum is bitwise the library's weighted sum of the same payloads."""
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("s", "eden", {"bits": 2}, 5, [5000], expected_count=9))
    codec = fq.get_codec("eden", bits=2)
    weights = [1.0, 2.5, 0.3]
    encs = [codec.encode(torch.randn(5000), seed=fq.random.derive_seed(5, c))
            for c in range(3)]
    for c, (enc, weight) in enumerate(zip(encs, weights, strict=True)):
        blob = enc.to_bytes()
        book.accept(rnd, c, weight, blob, payload_digest(blob), book.decode(rnd, enc, weight),
                    0.0)
    expected = fq.mean.decoded_sum(codec, encs, weights, workers=1)
    torch.testing.assert_close(rnd.running_sum, expected, rtol=0, atol=0)
    book.store.close()


def test_bench_config_and_quick_run(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("[bench]\nclients = 4\nclientz = 3\n")
    with pytest.raises(ValueError, match="clientz"):
        BenchConfig.load(path)
    cfg = BenchConfig(clients=3, small_clients=3, dim=4096, out=str(tmp_path / "out"))
    (row,) = run(cfg)
    assert row["clients"] == 3 and row["server_updates_per_s"] > 0
    assert row["max_abs_error_vs_decode_mean"] < 1e-4  # the server's mean is decode_mean's
    assert row["server_peak_rss_mib"] > 0 and row["codec_decode_updates_per_s"] > 0
    for name in ("bench_server.csv", "bench_server.json", "bench_server.png", "report.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_shared_rotation_rounds_sum_in_the_rotated_domain(tmp_path):
    """QUIC-FL with a round_seed: one rotated-domain sum, one inverse rotation at close, and
    the same mean as fq.decode_mean (also after a replay of the log)."""
    params = {"bits": 2, "round_seed": 77}
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("q", "quic-fl", params, 5, [1000], expected_count=4))
    codec = fq.get_codec("quic-fl", **params)
    encs = [codec.encode(torch.randn(1000), seed=fq.random.derive_seed(5, c)) for c in range(4)]
    weights = [1.0, 2.0, 0.5, 3.0]
    for c in range(3):
        book.accept(rnd, c, weights[c], encs[c].to_bytes(), payload_digest(encs[c].to_bytes()),
                    book.decode(rnd, encs[c], weights[c]), 0.0)
    assert rnd.running_sum is None and list(rnd.rotated_sums) == [(77, encs[0].rotations)]
    book.store.close()
    replayed = RoundBook(Store(tmp_path))
    again = replayed.get("q")
    torch.testing.assert_close(again.rotated_sums, rnd.rotated_sums, rtol=0, atol=0)
    replayed.accept(again, 3, weights[3], encs[3].to_bytes(),
                    payload_digest(encs[3].to_bytes()),
                    replayed.decode(again, encs[3], weights[3]), 0.0)  # quorum: closes
    assert again.state == "closed" and not again.rotated_sums
    torch.testing.assert_close(replayed.mean(again), fq.decode_mean(encs, weights),
                               rtol=1e-5, atol=1e-6)


_TOML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "codec", "params", "round_seed", "shape",
                                        "cohort", "expected", "quorum", "deadline_s", "x"]),
                       _TOML_VALUES | st.just("eden") | st.just([4]), max_size=9))
def test_fuzz_round_specs_raise_only_value_error(spec):
    try:
        cfg = RoundConfig.from_dict(spec)
    except ValueError:
        return
    assert cfg.numel >= 1 and cfg.round_id == spec["id"]


@settings(max_examples=100, deadline=None)
@given(_TOML_VALUES)
def test_fuzz_tokens_files_raise_only_value_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("tok") / "tokens.json"
    path.write_text(json.dumps(data))
    try:
        tokens = load_tokens(path)
    except ValueError:
        return
    assert all(len(t) >= 8 for t in tokens)


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_group_commit_logs_queued_pushes_in_one_transaction(tmp_path):
    """Pushes that queue while the writer is busy share one COMMIT; a duplicate among them
    fails alone and the others are durable."""
    store = Store(tmp_path)
    store.add_round("r", {})
    store.record_push("r", 0, 1.0, "d0", b"first", 0)
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    errors = {}

    def push(client):
        try:
            store.record_push("r", client, 1.0, f"d{client}", b"x" * 1000, client)
        except sqlite3.IntegrityError as e:
            errors[client] = e

    with store._lock:  # the writer is busy: the next pushes queue up behind it
        threads = [threading.Thread(target=push, args=(c,)) for c in (0, 1, 2, 3, 4)]
        for t in threads:
            t.start()
        _wait_until(lambda: len(store._queue) == 5)
    for t in threads:
        t.join()
    assert list(errors) == [0] and len(commits) == 1  # client 0 had pushed already
    store.close()
    logged = list(Store(tmp_path).pushes("r"))
    assert sorted(p.client_id for p in logged) == [0, 1, 2, 3, 4]
    assert next(p.payload for p in logged if p.client_id == 0) == b"first"


def test_a_close_waits_for_pushes_being_logged(tmp_path):
    """While a push is being logged (the round lock released), its retry is told to come
    back (UNAVAILABLE) and an operator close waits: no push is logged without being in the
    mean, and none is counted twice."""
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("r", "eden", {"bits": 2}, 5, [512], expected_count=3))
    codec = rnd.codec
    encs = [codec.encode(torch.randn(512), seed=fq.random.derive_seed(5, c)) for c in range(2)]
    book.accept(rnd, 0, 1.0, encs[0].to_bytes(), payload_digest(encs[0].to_bytes()),
                book.decode(rnd, encs[0], 1.0), 0.0)
    with book.store._lock:  # hold the log's writer: client 1's push stays pending
        pusher = threading.Thread(target=book.accept, args=(
            rnd, 1, 2.0, encs[1].to_bytes(), payload_digest(encs[1].to_bytes()),
            book.decode(rnd, encs[1], 2.0), 0.0))
        pusher.start()
        _wait_until(lambda: 1 in rnd.pending)
        with pytest.raises(AggregationError) as retry:
            book.check_push(rnd, 1)
        assert retry.value.status == "UNAVAILABLE"
        closer = threading.Thread(target=book.close, args=(rnd, "operator"))
        closer.start()
        _wait_until(lambda: rnd.closing)
        with pytest.raises(AggregationError, match="closing"):
            book.check_push(rnd, 2)
        assert rnd.state == "open"
    pusher.join()
    closer.join()
    assert rnd.state == "closed" and sorted(rnd.pushes) == [0, 1]
    torch.testing.assert_close(book.mean(rnd), fq.decode_mean(encs, [1.0, 2.0]),
                               rtol=1e-5, atol=1e-6)


def test_closed_means_live_in_files_and_old_logs_still_read(tmp_path):
    store = Store(tmp_path)
    for round_id in ("new", "old", "empty"):
        store.add_round(round_id, {})
    mean = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    store.close_round("new", "quorum", mean)
    store.close_round("empty", "deadline", None)
    store._write("UPDATE rounds SET state = 'closed', mean = ? WHERE round_id = 'old'",
                 (mean[::-1],))  # a log written before means moved to files
    assert (tmp_path / "means" / "new.f32").read_bytes() == mean
    assert not list((tmp_path / "means").glob("*.tmp"))
    store.close()
    store = Store(tmp_path)
    assert store.mean("new") == mean and store.mean("old") == mean[::-1]
    assert store.mean("empty") is None and store.mean("missing") is None
    store.close()


def test_a_round_logged_up_to_its_quorum_closes_on_replay(tmp_path):
    """A crash between logging the quorum's last push and the close: the restart closes
    the round (with every logged push) instead of leaving it open for good."""
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("r", "eden", {"bits": 2}, 5, [300], expected_count=2))
    encs = [rnd.codec.encode(torch.randn(300), seed=fq.random.derive_seed(5, c))
            for c in range(2)]
    book.accept(rnd, 0, 1.0, encs[0].to_bytes(), payload_digest(encs[0].to_bytes()),
                book.decode(rnd, encs[0], 1.0), 0.0)
    book.store.record_push("r", 1, 3.0, payload_digest(encs[1].to_bytes()), encs[1].to_bytes(),
                           1)  # then kill -9
    book.store.close()
    replayed = RoundBook(Store(tmp_path))
    again = replayed.get("r")
    assert again.state == "closed" and again.close_reason == "quorum" and again.closed.is_set()
    torch.testing.assert_close(replayed.mean(again), fq.decode_mean(encs, [1.0, 3.0]),
                               rtol=1e-5, atol=1e-6)
    replayed.store.close()


def test_the_quorum_push_can_leave_the_close_to_its_caller(tmp_path):
    """close_on_quorum=False (the servicer acknowledges first, then closes): the round is
    closing, takes no more pushes, and closes with the quorum's mean."""
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("r", "eden", {"bits": 2}, 5, [300], expected_count=1))
    enc = rnd.codec.encode(torch.randn(300), seed=fq.random.derive_seed(5, 0))
    assert book.accept(rnd, 0, 1.0, enc.to_bytes(), payload_digest(enc.to_bytes()),
                       book.decode(rnd, enc, 1.0), 0.0,
                       close_on_quorum=False) == (1, "closing")
    with pytest.raises(AggregationError, match="closing") as late:
        book.check_push(rnd, 1)
    assert late.value.status == "FAILED_PRECONDITION" and not rnd.closed.is_set()
    book.close(rnd, "quorum")
    assert rnd.state == "closed" and rnd.close_reason == "quorum" and rnd.closed.is_set()
    torch.testing.assert_close(book.mean(rnd), fq.decode(enc), rtol=1e-6, atol=1e-6)
    book.store.close()


def _eden_push(book, rnd, client, x, weight=1.0):
    enc = rnd.codec.encode(x, seed=fq.random.derive_seed(rnd.config.round_seed, client))
    blob = enc.to_bytes()
    book.check_payload(rnd, client, enc)
    book.accept(rnd, client, weight, blob, payload_digest(blob),
                book.decode(rnd, enc, weight), 0.0)
    return enc


def test_clipping_first_outlier_is_judged_again_at_close_and_replayed_the_same(tmp_path):
    """With clipping by 3 x the median norm, an outlier pushed first (no median yet) is
    accepted whole at push time and clipped at close; the mean equals the robust mean of the
    decoded updates, also after a restart that replays the logged factors."""
    from fedquant.robust import NormPolicy, robust_mean
    policy = NormPolicy(median_multiple=3.0, action="clip")
    book = RoundBook(Store(tmp_path), policy=policy)
    rnd = book.open(RoundConfig.build("c", "eden", {"bits": 4}, 9, [256], expected_count=4))
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(256, generator=gen) * 100, *(torch.randn(256, generator=gen)
                                                   for _ in range(3))]
    encs = [_eden_push(book, rnd, c, x) for c, x in enumerate(xs[:3])]
    assert rnd.factors[0] == 1.0  # accepted whole: no median with one norm
    book.store.close()
    replayed = RoundBook(Store(tmp_path), policy=policy)  # crash before the close
    again = replayed.get("c")
    encs.append(_eden_push(replayed, again, 3, xs[3]))  # quorum: closes, final screening
    assert again.state == "closed" and 0 < again.factors[0] < 1
    decoded = {c: fq.decode(e) for c, e in enumerate(encs)}
    expected, result = robust_mean(decoded, policy)
    assert set(result.clipped) == {0}
    torch.testing.assert_close(replayed.mean(again), expected, rtol=1e-5, atol=1e-5)
    factors = {p.client_id: p.factor for p in replayed.store.pushes("c", with_payload=False)}
    assert 0 < factors[0] < 1 and factors[1] == 1.0


def test_rejected_at_close_is_recorded_and_left_out_of_the_weight(tmp_path):
    from fedquant.robust import NormPolicy
    book = RoundBook(Store(tmp_path), policy=NormPolicy(median_multiple=3.0))
    rnd = book.open(RoundConfig.build("r", "eden", {"bits": 2}, 4, [128], expected_count=4))
    gen = torch.Generator().manual_seed(5)
    encs = [_eden_push(book, rnd, c, torch.randn(128, generator=gen) * (1e6 if c == 0 else 1),
                       weight=1.0 + c) for c in range(4)]
    assert rnd.state == "closed" and 0 in rnd.rejected and "judged at close" in rnd.rejected[0]
    assert book.store.rejections("r") == rnd.rejected
    mean = book.mean(rnd)
    torch.testing.assert_close(mean, fq.decode_mean(encs[1:], [2.0, 3.0, 4.0]),
                               rtol=1e-5, atol=1e-6)
    assert book.get("r").total_weight == 10.0  # the closed round's record, from the log


def test_weights_and_round_bounds_are_refused():
    for kwargs, word in (({"deadline_s": 1e300}, "deadline_s"),
                         ({"cohort": list(range(10_001))}, "cohort"),
                         ({"expected_count": 10**6}, "expected")):
        with pytest.raises(ValueError, match=word):
            RoundConfig.build("b", "eden", {}, 0, [4], **kwargs)


def test_closed_rounds_leave_memory(tmp_path):
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("m", "eden", {"bits": 2}, 1, [64], expected_count=1))
    _eden_push(book, rnd, 0, torch.randn(64))
    assert rnd.state == "closed" and "m" not in book.round_ids()
    again = book.get("m")  # read back from the log
    assert again is not rnd and again.state == "closed" and list(again.pushes) == [0]
    book.store.close()


def test_replay_quarantines_bad_rows_and_starts(tmp_path):
    """A row with a corrupt client id, one whose payload does not match its digest and one
    of another round are each moved to quarantine with the reason; the rest replays."""
    book = RoundBook(Store(tmp_path))
    rnd = book.open(RoundConfig.build("q", "eden", {"bits": 2}, 1, [64], expected_count=9))
    other = book.open(RoundConfig.build("o", "eden", {"bits": 2}, 2, [64], expected_count=9))
    good = _eden_push(book, rnd, 1, torch.randn(64))
    _eden_push(book, rnd, 2, torch.randn(64))
    foreign = _eden_push(book, other, 3, torch.randn(64)).to_bytes()
    db = book.store._db
    db.execute("UPDATE pushes SET client_id = 'x7' WHERE round_id = 'q' AND client_id = '2'")
    book.store.record_push("q", 4, 1.0, "0" * 64, good.to_bytes(), 7)  # digest mismatch
    book.store.record_push("q", 3, 1.0, payload_digest(foreign), foreign, 8)  # other round
    book.store.close()
    replayed = RoundBook(Store(tmp_path))
    assert list(replayed.get("q").pushes) == [1]
    reasons = {c: r for _, c, r in replayed.store.quarantined()}
    assert set(reasons) == {"x7", "4", "3"}
    assert "sha256" in reasons["4"] and "seed" in reasons["3"]
    assert len(replayed.problems) == 3 and all("round 'q'" in p for p in replayed.problems)
    replayed.store.close()
    store = Store(tmp_path)
    store._db.execute("UPDATE rounds SET config = '{broken' WHERE round_id = 'o'")
    again = RoundBook(store)
    assert again.problems == ["round 'o': the round's config is invalid: not valid JSON"]
    again.store.close()
    last = RoundBook(Store(tmp_path))
    assert not last.problems  # quarantined once, not at every start
    with pytest.raises(AggregationError, match="does not exist"):
        last.get("o")
    last.store.close()
