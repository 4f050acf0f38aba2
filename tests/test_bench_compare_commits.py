"""bench.compare_commits: the before/after table from two commits' latency runs."""

import pytest

from bench import compare_commits


def row(target, full, rnp, mode="uniform"):
    return {"model": "vgg16", "batch_size": 1, "mode": mode, "target_speedup": target,
            "theoretical_speedup": target, "full_ms": full, "rnp_ms": rnp, "measured_speedup": full / rnp}


def test_medians_over_rounds_and_the_change():
    results = {
        "before": [{"rows": [row(3.0, 100.0, 50.0), row(5.0, 100.0, 40.0)]},
                   {"rows": [row(3.0, 110.0, 50.0), row(5.0, 100.0, 50.0)]}],
        "after": [{"rows": [row(3.0, 100.0, 40.0), row(5.0, 100.0, 40.0)]},
                  {"rows": [row(3.0, 100.0, 40.0)]}],
    }
    rows = compare_commits.compare(results, "before", "after")
    assert [r["target_speedup"] for r in rows] == [3.0, 5.0]
    three, five = rows
    assert three["before_measured_speedup"] == pytest.approx((2.0 + 2.2) / 2)
    assert three["after_measured_speedup"] == pytest.approx(2.5)
    assert three["speedup_change"] == pytest.approx(2.5 / 2.1 - 1, abs=1e-4)
    assert five["after_rounds"] == [2.5] and five["before_rounds"] == [2.5, 2.0]
    table = compare_commits.markdown(rows, {"date": "d", "command": "c", "before": "a", "after": "b", "rounds": 2,
                                            "machine": "m"})
    assert "| vgg16 | 1 | uniform | 3.00x | 105.0 / 100.0 | 50.0 / 40.0 |" in table


def test_points_missing_on_one_side_are_left_out():
    results = {"before": [{"rows": [row(3.0, 1.0, 1.0, "mixed")]}], "after": [{"rows": [row(3.0, 1.0, 1.0)]}]}
    assert compare_commits.compare(results, "before", "after") == []
