"""rnp_tf.nested: the nested-group property, the MAC counts, training and saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from rnp_tf import nested


def test_group_mask_is_block_lower_triangular():
    mask = nested.group_mask(4, 6, groups=2, nested_input=True)
    np.testing.assert_array_equal(mask[:2], np.ones((2, 6)))  # input group 1 feeds every output group
    np.testing.assert_array_equal(mask[2:, :3], np.zeros((2, 3)))  # input group 2 never feeds output group 1
    np.testing.assert_array_equal(mask[2:, 3:], np.ones((2, 3)))
    assert nested.group_mask(3, 4, groups=2, nested_input=False).min() == 1.0  # the image is not grouped


def test_output_group_g_reads_only_input_groups_up_to_g():
    layer = nested.NestedConv2D(8, groups=4)
    x = tf.random.normal((2, 6, 6, 8), seed=1)
    y = layer(x)
    for a in range(1, 4):  # change input groups a+1..k: output groups 1..a stay the same, a+1 changes
        changed = tf.concat([x[..., : 2 * a], tf.random.normal((2, 6, 6, 8 - 2 * a), seed=a)], -1)
        z = layer(changed)
        np.testing.assert_array_equal(y[..., : 2 * a].numpy(), z[..., : 2 * a].numpy())
        assert np.abs(y[..., 2 * a : 2 * a + 2].numpy() - z[..., 2 * a : 2 * a + 2].numpy()).max() > 1e-3


def _sliced_logits(net, x, width):
    """The network run at `width` on sliced weights only: every conv's first `width` groups, then head `width`."""
    h = x
    for layer in net.stage_layers:
        if not isinstance(layer, nested.NestedConv2D):
            h = layer(h)
            continue
        out = width * layer.filters // layer.groups
        inp = h.shape[-1]
        kernel = (layer.kernel * layer.mask)[:, :, :inp, :out]
        y = tf.nn.conv2d(h, kernel, layer.strides, layer.padding.upper())
        bn = layer.batch_norm
        y = (y - bn.moving_mean[:out]) / tf.sqrt(bn.moving_variance[:out] + bn.epsilon) * bn.gamma[:out] + bn.beta[:out]
        h = tf.nn.relu(y)
    return net.heads[width - 1](tf.reduce_mean(h, axis=[1, 2]))


def test_every_width_equals_the_network_run_on_its_first_groups_only():
    net = nested.AnytimeNetwork(rnp_tf.cifar_cnn((8, 8, 16, 16)), (12, 12, 3), num_classes=5, groups=4)
    for layer in net.stage_layers:  # BatchNorm statistics that are not the identity
        if isinstance(layer, nested.NestedConv2D):
            bn = layer.batch_norm
            bn.moving_mean.assign(np.random.default_rng(0).normal(size=bn.moving_mean.shape))
            bn.moving_variance.assign(np.random.default_rng(1).uniform(0.5, 2.0, size=bn.moving_variance.shape))
    x = tf.random.uniform((3, 12, 12, 3), seed=2)
    logits = net(x).numpy()
    assert logits.shape == (3, 4, 5)
    for width in range(1, 5):
        np.testing.assert_allclose(logits[:, width - 1], _sliced_logits(net, x, width).numpy(), atol=1e-4)


def test_width_macs_count_the_triangle_and_the_dense_macs_match_the_plan():
    spec = rnp_tf.cifar_cnn()
    net = nested.AnytimeNetwork(spec, (32, 32, 3), num_classes=10, groups=4)
    plan = rnp_tf.build_plan(rnp_tf.backbones.validate_backbone(spec, 4), (32, 32, 3), 10, 4)
    assert net.dense_macs() == plan.full_macs
    np.testing.assert_allclose(net.width_macs() / net.dense_macs(), [0.0674, 0.1957, 0.3848, 0.6349], atol=1e-4)
    layer = net.stage_layers[2]  # conv 64 -> ... : width 2 computes blocks (1,1), (1,2), (2,2)
    per_block = layer.output_hw[0] * layer.output_hw[1] * 9 * (layer.in_channels // 4) * (layer.filters // 4)
    assert layer.macs(2) == 3 * per_block


def test_training_lowers_every_widths_loss_and_the_model_saves(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 256)
    x = (rng.normal(size=(256, 8, 8, 1)) * 0.3 + y[:, None, None, None]).astype("float32")
    net = nested.AnytimeNetwork(rnp_tf.cifar_cnn((8, 8, 8, 8)), (8, 8, 1), num_classes=3, groups=2)
    net.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = net.width_losses(y, net(x)).numpy().mean(0)
    history = net.fit(x, y, epochs=5, batch_size=64, verbose=0)
    after = net.width_losses(y, net(x)).numpy().mean(0)
    assert (after < before).all(), (before, after)
    assert history.history["accuracy_2"][-1] > 0.6
    path = tmp_path / "anytime.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x[:8]).numpy(), net(x[:8]).numpy(), atol=1e-6)
    assert loaded.get_config()["groups"] == 2


def test_bad_backbones_and_layers_are_refused():
    head = {"pooling": "flatten", "hidden": [16], "dropout": 0.0}
    with pytest.raises(ValueError, match="'gap' head"):
        nested.AnytimeNetwork({**rnp_tf.cifar_cnn((8, 8, 8, 8)), "head": head}, (8, 8, 1), 3)
    with pytest.raises(ValueError, match="conv and pool stages"):
        nested.AnytimeNetwork(rnp_tf.resnet50(), (32, 32, 3), 3)
    with pytest.raises(ValueError, match="Received: filters=6, groups=4"):
        nested.NestedConv2D(6, groups=4)
    with pytest.raises(ValueError, match="input channels"):
        nested.NestedConv2D(8, groups=4).build((None, 4, 4, 6))
