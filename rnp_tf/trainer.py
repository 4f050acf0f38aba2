"""The staged training driver: prepare a run, train (or resume) its stages, write its outputs.

`prepare(config)` loads the dataset and builds the model; `run(config, ...)`
trains every enabled stage (`rnp_tf.stages`: backbone, reorder, robust,
rnp), saving a resumable checkpoint after every epoch (`rnp_tf.resume`),
then keeps the selected epoch, saves `model.keras`, evaluates and writes
`metrics.json`. `python -m rnp_tf.train` is this driver's command line.

Everything is written into `config.model_dir`: `model.keras`, per-epoch
checkpoints in `checkpoints/` (atomic), the training states in `state/`,
TensorBoard logs in `logs/`, `metrics.json`, `eval.json`, the pictures,
`flags.json` and `progress.json`.

Example:

>>> config = rnp_tf.run_config.make_config(model_dir="/tmp/rnp", rnp_epochs=1)
>>> metrics = run(config)
"""

import dataclasses
import os
import time

from rnp_tf import distribute
from rnp_tf import io_utils
from rnp_tf import keras_weights
from rnp_tf import pipeline
from rnp_tf import resume as resume_lib
from rnp_tf.run_config import backbone_spec
from rnp_tf.stages import STAGES
from rnp_tf.stages import compile_stage
from rnp_tf.stages import stage_plan

METRICS = "metrics.json"
SELECTION = "knob_select.npz"
SELECT_MAX_IMAGES = 5000


def build_model(config, dataset):
    """The `RNPModel` a config describes, for a loaded dataset.

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.
        dataset: the loaded `rnp_tf.data.Dataset` (its input shape and
            number of classes).

    Returns:
        An `RNPModel` (not compiled).
    """
    from rnp_tf.model import RNPModel
    from rnp_tf.schedule import Schedule

    return RNPModel(
        backbone_spec(config),
        image_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        groups=config.groups,
        agent_embed_dim=config.agent_embed_dim,
        agent_units=config.agent_units,
        penalty=config.penalty,
        alpha=config.alpha,
        gamma=config.gamma,
        q_loss=config.q_loss,
        schedule=Schedule(
            agent_steps=config.agent_steps,
            backbone_steps=config.backbone_steps,
            agent_warmup=config.agent_warmup,
            epsilon_start=config.epsilon_start,
            epsilon_end=config.epsilon_end,
            epsilon_decay_steps=config.epsilon_decay_steps,
            full_width_fraction=config.full_width_fraction,
            backbone_penalty_range=config.backbone_penalty_range,
        ),
    )


def check_strategy(config, strategy):
    """Checks the global batch against the strategy's replicas.

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.
        strategy: a `tf.distribute.Strategy`.

    Raises:
        ValueError: the batch does not split evenly across the replicas.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas > 1 and config.batch_size % replicas:
        raise ValueError(
            f"--batch_size={config.batch_size} is the global batch and must be divisible by the {replicas} "
            f"replicas of --strategy={config.strategy}."
        )


def prepare(config, strategy=None):
    """Loads the dataset and builds (and initialises) the model of a config.

    Everything a user can get wrong (a missing or corrupt file, a dataset
    that is not prepared, a checkpoint that does not fit, weights that
    cannot be found offline) fails here, before any training.

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.
        strategy: the `tf.distribute.Strategy` whose scope holds the model
            (default: the current one).

    Returns:
        `(dataset, model)`.
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    check_strategy(config, strategy)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if distribute.is_tpu(strategy) else "mixed_float16")
    keras.utils.set_random_seed(config.seed)
    dataset = pipeline.load_config_dataset(config)
    if strategy.num_replicas_in_sync > 1 and dataset.num_train < config.batch_size:
        raise ValueError(
            f"--batch_size={config.batch_size} exceeds the {dataset.num_train} training images; multi-replica "
            "strategies train on full global batches only."
        )
    with strategy.scope():
        model = build_model(config, dataset)
    if config.backbone_weights != "none":
        keras_weights.load_backbone_weights(model, config.backbone_weights, dataset)
    if config.init_checkpoint:
        _load_init_checkpoint(model, config.init_checkpoint)
    return dataset, model


def _load_init_checkpoint(model, path):
    """`--init_checkpoint`: the weights of a saved model of the same structure (ValueError otherwise)."""
    import keras

    try:
        source = keras.models.load_model(path)
    except Exception as error:  # corrupt or foreign file: say which
        raise ValueError(f"--init_checkpoint: cannot load {path!r} as a Keras model ({error}).")
    try:
        model.set_weights(source.get_weights())
    except ValueError as error:
        raise ValueError(
            f"--init_checkpoint: {path!r} does not match the model the flags describe ({error})."
        )
    head = model.plan.head
    layout = source.plan.head.layout if hasattr(source, "plan") else head.layout
    if layout != head.layout:  # e.g. a VGG-16 saved before heads were channel-major
        first = head.layers[0]
        first.kernel.assign(head.relayout(first.kernel, layout, head.layout))


