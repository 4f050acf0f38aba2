r"""Accuracy against compute on real data: `python -m bench.accuracy`.

Does the agent beat static pruning at equal cost? For every dataset,
backbone and seed, from the SAME prefix-robust backbone, this script
measures:

1. the full network;
2. the static curve: every per-layer mix of widths (a seeded sample of at
   most `--max_mixes` of them, plus the uniform ones, for deeper nets), the
   Pareto front chosen on validation and read on test, interpolated;
3. static fine-tuned: the front's mix nearest each budget fine-tuned for as
   many steps as the agent's training;
4. thin networks of about each budget's MACs trained from scratch
   ("vanilla") for as many epochs as the backbone;
5. RNP at every budget of `--budgets` (about 1.5x to 6x fewer MACs), by the
   run-time knob of one trained model (`RNPModel.set_budget`, refined on
   validation), for every agent of `--policies`: `paper` (the paper's LSTM
   agent on pooled features) and `knob` (optional: the paper's agent whose
   backbone phases act under penalties drawn from
   `--knob_backbone_penalties`, i.e. `Schedule(backbone_penalty_range=...)`,
   so its backbone is fine-tuned for every setting of the run-time knob)
   and `stage` (a residual backbone only: the paper's agent deciding once
   per stage, `rnp_tf.decide_per_stage`, trained from the same backbone
   weights; the cheaper agent of issue 26).
   The agents measured and removed after commit 7fe7dd6 (`late`, `aux`,
   `imitate`, `--knob_distill_weight`) are written up in
   `docs/experiments/`; their reports still merge (`--merge`). Optionally
   separately trained paper agents at fixed penalties (`--separate_penalties`, issue 7's comparison:
   the knob of `knob` if trained, else of `paper`, against them; or, with
   `--reference`, the agents an earlier report trained from the same
   backbone, which lets a new `knob` recipe be compared without retraining
   them);
6. controls for every RNP point: its action tuples shuffled across test
   images (same compute: isolates the per-image choice), and the oracle
   bounds (cheapest mix that classifies the image correctly; cheapest mix
   whose loss is within `--soft_margin` of the full network's);
7. a confidence cascade: the narrowest mix, re-run at full width when its
   top softmax probability is below a threshold.

Backbones: `cifar_cnn` and `vgg_cifar` (chains) and `resnet_cifar`, a
small bottleneck ResNet (`rnp_tf.resnet_cifar`, widths `--resnet_widths`);
`resnet_cifar_skip` is the same network whose agent may also skip the
identity blocks (block skipping): its static mixes skip blocks too, and
each RNP point reports its `skip_rate`.

It also tests the paper's second claim: Spearman correlation between
per-image compute and the full network's loss, compute per class, and the
16 test images with the least and the most compute (a picture per policy).

`--backbone_cache DIR` keeps every seed's prefix-robust backbone (about 26
of a seed's 50 minutes on one core) and reloads it in later runs; the random
seed and the data pipeline are reset after the backbone, so a run from the
cache gives the same numbers as one that trained it. It also keeps each
finished stage that follows: the static curve (`..._static_curve_*.npz`)
and every trained agent with its evaluation (`..._rnp_<policy>_*.keras` and
`.json`), named by the backbone and the flags that shape the stage. A run
stopped part-way (a seed of two agents on the residual backbone takes
longer than a working session) resumes after its last finished stage: the
seed and the data pipeline are reset before every agent, so the numbers are
those of an uninterrupted run.

Output in `--output`: `accuracy.json`, `accuracy.md` (table, targets met or
missed) and `accuracy_<dataset>_<backbone>.png` (all curves).

Example:

    python -m bench.accuracy --quick                      # smoke run, ~2 min
    python -m bench.accuracy --datasets=cifar10_subset --backbones=cifar_cnn --seeds=0,1,2
    python -m bench.accuracy --datasets=cifar10_subset --backbones=resnet_cifar,resnet_cifar_skip --seeds=0,1,2
"""

import hashlib
import json
import os
import pathlib
import time

import numpy as np
from absl import app
from absl import flags

from bench import splits
from bench import static
from bench import timing

DATASETS = splits.DATASETS
BACKBONES = ("cifar_cnn", "vgg_cifar", "resnet_cifar", "resnet_cifar_skip")
POLICIES = ("paper", "knob", "stage")
STAGES = ("static_finetuned", "thin")

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["cifar10_subset", "fashion_mnist"], "Datasets: " + ", ".join(DATASETS) + ", digits.")
flags.DEFINE_list("backbones", ["cifar_cnn", "vgg_cifar"], "Backbones: " + ", ".join(BACKBONES) + ".")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (one full pipeline per seed).")
flags.DEFINE_list("widths", ["32", "64", "128", "128"], "cifar_cnn widths.")
flags.DEFINE_integer("vgg_width", 48, "vgg_cifar: channels of its first convs.")
flags.DEFINE_list("resnet_widths", ["16", "32", "64"], "resnet_cifar(_skip): inner widths of its stages' bottlenecks.")
flags.DEFINE_list("policies", ["paper"], "Agents trained from each backbone: " + ", ".join(POLICIES) + ".")
flags.DEFINE_integer("pretrain_epochs", 10, "Full-width epochs of the backbone.")
flags.DEFINE_integer("robust_epochs", 8, "Prefix-robust epochs.")
flags.DEFINE_integer("rnp_epochs", 6, "Algorithm 1 epochs (per agent).")
flags.DEFINE_integer("validation", 1000, "Training images held out for validation.")
flags.DEFINE_integer("max_train_examples", 8000, "Cap on training images (Fashion-MNIST has 60,000).")
flags.DEFINE_float("penalty", -0.05, "Training penalty p0 of the agents.")
flags.DEFINE_list("budgets", ["0.67", "0.4", "0.25", "0.17"], "RNP operating points (mean compute fractions).")
flags.DEFINE_list("separate_penalties", [], "Also train one paper agent per penalty (issue 7's comparison).")
flags.DEFINE_list("knob_budgets", ["0.9", "0.8", "0.55", "0.33", "0.2", "0.12"],
                  "With --separate_penalties: more budgets of the paper agent's knob (accuracy and compute only).")
flags.DEFINE_list("knob_backbone_penalties", ["-0.3", "0.05"],
                  "Policy `knob`: (p_min, p_max) of the penalties its backbone phases act under.")
flags.DEFINE_integer("knob_epochs", None, "Policy `knob`: Algorithm 1 epochs (default: --rnp_epochs).")
flags.DEFINE_boolean("knob_select", False,
                     "Policy `knob`: keep the epoch whose mean validation accuracy over --knob_select_budgets is "
                     "best (`rnp_tf.BestKnobWeights`); the last epoch's knob is also swept, as `knob_last`.")
flags.DEFINE_list("knob_select_budgets", ["0.12", "0.2", "0.33", "0.55", "0.8"],
                  "--knob_select: the mean compute fractions whose validation accuracy is averaged.")
