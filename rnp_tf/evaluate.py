r"""Evaluate a trained model: `python -m rnp_tf.evaluate --model_dir ckpt/`.

Loads `model_dir/model.keras`, evaluates it on the test split of the dataset
it was trained on (from `model_dir/flags.json`) or of `--dataset`, prints a
summary and writes `eval.json` and the pictures (per-image compute
histogram, least/most-compute test images, accuracy against compute, action
shares) into `--output_dir` (default: `model_dir`).

Example:

    python -m rnp_tf.evaluate --model_dir /tmp/rnp_quickstart
"""

import os

from absl import app
from absl import flags

from rnp_tf import validation


def define_flags(flag_values=flags.FLAGS):
    """Defines the evaluation flags on `flag_values` (once)."""
    if "output_dir" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("model_dir", None, "Directory written by rnp_tf.train (holds model.keras).", **fv)
    flags.DEFINE_string("dataset", None, "Dataset to evaluate on (default: the one in flags.json).", **fv)
    flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir.", **fv)
    flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.", lower_bound=1, **fv)
    flags.DEFINE_string("output_dir", None, "Where eval.json and the pictures go (default: model_dir).", **fv)
    flags.DEFINE_boolean("pictures", True, "Write the pictures.", **fv)
    flags.DEFINE_float(
        "penalty", None, "Run-time penalty per extra group (more negative: cheaper); see RNPModel.set_penalty.", **fv
    )
    flags.DEFINE_float(
        "budget", None,
        "Target mean compute fraction in (0, 1]: calibrated on the test split's first batches, then set.", **fv
    )
    flags.DEFINE_float("compute_cap", None, "Hard cap: no image above this compute fraction.", **fv)


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

    >>> results = evaluate_dir("/tmp/rnp_quickstart")
    """
    import keras

    from rnp_tf import data as data_lib
    from rnp_tf import evaluation
    from rnp_tf import io_utils

    model_path = os.path.join(model_dir, "model.keras")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model_dir: no model.keras in {model_dir!r} (train one with rnp_tf.train).")
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
    if penalty is not None and budget is not None:
        raise ValueError("--penalty and --budget are two ways to set the same knob: give one.")
    if penalty is not None:
        model.set_penalty(penalty)
    if budget is not None:
        model.calibrate_budget(data.test)
        model.set_budget(budget, data.test)
    if compute_cap is not None:
        model.set_compute_cap(compute_cap)
    output_dir = output_dir or model_dir
    os.makedirs(output_dir, exist_ok=True)
    return evaluation.write_evaluation(model, data, output_dir, pictures=pictures)


def main(argv):
    from rnp_tf import evaluation
    from rnp_tf import report

    fv = flags.FLAGS
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    if not fv.model_dir:
        _fail("--model_dir is required.")
    try:
        results = evaluate_dir(
            fv.model_dir, fv.dataset, fv.tfds_data_dir, fv.batch_size, fv.output_dir, fv.pictures,
            penalty=fv.penalty, budget=fv.budget, compute_cap=fv.compute_cap,
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    cf = results["compute_fraction"]
    print(report.format_table(evaluation.summary_rows(results), ["model", "accuracy", "compute_fraction"]))
    print(f"run-time penalty: {results['penalty_setting']:.4f}")
    print(
        f"compute fraction: mean {cf['mean']:.3f}, p10 {cf['p10']:.3f}, p50 {cf['p50']:.3f}, "
        f"p90 {cf['p90']:.3f}; {results['distinct_action_tuples']} distinct action tuples"
    )
    print(f"rnp_tf.evaluate: wrote {os.path.join(fv.output_dir or fv.model_dir, 'eval.json')}")


def _fail(message):
    validation.exit_with_error("rnp_tf.evaluate", message)


if __name__ == "__main__":
    define_flags()
    app.run(main)
