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


def test_best_knob_weights_restores_the_best_epoch_and_leaves_the_knob_alone():
    keras.utils.set_random_seed(3)
    data = rnp_tf.load_dataset("digits", batch_size=64, validation_split=0.2)
    x, y = _arrays(data.validation)
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 16, 16, 16)), image_shape=data.input_shape, num_classes=10,
        robust_steps=20, agent_steps=8, backbone_steps=8, epsilon_decay_steps=16, penalty=-0.05,
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.set_penalty(-0.2)
    budgets = (0.3, 0.7)
    best = rnp_tf.BestKnobWeights(x, y, budgets=budgets)
    model.fit(data.train, epochs=4, shuffle=False, verbose=0, callbacks=[best])
    scores = [h["accuracy"] for h in best.history]
    assert [h["epoch"] for h in best.history] == [0, 1, 2, 3]
    assert best.best_epoch == int(np.argmax(scores)) and len(set(scores)) > 1
    for h in best.history:
        assert set(h["by_budget"]) == set(budgets)
        assert h["accuracy"] == pytest.approx(np.mean(list(h["by_budget"].values())))
    for kept, now in zip(best.best_weights, model.get_weights()):
        np.testing.assert_array_equal(kept, now)
    assert model.penalty_setting == pytest.approx(-0.2)  # the knob as the user set it
    assert _mean_accuracy(model, x, y, budgets) == pytest.approx(max(scores))


def test_best_knob_weights_errors():
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="one label each"):
        rnp_tf.BestKnobWeights(x, np.zeros(3))
    with pytest.raises(ValueError, match="one label each"):
        rnp_tf.BestKnobWeights(x[0], np.zeros(8))
    for budgets in ((), (0.0,), (0.5, 1.5)):
        with pytest.raises(ValueError, match="budgets"):
            rnp_tf.BestKnobWeights(x, np.zeros(4), budgets=budgets)
