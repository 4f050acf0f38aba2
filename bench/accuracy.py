r"""Accuracy against compute on real data: `python -m bench.accuracy`.

Does the agent beat static pruning at equal cost? For every dataset and
seed, from the SAME prefix-robust backbone, this script measures:

1. the full network;
2. the static curve: every per-layer mix of widths, the Pareto front chosen
   on validation and read on test, interpolated between mixes;
3. static fine-tuned: the front's mixes nearest the RNP points fine-tuned
   for as many steps as the agent's training;
4. thin networks of about the same MACs trained from scratch ("vanilla");
5. RNP at operating points from about 1.5x to 6x fewer MACs (the run-time
   knob of one trained model, `RNPModel.set_budget`), and optionally
   separately trained agents at fixed penalties (`--separate_penalties`);
6. controls for every RNP point: its action tuples shuffled across test
   images (same compute, isolates the per-image choice), and the oracle
   bounds (cheapest mix that classifies the image correctly; cheapest mix
   whose loss is within `--soft_margin` of the full network's);
7. a confidence cascade: the narrowest mix, re-run at full width when its
   top softmax probability is below a threshold.

It also tests the paper's second claim (Spearman correlation between
per-image compute and the full network's loss; compute per class). Output:
`accuracy.json`, `accuracy.md` and `accuracy.png` in `--output`.

Example:

    python -m bench.accuracy --quick                      # smoke run, ~2 min
    python -m bench.accuracy --datasets=cifar10_subset --seeds=0,1,2
"""

import itertools
import os
import pathlib
import time

import numpy as np
from absl import app
from absl import flags

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "cifar10_subset": "cifar10_subset.npz",
    "fashion_mnist": "fashion_mnist.npz",
}

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["cifar10_subset", "fashion_mnist"], "Datasets: " + ", ".join(DATASETS) + ", digits.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (one full pipeline per seed).")
flags.DEFINE_list("widths", ["32", "64", "128", "128"], "cifar_cnn widths.")
flags.DEFINE_integer("pretrain_epochs", 15, "Full-width epochs of the backbone.")
flags.DEFINE_integer("robust_epochs", 10, "Prefix-robust epochs.")
flags.DEFINE_integer("rnp_epochs", 8, "Algorithm 1 epochs.")
flags.DEFINE_integer("validation", 1000, "Training images held out for validation.")
flags.DEFINE_integer("max_train_examples", None, "Cap on training images (smoke runs).")
flags.DEFINE_float("penalty", -0.05, "Training penalty p0 of the agent.")
flags.DEFINE_list("budgets", ["0.67", "0.4", "0.25", "0.17"], "RNP operating points (mean compute fractions).")
flags.DEFINE_list("separate_penalties", [], "Also train one agent per penalty here (issue 7's comparison).")
flags.DEFINE_float("soft_margin", 0.1, "Soft oracle: loss within this of the full network's.")
flags.DEFINE_boolean("quick", False, "Smoke run: digits, one seed, few epochs.")
flags.DEFINE_string("output", "bench/results", "Output directory.")


def _load(name, seed, batch_size=128):
    import rnp_tf

    if name == "digits":
        return rnp_tf.load_dataset("digits", batch_size=batch_size, validation_split=0.2, seed=seed)
    path = SHARED / DATASETS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the benchmark reads ../shared/data/{DATASETS[name]}")
    ds = rnp_tf.load_dataset(f"npz:{path}", batch_size=batch_size, seed=seed, max_train_examples=FLAGS.max_train_examples)
    fraction = FLAGS.validation / (ds.num_train if FLAGS.max_train_examples is None else FLAGS.max_train_examples)
    return rnp_tf.load_dataset(
        f"npz:{path}", batch_size=batch_size, seed=seed, validation_split=min(0.5, fraction),
        max_train_examples=FLAGS.max_train_examples,
    )


def _arrays(split):
    xs, ys = [], []
    for x, y in split:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _new_model(widths, data, **kwargs):
    import rnp_tf

    return rnp_tf.RNPModel(
        rnp_tf.cifar_cnn(tuple(widths)), image_shape=data.input_shape, num_classes=data.num_classes, **kwargs
    )


def _fit(model, data, phase, epochs, lr, agent_lr=1e-3):
    import keras

    if not epochs:
        return 0.0
    model.compile(optimizer=keras.optimizers.Adam(lr), agent_optimizer=keras.optimizers.Adam(agent_lr))
    model.set_phase(phase)
    start = time.time()
    model.fit(data.train, epochs=epochs, verbose=0)
    return time.time() - start


