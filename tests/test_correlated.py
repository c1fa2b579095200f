"""correlated: ECDQ with a dither stratified across the round's clients (Suresh et al.,
ICML 2022). Clients share the round seed and carry their own index."""

import pytest
import torch

import fedquant as fq
from fedquant.codecs.correlated import stratum

N, D = 32, 1 << 14


def _clients(spread: float, n: int = N, d: int = D, seed: int = 0) -> list[torch.Tensor]:
    """n vectors: a common one plus `spread` times its norm of independent noise each
    (spread = None: independent vectors)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    if spread is None:
        return [torch.randn(d, generator=g) for _ in range(n)]
    return [base + spread * torch.randn(d, generator=g) for _ in range(n)]


def _round(xs, make, round_seed, shared_seed, keep=None):
    """(NMSE of decode_mean against the true mean of the kept clients, bits per coord)."""
    keep = range(len(xs)) if keep is None else keep
    encs, size = [], 0
    for i in keep:
        seed = round_seed if shared_seed else fq.random.derive_seed(round_seed, i)
        blob = make(i).encode(xs[i], seed=seed).to_bytes()
        size += len(blob)
        encs.append(fq.Encoded.from_bytes(blob))
    mean = torch.stack([xs[i] for i in keep]).mean(0)
    est = fq.decode_mean(encs)
    err = float(((est - mean) ** 2).sum() / (mean**2).sum())
    return err, 8 * size / (len(encs) * xs[0].numel()), est - mean


def _correlated(n=N):
    return lambda i: fq.get_codec("correlated", bits=1.0, clients=n, client=i)


def _ecdq(i):
    return fq.get_codec("ecdq", bits=1.0)


def _eden(i):
    return fq.get_codec("eden", bits=1)


def _nmse(xs, make, shared, trials=2, keep=None):
    runs = [_round(xs, make, 1000 + t, shared, keep) for t in range(trials)]
    return sum(r[0] for r in runs) / trials, sum(r[1] for r in runs) / trials


def test_similar_clients_mean_error_at_least_2x_below_the_best_independent_codec():
    xs = _clients(0.1)  # within 10% of their mean
    cq, cq_bits = _nmse(xs, _correlated(), shared=True)
    best = min(_nmse(xs, _ecdq, shared=False)[0], _nmse(xs, _eden, shared=False)[0])
    assert cq_bits <= 1.0
    assert cq <= best / 2, (cq, best)


def test_dissimilar_clients_no_worse_than_independent_dithers():
    xs = _clients(None)
    cq, _ = _nmse(xs, _correlated(), shared=True, trials=3)
    ind, _ = _nmse(xs, _ecdq, shared=False, trials=3)
    assert cq <= 1.15 * ind, (cq, ind)
    # and far below independent stochastic rounding at the same rate (1 bit, min-max grid)
    sr, _ = _nmse(xs, lambda i: fq.get_codec("stochastic", bits=1), shared=False, trials=1)
    assert cq < sr / 10


def test_each_client_is_an_unbiased_ecdq_estimate():
    # one client, many round seeds: the average decode converges to x
    x, k = _clients(0.1, n=1, d=1 << 12)[0], 48
    codec = fq.get_codec("correlated", bits=2.0, clients=8, client=5)
    decs = [fq.decode(codec.encode(x, seed=s)) for s in range(k)]
    v = sum(fq.vnmse(x, y) for y in decs) / k
    step = codec.encode(x, seed=0).scales[0]
    assert v == pytest.approx(step**2 / 12, rel=0.1)  # the ECDQ error of its step
    assert fq.vnmse(x, torch.stack(decs).mean(0)) < 2.0 * v / k


def test_dropout_leaves_the_mean_of_the_survivors_unbiased():
    # 8 of 32 clients never report: the 24 survivors' mean stays unbiased (averaged over
    # rounds the error shrinks like 1 / rounds) and still beats independent dithers
    xs = _clients(0.1, d=1 << 12)
    keep = [i for i in range(N) if i % 4 != 1]
    rounds = [_round(xs, _correlated(), 5000 + t, True, keep) for t in range(12)]
    per_round = sum(r[0] for r in rounds) / len(rounds)
    avg_err = torch.stack([r[2] for r in rounds]).mean(0)
    mean = torch.stack([xs[i] for i in keep]).mean(0)
    assert float((avg_err**2).sum() / (mean**2).sum()) < 2.5 * per_round / len(rounds)
    ind, _ = _nmse(xs, _ecdq, shared=False, trials=3, keep=keep)
    assert per_round < ind


def test_stratum_is_a_permutation_per_coordinate_with_uniform_places():
    n, coords = 12, 12000
    places = torch.stack([stratum(77, n, i, coords) for i in range(n)])  # (clients, coords)
    # the n places of a coordinate are distinct: the dithers are stratified
    assert torch.equal(places.sort(0).values, torch.arange(n).unsqueeze(1).expand(n, coords))
    # every client's place is uniform over 0..n-1 (each client unbiased): counts near 1000
    for i in (0, 5, 11):
        counts = torch.bincount(places[i], minlength=n).double()
        assert float(((counts - coords / n) ** 2 / (coords / n)).sum()) < 40  # chi2, 11 dof
    # and the pairing of clients varies across coordinates (not one fixed assignment)
    assert len(set(((places[1] - places[0]) % n).tolist())) >= 4


def test_payloads_of_a_round_share_params_and_carry_the_index():
    xs = _clients(0.1, n=4, d=1 << 12)
    encs = [_correlated(4)(i).encode(x, seed=9) for i, x in enumerate(xs)]
    assert all(e.params == encs[0].params for e in encs)
    assert [int(e.section("client").raw("int")[0]) for e in encs] == [0, 1, 2, 3]
    # a payload claiming another client's index decodes with the wrong dither: refused if
    # out of range, and in range it is a different estimate
    enc = encs[2]
    enc.sections["client"] = fq.Section.from_raw("client", torch.tensor([7], dtype=torch.int32))
    with pytest.raises(fq.WireError, match="client"):
        fq.Encoded.from_bytes(enc.to_bytes())
    enc.sections.pop("client")
    with pytest.raises(fq.WireError, match="client"):
        fq.Encoded.from_bytes(enc.to_bytes())


@pytest.mark.parametrize("params", [{"clients": 0}, {"clients": 4, "client": 4},
                                    {"clients": 4, "client": -1}, {"clients": 2**17}])
def test_bad_client_parameters_raise_value_error(params):
    with pytest.raises(ValueError, match="client"):
        fq.get_codec("correlated", **params)
