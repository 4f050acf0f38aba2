"""Resuming a training run: its record in `--model_dir` and where it continues.

A run records its settings in `flags.json` and its progress in
`progress.json` (the completed stages and epochs, their history and time,
the last training-state checkpoints in `state/`). `resume_point` reads the
record, checks that the settings are those of the recorded run and restores
the last checkpoint; `record_epoch` updates the record after every epoch.

Example:

>>> point = resume_point(config, model)  # a TrainConfig and its RNPModel, a new --model_dir
>>> point.fresh
True
"""

import dataclasses
import json
import os
import shutil

from rnp_tf import distribute
from rnp_tf import io_utils
from rnp_tf.run_config import TrainConfig
from rnp_tf.stages import compile_stage
from rnp_tf.stages import stage_plan

PROGRESS = "progress.json"
FLAGS = "flags.json"
STATE_DIR = "state"
KEEP_STATES = 2
# Flags that may differ when a run is resumed (where it runs and what it shows,
# not what it trains).
RESUME_IGNORED = (
    "model_dir", "tfds_data_dir", "verbose", "tensorboard", "pictures", "evaluate", "resume",
    "strategy", "tpu", "cpu_devices",
)
# Flags of options measured, not kept and removed after commit 7fe7dd6, with
# their old defaults: a recorded run that used one cannot be resumed here.
REMOVED_FLAGS = {"late_decision": False, "aux_confidence": False, "backbone_distill_weight": 0.0}


@dataclasses.dataclass
class ResumePoint:
    """Where a run starts: the recorded progress and the first stage to train.

    Attributes:
        progress: the `progress.json` content (a new one for a fresh run).
        fresh: True when nothing was recorded yet.
        compiled_stage: the stage whose optimizers were restored (the model
            is already compiled for it), or None.
    """

    progress: dict
    fresh: bool
    compiled_stage: str | None = None


def new_progress(config):
    """The `progress.json` record of a run that has not trained yet.

    Args:
        config: a `TrainConfig`.

    Returns:
        A dict: `format`, `stages` (per enabled stage: `epochs`,
        `epochs_done`, `seconds`, `history`), `checkpoint`, `checkpoints`,
        `complete`.
    """
    return {
        "format": 1,
        "stages": {stage: {"epochs": epochs, "epochs_done": 0, "seconds": 0.0, "history": {}}
                   for stage, epochs in stage_plan(config)},
        "checkpoint": None,
        "checkpoints": [],
        "complete": False,
    }


def jsonable_config(config):
    """A `TrainConfig` as `flags.json` records it (tuples become lists).

    Args:
        config: a `TrainConfig`.

    Returns:
        A dict of JSON values.
    """
    return json.loads(json.dumps(dataclasses.asdict(config)))


def check_compatible(config, saved, model_dir):
    """Raises a ValueError naming the flags that differ from the recorded run.

    Args:
        config: the `TrainConfig` of this run.
        saved: the recorded run's `flags.json` (a missing key: its default;
            a removed option with a non-default value is refused).
        model_dir: the directory named in the message.

    Raises:
        ValueError: one line listing every flag that differs.
    """
    now = jsonable_config(config)
    defaults = jsonable_config(TrainConfig(model_dir=""))
    different = [
        f"--{key}={saved.get(key, defaults.get(key))!r} there, {now[key]!r} now"
        for key in now
        if key not in RESUME_IGNORED and saved.get(key, defaults.get(key)) != now[key]
    ]
    different += [
        f"--{key}={saved[key]!r} there, an option removed after commit 7fe7dd6 (check out that commit to resume it)"
        for key, default in REMOVED_FLAGS.items()
        if saved.get(key, default) != default
    ]
    if different:
        raise ValueError(
            f"--model_dir {model_dir} holds a run trained with other flags ({'; '.join(different)}); resume it "
            "with its flags (flags.json) or use another --model_dir."
        )