flags.DEFINE_string("reference", None,
                    "A report JSON of the same seeds: compare the knob with ITS separately trained agents instead "
                    "of training them (the backbone must be the same: its full-network test accuracy is checked).")
flags.DEFINE_string("backbone_cache", None,
                    "Directory: save each seed's prefix-robust backbone there (a `.keras` file named by dataset, "
                    "backbone, seed and the flags that shape it) and load it instead of training when present.")
flags.DEFINE_list("skip", [], "Stages not run (e.g. for issue 7's comparison alone): " + ", ".join(STAGES) + ".")
flags.DEFINE_integer("max_mixes", 256, "Static mixes evaluated at most (a seeded sample beyond).")
flags.DEFINE_float("soft_margin", 0.1, "Soft oracle: loss within this of the full network's.")
flags.DEFINE_boolean("quick", False, "Smoke run: digits, one seed, one epoch per phase, at most 16 static mixes.")
flags.DEFINE_string("output", "bench/results", "Output directory.")
flags.DEFINE_string("stem", None, "Output file stem (default: accuracy, or accuracy_quick with --quick).")
flags.DEFINE_list("merge", [], "Instead of running: merge these JSON outputs (runs split over processes) into one report.")


def _load(name, seed, batch_size=128):
    return splits.load_split(name, seed, FLAGS.validation, FLAGS.max_train_examples, batch_size)


_arrays = splits.arrays


def _spec(backbone, scale=1.0):
    import rnp_tf

    def scaled(widths):  # each width times `scale`, a multiple of 4 (the groups), at least 4
        return tuple(max(4, int(round(int(w) * scale / 4)) * 4) for w in widths)

    if backbone == "vgg_cifar":
        return rnp_tf.vgg_cifar(scaled([FLAGS.vgg_width])[0])
    if backbone.startswith("resnet_cifar"):  # bottlenecks; "_skip": the agent may skip identity blocks
        return rnp_tf.resnet_cifar(scaled(FLAGS.resnet_widths), skippable=backbone.endswith("_skip"))
    return rnp_tf.cifar_cnn(scaled(FLAGS.widths))


def _new_model(spec, data, **kwargs):
    import rnp_tf

    return rnp_tf.RNPModel(spec, image_shape=data.input_shape, num_classes=data.num_classes, **kwargs)


def _fit(model, data, phase, epochs, lr, agent_lr=1e-3, callbacks=None):
    import keras

    if not epochs:
        return 0.0
    model.compile(optimizer=keras.optimizers.Adam(lr), agent_optimizer=keras.optimizers.Adam(agent_lr))
    model.set_phase(phase)
    start = time.time()
    model.fit(data.train, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)  # tf.data shuffles
    return time.time() - start


def _clone(model, **overrides):
    """A copy of `model` (config + weights); with `overrides`, only the backbone's weights are copied."""
    import rnp_tf

    copy = rnp_tf.RNPModel.from_config({**model.get_config(), **overrides})
    if not overrides:
        copy.set_weights(model.get_weights())
        return copy
    def layers_of(m):  # the layers' weights: not the agent's, not the model's own counters
        return {v.path: v for v in m.weights if not v.path.startswith(("agent/", m.name + "/"))}

    source, target = layers_of(model), layers_of(copy)
    if set(source) != set(target):
        raise ValueError(f"Cannot copy the backbone: weights differ ({sorted(set(source) ^ set(target))[:4]})")
    for path, variable in target.items():
        variable.assign(source[path])
    return copy


candidate_mixes = static.candidate_mixes


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


_per_image = static.per_image
_mix_table = static.mix_table
_static_curve = static.static_curve


def shuffle_actions(actions, seed):
    """The same action tuples, permuted across images (same total compute)."""
    return actions[np.random.default_rng(seed).permutation(len(actions))]


_softmax = static.softmax
_pareto = static.pareto
_interp = splits.interp
_interp_inside = splits.interp_inside


def _spearman(a, b):
    from scipy import stats

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a, b).correlation)


def _train_forced(model, data, actions, steps, lr):
    """Fine-tunes the backbone under one fixed static mix (static fine-tuned)."""
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.Adam(lr)
    variables = model.backbone_variables
    fixed = tf.constant(actions, tf.int32)

    @tf.function
    def step(x, y):
        batch = tf.shape(x)[0]
        with tf.GradientTape() as tape:
            forced = tf.tile(fixed[None, :], [batch, 1])
            out = model.rollout(x, actions=forced, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out["logits"], from_logits=True))
        optimizer.apply(tape.gradient(loss, variables), variables)

    done = 0
    while done < steps:
        for x, y in data.train:
            step(x, y)
            done += 1
            if done >= steps:
                break


def _thin_spec(backbone, target_fraction, full_macs, data):
    """A uniformly thinner backbone of about the target MACs, and its compute fraction."""
    import rnp_tf

    best = None
    for scale in np.linspace(0.1, 1.0, 91):
        spec = _spec(backbone, scale)
        macs = rnp_tf.plan.full_macs(spec, data.input_shape, data.num_classes)
        gap = abs(macs / full_macs - target_fraction)
        if best is None or gap < best[0]:
            best = (gap, spec, macs / full_macs)
    return best[1], best[2]


# below every reachable mean compute: `set_budget` clips it to the knob's cheapest calibrated setting
FLOOR_BUDGET = 1e-3


def _sweep(model, xv, xt, yt):
    """The run-time knob set on validation to every budget of --knob_budgets and --budgets, read on test.

    The last point is the knob's cheapest setting (`budget` "floor"), so separate agents that collapse to the
    narrowest widths are compared wherever the one model reaches them, whatever the smallest budget asked.
    """
    from rnp_tf.evaluation import budget_points

    budgets = sorted({float(b) for b in FLAGS.knob_budgets + FLAGS.budgets}, reverse=True)
    points = budget_points(model, budgets + [FLOOR_BUDGET], xv, xt, yt, num_points=13)
    points[-1]["budget"] = "floor"
    return points


def _skip_rate(model, actions):
    """`{"skip_rate": share of the skippable blocks skipped}` for a model with skippable blocks, else `{}`."""
    skippable = sorted(model.plan.skippable)
    if not skippable:
        return {}
    return {"skip_rate": float((np.asarray(actions)[:, skippable] == 0).mean())}


