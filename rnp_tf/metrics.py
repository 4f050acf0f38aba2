"""Streaming metrics that make a collapsed policy visible at a glance.

A policy that gives every image the same actions shows as a
`compute_spread` of 0 and, at each layer, one action with a share of 1.
"""

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="rnp_tf")
class StdDev(keras.metrics.Metric):
    """Standard deviation of a stream of per-sample values.

    Args:
        name: metric name. Defaults to `"std"`.
        **kwargs: base `keras.metrics.Metric` arguments.

    Example:

    >>> m = StdDev()
    >>> m.update_state([0.0, 1.0])
    >>> float(m.result())
    0.5
    """

    def __init__(self, name="std", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.total_sq = self.add_variable(shape=(), initializer="zeros", name="total_sq")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, values, sample_weight=None):
        values = tf.reshape(tf.cast(values, "float32"), [-1])
        self.total.assign_add(tf.reduce_sum(values))
        self.total_sq.assign_add(tf.reduce_sum(tf.square(values)))
        self.count.assign_add(tf.cast(tf.size(values), "float32"))

    def result(self):
        count = tf.maximum(self.count, 1.0)
        mean = self.total / count
        return tf.sqrt(tf.nn.relu(self.total_sq / count - tf.square(mean)))


@keras.saving.register_keras_serializable(package="rnp_tf")
class ActionShares(keras.metrics.Metric):
    """Share of each action at each prunable layer.

    `result()` is a dict `{"share_l{t}_a{a}": share}` (layers and actions
    numbered from 1), so every share shows in the progress bar and the
    History; `shares()` gives the `[num_layers, groups]` array.

    Args:
        num_layers: number of prunable layers.
        groups: number of actions `k`.
        name: metric name. Defaults to `"action_shares"`.
        **kwargs: base `keras.metrics.Metric` arguments.

    Example:

    >>> m = ActionShares(num_layers=1, groups=2)
    >>> m.update_state([[1], [2], [2], [2]])
    >>> {k: float(v) for k, v in m.result().items()}
    {'share_l1_a1': 0.25, 'share_l1_a2': 0.75}
    """

    def __init__(self, num_layers, groups, name="action_shares", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_layers = int(num_layers)
        self.groups = int(groups)
        self.counts = self.add_variable(
            shape=(self.num_layers, self.groups), initializer="zeros", name="counts"
        )

    def update_state(self, actions, sample_weight=None):
        actions = tf.cast(actions, tf.int32)
        onehot = tf.one_hot(actions - 1, self.groups, dtype="float32")
        self.counts.assign_add(tf.reduce_sum(onehot, axis=0))

    def _normalised(self):
        total = tf.maximum(tf.reduce_sum(self.counts, axis=1, keepdims=True), 1.0)
        return self.counts / total

    def result(self):
        shares = self._normalised()
        return {
            f"share_l{t + 1}_a{a + 1}": shares[t, a]
            for t in range(self.num_layers)
            for a in range(self.groups)
        }

    def shares(self):
        """The `[num_layers, groups]` share array as numpy."""
        return np.asarray(self._normalised())

    def get_config(self):
        return {**super().get_config(), "num_layers": self.num_layers, "groups": self.groups}
