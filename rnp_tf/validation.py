"""Argument and input checks shared by every rnp_tf module.

Each check raises a `ValueError` whose message names the argument and the
value received, in the style of Keras itself.
"""

import math
import numbers

import numpy as np
import tensorflow as tf


def check_positive_int(name, value):
    """Raises a ValueError unless `value` is an integer >= 1.

    Args:
        name: the argument's name, used in the message.
        value: the value to check.

    Returns:
        `value` as a Python int.

    Example:

    >>> check_positive_int("groups", 4)
    4
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{_label(name)} must be a positive integer. Received: {name}={value!r}")
    return int(value)


def check_bool(name, value):
    """Raises a ValueError unless `value` is a Python bool.

    Args:
        name: the argument's name, used in the message.
        value: the value to check.

    Returns:
        `value`.

    Example:

    >>> check_bool("control_flow", True)
    True
    """
    if not isinstance(value, bool):
        raise ValueError(f"{_label(name)} must be a bool. Received: {name}={value!r}")
    return value


def check_non_negative_int(name, value):
    """Raises a ValueError unless `value` is an integer >= 0.

    Args:
        name: the argument's name.
        value: the value to check.

    Returns:
        `value` as a Python int.

    Example:

    >>> check_non_negative_int("backbone_steps", 0)
    0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(
            f"{_label(name)} must be a non-negative integer. Received: {name}={value!r}"
        )
    return int(value)


