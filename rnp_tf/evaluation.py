"""Evaluation of a trained RNP model: numbers (`eval.json`) and pictures.

Shared by `python -m rnp_tf.train` (its final stage) and
`python -m rnp_tf.evaluate` (`evaluate_dir`), so both report the same
quantities.
"""

import os

import numpy as np

from rnp_tf import io_utils
from rnp_tf import report

#: Test images kept in memory for the qualitative figure.
MAX_FIGURE_IMAGES = 10000


def _accuracy(details):
    return float(np.mean(details["logits"].argmax(axis=1) == details["labels"]))


#: Offsets from the model's setting swept for the RNP curve (see `set_penalty`).
KNOB_OFFSETS = (1.0, 0.5, 0.2, -0.2, -0.5, -1.0)


def budget_points(model, budgets, x_set, x, y, num_points=9):
    """Accuracy and compute of the run-time knob set to each budget.

    Calibrates the knob on `x_set` (`calibrate_budget`), sets each budget
    there (`set_budget(b, x_set)`, refined by bisection) and reads accuracy
    and mean compute on `(x, y)`. The model's knob setting and calibration
    are left as they were.

    Args:
        model: a trained `RNPModel`.
        budgets: mean compute fractions, in the order to report them.
        x_set: images the budgets are set on (e.g. validation).
        x, y: images and integer labels the points are read on.
        num_points: penalties of the calibration. Defaults to 9.

    Returns:
        A list of dicts `budget`, `penalty`, `accuracy`, `compute_fraction`.

    Example:

    >>> budget_points(model, [0.5, 0.25], x_val, x_test, y_test)
    """
    setting, calibration = model.penalty_setting, model._calibration.numpy()
    points = []
    try:
        model.calibrate_budget(x_set, num_points=num_points)
        for budget in budgets:
            penalty = model.set_budget(budget, x_set)
            details = model.predict_details(x)
            points.append({"budget": budget, "penalty": penalty,
                           "accuracy": float(np.mean(details["logits"].argmax(-1) == y)),
                           "compute_fraction": float(details["compute_fraction"].mean())})
    finally:
        model.set_penalty(setting)
        model._calibration.assign(calibration)
    return points


def evaluate_model(model, dataset, static_points=True, knob_points=True):
    """Accuracy and compute of the greedy policy and of static pruning.

    Args:
        model: a trained `RNPModel`.
        dataset: an `rnp_tf.data.Dataset` (its `test` split is used).
        static_points: also evaluate the same width everywhere (`a = 1..k`,
            no agent): the static operating points to compare with.
        knob_points: also evaluate the same model at other run-time
            penalties (`KNOB_OFFSETS` around its setting): its own
            accuracy-against-compute curve, no retraining.

    Returns:
        A dict (JSON-ready) with `accuracy`, `full_accuracy`,
        `compute_fraction` (mean, std, percentiles), `macs_mean`,
        `full_macs`, `agent_macs`, `action_shares` (`[layer][action]`),
        `distinct_action_tuples`, `compute_per_class`,
        `accuracy_per_class`, `static` (list of operating points), and the
        raw per-image arrays under the private key `_details`.

    Example:

    >>> results = evaluate_model(model, rnp_tf.load_dataset("digits"))
    >>> results["accuracy"], results["compute_fraction"]["mean"]
    """
    details = model.predict_details(dataset.test)
    labels = details["labels"]
    fraction = details["compute_fraction"]
    actions = details["actions"]
    shares = np.stack(
        [np.bincount(actions[:, t] - 1, minlength=model.groups) / len(actions) for t in range(actions.shape[1])]
    )
    names = list(dataset.class_names)
    per_class_compute, per_class_accuracy = {}, {}
    correct = details["logits"].argmax(axis=1) == labels
    for c in range(dataset.num_classes):
        mask = labels == c
        if mask.any():
            name = names[c] if c < len(names) else str(c)
            per_class_compute[name] = float(fraction[mask].mean())
            per_class_accuracy[name] = float(correct[mask].mean())
    static = []
    full_accuracy = None
    if static_points:
        for a in range(1, model.groups + 1):
            point = model.predict_details(dataset.test, actions=a)
            acc = _accuracy(point)
            static.append(
                {"action": a, "accuracy": acc, "compute_fraction": float(point["compute_fraction"].mean())}
            )
            if a == model.groups:
                full_accuracy = acc
    knob = []
    if knob_points:
        setting = model.penalty_setting
        for penalty in [setting + d for d in KNOB_OFFSETS]:
            model.set_penalty(float(penalty))
            try:
                point = model.predict_details(dataset.test)
            finally:
                model.set_penalty(setting)
            knob.append(
                {
                    "penalty": float(penalty),
                    "accuracy": _accuracy(point),
                    "compute_fraction": float(point["compute_fraction"].mean()),
                }
            )
    return {
        "num_test": int(len(labels)),
        "penalty_setting": model.penalty_setting,
        "compute_cap": None if model._cap_macs is None else model._cap_macs / model.full_macs,
        "accuracy": _accuracy(details),
        "full_accuracy": full_accuracy,
        "compute_fraction": {
            "mean": float(fraction.mean()),
            "std": float(fraction.std()),
            "min": float(fraction.min()),
            "p10": float(np.percentile(fraction, 10)),
            "p50": float(np.percentile(fraction, 50)),
            "p90": float(np.percentile(fraction, 90)),
            "max": float(fraction.max()),
        },
        "macs_mean": float(details["macs"].mean()),
        "full_macs": float(model.full_macs),
        "agent_macs": float(model.agent.macs()),
        "action_shares": shares.tolist(),
        "distinct_action_tuples": int(len({tuple(row) for row in actions})),
        "compute_per_class": per_class_compute,
        "accuracy_per_class": per_class_accuracy,
        "static": static,
        "knob": knob,
        "_details": details,
    }


