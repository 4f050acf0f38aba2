"""Gated group convolution: the prunable building block of an RNP backbone.

A `GatedConv2D` is a 2D convolution followed by BatchNormalization and an
activation whose output channels are split into `groups` ordered groups.
Given per-sample actions `a in {1..groups}` it produces the first `a` groups
and zeros for the others (Lin et al., "Runtime Neural Pruning", 2017).

The layer has two execution paths that give the same numbers:

- the *masked* path (`call`), used for training: the full convolution is
  computed and multiplied by a channel mask. It is differentiable and handles
  a different action for every sample, but saves nothing.
- the *sliced* path (`call_sliced`), used for inference: only the weight
  prefix `W[:, :, :in_prefix, :out_prefix]` is convolved with an input that
  holds only its first `in_prefix` channels, so the cost really shrinks.

BatchNorm keeps one set of statistics and affine parameters per *input*
width (as in slimmable networks): the pre-activation of an output channel
depends on how many input channels were computed, so a single shared set is
wrong for every width but one.
"""

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import validation


@keras.saving.register_keras_serializable(package="rnp_tf")
class GatedConv2D(keras.layers.Layer):
    """Convolution + per-width BatchNorm + activation with prunable groups.

    The output channels are split into `groups` contiguous groups; action `a`
    computes groups `1..a`. When `gated_input=True` the input channels are
    split into `groups` groups as well and the previous layer's action says
    how many of them are non-zero; the layer then keeps `groups` BatchNorm
    sets, one per input width, and picks one per sample.

    Args:
        filters: number of output channels; must be divisible by `groups`.
        kernel_size: int, size of the square kernel. Defaults to 3.
        groups: number of channel groups `k`. Defaults to 4.
        strides: int stride. Defaults to 1.
        padding: `"same"` or `"valid"`. Defaults to `"same"`.
        normalization: if True (default) BatchNorm follows the convolution
            (one set per input width); if False the convolution has a bias
            and no normalization (VGG-style).
        gated_input: whether the input width varies with a previous action
            (the input is the output of a prunable layer). Defaults to `True`.
        prunable_output: whether actions may prune the output (then
            `groups` must divide `filters`); False for convs whose output
            must keep its width (the stem, a conv feeding a residual sum).
            Defaults to `True`.
        activation: Keras activation applied after BatchNorm. Defaults to
            `"relu"`.
        momentum: BatchNorm moving-average momentum. Defaults to 0.9.
        epsilon: BatchNorm variance epsilon. Defaults to 1e-3.
        kernel_initializer: initializer of the convolution kernel.
            Defaults to `"he_normal"`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(batch, height, width, in_channels)` for `call`;
        `(batch, height, width, in_prefix)` for `call_sliced`.

    Output shape:
        `(batch, new_height, new_width, filters)` for `call` (pruned groups
        are zero); `(batch, new_height, new_width, out_prefix)` for
        `call_sliced`.

    Example:

    >>> layer = GatedConv2D(16, groups=4)
    >>> x = tf.random.normal((2, 8, 8, 8))
    >>> y = layer(x, in_actions=tf.constant([4, 2]), out_actions=tf.constant([1, 3]))
    >>> y.shape
    TensorShape([2, 8, 8, 16])
    >>> z = layer.call_sliced(x[:1, :, :, :4], in_action=2, out_action=3)
    >>> z.shape
    TensorShape([1, 8, 8, 12])
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        groups=4,
        strides=1,
        padding="same",
        normalization=True,
        gated_input=True,
        prunable_output=True,
        activation="relu",
        momentum=0.9,
        epsilon=1e-3,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        validation.check_positive_int("filters", filters)
        validation.check_positive_int("kernel_size", kernel_size)
        validation.check_positive_int("groups", groups)
        validation.check_positive_int("strides", strides)
        if prunable_output and filters % groups:
            raise ValueError(
                f"`groups` must divide `filters` so that every group has the "
                f"same number of channels. Received: filters={filters}, "
                f"groups={groups}"
            )
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"`momentum` must be in [0, 1). Received: momentum={momentum}"
            )
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.groups = int(groups)
        self.strides = int(strides)
        self.padding = padding
        self.normalization = bool(normalization)
        self.gated_input = bool(gated_input)
        self.prunable_output = bool(prunable_output)
        self.activation = keras.activations.get(activation)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.group_size = self.filters // self.groups if self.prunable_output else None
        self.num_bn_sets = self.groups if self.gated_input else 1

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"{self.name} expects 4D inputs (batch, height, width, "
                f"channels). Received: input_shape={input_shape}"
            )
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(
                f"The channel dimension of the inputs of {self.name} must be "
                f"known. Received: input_shape={input_shape}"
            )
        if self.gated_input and in_channels % self.groups:
            raise ValueError(
                f"`groups` must divide the input channels of a layer with "
                f"gated_input=True. Received: in_channels={in_channels}, "
                f"groups={self.groups}"
            )
        self.in_channels = int(in_channels)
        self.in_group_size = (
            self.in_channels // self.groups if self.gated_input else None
        )
        k = self.kernel_size

        def out_size(n):
            if n is None:
                return None
            if self.padding == "same":
                return -(-n // self.strides)
            if n < k:
                raise ValueError(
                    f"{self.name}: a {k}x{k} 'valid' convolution needs inputs of at least {k} pixels. "
                    f"Received: input_shape={input_shape}"
                )
            return (n - k) // self.strides + 1

        self.output_hw = (out_size(input_shape[1]), out_size(input_shape[2]))
        self.kernel = self.add_weight(
            name="kernel",
            shape=self._kernel_shape(),
            initializer=self.kernel_initializer,
        )
        if not self.normalization:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
            return
        sets = (self.num_bn_sets, self.filters)
        self.gamma = self.add_weight(name="gamma", shape=sets, initializer="ones")
        self.beta = self.add_weight(name="beta", shape=sets, initializer="zeros")
        self.moving_mean = self.add_weight(
            name="moving_mean",
            shape=sets,
            initializer="zeros",
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            name="moving_variance",
            shape=sets,
            initializer="ones",
            trainable=False,
            autocast=False,
            aggregation="mean",
        )

    # ----------------------------------------------------------------- helpers
    def _kernel_shape(self):
        k = self.kernel_size
        return (k, k, self.in_channels, self.filters)

    def _bn_set(self, in_actions, batch_size):
        """Index of the BatchNorm set of every sample, shape `[batch]`."""
        if not self.gated_input or in_actions is None:
            index = self.num_bn_sets - 1
            return tf.fill([batch_size], tf.constant(index, tf.int32))
        return tf.cast(in_actions, tf.int32) - 1

    def _conv(self, x, kernel):
        return tf.nn.conv2d(x, kernel, strides=self.strides, padding=self.padding.upper())

    def channel_mask(self, out_actions):
        """Per-sample mask of computed output channels, shape `[batch, filters]`.

        Args:
            out_actions: int tensor `[batch]` with values in `1..groups`.

        Returns:
            A float tensor, 1 for channels in the first `a` groups, else 0.
        """
        limit = tf.cast(out_actions, tf.int32) * self.group_size
        channels = tf.range(self.filters, dtype=tf.int32)
        return tf.cast(channels[None, :] < limit[:, None], self.compute_dtype)

    # -------------------------------------------------------------- execution
    def call(self, inputs, in_actions=None, out_actions=None, training=False):
        """Masked execution: full convolution, then zero the pruned groups.

        Args:
            inputs: float tensor `(batch, height, width, in_channels)`; the
                channels beyond the previous action's prefix must be zero.
            in_actions: optional int tensor `[batch]`, the previous layer's
                action for every sample (selects the BatchNorm set). `None`
                means the full input width.
            out_actions: optional int tensor `[batch]`, how many groups to
                compute for every sample. `None` means all groups.
            training: whether BatchNorm uses batch statistics (per input
                width) and updates its moving averages.

        Returns:
            A tensor `(batch, new_height, new_width, filters)`.
        """
        batch = tf.shape(inputs)[0]
        y = self._conv(inputs, self.kernel)
        if not self.normalization:
            y = self.activation(y + self.bias)
            if out_actions is not None:
                y = y * self.channel_mask(out_actions)[:, None, None, :]
            return y
        sets = self._bn_set(in_actions, batch)
        onehot = tf.one_hot(sets, self.num_bn_sets, dtype=y.dtype)  # [B, S]
        if training:
            mean_s, var_s = self._batch_moments(y, onehot)
        else:
            mean_s = tf.cast(self.moving_mean, y.dtype)
            var_s = tf.cast(self.moving_variance, y.dtype)
        scale_s = tf.cast(self.gamma, y.dtype) * tf.math.rsqrt(var_s + self.epsilon)
        shift_s = tf.cast(self.beta, y.dtype) - mean_s * scale_s
        scale = tf.matmul(onehot, scale_s)[:, None, None, :]
        shift = tf.matmul(onehot, shift_s)[:, None, None, :]
        y = self.activation(y * scale + shift)
        if out_actions is not None:
            y = y * self.channel_mask(out_actions)[:, None, None, :]
        return y

    def _batch_moments(self, y, onehot):
        """Batch mean/variance per BatchNorm set; updates the moving stats."""
        per_sample_mean = tf.reduce_mean(y, axis=[1, 2])  # [B, C]
        per_sample_sq = tf.reduce_mean(tf.square(y), axis=[1, 2])
        counts = tf.reduce_sum(onehot, axis=0)  # [S]
        safe = tf.maximum(counts, 1.0)[:, None]
        mean_s = tf.matmul(onehot, per_sample_mean, transpose_a=True) / safe
        sq_s = tf.matmul(onehot, per_sample_sq, transpose_a=True) / safe
        var_s = tf.nn.relu(sq_s - tf.square(mean_s))
        present = (counts > 0)[:, None]
        m = self.momentum
        new_mean = tf.where(
            present, m * self.moving_mean + (1 - m) * tf.cast(mean_s, tf.float32),
            self.moving_mean,
        )
        new_var = tf.where(
            present,
            m * self.moving_variance + (1 - m) * tf.cast(var_s, tf.float32),
            self.moving_variance,
        )
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_var)
        return mean_s, var_s

    def folded_weights(self, in_action, out_action):
        """Kernel prefix and bias with inference BatchNorm folded in.

        Args:
            in_action: int in `1..groups`, the previous layer's action
                (ignored when `gated_input=False`).
            out_action: int in `1..groups`, the groups to compute.

        Returns:
            `(kernel, bias)`: kernel `(k, k, in_prefix, out_prefix)` and bias
            `(out_prefix,)` such that `activation(conv(x, kernel) + bias)`
            equals the sliced output.
        """
        in_prefix, out_prefix, bn_set = self._prefixes(in_action, out_action)
        scale, bias = self._folded_bn(bn_set)
        kernel = self.kernel[:, :, :in_prefix, :out_prefix]
        if scale is None:
            return kernel, bias[:out_prefix]
        return kernel * scale[:out_prefix], bias[:out_prefix]

    def _folded_bn(self, bn_set):
        """`(scale, bias)` of inference BatchNorm set `bn_set` per output channel (scale None: no BatchNorm)."""
        if not self.normalization:
            return None, self.bias
        scale = self.gamma[bn_set] * tf.math.rsqrt(
            self.moving_variance[bn_set] + self.epsilon
        )
        return scale, self.beta[bn_set] - self.moving_mean[bn_set] * scale

    def _prefixes(self, in_action, out_action):
        validation.check_action("out_action", out_action, self.groups)
        if not self.prunable_output and int(out_action) != self.groups:
            raise ValueError(f"{self.name} keeps its full output. Received: out_action={out_action}")
        out_prefix = self.filters if int(out_action) == self.groups else int(out_action) * self.group_size
        if self.gated_input:
            validation.check_action("in_action", in_action, self.groups)
            return int(in_action) * self.in_group_size, out_prefix, int(in_action) - 1
        return self.in_channels, out_prefix, 0

    def call_sliced(self, inputs, in_action, out_action):
        """Sliced inference: convolve only the weight prefix.

        Computes `W[:, :, :in_prefix, :out_prefix]` on an input that holds
        only its first `in_prefix` channels; BatchNorm (moving statistics of
        the set for `in_action`) is folded into the kernel. Every sample of
        the batch shares the two actions.

        Args:
            inputs: float tensor `(batch, height, width, in_prefix)` where
                `in_prefix = in_action * in_channels / groups` (or all input
                channels when `gated_input=False`).
            in_action: int in `1..groups`, the previous layer's action.
            out_action: int in `1..groups`, the number of groups to compute.

        Returns:
            A tensor `(batch, new_height, new_width, out_action * filters /
            groups)`, equal to the first channels of the masked path.
        """
        kernel, bias = self.folded_weights(in_action, out_action)
        if inputs.shape[-1] != kernel.shape[2]:
            raise ValueError(
                f"{self.name}.call_sliced expects {kernel.shape[2]} input "
                f"channels for in_action={in_action}. Received: "
                f"inputs.shape={tuple(inputs.shape)}"
            )
        y = self._conv(inputs, tf.cast(kernel, inputs.dtype))
        return self.activation(y + tf.cast(bias, y.dtype))

    # ----------------------------------------------------------------- costs
    def macs(self, in_actions, out_actions):
        """Multiply-accumulates of one sample for the given actions.

        Args:
            in_actions: previous layer's action(s) (int, array or tensor);
                ignored when `gated_input=False`.
            out_actions: this layer's action(s), same shape.

        Returns:
            `out_h * out_w * k * k * in_prefix * out_prefix`, with the same
            shape as `out_actions` (float64 numpy for numpy/int inputs, a
            float32 tensor for tensor inputs).
        """
        per_pair = self.output_hw[0] * self.output_hw[1] * self.kernel_size**2
        out_per_group = self.filters / self.groups
        if tf.is_tensor(out_actions):
            out_p = tf.cast(out_actions, tf.float32) * out_per_group
            if self.gated_input:
                in_p = tf.cast(in_actions, tf.float32) * self.in_group_size
            else:
                in_p = float(self.in_channels)
            return float(per_pair) * in_p * out_p
        out_p = np.asarray(out_actions, np.float64) * out_per_group
        if self.gated_input:
            in_p = np.asarray(in_actions, np.float64) * self.in_group_size
        else:
            in_p = float(self.in_channels)
        return per_pair * in_p * out_p

    @property
    def full_macs(self):
        """Multiply-accumulates of one sample with every group computed."""
        return float(self.macs(self.groups, self.groups))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_hw, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "groups": self.groups,
                "strides": self.strides,
                "padding": self.padding,
                "normalization": self.normalization,
                "gated_input": self.gated_input,
                "prunable_output": self.prunable_output,
                "activation": keras.activations.serialize(self.activation),
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="rnp_tf")
class GatedDepthwiseConv2D(GatedConv2D):
    """Depthwise convolution + per-width BatchNorm + activation on a channel prefix.

    The depthwise conv of an inverted residual (MobileNetV2): every channel
    is filtered on its own, so the output keeps the input's width. When
    `gated_input=True` the previous layer's action says how many input
    groups are non-zero, and exactly that prefix of the output is computed
    (the rest is zero on the masked path, absent on the sliced one). As in
    `GatedConv2D`, BatchNorm keeps one set per input width, picked per
    sample. There is no `filters` and no action of its own: `out_actions`
    and `out_action` are accepted for the conv interface and ignored.

    Args:
        kernel_size: int, size of the square kernel. Defaults to 3.
        groups: number of channel groups `k`. Defaults to 4.
        strides: int stride. Defaults to 1.
        padding: `"same"` or `"valid"`. Defaults to `"same"` (TensorFlow's
            `SAME`: for a 3x3 stride-2 conv, Keras's MobileNetV2
            `ZeroPadding2D(correct_pad(x, 3))` + `"valid"` exactly).
        normalization: BatchNorm after the conv (True, default) or a bias.
        gated_input: whether the input width varies with a previous action.
            Defaults to True.
        activation: Keras activation after BatchNorm. Defaults to `"relu6"`.
        momentum: BatchNorm moving-average momentum. Defaults to 0.9.
        epsilon: BatchNorm variance epsilon. Defaults to 1e-3.
        kernel_initializer: initializer of the depthwise kernel
            `(k, k, channels, 1)`. Defaults to `"he_normal"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Input shape:
        `(batch, height, width, channels)` for `call`; `(batch, height,
        width, in_prefix)` for `call_sliced`.

    Output shape:
        `(batch, new_height, new_width, channels)` for `call` (channels
        beyond the input prefix are zero); `(batch, new_height, new_width,
        in_prefix)` for `call_sliced`.

    Example:

    >>> layer = GatedDepthwiseConv2D(groups=4, strides=2)
    >>> x = tf.random.normal((2, 8, 8, 16))
    >>> layer(x, in_actions=tf.constant([4, 1])).shape
    TensorShape([2, 4, 4, 16])
    >>> layer.call_sliced(x[:1, :, :, :8], in_action=2, out_action=None).shape
    TensorShape([1, 4, 4, 8])
    """

    def __init__(
        self,
        kernel_size=3,
        groups=4,
        strides=1,
        padding="same",
        normalization=True,
        gated_input=True,
        activation="relu6",
        momentum=0.9,
        epsilon=1e-3,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        # `filters` is the input's channel count, known in `build`.
        super().__init__(
            1,
            kernel_size=kernel_size,
            groups=groups,
            strides=strides,
            padding=padding,
            normalization=normalization,
            gated_input=gated_input,
            prunable_output=False,
            activation=activation,
            momentum=momentum,
            epsilon=epsilon,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )

    def build(self, input_shape):
        if len(input_shape) == 4 and input_shape[-1] is not None:
            self.filters = int(input_shape[-1])
            if self.gated_input:
                self.group_size = self.filters // self.groups
        super().build(input_shape)

    def _kernel_shape(self):
        k = self.kernel_size
        return (k, k, self.in_channels, 1)

    def _conv(self, x, kernel):
        strides = [1, self.strides, self.strides, 1]
        return tf.nn.depthwise_conv2d(x, kernel, strides=strides, padding=self.padding.upper())

    def call(self, inputs, in_actions=None, out_actions=None, training=False):
        """Masked execution: the output prefix is the input's (`out_actions` is ignored)."""
        out = in_actions if self.gated_input else None
        return super().call(inputs, in_actions=in_actions, out_actions=out, training=training)

    def _prefixes(self, in_action, out_action):
        if not self.gated_input:
            return self.in_channels, self.in_channels, 0
        validation.check_action("in_action", in_action, self.groups)
        prefix = int(in_action) * self.in_group_size
        return prefix, prefix, int(in_action) - 1

    def folded_weights(self, in_action, out_action=None):
        """Depthwise kernel prefix `(k, k, in_prefix, 1)` and bias `(in_prefix,)` with BatchNorm folded in.

        Args:
            in_action: int in `1..groups`, the previous layer's action
                (ignored when `gated_input=False`).
            out_action: ignored (the output prefix is the input's).

        Returns:
            `(kernel, bias)` such that `activation(depthwise(x, kernel) +
            bias)` equals the sliced output.
        """
        prefix, _, bn_set = self._prefixes(in_action, out_action)
        scale, bias = self._folded_bn(bn_set)
        kernel = self.kernel[:, :, :prefix, :]
        if scale is None:
            return kernel, bias[:prefix]
        return kernel * scale[:prefix, None], bias[:prefix]

    def macs(self, in_actions, out_actions=None):
        """Multiply-accumulates of one sample: `out_h * out_w * k * k * in_prefix`.

        Args:
            in_actions: previous layer's action(s); ignored when
                `gated_input=False`.
            out_actions: ignored but for the shape of the result when the
                input is not gated (the plan passes the full width).

        Returns:
            Same shape as the actions (float64 numpy, or a float32 tensor
            for tensor inputs).
        """
        per_channel = float(self.output_hw[0] * self.output_hw[1] * self.kernel_size**2)
        ref = in_actions if self.gated_input or out_actions is None else out_actions
        if tf.is_tensor(ref):
            ref = tf.cast(ref, tf.float32)
            width = ref * self.in_group_size if self.gated_input else tf.ones_like(ref) * self.in_channels
            return per_channel * width
        ref = np.asarray(ref, np.float64)
        width = ref * self.in_group_size if self.gated_input else np.ones_like(ref) * self.in_channels
        return per_channel * width

    def get_config(self):
        config = super().get_config()
        for key in ("filters", "prunable_output"):
            config.pop(key)
        return config
