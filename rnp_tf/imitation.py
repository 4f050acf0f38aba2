"""Imitation of the oracle: a warm start for the agent (an option).

The paper trains the agent by Q-learning from scratch. An oracle that picks,
for every image, the cheapest static width mix that still does the job
shows large room over static pruning at equal compute, so an agent can
first be taught to imitate it (behaviour cloning) and then be refined by
the paper's Algorithm 1 (`RNPModel.fit`). This module labels images with
the soft oracle's mixes and trains the agent on those labels.

Example:

>>> mixes = candidate_mixes(model.num_prunable, model.groups, max_mixes=256)
>>> targets = soft_oracle_actions(model, x_train, y_train, mixes, margin=0.1)
>>> history = imitate(model, x_train, targets, epochs=5)
>>> model.fit(train, epochs=6)  # Q-learning refinement (Algorithm 1)
"""

import itertools

import numpy as np

from rnp_tf import validation


def candidate_mixes(num_prunable, groups, max_mixes, seed=0):
    """Every per-layer width mix, or the uniform mixes plus a seeded sample of the others.

    Args:
        num_prunable: decisions per image.
        groups: `k`.
        max_mixes: most mixes returned (at least `groups`).
        seed: sampling seed.

    Returns:
        int array `[mixes, num_prunable]`, the full network last.

    Example:

    >>> candidate_mixes(2, 2, max_mixes=16).tolist()
    [[1, 1], [1, 2], [2, 1], [2, 2]]
    """
    if max_mixes < groups:
        raise ValueError(f"`max_mixes` must be >= groups ({groups}). Received: max_mixes={max_mixes}")
    total = groups**num_prunable
    if total <= max_mixes:
        return np.array(list(itertools.product(range(1, groups + 1), repeat=num_prunable)))
    uniform = [np.full(num_prunable, a) for a in range(1, groups + 1)]
    rng = np.random.default_rng(seed)
    chosen = {tuple(m) for m in uniform}
    while len(chosen) < max_mixes:
        chosen.add(tuple(rng.integers(1, groups + 1, num_prunable)))
    full = (groups,) * num_prunable
    chosen.discard(full)
    return np.array(sorted(chosen) + [full])


def oracle_choice(ok, fractions, fallback):
    """For every image, the cheapest mix for which `ok[mix, image]` holds.

    Args:
        ok: bool array `[mixes, images]`.
        fractions: compute fraction of every mix.
        fallback: mix index used where no mix qualifies (the full network).

    Returns:
        int array `[images]` of mix indices.

    Example:

    >>> oracle_choice(np.array([[1, 1], [0, 1]], bool), np.array([1.0, 0.2]), 0).tolist()
    [0, 1]
    """
    order = np.argsort(fractions, kind="stable")
    sorted_ok = ok[order]
    first = sorted_ok.argmax(axis=0)
    chosen = order[first]
    return np.where(sorted_ok.any(axis=0), chosen, fallback)


def per_image_loss(model, x, y, actions, batch_size=512):
    """Per-image cross-entropy and logits of `model` under forced actions.

    Args:
        model: an `RNPModel`.
        x: float images `[n, H, W, C]`.
        y: int labels `[n]`.
        actions: int `[1 or n, num_prunable]` (one mix broadcast, or one per image).
        batch_size: images per forward pass.

    Returns:
        `(loss [n], logits [n, num_classes])` numpy arrays.
    """
    import keras

    logits = []
    for start in range(0, len(x), batch_size):
        a = np.broadcast_to(actions, (len(x), model.num_prunable))[start : start + batch_size]
        out = model.rollout(x[start : start + batch_size], actions=np.ascontiguousarray(a))
        logits.append(np.asarray(out["logits"]))
    logits = np.concatenate(logits)
    loss = keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    )
    return loss, logits


