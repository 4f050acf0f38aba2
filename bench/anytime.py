r"""Nested channel groups and anytime escalation against the dense network: `python -m bench.anytime`.

Issue 27's stage 1. For every dataset, seed and variant, it trains an
`rnp_tf.nested.AnytimeNetwork` (nested groups, one head per width, one pass
per step) on the same split as `bench.accuracy`, and measures on test, with
compute as a fraction of the ordinary (dense) network's MACs:

1. the nested static curve: every image at width `a`;
2. escalation by a confidence threshold, the threshold chosen on validation
   to meet each of `--budgets`;
3. escalation by the DQN stop agent (`rnp_tf.escalation.StopAgent`, one
   per `--penalties`, trained on validation), the penalty and its knob (a
   bias on Q(stop)) chosen on validation for each budget;
4. controls at the same compute: each policy's exit widths shuffled across
   images (mean of 5 shuffles), the nested static curve, and, from the
   `bench.accuracy` report of the same dataset and seed (`--reference`), the
   dense prefix-robust network's static curve, its static fine-tuned points
   and the paper's agent.

Variants: `nested` (the dense network's widths), `wide` (every width
times `--wide_scale`, so that the nested network's full MACs come near the
dense network's) and `dense`: the same-recipe control, today's prefix-robust
`RNPModel` (one BatchNorm set per input width) trained by its sandwich phase
with the same optimizer, learning-rate schedule and epochs, whose static
curve (every per-layer mix; the front chosen on validation, read on test) is
the dense curve each nested run of the same dataset and seed is compared
with. The `--reference` curves come from `bench.accuracy`'s own recipe
(10 full-width epochs, then 8 sandwich epochs, constant learning rates).

Output in `--output`: `<stem>.json`, `<stem>.md` (paired gaps per budget,
mean and standard error over seeds, targets) and `<stem>.png`.

Example:

    python -m bench.anytime --quick
    python -m bench.anytime --datasets=cifar10_subset --seeds=3,4,5,6,7 \
        --reference=cifar10_subset=bench/results/accuracy_knob10.json
"""

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

VARIANTS = ("nested", "wide", "dense")
FLAGS = flags.FlagValues()  # its own: it imports beside bench.accuracy
_FV = {"flag_values": FLAGS}
flags.DEFINE_bool("help", False, "Show this help.", **_FV)
flags.DEFINE_list("datasets", ["cifar10_subset", "fashion_mnist"], "Datasets: " + ", ".join(splits.DATASETS) + ".",
                  **_FV)
flags.DEFINE_list("seeds", ["3", "4", "5", "6", "7"], "Seeds (paired with the reference report's seeds).", **_FV)
flags.DEFINE_list("variants", ["nested"], "Networks: " + ", ".join(VARIANTS) + ".", **_FV)
flags.DEFINE_list("widths", ["32", "64", "128", "128"], "cifar_cnn widths of the dense network.", **_FV)
flags.DEFINE_float("wide_scale", 1.25, "Variant `wide`: every width times this (rounded to the groups).", **_FV)
flags.DEFINE_integer("groups", 4, "k: the number of widths.", **_FV)
flags.DEFINE_integer("epochs", 18, "Training epochs (the dense backbone of bench.accuracy gets 10 + 8).", **_FV)
flags.DEFINE_float("learning_rate", 2e-3, "Adam's initial learning rate (cosine decay to 0).", **_FV)
flags.DEFINE_float("distill_weight", 1.0, "Distillation from the widest head.", **_FV)
flags.DEFINE_list("penalties", ["-0.005", "-0.01", "-0.02", "-0.05", "-0.1"], "Stop agents' penalties p.", **_FV)
flags.DEFINE_list("budgets", ["0.15", "0.2", "0.25", "0.3", "0.35", "0.4", "0.45"],
                  "Mean compute fractions of the dense network's MACs.", **_FV)
flags.DEFINE_list("reference", [], "dataset=path of a bench.accuracy JSON with the same seeds (dense controls).", **_FV)
flags.DEFINE_integer("validation", 1000, "Training images held out for validation.", **_FV)
flags.DEFINE_integer("max_train_examples", 8000, "Cap on training images.", **_FV)
flags.DEFINE_boolean("quick", False, "Smoke run: digits, one seed, one epoch.", **_FV)
flags.DEFINE_string("output", "bench/results", "Output directory.", **_FV)
flags.DEFINE_string("stem", None, "Output file stem (default: anytime, or anytime_quick with --quick).", **_FV)
flags.DEFINE_list("merge", [], "Instead of running: merge these JSON outputs into one report.", **_FV)


