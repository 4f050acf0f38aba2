"""rnp_tf.callbacks.BestKnobWeights on a small model trained on real data (scikit-learn's digits)."""

import keras
import numpy as np
import pytest

import rnp_tf


def _arrays(split):
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in split])
    return np.concatenate(xs), np.concatenate(ys)


def _mean_accuracy(model, x, y, budgets):
    model.calibrate_budget(x)
    accuracies = []
    for budget in budgets:
        model.set_budget(budget, x)
        accuracies.append(np.mean(model.predict_details(x)["logits"].argmax(-1) == y))
    return float(np.mean(accuracies))


@pytest.mark.slow
def test_best_knob_weights_restores_the_best_epoch_and_leaves_the_knob_alone(tmp_path):
    keras.utils.set_random_seed(3)
    data = rnp_tf.load_dataset("digits", batch_size=64, validation_split=0.2)
    x, y = _arrays(data.validation)
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 16, 16, 16)), image_shape=data.input_shape, num_classes=10,
        schedule=rnp_tf.Schedule(robust_steps=20, agent_steps=8, backbone_steps=8, epsilon_decay_steps=16), penalty=-0.05,
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.set_penalty(-0.2)
    budgets = (0.3, 0.7)
    path = tmp_path / "select.npz"
    best = rnp_tf.BestKnobWeights(x, y, budgets=budgets, path=path)
    model.fit(data.train, epochs=3, shuffle=False, verbose=0, callbacks=[best])
    scores = [h["accuracy"] for h in best.history]
    assert [h["epoch"] for h in best.history] == [0, 1, 2]
    assert best.best_epoch == int(np.argmax(scores)) and len(set(scores)) > 1
    for h in best.history:
        assert set(h["by_budget"]) == set(budgets)
        assert h["accuracy"] == pytest.approx(np.mean(list(h["by_budget"].values())))
    for kept, now in zip(best.best_weights, model.get_weights()):
        np.testing.assert_array_equal(kept, now)
    assert model.penalty_setting == pytest.approx(-0.2)  # the knob as the user set it
    assert _mean_accuracy(model, x, y, budgets) == pytest.approx(max(scores))
    # the file holds the same selection; a resumed fit continues it, and a repeated epoch replaces its entry
    kept = rnp_tf.BestKnobWeights.read(path)
    assert kept["history"] == best.history and kept["best_epoch"] == best.best_epoch
    assert kept["accuracy"] == pytest.approx(max(scores))
    for a, b in zip(kept["weights"], best.best_weights):
        np.testing.assert_array_equal(a, b)
    resumed = rnp_tf.BestKnobWeights(x, y, budgets=budgets, path=path, restore=False)
    model.fit(data.train, epochs=4, initial_epoch=2, shuffle=False, verbose=0, callbacks=[resumed])
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == best.history[:2]
    scores = [h["accuracy"] for h in resumed.history]
    assert resumed.best_epoch == int(np.argmax(scores)) and resumed._best == pytest.approx(max(scores))
    assert rnp_tf.BestKnobWeights.read(path)["history"] == resumed.history


def test_best_knob_weights_errors(tmp_path):
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="one label each"):
        rnp_tf.BestKnobWeights(x, np.zeros(3))
    with pytest.raises(ValueError, match="one label each"):
        rnp_tf.BestKnobWeights(x[0], np.zeros(8))
    for budgets in ((), (0.0,), (0.5, 1.5)):
        with pytest.raises(ValueError, match="budgets"):
            rnp_tf.BestKnobWeights(x, np.zeros(4), budgets=budgets)
    with pytest.raises(ValueError, match="npz"):
        rnp_tf.BestKnobWeights(x, np.zeros(4), path="select.h5")
    for content in (b"", b"PK\x03\x04 truncated"):
        broken = tmp_path / "broken.npz"
        broken.write_bytes(content)
        with pytest.raises(ValueError, match="Cannot read the knob selection"):
            rnp_tf.BestKnobWeights.read(broken)
    with pytest.raises(ValueError, match="Cannot read the knob selection"):
        rnp_tf.BestKnobWeights.read(tmp_path / "missing.npz")


def test_progress_line_shows_the_real_time_per_step(capsys):
    """The per-epoch line printed `0s - 0us/step`: the bar's clock started at the epoch's end."""
    import re
    import time

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.02)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    model.fit(np.zeros((32, 3)), np.zeros((32, 2)), batch_size=8, epochs=1, verbose=0,
              callbacks=[Slow(), rnp_tf.CompactProgressBar(verbose=2)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    per_step = re.search(r"4/4 - \d+s - (\d+)ms/step", line)
    assert per_step and int(per_step.group(1)) >= 20, line