@dataclasses.dataclass
class _Run:
    """What the steps of one run share: its settings, data, model and record."""

    config: object
    dataset: object
    model: object
    strategy: object
    progress: dict
    chief: bool
    compiled_stage: str | None
    callbacks: list

    def path(self, *names):
        """A path inside the run's `--model_dir`."""
        return os.path.join(self.config.model_dir, *names)


def run(config, dataset=None, model=None, strategy=None, resume=None, callbacks=None):
    """Runs (or resumes) every enabled stage of a training run and writes its outputs.

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.
        dataset, model: the result of `prepare(config, strategy)`; prepared
            here when omitted.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        resume: the `rnp_tf.resume.resume_point(config, model, strategy)`;
            computed here when omitted.
        callbacks: extra Keras callbacks, added after rnp_tf's own to the
            `model.fit` of every trained stage (backbone, robust, rnp).

    Returns:
        The dict written to `metrics.json` (on the chief; other workers of
        a multi-worker run return the training history only).

    Example:

    >>> metrics = run(rnp_tf.run_config.TrainConfig(model_dir="/tmp/rnp", rnp_epochs=1))
    """
    import tensorflow as tf

    extra_callbacks = list(callbacks or [])
    strategy = strategy or tf.distribute.get_strategy()
    if dataset is None or model is None:
        dataset, model = prepare(config, strategy)
    if resume is None:
        resume = resume_lib.resume_point(config, model, strategy)
    chief = distribute.task_info(strategy).is_chief
    state = _Run(config, dataset, model, strategy, resume.progress, chief, resume.compiled_stage, extra_callbacks)
    if state.progress.get("complete"):
        print(f"rnp_tf.train: {config.model_dir} holds a complete run ({resume_lib.PROGRESS}); nothing to do.")
        return io_utils.read_json(state.path(METRICS)) if os.path.exists(state.path(METRICS)) else {}
    _start(state, resume.fresh)
    for stage, epochs in stage_plan(config):
        done = state.progress["stages"][stage]["epochs_done"]
        if done >= epochs:
            continue
        if stage == "reorder":
            _reorder_stage(state)
        else:
            _fit_stage(state, stage, epochs, done)
    history = {s: r["history"] for s, r in state.progress["stages"].items() if s != "reorder"}
    if not chief:
        return {"history": history}
    return _finish(state, history)


def _start(run, fresh):
    """Creates the output directories and a fresh run's record (on the chief) and describes the run."""
    config, dataset, model = run.config, run.dataset, run.model
    if run.chief:
        os.makedirs(run.path("checkpoints"), exist_ok=True)
        os.makedirs(run.path(resume_lib.STATE_DIR), exist_ok=True)
        if fresh:
            resume_lib.write_record(config, run.progress)
    print(
        f"rnp_tf.train: {dataset.name}: {dataset.num_train} train / {dataset.num_test} test images "
        f"{dataset.input_shape}, {config.backbone} with {model.num_prunable} prunable convs, "
        f"k={config.groups}, {model.full_macs / 1e6:.2f}M MACs per image, "
        f"{run.strategy.num_replicas_in_sync} replica(s) ({config.strategy})."
    )


def _record_epoch(run, stage, name, done, logs, seconds):
    """Records a saved epoch in the run's progress (`rnp_tf.resume.record_epoch`)."""
    resume_lib.record_epoch(run.progress, run.config.model_dir, stage, name, done, logs, seconds, write=run.chief)


def _reorder_stage(run):
    """Stage 2: sorts every layer's channels by importance and saves the model's state."""
    from rnp_tf.callbacks import write_training_state
    from rnp_tf.reorder import reorder_channels

    start = time.time()
    reorder_channels(run.model)
    name = "reorder-0001"
    if run.chief:
        write_training_state(run.model, run.path(resume_lib.STATE_DIR, name), optimizers=False,
                             extra={"stage": "reorder", "epoch": 1})
    _record_epoch(run, "reorder", name, 1, {}, time.time() - start)


def _fit_stage(run, stage, epochs, start_epoch):
    """Trains one stage (backbone, robust or rnp) from `start_epoch` with `model.fit`."""
    import keras

    from rnp_tf.callbacks import derive_seed

    config = run.config
    print(f"rnp_tf.train: stage {stage} ({epochs} epochs" + (f", from epoch {start_epoch + 1})" if start_epoch else ")"))
    if run.compiled_stage != stage:
        compile_stage(run.model, config, stage, run.strategy)
    # tf.data folds the global seed into its shuffle seeds: build the input
    # under a seed of the stage alone, then seed the epoch it starts with.
    keras.utils.set_random_seed(derive_seed(config.seed, STAGES[stage]))
    stream, steps = pipeline.training_input(config, run.strategy, start_epoch)
    keras.utils.set_random_seed(derive_seed(config.seed, STAGES[stage], start_epoch))
    callbacks = _stage_callbacks(run, stage)
    run.model.fit(
        stream,
        epochs=epochs,
        initial_epoch=start_epoch,
        steps_per_epoch=steps,
        validation_data=pipeline.validation_input(config, run.dataset, run.strategy),
        callbacks=callbacks,
        shuffle=False,  # tf.data shuffles the stream
        verbose=0,
    )