def next_stage(config, progress):
    """The first stage with epochs left and its completed epochs.

    Args:
        config: a `TrainConfig`.
        progress: a `progress.json` record.

    Returns:
        `(stage, epochs_done)`, or `(None, 0)` when every stage is done.
    """
    for stage, epochs in stage_plan(config):
        if progress["stages"][stage]["epochs_done"] < epochs:
            return stage, progress["stages"][stage]["epochs_done"]
    return None, 0


def resume_point(config, model, strategy=None):
    """Reads `progress.json` of `--model_dir` and restores the recorded state.

    Nothing is written (the chief only removes the temporaries a killed
    checkpoint write left in `state/`). For a fresh `--model_dir` this returns a new
    progress record. Otherwise the flags are compared with `flags.json`,
    the last checkpoint is verified (sizes and SHA-256 of its files) and
    restored: the model's variables (weights, BatchNorm statistics,
    schedule counters, epsilon) and, when the run stopped inside a stage,
    that stage's two optimizers (the model is compiled for it first).

    Args:
        config: a `TrainConfig`.
        model: the model `rnp_tf.trainer.prepare(config)` built.
        strategy: the run's strategy.

    Returns:
        A `ResumePoint`.

    Raises:
        ValueError: (including `CheckpointError`) one line: `--resume=false`
            on a recorded run, other flags, a corrupt progress or checkpoint.
    """
    import tensorflow as tf

    from rnp_tf import callbacks as callbacks_lib

    strategy = strategy or tf.distribute.get_strategy()
    info = distribute.task_info(strategy)
    path = os.path.join(config.model_dir, PROGRESS)
    if not os.path.exists(path) or (not config.resume and not info.is_chief):
        return ResumePoint(new_progress(config), fresh=True)
    if not config.resume:
        raise ValueError(
            f"--model_dir {config.model_dir} holds a run ({PROGRESS}) and --resume=false; it is never overwritten: "
            "resume it (--resume=true), delete it, or choose another --model_dir."
        )
    try:
        progress = io_utils.read_json(path)
        saved_flags = io_utils.read_json(os.path.join(config.model_dir, FLAGS))
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"--model_dir {config.model_dir}: cannot resume, its run record is corrupt ({error}).")
    if not isinstance(progress, dict) or progress.get("format") != 1 or "stages" not in progress:
        raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} is corrupt or of an unknown format.")
    check_compatible(config, saved_flags, config.model_dir)
    if progress.get("complete"):
        return ResumePoint(progress, fresh=False)
    if info.is_chief:  # a run killed while it wrote a checkpoint left its temporary
        io_utils.remove_leftovers(os.path.join(config.model_dir, STATE_DIR))
    name = progress.get("checkpoint")
    if name:
        name = _usable_checkpoint(config, progress)
    stage, epoch = next_stage(config, progress)
    compiled = None
    if name:
        checkpoint = os.path.join(config.model_dir, STATE_DIR, name)
        inside = stage is not None and stage != "reorder" and epoch > 0
        if inside and name != f"{stage}-{epoch:04d}":
            raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} records {stage} epoch {epoch} but names "
                             f"checkpoint {name}; the run record is corrupt.")
        if inside:
            compile_stage(model, config, stage, strategy)
            compiled = stage
        callbacks_lib.read_training_state(model, checkpoint, optimizers=inside)
        print(f"rnp_tf.train: resuming {config.model_dir} from {name}"
              + (f" (stage {stage}, epoch {epoch + 1})" if stage else " (training complete)"))
    elif any(progress["stages"][s]["epochs_done"] for s in progress["stages"]):
        raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} records completed epochs but no checkpoint.")
    return ResumePoint(progress, fresh=False, compiled_stage=compiled)


