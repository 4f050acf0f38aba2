"""rnp_tf.keras_weights: Keras applications' VGG16 weights onto our VGG-16 (`--backbone_weights`)."""

import keras
import numpy as np
import pytest

from rnp_tf import keras_weights
from rnp_tf import run_config
from rnp_tf import trainer


def test_keras_vgg16_maps_exactly_onto_our_vgg16():
    from rnp_tf import RNPModel
    from rnp_tf import backbones

    keras.utils.set_random_seed(1)
    source = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    ours = RNPModel(backbones.vgg16(), image_shape=(32, 32, 3), num_classes=10)
    assert keras_weights.map_keras_vgg16(source, ours) is True
    x = np.random.default_rng(0).uniform(-2, 2, (3, 32, 32, 3)).astype("float32")
    full = np.full((3, ours.num_prunable), ours.groups)
    logits = ours.rollout(x, actions=full)["logits"].numpy()
    expected = source(x, training=False).numpy()
    scale = np.abs(expected).max()
    assert scale > 0 and np.std(expected) > 0  # not a trivially flat output
    np.testing.assert_allclose(logits, expected, atol=1e-4 * scale)

    # Keras' caffe preprocessing folded into the first conv: our normalised
    # input gives the logits Keras gives on its own preprocessing, up to the
    # one-pixel border of the first conv (measured, bounded here).
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    folded = RNPModel(backbones.vgg16(), image_shape=(32, 32, 3), num_classes=10)
    keras_weights.map_keras_vgg16(source, folded, input_mean=mean, input_std=std)
    pixels = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    ours_in = ((pixels / 255.0 - mean) / std).astype("float32")
    keras_in = keras.applications.vgg16.preprocess_input(pixels.copy())
    got = folded.rollout(ours_in, actions=full)["logits"].numpy()
    want = source(keras_in, training=False).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())  # measured 3e-4


def test_keras_fc1_rows_move_into_our_channel_major_head():
    """At 64x64 the last map is 2x2, so Keras' Flatten order and our channel-major rows differ."""
    from rnp_tf import RNPModel
    from rnp_tf import backbones

    keras.utils.set_random_seed(2)
    source = keras.applications.VGG16(weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None)
    ours = RNPModel(backbones.vgg16(), image_shape=(64, 64, 3), num_classes=10)
    assert ours.plan.head.layout == "channel" and ours.plan.head.spatial == 4
    assert keras_weights.map_keras_vgg16(source, ours) is True
    x = np.random.default_rng(0).uniform(-2, 2, (2, 64, 64, 3)).astype("float32")
    logits = ours.rollout(x, actions=np.full((2, ours.num_prunable), ours.groups))["logits"].numpy()
    expected = source(x, training=False).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max())


def test_backbone_weights_from_a_file_and_the_offline_message(tmp_path, monkeypatch):
    keras.utils.set_random_seed(2)
    source = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    weights = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(weights)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=images, y_train=np.arange(8) % 4, x_test=images[:4], y_test=np.arange(4))
    config = run_config.make_config(dataset=f"npz:{npz}", backbone="vgg16", backbone_weights=str(weights),
                                    model_dir=str(tmp_path / "run"), batch_size=4)
    _, model = trainer.prepare(config)
    np.testing.assert_array_equal(model.convs[4].kernel.numpy(), source.get_layer("block3_conv1").kernel.numpy())
    np.testing.assert_array_equal(model.convs[4].beta.numpy()[2], source.get_layer("block3_conv1").bias.numpy())

    # No cached ImageNet file and no network: one clear message, before any work.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(keras.utils, "get_file", _offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", _offline)
    config = run_config.make_config(dataset=f"npz:{npz}", backbone="vgg16", backbone_weights="imagenet",
                                    model_dir=str(tmp_path / "run2"), batch_size=4)
    with pytest.raises(ValueError, match=r"not in .*keras_home/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop"
                                         r"\.h5 and could not be downloaded"):
        trainer.prepare(config)


def _offline(*args, **kwargs):
    raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")
