"""The one rollout: policies and executors on one loop."""

import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from rnp_tf import rollout as rollout_lib

SMALL = rnp_tf.cifar_cnn((8, 8, 16, 16))


@pytest.fixture(scope="module")
def model():
    tf.random.set_seed(0)
    return rnp_tf.RNPModel(SMALL, image_shape=(8, 8, 1), num_classes=10)


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype("float32")


def test_masked_executor_with_greedy_policy_is_the_models_call(model):
    x = images(6)
    out = rollout_lib.rollout(model.plan, model.agent, x, model.greedy_policy(),
                              rollout_lib.MaskedExecutor(model.plan))
    assert len(out.actions) == model.num_prunable and len(out.q_values) == model.num_prunable
    np.testing.assert_allclose(out.logits, model(x), atol=1e-6)
    stacked = out.stacked(model.macs)
    np.testing.assert_array_equal(stacked["actions"], model.rollout(x)["actions"])


def test_forced_policy_runs_no_agent_unless_asked(model):
    x = images(3)
    actions = tf.constant([[1, 2, 3], [4, 4, 4], [2, 1, 4]], tf.int32)
    plain = rollout_lib.rollout(model.plan, model.agent, x, rollout_lib.Forced(actions),
                                rollout_lib.MaskedExecutor(model.plan))
    assert plain.q_values == []
    timed = rollout_lib.rollout(model.plan, model.agent, x, rollout_lib.Forced(actions, run_agent=True),
                                rollout_lib.MaskedExecutor(model.plan))
    assert len(timed.q_values) == 3
    np.testing.assert_array_equal(tf.stack(timed.actions, 1), actions)
    np.testing.assert_allclose(plain.logits, timed.logits)


def test_sliced_executor_equals_masked_per_image(model):
    x = images(4, seed=1)
    for i in range(4):
        masked = rollout_lib.rollout(model.plan, model.agent, x[i : i + 1], model.greedy_policy(),
                                     rollout_lib.MaskedExecutor(model.plan))
        sliced = rollout_lib.rollout(model.plan, model.agent, x[i : i + 1], model.greedy_policy(),
                                     rollout_lib.SlicedExecutor(model.plan))
        assert [int(a[0]) for a in masked.actions] == [int(a[0]) for a in sliced.actions]
        np.testing.assert_allclose(masked.logits, sliced.logits, atol=1e-4)


def test_a_new_policy_is_one_object(model):
    """Any object with `uses_agent` and `choose` plugs into every executor."""

    class Alternate:
        uses_agent = True

        def __init__(self):
            self.seen = []

        def choose(self, t, q, decided):
            self.seen.append((t, len(decided), tuple(q.shape)))
            return tf.fill([tf.shape(q)[0]], 1 + t % 2 * 3)

    policy = Alternate()
    x = images(2)
    out = rollout_lib.rollout(model.plan, model.agent, x, policy, rollout_lib.MaskedExecutor(model.plan))
    assert policy.seen == [(0, 0, (2, 4)), (1, 1, (2, 4)), (2, 2, (2, 4))]
    np.testing.assert_array_equal(tf.stack(out.actions, 1), [[1, 4, 1], [1, 4, 1]])
    engine = rnp_tf.InferenceEngine(model)
    batch = engine.run(rnp_tf.engine.BucketedExecutor(engine), tf.constant(x), tf.constant([[1, 4, 1]] * 2))
    np.testing.assert_allclose(batch["logits"], out.logits, atol=1e-4)


def test_epsilon_one_explores_and_chooser_wraps_a_function(model):
    x = images(64)
    tf.random.set_seed(1)
    out = rollout_lib.rollout(model.plan, model.agent, x, rollout_lib.EpsilonGreedy(1.0),
                              rollout_lib.MaskedExecutor(model.plan))
    assert len(np.unique(out.actions[0].numpy())) > 1
    chooser = rollout_lib.Chooser(lambda t, q: tf.fill([tf.shape(x)[0]], 2), uses_agent=False)
    out = rollout_lib.rollout(model.plan, model.agent, x, chooser, rollout_lib.MaskedExecutor(model.plan))
    assert out.q_values == [] and all(int(a[0]) == 2 for a in out.actions)


def test_residual_blocks_run_on_masked_and_sliced_executors():
    spec = {"stages": [{"type": "conv", "filters": 16},
                       {"type": "bottleneck", "filters": 4, "expansion": 4, "projection": False},
                       {"type": "bottleneck", "filters": 8, "strides": 2, "projection": True}],
            "head": {"pooling": "gap"}}
    model = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=10)
    x = images(1, seed=3)
    actions = tf.constant([[1, 3, 2, 4]], tf.int32)
    masked = rollout_lib.rollout(model.plan, model.agent, x, rollout_lib.Forced(actions),
                                 rollout_lib.MaskedExecutor(model.plan))
    sliced = rollout_lib.rollout(model.plan, model.agent, x, rollout_lib.Forced(actions),
                                 rollout_lib.SlicedExecutor(model.plan))
    np.testing.assert_allclose(masked.logits, sliced.logits, atol=1e-4)


def test_pad_channels_and_spatial_mean():
    h = tf.reshape(tf.range(2 * 2 * 2 * 3, dtype=tf.float32), [2, 2, 2, 3])
    np.testing.assert_allclose(rollout_lib.spatial_mean(h), tf.reduce_mean(h, [1, 2]), rtol=1e-6)
    # a channel count known only at run time (a switch over widths) and a batch of any size
    unknown = tf.function(rollout_lib.spatial_mean, input_signature=[tf.TensorSpec([None, 4, 6, None])])
    h = tf.random.stateless_normal([3, 4, 6, 5], seed=[1, 2])
    np.testing.assert_allclose(unknown(h), tf.reduce_mean(h, [1, 2]), rtol=1e-5, atol=1e-6)
    assert unknown(tf.zeros([0, 4, 6, 5])).shape == (0, 5)
    # a static map over `SMALL_MAP` elements takes the pooling kernel, a smaller one `reduce_mean`
    for shape, op in (([1, 64, 64, 33], "AvgPool"), ([1, 8, 8, 33], "Mean")):
        traced = tf.function(rollout_lib.spatial_mean).get_concrete_function(tf.TensorSpec(shape))
        assert op in {node.type for node in traced.graph.get_operations()}, shape
        h = tf.random.stateless_normal(shape, seed=[3, 4])
        np.testing.assert_allclose(rollout_lib.spatial_mean(h), tf.reduce_mean(h, [1, 2]), rtol=1e-5, atol=1e-6)
    padded = rollout_lib.pad_channels(tf.ones([2, 3]), 5)
    np.testing.assert_array_equal(padded, [[1, 1, 1, 0, 0]] * 2)