def _usable_checkpoint(config, progress):
    """The newest recorded checkpoint that verifies; `progress` is rewound to it when newer ones are skipped.

    A newer checkpoint that is missing (deleted) or corrupt (truncated by a
    crash, altered) is skipped with one warning line naming it; it is left
    on disk as it is until the resumed run writes that epoch again.

    Raises:
        CheckpointError: none of the recorded checkpoints verifies (the
            message is the newest one's error and says what to do).
    """
    import sys

    from rnp_tf import callbacks as callbacks_lib

    newest = progress["checkpoint"]
    names = [newest] + [n for n in reversed(progress.get("checkpoints") or []) if n != newest]
    state = os.path.join(config.model_dir, STATE_DIR)
    skipped = []
    for name in names:
        try:
            callbacks_lib.read_manifest(os.path.join(state, name))
        except callbacks_lib.CheckpointError as error:
            skipped.append(str(error).rstrip("."))
            continue
        if skipped:
            sys.stderr.write(f"rnp_tf.train: warning: {'; '.join(skipped)}; resuming from {name}, "
                             "the newest checkpoint that verifies.\n")
            rewind(config, progress, name)
        return name
    raise callbacks_lib.CheckpointError(
        f"{'; '.join(skipped)}; no recorded checkpoint verifies: delete --model_dir {config.model_dir} "
        "to start again.")


def rewind(config, progress, name):
    """Sets `progress` back to the end of checkpoint `name` (`{stage}-{epoch:04d}`).

    Later epochs and stages are marked not done and their history dropped,
    so the run trains them again.

    Args:
        config: a `TrainConfig`.
        progress: a `progress.json` record (changed in place).
        name: a checkpoint name the record lists.
    """
    stage, _, epoch = name.rpartition("-")
    order = [s for s, _ in stage_plan(config)]
    if stage not in order or not epoch.isdigit():
        raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} names an unknown checkpoint {name!r}.")
    for later in order[order.index(stage):]:
        record = progress["stages"][later]
        keep = int(epoch) if later == stage else 0
        record["epochs_done"] = min(record["epochs_done"], keep)
        record["history"] = {key: values[:keep] for key, values in record["history"].items() if keep}
    progress["checkpoint"] = name
    progress["checkpoints"] = progress["checkpoints"][: progress["checkpoints"].index(name) + 1]


def write_record(config, progress):
    """Writes a fresh run's record: `flags.json` and `progress.json`.

    Args:
        config: a `TrainConfig`.
        progress: its `new_progress(config)`.
    """
    io_utils.write_json(os.path.join(config.model_dir, FLAGS), dataclasses.asdict(config))
    io_utils.write_json(os.path.join(config.model_dir, PROGRESS), progress)


def record_epoch(progress, model_dir, stage, name, done, logs, seconds, write=True):
    """Records a completed epoch and its training-state checkpoint in `progress`.

    `progress.json` is written (atomically) before the states older than the
    last `KEEP_STATES` are deleted, so it always names a state on disk.

    Args:
        progress: the run's `progress.json` record (updated in place).
        model_dir: the run's `--model_dir`.
        stage: the stage the epoch belongs to.
        name: the checkpoint's directory name in `state/`.
        done: the stage's completed epochs.
        logs: the epoch's Keras logs, appended to the stage's history.
        seconds: the stage's training time so far.
        write: whether this process writes (the chief of a multi-worker run).
    """
    record = progress["stages"][stage]
    record["epochs_done"] = done
    record["seconds"] = seconds
    for key, value in logs.items():
        record["history"].setdefault(key, []).append(float(value))
    progress["checkpoint"] = name
    kept = [c for c in progress["checkpoints"] if c != name] + [name]
    progress["checkpoints"] = kept[-KEEP_STATES:]
    if write:
        io_utils.write_json(os.path.join(model_dir, PROGRESS), progress)  # names the new state before older ones go
        for old in kept[:-KEEP_STATES]:
            shutil.rmtree(os.path.join(model_dir, STATE_DIR, old), ignore_errors=True)


def mark_complete(progress, model_dir):
    """Records in `progress.json` that the run is complete (nothing left to resume).

    Args:
        progress: the run's `progress.json` record (updated in place).
        model_dir: the run's `--model_dir`.
    """
    progress["complete"] = True
    io_utils.write_json(os.path.join(model_dir, PROGRESS), progress)