def _widths(variant, groups):
    scale = FLAGS.wide_scale if variant == "wide" else 1.0
    return tuple(max(groups, int(round(int(w) * scale / groups)) * groups) for w in FLAGS.widths)


def _curve_at_budgets(val_points, test_points, budgets):
    """For each budget, the setting whose validation compute is nearest (best validation accuracy on ties)."""
    rows = []
    for budget in budgets:
        best = min(range(len(val_points)), key=lambda i: (round(abs(val_points[i][0] - budget), 3),
                                                           -val_points[i][1]))
        rows.append({"budget": budget, "setting": val_points[best][2], "compute_fraction": test_points[best][0],
                     "accuracy": test_points[best][1], "_index": best})
    return rows


def _reference(dataset, seed):
    """The dense controls of one seed from `--reference` (or empty)."""
    from rnp_tf import io_utils

    paths = dict(item.split("=", 1) for item in FLAGS.reference)
    if dataset not in paths:
        return {}
    runs = [r for r in io_utils.read_json(paths[dataset])["runs"]
            if (r["dataset"], r["backbone"], r["seed"]) == (dataset, "cifar_cnn", seed)]
    if not runs:
        return {}
    run = runs[0]
    paper = run["policies"].get("paper", [])
    return {"path": paths[dataset], "full_accuracy": run["full_accuracy"], "static_curve": run["static_curve"],
            "static_finetuned": [(p["compute_fraction"], p["accuracy"]) for p in run.get("static_finetuned", [])],
            "paper": [(p["compute_fraction"], p["accuracy"]) for p in paper]}


def _optimizer(data):
    import keras

    steps = FLAGS.epochs * int(np.ceil(data.num_train / 128))
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(FLAGS.learning_rate, max(1, steps)))


def run_dense(dataset, seed, data, xv, yv, xt, yt):
    """The same-recipe dense control: a prefix-robust RNPModel, its sandwich phase, its static curve."""
    import keras

    import rnp_tf

    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn(_widths("nested", FLAGS.groups)), image_shape=data.input_shape,
                            num_classes=data.num_classes, groups=FLAGS.groups)
    model.compile(optimizer=_optimizer(data), agent_optimizer=keras.optimizers.Adam(1e-3))
    model.set_phase("robust")
    start = time.time()
    model.fit(data.train, epochs=FLAGS.epochs, shuffle=False, verbose=0)  # tf.data shuffles
    seconds = {"train": time.time() - start}
    mixes = static.candidate_mixes(model.num_prunable, model.groups, 256, seed)
    fractions = model.compute_fraction(mixes).numpy()
    _, curve, (correct, _, _) = static.static_curve(model, mixes, fractions, xv, yv, xt, yt)
    uniform = [i for i, m in enumerate(mixes) if len(set(m)) == 1]
    return {"dataset": dataset, "seed": seed, "variant": "dense", "widths": list(_widths("nested", FLAGS.groups)),
            "static_curve": curve, "uniform": [(float(fractions[i]), float(correct[i].mean())) for i in uniform],
            "seconds": seconds}


