"""The exporters' command-line runner: loading a checkpoint, the knob flags, one-line errors."""

import time

import numpy as np

from export.exceptions import CheckpointError, ExportError, first_line
from export.writing import MANIFEST, checkpoint_file, prepare_target


# --------------------------------------------------------------- checkpoint
def load_checkpoint(model_dir):
    """Loads `model_dir/model.keras` (written by `python -m rnp_tf.train`).

    Args:
        model_dir: a directory holding `model.keras`.

    Returns:
        The `rnp_tf.RNPModel`.

    Raises:
        CheckpointError: the directory or the file is missing, the file is
            not a loadable Keras model, or it is not an RNPModel. The
            message is one line naming the path.

    Example:

    >>> model = load_checkpoint("/tmp/rnp_quickstart")
    """
    path = checkpoint_file(model_dir)
    import keras

    import rnp_tf  # noqa: F401  (registers the custom classes)

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # zip, h5, config and weight errors alike
        raise CheckpointError(f"{path!r} is not a loadable Keras model ({first_line(error)})") from None
    if not isinstance(model, rnp_tf.RNPModel):
        raise CheckpointError(f"{path!r} holds a {type(model).__name__}, not an rnp_tf.RNPModel")
    return model


# ------------------------------------------------------------------ flags
OUTPUT_FLAGS = ("output", "overwrite")


OUTPUT_HELP = (
    "Output directory (default: <model_dir>/export). One export run writes its files as one set, "
    f"recorded with the source checkpoint's SHA-256, every file's SHA-256 and the parity results in "
    f"{MANIFEST}; exporters of the same model share the folder, and a run replaces the files its "
    "exporter wrote before. A folder holding another model's export (or export files without a "
    "manifest) is refused with exit status 2 before any work, unless --overwrite."
)


def define_output_flags(flag_values):
    """`--output` and `--overwrite`, listed in the exporter's `--help`."""
    from absl import flags

    if "overwrite" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("output", None, OUTPUT_HELP, **fv)
    flags.DEFINE_boolean(
        "overwrite", False,
        "Replace an export of another model in --output: every file of that set is removed when the "
        "new set is moved into place (files that are not exports stay).", **fv,
    )
    for name in OUTPUT_FLAGS:
        flags.declare_key_flag(name, flag_values=flag_values)


# ---------------------------------------------------------- run-time knob
KNOB_FLAGS = ("penalty", "compute_cap")


def define_knob_flags(flag_values):
    """`--penalty` (the artifacts' default penalty input) and `--compute_cap` (frozen into the export)."""
    from absl import flags

    if "compute_cap" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_float(
        "penalty", None,
        "Default of the exported artifacts' run-time penalty input (RNPModel.set_penalty; default: "
        "the penalty setting saved with the model). Every artifact takes the penalty as an input, so "
        "a deployed model can be switched at run time; this is the value used when it is not fed.", **fv,
    )
    flags.DEFINE_float(
        "compute_cap", None,
        "Hard per-image MAC cap as a fraction of the full model (RNPModel.set_compute_cap), frozen "
        "into the export (not a run-time input); default: the cap saved with the model, if any.", **fv,
    )


def check_knob_values(penalty=None, compute_cap=None):
    """`--penalty` finite, `--compute_cap` in (0, 1]: an ExportError naming the flag."""
    from rnp_tf import validation

    try:
        if penalty is not None:
            validation.check_float("--penalty", penalty)
        if compute_cap is not None:
            validation.check_float("--compute_cap", compute_cap, 0.0, 1.0, low_open=True)
    except ValueError as error:
        raise ExportError(str(error)) from None


def apply_knob(model, penalty=None, compute_cap=None):
    """Sets the model's run-time knob before export; a bad value is an ExportError naming the flag."""
    check_knob_values(penalty, compute_cap)
    if penalty is not None:
        if not hasattr(model, "set_penalty"):
            raise ExportError("--penalty: this model has no run-time penalty (RNPModel.set_penalty)")
        model.set_penalty(float(penalty))
    if compute_cap is not None:
        if not hasattr(model, "set_compute_cap"):
            raise ExportError("--compute_cap: this model has no compute cap (RNPModel.set_compute_cap)")
        floor = model.min_macs / model.full_macs
        if compute_cap < floor - 1e-9:
            raise ExportError(
                f"--compute_cap must lie in [{floor:.4f}, 1] (the narrowest network costs {floor:.4f}). "
                f"Received: --compute_cap={compute_cap}"
            )
        model.set_compute_cap(float(compute_cap))
    return model


def knob_report(net):
    """The decision settings of an export (for the reports): the default penalty input, the frozen cap."""
    return {
        "penalty_setting": net.penalty_setting,
        "penalty_input": "run-time input 'penalty' (float32); penalty_setting is its default",
        "compute_cap_macs": net.cap,
    }


# -------------------------------------------------------------------- CLI
def positional_model_dir(program, argv):
    """The single positional argument of a CLI (the model directory), or exit 2."""
    from rnp_tf import validation

    args = argv[1:]
    if len(args) != 1:
        validation.exit_with_error(
            program, f"expected exactly one positional argument, the model directory holding model.keras; got {args}"
        )
    return args[0]


def run_cli(program, argv, export):
    """The body of an exporter's `main`: `export(model_dir)`, errors as one line and exit 2.

    Args:
        program: the command's name, e.g. `"export.onnx"`.
        argv: the arguments absl left (the program and one model directory).
        export: function `model_dir -> report`.

    Returns:
        The report.
    """
    model_dir = positional_model_dir(program, argv)
    try:
        return export(model_dir)
    except ExportError as error:
        fail(program, error)


def open_checkpoint(program, model_dir, output=None, penalty=None, compute_cap=None, log=None, overwrite=False):
    """What every exporter starts with: the checks, the model with its knob set, the output, a logger.

    Everything the user gave is checked before the model is loaded and
    before any conversion: the model directory, the knob values, the
    output folder (writable, no other model's export unless `overwrite`;
    `prepare_target`).

    Args:
        program: the command's name (prefix of the progress lines).
        model_dir: the directory holding `model.keras`.
        output: the output directory (default: `model_dir/export`).
        penalty, compute_cap: optional run-time knob settings (`apply_knob`).
        log: optional `log(message)`; default: a progress line on stdout.
        overwrite: replace a set exported from another model.

    Returns:
        `(model, target, log)`: `target` is the `ExportTarget` to give
        `write_set`.

    Raises:
        ExportError: a missing or corrupt checkpoint, a bad knob setting, an
            unwritable output or one holding another model's export.
    """
    log = log or (lambda m: say(program, m))
    checkpoint_file(model_dir)
    check_knob_values(penalty, compute_cap)
    target = prepare_target(program, model_dir, output, overwrite, log)
    model = load_checkpoint(model_dir)
    apply_knob(model, penalty, compute_cap)
    return model, target, log


def fail(program, error):
    """One line on stderr and exit status 2 (`rnp_tf.validation.exit_with_error`)."""
    from rnp_tf import validation

    validation.exit_with_error(program, first_line(error))


def timed(fn, *args, repeats=20, warmup=3):
    """Median wall time of `fn(*args)` in milliseconds."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def say(program, message):
    """A progress line on stdout."""
    print(f"{program}: {message}", flush=True)
