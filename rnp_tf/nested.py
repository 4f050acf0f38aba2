"""Nested channel groups: a network whose width `a` is the first `a` groups of any wider width.

Every output group `g` of a `NestedConv2D` reads only input groups `1..g`
(the kernel is block-lower-triangular over groups; the blocks above the
diagonal are fixed at zero). So the feature maps of the network run at width
`a` are exactly the first `a` groups of the network run at full width, and
one BatchNorm set per layer is right for every width. One forward pass at
full width gives every width's features; `AnytimeNetwork` puts one small
classifier head on the pooled first `a` groups of the last map, for every
`a`, and trains them all at once (the loss summed over widths, with
distillation from the widest).

Widening from `a` to `a + 1` computes only group `a + 1`'s new channels and
reuses the rest, so an image can be answered at width 1 and escalated only
when the answer is unsure (`rnp_tf.escalation`). This module runs every
width masked (one full pass); it is the measurement of issue 27's stage 1.

Example:

>>> net = AnytimeNetwork(backbones.cifar_cnn((8, 8, 16, 16)), image_shape=(16, 16, 3),
...                      num_classes=10, groups=4)
>>> net(tf.zeros((2, 16, 16, 3))).shape
TensorShape([2, 4, 10])
"""

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import backbones
from rnp_tf import plan as plan_lib
from rnp_tf import validation


def group_mask(in_channels, out_channels, groups, nested_input):
    """The `[in_channels, out_channels]` 0/1 mask of a nested conv's kernel.

    Args:
        in_channels: input channels (split into `groups` equal groups when
            `nested_input`).
        out_channels: output channels, split into `groups` equal groups.
        groups: `k`.
        nested_input: False for a layer whose input is not grouped (the
            image): every output group then reads the whole input.

    Returns:
        A float32 numpy array: 1 where output group `g` may read the input
        channel (its group is `<= g`), else 0.

    Example:

    >>> group_mask(2, 2, 2, nested_input=True)
    array([[1., 1.],
           [0., 1.]], dtype=float32)
    """
    out_group = np.arange(out_channels) // (out_channels // groups)
    if not nested_input:
        return np.ones((in_channels, out_channels), np.float32)
    in_group = np.arange(in_channels) // (in_channels // groups)
    return (in_group[:, None] <= out_group[None, :]).astype(np.float32)