def soft_oracle_actions(model, x, y, mixes=None, margin=0.1, batch_size=512):
    """The soft oracle's action tuple of every image: the cheapest mix whose loss is near the full network's.

    For every image, among the static mixes `mixes`, the one of least compute
    whose cross-entropy is at most the full network's plus `margin` (the
    full network where none is). Costs one forward pass of `x` per mix.

    Args:
        model: an `RNPModel` (its backbone's current weights are used).
        x: float images `[n, H, W, C]`.
        y: int labels `[n]`.
        mixes: int `[mixes, num_prunable]` candidates (default:
            `candidate_mixes(model.num_prunable, model.groups, 256)`).
        margin: allowed loss above the full network's, >= 0.
        batch_size: images per forward pass.

    Returns:
        int32 array `[n, num_prunable]` of actions in `1..k`.

    Example:

    >>> targets = soft_oracle_actions(model, x_train[:512], y_train[:512], margin=0.1)
    >>> model.compute_fraction(targets).numpy().mean()  # the oracle's mean compute
    """
    if not margin >= 0:
        raise ValueError(f"`margin` must be >= 0. Received: margin={margin}")
    x = np.asarray(validation.check_images(x, model.image_shape))
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"`y` must have one label per image ({len(x)}). Received: y.shape={y.shape}")
    if mixes is None:
        mixes = candidate_mixes(model.num_prunable, model.groups, 256)
    mixes = validation.check_actions(np.asarray(mixes), len(mixes), model.num_prunable, model.groups)
    mixes = np.asarray(mixes)
    full = np.full((1, model.num_prunable), model.groups)
    full_loss, _ = per_image_loss(model, x, y, full, batch_size)
    ok = np.stack([per_image_loss(model, x, y, mix[None, :], batch_size)[0] <= full_loss + margin for mix in mixes])
    fractions = np.asarray(model.compute_fraction(mixes))
    mixes = np.concatenate([mixes, full])  # the fallback
    chosen = oracle_choice(ok, fractions, fallback=len(mixes) - 1)
    return mixes[chosen].astype(np.int32)


def imitate(model, x, actions, epochs=5, batch_size=128, learning_rate=1e-3, seed=0):
    """Trains the agent to choose `actions` (behaviour cloning), the backbone frozen.

    Teacher-forced: each image runs through the backbone with its target
    actions, so at every decision the agent sees the features that the
    target's earlier choices produce, and its Q-values, read as logits over
    `1..k`, get a cross-entropy loss towards the target action. Follow it
    with `model.fit` (Algorithm 1, ideally with a low `epsilon_start`) for
    the Q-learning refinement; after imitation alone the agent's outputs are
    preferences, not Q-values, and the run-time knob (`set_penalty`,
    `set_budget`) still trades compute for accuracy by re-pricing them.

    Args:
        model: an `RNPModel`.
        x: float images `[n, H, W, C]`.
        actions: int `[n, num_prunable]` targets in `1..k` (e.g.
            `soft_oracle_actions`).
        epochs: passes over `x`.
        batch_size: images per step.
        learning_rate: Adam learning rate of the agent.
        seed: shuffling seed.

    Returns:
        A dict of per-epoch lists: `loss` (mean cross-entropy) and
        `agreement` (share of decisions where the agent's top choice,
        teacher-forced, is the target's).

    Example:

    >>> history = imitate(model, x_train, targets, epochs=3)
    >>> history["agreement"][-1]
    """
    import keras
    import tensorflow as tf

    x = np.asarray(validation.check_images(x, model.image_shape))
    actions = np.asarray(validation.check_actions(np.asarray(actions), len(x), model.num_prunable, model.groups))
    epochs = validation.check_positive_int("epochs", epochs)
    batch_size = validation.check_positive_int("batch_size", batch_size)
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = model.agent_variables

    @tf.function(reduce_retracing=True)
    def step(xb, ab):
        with tf.GradientTape() as tape:
            out = model._rollout(xb, lambda t, q: ab[:, t], training=False)
            labels = ab - 1
            ce = keras.losses.sparse_categorical_crossentropy(labels, out["q_values"], from_logits=True)
            loss = tf.reduce_mean(ce)
        optimizer.apply(tape.gradient(loss, variables), variables)
        agree = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out["q_values"], -1, output_type=tf.int32), labels),
                                       tf.float32))
        return loss, agree

    rng = np.random.default_rng(seed)
    history = {"loss": [], "agreement": []}
    for _ in range(epochs):
        order = rng.permutation(len(x))
        results = [step(tf.constant(x[i]), tf.constant(actions[i], tf.int32))
                   for i in np.array_split(order, max(1, int(np.ceil(len(x) / batch_size))))]
        losses, agrees = np.array([[float(loss), float(agree)] for loss, agree in results]).T
        history["loss"].append(float(losses.mean()))
        history["agreement"].append(float(agrees.mean()))
    return history
