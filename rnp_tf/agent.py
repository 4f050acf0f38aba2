"""The RNP decision agent: per-layer encoders, one shared LSTM, Q-value heads.

At prunable layer `t` the agent globally pools the feature map that feeds the
layer, projects it with encoder `t` to a fixed length, advances one LSTM cell
shared by all layers (its state carries from layer to layer), and decoder `t`
outputs `k` Q-values, one per action "compute the first a groups".
"""

import keras
import tensorflow as tf

from rnp_tf import validation


@keras.saving.register_keras_serializable(package="rnp_tf")
class DecisionAgent(keras.layers.Layer):
    """LSTM agent that scores the `k` actions of every prunable layer.

    Args:
        feature_channels: list of ints, the channel count of the feature map
            feeding each prunable layer (one entry per layer).
        groups: number of actions `k`. Defaults to 4.
        embed_dim: size of each encoder's projection. Defaults to 64.
        units: size of the shared LSTM cell. Defaults to 64.
        conditioned: if True every encoder also reads one scalar
            *condition* per image (rnp_tf uses it for the run-time
            speed/accuracy knob: a normalised log-penalty). Defaults to False.
        extra_inputs: number of further per-image scalars every encoder
            reads (`RNPModel(late_decision=True)` feeds the narrowest
            network's softmax confidence: 3 values). Defaults to 0.
        aux_classes: if > 0, every layer gets a linear auxiliary classifier
            over `aux_classes` classes on the pooled features it decides
            from (`aux_logits`), and the encoder also reads that
            classifier's confidence (`confidence_features`: 3 values). The
            classifiers are trained on labels by the caller (a gradient
            stop keeps the Q-learning loss out of them and of the
            backbone). `RNPModel(aux_confidence=True)` sets it. Defaults
            to 0 (the paper's agent).
        **kwargs: base `keras.layers.Layer` arguments.

    Input shape (of `call`):
        a list of `len(feature_channels)` 4D feature maps
        `(batch, h_t, w_t, c_t)`; each may hold only a channel prefix
        (sliced execution), the rest being zero.

    Output shape (of `call`):
        `(batch, num_layers, groups)` Q-values.

    Example:

    >>> agent = DecisionAgent([8, 16], groups=4)
    >>> state = agent.initial_state(2)
    >>> q, state = agent.step(0, tf.zeros((2, 5, 5, 8)), state)
    >>> q.shape
    TensorShape([2, 4])
    """

    def __init__(
        self, feature_channels, groups=4, embed_dim=64, units=64, conditioned=False, extra_inputs=0,
        aux_classes=0, **kwargs
    ):
        super().__init__(**kwargs)
        if not feature_channels:
            raise ValueError(
                "`feature_channels` must list at least one prunable layer. "
                f"Received: feature_channels={feature_channels!r}"
            )
        self.feature_channels = [
            validation.check_positive_int("feature_channels", c) for c in feature_channels
        ]
        self.groups = validation.check_positive_int("groups", groups)
        self.embed_dim = validation.check_positive_int("embed_dim", embed_dim)
        self.units = validation.check_positive_int("units", units)
        self.num_layers = len(self.feature_channels)
        self.conditioned = bool(conditioned)
        self.extra_inputs = validation.check_non_negative_int("extra_inputs", extra_inputs)
        self.aux_classes = validation.check_non_negative_int("aux_classes", aux_classes)
        if self.aux_classes == 1:
            raise ValueError(f"`aux_classes` must be 0 (none) or >= 2. Received: aux_classes={aux_classes}")
        self.aux_heads = [
            keras.layers.Dense(self.aux_classes, name=f"aux_{t}", dtype=self.dtype_policy)
            for t in range(self.num_layers if self.aux_classes else 0)
        ]
        self.encoders = [
            keras.layers.Dense(self.embed_dim, activation="relu", name=f"encoder_{t}", dtype=self.dtype_policy)
            for t in range(self.num_layers)
        ]
        self.cell = keras.layers.LSTMCell(self.units, name="lstm", dtype=self.dtype_policy)
        self.decoders = [
            keras.layers.Dense(self.groups, name=f"decoder_{t}", dtype=self.dtype_policy)
            for t in range(self.num_layers)
        ]

    def build(self, input_shape=None):
        extra = self._extra_width
        for encoder, channels in zip(self.encoders, self.feature_channels):
            encoder.build((None, channels + extra))
        self.cell.build((None, self.embed_dim))
        for decoder in self.decoders:
            decoder.build((None, self.units))
        for head, channels in zip(self.aux_heads, self.feature_channels):
            head.build((None, channels))
        self.built = True

    @property
    def _extra_width(self):
        return (1 if self.conditioned else 0) + self.extra_inputs + (3 if self.aux_classes else 0)

    def _pooled(self, t, features):
        """Spatial mean of a feature map, zero-padded to `feature_channels[t]`."""
        pooled = tf.reduce_mean(tf.cast(features, self.compute_dtype), axis=[1, 2])
        missing = self.feature_channels[t] - pooled.shape[-1]
        if missing:
            pooled = tf.pad(pooled, [[0, 0], [0, missing]])
        return pooled

    def aux_logits(self, t, features):
        """The auxiliary classifier's logits at layer `t` (agents built with `aux_classes > 0`).

        The features are read through a gradient stop: training the
        classifier on labels leaves the backbone as it is.

        Args:
            t: Python int, index of the prunable layer.
            features: the `(batch, h, w, c)` feature map feeding layer `t`
                (a channel prefix counts the rest as zero, as in `step`).

        Returns:
            `(batch, aux_classes)` logits.
        """
        if not self.aux_classes:
            raise ValueError("This DecisionAgent has no auxiliary classifiers. Received: aux_classes=0")
        return self.aux_heads[t](tf.stop_gradient(self._pooled(t, features)))

    def initial_state(self, batch_size):
        """Zero LSTM state `[h, c]` for a batch.

        Args:
            batch_size: int or scalar int tensor.

        Returns:
            A list of two `(batch, units)` zero tensors.
        """
        zeros = tf.zeros(tf.stack([batch_size, self.units]), self.compute_dtype)
        return [zeros, zeros]

    def step(self, t, features, state, condition=None, extra=None, return_aux=False):
        """Q-values of layer `t` from the feature map that feeds it.

        Args:
            t: Python int, index of the prunable layer.
            features: `(batch, h, w, c)` feature map; when `c` is smaller
                than `feature_channels[t]` (sliced execution) the missing
                channels count as zero.
            state: the LSTM state `[h, c]` carried from layer `t - 1`.
            condition: `(batch,)` float condition of a conditioned agent
                (required then, ignored otherwise).
            extra: `(batch, extra_inputs)` further inputs (required when
                `extra_inputs > 0`, ignored otherwise).
            return_aux: also return the auxiliary classifier's logits
                (`aux_logits`; None without `aux_classes`), so that a caller
                training them does not compute them twice.

        Returns:
            `(q_values, new_state)`, q_values of shape `(batch, groups)`;
            `(q_values, new_state, aux_logits)` with `return_aux=True`.
        """
        pooled = self._pooled(t, features)
        inputs, aux = [pooled], None
        if self.aux_classes:  # what the early classifier makes of this image, as the agent sees it
            aux = self.aux_heads[t](tf.stop_gradient(pooled))
            inputs.append(tf.cast(tf.stop_gradient(confidence_features(aux)), pooled.dtype))
        if self.conditioned:
            if condition is None:
                raise ValueError("A conditioned DecisionAgent needs `condition` (one value per image).")
            condition = tf.cast(tf.reshape(condition, [-1, 1]), pooled.dtype)
            condition = tf.broadcast_to(condition, [tf.shape(pooled)[0], 1])
            inputs.append(condition)
        if self.extra_inputs:
            if extra is None:
                raise ValueError(
                    f"This DecisionAgent reads {self.extra_inputs} extra inputs per image: pass `extra`."
                )
            inputs.append(tf.cast(tf.reshape(extra, [-1, self.extra_inputs]), pooled.dtype))
        embedded = self.encoders[t](tf.concat(inputs, axis=-1) if len(inputs) > 1 else pooled)
        output, new_state = self.cell(embedded, state)
        if return_aux:
            return self.decoders[t](output), list(new_state), aux
        return self.decoders[t](output), list(new_state)

    def call(self, inputs, condition=None, extra=None):
        """Q-values of every layer for a list of given feature maps."""
        if len(inputs) != self.num_layers:
            raise ValueError(
                f"DecisionAgent expects {self.num_layers} feature maps. "
                f"Received: {len(inputs)}"
            )
        state = self.initial_state(tf.shape(inputs[0])[0])
        q_values = []
        for t, features in enumerate(inputs):
            q, state = self.step(t, features, state, condition, extra)
            q_values.append(q)
        return tf.stack(q_values, axis=1)

    def macs(self):
        """Multiply-accumulates of one sample's decisions (Dense and LSTM)."""
        encoders = sum((c + self._extra_width) * self.embed_dim for c in self.feature_channels)
        lstm = self.num_layers * 4 * self.units * (self.embed_dim + self.units)
        decoders = self.num_layers * self.units * self.groups
        aux = sum(c * self.aux_classes for c in self.feature_channels)
        return float(encoders + lstm + decoders + aux)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "feature_channels": list(self.feature_channels),
                "groups": self.groups,
                "embed_dim": self.embed_dim,
                "units": self.units,
                "conditioned": self.conditioned,
                "extra_inputs": self.extra_inputs,
                "aux_classes": self.aux_classes,
            }
        )
        return config