def _clone(model):
    import rnp_tf

    copy = rnp_tf.RNPModel.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _per_image(model, x, y, actions):
    """Logits-derived per-image correctness and loss for forced actions."""
    import tensorflow as tf

    out = model.predict_details(x) if actions is None else None
    if out is None:
        logits = []
        for start in range(0, len(x), 512):
            a = np.broadcast_to(actions, (len(x), model.num_prunable))[start : start + 512]
            logits.append(model.rollout(x[start : start + 512], actions=np.ascontiguousarray(a))["logits"].numpy())
        logits = np.concatenate(logits)
    else:
        logits = out["logits"]
    loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy()
    return logits.argmax(1) == y, loss, logits


def _mix_table(model, x, y):
    """Correctness, loss and compute of every static per-layer mix."""
    mixes = np.array(list(itertools.product(range(1, model.groups + 1), repeat=model.num_prunable)))
    correct, losses, probs = [], [], []
    for mix in mixes:
        c, l, logits = _per_image(model, x, y, mix[None, :])
        correct.append(c)
        losses.append(l)
        probs.append(_softmax(logits).max(1))
    fractions = model.compute_fraction(mixes).numpy()
    return mixes, fractions, np.stack(correct), np.stack(losses), np.stack(probs)


def oracle_choice(ok, fractions, fallback):
    """For every image, the cheapest mix for which `ok[mix, image]` holds.

    Args:
        ok: bool array `[mixes, images]`.
        fractions: compute fraction of every mix.
        fallback: mix index used where no mix qualifies (the full network).

    Returns:
        int array `[images]` of mix indices.
    """
    order = np.argsort(fractions, kind="stable")
    sorted_ok = ok[order]
    first = sorted_ok.argmax(axis=0)
    chosen = order[first]
    return np.where(sorted_ok.any(axis=0), chosen, fallback)


def shuffle_actions(actions, seed):
    """The same action tuples, permuted across images (same total compute)."""
    return actions[np.random.default_rng(seed).permutation(len(actions))]


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _pareto(fractions, accuracy):
    """Indices of mixes on the accuracy/compute front (sorted by compute)."""
    order = np.argsort(fractions)
    front, best = [], -1.0
    for i in order:
        if accuracy[i] > best + 1e-12:
            front.append(int(i))
            best = accuracy[i]
    return front


def _interp(curve, fraction):
    xs, ys = zip(*sorted(curve))
    return float(np.interp(fraction, xs, ys))


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
            out = model._rollout(x, lambda t, q: forced[:, t], training=True, run_agent=False)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out["logits"], from_logits=True))
        optimizer.apply(tape.gradient(loss, variables), variables)

    done = 0
    while done < steps:
        for x, y in data.train:
            step(x, y)
            done += 1
            if done >= steps:
                break


def _thin_widths(widths, target_fraction, full_macs, data):
    """Channel counts of a uniformly thinner cifar_cnn with about the target MACs."""
    best = None
    for scale in np.linspace(0.1, 1.0, 91):
        w = [max(4, int(round(c * scale / 4)) * 4) for c in widths]
        macs = _new_model(w, data).full_macs
        gap = abs(macs / full_macs - target_fraction)
        if best is None or gap < best[0]:
            best = (gap, w, macs / full_macs)
    return best[1], best[2]


