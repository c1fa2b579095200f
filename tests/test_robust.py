"""fedquant.robust: norm screening of clients' updates (reject or clip), absolute bound or a
multiple of the median, and the robust mean built on it."""

import math

import pytest
import torch

from fedquant.robust import NormPolicy, robust_mean, screen, update_norm


def _updates(n=7, d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {cid: torch.randn(d, generator=g) for cid in range(n)}


def test_update_norm_is_l2_and_infinite_for_nan_or_inf():
    x = torch.tensor([3.0, 4.0])
    assert update_norm(x) == pytest.approx(5.0)
    assert update_norm(torch.zeros(0)) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert update_norm(torch.tensor([1.0, bad])) == math.inf
    # float32 entries near the top of the range: the float64 norm stays finite
    assert math.isfinite(update_norm(torch.full((4,), 3e38)))
    with pytest.raises(ValueError, match="Tensor"):
        update_norm([1.0, 2.0])


def test_absolute_bound_rejects_only_the_big_update_and_names_it():
    updates = _updates()
    updates[3] = updates[3] * 1e30
    result = screen({k: update_norm(u) for k, u in updates.items()}, NormPolicy(max_norm=100.0))
    assert set(result.rejected) == {3}
    assert "exceeds the bound 100" in result.rejected[3] and "max_norm" in result.rejected[3]
    assert result.accepted == {k: 1.0 for k in updates if k != 3}


def test_median_multiple_adapts_to_the_scale_of_the_round():
    # the same relative outlier is caught at any overall scale, which no absolute bound does
    for scale in (1e-3, 1.0, 1e6):
        norms = {k: scale * (1.0 + 0.1 * k) for k in range(6)}
        norms[6] = scale * 50.0
        result = screen(norms, NormPolicy(median_multiple=3.0))
        assert set(result.rejected) == {6}, scale
        assert "3 x median norm" in result.rejected[6]


def test_min_count_gates_the_median_rule():
    policy = NormPolicy(median_multiple=2.0, min_count=3)
    assert policy.judge(100.0, [1.0]).accepted  # two norms: no median rule yet
    assert not policy.judge(100.0, [1.0, 1.0]).accepted


def test_non_finite_update_is_rejected_even_without_bounds():
    policy = NormPolicy()
    assert not policy.enabled
    verdict = policy.judge(math.inf)
    assert not verdict.accepted and "NaN or Inf" in verdict.reason
    assert policy.judge(1e30).accepted


def test_clip_scales_to_the_bound():
    policy = NormPolicy(max_norm=2.0, action="clip")
    verdict = policy.judge(8.0)
    assert verdict.accepted and verdict.clipped and verdict.factor == pytest.approx(0.25)
    assert "clipped to 2" in verdict.reason
    assert policy.judge(1.5).factor == 1.0


def test_robust_mean_equals_the_plain_mean_of_the_honest_updates():
    updates = _updates(n=9, d=64, seed=1)
    honest = dict(updates)
    updates[100] = torch.full((64,), 1e30)
    updates[101] = torch.full((64,), float("nan"))
    weights = {k: float(k % 3 + 1) for k in updates}
    mean, result = robust_mean(updates, NormPolicy(median_multiple=5.0), weights)
    assert set(result.rejected) == {100, 101}
    expected = sum(weights[k] * honest[k].double() for k in honest) / sum(
        weights[k] for k in honest)
    assert torch.allclose(mean.double(), expected, atol=1e-6)
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all()


def test_robust_mean_clip_bounds_the_shift_any_one_client_causes():
    updates = _updates(n=5, d=32, seed=2)
    updates[9] = torch.full((32,), 1e30)
    bound = 10.0
    mean, result = robust_mean(updates, NormPolicy(max_norm=bound, action="clip"))
    assert 9 in result.clipped and 9 in result.accepted
    without = sum(u.double() for k, u in updates.items() if k != 9) / 6
    # client 9 moves the mean by at most bound / n
    assert float(torch.linalg.vector_norm(mean.double() - without)) <= bound / 6 + 1e-6


def test_robust_mean_all_rejected_gives_none():
    mean, result = robust_mean({1: torch.full((3,), float("inf"))}, NormPolicy())
    assert mean is None and set(result.rejected) == {1}


@pytest.mark.parametrize("kwargs, match", [
    ({"max_norm": 0.0}, "max_norm"), ({"max_norm": float("nan")}, "max_norm"),
    ({"median_multiple": -1.0}, "median_multiple"), ({"action": "drop"}, "action"),
    ({"min_count": 0}, "min_count"),
])
def test_bad_policy_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormPolicy(**kwargs)


def test_from_dict_rejects_unknown_keys():
    assert NormPolicy.from_dict({"max_norm": 3.0}).max_norm == 3.0
    with pytest.raises(ValueError, match="median_mutliple.*allowed"):
        NormPolicy.from_dict({"median_mutliple": 3.0})


def test_robust_mean_follows_the_device_and_rejects_bad_weights():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    updates = {k: u.to(device) for k, u in _updates(n=4, d=8).items()}
    mean, _ = robust_mean(updates, NormPolicy(max_norm=100.0))
    assert mean.device.type == device
    with pytest.raises(ValueError, match="weight"):
        robust_mean(updates, NormPolicy(), {k: float("inf") for k in updates})
    with pytest.raises(ValueError, match="exactly"):
        robust_mean(updates, NormPolicy(), {0: 1.0})
