r"""Train an RNP model: `python -m rnp_tf.train --flagfile configs/quickstart.flags`.

Stages, each skippable, in one run:

1. backbone: train the backbone normally at full width
   (`--pretrain_epochs`), or start from `--init_checkpoint`;
2. reorder: sort every layer's channels by importance (`--reorder`);
3. RNP: a prefix-robust phase (`--robust_epochs`) then Algorithm 1, the
   alternating agent / backbone phases (`--rnp_epochs`);
4. evaluation on the test split (`--evaluate`): `eval.json` and pictures.

Everything is written into `--model_dir`: `model.keras`, per-epoch
checkpoints in `checkpoints/` (atomic), TensorBoard logs in `logs/`,
`metrics.json`, `eval.json`, the pictures and `flags.json`.

Example:

    python -m rnp_tf.train --flagfile configs/quickstart.flags \
        --model_dir /tmp/rnp_quickstart
"""

import dataclasses
import os
import time

from absl import app
from absl import flags

from rnp_tf import validation

from rnp_tf import data as data_lib

BACKBONE_CHOICES = ("cifar_cnn", "vgg16")
OPTIMIZERS = ("adam", "sgd", "rmsprop")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (the flags, validated)."""

    model_dir: str
    dataset: str = "digits"
    tfds_data_dir: str | None = None
    backbone: str = "cifar_cnn"
    widths: tuple = (32, 64, 128, 128)
    width_multiplier: float = 1.0
    groups: int = 4
    batch_size: int = 64
    validation_split: float = 0.0
    augment: bool = False
    max_train_examples: int | None = None
    steps_per_epoch: int | None = None
    seed: int = 0
    init_checkpoint: str | None = None
    optimizer: str = "adam"
    agent_optimizer: str = "adam"
    pretrain_epochs: int = 0
    pretrain_lr: float = 3e-3
    reorder: bool = True
    robust_epochs: int = 0
    robust_lr: float = 3e-3
    rnp_epochs: int = 5
    backbone_lr: float = 1e-3
    agent_lr: float = 1e-3
    agent_steps: int = 50
    backbone_steps: int = 50
    agent_warmup: bool = True
    epsilon_start: float = 1.0
    epsilon_end: float = 0.1
    epsilon_decay_steps: int = 300
    penalty: float = -0.1
    alpha: float | None = None
    gamma: float = 1.0
    q_loss: str = "mse"
    full_width_fraction: float = 0.25
    agent_units: int = 64
    agent_embed_dim: int = 64
    evaluate: bool = True
    pictures: bool = True
    tensorboard: bool = True
    verbose: int = 1


def define_flags(flag_values=flags.FLAGS):
    """Defines the training flags on `flag_values` (once).

    Args:
        flag_values: an `absl.flags.FlagValues`. Defaults to the global one.
    """
    if "rnp_epochs" in flag_values:
        return
    fv = {"flag_values": flag_values}
    d = TrainConfig(model_dir="")
    flags.DEFINE_string("model_dir", None, "Output directory (created if its parent exists).", **fv)
    flags.DEFINE_string(
        "dataset",
        d.dataset,
        "'digits' (scikit-learn's bundled 8x8 digits, no download), 'npz:PATH' (x_train, "
        "y_train, x_test, y_test), or a tfds name: " + ", ".join(data_lib.TFDS_DATASETS) + ".",
        **fv,
    )
    flags.DEFINE_string("tfds_data_dir", None, "tensorflow-datasets data_dir (prepared datasets).", **fv)
    flags.DEFINE_enum("backbone", d.backbone, BACKBONE_CHOICES, "Backbone description.", **fv)
    flags.DEFINE_list("widths", [str(w) for w in d.widths], "cifar_cnn: channels of its 4 convs.", **fv)
    flags.DEFINE_float("width_multiplier", d.width_multiplier, "vgg16: channel multiplier.", lower_bound=0.01, **fv)
    flags.DEFINE_integer("groups", d.groups, "k, channel groups per prunable conv.", lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size.", lower_bound=1, **fv)
    flags.DEFINE_float(
        "validation_split", d.validation_split, "Share of train held out for validation.",
        lower_bound=0.0, upper_bound=0.9, **fv,
    )
    flags.DEFINE_boolean("augment", d.augment, "Pad-crop (+ flip for colour) augmentation.", **fv)
    flags.DEFINE_integer("max_train_examples", None, "Use only this many training images.", lower_bound=1, **fv)
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: one pass).", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", d.seed, "Random seed.", **fv)
    flags.DEFINE_string(
        "init_checkpoint", None, "A .keras RNPModel whose weights initialise the model (skips no stage).", **fv
    )
    flags.DEFINE_enum("optimizer", d.optimizer, OPTIMIZERS, "Optimizer of the backbone stages.", **fv)
    flags.DEFINE_enum("agent_optimizer", d.agent_optimizer, OPTIMIZERS, "Optimizer of the agent.", **fv)
    flags.DEFINE_integer("pretrain_epochs", d.pretrain_epochs, "Stage 1: full-width epochs.", lower_bound=0, **fv)
    flags.DEFINE_float("pretrain_lr", d.pretrain_lr, "Stage 1 learning rate.", lower_bound=0.0, **fv)
    flags.DEFINE_boolean("reorder", d.reorder, "Stage 2: sort channels by importance.", **fv)
    flags.DEFINE_integer(
        "robust_epochs", d.robust_epochs, "Stage 3a: prefix-robust (sandwich) epochs.", lower_bound=0, **fv
    )
    flags.DEFINE_float("robust_lr", d.robust_lr, "Stage 3a learning rate.", lower_bound=0.0, **fv)
    flags.DEFINE_integer("rnp_epochs", d.rnp_epochs, "Stage 3b: Algorithm 1 epochs.", lower_bound=0, **fv)
    flags.DEFINE_float("backbone_lr", d.backbone_lr, "Backbone learning rate in Algorithm 1.", lower_bound=0.0, **fv)
    flags.DEFINE_float("agent_lr", d.agent_lr, "Agent learning rate.", lower_bound=0.0, **fv)
    flags.DEFINE_integer("agent_steps", d.agent_steps, "N1, agent steps per phase.", lower_bound=0, **fv)
    flags.DEFINE_integer("backbone_steps", d.backbone_steps, "N2, backbone steps per phase.", lower_bound=0, **fv)
    flags.DEFINE_boolean("agent_warmup", d.agent_warmup, "First agent phase lasts until epsilon's floor.", **fv)
    flags.DEFINE_float("epsilon_start", d.epsilon_start, "Initial exploration.", 0.0, 1.0, **fv)
    flags.DEFINE_float("epsilon_end", d.epsilon_end, "Exploration floor.", 0.0, 1.0, **fv)
    flags.DEFINE_integer(
        "epsilon_decay_steps", d.epsilon_decay_steps, "Agent steps of the epsilon ramp.", lower_bound=0, **fv
    )
    flags.DEFINE_float("penalty", d.penalty, "p, reward per extra group (negative).", upper_bound=0.0, **fv)
    flags.DEFINE_float("alpha", None, "Weight of the classification loss (default: 1 / mean loss).", **fv)
    flags.DEFINE_float("gamma", d.gamma, "Q-learning discount.", 0.0, 1.0, **fv)
    flags.DEFINE_enum("q_loss", d.q_loss, ("mse", "huber"), "TD loss.", **fv)
    flags.DEFINE_float(
        "full_width_fraction", d.full_width_fraction, "Share of full-width samples in backbone phases.",
        0.0, 1.0, **fv,
    )
    flags.DEFINE_integer("agent_units", d.agent_units, "LSTM size.", lower_bound=1, **fv)
    flags.DEFINE_integer("agent_embed_dim", d.agent_embed_dim, "Encoder size.", lower_bound=1, **fv)
    flags.DEFINE_boolean("evaluate", d.evaluate, "Stage 4: evaluate on the test split.", **fv)
    flags.DEFINE_boolean("pictures", d.pictures, "Write the evaluation pictures.", **fv)
    flags.DEFINE_boolean("tensorboard", d.tensorboard, "Write TensorBoard logs.", **fv)
    flags.DEFINE_integer("verbose", d.verbose, "Keras verbosity: 0, 1 (progress bar), 2 (line per epoch).", 0, 2, **fv)


def config_from_flags(flag_values=flags.FLAGS):
    """Validates the parsed flags and returns a `TrainConfig`.

    Args:
        flag_values: parsed `absl.flags.FlagValues`.

    Returns:
        A `TrainConfig`.

    Raises:
        ValueError: with one line naming the bad flag.
    """
    fv = flag_values
    if not fv.model_dir:
        raise ValueError("--model_dir is required (where the model, checkpoints and reports go).")
    parent = os.path.dirname(os.path.abspath(fv.model_dir))
    if not os.path.isdir(parent):
        raise ValueError(f"--model_dir: the parent directory {parent!r} does not exist.")
    if os.path.exists(fv.model_dir) and not os.path.isdir(fv.model_dir):
        raise ValueError(f"--model_dir: {fv.model_dir!r} exists and is not a directory.")
    dataset = fv.dataset
    if not (dataset == "digits" or dataset.startswith("npz:") or dataset in data_lib.TFDS_DATASETS):
        raise ValueError(
            f"--dataset: unknown dataset {dataset!r}; use 'digits', 'npz:PATH' or one of "
            f"{', '.join(data_lib.TFDS_DATASETS)}."
        )
    try:
        widths = tuple(int(w) for w in fv.widths)
    except ValueError:
        raise ValueError(f"--widths must be integers. Received: --widths={','.join(fv.widths)}")
    if fv.backbone == "cifar_cnn" and (len(widths) != 4 or min(widths) < 1):
        raise ValueError(f"--widths must list 4 positive channel counts. Received: --widths={','.join(fv.widths)}")
    if fv.init_checkpoint and not os.path.isfile(fv.init_checkpoint):
        raise ValueError(f"--init_checkpoint: no such file {fv.init_checkpoint!r}.")
    if fv.epsilon_end > fv.epsilon_start:
        raise ValueError(
            f"--epsilon_end ({fv.epsilon_end}) must not exceed --epsilon_start ({fv.epsilon_start})."
        )
    if fv.rnp_epochs and fv.agent_steps == 0 and fv.backbone_steps == 0:
        raise ValueError("--agent_steps and --backbone_steps cannot both be 0 when --rnp_epochs > 0.")
    if fv.alpha is not None and fv.alpha <= 0:
        raise ValueError(f"--alpha must be positive. Received: --alpha={fv.alpha}")
    config = TrainConfig(
        **{f.name: getattr(fv, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "widths"},
        widths=widths,
    )
    _check_backbone(config)
    return config


def _backbone_spec(config):
    from rnp_tf import backbones

    if config.backbone == "cifar_cnn":
        return backbones.cifar_cnn(config.widths)
    return backbones.vgg16(width_multiplier=config.width_multiplier)


def _check_backbone(config):
    from rnp_tf import backbones

    try:
        backbones.validate_backbone(_backbone_spec(config), config.groups)
    except ValueError as error:
        raise ValueError(f"--groups={config.groups} does not fit --backbone={config.backbone}: {error}")


def build_model(config, dataset):
    """The `RNPModel` a config describes, for a loaded dataset."""
    from rnp_tf.model import RNPModel

    return RNPModel(
        _backbone_spec(config),
        image_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        groups=config.groups,
        agent_embed_dim=config.agent_embed_dim,
        agent_units=config.agent_units,
        penalty=config.penalty,
        alpha=config.alpha,
        gamma=config.gamma,
        q_loss=config.q_loss,
        agent_steps=config.agent_steps,
        backbone_steps=config.backbone_steps,
        agent_warmup=config.agent_warmup,
        epsilon_start=config.epsilon_start,
        epsilon_end=config.epsilon_end,
        epsilon_decay_steps=config.epsilon_decay_steps,
        full_width_fraction=config.full_width_fraction,
    )


def _optimizer(name, learning_rate):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def _load_init_checkpoint(model, path):
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


def prepare(config):
    """Loads the dataset and builds (and initialises) the model of a config.

    Everything a user can get wrong (a missing or corrupt file, a dataset
    that is not prepared, a checkpoint that does not fit) fails here, before
    any training.

    Args:
        config: a `TrainConfig`.

    Returns:
        `(dataset, model)`.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    dataset = data_lib.load_dataset(
        config.dataset,
        batch_size=config.batch_size,
        validation_split=config.validation_split,
        augment=config.augment,
        tfds_data_dir=config.tfds_data_dir,
        seed=config.seed,
        max_train_examples=config.max_train_examples,
    )
    model = build_model(config, dataset)
    if config.init_checkpoint:
        _load_init_checkpoint(model, config.init_checkpoint)
    return dataset, model