def run_one(dataset, seed, variant):
    import keras

    import rnp_tf
    from rnp_tf import escalation
    from rnp_tf import nested

    groups, timings = FLAGS.groups, {}
    keras.utils.set_random_seed(seed)
    data = splits.load_split(dataset, seed, FLAGS.validation, FLAGS.max_train_examples)
    xv, yv = splits.arrays(data.validation)
    xt, yt = splits.arrays(data.test)
    if variant == "dense":
        return run_dense(dataset, seed, data, xv, yv, xt, yt)
    net = nested.AnytimeNetwork(rnp_tf.cifar_cnn(_widths(variant, groups)), data.input_shape, data.num_classes,
                                groups=groups, distill_weight=FLAGS.distill_weight)
    dense = rnp_tf.plan.full_macs(rnp_tf.cifar_cnn(_widths("nested", groups)), data.input_shape, data.num_classes, groups)
    net.compile(optimizer=_optimizer(data))
    start = time.time()
    history = net.fit(data.train, epochs=FLAGS.epochs, shuffle=False, verbose=0)  # tf.data shuffles
    timings["train"] = time.time() - start
    fractions = net.width_macs() / dense
    val_logits, test_logits = net.predict(xv, verbose=0), net.predict(xt, verbose=0)
    logits_dir = os.path.join(FLAGS.output, "anytime_logits")
    os.makedirs(logits_dir, exist_ok=True)  # the policies can be measured again without training
    np.savez_compressed(os.path.join(logits_dir, f"{dataset}_{variant}_seed{seed}.npz"), val_logits=val_logits,
                        val_labels=yv, test_logits=test_logits, test_labels=yt, width_fractions=fractions)
    budgets = [float(b) for b in FLAGS.budgets]

    def point(logits, labels, exits):
        accuracy, compute = escalation.exit_metrics(logits, labels, exits, fractions)
        return compute, accuracy

    def controls(rows, test_exits):
        for row in rows:
            exits = test_exits[row.pop("_index")]
            row["shuffled"] = float(np.mean([point(test_logits, yt, escalation.shuffled(exits, seed * 10 + i))[1]
                                             for i in range(5)]))
            row["exit_shares"] = (np.bincount(exits, minlength=groups + 1)[1:] / len(exits)).tolist()
        return rows

    static = [(float(f), float((test_logits[:, a].argmax(-1) == yt).mean())) for a, f in enumerate(fractions)]
    # 2: the threshold rule
    start = time.time()
    thresholds = np.linspace(0.0, 1.0, 201)
    val_points = [(*point(val_logits, yv, escalation.threshold_exits(val_logits, t)), float(t)) for t in thresholds]
    test_exits = [escalation.threshold_exits(test_logits, t) for t in thresholds]
    test_points = [point(test_logits, yt, e) for e in test_exits]
    threshold_rows = controls(_curve_at_budgets(val_points, test_points, budgets), test_exits)
    # 3: the DQN stop agents; the knob is a bias on Q(stop)
    vf, tf_ = escalation.confidence_features(val_logits), escalation.confidence_features(test_logits)
    vl = net.width_losses(yv, val_logits).numpy()
    val_points, test_exits, test_points = [], [], []
    for penalty in [float(p) for p in FLAGS.penalties]:
        keras.utils.set_random_seed(seed)
        agent = escalation.train_stop_agent(escalation.StopAgent(groups), vf, vl, penalty, seed=seed)
        qv, qt = agent(vf).numpy(), agent(tf_).numpy()
        for bias in np.linspace(-1.0, 1.0, 81):
            ev = escalation.first_stop(qv[..., 0] + bias >= qv[..., 1])
            et = escalation.first_stop(qt[..., 0] + bias >= qt[..., 1])
            val_points.append((*point(val_logits, yv, ev), [penalty, float(bias)]))
            test_exits.append(et)
            test_points.append(point(test_logits, yt, et))
    dqn_rows = controls(_curve_at_budgets(val_points, test_points, budgets), test_exits)
    timings["policies"] = time.time() - start
    reference = _reference(dataset, seed)
    for row in threshold_rows + dqn_rows:
        c = row["compute_fraction"]
        row["nested_static"] = splits.interp(static, c)
        for key in ("static_curve", "static_finetuned", "paper"):
            curve = reference.get(key)
            row[f"dense_{key}"] = splits.interp_inside(curve, c) if curve else None
    return {"dataset": dataset, "seed": seed, "variant": variant, "widths": list(_widths(variant, groups)),
            "width_fractions": fractions.tolist(), "static": static,
            "train_accuracy": {k: float(v[-1]) for k, v in history.history.items()},
            "threshold": threshold_rows, "dqn": dqn_rows,
            "reference": reference, "seconds": timings}


def _mean_se(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), se, len(values)


def _fmt(mean, se, n):
    if mean is None:
        return "-"
    return f"{100 * mean:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else "") + f" ({n})"


CONTROLS = (("shuffled", "its shuffled control"), ("nested_static", "nested static curve"),
            ("same_recipe_dense", "dense static, same recipe"),
            ("dense_static_curve", "dense static (bench.accuracy)"),
            ("dense_static_finetuned", "dense static fine-tuned (bench.accuracy)"),
            ("dense_paper", "dense + paper's agent (bench.accuracy)"))
DENSE = ("same_recipe_dense", "dense_static_curve", "dense_static_finetuned", "dense_paper")


def with_dense_controls(runs):
    """The escalation runs, each row given the same-recipe dense curve of its dataset and seed (or None)."""
    dense = {(r["dataset"], r["seed"]): r for r in runs if r["variant"] == "dense"}
    out = []
    for run in runs:
        if run["variant"] == "dense":
            continue
        control = dense.get((run["dataset"], run["seed"]))
        run = dict(run)
        for policy in ("threshold", "dqn"):
            run[policy] = [dict(row, same_recipe_dense=splits.interp_inside(control["static_curve"],
                                                                            row["compute_fraction"])
                                if control else None) for row in run[policy]]
        out.append(run)
    return out


