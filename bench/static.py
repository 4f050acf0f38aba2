"""Static pruning of a prefix-robust model: every per-layer width mix, and the accuracy/compute front.

Example:

    mixes = candidate_mixes(model.num_prunable, model.groups, max_mixes=256)
    front, curve, _ = static_curve(model, mixes, model.compute_fraction(mixes).numpy(), xv, yv, xt, yt)
"""

import itertools

import numpy as np


def candidate_mixes(num_prunable, groups, max_mixes, seed=0, skips=None):
    """Every per-layer width mix, or the uniform mixes plus a seeded sample of the others.

    Args:
        num_prunable: decisions per image.
        groups: `k`.
        max_mixes: most mixes returned (at least `groups`).
        seed: sampling seed.
        skips: optional `NetworkPlan.skip_columns` (each decision of a
            skippable block -> the block's first decision): mixes may then
            skip blocks (0 at all of a block's decisions); the uniform mixes
            come with every skippable block skipped too.

    Returns:
        int array `[mixes, num_prunable]`, the full network last.

    Example:

    >>> candidate_mixes(2, 2, max_mixes=16).tolist()
    [[1, 1], [1, 2], [2, 1], [2, 2]]
    >>> candidate_mixes(2, 2, max_mixes=16, skips={1: 1}).tolist()
    [[1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    """
    if max_mixes < groups:
        raise ValueError(f"`max_mixes` must be >= groups ({groups}). Received: max_mixes={max_mixes}")
    skips = dict(skips or {})
    blocks = {}
    for t, first in sorted(skips.items()):
        blocks.setdefault(first, []).append(t)
    total = groups ** (num_prunable - len(skips))
    for members in blocks.values():
        total *= groups ** len(members) + 1
    full = (groups,) * num_prunable
    if total <= max_mixes:
        rows = itertools.product(range(1, groups + 1), repeat=num_prunable)
        chosen = {_skipped(row, blocks, mask) for row in rows for mask in itertools.product((0, 1), repeat=len(blocks))}
        chosen.discard(full)
        return np.array(sorted(chosen) + [full])
    uniform = [np.full(num_prunable, a) for a in range(1, groups + 1)]
    rng = np.random.default_rng(seed)
    chosen = {tuple(m) for m in uniform}
    if blocks:
        chosen |= {_skipped(m, blocks, (1,) * len(blocks)) for m in uniform}
    while len(chosen) < max_mixes:
        row = tuple(rng.integers(1, groups + 1, num_prunable))
        if blocks:
            row = _skipped(row, blocks, rng.random(len(blocks)) < 1 / (groups + 1))
        chosen.add(row)
    chosen.discard(full)
    return np.array(sorted(chosen) + [full])


def _skipped(row, blocks, mask):
    """`row` with the decisions of each block of `blocks` (first decision -> its decisions) set to 0 where `mask`."""
    row = list(int(a) for a in row)
    for skip, members in zip(mask, blocks.values()):
        if skip:
            for t in members:
                row[t] = 0
    return tuple(row)


def per_image(model, x, y, actions, batch_size=512):
    """Correctness, loss and logits of every image under forced actions `[1 or n, num_prunable]`."""
    import keras

    logits = []
    for start in range(0, len(x), batch_size):
        a = np.broadcast_to(actions, (len(x), model.num_prunable))[start : start + batch_size]
        out = model.rollout(x[start : start + batch_size], actions=np.ascontiguousarray(a))
        logits.append(np.asarray(out["logits"]))
    logits = np.concatenate(logits)
    loss = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    return logits.argmax(1) == y, loss, logits


def mix_table(model, mixes, x, y):
    """Correctness, loss and top probability of every image under every static mix."""
    correct, losses, probs = [], [], []
    for mix in mixes:
        c, l, logits = per_image(model, x, y, mix[None, :])
        correct.append(c)
        losses.append(l)
        probs.append(softmax(logits).max(1))
    return np.stack(correct), np.stack(losses), np.stack(probs)


def static_curve(model, mixes, fractions, xv, yv, xt, yt):
    """The static curve of `model`'s weights: the front chosen on validation, read on test; plus the test tables."""
    val_correct, _, _ = mix_table(model, mixes, xv, yv)
    test_correct, test_loss, test_conf = mix_table(model, mixes, xt, yt)
    front = pareto(fractions, val_correct.mean(1))
    return front, [(float(fractions[i]), float(test_correct[i].mean())) for i in front], (test_correct, test_loss,
                                                                                          test_conf)


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def pareto(fractions, accuracy):
    """Indices of mixes on the accuracy/compute front (sorted by compute)."""
    order = np.argsort(fractions)
    front, best = [], -1.0
    for i in order:
        if accuracy[i] > best + 1e-12:
            front.append(int(i))
            best = accuracy[i]
    return front
