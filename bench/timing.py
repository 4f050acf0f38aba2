"""Wall-clock timing shared by every benchmark: warm-up, then interleaved repeats.

Timings on a shared machine drift (other processes, CPU frequency, caches).
Comparing two functions timed one after the other mixes that drift into the
comparison; timing them *interleaved* (one sample of each per round, in a
shuffled order) exposes both to the same conditions, and the median of the
rounds discards the outliers. Every benchmark times through `measure` so
that they all do it the same way.

A function is synchronised after each call by materialising its outputs
(`block`): TensorFlow on CPU runs eagerly-called `tf.function`s to
completion anyway, and the `.numpy()` of the outputs makes that explicit
(and works the same on a GPU, where ops are asynchronous).
"""

import math
import time

import numpy as np


def block(result):
    """Waits for `result` (tensors, arrays or nests of them) to be computed.

    Args:
        result: the return value of a timed call: a tensor, a numpy array,
            a list/tuple/dict of them, or None.

    Returns:
        None.

    Example:

    >>> block({"logits": tf.zeros((2, 3)), "aux": None})
    """
    if result is None:
        return
    if isinstance(result, dict):
        for value in result.values():
            block(value)
    elif isinstance(result, (list, tuple)):
        for value in result:
            block(value)
    elif hasattr(result, "numpy"):
        result.numpy()


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def _summary(samples, number):
    arr = np.asarray(samples, np.float64)
    return {
        "median_s": float(np.median(arr)),
        "mean_s": float(np.mean(arr)),
        "min_s": float(np.min(arr)),
        "p25_s": float(np.percentile(arr, 25)),
        "p75_s": float(np.percentile(arr, 75)),
        "samples_s": [float(s) for s in arr],
        "number": int(number),
    }


def measure(fns, repeats=5, warmup=1, number=None, min_sample_seconds=0.0, seed=0, sync=block):
    """Times several functions interleaved and summarises each by its median.

    Each function is first called `warmup` times (tracing, allocator and
    cache warm-up; not timed). Then, for each of `repeats` rounds, every
    function is timed once, in an order shuffled per round, one *sample*
    being the mean time of `number` consecutive calls.

    Args:
        fns: dict `name -> zero-argument callable`.
        repeats: rounds of timing (samples per function). Defaults to 5.
        warmup: untimed calls of each function first. Defaults to 1.
        number: calls per sample; None (default) picks it per function so
            that a sample lasts at least `min_sample_seconds` (from the
            duration of the last warm-up call), at least 1.
        min_sample_seconds: see `number`. Defaults to 0 (one call per
            sample).
        seed: seed of the per-round shuffling. Defaults to 0.
        sync: called on each function's return value to wait for it.
            Defaults to `block`.

    Returns:
        A dict `name -> summary` with `median_s`, `mean_s`, `min_s`,
        `p25_s`, `p75_s` (seconds per call), `samples_s` (every sample) and
        `number`.

    Example:

    >>> times = measure({"full": lambda: full(x), "rnp": lambda: engine(x)},
    ...                 repeats=7)
    >>> times["full"]["median_s"] / times["rnp"]["median_s"]  # speed-up
    """
    if not isinstance(fns, dict) or not fns:
        raise ValueError(f"`fns` must be a non-empty dict name -> callable. Received: fns={fns!r}")
    for name, fn in fns.items():
        if not callable(fn):
            raise ValueError(f"`fns[{name!r}]` must be callable. Received: {fn!r}")
    _check_positive_int("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be a non-negative integer. Received: warmup={warmup!r}")
    if number is not None:
        _check_positive_int("number", number)
    if not min_sample_seconds >= 0:
        raise ValueError(
            f"`min_sample_seconds` must be >= 0. Received: min_sample_seconds={min_sample_seconds!r}"
        )
    numbers = {}
    for name, fn in fns.items():
        last = 0.0
        for _ in range(warmup):
            start = time.perf_counter()
            sync(fn())
            last = time.perf_counter() - start
        if number is not None:
            numbers[name] = number
        elif warmup and last > 0 and min_sample_seconds > 0:
            numbers[name] = max(1, math.ceil(min_sample_seconds / last))
        else:
            numbers[name] = 1
    samples = {name: [] for name in fns}
    rng = np.random.default_rng(seed)
    names = list(fns)
    for _ in range(repeats):
        for i in rng.permutation(len(names)):
            name = names[i]
            fn, count = fns[name], numbers[name]
            start = time.perf_counter()
            for _ in range(count):
                result = fn()
            sync(result)
            samples[name].append((time.perf_counter() - start) / count)
    return {name: _summary(samples[name], numbers[name]) for name in names}