def greedy_actions(q_values):
    """Actions with the highest Q-value, in `1..k`.

    Args:
        q_values: `(batch, k)` tensor.

    Returns:
        An int32 tensor `(batch,)`.

    Example:

    >>> greedy_actions(tf.constant([[0.1, 0.9, 0.0]])).numpy()
    array([2], dtype=int32)
    """
    return tf.argmax(q_values, axis=-1, output_type=tf.int32) + 1


def epsilon_greedy_actions(q_values, epsilon):
    """Greedy actions, each replaced by a uniform one with probability epsilon.

    Args:
        q_values: `(batch, k)` tensor.
        epsilon: exploration rate in [0, 1] (float or scalar tensor).

    Returns:
        An int32 tensor `(batch,)` with values in `1..k`.

    Example:

    >>> a = epsilon_greedy_actions(tf.zeros((5, 4)), 1.0)
    >>> bool(tf.reduce_all((a >= 1) & (a <= 4)))
    True
    """
    batch = tf.shape(q_values)[0]
    k = tf.shape(q_values)[1]
    random = tf.random.uniform([batch], 1, k + 1, dtype=tf.int32)
    explore = tf.random.uniform([batch]) < tf.cast(epsilon, tf.float32)
    return tf.where(explore, random, greedy_actions(q_values))


def confidence_features(logits):
    """How sure a classifier is of each answer: the late-decision agent's extra inputs.

    Three values per image from its logits: the top softmax probability,
    the margin between the two highest probabilities, and the entropy
    divided by `log(num_classes)` (0 = certain, 1 = uniform).

    Args:
        logits: float tensor `[batch, num_classes]`.

    Returns:
        A float32 tensor `[batch, 3]`.

    Example:

    >>> confidence_features(tf.constant([[10.0, 0.0, 0.0]])).numpy().round(2)
    array([[1.  , 1.  , 0.  ]], dtype=float32)
    """
    logits = tf.cast(logits, tf.float32)
    probs = tf.nn.softmax(logits)
    top2 = tf.math.top_k(probs, k=2).values
    num_classes = tf.cast(tf.shape(logits)[-1], tf.float32)
    entropy = -tf.reduce_sum(probs * tf.nn.log_softmax(logits), axis=-1) / tf.math.log(num_classes)
    return tf.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy], axis=-1)
