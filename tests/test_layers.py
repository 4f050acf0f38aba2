import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from rnp_tf.layers import GatedConv2D


def _trained_layer(gated_input=True, filters=8, in_channels=8, groups=4, strides=1):
    """A built layer with non-trivial BatchNorm statistics in every set."""
    layer = GatedConv2D(filters, groups=groups, gated_input=gated_input, strides=strides)
    layer.build((None, 6, 6, in_channels))
    rng = np.random.default_rng(0)
    sets = layer.num_bn_sets
    layer.gamma.assign(rng.uniform(0.5, 1.5, (sets, filters)))
    layer.beta.assign(rng.normal(0, 0.3, (sets, filters)))
    layer.moving_mean.assign(rng.normal(0, 0.3, (sets, filters)))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, (sets, filters)))
    return layer


def _prefix_input(batch, in_channels, in_action, groups, seed=0):
    x = np.random.default_rng(seed).normal(size=(batch, 6, 6, in_channels)).astype("float32")
    x[..., in_action * in_channels // groups :] = 0.0
    return x


@pytest.mark.parametrize("in_action,out_action", list(itertools.product(range(1, 5), range(1, 5))))
def test_masked_and_sliced_paths_agree(in_action, out_action):
    layer = _trained_layer()
    x = _prefix_input(3, 8, in_action, 4)
    masked = layer(
        x,
        in_actions=tf.fill([3], in_action),
        out_actions=tf.fill([3], out_action),
        training=False,
    ).numpy()
    prefix = in_action * 2
    sliced = layer.call_sliced(x[..., :prefix], in_action, out_action).numpy()
    out_prefix = out_action * 2
    assert sliced.shape == (3, 6, 6, out_prefix)
    np.testing.assert_allclose(sliced, masked[..., :out_prefix], atol=1e-5)
    np.testing.assert_array_equal(masked[..., out_prefix:], 0.0)


def test_stem_sliced_ignores_input_action():
    layer = _trained_layer(gated_input=False, in_channels=3)
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    masked = layer(x, out_actions=tf.constant([2, 2]))
    sliced = layer.call_sliced(x, 4, 2)
    np.testing.assert_allclose(sliced, masked[..., :4], atol=1e-5)


def test_per_sample_actions_and_batchnorm_sets():
    layer = _trained_layer()
    x = np.concatenate([_prefix_input(1, 8, 1, 4, seed=2), _prefix_input(1, 8, 3, 4, seed=3)])
    out = layer(x, in_actions=tf.constant([1, 3]), out_actions=tf.constant([4, 2])).numpy()
    first = layer.call_sliced(x[:1, ..., :2], 1, 4).numpy()
    second = layer.call_sliced(x[1:, ..., :6], 3, 2).numpy()
    np.testing.assert_allclose(out[:1], first, atol=1e-5)
    np.testing.assert_allclose(out[1:, ..., :4], second, atol=1e-5)


def test_training_uses_statistics_of_each_input_width():
    layer = GatedConv2D(4, groups=2, momentum=0.0)
    layer.build((None, 5, 5, 4))
    rng = np.random.default_rng(0)
    x_narrow = rng.normal(size=(4, 5, 5, 4)).astype("float32")
    x_narrow[..., 2:] = 0.0
    x_wide = 3.0 + 2.0 * rng.normal(size=(4, 5, 5, 4)).astype("float32")
    x = np.concatenate([x_narrow, x_wide])
    in_actions = tf.constant([1] * 4 + [2] * 4)
    out = layer(x, in_actions=in_actions, training=True).numpy()
    pre = tf.nn.conv2d(x, layer.kernel, 1, "SAME").numpy()
    for set_index, rows in ((0, slice(0, 4)), (1, slice(4, 8))):
        mean = pre[rows].mean(axis=(0, 1, 2))
        var = pre[rows].var(axis=(0, 1, 2))
        expected = np.maximum((pre[rows] - mean) / np.sqrt(var + layer.epsilon), 0.0)
        np.testing.assert_allclose(out[rows], expected, atol=1e-4)
        # momentum 0: the moving statistics are this batch's, per set
        np.testing.assert_allclose(layer.moving_mean.numpy()[set_index], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy()[set_index], var, rtol=1e-4, atol=1e-5)


def test_absent_width_keeps_its_moving_statistics():
    layer = GatedConv2D(4, groups=2)
    layer.build((None, 5, 5, 4))
    before = layer.moving_mean.numpy().copy()
    layer(np.ones((2, 5, 5, 4), "float32"), in_actions=tf.constant([2, 2]), training=True)
    after = layer.moving_mean.numpy()
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.allclose(after[1], before[1])


@pytest.mark.parametrize("strides", [1, 2])
def test_mac_count_matches_hand_count(strides):
    layer = GatedConv2D(8, kernel_size=3, groups=4, strides=strides)
    layer.build((None, 6, 6, 12))
    out_hw = 6 // strides
    for prev, action in itertools.product(range(1, 5), range(1, 5)):
        expected = out_hw * out_hw * 3 * 3 * (prev * 3) * (action * 2)
        assert layer.macs(prev, action) == expected
        assert float(layer.macs(tf.constant([prev]), tf.constant([action]))[0]) == expected
    assert layer.full_macs == out_hw * out_hw * 9 * 12 * 8


def test_stem_macs_use_all_input_channels():
    layer = GatedConv2D(8, groups=4, gated_input=False)
    layer.build((None, 4, 4, 3))
    assert layer.macs(None, 1) == 4 * 4 * 9 * 3 * 2


def test_channel_mask():
    layer = GatedConv2D(8, groups=4)
    mask = layer.channel_mask(tf.constant([1, 4])).numpy()
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0, 0, 0, 0], [1] * 8])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"filters": 10, "groups": 4}, "divide"),
        ({"filters": 0}, "filters"),
        ({"filters": 8, "groups": 0}, "groups"),
        ({"filters": 8, "momentum": 1.5}, "momentum"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedConv2D(**kwargs)


def test_input_channels_not_divisible():
    with pytest.raises(ValueError, match="input channels"):
        GatedConv2D(8, groups=4).build((None, 5, 5, 6))


def test_sliced_rejects_bad_actions_and_widths():
    layer = _trained_layer()
    with pytest.raises(ValueError, match="out_action"):
        layer.call_sliced(np.zeros((1, 6, 6, 2), "float32"), 1, 5)
    with pytest.raises(ValueError, match="in_action"):
        layer.call_sliced(np.zeros((1, 6, 6, 2), "float32"), 0, 1)
    with pytest.raises(ValueError, match="input channels"):
        layer.call_sliced(np.zeros((1, 6, 6, 3), "float32"), 1, 1)


def test_config_round_trip():
    layer = GatedConv2D(8, kernel_size=5, groups=2, strides=2, gated_input=False, name="g")
    clone = GatedConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, GatedConv2D) and restored.strides == 2
