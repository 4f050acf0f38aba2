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

from absl import flags

from rnp_tf import validation


def define_flags(flag_values=flags.FLAGS):
    """Defines the evaluation flags on `flag_values` (once).

    Args:
        flag_values: an `absl.flags.FlagValues`. Defaults to the global one.
    """
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


def main(argv):
    from rnp_tf import evaluation

    fv = flags.FLAGS
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    if not fv.model_dir:
        _fail("--model_dir is required.")
    try:
        results = evaluation.evaluate_dir(
            fv.model_dir, fv.dataset, fv.tfds_data_dir, fv.batch_size, fv.output_dir, fv.pictures,
            penalty=fv.penalty, budget=fv.budget, compute_cap=fv.compute_cap,
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    cf = results["compute_fraction"]
    print(evaluation.summary_table(results))
    print(f"run-time penalty: {results['penalty_setting']:.4f}")
    print(
        f"compute fraction: mean {cf['mean']:.3f}, p10 {cf['p10']:.3f}, p50 {cf['p50']:.3f}, "
        f"p90 {cf['p90']:.3f}; {results['distinct_action_tuples']} distinct action tuples"
    )
    print(f"rnp_tf.evaluate: wrote {os.path.join(fv.output_dir or fv.model_dir, 'eval.json')}")


def _fail(message):
    validation.exit_with_error("rnp_tf.evaluate", message)


if __name__ == "__main__":
    validation.run_cli("rnp_tf.evaluate", main, define_flags)
