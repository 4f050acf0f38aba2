"""The RNP decision agent: per-layer encoders, one shared LSTM, Q-value heads.

At prunable layer `t` the agent globally pools the feature map that feeds the
layer, projects it with encoder `t` to a fixed length, advances one LSTM cell
shared by all layers (its state carries from layer to layer), and decoder `t`
outputs `k` Q-values, one per action "compute the first a groups".
"""

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import validation

# Arguments removed after commit 7fe7dd6: their old default and their write-up.
REMOVED_OPTIONS = {
    "conditioned": (False, "conditioned_agent.md"),
    "extra_inputs": (0, "late_decision.md"),
    "aux_classes": (0, "aux_confidence.md"),
}


@keras.saving.register_keras_serializable(package="rnp_tf")
class DecisionAgent(keras.layers.Layer):
    """LSTM agent that scores the `k` actions of every prunable layer.

    Args:
        feature_channels: list of ints, the channel count of the feature map
            feeding each prunable layer (one entry per layer).
        groups: number of actions `k`. Defaults to 4.
        embed_dim: size of each encoder's projection. Defaults to 64.
        units: size of the shared LSTM cell. Defaults to 64.
        skippable: indices of the decisions that may skip their block
            (`NetworkPlan.skippable`): their decoder outputs `k + 1`
            Q-values, the last one for "skip" (action 0). Defaults to none.
        tied: indices of the decisions that take an earlier decision's
            action (`NetworkPlan.tied_to`): the agent does not run there and
            has no encoder or decoder for them. Defaults to none.
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

    def __init__(self, feature_channels, groups=4, embed_dim=64, units=64, skippable=(), tied=(), **kwargs):
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
        self.skippable = sorted(int(t) for t in skippable)
        if any(not 0 <= t < self.num_layers for t in self.skippable):
            raise ValueError(
                f"`skippable` must hold decision indices in [0, {self.num_layers}). Received: skippable={skippable!r}"
            )
        self.tied = sorted(int(t) for t in tied)
        if any(not 0 < t < self.num_layers for t in self.tied) or set(self.tied) & set(self.skippable):
            raise ValueError(
                f"`tied` must hold decision indices in [1, {self.num_layers}), none of them skippable. "
                f"Received: tied={tied!r}"
            )
        self.encoders = [
            None if t in self.tied else
            keras.layers.Dense(self.embed_dim, activation="relu", name=f"encoder_{t}", dtype=self.dtype_policy)
            for t in range(self.num_layers)
        ]
        self.cell = keras.layers.LSTMCell(self.units, name="lstm", dtype=self.dtype_policy)
        self.decoders = [
            None if t in self.tied else
            keras.layers.Dense(
                self.groups + (t in self.skippable), name=f"decoder_{t}", dtype=self.dtype_policy
            )
            for t in range(self.num_layers)
        ]

    def build(self, input_shape=None):
        for encoder, channels in zip(self.encoders, self.feature_channels):
            if encoder is not None:
                encoder.build((None, channels))
        self.cell.build((None, self.embed_dim))
        for decoder in self.decoders:
            if decoder is not None:
                decoder.build((None, self.units))
        self.built = True

    def _check_decides(self, t):
        if t in self.tied:
            raise ValueError(f"Decision {t} is tied to an earlier one: the agent does not decide it. Received: t={t}")

    def _pooled(self, t, features):
        """Spatial mean of a feature map, zero-padded to `feature_channels[t]`."""
        pooled = tf.reduce_mean(tf.cast(features, self.compute_dtype), axis=[1, 2])
        missing = self.feature_channels[t] - pooled.shape[-1]
        if missing:
            pooled = tf.pad(pooled, [[0, 0], [0, missing]])
        return pooled

    def initial_state(self, batch_size):
        """Zero LSTM state `[h, c]` for a batch.

        Args:
            batch_size: int or scalar int tensor.

        Returns:
            A list of two `(batch, units)` zero tensors.
        """
        zeros = tf.zeros(tf.stack([batch_size, self.units]), self.compute_dtype)
        return [zeros, zeros]

    def step(self, t, features, state):
        """Q-values of layer `t` from the feature map that feeds it.

        Args:
            t: Python int, index of the prunable layer.
            features: `(batch, h, w, c)` feature map; when `c` is smaller
                than `feature_channels[t]` (sliced execution) the missing
                channels count as zero.
            state: the LSTM state `[h, c]` carried from layer `t - 1`.

        Returns:
            `(q_values, new_state)`, q_values of shape `(batch, groups)`.
        """
        return self.decide(t, self._pooled(t, features), state)

    def decide(self, t, pooled, state):
        """Q-values of layer `t` from pooled features: the agent's equations, written once.

        Encoder `t`, the shared LSTM cell, decoder `t`. Every path calls it:
        `step` after pooling a feature map, and each executor of
        `rnp_tf.rollout` after pooling its own representation of the map.

        Args:
            t: Python int, index of the prunable layer.
            pooled: `(batch, feature_channels[t])` spatial means of the map
                feeding layer `t` (a channel prefix zero-padded).
            state: the LSTM state `[h, c]` carried from layer `t - 1`.

        Returns:
            `(q_values, new_state)`, q_values of shape `(batch, groups)`.

        Example:

        >>> agent = DecisionAgent([16, 32], groups=4)
        >>> agent.build()
        >>> q, state = agent.decide(0, tf.zeros((2, 16)), agent.initial_state(2))
        >>> q.shape
        TensorShape([2, 4])
        """
        if not self.built:
            self.build()
        self._check_decides(t)
        encoder, decoder, cell = self.encoders[t], self.decoders[t], self.cell
        return equations(
            pooled,
            state,
            encoder=(encoder.kernel, encoder.bias),
            lstm=(cell.kernel, cell.recurrent_kernel, cell.bias),
            decoder=(decoder.kernel, decoder.bias),
            activation=cell.activation,
            recurrent_activation=cell.recurrent_activation,
        )

    def weights_of(self, t):
        """The weights `equations` reads at layer `t`, as numpy arrays (for graphs built from constants).

        Returns:
            A dict with `encoder`, `lstm`, `decoder` (tuples of arrays),
            `activation` and `recurrent_activation`.
        """
        self._check_decides(t)
        encoder, decoder, cell = self.encoders[t], self.decoders[t], self.cell
        return {
            "encoder": (np.asarray(encoder.kernel), np.asarray(encoder.bias)),
            "lstm": (np.asarray(cell.kernel), np.asarray(cell.recurrent_kernel), np.asarray(cell.bias)),
            "decoder": (np.asarray(decoder.kernel), np.asarray(decoder.bias)),
            "activation": cell.activation,
            "recurrent_activation": cell.recurrent_activation,
        }

    def call(self, inputs):
        """Q-values of every layer for a list of given feature maps."""
        if len(inputs) != self.num_layers:
            raise ValueError(
                f"DecisionAgent expects {self.num_layers} feature maps. "
                f"Received: {len(inputs)}"
            )
        state = self.initial_state(tf.shape(inputs[0])[0])
        q_values = []
        for t, features in enumerate(inputs):
            if t in self.tied:  # no Q-value of its own
                q_values.append(tf.zeros_like(q_values[-1]))
                continue
            q, state = self.step(t, features, state)
            q_values.append(q)
        return stack_q_values(q_values)

    def macs(self):
        """Multiply-accumulates of one sample's decisions (Dense and LSTM; tied decisions cost nothing)."""
        decided = [t for t in range(self.num_layers) if t not in self.tied]
        encoders = sum(self.feature_channels[t] * self.embed_dim for t in decided)
        lstm = len(decided) * 4 * self.units * (self.embed_dim + self.units)
        decoders = (len(decided) * self.groups + len(self.skippable)) * self.units
        return float(encoders + lstm + decoders)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "feature_channels": list(self.feature_channels),
                "groups": self.groups,
                "embed_dim": self.embed_dim,
                "units": self.units,
            }
        )
        if self.skippable:
            config["skippable"] = list(self.skippable)
        if self.tied:
            config["tied"] = list(self.tied)
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuilds an agent from `get_config`, including configs of older releases.

        The conditioned, extra-input and auxiliary-classifier agents were
        removed after commit 7fe7dd6: their arguments are dropped when they
        hold their old default, and refused otherwise (other weights).
        """
        return cls(**validation.drop_removed_options(config, REMOVED_OPTIONS, "DecisionAgent"))


class ConstantDecisions:
    """`DecisionAgent.decide` on graph constants: the agent's weights as they are when a graph is traced.

    What the inference engine's batch-1 graphs use: a decision's few small
    matmuls then read no variable, about 9% of MobileNetV2's time at batch
    1. A graph traced with it keeps the weights it was traced
    with; trace it again after the agent's weights change.

    Args:
        agent: the `DecisionAgent`.

    Example:

    >>> frozen = ConstantDecisions(model.agent)
    >>> q, state = frozen.decide(0, pooled, frozen.initial_state(1))  # as model.agent.decide
    """

    def __init__(self, agent):
        self.agent = agent

    def initial_state(self, batch):
        """The agent's zero LSTM state (`DecisionAgent.initial_state`)."""
        return self.agent.initial_state(batch)

    def decide(self, t, pooled, state):
        """`(q_values, new_state)` of decision `t`, as `DecisionAgent.decide`."""
        with tf.init_scope():  # read eagerly, also while a graph is traced
            weights = self.agent.weights_of(t)

        def constants(arrays):
            return tuple(tf.constant(array) for array in arrays)

        return equations(
            pooled,
            state,
            encoder=constants(weights["encoder"]),
            lstm=constants(weights["lstm"]),
            decoder=constants(weights["decoder"]),
            activation=weights["activation"],
            recurrent_activation=weights["recurrent_activation"],
        )