def settings(defaults, overrides, quick, batch_key):
    """A benchmark's settings: defaults, then overrides, then the `--quick` values not overridden.

    Also checks what every timing benchmark has: speed-up targets >= 1 and
    positive batch sizes (under `batch_key`), and converts them to floats
    and ints.

    Args:
        defaults: dict of every setting and its default.
        overrides: dict of settings to change (names from `defaults`).
        quick: dict of the smoke-run values used when `quick` is set.
        batch_key: the name of the batch-size list.

    Returns:
        A new dict.

    Example:

    >>> settings({"quick": False, "targets": [2.0], "b": [1]}, {}, {}, "b")["targets"]
    [2.0]
    """
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown benchmark settings {sorted(unknown)}. Expected some of {sorted(defaults)}")
    config = {**defaults, **overrides}
    if config["quick"]:
        config.update({key: value for key, value in quick.items() if key not in overrides})
    if not config[batch_key] or any(int(b) < 1 for b in config[batch_key]):
        raise ValueError(f"`{batch_key}` must be positive ints. Received: {config[batch_key]}")
    if not config["targets"] or any(float(t) < 1.0 for t in config["targets"]):
        raise ValueError(f"`targets` must be speed-ups >= 1. Received: {config['targets']}")
    config[batch_key] = [int(b) for b in config[batch_key]]
    config["targets"] = [float(t) for t in config["targets"]]
    return config


def write_outputs(result, output_dir, stem, markdown, plot=None):
    """Writes a benchmark's `STEM.json`, `STEM.md` and (with `plot`) `STEM.png`, atomically.

    Args:
        result: the JSON-serialisable result dictionary.
        output_dir: directory to write into (created when missing).
        stem: file name without extension, e.g. `"latency"`.
        markdown: function `result -> str`, the Markdown report.
        plot: optional function `(result, path) -> path` that draws the picture.

    Returns:
        A dict `{"json": path, "markdown": path[, "plot": path]}` of strings.

    Example:

    >>> import tempfile
    >>> paths = write_outputs({"x": 1}, tempfile.mkdtemp(), "demo", lambda r: "# demo")
    >>> sorted(paths)
    ['json', 'markdown']
    """
    import pathlib

    from rnp_tf import io_utils

    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(result) + "\n"
    paths = {
        "json": io_utils.write_json(output_dir / f"{stem}.json", result),
        "markdown": io_utils.atomic_write(
            output_dir / f"{stem}.md", lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8")
        ),
    }
    if plot is not None:
        paths["plot"] = plot(result, output_dir / f"{stem}.png")
    return {k: str(v) for k, v in paths.items()}


def draw_speedups(ax, series, title):
    """Draws measured against theoretical speed-up curves on a matplotlib axis.

    Args:
        ax: the axis (the ideal and reference lines are the caller's).
        series: dict `label -> [(theoretical, measured), ...]`.
        title: the axis title.
    """
    for key, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set_xlabel("theoretical speed-up (MACs)")
    ax.set_ylabel("measured speed-up (wall clock)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)


def _is_full_result(path):
    """True when `path` is a result JSON of a full (not `--quick`) run."""
    import json

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    for holder in (data, data.get("config") or {}, data.get("flags") or {}):
        if isinstance(holder, dict) and "quick" in holder:
            return not holder["quick"]
    return True  # a result that does not say it was a smoke run counts as full


def smoke_output(output, explicit, quick, files):
    """Where a benchmark writes: a smoke run never writes over published results.

    A `--quick` run without an explicit `--output` writes into a new
    temporary folder (printed by the caller); with an explicit folder it
    refuses to replace a full run's result file there.

    Args:
        output: the `--output` value.
        explicit: whether the user gave `--output`.
        quick: whether this is a smoke run.
        files: the result files the run would write (e.g. `["latency.json"]`).

    Returns:
        The output folder, a `pathlib.Path`.

    Raises:
        ValueError: a smoke run would replace a full result.

    Example:

    >>> smoke_output("bench/results", explicit=False, quick=True, files=["x.json"]).name.startswith("rnp_bench_quick_")
    True
    """
    import pathlib
    import tempfile

    if quick and not explicit:
        return pathlib.Path(tempfile.mkdtemp(prefix="rnp_bench_quick_"))
    output = pathlib.Path(output)
    if quick:
        for name in files:
            if (output / name).is_file() and _is_full_result(output / name):
                raise ValueError(
                    f"--output={output} holds a full run's {name}; a --quick run does not replace it "
                    "(give another --output, or leave it out for a temporary folder)"
                )
    return output


def flags_parser(flag_values, doc):
    """An `app.run(..., flags_parser=...)` for a script with its own `FlagValues` (so scripts import side by side).

    Args:
        flag_values: the script's `absl.flags.FlagValues`, with a `help` flag.
        doc: the script's docstring, printed by `--help`.

    Returns:
        A function `argv -> remaining argv`.
    """
    import sys

    from absl import flags

    def parse(argv):
        flags.FLAGS(argv[:1])  # the global registry (absl's own flags) at its defaults
        try:
            rest = flag_values(argv)
        except flags.Error as error:
            sys.stderr.write(f"{error}\nPass --help for the flags.\n")
            sys.exit(1)
        if flag_values.help:
            print(doc)
            print(flag_values.get_help())
            sys.exit(0)
        return rest

    return parse