def run_one(name, seed):
    import keras

    keras.utils.set_random_seed(seed)
    data = _load(name, seed)
    widths = [int(w) for w in FLAGS.widths]
    timing = {}
    model = _new_model(widths, data, penalty=FLAGS.penalty, agent_steps=50, backbone_steps=50,
                       epsilon_decay_steps=200, full_width_fraction=0.25)
    from rnp_tf.reorder import reorder_channels

    timing["pretrain"] = _fit(model, data, "full", FLAGS.pretrain_epochs, 2e-3)
    reorder_channels(model)
    timing["robust"] = _fit(model, data, "robust", FLAGS.robust_epochs, 1e-3)
    backbone = _clone(model)
    xv, yv = _arrays(data.validation)
    xt, yt = _arrays(data.test)

    # 1-2: full network and the static curve (front chosen on validation, read on test)
    start = time.time()
    mixes, fractions, val_correct, _, _ = _mix_table(backbone, xv, yv)
    _, _, test_correct, test_loss, test_conf = _mix_table(backbone, xt, yt)
    timing["static_curve"] = time.time() - start
    front = _pareto(fractions, val_correct.mean(1))
    static_curve = [(float(fractions[i]), float(test_correct[i].mean())) for i in front]
    full_index = len(mixes) - 1
    full_accuracy = float(test_correct[full_index].mean())

    # 5: RNP: Algorithm 1 from the same backbone, then the knob at several budgets
    steps_per_epoch = int(np.ceil(data.num_train / 128))
    timing["rnp"] = _fit(model, data, None, FLAGS.rnp_epochs, 3e-4)
    model.calibrate_budget(xv, num_points=13)
    rnp_points = []
    for budget in [float(b) for b in FLAGS.budgets]:
        penalty = model.set_budget(budget)
        details = model.predict_details(xt)
        correct = details["logits"].argmax(1) == yt
        actions = details["actions"]
        # shuffled control: the same action tuples, permuted across images
        shuffled = shuffle_actions(actions, seed)
        shuffled_correct, _, _ = _per_image(model, xt, yt, shuffled)
        frac = details["compute_fraction"]
        rnp_points.append(
            {
                "budget": budget,
                "penalty": penalty,
                "accuracy": float(correct.mean()),
                "compute_fraction": float(frac.mean()),
                "compute_p90": float(np.percentile(frac, 90)),
                "shuffled_accuracy": float(shuffled_correct.mean()),
                "static_at_same_compute": _interp(static_curve, float(frac.mean())),
                "distinct_action_tuples": int(len({tuple(a) for a in actions})),
                "spearman_compute_vs_full_loss": _spearman(frac, test_loss[full_index]),
                "compute_per_class": {
                    data.class_names[c]: float(frac[yt == c].mean()) for c in range(data.num_classes) if (yt == c).any()
                },
            }
        )
    model.set_penalty(model.penalty)
    rnp_steps = FLAGS.rnp_epochs * steps_per_epoch

    # 6: oracle bounds (hard and soft) on test
    oracle_rows = []
    for kind, ok in (
        ("oracle", test_correct),
        ("soft_oracle", test_loss <= test_loss[full_index][None, :] + FLAGS.soft_margin),
    ):
        chosen = oracle_choice(ok, fractions, full_index)
        oracle_rows.append(
            {
                "kind": kind,
                "accuracy": float(test_correct[chosen, np.arange(len(yt))].mean()),
                "compute_fraction": float(fractions[chosen].mean()),
            }
        )

    # 7: confidence cascade (narrowest mix, escalate to full width when unsure)
    narrow = 0
    cascade = []
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        escalate = test_conf[narrow] < threshold
        correct = np.where(escalate, test_correct[full_index], test_correct[narrow])
        cost = fractions[narrow] + escalate * fractions[full_index]
        cascade.append({"threshold": threshold, "accuracy": float(correct.mean()), "compute_fraction": float(cost.mean())})

    # 3: static fine-tuned at the front mixes nearest each RNP point, same steps as RNP
    start = time.time()
    finetuned = []
    for point in rnp_points:
        i = min(front, key=lambda j: abs(fractions[j] - point["compute_fraction"]))
        tuned = _clone(backbone)
        _train_forced(tuned, data, mixes[i], rnp_steps, 3e-4)
        correct, _, _ = _per_image(tuned, xt, yt, mixes[i][None, :])
        finetuned.append({"mix": mixes[i].tolist(), "compute_fraction": float(fractions[i]),
                          "accuracy": float(correct.mean())})
    timing["static_finetuned"] = time.time() - start

    # 4: thin networks from scratch, same epochs as the backbone
    start = time.time()
    thin = []
    for point in rnp_points:
        thin_widths, fraction = _thin_widths(widths, point["compute_fraction"], backbone.full_macs, data)
        net = _new_model(thin_widths, data)
        _fit(net, data, "full", FLAGS.pretrain_epochs + FLAGS.robust_epochs, 2e-3)
        correct, _, _ = _per_image(net, xt, yt, np.full((1, net.num_prunable), net.groups))
        thin.append({"widths": thin_widths, "compute_fraction": fraction, "accuracy": float(correct.mean())})
    timing["thin"] = time.time() - start

    # issue 7: separately trained agents at fixed penalties, from the same backbone
    separate = []
    for penalty in [float(p) for p in FLAGS.separate_penalties]:
        agent_model = _clone(backbone)
        agent_model.penalty = penalty
        agent_model._penalty_setting.assign(penalty)
        _fit(agent_model, data, None, FLAGS.rnp_epochs, 3e-4)
        details = agent_model.predict_details(xt)
        one_model = _interp(
            [(p["compute_fraction"], p["accuracy"]) for p in rnp_points], float(details["compute_fraction"].mean())
        )
        separate.append(
            {
                "penalty": penalty,
                "accuracy": float((details["logits"].argmax(1) == yt).mean()),
                "compute_fraction": float(details["compute_fraction"].mean()),
                "one_model_at_same_compute": one_model,
            }
        )

    return {
        "dataset": name,
        "seed": seed,
        "full_accuracy": full_accuracy,
        "static_curve": static_curve,
        "rnp": rnp_points,
        "oracle": oracle_rows,
        "cascade": cascade,
        "static_finetuned": finetuned,
        "thin": thin,
        "separate_agents": separate,
        "seconds": timing,
    }


