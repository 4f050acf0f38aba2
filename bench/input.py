r"""Is the input the bottleneck? `python -m bench.input`.

Measures, for one training configuration (the flags of `rnp_tf.train`, e.g.
`--flagfile configs/imagenet.flags`):

- `input`: images/s of the training input pipeline alone, exactly the
  stream `rnp_tf.train` feeds to `model.fit` (`rnp_tf.pipeline.training_input`:
  reading, parallel decoding, augmentation, batching, prefetch), iterated
  without a model after `--warmup_batches` batches (which fill the shuffle
  and prefetch buffers);
- `model`: the training step time of every phase the configuration trains
  (`full` when `--pretrain_epochs > 0`, `robust` when `--robust_epochs > 0`,
  `agent` and `backbone` when `--rnp_epochs > 0`), with `model.fit` on one
  batch cached in memory so no input work is included; the median over
  `--train_steps` steps after `--warmup_steps` (the first traces).

The input is the bottleneck of a phase when the pipeline delivers fewer
images/s than the phase's step consumes (`input_bound`). Both were measured
on the same machine: during training they run concurrently and share its
CPU cores, so on a CPU-only machine the combined rate is lower than either.

Without a prepared ImageNet (`--dataset=imagenet2012` and no
`--tfds_data_dir`), `--imagenet_sample=N` writes N random JPEGs in the
`imagenet2012` TFDS format to a temporary directory
(`rnp_tf.data.write_imagenet2012_sample`, 300-500 pixels a side) and reads
those: the decoding work per image is then close to ImageNet's (whose
images average about 400x350).

Outputs (in `--output`): `input.json` and `input.md`.

Usage:

    python -m bench.input                       # ImageNet path: VGG-16, 224x224, generated sample
    python -m bench.input --quick               # smoke run (~1 min): batch 2, VGG-16 at 1/8 width
    python -m bench.input --flagfile configs/imagenet.flags --tfds_data_dir DIR --batch_size 64
"""

import datetime
import json
import os
import pathlib
import statistics
import sys
import shutil
import tempfile
import time

import keras
from absl import flags

from bench import timing

REPO = pathlib.Path(__file__).resolve().parents[1]

DEFAULT_ARGS = (
    f"--flagfile={REPO / 'configs' / 'imagenet.flags'}",
    "--backbone_weights=none",
    "--batch_size=8",
)
QUICK_ARGS = ("--batch_size=2", "--width_multiplier=0.125")
PHASE_STAGE = {"full": "backbone", "robust": "robust", "agent": "rnp", "backbone": "rnp"}


