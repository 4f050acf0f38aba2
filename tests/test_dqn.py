import numpy as np
import pytest
import tensorflow as tf

from rnp_tf import dqn


def test_rewards_hand_count():
    actions = tf.constant([[1, 3, 4], [2, 2, 1]])
    ce = tf.constant([2.0, 0.5])
    r = dqn.rewards(actions, ce, penalty=-0.1, alpha=0.5).numpy()
    expected = np.array([[0.0, -0.2, -0.3 - 1.0], [-0.1, -0.1, 0.0 - 0.25]])
    np.testing.assert_allclose(r, expected, atol=1e-6)


def test_td_targets_use_next_max_and_stop_at_last_step():
    q = tf.constant([[[0.0, 1.0], [2.0, 5.0], [7.0, -1.0]]])
    r = tf.constant([[0.5, -1.0, 3.0]])
    y = dqn.td_targets(r, q, gamma=0.9).numpy()
    np.testing.assert_allclose(y, [[0.5 + 0.9 * 5.0, -1.0 + 0.9 * 7.0, 3.0]], atol=1e-6)


def test_td_targets_carry_no_gradient():
    q = tf.Variable([[[1.0, 2.0], [3.0, 4.0]]])
    with tf.GradientTape() as tape:
        y = dqn.td_targets(tf.zeros((1, 2)), q, 1.0)
    assert tape.gradient(y, q) is None


@pytest.mark.parametrize("loss,expected", [("mse", (4.0 + 1.0) / 2), ("huber", (1.5 + 0.5) / 2)])
def test_q_loss_on_taken_actions(loss, expected):
    q = tf.constant([[[1.0, 2.0], [0.0, 1.0]]])
    actions = tf.constant([[2, 1]])
    targets = tf.constant([[0.0, 1.0]])
    assert float(dqn.q_loss(q, actions, targets, loss)) == pytest.approx(expected)


def test_q_loss_rejects_unknown_loss():
    with pytest.raises(ValueError, match="loss"):
        dqn.q_loss(tf.zeros((1, 1, 2)), tf.ones((1, 1), tf.int32), tf.zeros((1, 1)), "l1")


def test_epsilon_schedule_is_linear_then_held():
    assert dqn.epsilon_at(0, 1.0, 0.1, 100) == 1.0
    assert dqn.epsilon_at(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert dqn.epsilon_at(100, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert dqn.epsilon_at(10_000, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert dqn.epsilon_at(0, 1.0, 0.1, 0) == pytest.approx(0.1)


def test_phase_schedule():
    phases = [
        dqn.phase_at(s, robust_steps=2, agent_steps=2, backbone_steps=3, warmup_steps=4)
        for s in range(16)
    ]
    assert phases == (
        ["robust"] * 2 + ["agent"] * 4 + ["backbone"] * 3 + ["agent"] * 2 + ["backbone"] * 3 + ["agent"] * 2
    )


def test_skipped_decisions_are_transparent_in_targets_and_left_out_of_the_loss():
    """Decision 0 skips its block (0, 0); decision 1 was not taken: the skip's target passes over it."""
    actions = tf.constant([[0, 0, 2], [3, 1, 2]])
    r = dqn.rewards(actions, tf.constant([1.0, 1.0]), penalty=-0.1, alpha=1.0)
    np.testing.assert_allclose(r.numpy(), [[0.1, 0.1, -0.1 - 1.0], [-0.2, 0.0, -0.1 - 1.0]], atol=1e-6)
    q = tf.constant([[[1.0, 2.0, 0.5], [9.0, 9.0, 9.0], [4.0, 3.0, -1e30]]] * 2)
    live = tf.constant([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = dqn.td_targets(r, q, gamma=0.5, live=live).numpy()
    # skipped: r_0 + r_1 (passed over, undiscounted) + gamma * max Q(s_2); taken: as without live
    np.testing.assert_allclose(y[0, [0, 2]], [0.1 + 0.1 + 0.5 * 4.0, -0.1 - 1.0], atol=1e-6)
    np.testing.assert_allclose(y[1], dqn.td_targets(r, q, gamma=0.5).numpy()[1], atol=1e-6)
    # action 0 reads the last Q-value (the skip's); the untaken decision adds nothing
    targets = tf.constant([[0.0, 100.0, 0.0]])
    loss = dqn.q_loss(q[:1], actions[:1], targets, live=live[:1])
    assert float(loss) == pytest.approx((0.5**2 + 3.0**2) / 2)
