"""rnp_tf.escalation: stop rules, exit accounting and the DQN stop agent on hand-made cases."""

import numpy as np
import pytest

from rnp_tf import escalation


def test_confidence_features_by_hand():
    logits = np.log(np.array([[[0.7, 0.2, 0.1]]]))
    top, margin, entropy = escalation.confidence_features(logits)[0, 0]
    assert top == pytest.approx(0.7, abs=1e-6)
    assert margin == pytest.approx(0.5, abs=1e-6)
    assert entropy == pytest.approx(-(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)), abs=1e-5)


def test_first_stop_and_the_threshold_rule():
    stop = np.array([[False, True, True], [False, False, False], [True, False, False]])
    assert escalation.first_stop(stop).tolist() == [2, 3, 1]  # the last width always stops
    logits = np.array([[[5.0, 0.0], [0.0, 5.0]], [[0.1, 0.0], [3.0, 0.0]], [[0.0, 0.1], [0.0, 0.2]]])
    assert escalation.threshold_exits(logits, 0.9).tolist() == [1, 2, 2]
    assert escalation.threshold_exits(logits, 0.0).tolist() == [1, 1, 1]


def test_exit_metrics_and_the_shuffled_control_keep_the_compute():
    logits = np.zeros((4, 2, 2))
    logits[:, 0, 0] = 1.0  # width 1 says class 0
    logits[:, 1, 1] = 1.0  # width 2 says class 1
    labels = np.array([0, 0, 1, 1])
    exits = np.array([1, 1, 2, 2])
    assert escalation.exit_metrics(logits, labels, exits, [0.25, 0.75]) == (1.0, 0.5)
    mixed = escalation.shuffled(exits, seed=3)
    assert sorted(mixed.tolist()) == [1, 1, 2, 2]
    assert escalation.exit_metrics(logits, labels, mixed, [0.25, 0.75])[1] == 0.5


def test_q_targets_by_hand():
    q = np.array([[[0.0, 0.0], [-0.2, -0.7], [-0.3, 5.0]]])  # Q(go on) at the last width means nothing
    targets, valid = escalation.q_targets(q, np.array([[2.0, 1.0, 0.5]]), penalty=-0.1, alpha=1.0, gamma=1.0)
    np.testing.assert_allclose(targets[0, :, 0], [-2.0, -1.0, -0.5])  # stop: -alpha * loss
    np.testing.assert_allclose(targets[0, :2, 1], [-0.1 - 0.2, -0.1 - 0.3])  # go on: p + max valid Q(next)
    assert valid[0].tolist() == [[1, 1], [1, 1], [1, 0]]


def test_the_stop_agent_learns_to_stop_easy_images_early():
    rng = np.random.default_rng(0)
    n = 600
    easy = rng.random(n) < 0.5
    features = np.zeros((n, 2, 3), np.float32)
    features[:, 0, 0] = np.where(easy, 0.95, 0.4) + rng.normal(scale=0.02, size=n)  # width 1's confidence
    features[:, 1, 0] = 0.9
    losses = np.stack([np.where(easy, 0.1, 3.0), np.full(n, 0.1)], 1)  # hard images need width 2
    agent = escalation.train_stop_agent(escalation.StopAgent(groups=2, units=8), features, losses, penalty=-0.2,
                                        epochs=40, seed=0)
    exits = agent.exits(features)
    assert (exits[easy] == 1).mean() > 0.95
    assert (exits[~easy] == 2).mean() > 0.95
    assert (agent.exits(features, bias=10.0) == 1).all()  # the knob: a large bias on Q(stop) stops at once


def test_a_positive_penalty_is_refused():
    with pytest.raises(ValueError, match="penalty"):
        escalation.train_stop_agent(escalation.StopAgent(2), np.zeros((2, 2, 3)), np.zeros((2, 2)), penalty=0.5)