def summarise(runs):
    """Markdown tables: per (dataset, variant, policy), each budget's accuracy and paired gaps to the controls."""
    lines = []
    for run in sorted((r for r in runs if r["variant"] == "dense"), key=lambda r: (r["dataset"], r["seed"])):
        lines.append(f"Dense, same recipe, {run['dataset']} seed {run['seed']}: uniform widths " + ", ".join(
            f"{100 * a:.1f}% at {c:.3f}" for c, a in run["uniform"]))
    runs = with_dense_controls(runs)
    keys = sorted({(r["dataset"], r["variant"]) for r in runs})
    for dataset, variant in keys:
        group = [r for r in runs if (r["dataset"], r["variant"]) == (dataset, variant)]
        seeds = sorted(r["seed"] for r in group)
        lines.append(f"\n### {dataset}, {variant} (widths {group[0]['widths']}), seeds {seeds}\n")
        statics = np.array([[a for _, a in r["static"]] for r in group])
        lines.append("Nested static widths: " + ", ".join(
            f"width {a + 1}: {100 * statics[:, a].mean():.1f}% at {group[0]['width_fractions'][a]:.3f}"
            for a in range(statics.shape[1])) + "\n")
        for policy in ("threshold", "dqn"):
            header = "| budget | compute | accuracy % | " + " | ".join(f"vs {label}" for _, label in CONTROLS) + " |"
            lines += [f"**{policy}** (gap = policy minus control, points, mean ± s.e. (seeds))\n", header,
                      "|" + "---|" * (3 + len(CONTROLS))]
            for b, budget in enumerate(r["budget"] for r in group[0][policy]):
                rows = [r[policy][b] for r in group]
                cells = [f"{budget:.2f}", f"{np.mean([x['compute_fraction'] for x in rows]):.3f}",
                         f"{100 * np.mean([x['accuracy'] for x in rows]):.1f}"]
                for key, _ in CONTROLS:
                    cells.append(_fmt(*_mean_se([x["accuracy"] - x[key] if x.get(key) is not None else None
                                                 for x in rows])))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def targets(runs):
    """Issue 27's stage-1 targets, on the means over seeds, for every (dataset, variant, policy)."""
    out = []
    runs = with_dense_controls(runs)
    for dataset, variant in sorted({(r["dataset"], r["variant"]) for r in runs}):
        group = [r for r in runs if (r["dataset"], r["variant"]) == (dataset, variant)]
        for policy in ("threshold", "dqn"):
            budgets = [row["budget"] for row in group[0][policy]]
            shuffled = [_mean_se([r[policy][b]["accuracy"] - r[policy][b]["shuffled"] for r in group])[0]
                        for b in range(len(budgets))]
            dense = []
            for b in range(len(budgets)):
                gaps = []
                for r in group:
                    row = r[policy][b]
                    # judged only where the same-recipe dense run exists: the other curves come from
                    # bench.accuracy's recipe, which trains the dense network less well
                    best = [row[k] for k in DENSE if row.get(k) is not None]
                    fair = row.get("same_recipe_dense") is not None
                    gaps.append(row["accuracy"] - max(best) if fair else None)
                dense.append(_mean_se(gaps)[0])
            met = all(g >= 0.02 - 1e-9 for g in shuffled)
            out.append(f"- {dataset}, {variant}, {policy}: beats its shuffled control by >= 2 points at every budget: "
                       f"{'met' if met else 'missed'} (" + ", ".join(f"{100 * g:+.1f}" for g in shuffled) + ")")
            known = [g for g in dense if g is not None]
            seeds = sum(any(row.get("same_recipe_dense") is not None for row in r[policy]) for r in group)
            out.append(f"  best dense curve at equal MACs ({seeds} seeds with the same-recipe run): " + (", ".join(
                "-" if g is None else f"{100 * g:+.1f}" for g in dense) if known else "no same-recipe dense run")
                + ("; >= +1 point somewhere: " + ("met" if max(known) >= 0.01 - 1e-9 else "missed")
                   + "; never below -0.5: " + ("met" if min(known) >= -0.005 - 1e-9 else "missed") if known else ""))
    return out


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in runs if r["variant"] == "dense"]
    runs = [r for r in runs if r["variant"] != "dense"]
    keys = sorted({(r["dataset"], r["variant"]) for r in runs})
    if not keys:  # dense controls alone: their curves are drawn beside the escalation runs they pair with
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, (dataset, variant) in zip(axes[0], keys):
        group = [r for r in runs if (r["dataset"], r["variant"]) == (dataset, variant)]
        fr = np.array(group[0]["width_fractions"])
        ax.plot(fr, [np.mean([r["static"][a][1] for r in group]) for a in range(len(fr))], "s-", label="nested static")
        for policy, style in (("threshold", "o-"), ("dqn", "^-")):
            rows = [[r[policy][b] for r in group] for b in range(len(group[0][policy]))]
            c = [np.mean([x["compute_fraction"] for x in row]) for row in rows]
            ax.plot(c, [np.mean([x["accuracy"] for x in row]) for row in rows], style, label=f"escalation: {policy}")
            ax.plot(c, [np.mean([x["shuffled"] for x in row]) for row in rows], style[0] + ":",
                    label=f"{policy}, shuffled")
        controls = [d for d in dense if d["dataset"] == dataset]
        if controls:
            grid = np.linspace(0.1, 0.9, 33)
            ys = [np.mean([v for v in (splits.interp_inside(d["static_curve"], g) for d in controls)
                           if v is not None] or [np.nan]) for g in grid]
            ax.plot(grid, ys, "k-", lw=1, label=f"dense static, same recipe ({len(controls)} seeds)")
        refs = [r["reference"] for r in group if r["reference"]]
        if refs:
            grid = np.linspace(0.1, 0.7, 25)
            for key, label in (("static_curve", "dense static (bench.accuracy recipe)"),
                               ("paper", "dense + paper's agent (bench.accuracy recipe)")):
                ys = [np.mean([v for v in (splits.interp_inside(ref[key], g) for ref in refs if ref[key])
                               if v is not None] or [np.nan]) for g in grid]
                ax.plot(grid, ys, "--", label=label)
        ax.set(title=f"{dataset}, {variant} ({len(group)} seeds)", xlabel="compute (fraction of the dense MACs)",
               ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs, output, stem, extra=None):
    from rnp_tf import io_utils

    keys = ("datasets", "seeds", "variants", "widths", "wide_scale", "groups", "epochs", "learning_rate",
            "distill_weight", "penalties", "budgets", "reference", "validation", "max_train_examples")
    result = {"flags": {k: FLAGS[k].value for k in keys}, "runs": runs, "targets": targets(runs), **(extra or {})}
    io_utils.write_json(os.path.join(output, f"{stem}.json"), result)
    text = ("# Anytime escalation with nested groups (bench.anytime)\n" + summarise(runs)
            + "\n\n## Targets (means over seeds)\n\n" + "\n".join(result["targets"]) + "\n")
    io_utils.atomic_write(os.path.join(output, f"{stem}.md"), lambda p: pathlib.Path(p).write_text(text))
    plot(runs, os.path.join(output, f"{stem}.png"))
    return text