def write_pictures(model, dataset, results, out_dir):
    """Writes the evaluation figures (PNG) into `out_dir`.

    Figures: `compute_histogram.png` (per-image compute),
    `extreme_images.png` (the test images with the least and the most
    compute, the paper's qualitative figure), `accuracy_vs_compute.png`
    (RNP against static widths and the full network) and
    `action_shares.png` (action shares per layer).

    Args:
        model: the evaluated `RNPModel`.
        dataset: the `rnp_tf.data.Dataset` that was evaluated.
        results: the dict returned by `evaluate_model`.
        out_dir: an existing directory.

    Returns:
        A dict figure name -> path.
    """
    details = results["_details"]
    paths = {}
    paths["compute_histogram"] = report.plot_compute_histogram(
        details["compute_fraction"],
        os.path.join(out_dir, "compute_histogram.png"),
        title=f"Per-image compute on {dataset.name} ({results['num_test']} test images)",
    )
    count = min(len(details["labels"]), MAX_FIGURE_IMAGES)
    images = []
    seen = 0
    for batch_images, _ in dataset.test:
        images.append(batch_images.numpy())
        seen += len(images[-1])
        if seen >= count:
            break
    images = dataset.denormalize(np.concatenate(images)[:count])
    paths["extreme_images"] = report.plot_extreme_images(
        images,
        details["labels"][:count],
        details["logits"][:count].argmax(axis=1),
        details["compute_fraction"][:count],
        os.path.join(out_dir, "extreme_images.png"),
        class_names=dataset.class_names,
    )
    reference = {"RNP (agent)": (results["compute_fraction"]["mean"], results["accuracy"])}
    curves = {}
    if results["static"]:
        curves["static: same width everywhere"] = [
            (p["compute_fraction"], p["accuracy"]) for p in results["static"]
        ]
        reference["full network"] = (1.0, results["full_accuracy"])
    if results["knob"]:
        points = [(p["compute_fraction"], p["accuracy"]) for p in results["knob"]]
        curves["RNP, one model at other run-time penalties"] = points + [reference["RNP (agent)"]]
    if not curves:
        curves["RNP (agent)"] = [reference.pop("RNP (agent)")]
    paths["accuracy_vs_compute"] = report.plot_accuracy_vs_compute(
        curves,
        os.path.join(out_dir, "accuracy_vs_compute.png"),
        title=f"Accuracy against compute on {dataset.name}",
        reference=reference,
    )
    paths["action_shares"] = report.plot_action_histogram(
        np.asarray(results["action_shares"]), os.path.join(out_dir, "action_shares.png")
    )
    return paths


def write_evaluation(model, dataset, out_dir, json_name="eval.json", pictures=True):
    """Evaluates, writes `json_name` and the pictures, returns the results.

    Args:
        model: a trained `RNPModel`.
        dataset: an `rnp_tf.data.Dataset`.
        out_dir: existing directory for the outputs.
        json_name: file name of the JSON results. Defaults to `"eval.json"`.
        pictures: whether to write the figures. Defaults to True.

    Returns:
        The JSON-ready results dict (without per-image arrays), with the
        figure paths under `"pictures"`.

    Example:

    >>> write_evaluation(model, rnp_tf.load_dataset("digits"), "/tmp/run")
    """
    results = evaluate_model(model, dataset)
    figures = write_pictures(model, dataset, results, out_dir) if pictures else {}
    results = {k: v for k, v in results.items() if not k.startswith("_")}
    results["dataset"] = dataset.name
    results["pictures"] = {k: os.path.basename(v) for k, v in figures.items()}
    io_utils.write_json(os.path.join(out_dir, json_name), results)
    return results