def equations(pooled, state, encoder, lstm, decoder, activation, recurrent_activation):
    """The decision network's equations: encoder, one LSTM step, decoder.

    Written once for every path: `DecisionAgent.decide` calls it on its
    variables, the exporters on frozen constants.

    Args:
        pooled: `(batch, channels)` pooled features (a prefix zero-padded).
        state: `[h, c]`, each `(batch, units)`.
        encoder: `(kernel, bias)` of the layer's encoder (ReLU).
        lstm: `(kernel, recurrent_kernel, bias)` of the shared LSTM cell
            (gates in Keras's order: input, forget, cell, output).
        decoder: `(kernel, bias)` of the layer's decoder (linear).
        activation: the cell's activation (tanh).
        recurrent_activation: the gates' activation (sigmoid).

    Returns:
        `(q_values (batch, k), [h, c])`.

    Example:

    >>> units = 2
    >>> q, (h, c) = equations(
    ...     tf.ones((1, 3)), [tf.zeros((1, units))] * 2,
    ...     encoder=(tf.ones((3, 4)), tf.zeros(4)),
    ...     lstm=(tf.zeros((4, 4 * units)), tf.zeros((units, 4 * units)), tf.zeros(4 * units)),
    ...     decoder=(tf.ones((units, 4)), tf.zeros(4)),
    ...     activation=tf.tanh, recurrent_activation=tf.sigmoid)
    >>> q.shape
    TensorShape([1, 4])
    """
    x = tf.nn.relu(tf.matmul(pooled, encoder[0]) + encoder[1])
    h, c = state
    kernel, recurrent, bias = lstm
    z = tf.matmul(x, kernel) + tf.matmul(h, recurrent) + bias
    zi, zf, zc, zo = tf.split(z, 4, axis=1)
    c = recurrent_activation(zf) * c + recurrent_activation(zi) * activation(zc)
    h = recurrent_activation(zo) * activation(c)
    return tf.matmul(h, decoder[0]) + decoder[1], [h, c]


def stack_q_values(q_values):
    """Stacks per-decision Q-values into `[batch, T, n]`, the narrower ones padded.

    With skippable blocks the skippable decisions have `k + 1` Q-values and
    the others `k`: these get a last column of -1e30 (`rnp_tf.knob.CAPPED`),
    an action never chosen greedily and never the maximum of a TD target.

    Example:

    >>> stack_q_values([tf.zeros((2, 4)), tf.zeros((2, 5))]).shape
    TensorShape([2, 2, 5])
    """
    width = max(q.shape[-1] for q in q_values)
    padded = [
        q if q.shape[-1] == width else tf.pad(q, [[0, 0], [0, width - q.shape[-1]]], constant_values=-1e30)
        for q in q_values
    ]
    return tf.stack(padded, axis=1)


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
