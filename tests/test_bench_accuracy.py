"""bench.accuracy: its pieces on hand-made cases, and a tiny real run."""

import json
import os
import subprocess
import sys

import numpy as np

import rnp_tf
from bench import accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_oracle_picks_the_cheapest_qualifying_mix():
    fractions = np.array([1.0, 0.2, 0.5])
    ok = np.array([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], bool)  # [mixes, images]
    np.testing.assert_array_equal(accuracy.oracle_choice(ok, fractions, fallback=0), [2, 1, 0, 0])


def test_shuffle_preserves_compute_exactly():
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10)
    actions = np.random.default_rng(0).integers(1, 5, size=(200, 3))
    shuffled = accuracy.shuffle_actions(actions, seed=1)
    assert not np.array_equal(shuffled, actions)
    assert float(model.macs(shuffled).numpy().sum()) == float(model.macs(actions).numpy().sum())


def test_static_pruning_at_width_j_computes_j_groups():
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10)
    for j in range(1, 5):
        fraction = float(model.compute_fraction(np.full((1, 3), j))[0])
        convs = sum(c.macs(None if c is model.prunable[0] else j, j) for c in model.prunable)
        head = j * 4 * 10
        expected = (model.stem.full_macs + convs + head) / model.full_macs
        assert abs(fraction - expected) < 1e-6


def test_pareto_front():
    assert accuracy._pareto(np.array([0.5, 0.2, 1.0, 0.3]), np.array([0.7, 0.6, 0.9, 0.5])) == [1, 0, 2]


def test_quick_run_writes_the_documented_json(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.accuracy", "--quick", f"--output={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "accuracy_quick.json").read_text())
    run = data["runs"][0]
    for key in ("full_accuracy", "static_curve", "rnp", "oracle", "cascade", "static_finetuned", "thin", "seconds"):
        assert key in run
    assert len(run["rnp"]) == 2
    for point in run["rnp"]:
        for key in ("accuracy", "compute_fraction", "shuffled_accuracy", "static_at_same_compute",
                    "spearman_compute_vs_full_loss", "compute_per_class"):
            assert key in point
        assert 0 < point["compute_fraction"] <= 1
    assert {o["kind"] for o in run["oracle"]} == {"oracle", "soft_oracle"}
    assert (tmp_path / "accuracy_quick.png").stat().st_size > 1000
    assert "| dataset" in (tmp_path / "accuracy_quick.md").read_text()
