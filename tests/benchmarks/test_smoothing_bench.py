"""The smoothing benchmark compares filters that compute the same map."""

from scripts.benchmarks.smoothing_bench import bench_smoothing, main


def test_smoothing_bench_times_three_equal_filters(capsys) -> None:
    res = bench_smoothing(size=12, sigma=1.5, rounds=2)
    for name in ("monai_per_channel", "monai_two_channels", "banded"):
        assert res[name]["s"] > 0 and res[name]["ratio_to_banded"] > 0
        assert res[name]["max_abs_diff_to_monai"] < 1e-5
    main(["--size", "8", "--sigma", "1", "--rounds", "1"])
    assert "banded" in capsys.readouterr().out