def evaluate_dir(
    model_dir,
    dataset=None,
    tfds_data_dir=None,
    batch_size=256,
    output_dir=None,
    pictures=True,
    penalty=None,
    budget=None,
    compute_cap=None,
):
    """Loads a trained model directory, evaluates it and writes the report.

    Args:
        model_dir: a directory written by `rnp_tf.train`.
        dataset: dataset name; defaults to the one recorded in `flags.json`.
        tfds_data_dir: tensorflow-datasets data_dir.
        batch_size: evaluation batch size.
        output_dir: where to write; defaults to `model_dir`.
        pictures: whether to write the figures.
        penalty: run-time penalty to evaluate at (`RNPModel.set_penalty`).
        budget: target mean compute fraction: the model is calibrated on
            the test split (`calibrate_budget`) and `set_budget` bisects
            the penalty on it until the mean compute is within 0.01.
        compute_cap: hard per-image cap (`RNPModel.set_compute_cap`).

    Returns:
        The results dict written to `eval.json`.

    Example:

    >>> results = evaluate_dir("/tmp/rnp_quickstart")  # a --model_dir of rnp_tf.train
    """
    import keras

    from rnp_tf import data as data_lib
    from rnp_tf import validation

    if penalty is not None:
        validation.check_float("--penalty", penalty)
    if budget is not None:
        validation.check_float("--budget", budget, 0.0, 1.0, low_open=True)
    if compute_cap is not None:
        validation.check_float("--compute_cap", compute_cap, 0.0, 1.0, low_open=True)
    if penalty is not None and budget is not None:
        raise ValueError("--penalty and --budget are two ways to set the same knob: give one.")
    model_path = os.path.join(model_dir, "model.keras")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model_dir: no model.keras in {model_dir!r} (train one with rnp_tf.train).")
    io_utils.check_writable_dir(output_dir or model_dir, "--output_dir" if output_dir else "--model_dir")
    recorded = {}
    flags_path = os.path.join(model_dir, "flags.json")
    if os.path.isfile(flags_path):
        recorded = io_utils.read_json(flags_path)
    dataset = dataset or recorded.get("dataset")
    if not dataset:
        raise ValueError(f"--dataset is required: {flags_path!r} does not say which dataset was used.")
    try:
        model = keras.models.load_model(model_path)
    except Exception as error:
        raise ValueError(f"--model_dir: {model_path!r} is not a loadable Keras model ({error}).")
    data = data_lib.load_dataset(
        dataset,
        batch_size=batch_size,
        validation_split=0.0,
        tfds_data_dir=tfds_data_dir or recorded.get("tfds_data_dir"),
        seed=recorded.get("seed", 0),
    )
    if tuple(data.input_shape) != tuple(model.image_shape) or data.num_classes != model.num_classes:
        raise ValueError(
            f"--dataset: {dataset!r} has images {data.input_shape} and {data.num_classes} classes, but the "
            f"model expects {model.image_shape} and {model.num_classes}."
        )
    if compute_cap is not None:
        floor = model.min_macs / model.full_macs
        if compute_cap < floor - 1e-9:
            raise ValueError(
                f"--compute_cap must lie in [{floor:.4f}, 1] (the narrowest network costs {floor:.4f}). "
                f"Received: --compute_cap={compute_cap}"
            )
    if penalty is not None:
        model.set_penalty(penalty)
    if budget is not None:
        model.calibrate_budget(data.test)
        model.set_budget(budget, data.test)
    if compute_cap is not None:
        model.set_compute_cap(compute_cap)
    output_dir = output_dir or model_dir
    os.makedirs(output_dir, exist_ok=True)
    return write_evaluation(model, data, output_dir, pictures=pictures)


def summary_rows(results):
    """Rows for `report.format_table`: the full network, static widths, RNP."""
    rows = []
    for point in results.get("static", []):
        rows.append(
            {
                "model": f"static a={point['action']}",
                "accuracy": point["accuracy"],
                "compute_fraction": point["compute_fraction"],
            }
        )
    for point in results.get("knob", []):
        rows.append(
            {
                "model": f"RNP at p={point['penalty']:.3g}",
                "accuracy": point["accuracy"],
                "compute_fraction": point["compute_fraction"],
            }
        )
    rows.append(
        {
            "model": "RNP (agent)",
            "accuracy": results["accuracy"],
            "compute_fraction": results["compute_fraction"]["mean"],
        }
    )
    return rows


def summary_table(results):
    """The Markdown table of `summary_rows` that both CLIs print.

    Args:
        results: the results of `write_evaluation`.

    Returns:
        A string.
    """
    return report.format_table(summary_rows(results), ["model", "accuracy", "compute_fraction"])
