"""The run-time knob's maths: re-pricing, the cap, calibration and budgets."""

import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from rnp_tf import knob


def test_reprice_adds_the_penalty_change_per_extra_group():
    q = tf.constant([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(knob.reprice(q, -0.5), [[1.0, 1.5, 2.0, 2.5], [0.0, -0.5, -1.0, -1.5]])
    np.testing.assert_allclose(knob.reprice(q, tf.constant([0.0, 1.0])), [[1, 2, 3, 4], [0, 1, 2, 3]])


def test_cap_keeps_the_narrowest_completion_within_budget():
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10)
    plan = model.plan
    cap = float(plan.macs([[2, 1, 1]])[0])
    q = tf.zeros([1, 4])
    capped = knob.cap_q_values(plan, 0, q, [], cap).numpy()[0]
    assert capped[0] == 0 and capped[1] == 0 and capped[2] == knob.CAPPED and capped[3] == knob.CAPPED


def test_budget_interpolates_a_monotone_calibration():
    penalties = knob.calibration_penalties(-0.1, 4)
    np.testing.assert_allclose(penalties, [0.9, -0.1, -1.1, -2.1])
    table = knob.calibration_table(penalties, [1.0, 0.8, 0.5, 0.2])
    penalty, _, _ = knob.budget_penalty(table, 0.4)
    assert penalty == pytest.approx(-1.1 - 1.0 / 3.0)
    assert knob.budget_penalty(table, 0.1)[0] == pytest.approx(-2.1)  # clipped to the calibrated range
    table = knob.calibration_table(penalties, [1.0, 0.6, 0.7, 0.2])  # 0.7 is made monotone (0.6)
    np.testing.assert_allclose(knob.budget_penalty(table, 0.4)[2], [1.0, 0.6, 0.6, 0.2])
    with pytest.raises(ValueError, match="calibrate_budget"):
        knob.budget_penalty(np.zeros((2, 32)), 0.4)
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="compute_fraction"):
            knob.budget_penalty(table, bad)


def test_refine_budget_bisects_to_the_closest_measurement():
    measured = []

    def measure(p):  # compute falls with the penalty, in steps of 0.1
        measured.append(p)
        return float(np.clip(np.floor((p + 2.0) * 3.0) / 10.0, 0.1, 1.0))

    penalties, fractions = np.array([0.0, -1.0, -2.0]), np.array([0.6, 0.3, 0.1])
    best = knob.refine_budget(measure, 0.3, -1.0, penalties, fractions, tolerance=0.001, max_iterations=6)
    assert abs(measure(best) - 0.3) < 1e-9 and len(measured) <= 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x", None, True])
def test_penalty_must_be_finite(bad):
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match="penalty"):
        model.set_penalty(bad)
    if bad is not None:  # rollout(penalty=None) means the model's setting
        with pytest.raises(ValueError, match="penalty"):
            model.rollout(np.zeros((1, 8, 8, 1), "float32"), penalty=bad)


def test_reprice_and_cap_price_the_skip_as_action_0(skippable_bottleneck):
    q = tf.zeros([1, 5])  # a skippable decision: actions 1..4, then the skip
    np.testing.assert_allclose(knob.reprice(q, -0.5, groups=4), [[0.0, -0.5, -1.0, -1.5, 0.5]])
    spec = skippable_bottleneck
    plan = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=3).plan
    cap = float(plan.macs([[0, 0, 1]])[0])  # below the narrowest unskipped network: only the skip fits
    assert cap < plan.min_macs
    capped = knob.cap_q_values(plan, 0, q, [], cap).numpy()[0]
    np.testing.assert_array_equal(capped == knob.CAPPED, [False, True, True, True, False])
