"""The run-time knob: one trained agent, many operating points.

RNP's balance between speed and accuracy moves at inference without
retraining, in three ways, all applied to the agent's Q-values before the
greedy choice (`RNPModel.greedy_q`, the `Greedy` policy of `rnp_tf.rollout`):

- **penalty**: an agent trained with penalty `p0` learned `Q(s, a)` whose
  immediate reward is `(a - 1) * p0`; at penalty `p` that reward is
  `(a - 1) * p`, so the greedy choice maximises `Q(s, a) + (p - p0) * (a - 1)`
  (`reprice`; `RNPModel.set_penalty`).
- **budget**: the penalty whose mean compute on a calibration set is a given
  fraction of the full MACs (`calibration_penalties`, `budget_penalty`,
  `refine_budget`; `RNPModel.calibrate_budget` / `set_budget`).
- **cap**: a hard per-image MAC cap: an action is allowed when the actions so
  far, it, and the narrowest action at every later decision fit the cap
  (`cap_q_values`; `RNPModel.set_compute_cap`).

The functions here are pure (tensors and arrays in, tensors and arrays out);
the model holds the knob's state (`penalty_setting`, the calibration table,
the cap) so that it is saved with the model.

Example:

>>> q = tf.constant([[0.0, 0.0, 0.0, 0.0]])
>>> reprice(q, -0.1).numpy()
array([[ 0. , -0.1, -0.2, -0.3]], dtype=float32)
"""

import numpy as np
import tensorflow as tf

from rnp_tf import validation

CAPPED = -1e30  # the Q-value of an action the cap forbids


def reprice(q, delta, groups=None):
    """Q-values `[batch, k]` re-priced by a penalty change `delta = p - p0`.

    Args:
        q: float `[batch, k]` raw Q-values (`k + 1` at a skippable decision,
            the last one for the skip, action 0).
        delta: a float, a scalar tensor or a `[batch]` tensor.
        groups: `k`; needed only to recognise the skip column.

    Returns:
        `q + delta * (a - 1)` for actions `a = 1..k` (and `a = 0` for the
        skip), same dtype as `q`.
    """
    delta = tf.cast(delta, q.dtype)
    if delta.shape.rank:
        delta = delta[:, None]
    extra = list(range(q.shape[-1]))
    if groups is not None and q.shape[-1] == groups + 1:
        extra[-1] = -1
    return q + delta * tf.constant(extra, q.dtype)[None, :]


def cap_q_values(plan, t, q, decided, cap_macs):
    """Masks the actions that would break a per-image MAC cap.

    Action `a` at decision `t` is feasible when the MACs of the actions
    decided so far, `a`, and the narrowest action at every later decision
    fit the cap. The narrowest action is always feasible once the first
    decision was, so the cap holds for every image. A later decision tied
    to `t` or to an earlier one (`NetworkPlan.tied_to`) is completed with
    its leader's action.

    Args:
        plan: the `rnp_tf.plan.NetworkPlan` (its MAC table).
        t: the decision index.
        q: `[batch, k]` Q-values.
        decided: list of `t` int tensors `[batch]`, the earlier actions.
        cap_macs: the cap in MACs.

    Returns:
        The Q-values with infeasible actions set to `CAPPED`.
    """
    k, count, n = plan.groups, plan.num_decisions, q.shape[-1]  # n = k + 1 at a skippable decision
    batch = tf.shape(q)[0]
    choices = tf.math.floormod(tf.range(1, n + 1), k + 1)  # the skip column is action 0
    columns = [tf.repeat(a[:, None], n, axis=1) for a in decided]
    columns.append(tf.tile(choices[None, :], [batch, 1]))
    for u in range(t + 1, count):  # the narrowest later, but a tied decision takes its leader's action
        leader = plan.tied_to.get(u)
        columns.append(tf.ones([batch, n], tf.int32) if leader is None else columns[leader])
    completions = tf.reshape(tf.stack(columns, axis=-1), [-1, count])
    cost = tf.reshape(plan.macs(completions), [batch, n])
    feasible = cost <= cap_macs * (1 + 1e-6)
    feasible = tf.logical_or(feasible, (choices <= 1)[None, :])
    return tf.where(feasible, q, tf.fill(tf.shape(q), tf.constant(CAPPED, q.dtype)))


def calibration_penalties(trained_penalty, num_points):
    """The penalties a calibration measures: `p0 + d`, `d` evenly from +1 to -2.

    The span is the scale of the last reward `alpha * L_cls` (about 1), so it
    runs from computing everything to the narrowest network.

    Args:
        trained_penalty: `p0`, the penalty the agent was trained with.
        num_points: how many penalties, 2 to 32.

    Returns:
        A float64 array, from the least to the most negative.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or not 2 <= num_points <= 32:
        raise ValueError(f"`num_points` must be an int in 2..32. Received: num_points={num_points!r}")
    return trained_penalty + np.linspace(1.0, -2.0, num_points)


def calibration_table(penalties, fractions):
    """The `[2, 32]` float32 table the model saves: penalties, then mean compute fractions."""
    table = np.zeros((2, 32), np.float32)
    table[0, : len(penalties)] = penalties
    table[1, : len(fractions)] = fractions
    return table


def budget_penalty(table, compute_fraction):
    """The penalty whose calibrated mean compute is `compute_fraction`.

    Interpolates the calibration (made monotone: a smaller budget never gets
    a less negative penalty) and clips to the calibrated range.

    Args:
        table: the `[2, 32]` calibration table.
        compute_fraction: the budget, in (0, 1].

    Returns:
        `(penalty, penalties, fractions)`: the interpolated penalty and the
        monotone calibration it came from.
    """
    validation.check_float("compute_fraction", compute_fraction, 0.0, 1.0, low_open=True)
    table = np.asarray(table)
    count = int(np.count_nonzero(table[1]))
    if count < 2:
        raise ValueError("set_budget needs a calibration: call `model.calibrate_budget(validation_data)` first.")
    penalties, fractions = table[0, :count], table[1, :count]
    # penalties fall from the first entry to the last: so must compute
    fractions = np.minimum.accumulate(fractions)
    order = np.argsort(fractions, kind="stable")
    penalty = float(np.interp(compute_fraction, fractions[order], penalties[order]))
    return penalty, penalties, fractions


def refine_budget(measure, target, penalty, penalties, fractions, tolerance, max_iterations):
    """Bisects the penalty towards mean compute `target` on the calibration set.

    Mean compute falls as the penalty falls. Keeps the closest penalty seen:
    where the agent's compute moves in steps no penalty may land within the
    tolerance.

    Args:
        measure: `measure(penalty) -> mean compute fraction` on the set.
        target: the budget.
        penalty: the starting penalty (`budget_penalty`'s).
        penalties, fractions: the monotone calibration (`budget_penalty`'s).
        tolerance: absolute tolerance on the mean compute fraction.
        max_iterations: measurements at most.

    Returns:
        The penalty whose measured compute was closest to `target`.
    """
    # Bracket: `high` (less negative) computes at least the target, `low` at most.
    above = penalties[fractions >= target]
    below = penalties[fractions <= target]
    high = float(above.min()) if above.size else float(penalties[0])
    low = float(below.max()) if below.size else float(penalties[-1])
    best = (np.inf, penalty)
    for _ in range(max_iterations):
        measured = measure(penalty)
        best = min(best, (abs(measured - target), penalty))
        if best[0] <= tolerance:
            break
        if measured > target:
            high = penalty
        else:
            low = penalty
        penalty = 0.5 * (high + low)
    return best[1]