def summarise(runs):
    """Mean and std over seeds, per dataset and RNP budget."""
    rows = []
    for name in sorted({r["dataset"] for r in runs}):
        group = [r for r in runs if r["dataset"] == name]
        full = [r["full_accuracy"] for r in group]
        rows.append({"dataset": name, "method": "full network", "accuracy": np.mean(full), "std": np.std(full),
                     "compute": 1.0, "p90": 1.0})
        for i, budget in enumerate(group[0]["rnp"]):
            points = [r["rnp"][i] for r in group]
            for label, key in (("RNP", "accuracy"), ("shuffled control", "shuffled_accuracy"),
                               ("static curve", "static_at_same_compute")):
                values = [p[key] for p in points]
                rows.append({"dataset": name, "method": f"{label} @{budget['budget']}", "accuracy": np.mean(values),
                             "std": np.std(values), "compute": np.mean([p["compute_fraction"] for p in points]),
                             "p90": np.mean([p["compute_p90"] for p in points])})
            for label, key in (("static fine-tuned", "static_finetuned"), ("thin from scratch", "thin")):
                values = [r[key][i]["accuracy"] for r in group]
                rows.append({"dataset": name, "method": f"{label} @{budget['budget']}", "accuracy": np.mean(values),
                             "std": np.std(values), "compute": np.mean([r[key][i]["compute_fraction"] for r in group]),
                             "p90": None})
        for i, oracle in enumerate(group[0]["oracle"]):
            values = [r["oracle"][i]["accuracy"] for r in group]
            rows.append({"dataset": name, "method": oracle["kind"], "accuracy": np.mean(values), "std": np.std(values),
                         "compute": np.mean([r["oracle"][i]["compute_fraction"] for r in group]), "p90": None})
    return rows


def plot(runs, path):
    from rnp_tf import report

    curves, reference = {}, {}
    for name in sorted({r["dataset"] for r in runs}):
        run = [r for r in runs if r["dataset"] == name][0]
        curves[f"{name}: static curve"] = run["static_curve"]
        curves[f"{name}: RNP (one model, knob)"] = [(p["compute_fraction"], p["accuracy"]) for p in run["rnp"]]
        curves[f"{name}: shuffled control"] = [(p["compute_fraction"], p["shuffled_accuracy"]) for p in run["rnp"]]
        cascade = [(c["compute_fraction"], c["accuracy"]) for c in run["cascade"] if c["compute_fraction"] <= 1.0]
        if cascade:  # a cascade that escalates often costs more than the full network
            curves[f"{name}: cascade"] = cascade
        curves[f"{name}: thin from scratch"] = [(t["compute_fraction"], t["accuracy"]) for t in run["thin"]]
        curves[f"{name}: static fine-tuned"] = [(t["compute_fraction"], t["accuracy"]) for t in run["static_finetuned"]]
        if run["separate_agents"]:
            curves[f"{name}: separately trained agents"] = [
                (s["compute_fraction"], s["accuracy"]) for s in run["separate_agents"]
            ]
        for oracle in run["oracle"]:
            reference[f"{name}: {oracle['kind']}"] = (oracle["compute_fraction"], oracle["accuracy"])
    return report.plot_accuracy_vs_compute(curves, path, title="Accuracy against compute (seed of the first run)",
                                           reference=reference)


def main(argv):
    del argv
    from rnp_tf import io_utils
    from rnp_tf import report

    if FLAGS.quick:
        FLAGS.datasets, FLAGS.seeds = ["digits"], ["0"]
        FLAGS.widths = ["8", "16", "16", "16"]
        FLAGS.pretrain_epochs, FLAGS.robust_epochs, FLAGS.rnp_epochs = 1, 1, 1
        FLAGS.budgets = ["0.6", "0.3"]
    os.makedirs(FLAGS.output, exist_ok=True)
    start = time.time()
    runs = [run_one(name, int(seed)) for name in FLAGS.datasets for seed in FLAGS.seeds]
    rows = summarise(runs)
    result = {"flags": {k: FLAGS[k].value for k in ("datasets", "seeds", "widths", "pretrain_epochs", "robust_epochs",
                                                   "rnp_epochs", "penalty", "budgets", "separate_penalties")},
              "runs": runs, "summary": rows, "seconds": time.time() - start}
    stem = "accuracy_quick" if FLAGS.quick else "accuracy"
    io_utils.write_json(os.path.join(FLAGS.output, f"{stem}.json"), result)
    table = report.format_table(rows, ["dataset", "method", "accuracy", "std", "compute", "p90"])
    io_utils.atomic_write(os.path.join(FLAGS.output, f"{stem}.md"), lambda p: pathlib.Path(p).write_text(table + "\n"))
    plot(runs, os.path.join(FLAGS.output, f"{stem}.png"))
    print(table)


if __name__ == "__main__":
    app.run(main)
