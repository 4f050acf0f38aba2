"""The parity checks every exporter runs: an exported artifact against `RNPModel.rollout`."""

import contextlib
import itertools

import numpy as np

from export.exceptions import ParityError


# Exact parity for float32 artifacts: identical actions, logits within ATOL.
ATOL = 1e-4


# MACs are float32 sums of the same integers: equal up to float rounding.
MACS_RTOL = 1e-5


# Quantised artifacts (TFLite float16 / dynamic-range int8 weights): logits
# may differ by up to `rtol * max(1, max |reference logits|)` and the greedy
# actions may flip on near-ties; the agreement rate is reported and must
# reach `min_agreement`. Forced-action checks (no flips possible) use the
# same logit tolerance on every sample.
QUANTIZED_TOLERANCES = {
    "float16": {"rtol": 1e-2, "min_agreement": 0.75},
    "dynamic": {"rtol": 5e-2, "min_agreement": 0.5},
}


# Greedy parity inputs are chosen so that the best Q-value beats the second
# by at least this much at every layer: float32 rounding (about 1e-6) cannot
# flip them, so "identical actions" is a fair requirement.
MIN_Q_MARGIN = 1e-3


# ------------------------------------------------------------------ parity
def reference(model, images, actions=None, batch_size=256):
    """`model.rollout` in inference mode, as numpy (`logits`, `actions`, `macs`, `q_values`)."""
    parts = {"logits": [], "actions": [], "macs": [], "q_values": []}
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        forced = None if actions is None else np.asarray(actions[start : start + batch_size], np.int32)
        out = model.rollout(x, actions=forced)
        for key in parts:
            if out.get(key) is not None:
                parts[key].append(out[key].numpy())
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def candidate_images(image_shape, pool, seed=0):
    """A deterministic pool of images: Gaussian at several scales, the first one constant."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    candidates = rng.normal(size=(pool, *tuple(image_shape))).astype(np.float32)
    candidates *= scales[np.arange(pool) % len(scales)].reshape(-1, 1, 1, 1)
    candidates[0] = 0.5
    return candidates


def parity_images(net, count=16, seed=0, pool=None, penalty=None):
    """A fixed set of images that drive different greedy actions.

    Draws a deterministic pool of candidates (`candidate_images`), keeps
    those whose best (re-priced) Q-value beats the second by
    `MIN_Q_MARGIN` at every layer, so float rounding cannot flip a greedy
    action, and picks one image per distinct action tuple first, then
    fills up by margin.

    Args:
        net: the `SlicedNetwork` of the model (for the knob settings of
            its greedy choice).
        count: how many images.
        seed: seed of the candidate pool.
        pool: pool size (default `4 * count`, at least 32).
        penalty: the run-time penalty the margins are measured at
            (default: `net.penalty_setting`, the artifact's default).

    Returns:
        float32 images `[count, H, W, C]`.
    """
    model = net.model
    pool = pool or max(32, 4 * count)
    candidates = candidate_images(model.image_shape, pool, seed)
    with penalty_scope(model, net.penalty_setting if penalty is None else penalty):
        ref = reference(model, candidates)
        q = np.sort(net.greedy_q_numpy(ref["q_values"], ref["actions"], penalty), axis=-1)
    margin = (q[..., -1] - q[..., -2]).min(axis=1)
    order = np.argsort(-margin, kind="stable")
    safe = [i for i in order if margin[i] >= MIN_Q_MARGIN]
    ranked = safe + [i for i in order if margin[i] < MIN_Q_MARGIN]
    chosen, seen = [], set()
    for i in ranked:
        key = tuple(ref["actions"][i])
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    chosen += [i for i in ranked if i not in chosen]
    return candidates[np.asarray(chosen[:count])]


def action_tuples(num_prunable, groups, limit=256, skips=None):
    """Forced action tuples that run every action at every layer.

    All `groups ** num_prunable` tuples when there are at most `limit`;
    otherwise the `groups ** 2` alternating tuples `(i, j, i, j, ...)`, which
    still run every (previous action, action) pair at every layer (and so
    every branch of every exported graph), plus every constant tuple.

    Args:
        num_prunable, groups: the model's decisions and `k`.
        limit: most tuples before the alternating ones are used instead.
        skips: optional `NetworkPlan.skip_columns` (each decision of a
            skippable block -> the block's first decision): the tuples are
            then given again with every skippable block skipped (0 at all
            its decisions, as `RNPModel.rollout(actions=...)` takes it;
            `exported_forced` turns them into the exported graphs' inputs).

    Returns:
        int32 array `[n, num_prunable]`.
    """
    if groups**num_prunable <= limit:
        rows = np.asarray(list(itertools.product(range(1, groups + 1), repeat=num_prunable)), np.int32)
    else:
        rows = np.asarray([[(i if t % 2 == 0 else j) for t in range(num_prunable)]
                           for i in range(1, groups + 1) for j in range(1, groups + 1)], np.int32)
    if not skips:
        return rows
    skipped = rows.copy()
    skipped[:, sorted(skips)] = 0
    return np.concatenate([rows, np.unique(skipped, axis=0)])


def exported_forced(actions, plan):
    """Forced actions as the exported graphs take them: a skip (0 at a skippable decision) becomes `k + 1`.

    In the exported graphs 0 means "the agent's greedy choice"; at a
    skippable decision `k + 1` skips the block (the agent's last Q-value),
    and its later decisions follow the skip whatever they are given.

    Example:

    >>> exported_forced(np.array([[0, 0, 2]]), model.plan)  # decision 0 skippable, 1 skipped by it
    array([[5, 0, 2]], dtype=int32)
    """
    actions = np.array(actions, np.int32, copy=True)
    for t in plan.skippable:
        actions[:, t] = np.where(actions[:, t] == 0, plan.groups + 1, actions[:, t])
    return actions


def forced_inputs(images, tuples, per_tuple=2):
    """Repeats parity images so that every tuple runs on `per_tuple` of them."""
    n = len(tuples) * per_tuple
    index = np.arange(n) % len(images)
    return images[index], np.repeat(tuples, per_tuple, axis=0)


def compare(label, ref, got, atol=ATOL, rtol=None, min_agreement=1.0, logits_only=False):
    """Compares an artifact's outputs with the Keras model's.

    Args:
        label: what was compared (shown in messages), e.g. "onnx rnp.onnx greedy".
        ref: `reference(...)` output.
        got: a dict with numpy `logits`, `actions` and `macs`.
        atol: logit tolerance (float32 artifacts: `ATOL`).
        rtol: if given, the logit tolerance is `rtol * max(1, max |ref logits|)`
            (quantised artifacts).
        min_agreement: share of samples whose whole action tuple must match
            (1.0: identical actions).
        logits_only: compare the logits only (the full network: no actions).

    Returns:
        A dict: `samples`, `action_agreement`, `max_abs_logit_diff` (over the
        samples whose actions agree), `tolerance`, `max_rel_macs_diff`.

    Raises:
        ParityError: with the measured numbers, when a limit is exceeded.
    """
    ref_actions = np.asarray(ref["actions"]).astype(np.int64)
    if logits_only:
        got = dict(got, actions=ref_actions, macs=ref["macs"])
    got_actions = np.asarray(got["actions"]).astype(np.int64).reshape(ref_actions.shape)
    same = np.all(ref_actions == got_actions, axis=1)
    agreement = float(same.mean()) if len(same) else 1.0
    ref_logits = np.asarray(ref["logits"], np.float64)
    got_logits = np.asarray(got["logits"], np.float64).reshape(ref_logits.shape)
    tolerance = atol if rtol is None else rtol * max(1.0, float(np.abs(ref_logits).max()))
    diff = float(np.abs(ref_logits[same] - got_logits[same]).max()) if same.any() else 0.0
    ref_macs = np.asarray(ref["macs"], np.float64)
    got_macs = np.asarray(got["macs"], np.float64).reshape(ref_macs.shape)
    macs_diff = float((np.abs(ref_macs - got_macs)[same] / np.maximum(ref_macs[same], 1.0)).max()) if same.any() else 0.0
    result = {
        "check": label,
        "samples": int(len(same)),
        "distinct_action_tuples": int(len({tuple(a) for a in ref_actions})),
        "action_agreement": agreement,
        "max_abs_logit_diff": diff,
        "tolerance": float(tolerance),
        "max_rel_macs_diff": macs_diff,
    }
    problems = []
    if agreement < min_agreement:
        first = int(np.argmin(same))
        problems.append(
            f"actions agree on {agreement:.1%} of {len(same)} samples (need {min_agreement:.0%}; "
            f"first mismatch: expected {ref_actions[first].tolist()}, got {got_actions[first].tolist()})"
        )
    if diff > tolerance or not np.isfinite(diff):
        problems.append(f"max |logits diff| = {diff:.3g} > {tolerance:.3g}")
    if macs_diff > MACS_RTOL:
        problems.append(f"max relative MACs diff = {macs_diff:.3g} > {MACS_RTOL:g}")
    if problems:
        raise ParityError(f"{label}: parity check failed: " + "; ".join(problems))
    return result


def tolerance_for(quantize):
    """`compare` keyword arguments for an artifact precision (None = float32)."""
    if quantize in (None, "none", "float32"):
        return {"atol": ATOL}
    if quantize not in QUANTIZED_TOLERANCES:
        raise ValueError(f"`quantize` must be one of None, {sorted(QUANTIZED_TOLERANCES)}. Received: {quantize!r}")
    return dict(QUANTIZED_TOLERANCES[quantize])


def check_artifact(label, model, run, images, tuples, per_tuple=2, quantize=None, knob=None):
    """Greedy and forced-action parity of one artifact, and greedy parity at run-time penalties.

    Args:
        label: artifact name for messages.
        model: the Keras RNPModel (the reference).
        run: `run(images, forced_actions_or_None, penalty=None) -> dict(logits,
            actions, macs)` running the artifact (`penalty`: a float fed to
            the artifact's penalty input; None: its default).
        images: `parity_images(...)`.
        tuples: `action_tuples(...)`.
        per_tuple: images per forced tuple.
        quantize: None for float32, else a key of `QUANTIZED_TOLERANCES`.
        knob: optional `knob_inputs(...)`: the greedy check again at each
            of its penalties, fed to the artifact, against the model after
            `set_penalty(penalty)`.

    Returns:
        `{"greedy": compare(...), "forced": compare(...)}`, and with `knob`
        `"knob"`: one `compare(...)` per penalty, with `penalty`,
        `mean_macs` and `actions_differ` (from the setting's actions).
    """
    tol = tolerance_for(quantize)
    forced_tol = {k: v for k, v in tol.items() if k != "min_agreement"}
    greedy = compare(f"{label} (greedy actions)", reference(model, images), run(images, None), **tol)
    x, a = forced_inputs(images, tuples, per_tuple)
    forced = compare(f"{label} (forced actions, {len(tuples)} tuples)", reference(model, x, a),
                     run(x, exported_forced(a, model.plan)), **forced_tol)
    result = {"greedy": greedy, "forced": forced}
    if knob:
        result["knob"] = check_knob(label, model, lambda x, p: run(x, None, penalty=p), knob, quantize)
    return result


def check_knob(label, model, run, knob, quantize=None):
    """Greedy parity of an artifact with its penalty input fed, at every penalty of `knob`.

    Args:
        label: artifact name for messages.
        model: the Keras RNPModel; the reference is `model.rollout` after
            `model.set_penalty(penalty)` (the setting is restored).
        run: `run(images, penalty) -> dict(logits, actions, macs)`.
        knob: `knob_inputs(...)`.
        quantize: None for float32, else a key of `QUANTIZED_TOLERANCES`.

    Returns:
        A list: `compare(...)` per penalty, with `penalty`, `mean_macs` (of
        the reference) and `actions_differ`.

    Raises:
        ParityError: the artifact differs from the model at a penalty (an
            ignored penalty input fails at the second one).
    """
    results = []
    for point in knob:
        penalty = point["penalty"]
        with penalty_scope(model, penalty):
            ref = reference(model, point["images"])
        got = run(point["images"], penalty)
        checked = compare(f"{label} (greedy actions, penalty input {penalty:g})", ref, got, **tolerance_for(quantize))
        checked.update(penalty=penalty, mean_macs=float(np.mean(ref["macs"])), actions_differ=point["actions_differ"])
        results.append(checked)
    return results


# ------------------------------------------------------------ knob parity
@contextlib.contextmanager
def penalty_scope(model, penalty):
    """`model.set_penalty(penalty)` for the block; the model's setting is restored afterwards.

    Example:

    >>> with penalty_scope(model, -0.5):
    ...     ref = reference(model, images)
    """
    saved = model.penalty_setting  # a float32 value: set back exactly
    if np.float32(penalty) != np.float32(saved):
        model.set_penalty(float(penalty))
    try:
        yield model
    finally:
        model.set_penalty(saved)


def penalty_candidates(setting):
    """Penalties cheaper than `setting` (more negative), nearest first: `setting - 0.05 * 2**i`."""
    return [setting - 0.05 * 2.0**i for i in range(14)]


def cheaper_penalty(model, images, setting=None, min_changed=0.25):
    """A second run-time penalty at which the greedy actions on `images` clearly differ.

    Tries `penalty_candidates` nearest first and returns the first at which
    at least `min_changed` of the images change their action tuple and the
    mean MACs drop; otherwise the candidate that changed the most images.

    Args:
        model: the RNPModel.
        images: float32 images.
        setting: the reference penalty (default: `model.penalty_setting`).
        min_changed: share of images whose action tuple must change.

    Returns:
        `(penalty, changed)`: a float and the share of images it changed.
    """
    setting = model.penalty_setting if setting is None else float(setting)
    with penalty_scope(model, setting):
        base = reference(model, images)
    best = None
    for penalty in penalty_candidates(setting):
        with penalty_scope(model, penalty):
            ref = reference(model, images)
        changed = float(np.mean(np.any(ref["actions"] != base["actions"], axis=1)))
        if changed >= min_changed and ref["macs"].mean() < base["macs"].mean():
            return float(penalty), changed
        if best is None or changed > best[1]:
            best = (float(penalty), changed)
    return best


def knob_inputs(net, count=16, seed=0):
    """The two run-time penalties every exporter checks, each with its own parity images.

    The artifact's default (`net.penalty_setting`) and `cheaper_penalty`;
    at each, `parity_images` measured at that penalty (so rounding cannot
    flip a greedy action there either).

    Args:
        net: the `SlicedNetwork` (its `penalty_setting` is the artifact's default).
        count: images per penalty.
        seed: seed of the candidate pools.

    Returns:
        A list of two dicts: `penalty`, `images`, `actions_differ` (whether
        the model's actions at this penalty differ from those at the
        setting on the candidate pool).
    """
    model, setting = net.model, net.penalty_setting
    pool = candidate_images(model.image_shape, max(32, 4 * count), seed)
    other, changed = cheaper_penalty(model, pool, setting)
    return [
        {"penalty": setting, "images": parity_images(net, count, seed, penalty=setting), "actions_differ": False},
        {"penalty": other, "images": parity_images(net, count, seed, penalty=other), "actions_differ": changed > 0},
    ]


def knob_subset(knob, count):
    """`knob_inputs` with the first `count` images of each penalty (the slower batch-1 checks)."""
    return [dict(point, images=point["images"][:count]) for point in knob]


def knob_summary(parity):
    """One phrase on the penalty-input checks of a `check_artifact` result (for the CLI summaries)."""
    points = parity.get("knob") or []
    return "penalty input: " + ", ".join(
        f"{p['penalty']:g} -> mean MACs {p['mean_macs']:.4g} (max |dlogits| {p['max_abs_logit_diff']:.2e})" for p in points
    )


def parity_inputs(net, num_images=16, max_tuples=256):
    """What every exporter's parity check feeds its artifact.

    Args:
        net: the `SlicedNetwork`.
        num_images: parity images (and knob images).
        max_tuples: forced action tuples at most (`action_tuples`).

    Returns:
        `(images, knob, tuples)`: `parity_images`, `knob_inputs` and
        `action_tuples` of the network.
    """
    images = parity_images(net, num_images)
    knob = knob_inputs(net, num_images)
    return images, knob, action_tuples(net.num_prunable, net.groups, max_tuples, skips=net.model.plan.skip_columns)
