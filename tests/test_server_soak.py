"""A small run of the soak benchmark (simulations/soak.py): every honest client is
acknowledged and served the mean, every hostile one refused, and the mean is exactly the
local fq.decode_mean of the honest payloads."""

from fedquant.simulations import soak


def test_small_soak_run():
    row = soak.run(clients=42, waves=3, bad_fraction=1 / 6, dim=1024, log=lambda _: None)
    assert row["misbehaving"] == 7  # one of each kind
    assert row["acked_honest"] == 35 and row["acked_misbehaving"] == 0
    assert row["rejected_pushes"] == 7 and row["mean_waiters_served"] == 35
    kinds = {k.split(":")[0] for k in row["rejected_by_kind"]}
    assert kinds == set(soak.BAD_KINDS)
    assert row["max_abs_error_vs_decode_mean"] < 1e-6
    assert row["server_peak_rss_mib"] >= row["server_idle_rss_mib"] > 0