def _stage_callbacks(run, stage):
    """The callbacks of one stage's `model.fit`: rnp_tf's own, then the caller's."""
    import keras

    from rnp_tf.callbacks import AtomicCheckpoint
    from rnp_tf.callbacks import BestKnobWeights
    from rnp_tf.callbacks import CompactProgressBar
    from rnp_tf.callbacks import EpochSeeder
    from rnp_tf.callbacks import ResumableCheckpoint

    config = run.config
    base_seconds, start = run.progress["stages"][stage]["seconds"], time.time()
    callbacks = [EpochSeeder(config.seed, STAGES[stage], rebuild=config.reseed_every_epoch)]
    if run.chief and stage == "rnp" and config.select_budgets:
        # measured before the epoch's state is saved, so no resume point skips a measurement
        x, y = run.dataset.validation_arrays(SELECT_MAX_IMAGES)
        callbacks.append(BestKnobWeights(x, y, config.select_budgets, restore=False, path=run.path(SELECTION)))
    if run.chief:
        callbacks.append(AtomicCheckpoint(run.path("checkpoints"), prefix=stage))
    callbacks.append(
        ResumableCheckpoint(
            run.path(resume_lib.STATE_DIR), stage, write=run.chief,
            on_saved=lambda name, done, logs: _record_epoch(
                run, stage, name, done, logs, base_seconds + time.time() - start
            ),
        )
    )
    callbacks.append(CompactProgressBar(config.verbose if run.chief else 0))
    if config.tensorboard and run.chief:
        callbacks.append(keras.callbacks.TensorBoard(run.path("logs", stage)))
    return callbacks + run.callbacks


def _finish(run, history):
    """On the chief: keeps the selected epoch, saves `model.keras`, evaluates, writes `metrics.json`."""
    config, model = run.config, run.model
    if not model.compiled:
        with run.strategy.scope():
            model.compile()
    selection = _keep_selected_epoch(run)
    io_utils.save_model_atomic(model, run.path("model.keras"))
    metrics = {
        "dataset": run.dataset.name,
        "full_macs": model.full_macs,
        "strategy": config.strategy,
        "replicas": run.strategy.num_replicas_in_sync,
        "stage_seconds": {s: r["seconds"] for s, r in run.progress["stages"].items()},
        "history": history,
        "schedule_step": int(model._schedule_step.numpy()),
        "agent_updates": int(model._agent_updates.numpy()),
    }
    if selection:
        metrics["knob_select"] = {"best_epoch": selection["best_epoch"], "accuracy": selection["accuracy"],
                                  "history": selection["history"]}
    if config.evaluate:
        _evaluate(run, metrics)
    io_utils.write_json(run.path(METRICS), metrics)
    resume_lib.mark_complete(run.progress, config.model_dir)
    print(f"rnp_tf.train: wrote {config.model_dir}")
    return metrics


def _keep_selected_epoch(run):
    """`--select_budgets`: loads the kept Algorithm 1 epoch's weights; returns the selection or None."""
    from rnp_tf.callbacks import BestKnobWeights

    config = run.config
    if not config.select_budgets:
        return None
    selection = BestKnobWeights.read(run.path(SELECTION))
    run.model.set_weights(selection["weights"])
    print(f"rnp_tf.train: kept Algorithm 1 epoch {selection['best_epoch'] + 1} of {config.rnp_epochs} (mean "
          f"validation accuracy {selection['accuracy']:.4f} at budgets {list(config.select_budgets)})")
    return selection


def _evaluate(run, metrics):
    """Stage 4: evaluates on the test split, writes `eval.json` and the pictures, adds the numbers to `metrics`."""
    from rnp_tf import evaluation

    start = time.time()
    results = evaluation.write_evaluation(run.model, run.dataset, run.config.model_dir, pictures=run.config.pictures)
    metrics["stage_seconds"]["evaluate"] = time.time() - start
    metrics.update(
        {
            "full_accuracy": results["full_accuracy"],
            "rnp_accuracy": results["accuracy"],
            "compute_fraction": results["compute_fraction"]["mean"],
            "compute_fraction_std": results["compute_fraction"]["std"],
            "action_shares": results["action_shares"],
            "distinct_action_tuples": results["distinct_action_tuples"],
            "compute_per_class": results["compute_per_class"],
            "static": results["static"],
        }
    )
    print(evaluation.summary_table(results))