def main(argv):
    del argv
    from rnp_tf import io_utils

    if FLAGS.quick:
        FLAGS.datasets, FLAGS.seeds, FLAGS.epochs = ["digits"], ["0"], 1
        FLAGS.widths, FLAGS.penalties = ["8", "8", "16", "16"], ["-0.05"]
    for name, values, allowed in (("variants", FLAGS.variants, VARIANTS),
                                  ("datasets", FLAGS.datasets, (*splits.DATASETS, "digits"))):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise app.UsageError(f"--{name}: unknown {unknown}; expected some of {', '.join(allowed)}.")
    for item in FLAGS.reference:
        dataset, _, path = item.partition("=")
        if not path or not os.path.isfile(path):
            raise app.UsageError(f"--reference: expected dataset=path of an existing file. Received: {item!r}")
    stem = FLAGS.stem or ("anytime_quick" if FLAGS.quick else "anytime")
    try:
        FLAGS.output = str(timing.smoke_output(FLAGS.output, FLAGS["output"].present, FLAGS.quick, [f"{stem}.json"]))
    except ValueError as e:
        raise app.UsageError(str(e))
    os.makedirs(FLAGS.output, exist_ok=True)
    if FLAGS.merge:
        runs = []
        for path in FLAGS.merge:
            if not os.path.isfile(path):
                raise app.UsageError(f"--merge: no such file {path}")
            runs += json.loads(pathlib.Path(path).read_text())["runs"]
        print(write_report(runs, FLAGS.output, stem, {"merged_from": FLAGS.merge}))
        return
    start, runs = time.time(), []
    for dataset in FLAGS.datasets:
        for variant in FLAGS.variants:
            for seed in FLAGS.seeds:
                runs.append(run_one(dataset, int(seed), variant))
                print(f"{dataset} {variant} seed {seed}: {runs[-1]['seconds']}", flush=True)
                io_utils.write_json(os.path.join(FLAGS.output, f"{stem}.partial.json"), {"runs": runs})
    print(write_report(runs, FLAGS.output, stem, {"seconds": time.time() - start}))


if __name__ == "__main__":
    app.run(main, flags_parser=timing.flags_parser(FLAGS, __doc__))