def _evaluate_policy(model, data, xv, xt, yt, full_loss, seed):
    """RNP points of one trained agent: knob at every budget, controls, difficulty correlation."""
    model.calibrate_budget(xv, num_points=13)
    points = []
    for budget in [float(b) for b in FLAGS.budgets]:
        penalty = model.set_budget(budget, xv)
        details = model.predict_details(xt)
        correct = details["logits"].argmax(1) == yt
        actions = details["actions"]
        shuffled = shuffle_actions(actions, seed)
        frac = details["compute_fraction"]
        points.append(
            {
                "budget": budget,
                "penalty": penalty,
                "accuracy": float(correct.mean()),
                "compute_fraction": float(frac.mean()),
                "compute_p90": float(np.percentile(frac, 90)),
                "shuffled_accuracy": float(_per_image(model, xt, yt, shuffled)[0].mean()),
                "distinct_action_tuples": int(len({tuple(a) for a in actions})),
                **_skip_rate(model, actions),
                "spearman_compute_vs_full_loss": _spearman(frac, full_loss),
                "compute_per_class": {
                    data.class_names[c]: float(frac[yt == c].mean()) for c in range(data.num_classes) if (yt == c).any()
                },
                "least_compute": np.argsort(frac, kind="stable")[:16].tolist(),
                "most_compute": np.argsort(-frac, kind="stable")[:16].tolist(),
                "_frac": frac,
                "_pred": details["logits"].argmax(1),
            }
        )
    model.set_penalty(model.penalty)
    return points


def _flags_digest(names):
    """12 hex digits naming the values of these flags (what a cached file was made with)."""
    key = {k: FLAGS[k].value for k in names}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _backbone_path(name, backbone, seed):
    """Where `--backbone_cache` keeps one seed's backbone: named by everything that shapes it."""
    digest = _flags_digest(("widths", "vgg_width", "resnet_widths", "pretrain_epochs", "robust_epochs",
                            "validation", "max_train_examples", "penalty"))
    return os.path.join(FLAGS.backbone_cache, f"{name}_{backbone}_seed{seed}_{digest}.keras")


# Flags that shape a seed's stages beyond its backbone: with `_backbone_path`'s, they name a cached stage.
STAGE_FLAGS = ("max_mixes", "rnp_epochs", "budgets", "knob_budgets", "knob_backbone_penalties", "knob_epochs",
               "knob_select", "knob_select_budgets", "quick")


def _stage_path(name, backbone, seed, stage):
    """Where `--backbone_cache` keeps one finished stage of a seed (no suffix), or None without a cache."""
    if not FLAGS.backbone_cache:
        return None
    return f"{_backbone_path(name, backbone, seed)[:-len('.keras')]}_{stage}_{_flags_digest(STAGE_FLAGS)}"


def _cached_static_curve(path, compute):
    """`compute()`'s static curve `(front, curve, (correct, loss, confidence))`, kept in `path.npz` if given."""
    from rnp_tf import io_utils

    if path and os.path.isfile(path + ".npz"):
        with np.load(path + ".npz") as saved:
            curve = [tuple(point) for point in saved["curve"].tolist()]
            return saved["front"].tolist(), curve, (saved["correct"], saved["loss"], saved["confidence"])
    front, curve, (correct, loss, confidence) = compute()
    if path:
        io_utils.atomic_write(path + ".npz", lambda tmp: np.savez(tmp, front=np.asarray(front, np.int64),
                                                                 curve=np.asarray(curve, np.float64), correct=correct,
                                                                 loss=loss, confidence=confidence), keep_suffix=True)
    return front, curve, (correct, loss, confidence)


def _load_agent_stage(path):
    """A finished agent stage from `path.keras` / `path.json` (written in that order), or None."""
    import keras

    from rnp_tf import io_utils

    if not path or not os.path.isfile(path + ".json"):
        return None
    saved = io_utils.read_json(path + ".json")
    for point in saved["points"]:
        point["_frac"], point["_pred"] = np.asarray(point["_frac"]), np.asarray(point["_pred"])
    return keras.saving.load_model(path + ".keras", compile=False), saved


def _save_agent_stage(path, model, saved):
    from rnp_tf import io_utils

    if path:
        io_utils.save_model_atomic(model, path + ".keras")
        io_utils.write_json(path + ".json", saved)


def _backbone(name, backbone, seed, data, timing):
    """One seed's prefix-robust backbone (full-width training, reordering, robust phase), or its cached copy."""
    import keras

    from rnp_tf import io_utils
    from rnp_tf.reorder import reorder_channels

    path = _backbone_path(name, backbone, seed) if FLAGS.backbone_cache else None
    if path and os.path.isfile(path):
        start = time.time()
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as error:  # a truncated or foreign file: say which, never train over it silently
            raise ValueError(f"--backbone_cache: cannot load {path} ({error}); delete it to train the backbone "
                             f"again. Received: backbone_cache={FLAGS.backbone_cache!r}") from error
        timing["backbone_loaded"] = time.time() - start
        return model
    from rnp_tf import Schedule

    model = _new_model(_spec(backbone), data, penalty=FLAGS.penalty, schedule=Schedule(
        agent_steps=50, backbone_steps=50, epsilon_decay_steps=200, full_width_fraction=0.25))
    timing["pretrain"] = _fit(model, data, "full", FLAGS.pretrain_epochs, 2e-3)
    reorder_channels(model)
    timing["robust"] = _fit(model, data, "robust", FLAGS.robust_epochs, 1e-3)
    model = _clone(model)
    if path:
        os.makedirs(FLAGS.backbone_cache, exist_ok=True)
        io_utils.save_model_atomic(model, path)
    return model


def reference_agents(path, name, backbone, seed, full_accuracy):
    """The separately trained agents of one seed in an earlier report, from the same backbone.

    Args:
        path: a `bench.accuracy` JSON report (or `.partial.json`) that
            trained `--separate_penalties`.
        name, backbone, seed: the run to look up.
        full_accuracy: this run's full-network test accuracy: the reference
            run's must be the same, or its agents came from another backbone.

    Returns:
        The reference run's `separate_agents` (penalty, accuracy, compute
        fraction, seconds of each).

    Example:

    >>> agents = reference_agents("bench/results/accuracy_knob10.json", "cifar10_subset", "cifar_cnn",
    ...                           6, 0.6263520157325467)
    >>> [a["penalty"] for a in agents]
    [-0.03, -0.07, -0.1, -0.15, -0.25]
    """
    from rnp_tf import io_utils

    runs = [r for r in io_utils.read_json(path)["runs"]
            if (r["dataset"], r["backbone"], r["seed"]) == (name, backbone, seed) and r.get("separate_agents")]
    if not runs:
        raise ValueError(f"--reference {path} has no separately trained agents for {name}, {backbone}, seed {seed}. "
                         f"Received: reference={path!r}")
    if abs(runs[0]["full_accuracy"] - full_accuracy) > 1e-9:
        raise ValueError(f"--reference {path}: seed {seed}'s backbone differs from this run's (full-network test "
                         f"accuracy {runs[0]['full_accuracy']:.4f}, here {full_accuracy:.4f}), so its agents are "
                         f"not comparable. Received: reference={path!r}")
    return runs[0]["separate_agents"]


