"""bench.anytime: the budget selection, the targets, and a tiny real run."""

import json

import pytest

from bench import anytime


def test_budget_selection_reads_validation_and_reports_test():
    val = [(0.1, 0.5, "a"), (0.2, 0.6, "b"), (0.2, 0.7, "c"), (0.4, 0.8, "d")]
    test = [(0.11, 0.4), (0.21, 0.5), (0.22, 0.55), (0.39, 0.9)]
    rows = anytime._curve_at_budgets(val, test, [0.2, 0.35])
    assert [r["setting"] for r in rows] == ["c", "d"]  # nearest compute, best validation accuracy on a tie
    assert [r["compute_fraction"] for r in rows] == [0.22, 0.39]


def _run(seed, accuracy, shuffled, dense):
    row = {"budget": 0.2, "compute_fraction": 0.2, "accuracy": accuracy, "shuffled": shuffled,
           "nested_static": 0.5, "dense_static_curve": 0.5, "dense_static_finetuned": None, "dense_paper": None}
    return {"dataset": "d", "variant": "nested", "seed": seed, "widths": [4], "width_fractions": [0.1, 0.3],
            "static": [(0.1, 0.4), (0.3, 0.6)], "threshold": [row], "dqn": [dict(row, accuracy=shuffled)],
            "reference": {}}


def _dense(seed, accuracy):
    return {"dataset": "d", "variant": "dense", "seed": seed, "widths": [4], "static_curve": [(0.1, accuracy),
            (0.3, accuracy)], "uniform": [(0.1, accuracy)]}


def test_targets_are_judged_on_the_mean_over_seeds():
    runs = [_run(0, 0.70, 0.66, 0.68), _run(1, 0.70, 0.69, 0.70), _dense(0, 0.68), _dense(1, 0.70)]
    lines = anytime.targets(runs)  # gaps to shuffled +4 and +1: mean +2.5; to the same-recipe dense +2 and 0
    assert "threshold: beats its shuffled control by >= 2 points at every budget: met (+2.5)" in lines[0]
    assert "(2 seeds with the same-recipe run): +1.0; >= +1 point somewhere: met; never below -0.5: met" in lines[1]
    # a seed without its same-recipe dense run is not judged against the other (weaker-recipe) curves
    assert "(1 seeds with the same-recipe run): +2.0;" in anytime.targets(runs[:3])[1]
    assert "dqn: beats its shuffled control by >= 2 points at every budget: missed (+0.0)" in lines[2]
    assert "| 0.20 | 0.200 | 70.0 | +2.5 ± 1.5 (2) |" in anytime.summarise(runs)


@pytest.mark.slow
def test_quick_run_writes_the_report(tmp_path, run_module):
    result = run_module("bench.anytime", "--quick", f"--output={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "anytime_quick.json").read_text())
    run = data["runs"][0]
    assert len(run["static"]) == 4 and len(run["threshold"]) == len(data["flags"]["budgets"])
    for row in run["threshold"] + run["dqn"]:
        assert 0 < row["compute_fraction"] <= run["width_fractions"][-1] + 1e-9
        assert abs(sum(row["exit_shares"]) - 1) < 1e-9
    assert (tmp_path / "anytime_quick.png").stat().st_size > 1000
    assert "Targets" in (tmp_path / "anytime_quick.md").read_text()
