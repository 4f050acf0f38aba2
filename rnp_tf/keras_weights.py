"""Keras applications' VGG16 weights onto an `RNPModel` with the vgg16 backbone.

`load_backbone_weights` is `--backbone_weights` of `python -m rnp_tf.train`:
it finds the weights (`keras_vgg16`: the Keras cache, a download, or a file)
and copies them (`map_keras_vgg16`), folding Keras' "caffe" preprocessing
into the first convolution.

Example:

>>> source = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=10)
>>> model = rnp_tf.RNPModel(rnp_tf.backbones.vgg16(), image_shape=(32, 32, 3), num_classes=10)
>>> map_keras_vgg16(source, model)
True
"""

import os

# include_top -> (file name in the Keras cache, URL attribute of keras.src.applications.vgg16)
_VGG16_FILES = {
    True: ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "WEIGHTS_PATH"),
    False: ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "WEIGHTS_PATH_NO_TOP"),
}
# keras.applications.vgg16.preprocess_input ("caffe"): BGR, 0..255, minus these means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def _keras_cache_file(name):
    """Where Keras caches a downloaded weights file `name` (`$KERAS_HOME` or `~/.keras`)."""
    root = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(root, "models", name)


def keras_vgg16(weights, include_top, input_shape):
    """`keras.applications.VGG16` with `weights` ('imagenet' or a file), or a ValueError.

    'imagenet' uses the cached file in `~/.keras/models` (or `$KERAS_HOME`);
    when it is absent Keras downloads it, and when that fails (offline) the
    error says where to put the file.

    Args:
        weights: 'imagenet' or the path of a VGG16 weights file.
        include_top: whether the model has its dense head.
        input_shape: `(height, width, channels)`.

    Returns:
        A `keras.applications.VGG16` model.

    Raises:
        ValueError: one line: the file does not fit, or the ImageNet weights
            are neither cached nor downloadable.
    """
    import socket

    import keras

    name, _ = _VGG16_FILES[include_top]
    kwargs = dict(include_top=include_top, input_shape=tuple(input_shape))
    if weights != "imagenet":
        try:
            return keras.applications.VGG16(weights=weights, **kwargs)
        except (ValueError, OSError, KeyError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--backbone_weights={weights}: not VGG16 weights for this input ({message}).")
    cached = _keras_cache_file(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return keras.applications.VGG16(weights="imagenet", **kwargs)
    except Exception as error:  # offline, proxy, truncated download: say what to do
        from keras.src.applications import vgg16 as keras_vgg16_module

        url = getattr(keras_vgg16_module, _VGG16_FILES[include_top][1], name)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--backbone_weights=imagenet: the Keras VGG16 ImageNet weights are not in {cached} and could not be "
            f"downloaded ({message}). Download {url} on a machine with internet access and copy it to {cached}, "
            "or pass --backbone_weights=PATH (or none)."
        )
    finally:
        socket.setdefaulttimeout(previous)


def map_keras_vgg16(source, model, input_mean=None, input_std=None):
    """Copies a Keras VGG16's weights onto an `RNPModel` with the vgg16 backbone.

    Our gated convs have no bias but BatchNorm (one set per input width);
    a conv with bias and no BatchNorm is mapped exactly by `gamma = 1`,
    `beta = bias`, `moving_mean = 0`, `moving_variance = 1 - epsilon` (so
    `gamma / sqrt(var + eps)` is exactly 1) in every set. The dense layers
    `fc1`, `fc2`, `predictions` map onto `fc_0`, `fc_1`, `classifier` when
    their shapes match (fc1's rows, in Keras' (h, w, c) order, are moved
    into the head's layout); our logits are the inputs of Keras' final
    softmax.

    `input_mean` / `input_std` (the per-channel normalisation of our input
    pipelines, images in [0, 1]) fold Keras' "caffe" preprocessing (BGR,
    0..255, mean subtraction) into the first conv: its kernel is scaled and
    its input channels reversed, and the constant term goes into `beta`.
    Exact except at the one-pixel border, where zero padding means a
    slightly different pixel in the two conventions.

    Args:
        source: a `keras.applications.VGG16` (with or without top).
        model: an `RNPModel` built from `rnp_tf.backbones.vgg16()`.
        input_mean, input_std: optional per-channel arrays of length 3.

    Returns:
        True when the head was copied too, False for the convolutions only.

    Raises:
        ValueError: the shapes do not fit.
    """
    import keras
    import numpy as np

    convs = [layer for layer in source.layers if isinstance(layer, keras.layers.Conv2D)]
    if len(convs) != len(model.convs):
        raise ValueError(f"VGG16 has {len(convs)} convolutions, the model {len(model.convs)}.")
    for index, (src, dst) in enumerate(zip(convs, model.convs)):
        kernel = np.asarray(src.kernel, np.float32)
        bias = np.asarray(src.bias, np.float32) if src.use_bias else np.zeros(src.filters, np.float32)
        if tuple(kernel.shape) != tuple(dst.kernel.shape):
            raise ValueError(f"{src.name}: kernel {kernel.shape} does not fit {dst.name} {tuple(dst.kernel.shape)}.")
        if index == 0 and input_mean is not None:
            mean = np.asarray(input_mean, np.float32).reshape(3)
            std = np.asarray(input_std, np.float32).reshape(3)
            caffe = np.asarray(CAFFE_BGR_MEAN, np.float32)
            # caffe input channel j (BGR) = 255 * std[2-j] * ours[2-j] + 255 * mean[2-j] - caffe[j]
            shift = 255.0 * mean[::-1] - caffe
            bias = bias + np.einsum("hwjo,j->o", kernel, shift)
            kernel = kernel[:, :, ::-1, :] * (255.0 * std)[None, None, :, None]
        dst.kernel.assign(kernel)
        if dst.normalization:
            sets = dst.num_bn_sets
            dst.gamma.assign(np.ones((sets, dst.filters), np.float32))
            dst.beta.assign(np.tile(bias, (sets, 1)))
            dst.moving_mean.assign(np.zeros((sets, dst.filters), np.float32))
            dst.moving_variance.assign(np.full((sets, dst.filters), 1.0 - dst.epsilon, np.float32))
        else:
            dst.bias.assign(bias)
    dense = [layer for layer in source.layers if isinstance(layer, keras.layers.Dense)]
    if len(dense) != len(model.head_layers) or any(
        tuple(s.kernel.shape) != tuple(d.kernel.shape) for s, d in zip(dense, model.head_layers)
    ):
        return False
    for i, (src, dst) in enumerate(zip(dense, model.head_layers)):
        kernel = np.asarray(src.kernel)
        if i == 0:  # Keras' Flatten order into the head's (channel-major for `vgg16()`)
            kernel = model.plan.head.relayout(kernel, "spatial", model.plan.head.layout)
        dst.kernel.assign(kernel)
        dst.bias.assign(np.asarray(src.bias))
    return True


def load_backbone_weights(model, weights, dataset):
    """`--backbone_weights`: Keras VGG16 weights ('imagenet' or a file) onto the model.

    The head is copied when it fits (1000 classes at 224x224); otherwise
    only the convolutions are, and the head keeps its initialisation.
    Keras' caffe preprocessing is folded into the first conv for the
    dataset's normalisation (see `map_keras_vgg16`).

    Args:
        model: an `RNPModel` built from `rnp_tf.backbones.vgg16()`.
        weights: 'imagenet' or the path of a VGG16 weights file.
        dataset: the `rnp_tf.data.Dataset` it trains on (its `mean`, `std`).

    Raises:
        ValueError: see `keras_vgg16` and `map_keras_vgg16`.
    """
    top = model.num_classes == 1000 and tuple(model.image_shape) == (224, 224, 3)
    try:
        source = keras_vgg16(weights, top, model.image_shape)
    except ValueError:
        if not top or weights == "imagenet":
            raise
        top = False
        source = keras_vgg16(weights, False, model.image_shape)
    head = map_keras_vgg16(source, model, input_mean=dataset.mean, input_std=dataset.std)
    print(
        f"rnp_tf.train: VGG16 weights from {weights}: 13 convolutions"
        + (" and the classifier head." if head else "; the head keeps its random initialisation.")
    )
    del source

