"""The benchmark's baseline: the same job with encryption switched off, over the real broker."""

from deltaml.marketplace import DemoConfig, run_plain


def test_plain_job_over_rabbitmq_trains_what_centralised_gd_trains():
    report = run_plain(DemoConfig(rounds=6, eval_every=3))
    rel = abs(report["final_mse"] - report["centralized_gd_mse"]) / report["centralized_gd_mse"]
    assert rel < 1e-6
    assert [r for r, _ in report["mse_history"]] == [0, 3, 6]
    assert report["job_seconds"] < report["wall_seconds"]
