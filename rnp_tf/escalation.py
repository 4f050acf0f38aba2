"""Anytime escalation: answer at width 1, widen only while the answer is unsure.

An `AnytimeNetwork` gives every width's logits. Escalation stops an image at
the first width whose stop rule fires (width `k` always stops), and the image
costs the MACs of that width (`AnytimeNetwork.width_macs`). Two stop rules:

- `threshold_exits`: stop when the head's top softmax probability reaches a
  threshold (the calibrated baseline);
- `StopAgent`: RNP's MDP over the incremental groups. State: the heads'
  confidences so far (top probability, margin, entropy) read by an LSTM;
  actions stop / go on; reward `p` (< 0) per extra group and
  `-alpha * L_cls` of the head it stops at; trained by one-step Q-learning
  (`train_stop_agent`). Its run-time knob is a bias added to Q(stop).

Example:

>>> logits = np.array([[[4.0, 0.0], [0.0, 4.0]], [[0.0, 0.1], [0.0, 5.0]]])
>>> threshold_exits(logits, 0.9).tolist()
[1, 2]
"""

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import validation


def confidence_features(logits):
    """Top probability, margin (top minus second) and entropy of every width's head.

    Args:
        logits: `[n, k, classes]`.

    Returns:
        float32 `[n, k, 3]`.
    """
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top2 = np.sort(p, axis=-1)[..., -2:]
    entropy = -(p * np.log(p + 1e-12)).sum(-1)
    return np.stack([top2[..., 1], top2[..., 1] - top2[..., 0], entropy], axis=-1).astype(np.float32)


def first_stop(stop):
    """Exit width (1-based) of every image: the first width where `stop` is True, else the last.

    Args:
        stop: bool `[n, k]`.

    Returns:
        int `[n]` in `1..k`.
    """
    stop = np.asarray(stop, bool).copy()
    stop[:, -1] = True
    return stop.argmax(axis=1) + 1


def threshold_exits(logits, threshold):
    """Exit widths of the confidence-threshold rule.

    Args:
        logits: `[n, k, classes]`.
        threshold: stop at the first width whose top softmax probability is
            at least this.

    Returns:
        int `[n]` in `1..k`.
    """
    return first_stop(confidence_features(logits)[..., 0] >= threshold)


def exit_metrics(logits, labels, exits, width_fractions):
    """Accuracy and mean compute of images answered at `exits`.

    Args:
        logits: `[n, k, classes]`.
        labels: `[n]`.
        exits: int `[n]` in `1..k`.
        width_fractions: `[k]` compute of each exit width (any unit).

    Returns:
        `(accuracy, mean_compute)`.
    """
    exits = np.asarray(exits)
    chosen = np.asarray(logits)[np.arange(len(exits)), exits - 1]
    return float((chosen.argmax(-1) == np.asarray(labels)).mean()), float(np.asarray(width_fractions)[exits - 1].mean())


def shuffled(exits, seed):
    """The same exit widths dealt to other images: the control that isolates the per-image choice."""
    return np.random.default_rng(seed).permutation(np.asarray(exits))


@keras.saving.register_keras_serializable(package="rnp_tf")
class StopAgent(keras.Model):
    """The stop / go-on Q-network: an LSTM over the heads' confidences.

    Args:
        groups: `k`, the number of widths.
        units: LSTM units. Defaults to 16.

    Returns (of `call`):
        Q-values `[n, k, 2]` (stop, go on) for the confidence features
        `[n, k, 3]` of `confidence_features`.

    Example:

    >>> agent = StopAgent(groups=3)
    >>> agent(np.zeros((2, 3, 3), np.float32)).shape
    TensorShape([2, 3, 2])
    """

    def __init__(self, groups, units=16, **kwargs):
        super().__init__(**kwargs)
        self.groups = validation.check_positive_int("groups", groups)
        self.units = validation.check_positive_int("units", units)
        self.lstm = keras.layers.LSTM(units, return_sequences=True, name="lstm")
        self.q = keras.layers.Dense(2, name="q")

    def call(self, features):
        steps = tf.one_hot(tf.range(self.groups), self.groups)[None] * tf.ones_like(features[..., :1])
        return self.q(self.lstm(tf.concat([features, steps], axis=-1)))

    def exits(self, features, bias=0.0):
        """Exit widths: the first width where `Q(stop) + bias >= Q(go on)`."""
        q = self(np.asarray(features, np.float32)).numpy()
        return first_stop(q[..., 0] + bias >= q[..., 1])

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "units": self.units}


def q_targets(q, width_losses, penalty, alpha, gamma):
    """One-step Q-learning targets of every (width, action), and which exist.

    Stopping at width `a` ends the episode with reward `-alpha * L_a`; going
    on costs `penalty` and leads to width `a + 1` (there is no going on from
    the last width).

    Args:
        q: current Q-values `[n, k, 2]` (no gradient is taken).
        width_losses: `[n, k]` cross-entropy of every head.
        penalty: `p` (< 0), reward of each extra group.
        alpha: weight of the classification loss.
        gamma: discount.

    Returns:
        `(targets [n, k, 2], valid [n, k, 2])`.

    Example:

    >>> t, v = q_targets(np.array([[[0.0, 0.0], [-0.5, 9.0]]]), np.array([[1.0, 0.5]]), -0.1, 1.0, 1.0)
    >>> t[0].tolist(), v[0].tolist()
    ([[-1.0, -0.6], [-0.5, 0.0]], [[1.0, 1.0], [1.0, 0.0]])
    """
    q = np.asarray(q, np.float64)
    stop = -alpha * np.asarray(width_losses, np.float64)
    following = q[:, 1:].copy()
    following[:, -1, 1] = -np.inf  # the last width can only stop
    go = np.zeros_like(stop)
    go[:, :-1] = penalty + gamma * following.max(-1)
    valid = np.ones(q.shape)
    valid[:, -1, 1] = 0.0
    return np.stack([stop, go], -1), valid


def train_stop_agent(agent, features, width_losses, penalty, alpha=1.0, gamma=1.0, epochs=60, batch_size=128,
                     learning_rate=1e-2, seed=0):
    """Trains a `StopAgent` by one-step Q-learning on every image's transitions.

    Every (width, action) of every image is a transition (its next state is
    known), so no exploration is needed: each epoch recomputes the targets
    from the current Q-values and regresses on them.

    Args:
        agent: a `StopAgent`.
        features: `[n, k, 3]` from `confidence_features`.
        width_losses: `[n, k]` per-head cross-entropy.
        penalty: `p` (< 0).
        alpha, gamma: the reward's loss weight and the discount.
        epochs, batch_size, learning_rate, seed: the optimisation.

    Returns:
        The agent.
    """
    validation.check_float("penalty", penalty, high=0.0)
    features = np.asarray(features, np.float32)
    optimizer = keras.optimizers.Adam(learning_rate)
    rng = np.random.default_rng(seed)
    agent(features[:1])

    @tf.function
    def step(x, targets, valid):
        with tf.GradientTape() as tape:
            err = (agent(x) - targets) * valid
            loss = tf.reduce_sum(err**2) / tf.reduce_sum(valid)
        optimizer.apply_gradients(zip(tape.gradient(loss, agent.trainable_variables), agent.trainable_variables))

    for _ in range(epochs):
        targets, valid = q_targets(agent(features).numpy(), width_losses, penalty, alpha, gamma)
        order = rng.permutation(len(features))
        for start in range(0, len(order), batch_size):
            i = order[start:start + batch_size]
            step(features[i], targets[i].astype(np.float32), valid[i].astype(np.float32))
    return agent