@keras.saving.register_keras_serializable(package="rnp_tf")
class NestedConv2D(keras.layers.Layer):
    """Convolution + BatchNorm + activation with nested (lower-triangular) channel groups.

    Output group `g` reads input groups `1..g` only, so running the layer on
    the first `a` input groups gives exactly the first `a` output groups of
    the full layer.

    Args:
        filters: output channels, divisible by `groups`.
        kernel_size: size of the square kernel. Defaults to 3.
        groups: `k`. Defaults to 4.
        strides: stride. Defaults to 1.
        padding: `"same"` or `"valid"`. Defaults to `"same"`.
        nested_input: whether the input is grouped (False for the stem,
            whose input is the image). Defaults to True.
        activation: Keras activation after BatchNorm. Defaults to `"relu"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Input shape:
        `(batch, height, width, in_channels)`.

    Output shape:
        `(batch, new_height, new_width, filters)`.

    Example:

    >>> layer = NestedConv2D(8, groups=4)
    >>> layer(tf.zeros((1, 6, 6, 4))).shape
    TensorShape([1, 6, 6, 8])
    """

    def __init__(self, filters, kernel_size=3, groups=4, strides=1, padding="same", nested_input=True,
                 activation="relu", **kwargs):
        super().__init__(**kwargs)
        validation.check_positive_int("filters", filters)
        validation.check_positive_int("kernel_size", kernel_size)
        validation.check_positive_int("groups", groups)
        validation.check_positive_int("strides", strides)
        if filters % groups:
            raise ValueError(f"`groups` must divide `filters`. Received: filters={filters}, groups={groups}")
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
        self.filters, self.kernel_size, self.groups = int(filters), int(kernel_size), int(groups)
        self.strides, self.padding, self.nested_input = int(strides), padding, bool(nested_input)
        self.activation = keras.activations.get(activation)
        self.batch_norm = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="batch_norm")

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if self.nested_input and in_channels % self.groups:
            raise ValueError(f"{self.name}: `groups` must divide the input channels of a nested layer. "
                             f"Received: in_channels={in_channels}, groups={self.groups}")
        self.in_channels = int(in_channels)
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, self.in_channels, self.filters),
                                      initializer="he_normal")
        self.mask = tf.constant(group_mask(self.in_channels, self.filters, self.groups, self.nested_input))
        out = self.compute_output_shape(input_shape)
        self.output_hw = (out[1], out[2])
        self.batch_norm.build(out)

    def call(self, inputs, training=False):
        kernel = self.kernel * tf.cast(self.mask, self.kernel.dtype)
        y = tf.nn.conv2d(inputs, tf.cast(kernel, inputs.dtype), self.strides, self.padding.upper())
        return self.activation(self.batch_norm(y, training=training))

    def macs(self, width):
        """Multiply-accumulates of one image at width `width` (`1..k`): the triangle's nonzero blocks."""
        per_pair = self.output_hw[0] * self.output_hw[1] * self.kernel_size**2 * (self.filters // self.groups)
        if not self.nested_input:
            return float(per_pair * self.in_channels * width)
        return float(per_pair * (self.in_channels // self.groups) * width * (width + 1) / 2)

    def compute_output_shape(self, input_shape):
        def size(n):
            if n is None:
                return None
            if self.padding == "same":
                return -(-n // self.strides)
            return (n - self.kernel_size) // self.strides + 1

        return (input_shape[0], size(input_shape[1]), size(input_shape[2]), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "groups": self.groups, "strides": self.strides, "padding": self.padding,
                "nested_input": self.nested_input, "activation": keras.activations.serialize(self.activation)}


@keras.saving.register_keras_serializable(package="rnp_tf")
class AnytimeNetwork(keras.Model):
    """A CNN of nested channel groups with one classifier head per width, trained in one pass.

    `call` runs the network once at full width and returns every width's
    logits. The training loss is the mean over widths of the cross-entropy,
    plus `distill_weight` times the mean over the narrower widths of the KL
    divergence from the widest head's (stopped) softmax.

    Args:
        backbone: a backbone description of conv and pool stages with a
            `"gap"` head and no hidden layers (`rnp_tf.backbones.cifar_cnn`,
            `vgg_cifar`).
        image_shape: `(height, width, channels)`.
        num_classes: classes.
        groups: `k`, the number of widths. Defaults to 4.
        distill_weight: weight of the distillation from the widest head.
            Defaults to 1.0.

    Returns (of `call`):
        Logits `[batch, groups, num_classes]`: index `a - 1` is width `a`.

    Example:

    >>> net = AnytimeNetwork(backbones.cifar_cnn((8, 8, 16, 16)), (16, 16, 3), 10, groups=2)
    >>> net.width_macs().shape
    (2,)
    """

    def __init__(self, backbone, image_shape, num_classes, groups=4, distill_weight=1.0, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbones.validate_backbone(backbone, groups)
        head = self.backbone["head"]
        if head["pooling"] != "gap" or head["hidden"]:
            raise ValueError("AnytimeNetwork needs a backbone with a 'gap' head and no hidden layers. "
                             f"Received: head={head}")
        kinds = {s["type"] for s in self.backbone["stages"]}
        if not kinds <= {"conv", "pool"}:
            raise ValueError(f"AnytimeNetwork takes conv and pool stages only. Received: stage types {sorted(kinds)}")
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = validation.check_positive_int("num_classes", num_classes)
        self.groups = validation.check_positive_int("groups", groups)
        self.distill_weight = validation.check_float("distill_weight", distill_weight, low=0.0)
        self.stage_layers = []
        shape = (None, *self.image_shape)
        for i, stage in enumerate(self.backbone["stages"]):
            if stage["type"] == "conv":
                stem = not any(isinstance(l, NestedConv2D) for l in self.stage_layers)  # reads the image
                layer = NestedConv2D(stage["filters"], stage["kernel_size"], groups, stage["strides"],
                                     stage["padding"], nested_input=not stem, name=f"nested_conv_{i}")
            else:
                pool = keras.layers.MaxPooling2D if stage["mode"] == "max" else keras.layers.AveragePooling2D
                layer = pool(stage["size"], strides=stage["strides"], padding=stage["padding"], name=f"pool_{i}")
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
            self.stage_layers.append(layer)
        self.feature_channels = int(shape[-1])
        self.group_size = self.feature_channels // groups
        self.heads = []
        for a in range(1, groups + 1):
            dense = keras.layers.Dense(num_classes, name=f"head_{a}", dtype="float32")
            dense.build((None, a * self.group_size))
            self.heads.append(dense)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_trackers = [keras.metrics.SparseCategoricalAccuracy(name=f"accuracy_{a}")
                                  for a in range(1, groups + 1)]

    @property
    def metrics(self):
        return [self.loss_tracker, *self.accuracy_trackers]

    def call(self, inputs, training=False):
        h = inputs
        for layer in self.stage_layers:
            h = layer(h, training=training) if isinstance(layer, NestedConv2D) else layer(h)
        pooled = tf.cast(tf.reduce_mean(h, axis=[1, 2]), tf.float32)
        return tf.stack([head(pooled[:, : (a + 1) * self.group_size]) for a, head in enumerate(self.heads)], axis=1)

    def width_losses(self, y, logits):
        """Per-image cross-entropy of every width's head, `[batch, groups]`."""
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        labels = tf.repeat(y[:, None], self.groups, axis=1)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)

    def _loss(self, y, logits):
        loss = tf.reduce_mean(self.width_losses(y, logits))
        if self.distill_weight and self.groups > 1:
            teacher = tf.stop_gradient(tf.nn.softmax(logits[:, -1]))
            student = tf.nn.log_softmax(logits[:, :-1])
            kl = tf.reduce_sum(teacher[:, None] * (tf.math.log(teacher[:, None] + 1e-8) - student), axis=-1)
            loss += self.distill_weight * tf.reduce_mean(kl)
        return loss

    def _update(self, y, logits, loss):
        self.loss_tracker.update_state(loss)
        for a, tracker in enumerate(self.accuracy_trackers):
            tracker.update_state(tf.reshape(y, [-1]), logits[:, a])
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self._loss(y, logits)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return self._update(y, logits, loss)

    def test_step(self, data):
        x, y = data[0], data[1]
        logits = self(x, training=False)
        return self._update(y, logits, self._loss(y, logits))

    def width_macs(self):
        """MACs of one image answered at width `a`, for `a = 1..k` (numpy `[k]`).

        Width `a` computes every layer's first `a` groups (their triangle of
        blocks) and, as escalation does, the heads of widths `1..a`.
        """
        convs = [l for l in self.stage_layers if isinstance(l, NestedConv2D)]
        head = np.cumsum([(a + 1) * self.group_size * self.num_classes for a in range(self.groups)])
        return np.array([sum(c.macs(a) for c in convs) for a in range(1, self.groups + 1)]) + head

    def dense_macs(self):
        """MACs of the ordinary network of the same description (the denominator of compute fractions)."""
        return plan_lib.full_macs(self.backbone, self.image_shape, self.num_classes, self.groups)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "groups": self.groups, "distill_weight": self.distill_weight}
