import numpy as np
import pytest
import tensorflow as tf

from rnp_tf.agent import DecisionAgent
from rnp_tf.agent import epsilon_greedy_actions
from rnp_tf.agent import greedy_actions


def test_step_shapes_and_shared_lstm():
    agent = DecisionAgent([8, 16, 16], groups=4, embed_dim=5, units=7)
    agent.build()
    # one encoder and one decoder per layer, one LSTM cell for all
    assert len(agent.encoders) == 3 and len(agent.decoders) == 3
    assert len(agent.trainable_variables) == 3 * 2 + 3 + 3 * 2
    state = agent.initial_state(2)
    q, state = agent.step(0, tf.random.normal((2, 5, 5, 8)), state)
    assert q.shape == (2, 4) and state[0].shape == (2, 7)
    q2, _ = agent.step(1, tf.random.normal((2, 3, 3, 16)), state)
    q2_fresh, _ = agent.step(1, tf.random.normal((2, 3, 3, 16)), agent.initial_state(2))
    assert q2.shape == (2, 4)
    assert not np.allclose(q2.numpy(), q2_fresh.numpy())  # state carries across layers


def test_narrow_features_count_missing_channels_as_zero():
    agent = DecisionAgent([8], groups=4)
    agent.build()
    full = np.random.default_rng(0).normal(size=(1, 4, 4, 8)).astype("float32")
    full[..., 4:] = 0.0
    q_full, _ = agent.step(0, full, agent.initial_state(1))
    q_narrow, _ = agent.step(0, full[..., :4], agent.initial_state(1))
    np.testing.assert_allclose(q_full, q_narrow, atol=1e-6)


def test_call_stacks_all_layers():
    agent = DecisionAgent([4, 4], groups=3)
    q = agent([tf.zeros((5, 2, 2, 4)), tf.zeros((5, 2, 2, 4))])
    assert q.shape == (5, 2, 3)


def test_greedy_and_epsilon_greedy():
    q = tf.constant([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(greedy_actions(q), [2, 1])
    np.testing.assert_array_equal(epsilon_greedy_actions(q, 0.0), [2, 1])
    many = tf.tile(q[:1], [4000, 1])
    random = epsilon_greedy_actions(many, 1.0).numpy()
    assert set(random) == {1, 2, 3, 4}
    counts = np.bincount(random, minlength=5)[1:] / len(random)
    np.testing.assert_allclose(counts, 0.25, atol=0.03)
    half = epsilon_greedy_actions(many, 0.5).numpy()
    assert 0.55 < np.mean(half == 2) < 0.70  # 0.5 greedy + 0.5 * 1/4 random


def test_macs_and_config():
    agent = DecisionAgent([8, 16], groups=4, embed_dim=4, units=6)
    expected = (8 * 4 + 16 * 4) + 2 * 4 * 6 * (4 + 6) + 2 * 6 * 4
    assert agent.macs() == expected
    clone = DecisionAgent.from_config(agent.get_config())
    assert clone.get_config() == agent.get_config()


@pytest.mark.parametrize("kwargs", [{"feature_channels": []}, {"feature_channels": [4], "groups": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        DecisionAgent(**kwargs)
