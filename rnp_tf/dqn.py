"""Q-learning maths of RNP: rewards, TD targets, Q loss, schedules.

Pure functions on tensors, tested with hand-computed examples. The reward of
action `a_t` at prunable layer `t` is (Lin et al., 2017)::

    r_t = (a_t - 1) * p                       for t < T - 1
    r_t = (a_t - 1) * p - alpha * L_cls       at the last layer

with `p < 0` a penalty per extra group, and the one-step target is
`y_t = r_t + gamma * max_a Q(s_{t+1}, a)` (just `r_t` at the last layer).

Block skipping: a skipped block's decisions are all recorded as `a = 0`, so
each earns `(0 - 1) * p = -p` (one group fewer than the narrowest width:
the agent is paid for the compute it saves, `-n_b * p` for a block of
`n_b` decisions). Only the skip itself was decided: the later decisions
(`live = 0`, `NetworkPlan.live`) have no Q-value to learn; they are
transparent in the targets (their rewards go to the skip's target, undiscounted,
and the skip bootstraps from the next decision taken) and left out of the loss.
"""

import tensorflow as tf


def rewards(actions, ce_loss, penalty, alpha):
    """Per-step rewards of a batch of rollouts.

    Args:
        actions: int tensor `[batch, T]` of actions in `1..k`.
        ce_loss: float tensor `[batch]`, classification loss of each sample
            after runtime pruning.
        penalty: `p`, the (negative) reward per extra group.
        alpha: weight of the classification loss (float or scalar tensor).

    Returns:
        A float32 tensor `[batch, T]`.

    Example:

    >>> rewards(tf.constant([[1, 3]]), tf.constant([2.0]), -0.1, 0.5).numpy()
    array([[ 0. , -1.2]], dtype=float32)
    """
    step = tf.cast(actions - 1, tf.float32) * penalty
    last = -tf.cast(alpha, tf.float32) * tf.cast(ce_loss, tf.float32)
    num_steps = tf.shape(actions)[1]
    is_last = tf.one_hot(num_steps - 1, num_steps, dtype=tf.float32)
    return step + last[:, None] * is_last[None, :]


def td_targets(step_rewards, q_values, gamma, live=None):
    """One-step Q-learning targets, without gradient.

    Args:
        step_rewards: float tensor `[batch, T]` from `rewards`.
        q_values: float tensor `[batch, T, k]`, Q-values of every state.
        gamma: discount factor.
        live: optional float `[batch, T]`, 0 at the decisions a block skip
            left untaken (see the module docstring). None: all taken.

    Returns:
        `[batch, T]` targets: `r_t + gamma * max_a Q(s_{t+1}, a)` for
        `t < T - 1`, `r_{T-1}` at the last step; with `live`, an untaken
        `s_{t+1}` is passed over: `r_t + r_{t+1} + ...` up to the next
        taken decision `s_u`, plus `gamma * max_a Q(s_u, a)`.

    Example:

    >>> q = tf.constant([[[0.0, 1.0], [2.0, 5.0]]])
    >>> td_targets(tf.constant([[0.5, -1.0]]), q, 0.9).numpy()
    array([[ 5. , -1. ]], dtype=float32)
    """
    next_max = tf.reduce_max(tf.stop_gradient(q_values[:, 1:]), axis=-1)
    next_max = tf.pad(next_max, [[0, 0], [0, 1]])
    if live is None:
        return tf.stop_gradient(step_rewards + gamma * next_max)
    live = tf.cast(live, tf.float32)
    after = [tf.zeros_like(step_rewards[:, 0])]  # what follows the last step
    for s in range(step_rewards.shape[1] - 1, 0, -1):  # backwards: what follows step s - 1
        taken = gamma * next_max[:, s - 1]
        passed = step_rewards[:, s] + after[-1]
        after.append(live[:, s] * taken + (1.0 - live[:, s]) * passed)
    return tf.stop_gradient(step_rewards + tf.stack(after[::-1], axis=1))


def q_loss(q_values, actions, targets, loss="mse", live=None):
    """Mean TD loss of the Q-values of the actions taken.

    Args:
        q_values: `[batch, T, k]` Q-values.
        actions: int `[batch, T]` actions in `1..k`.
        targets: `[batch, T]` TD targets.
        loss: `"mse"` (the paper's squared error) or `"huber"`.
        live: optional float `[batch, T]`: the mean runs over the decisions
            taken only (`NetworkPlan.live`). Action 0 (skip) reads the last
            Q-value of its decision.

    Returns:
        A scalar tensor.

    Example:

    >>> q = tf.constant([[[1.0, 2.0]]])
    >>> float(q_loss(q, tf.constant([[2]]), tf.constant([[0.0]])))
    4.0
    """
    k = tf.shape(q_values)[-1]
    taken = tf.reduce_sum(q_values * tf.one_hot(tf.math.floormod(actions - 1, k), k), axis=-1)
    error = targets - taken
    if live is None:
        mean = tf.reduce_mean
    else:
        live = tf.cast(live, error.dtype)
        error = error * live  # an untaken decision's action 0 reads a -1e30 pad: its error must not be squared

        def mean(x):
            return tf.reduce_sum(x * live) / tf.maximum(tf.reduce_sum(live), 1.0)

    if loss == "mse":
        return mean(tf.square(error))
    if loss == "huber":
        abs_error = tf.abs(error)
        quadratic = tf.minimum(abs_error, 1.0)
        return mean(0.5 * quadratic**2 + abs_error - quadratic)
    raise ValueError(f"`loss` must be 'mse' or 'huber'. Received: loss={loss!r}")


def epsilon_at(step, start=1.0, end=0.1, decay_steps=1000):
    """Linearly annealed exploration rate, then held at `end`.

    Args:
        step: number of agent updates done so far.
        start: epsilon at step 0.
        end: the floor, reached after `decay_steps` updates.
        decay_steps: length of the linear ramp (0 means `end` at once).

    Returns:
        A Python float.

    Example:

    >>> epsilon_at(50, start=1.0, end=0.1, decay_steps=100)
    0.55
    """
    if decay_steps <= 0 or step >= decay_steps:
        return float(end)
    return float(start + (end - start) * step / decay_steps)


def phase_at(step, *, robust_steps, agent_steps, backbone_steps, warmup_steps):
    """Training phase of a global step in the RNP schedule (Algorithm 1).

    The schedule is: `robust_steps` prefix-robust backbone steps, then a
    first agent phase of `warmup_steps` steps, then `backbone_steps`
    backbone steps and `agent_steps` agent steps, alternating.

    Args:
        step: the 0-based global training step.
        robust_steps: length of the prefix-robust phase.
        agent_steps: N1, the length of every later agent phase.
        backbone_steps: N2, the length of every backbone phase.
        warmup_steps: length of the first agent phase.

    Returns:
        One of `"robust"`, `"agent"`, `"backbone"`.

    Example:

    >>> [phase_at(s, robust_steps=1, agent_steps=2, backbone_steps=1,
    ...           warmup_steps=3) for s in range(8)]
    ['robust', 'agent', 'agent', 'agent', 'backbone', 'agent', 'agent', 'backbone']
    """
    if step < robust_steps:
        return "robust"
    step -= robust_steps
    if step < warmup_steps:
        return "agent"
    step -= warmup_steps
    cycle = agent_steps + backbone_steps
    if cycle == 0:
        return "agent"
    return "backbone" if step % cycle < backbone_steps else "agent"