def check_float(name, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """Raises a ValueError unless `value` is a finite real number in the range.

    NaN, infinities, bools, strings and `None` are refused (NaN slips
    through comparisons such as `not x > 0` only sometimes, so finiteness
    is checked first).

    Args:
        name: the argument's name; a flag name (`"--penalty"`) is quoted as
            typed, any other name in backquotes.
        value: the value to check.
        low: smallest allowed value. Defaults to -inf (no bound).
        high: largest allowed value. Defaults to +inf (no bound).
        low_open: if True, `low` itself is refused. Defaults to False.
        high_open: if True, `high` itself is refused. Defaults to False.

    Returns:
        `value` as a Python float.

    Example:

    >>> check_float("gamma", 0.9, 0.0, 1.0)
    0.9
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if low > -math.inf and high < math.inf:
            interval = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low > -math.inf:
            interval = f" {'>' if low_open else '>='} {low:g}"
        elif high < math.inf:
            interval = f" {'<' if high_open else '<='} {high:g}"
        else:
            interval = ""
        raise ValueError(f"{_label(name)} must be a finite number{interval}. Received: {name}={value!r}")
    return float(value)


def _label(name):
    """A flag name (`--penalty`) as typed, an argument's name in backquotes."""
    return name if name.startswith("-") else f"`{name}`"


def drop_removed_options(config, removed, owner):
    """A copy of a `get_config()` dict without the options removed after commit 7fe7dd6.

    Options that were measured, not kept and removed are dropped from a
    config of an older release when they hold their old default. Any other
    value means other weights or another training recipe, so it is refused.

    Args:
        config: the config dict, possibly written by an older release.
        removed: `{option: (old default, write-up in docs/experiments/)}`.
        owner: the class name, used in the message.

    Returns:
        A new dict without the removed options.

    Example:

    >>> drop_removed_options({"units": 8, "conditioned": False},
    ...                      {"conditioned": (False, "conditioned_agent.md")}, "DecisionAgent")
    {'units': 8}
    """
    config = dict(config)
    for option, (default, page) in removed.items():
        value = config.pop(option, default)
        if value != default:
            raise ValueError(
                f"{owner}'s `{option}` was removed from rnp-tf because it measured no better than what was kept "
                f"(docs/experiments/{page}); to load it, check out rnp-tf at commit 7fe7dd6. "
                f"Received: {option}={value!r}"
            )
    return config


def check_action(name, value, groups):
    """Raises a ValueError unless `value` is an int action in `1..groups`.

    Args:
        name: the argument's name.
        value: the action.
        groups: the number of channel groups `k`.

    Returns:
        `value` as a Python int.

    Example:

    >>> check_action("out_action", 3, groups=4)
    3
    """
    try:
        action = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be an integer in 1..{groups}. Received: {name}={value!r}")
    if action != value or not 1 <= action <= groups:
        raise ValueError(f"`{name}` must be an integer in 1..{groups}. Received: {name}={value!r}")
    return action


def check_actions(actions, batch_size, num_layers, groups, skips=None):
    """Validates a concrete `[batch, num_layers]` array of forced actions.

    Tensors without a concrete value (inside a traced function) are only
    shape-checked.

    Args:
        actions: array-like or tensor of ints.
        batch_size: expected batch size (or None when unknown).
        num_layers: number of prunable layers.
        groups: number of channel groups `k`.
        skips: optional dict, per decision of a skippable block, the
            decision whose 0 skips it (the first maps to itself): 0 is
            allowed there, at a later decision only where the block is
            skipped (`NetworkPlan.skip_columns`).

    Returns:
        An int32 tensor of shape `[batch, num_layers]`.

    Example:

    >>> check_actions([[1, 4]], batch_size=1, num_layers=2, groups=4).shape
    TensorShape([1, 2])
    """
    if not tf.is_tensor(actions):
        array = np.asarray(actions)
        if array.dtype.kind not in "iu":
            raise ValueError(
                f"`actions` must be integers in 1..{groups}. Received: "
                f"actions with dtype={array.dtype}"
            )
        _check_actions_values(array, groups, skips)
        actions = tf.constant(array, tf.int32)
    elif not actions.dtype.is_integer:
        raise ValueError(
            f"`actions` must be integers in 1..{groups}. Received: "
            f"actions with dtype={actions.dtype.name}"
        )
    elif tf.executing_eagerly():
        _check_actions_values(actions.numpy(), groups, skips)
    shape = actions.shape
    if shape.rank != 2 or (shape[1] is not None and shape[1] != num_layers):
        raise ValueError(
            f"`actions` must have shape [batch, {num_layers}] (one action per "
            f"prunable layer). Received: actions.shape={tuple(shape)}"
        )
    if batch_size is not None and shape[0] is not None and shape[0] != batch_size:
        raise ValueError(
            f"`actions` must have one row per input image ({batch_size}). "
            f"Received: actions.shape={tuple(shape)}"
        )
    return tf.cast(actions, tf.int32)


def _check_actions_values(array, groups, skips=None):
    if skips and array.ndim == 2 and array.size:
        for t, first in skips.items():
            if t < array.shape[1] and first < array.shape[1]:
                bad = (array[:, t] == 0) & (array[:, first] != 0)
                if bad.any():
                    raise ValueError(
                        f"`actions` may be 0 (skip) at decision {t} only where its block is skipped "
                        f"(decision {first} is 0). Received: actions[{int(np.argmax(bad))}]="
                        f"{array[int(np.argmax(bad))].tolist()}"
                    )
        array = array.copy()
        columns = [t for t in skips if t < array.shape[1]]
        array[:, columns] = np.where(array[:, columns] == 0, 1, array[:, columns])
    if array.size and (array.min() < 1 or array.max() > groups):
        raise ValueError(
            f"`actions` must be in 1..{groups} (the number of channel groups "
            f"to compute). Received: values from {array.min()} to {array.max()}"
        )


def check_images(x, input_shape):
    """Validates a batch of images against the model's `input_shape`.

    Args:
        x: tensor or array of images, `(batch, height, width, channels)`.
        input_shape: the model's `(height, width, channels)`.

    Returns:
        `x` as a tensor.

    Example:

    >>> check_images(np.zeros((2, 8, 8, 1), "float32"), (8, 8, 1)).shape
    TensorShape([2, 8, 8, 1])
    """
    dtype = x.dtype if tf.is_tensor(x) else np.asarray(x).dtype
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(
            f"Inputs must be float images (normalised, as produced by "
            f"rnp_tf.load_dataset). Received: dtype={dtype.name}"
        )
    x = tf.convert_to_tensor(x)
    shape = x.shape
    if shape.rank != 4:
        raise ValueError(
            f"Inputs must be 4D (batch, height, width, channels) with "
            f"(height, width, channels)={tuple(input_shape)}. Received: "
            f"shape={tuple(shape)}"
        )
    if shape[-1] != input_shape[-1]:
        raise ValueError(
            f"Inputs must have {input_shape[-1]} channels. Received: "
            f"shape={tuple(shape)}"
        )
    for axis in (1, 2):
        if shape[axis] is not None and shape[axis] != input_shape[axis - 1]:
            raise ValueError(
                f"Inputs must be {input_shape[0]}x{input_shape[1]} images. "
                f"Received: shape={tuple(shape)}"
            )
    return x


def exit_with_error(program, message):
    """Ends a command-line tool with one line on stderr and exit status 2.

    Used for user mistakes (bad flags, missing or corrupt files), which need
    the problem named, not a traceback. A message of several lines is
    joined into one, so the problem is always the last line.

    Args:
        program: the tool's name, e.g. `"rnp_tf.train"`.
        message: what is wrong.

    Example:

    >>> exit_with_error("rnp_tf.train", "--dataset: unknown dataset 'x'")  # doctest: +SKIP
    """
    import sys

    text = " ".join(str(message).split())
    sys.stderr.write(f"{program}: error: {text}\n")
    sys.exit(2)


def run_cli(program, main, define_flags):
    """Runs an absl command-line tool whose usage errors all exit with status 2.

    absl's own flag errors (a value that does not parse, is out of bounds,
    an unknown flag) end with `exit_with_error` too: one line naming the
    flag as typed, exit status 2, instead of absl's exit status 1 and its
    "Pass --helpshort" hint after the message.

    Args:
        program: the tool's name, e.g. `"rnp_tf.train"`.
        main: `main(argv)`, as for `absl.app.run`.
        define_flags: `define_flags()` defines the tool's flags.

    Example:

    >>> run_cli("rnp_tf.evaluate", main, define_flags)  # doctest: +SKIP
    """
    from absl import app

    define_flags()
    app.run(main, flags_parser=lambda argv: parse_flags(program, argv))


def parse_flags(program, argv, flag_values=None):
    """Parses `argv` into absl flags; a flag error ends with `exit_with_error`.

    Args:
        program: the tool's name, e.g. `"rnp_tf.train"`.
        argv: the command line, program name first.
        flag_values: an `absl.flags.FlagValues`. Defaults to the global one.

    Returns:
        The arguments that are not flags (program name first).

    Example:

    >>> parse_flags("rnp_tf.train", ["rnp_tf.train", "--penalty=abc"])  # doctest: +SKIP
    rnp_tf.train: error: flag --penalty=abc: could not convert string to float: 'abc'
    """
    from absl import flags

    try:
        return (flag_values or flags.FLAGS)(argv)
    except flags.Error as error:
        exit_with_error(program, error)