def run_one(name, backbone, seed):
    import keras

    import rnp_tf

    keras.utils.set_random_seed(seed)
    data = _load(name, seed)
    timing = {}
    backbone_model = _backbone(name, backbone, seed, data, timing)
    # the same draws and shuffles after it, whether the backbone was trained or loaded
    keras.utils.set_random_seed(seed)
    data = _load(name, seed)
    xv, yv = _arrays(data.validation)
    xt, yt = _arrays(data.test)

    # 1-2: full network and the static curve (front chosen on validation, read on test)
    start = time.time()
    mixes = candidate_mixes(backbone_model.num_prunable, backbone_model.groups, FLAGS.max_mixes, seed,
                            skips=backbone_model.plan.skip_columns)
    fractions = backbone_model.compute_fraction(mixes).numpy()
    front, static_curve, (test_correct, test_loss, test_conf) = _cached_static_curve(
        _stage_path(name, backbone, seed, "static_curve"),
        lambda: _static_curve(backbone_model, mixes, fractions, xv, yv, xt, yt))
    timing["static_curve"] = time.time() - start
    full_index = len(mixes) - 1
    full_accuracy = float(test_correct[full_index].mean())
    # checked before any agent trains: a reference from another backbone fails now, not after the run
    reference = reference_agents(FLAGS.reference, name, backbone, seed, full_accuracy) if FLAGS.reference else []
    steps = FLAGS.rnp_epochs * int(np.ceil(data.num_train / 128))

    # 5: every agent from the same backbone, Algorithm 1 for the same epochs
    policies, agent_models, select_log, last_sweep = {}, {}, None, None

    def evaluate(agent_model, own_curve):
        points = _evaluate_policy(agent_model, data, xv, xt, yt, test_loss[full_index], seed)
        for point in points:
            point["static_at_same_compute"] = _interp(static_curve, point["compute_fraction"])
            point["own_static_at_same_compute"] = _interp(own_curve, point["compute_fraction"])
        return points

    for policy in FLAGS.policies:
        # Each agent starts from the seed and a fresh data pipeline, so an agent loaded from the cache leaves
        # the next one as it would be after training: a stopped run resumes with the same numbers.
        keras.utils.set_random_seed(seed)
        data = _load(name, seed)
        path = _stage_path(name, backbone, seed, f"rnp_{policy}")
        stored = _load_agent_stage(path)
        if stored is not None:
            agent_model, saved = stored
            timing[f"rnp_{policy}"] = saved["seconds"]
            policies[policy], agent_models[policy] = saved["points"], agent_model
            select_log, last_sweep = saved["select_log"] or select_log, saved["last_sweep"] or last_sweep
            continue
        options, epochs = {}, FLAGS.rnp_epochs
        if policy == "stage":  # the paper's agent deciding once per stage: the same backbone weights
            options["backbone"] = rnp_tf.decide_per_stage(backbone_model.backbone)
        if policy == "knob":
            penalties = [float(p) for p in FLAGS.knob_backbone_penalties]
            options["schedule"] = {**backbone_model.schedule.get_config(), "backbone_penalty_range": penalties}
            epochs = FLAGS.knob_epochs or FLAGS.rnp_epochs
        agent_model = _clone(backbone_model, **options)
        start = time.time()
        select = None
        if policy == "knob" and FLAGS.knob_select:
            select = rnp_tf.BestKnobWeights(xv, yv, [float(b) for b in FLAGS.knob_select_budgets], restore=False)
        _fit(agent_model, data, None, epochs, 3e-4, callbacks=[select] if select else None)
        if select is not None:  # the last epoch's knob first (compared in the same run), then the kept epoch's
            last_sweep = _sweep(agent_model, xv, xt, yt)
            agent_model.set_weights(select.best_weights)
            select_log = {"best_epoch": select.best_epoch, "history": select.history}
        # the static curve of the agent's own fine-tuned backbone: what the per-image choice adds to its weights
        _, own_curve, _ = _static_curve(agent_model, mixes, fractions, xv, yv, xt, yt)
        points = evaluate(agent_model, own_curve)
        timing[f"rnp_{policy}"] = time.time() - start
        policies[policy], agent_models[policy] = points, agent_model
        _save_agent_stage(path, agent_model, {
            "points": points, "seconds": timing[f"rnp_{policy}"],
            "select_log": select_log if select is not None else None,
            "last_sweep": last_sweep if select is not None else None})

    keras.utils.set_random_seed(seed)  # the stages below start alike whether the agents were trained or loaded
    data = _load(name, seed)

    # 6: oracle bounds (hard and soft) on test
    oracle_rows = []
    for kind, ok in (
        ("oracle", test_correct),
        ("soft_oracle", test_loss <= test_loss[full_index][None, :] + FLAGS.soft_margin),
    ):
        chosen = oracle_choice(ok, fractions, full_index)
        oracle_rows.append({"kind": kind, "accuracy": float(test_correct[chosen, np.arange(len(yt))].mean()),
                            "compute_fraction": float(fractions[chosen].mean())})

    # 7: confidence cascade (narrowest mix, escalate to full width when unsure)
    narrow = int(np.argmin(fractions))
    cascade = []
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        escalate = test_conf[narrow] < threshold
        correct = np.where(escalate, test_correct[full_index], test_correct[narrow])
        cost = fractions[narrow] + escalate * fractions[full_index]
        cascade.append({"threshold": threshold, "accuracy": float(correct.mean()),
                        "compute_fraction": float(cost.mean())})

    # 3-4: static fine-tuned and thin from scratch at every budget
    budgets = [float(b) for b in FLAGS.budgets]
    start = time.time()
    finetuned = []
    for budget in budgets if "static_finetuned" not in FLAGS.skip else []:
        i = min(front, key=lambda j: abs(fractions[j] - budget))
        tuned = _clone(backbone_model)
        _train_forced(tuned, data, mixes[i], steps, 3e-4)
        correct, _, _ = _per_image(tuned, xt, yt, mixes[i][None, :])
        finetuned.append({"budget": budget, "mix": mixes[i].tolist(), "compute_fraction": float(fractions[i]),
                          "accuracy": float(correct.mean())})
    timing["static_finetuned"] = time.time() - start
    start = time.time()
    thin = []
    for budget in budgets if "thin" not in FLAGS.skip else []:
        spec, fraction = _thin_spec(backbone, budget, backbone_model.full_macs, data)
        net = _new_model(spec, data)
        _fit(net, data, "full", FLAGS.pretrain_epochs + FLAGS.robust_epochs, 2e-3)
        correct, _, _ = _per_image(net, xt, yt, np.full((1, net.num_prunable), net.groups))
        thin.append({"budget": budget, "widths": [s["filters"] for s in spec["stages"] if s["type"] in ("conv", "bottleneck")],
                     "compute_fraction": fraction, "accuracy": float(correct.mean())})
    timing["thin"] = time.time() - start

    # issue 7: separately trained paper agents at fixed penalties, from the same backbone, against the
    # run-time knob of every single-penalty agent (`knob` first: the comparison's one model)
    separate, sweeps = [], {}
    compared = FLAGS.separate_penalties or FLAGS.reference
    knob_policies = [p for p in ("knob", "paper") if p in policies] if compared else []
    for policy in knob_policies:
        sweeps[policy] = _sweep(agent_models[policy], xv, xt, yt)
    if last_sweep is not None and knob_policies:
        sweeps["knob_last"] = last_sweep

    def matched(agent):  # the one model(s) at a separate agent's compute
        by_policy = {policy: _interp_inside([(p["compute_fraction"], p["accuracy"]) for p in sweep],
                                            agent["compute_fraction"]) for policy, sweep in sweeps.items()}
        return {**agent, "one_model_at_same_compute": by_policy[knob_policies[0]] if knob_policies else None,
                "one_model_by_policy": by_policy}

    for penalty in [float(p) for p in FLAGS.separate_penalties]:
        start = time.time()
        agent_model = _clone(backbone_model, penalty=penalty)
        _fit(agent_model, data, None, FLAGS.rnp_epochs, 3e-4)
        details = agent_model.predict_details(xt)
        separate.append(matched({"penalty": penalty, "accuracy": float((details["logits"].argmax(1) == yt).mean()),
                                 "compute_fraction": float(details["compute_fraction"].mean()),
                                 "seconds": time.time() - start}))
    for agent in reference:
        keep = ("penalty", "accuracy", "compute_fraction", "seconds")
        separate.append(matched({**{k: agent[k] for k in keep}, "from_reference": FLAGS.reference}))

    return {
        "dataset": name,
        "backbone": backbone,
        "seed": seed,
        "num_train": data.num_train,
        "mixes_evaluated": int(len(mixes)),
        "full_accuracy": full_accuracy,
        "static_curve": static_curve,
        "policies": policies,
        "knob_select": select_log,
        "oracle": oracle_rows,
        "cascade": cascade,
        "static_finetuned": finetuned,
        "thin": thin,
        "separate_agents": separate,
        "knob_policy": knob_policies[0] if knob_policies else None,
        "knob_sweep": sweeps[knob_policies[0]] if knob_policies else [],
        "knob_sweeps": sweeps,
        "seconds": timing,
        "_test": (xt, yt, data.class_names),
    }