def define_flags(fv):
    """The training flags of `rnp_tf.train` plus this benchmark's own, on `fv`."""
    from rnp_tf import train

    train.define_flags(fv)
    flags.DEFINE_boolean("quick", False, "Smoke run: batch 2, VGG-16 at 1/8 width, few batches and steps.", flag_values=fv)
    flags.DEFINE_string("output", "bench/results", "Directory of input.json / input.md.", flag_values=fv)
    flags.DEFINE_integer("input_batches", 50, "Timed batches of the input pipeline.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup_batches", 5, "Untimed batches first.", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("train_steps", 5, "Timed train steps per phase.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup_steps", 2, "Untimed train steps first (the first traces).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer(
        "imagenet_sample", 64, "--dataset=imagenet2012 without --tfds_data_dir: generate this many images.",
        lower_bound=1, flag_values=fv,
    )


def parse(argv):
    """Parses the command line into a training config and the benchmark's options.

    The defaults (`DEFAULT_ARGS`, then `QUICK_ARGS` with `--quick`) come
    before the given arguments, so the given ones win. `--dataset=imagenet2012`
    without `--tfds_data_dir` writes a generated sample to a temporary
    directory (listed in `options["temporary"]`, with the temporary
    `--model_dir`, for the caller to delete).

    Args:
        argv: the command line, program name first.

    Returns:
        `(config, options)`: an `rnp_tf.run_config.TrainConfig` and a dict.

    Raises:
        ValueError: a bad training flag (one line).

    Example:

    >>> config, options = parse(["bench.input", "--quick", "--dataset=digits", "--backbone=cifar_cnn"])
    """
    from rnp_tf import train

    probe = flags.FlagValues()
    define_flags(probe)
    probe(argv, known_only=True)
    defaults = list(DEFAULT_ARGS) + (list(QUICK_ARGS) if probe.quick else [])
    fv = flags.FlagValues()
    define_flags(fv)
    fv([argv[0], *defaults, *argv[1:]])
    temporary = []
    if not fv["model_dir"].present:
        fv.model_dir = tempfile.mkdtemp(prefix="bench_input_")
        temporary.append(fv.model_dir)
    options = {
        name: fv[name].value
        for name in ("quick", "output", "input_batches", "warmup_batches", "train_steps", "warmup_steps",
                     "imagenet_sample")
    }
    if options["quick"]:
        for name, value in (("input_batches", 20), ("warmup_batches", 2), ("train_steps", 2), ("warmup_steps", 1),
                            ("imagenet_sample", 16)):
            if not fv[name].present:
                options[name] = value
    options["output"] = str(timing.smoke_output(options["output"], fv["output"].present, options["quick"],
                                                ["input.json"]))
    options["temporary"] = temporary
    options["command"] = " ".join(["python -m bench.input", *argv[1:]])
    config = train.config_from_flags(fv)
    if config.dataset == "imagenet2012" and not config.tfds_data_dir:
        from rnp_tf import data

        config.tfds_data_dir = tempfile.mkdtemp(prefix="imagenet2012_sample_")
        temporary.append(config.tfds_data_dir)
        data.write_imagenet2012_sample(
            config.tfds_data_dir, num_train=options["imagenet_sample"], num_validation=1, min_side=300, max_side=500
        )
        options["generated_sample"] = options["imagenet_sample"]
    return config, options


def time_input(config, batches, warmup):
    """Images/s of the training stream `rnp_tf.train` feeds to `model.fit`.

    Args:
        config: an `rnp_tf.run_config.TrainConfig`.
        batches: timed batches.
        warmup: untimed batches first (fill the shuffle and prefetch buffers).

    Returns:
        A dict: `batches`, `images`, `seconds`, `images_per_s`.
    """
    import tensorflow as tf

    from rnp_tf import pipeline

    stream, _ = pipeline.training_input(config, tf.distribute.get_strategy(), 0)
    iterator = iter(stream)
    for _ in range(warmup):
        next(iterator)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(iterator)
        images += int(x.shape[0])
    seconds = time.perf_counter() - start
    return {"batches": batches, "images": images, "seconds": seconds, "images_per_s": images / seconds}


class StepTimes(keras.callbacks.Callback):
    """Keras callback: the wall-clock seconds of every train step, in `seconds`."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def phases(config):
    """The phases the configuration trains, in order."""
    names = []
    if config.pretrain_epochs:
        names.append("full")
    if config.robust_epochs:
        names.append("robust")
    if config.rnp_epochs:
        names += [p for p, n in (("agent", config.agent_steps), ("backbone", config.backbone_steps)) if n]
    return names


def time_steps(config, dataset, model, phase, steps, warmup):
    """Train-step time of one phase on one batch cached in memory (no input work).

    Args:
        config: an `rnp_tf.run_config.TrainConfig`.
        dataset, model: from `rnp_tf.trainer.prepare(config)`.
        phase: `"full"`, `"robust"`, `"agent"` or `"backbone"`.
        steps: timed steps.
        warmup: untimed steps first (the first traces).

    Returns:
        A dict: `steps`, `step_s` (median), `step_s_all`, `first_step_s`,
        `images_per_s` (batch size / median step).
    """
    import tensorflow as tf

    from rnp_tf import stages

    x, y = next(iter(dataset.train))
    cached = tf.data.Dataset.from_tensors((x, y)).repeat()
    strategy = tf.distribute.get_strategy()
    stages.compile_stage(model, config, PHASE_STAGE[phase], strategy)
    model.set_phase(phase)
    timer = StepTimes()
    model.fit(cached, epochs=1, steps_per_epoch=warmup + steps, callbacks=[timer], verbose=0)
    timed = timer.seconds[warmup:]
    median = statistics.median(timed)
    return {
        "steps": steps,
        "step_s": median,
        "step_s_all": timed,
        "first_step_s": timer.seconds[0],
        "images_per_s": int(x.shape[0]) / median,
    }


def run_benchmark(config, options, log=print):
    """Times the input pipeline and every phase's train step.

    Args:
        config, options: from `parse`.
        log: called with one line per measurement.

    Returns:
        The result dict written to `input.json`: `command`, `date`,
        `seconds`, `machine`, `config`, `input` (see `time_input`) and
        `phases` (one row per phase, see `time_steps`, plus `input_bound`
        and `input_over_model`).
    """
    from bench.latency import machine_info
    from rnp_tf import trainer

    started = datetime.datetime.now(datetime.timezone.utc)
    dataset, model = trainer.prepare(config)
    log(f"bench.input: {dataset.name} {dataset.input_shape}, {config.backbone}, batch {config.batch_size}")
    pipeline = time_input(config, options["input_batches"], options["warmup_batches"])
    log(f"bench.input: input pipeline {pipeline['images_per_s']:.1f} images/s")
    rows = []
    for phase in phases(config):
        step = time_steps(config, dataset, model, phase, options["train_steps"], options["warmup_steps"])
        row = {
            "phase": phase,
            **step,
            "input_bound": pipeline["images_per_s"] < step["images_per_s"],
            "input_over_model": pipeline["images_per_s"] / step["images_per_s"],
        }
        log(f"bench.input: {phase}: step {step['step_s'] * 1000:.1f} ms, {step['images_per_s']:.1f} images/s")
        rows.append(row)
    return {
        "benchmark": "input",
        "command": options["command"],
        "date": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": machine_info(),
        "config": {
            "dataset": config.dataset,
            "generated_sample": options.get("generated_sample"),
            "backbone": config.backbone,
            "width_multiplier": config.width_multiplier,
            "input_shape": list(dataset.input_shape),
            "batch_size": config.batch_size,
            "augment": config.augment,
            "quick": options["quick"],
        },
        "input": pipeline,
        "phases": rows,
    }


def _ratio(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def format_markdown(result):
    """The result as a Markdown table with the machine and the command."""
    c, m, p = result["config"], result["machine"], result["input"]
    sample = f" (generated sample of {c['generated_sample']} JPEGs)" if c["generated_sample"] else ""
    lines = [
        f"# Input pipeline against training step: {c['dataset']}{sample}, {c['backbone']}"
        f"{'' if c['width_multiplier'] == 1 else ' x' + str(c['width_multiplier'])}, "
        f"{'x'.join(str(d) for d in c['input_shape'])}, batch {c['batch_size']}",
        "",
        f"Input pipeline: **{p['images_per_s']:.1f} images/s** ({p['images']} images in {p['seconds']:.2f} s).",
        "",
        "| phase | step (ms, median) | model images/s | input / model | input-bound |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in result["phases"]:
        lines.append(
            f"| {row['phase']} | {row['step_s'] * 1000:.1f} | {row['images_per_s']:.3g} | "
            f"{_ratio(row['input_over_model'])} | {'yes' if row['input_bound'] else 'no'} |"
        )
    load = m.get("load_average")
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['gpus']} GPU(s)"
        + (f", load average {load[0]:.1f} at the start" if load else "")
        + f"; TensorFlow {m['tensorflow']}, Keras {m['keras']}. Date: {result['date']}. "
        f"Run time {result['seconds']:.0f} s.",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def write_outputs(result, output_dir):
    """Writes input.json and input.md; returns their paths."""
    return timing.write_outputs(result, output_dir, "input", format_markdown)


def main(argv=None):
    from rnp_tf import validation

    argv = list(sys.argv if argv is None else argv)
    try:
        config, options = parse(argv)
    except (ValueError, flags.Error) as error:
        validation.exit_with_error("bench.input", error)
    try:
        result = run_benchmark(config, options, log=lambda line: print(line, flush=True))
    finally:
        for path in options["temporary"]:
            shutil.rmtree(path, ignore_errors=True)
    paths = write_outputs(result, options["output"])
    print(format_markdown(result))
    print(json.dumps(paths))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
