import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from rnp_tf.layers import GatedConv2D
from rnp_tf.layers import GatedDepthwiseConv2D


def _randomise_bn(layer, seed=0):
    """Non-trivial BatchNorm statistics in every set of a built layer."""
    rng = np.random.default_rng(seed)
    shape = layer.gamma.shape
    layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
    layer.beta.assign(rng.normal(0, 0.3, shape))
    layer.moving_mean.assign(rng.normal(0, 0.3, shape))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    return layer


def _trained_layer(gated_input=True, filters=8, in_channels=8, groups=4, strides=1):
    """A built layer with non-trivial BatchNorm statistics in every set."""
    layer = GatedConv2D(filters, groups=groups, gated_input=gated_input, strides=strides)
    layer.build((None, 6, 6, in_channels))
    return _randomise_bn(layer)


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


# ------------------------------------------------------------ depthwise
def _depthwise(gated_input=True, channels=8, strides=1, size=6):
    layer = GatedDepthwiseConv2D(groups=4, gated_input=gated_input, strides=strides)
    layer.build((None, size, size, channels))
    return _randomise_bn(layer, seed=4)


@pytest.mark.parametrize("in_action,strides", list(itertools.product(range(1, 5), (1, 2))))
def test_depthwise_masked_and_sliced_keep_the_input_prefix(in_action, strides):
    layer = _depthwise(strides=strides)
    x = _prefix_input(3, 8, in_action, 4)
    masked = layer(x, in_actions=tf.fill([3], in_action)).numpy()
    prefix = in_action * 2
    sliced = layer.call_sliced(x[..., :prefix], in_action, None).numpy()
    assert masked.shape == (3, 6 // strides, 6 // strides, 8) and sliced.shape == (3, 6 // strides, 6 // strides, prefix)
    np.testing.assert_allclose(sliced, masked[..., :prefix], atol=1e-5)
    np.testing.assert_array_equal(masked[..., prefix:], 0.0)
    assert masked.max() <= 6.0 and masked[..., :prefix].max() > 0  # ReLU6


def test_depthwise_per_sample_widths_pick_their_batchnorm_sets():
    layer = _depthwise()
    x = np.concatenate([_prefix_input(1, 8, 1, 4, seed=2), _prefix_input(1, 8, 3, 4, seed=3)])
    out = layer(x, in_actions=tf.constant([1, 3])).numpy()
    np.testing.assert_allclose(out[:1, ..., :2], layer.call_sliced(x[:1, ..., :2], 1, None), atol=1e-5)
    np.testing.assert_allclose(out[1:, ..., :6], layer.call_sliced(x[1:, ..., :6], 3, None), atol=1e-5)
    kernel, bias = layer.folded_weights(3, None)
    assert kernel.shape == (3, 3, 6, 1) and bias.shape == (6,)


@pytest.mark.parametrize("size,padding", [(6, ((0, 1), (0, 1))), (7, ((1, 1), (1, 1)))])
def test_depthwise_stride_2_same_is_keras_zero_padding_then_valid(size, padding):
    """MobileNetV2's `ZeroPadding2D(correct_pad(x, 3))` + 'valid' stride-2 depthwise is TF's SAME padding."""
    layer = _depthwise(gated_input=False, strides=2, size=size)
    pad = keras.layers.ZeroPadding2D(padding)
    keras_dw = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    x = np.random.default_rng(5).normal(size=(2, size, size, 8)).astype("float32")
    padded = pad(x)
    keras_dw.build(padded.shape)
    keras_dw.kernel.assign(layer.kernel)
    bn.build((None, size // 2, size // 2, 8))
    for target, source in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance),
                              (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)):
        target.assign(source[0])
    expected = keras.activations.relu6(bn(keras_dw(padded), training=False)).numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-5)


def test_depthwise_macs_count_the_prefix():
    layer = _depthwise(strides=2)  # 6x6 -> 3x3, 2 channels per group
    assert layer.macs(3, None) == 3 * 3 * 9 * 6
    np.testing.assert_allclose(layer.macs(tf.constant([1, 4]), tf.constant([4, 4])).numpy(), [162, 648])
    assert layer.full_macs == 3 * 3 * 9 * 8
    full = _depthwise(gated_input=False)  # the input has full width whatever the actions say
    np.testing.assert_allclose(full.macs(tf.constant([1, 2]), tf.constant([4, 4])).numpy(), [2592, 2592])


def test_depthwise_rejects_bad_widths_and_round_trips_its_config():
    layer = _depthwise()
    with pytest.raises(ValueError, match="in_action"):
        layer.call_sliced(np.zeros((1, 6, 6, 2), "float32"), 0, None)
    with pytest.raises(ValueError, match="input channels"):
        layer.call_sliced(np.zeros((1, 6, 6, 3), "float32"), 1, None)
    with pytest.raises(ValueError, match="groups"):
        GatedDepthwiseConv2D(groups=4).build((None, 6, 6, 6))
    config = layer.get_config()
    assert "filters" not in config and config["activation"] == "relu6"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, GatedDepthwiseConv2D) and restored.get_config() == config