def _stats(values):
    values = [v for v in values if v is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


def _by_policy(group):
    """(policy, the runs that trained it) for every policy of a group, in order of first appearance.

    Runs merged from separate processes may have trained different agents (e.g. seeds 0-2 with `paper`, seeds
    3-5 with `knob`): each policy is summarised over the seeds that have it.
    """
    policies = dict.fromkeys(p for r in group for p in r["policies"])
    return [(p, [r for r in group if p in r["policies"]]) for p in policies]


def summarise(runs):
    """Mean and std over seeds, per dataset, backbone and budget (`seeds`: how many runs each row averages)."""
    rows = []
    for name, backbone in sorted({(r["dataset"], r["backbone"]) for r in runs}):
        group = [r for r in runs if (r["dataset"], r["backbone"]) == (name, backbone)]

        def row(method, values, compute, p90=None, spearman=None):
            mean, std = _stats(values)
            rows.append({"dataset": name, "backbone": backbone, "method": method, "accuracy": mean, "std": std,
                         "compute": _stats(compute)[0], "p90": p90, "spearman": spearman,
                         "seeds": len([v for v in values if v is not None])})

        row("full network", [r["full_accuracy"] for r in group], [1.0])
        for i, budget in enumerate(float(b) for b in FLAGS.budgets):
            tag = f"@{budget:g}"
            for policy, trained in _by_policy(group):
                points = [r["policies"][policy][i] for r in trained]
                compute = [p["compute_fraction"] for p in points]
                row(f"RNP {policy} {tag}", [p["accuracy"] for p in points], compute,
                    p90=_stats([p["compute_p90"] for p in points])[0],
                    spearman=_stats([p["spearman_compute_vs_full_loss"] for p in points])[0])
                row(f"shuffled {policy} {tag}", [p["shuffled_accuracy"] for p in points], compute)
                row(f"static curve at RNP {policy} {tag}", [p["static_at_same_compute"] for p in points], compute)
                if all("own_static_at_same_compute" in p for p in points):  # runs before 2026-11-21 lack it
                    row(f"own static curve at RNP {policy} {tag}", [p["own_static_at_same_compute"] for p in points],
                        compute)
            for label, stage in (("static fine-tuned", "static_finetuned"), ("thin from scratch", "thin")):
                if all(r[stage] for r in group):  # not skipped (`--skip`)
                    row(f"{label} {tag}", [r[stage][i]["accuracy"] for r in group],
                        [r[stage][i]["compute_fraction"] for r in group])
            cascade = [_cascade_at(r, budget) for r in group]
            if all(c is not None for c in cascade):
                row(f"cascade {tag}", cascade, [budget])
        for i, oracle in enumerate(group[0]["oracle"]):
            row(oracle["kind"], [r["oracle"][i]["accuracy"] for r in group],
                [r["oracle"][i]["compute_fraction"] for r in group])
        for i, sep in enumerate(group[0]["separate_agents"]):
            row(f"separate agent p={sep['penalty']:g}", [r["separate_agents"][i]["accuracy"] for r in group],
                [r["separate_agents"][i]["compute_fraction"] for r in group])
            for policy, label in _knob_labels(group):
                row(f"one model ({label}) at its compute, p={sep['penalty']:g}",
                    [_one_model(r["separate_agents"][i], policy) for r in group],
                    [r["separate_agents"][i]["compute_fraction"] for r in group])
    return rows


def _knob_labels(group):
    """(policy, row label) of every knob compared with the separate agents (older runs: the paper agent's)."""
    policies = group[0].get("knob_sweeps") or {"paper": None}
    return [(p, "knob" if "knob_sweeps" not in group[0] else f"RNP {p}") for p in policies]


def _one_model(separate_agent, policy):
    """The one model's accuracy at a separate agent's compute (None outside its knob's range)."""
    if "one_model_by_policy" in separate_agent:
        return separate_agent["one_model_by_policy"].get(policy)
    return separate_agent["one_model_at_same_compute"]


def _run_sweeps(run):
    """A run's knob sweeps by policy (runs before `knob_sweeps` swept the paper agent's alone, `knob_sweep`)."""
    return run.get("knob_sweeps") or ({"paper": run["knob_sweep"]} if run.get("knob_sweep") else {})


def knob_budget_misses(group, policy):
    """Relative error of a knob sweep's mean compute (over seeds) at every requested budget (issue 7).

    Args:
        group: the runs of one dataset and backbone.
        policy: the agent whose run-time knob was swept.

    Returns:
        `{budget: mean compute / budget - 1}` over the seeds that swept that
        knob, in the sweep's order; the sweep's "floor" point (the knob's
        cheapest setting, no budget asked) is left out.

    Example:

    >>> knob_budget_misses([{"knob_sweeps": {"knob": [{"budget": 0.5, "compute_fraction": 0.52},
    ...                                                {"budget": "floor", "compute_fraction": 0.1}]}}], "knob")
    {0.5: 0.040000000000000036}
    """
    sweeps = [sweep for sweep in (_run_sweeps(r).get(policy) for r in group) if sweep]
    budgets = [p["budget"] for p in sweeps[0] if p["budget"] != "floor"] if sweeps else []
    return {b: float(np.mean([p["compute_fraction"] for sweep in sweeps for p in sweep if p["budget"] == b])) / b - 1
            for b in budgets}


def knob_differences(group, policy):
    """Per-seed accuracy of each separate agent minus the one model's at its compute (issue 7).

    Args:
        group: the runs of one dataset and backbone, all with `separate_agents`.
        policy: the agent whose run-time knob is compared.

    Returns:
        `{penalty: [difference per seed]}` (fractions, not points), in the
        runs' order of penalties; seeds whose agent lies outside the knob's
        range are left out, and so are penalties without any matched seed.

    Example:

    >>> knob_differences([{"separate_agents": [{"penalty": -0.1, "accuracy": 0.75,
    ...                                         "one_model_by_policy": {"knob": 0.5}}]}], "knob")
    {-0.1: [0.25]}
    """
    out = {}
    for i, agent in enumerate(group[0]["separate_agents"]):
        pairs = [(r["separate_agents"][i]["accuracy"], _one_model(r["separate_agents"][i], policy)) for r in group]
        differences = [a - b for a, b in pairs if b is not None]
        if differences:  # a seed's agent outside the knob's range has no matched point
            out[agent["penalty"]] = differences
    return out


def compact(rows):
    """One line per dataset, backbone and budget: every method's test accuracy (mean ± std over seeds, %).

    Reports of runs at commit 7fe7dd6 or before (`--merge`) that trained the removed `late` agent get its
    columns too.
    """
    agents = ["paper"] + [p for p in ("late", "stage") if any(r["method"].startswith(f"RNP {p} ") for r in rows)]
    columns = [(f"{kind} {p}", f"{kind} {p}") for p in agents for kind in ("RNP", "shuffled")]
    columns += [("static curve", "static curve at RNP paper"), ("static fine-tuned", "static fine-tuned"),
                ("thin", "thin from scratch"), ("cascade", "cascade")]
    index = {(r["dataset"], r["backbone"], r["method"]): r for r in rows}
    lines = [f"| data / backbone | budget | compute ({' / '.join(agents)}) | " + " | ".join(c for c, _ in columns)
             + " |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in columns) + " |"]

    def cell(row):
        return "" if row is None or row["accuracy"] is None else f"{100 * row['accuracy']:.1f} ± {100 * row['std']:.1f}"

    for name, backbone in sorted({(r["dataset"], r["backbone"]) for r in rows}):
        full = index[(name, backbone, "full network")]
        lines.append(f"| {name} / {backbone} | full | 1.0 | full network {cell(full)} |" + " |" * (len(columns) - 1))
        for budget in FLAGS.budgets:
            tag = f"@{float(budget):g}"
            compute = " / ".join(f"{r['compute']:.3f}" if r else "-"
                                 for r in (index.get((name, backbone, f"RNP {p} {tag}")) for p in agents))
            cells = [cell(index.get((name, backbone, f"{key} {tag}"))) for _, key in columns]
            lines.append(f"| {name} / {backbone} | {float(budget):g} | {compute} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cascade_at(run, budget):
    return _interp_inside([(c["compute_fraction"], c["accuracy"]) for c in run["cascade"]], budget)


def targets(runs):
    """The issue's targets, per dataset, backbone and policy: lines saying MET or MISSED with the numbers."""
    lines = []
    budgets = [float(b) for b in FLAGS.budgets]
    for name, backbone in sorted({(r["dataset"], r["backbone"]) for r in runs}):
        group = [r for r in runs if (r["dataset"], r["backbone"]) == (name, backbone)]
        for policy, trained in _by_policy(group):
            label = f"{name} / {backbone} / {policy}"
            if len(trained) < len(group):
                label += f" ({len(trained)} of {len(group)} seeds)"
            full = np.mean([r["full_accuracy"] for r in trained])
            acc = np.array([[r["policies"][policy][i]["accuracy"] for i in range(len(budgets))] for r in trained])
            static = np.array([[r["policies"][policy][i]["static_at_same_compute"] for i in range(len(budgets))]
                               for r in trained])
            shuffled = np.array([[r["policies"][policy][i]["shuffled_accuracy"] for i in range(len(budgets))]
                                 for r in trained])
            compute = np.array([[r["policies"][policy][i]["compute_fraction"] for i in range(len(budgets))]
                                for r in trained]).mean(0)
            gain, spread = (acc - static).mean(0), acc.std(0)
            ok = bool(np.all(gain > spread))
            lines.append(f"- {label}: beats the static curve by more than the seed std at every budget: "
                         f"{'MET' if ok else 'MISSED'} (gain {_pts(gain)}; std {_pts(spread)})")
            over_shuffle = (acc - shuffled).mean(0)
            lines.append(f"- {label}: beats its shuffled control at every budget: "
                         f"{'MET' if np.all(over_shuffle > 0) else 'MISSED'} (gain {_pts(over_shuffle)})")
            if all("own_static_at_same_compute" in p for r in trained for p in r["policies"][policy]):
                own = np.array([[p["own_static_at_same_compute"] for p in r["policies"][policy]] for r in trained])
                over_own = (acc - own).mean(0)
                lines.append(f"- {label}: beats the static curve of its own fine-tuned backbone at every budget: "
                             f"{'MET' if np.all(over_own > 0) else 'MISSED'} (gain {_pts(over_own)})")
            cheap = compute <= 1 / 3 + 1e-9
            if cheap.any():
                best = acc.mean(0)[cheap].max()
                lines.append(f"- {label}: within 1.0 point of the full network at >= 3x fewer MACs: "
                             f"{'MET' if full - best <= 0.01 else 'MISSED'} (best {100 * best:.1f}% against "
                             f"{100 * full:.1f}%)")
            deep = compute <= 1 / 5 + 1e-9
            if deep.any() and all(r["thin"] for r in trained):
                i = int(np.argmin(compute))
                thin = np.mean([r["thin"][i]["accuracy"] for r in trained])
                margin = min(acc.mean(0)[i] - static.mean(0)[i], acc.mean(0)[i] - thin)
                lines.append(f"- {label}: at {1 / compute[i]:.1f}x fewer MACs, >= 3 points above static and thin: "
                             f"{'MET' if margin >= 0.03 else 'MISSED'} (RNP {100 * acc.mean(0)[i]:.1f}%, static "
                             f"{100 * static.mean(0)[i]:.1f}%, thin {100 * thin:.1f}%)")
            rho = np.mean([[p["spearman_compute_vs_full_loss"] for p in r["policies"][policy]] for r in trained])
            lines.append(f"- {label}: harder images get more compute (Spearman > 0): "
                         f"{'MET' if rho > 0 else 'MISSED'} (mean rho {rho:+.2f})")
            miss = np.abs(compute / np.array(budgets) - 1)
            lines.append(f"- {label}: mean compute within 5% of the requested budget (issue 7): "
                         f"{'MET' if np.all(miss <= 0.05) else 'MISSED'} (off by {_pts(miss)}%)")
        for policy, label in _knob_labels(group) if group[0].get("separate_agents") else []:
            misses = knob_budget_misses(group, policy)
            if misses:
                off = np.array(list(misses.values()))
                lines.append(f"- {name} / {backbone}: one model ({label}) sweep: mean compute within 5% of every "
                             f"requested budget (issue 7, budgets {'/'.join(f'{b:g}' for b in misses)}): "
                             f"{'MET' if np.all(np.abs(off) <= 0.05) else 'MISSED'} (off by {_pts(off)}%)")
            differences = knob_differences(group, policy).values()
            gaps, spreads = [np.mean(d) for d in differences], [np.std(d) for d in differences]
            if gaps:
                lines.append(f"- {name} / {backbone}: one model ({label}) within 1.0 point of separately trained "
                             f"agents at matched compute (issue 7, {len(gaps)} agents inside the knob's range): "
                             f"{'MET' if max(gaps) <= 0.01 else 'MISSED'} (separate minus one model {_pts(gaps)}; "
                             "std of the per-seed differences " + "/".join(f"{100 * v:.1f}" for v in spreads) + ")")
    return lines


# stages timed inside another stage: shown, but not added to the total again (the `imitate` agent of
# reports at commit 7fe7dd6 and before, read by `--merge`)
NESTED_STAGES = {"imitation": "rnp_imitate"}


def stage_times(runs):
    """Markdown table: wall time of each stage (minutes), mean over seeds, per dataset and backbone.

    A stage in `NESTED_STAGES` is part of its parent's time (in older reports, the `imitate` agent's stage
    includes its imitation), so its column is labelled as such and the total counts it once. The separately trained
    agents of issue 7 (timed one by one) make one more column.
    """
    runs = [{"dataset": r["dataset"], "backbone": r["backbone"], "seconds": _stage_seconds(r)} for r in runs]
    stages = list(dict.fromkeys(stage for r in runs for stage in r["seconds"]))
    names = [f"{s} (in {NESTED_STAGES[s]})" if s in NESTED_STAGES else s for s in stages]
    lines = ["| data / backbone | seeds | " + " | ".join(names) + " | total |",
             "| --- | ---: | " + " | ".join("---:" for _ in stages) + " | ---: |"]
    for name, backbone in sorted({(r["dataset"], r["backbone"]) for r in runs}):
        group = [r["seconds"] for r in runs if (r["dataset"], r["backbone"]) == (name, backbone)]
        means = [np.mean([g[s] for g in group if s in g]) / 60 if any(s in g for g in group) else None for s in stages]
        cells = ["" if m is None else f"{m:.1f}" for m in means]
        total = np.mean([sum(v for s, v in g.items() if s not in NESTED_STAGES) for g in group]) / 60
        lines.append(f"| {name} / {backbone} | {len(group)} | " + " | ".join(cells) + f" | {total:.1f} |")
    return "\n".join(lines)


def _stage_seconds(run):
    seconds = dict(run.get("seconds", {}))
    trained = [agent for agent in run.get("separate_agents", []) if "from_reference" not in agent]
    if trained:  # agents read from a --reference report were not trained by this run
        seconds["separate_agents"] = sum(agent.get("seconds", 0.0) for agent in trained)
    return seconds


def _pts(values):
    return "/".join(f"{100 * v:+.1f}" for v in values)


def plot(runs, output, stem):
    """One picture per dataset and backbone (first seed's curves), plus the extreme images.

    With more than one seed and issue 7's separate agents, also every seed's gap at each penalty.
    """
    from rnp_tf import report

    paths = []
    for name, backbone in sorted({(r["dataset"], r["backbone"]) for r in runs}):
        group = [r for r in runs if (r["dataset"], r["backbone"]) == (name, backbone)]
        run = group[0]
        curves = {"static curve": run["static_curve"]}
        for policy, points in run["policies"].items():
            curves[f"RNP {policy} (one model, knob)"] = [(p["compute_fraction"], p["accuracy"]) for p in points]
            curves[f"shuffled {policy}"] = [(p["compute_fraction"], p["shuffled_accuracy"]) for p in points]
        cascade = [(c["compute_fraction"], c["accuracy"]) for c in run["cascade"] if c["compute_fraction"] <= 1.0]
        if cascade:  # a cascade that escalates often costs more than the full network
            curves["cascade"] = cascade
        for label, stage in (("thin from scratch", "thin"), ("static fine-tuned", "static_finetuned")):
            if run[stage]:
                curves[label] = [(t["compute_fraction"], t["accuracy"]) for t in run[stage]]
        sweeps = _run_sweeps(run)
        for policy, sweep in sweeps.items():
            curves[f"RNP {policy}, knob sweep (issue 7)"] = [(k["compute_fraction"], k["accuracy"]) for k in sweep]
        if run["separate_agents"]:
            curves["separately trained agents"] = sorted((s["compute_fraction"], s["accuracy"])
                                                         for s in run["separate_agents"])
        if sweeps and run["separate_agents"]:  # issue 7: one model against separate agents
            knob = {f"one model ({policy}), run-time knob": [(k["compute_fraction"], k["accuracy"]) for k in sweep]
                    for policy, sweep in sweeps.items()}
            knob["separately trained agents"] = sorted((a["compute_fraction"], a["accuracy"])
                                                       for a in run["separate_agents"])
            path = os.path.join(output, f"{stem}_{name}_{backbone}_knob.png")
            paths.append(report.plot_accuracy_vs_compute(
                knob, path, title=f"{name}, {backbone}: knob vs separate agents (seed {run['seed']})",
                reference={"full network": (1.0, run["full_accuracy"])}))
        if sweeps and run["separate_agents"] and len(group) > 1:  # issue 7 over every seed: the gaps and their noise
            policy = _knob_labels(group)[0][0]
            gaps = {f"p={p:g}": [100 * d for d in ds] for p, ds in knob_differences(group, policy).items()}
            if gaps:
                path = os.path.join(output, f"{stem}_{name}_{backbone}_knob_gaps.png")
                paths.append(report.plot_differences(
                    gaps, path, threshold=1.0, ylabel="separate agent minus one model (points)",
                    title=f"{name}, {backbone}: one model ({policy}) vs separate agents, {len(group)} seeds"))
        reference = {o["kind"]: (o["compute_fraction"], o["accuracy"]) for o in run["oracle"]}
        reference["full network"] = (1.0, run["full_accuracy"])
        path = os.path.join(output, f"{stem}_{name}_{backbone}.png")
        paths.append(report.plot_accuracy_vs_compute(
            curves, path, title=f"{name}, {backbone}: accuracy against compute (seed {run['seed']})",
            reference=reference))
        if "_test" not in run:  # merged from JSON: the pictures of the images were drawn by the run itself
            continue
        xt, yt, class_names = run["_test"]
        for policy, points in run["policies"].items():
            point = points[len(points) // 2]
            path = os.path.join(output, f"{stem}_{name}_{backbone}_{policy}_extremes.png")
            low = xt.min(axis=(1, 2, 3), keepdims=True)  # standardised inputs: stretch each image to [0, 1]
            shown = (xt - low) / np.maximum(xt.max(axis=(1, 2, 3), keepdims=True) - low, 1e-6)
            paths.append(report.plot_extreme_images(
                shown, yt, point["_pred"], np.clip(point["_frac"], 0, 1), path,
                class_names=class_names))
    return paths


def _public(runs):
    """The runs without their private arrays (for JSON)."""
    clean = []
    for run in runs:
        run = {k: v for k, v in run.items() if not k.startswith("_")}
        run["policies"] = {p: [{k: v for k, v in point.items() if not k.startswith("_")} for point in points]
                           for p, points in run["policies"].items()}
        clean.append(run)
    return clean


def write_report(runs, output, stem, extra=None):
    """`<stem>.json`, `<stem>.md` (table and targets) and the pictures."""
    from rnp_tf import io_utils
    from rnp_tf import report

    rows = summarise(runs)
    goals = targets(runs)
    keys = ("datasets", "backbones", "seeds", "widths", "vgg_width", "policies", "pretrain_epochs", "robust_epochs",
            "rnp_epochs", "max_train_examples", "penalty", "budgets", "separate_penalties", "knob_budgets", "max_mixes",
            "knob_backbone_penalties", "knob_epochs", "knob_select", "knob_select_budgets",
            "reference", "skip")
    result = {"flags": {k: FLAGS[k].value for k in keys}, "runs": _public(runs), "summary": rows, "targets": goals,
              **(extra or {})}
    io_utils.write_json(os.path.join(output, f"{stem}.json"), result)
    table = report.format_table(rows, ["dataset", "backbone", "method", "accuracy", "std", "compute", "p90", "spearman",
                                     "seeds"])
    text = (table + "\n\n## Compact (test accuracy %, mean ± std over seeds)\n\n" + compact(rows)
            + "\n\n## Targets (mean over seeds)\n\n" + "\n".join(goals)
            + "\n\n## Wall time of each stage (minutes, mean over seeds; one process)\n\n" + stage_times(runs) + "\n")
    io_utils.atomic_write(os.path.join(output, f"{stem}.md"), lambda p: pathlib.Path(p).write_text(text))
    plot(runs, output, stem)
    return text


def _merge(paths):
    runs, seconds = [], 0.0
    for path in paths:
        if not os.path.isfile(path):
            raise app.UsageError(f"--merge: no such file {path}")
        data = json.loads(pathlib.Path(path).read_text())
        if data["flags"]["budgets"] != FLAGS.budgets:
            raise app.UsageError(f"--merge: {path} used --budgets={data['flags']['budgets']}, not {FLAGS.budgets}")
        runs += data["runs"]
        seconds += data.get("seconds", 0.0)
    return runs, seconds


def main(argv):
    del argv
    from rnp_tf import io_utils

    if FLAGS.quick:
        FLAGS.datasets, FLAGS.seeds, FLAGS.backbones = ["digits"], ["0"], ["cifar_cnn"]
        FLAGS.widths = ["8", "16", "16", "16"]
        FLAGS.pretrain_epochs, FLAGS.robust_epochs, FLAGS.rnp_epochs = 1, 1, 1
        FLAGS.budgets = ["0.6", "0.3"]
        FLAGS.max_mixes = min(FLAGS.max_mixes, 16)
    for name, values, allowed in (("backbones", FLAGS.backbones, BACKBONES), ("policies", FLAGS.policies, POLICIES),
                                  ("datasets", FLAGS.datasets, (*DATASETS, "digits")), ("skip", FLAGS.skip, STAGES)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise app.UsageError(f"--{name}: unknown {unknown}; expected some of {', '.join(allowed)}.")
    if FLAGS.reference and FLAGS.separate_penalties:
        raise app.UsageError("--reference and --separate_penalties: the agents come from one or the other.")
    if FLAGS.reference and not os.path.isfile(FLAGS.reference):
        raise app.UsageError(f"--reference: no such file {FLAGS.reference}")
    try:
        select_budgets = [float(b) for b in FLAGS.knob_select_budgets]
    except ValueError:
        select_budgets = []
    if not select_budgets or not all(0 < b <= 1 for b in select_budgets):
        raise app.UsageError(f"--knob_select_budgets: expected compute fractions in (0, 1]. "
                             f"Received: {','.join(FLAGS.knob_select_budgets)}")
    if "stage" in FLAGS.policies and set(FLAGS.backbones) != {"resnet_cifar"}:
        raise app.UsageError(f"--policies=stage decides once per stage of a residual backbone without skips: "
                             f"--backbones=resnet_cifar only. Received: {','.join(FLAGS.backbones)}")
    if "knob" in FLAGS.policies and len(FLAGS.knob_backbone_penalties) != 2:
        raise app.UsageError(f"--knob_backbone_penalties: expected p_min,p_max. Received: {FLAGS.knob_backbone_penalties}")
    stem = FLAGS.stem or ("accuracy_quick" if FLAGS.quick else "accuracy")
    try:
        FLAGS.output = str(timing.smoke_output(FLAGS.output, FLAGS["output"].present, FLAGS.quick, [f"{stem}.json"]))
    except ValueError as e:
        raise app.UsageError(str(e))
    if FLAGS.quick:
        print(f"bench.accuracy --quick writes to {FLAGS.output}", flush=True)
    os.makedirs(FLAGS.output, exist_ok=True)
    if FLAGS.merge:
        runs, seconds = _merge(FLAGS.merge)
        print(write_report(runs, FLAGS.output, stem, {"seconds": seconds, "merged_from": FLAGS.merge}))
        return
    start = time.time()
    runs = []
    for name in FLAGS.datasets:
        for backbone in FLAGS.backbones:
            for seed in FLAGS.seeds:
                runs.append(run_one(name, backbone, int(seed)))
                print(f"{name} {backbone} seed {seed}: {runs[-1]['seconds']}", flush=True)
                # what is done so far survives a crash or a stop (`--merge` reads it)
                io_utils.write_json(os.path.join(FLAGS.output, f"{stem}.partial.json"),
                                    {"flags": {"budgets": FLAGS.budgets}, "runs": _public(runs)})
    print(write_report(runs, FLAGS.output, stem, {"seconds": time.time() - start}))


if __name__ == "__main__":
    app.run(main)