def run(config, dataset=None, model=None):
    """Runs every enabled stage of a training run and writes its outputs.

    Args:
        config: a `TrainConfig` (see `config_from_flags`).
        dataset, model: the result of `prepare(config)`; prepared here
            when omitted.

    Returns:
        The dict written to `metrics.json`.

    Example:

    >>> metrics = run(TrainConfig(model_dir="/tmp/rnp", rnp_epochs=1))
    """
    import keras

    from rnp_tf import evaluation
    from rnp_tf import io_utils
    from rnp_tf import report
    from rnp_tf.callbacks import AtomicCheckpoint
    from rnp_tf.callbacks import CompactProgressBar
    from rnp_tf.reorder import reorder_channels

    if dataset is None or model is None:
        dataset, model = prepare(config)
    os.makedirs(config.model_dir, exist_ok=True)
    checkpoints = os.path.join(config.model_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    io_utils.write_json(os.path.join(config.model_dir, "flags.json"), dataclasses.asdict(config))
    print(
        f"rnp_tf.train: {dataset.name}: {dataset.num_train} train / {dataset.num_test} test images "
        f"{dataset.input_shape}, {config.backbone} with {model.num_prunable} prunable convs, "
        f"k={config.groups}, {model.full_macs / 1e6:.2f}M MACs per image."
    )
    metrics = {"dataset": dataset.name, "full_macs": model.full_macs, "stage_seconds": {}, "history": {}}

    def fit(stage, phase, epochs, optimizer_lr):
        if not epochs:
            return
        print(f"rnp_tf.train: stage {stage} ({epochs} epochs)")
        model.compile(
            optimizer=_optimizer(config.optimizer, optimizer_lr),
            agent_optimizer=_optimizer(config.agent_optimizer, config.agent_lr),
        )
        model.set_phase(phase)
        callbacks = [AtomicCheckpoint(checkpoints, prefix=stage), CompactProgressBar(config.verbose)]
        if config.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs", stage)))
        start = time.time()
        history = model.fit(
            dataset.train,
            epochs=epochs,
            steps_per_epoch=config.steps_per_epoch,
            validation_data=dataset.validation,
            callbacks=callbacks,
            verbose=0,
        )
        metrics["stage_seconds"][stage] = time.time() - start
        metrics["history"][stage] = {k: [float(v) for v in vals] for k, vals in history.history.items()}

    fit("backbone", "full", config.pretrain_epochs, config.pretrain_lr)
    if config.reorder:
        start = time.time()
        reorder_channels(model)
        metrics["stage_seconds"]["reorder"] = time.time() - start
    fit("robust", "robust", config.robust_epochs, config.robust_lr)
    fit("rnp", None, config.rnp_epochs, config.backbone_lr)
    if not model.compiled:
        model.compile()
    io_utils.save_model_atomic(model, os.path.join(config.model_dir, "model.keras"))
    if config.evaluate:
        start = time.time()
        results = evaluation.write_evaluation(model, dataset, config.model_dir, pictures=config.pictures)
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
        print(report.format_table(evaluation.summary_rows(results), ["model", "accuracy", "compute_fraction"]))
    io_utils.write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    print(f"rnp_tf.train: wrote {config.model_dir}")
    return metrics


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    try:
        config = config_from_flags(flags.FLAGS)
        dataset, model = prepare(config)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    run(config, dataset, model)


def _fail(message):
    validation.exit_with_error("rnp_tf.train", message)


if __name__ == "__main__":
    define_flags()
    app.run(main)
