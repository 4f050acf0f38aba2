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

Distribution (`--strategy`, see `rnp_tf.distribute`): `default`,
`mirrored` (every local GPU), `multi_worker` (`TF_CONFIG`), `tpu`
(`--tpu`). `--batch_size` is the global batch, split across replicas.

Resuming: after every epoch the complete training state (model variables,
which hold the schedule counters and epsilon, and both optimizers) is
written atomically to `state/`, and `progress.json` records the completed
stages and epochs. Re-running the same command continues after the last
completed epoch (`--resume`, default true): completed stages are skipped,
the input stream is positioned where the epoch starts, and the random
seeds are derived from (`--seed`, stage, epoch). A corrupt checkpoint or a
`--model_dir` written with other flags stops with one line (exit status 2)
and nothing is overwritten.

Example:

    python -m rnp_tf.train --flagfile configs/quickstart.flags \
        --model_dir /tmp/rnp_quickstart
"""

import dataclasses
import math
import os
import shutil
import time

from absl import app
from absl import flags

from rnp_tf import distribute
from rnp_tf import validation

from rnp_tf import data as data_lib

BACKBONE_CHOICES = ("cifar_cnn", "vgg_cifar", "vgg16", "resnet50")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
# Training stages in order; the integer identifies the stage in derived seeds.
STAGES = {"backbone": 0, "reorder": 1, "robust": 2, "rnp": 3}
_STAGE_PHASE = {"backbone": "full", "robust": "robust", "rnp": None}
PROGRESS = "progress.json"
SELECTION = "knob_select.npz"
SELECT_MAX_IMAGES = 5000
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
    backbone_penalty_range: tuple | None = None
    select_budgets: tuple | None = None
    agent_units: int = 64
    agent_embed_dim: int = 64
    evaluate: bool = True
    pictures: bool = True
    tensorboard: bool = True
    verbose: int = 1
    strategy: str = "default"
    tpu: str | None = None
    cpu_devices: int | None = None
    resume: bool = True
    reseed_every_epoch: bool = False
    backbone_weights: str = "none"
    mixed_precision: bool = False


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
    flags.DEFINE_enum(
        "backbone", d.backbone, BACKBONE_CHOICES,
        "Backbone description: cifar_cnn (--widths), vgg_cifar (a VGG-style 32x32 CNN, first width 48 x "
        "--width_multiplier), vgg16 (--width_multiplier) or resnet50 (bottleneck blocks, the inner convs "
        "prunable).", **fv,
    )
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
    flags.DEFINE_list(
        "backbone_penalty_range", [],
        "p_min,p_max: backbone phases of Algorithm 1 act under the agent's choice re-priced to a penalty drawn "
        "per image from this range, so the backbone is fine-tuned for the whole run-time knob "
        "(RNPModel backbone_penalty_range; default: the paper's, at --penalty only).", **fv,
    )
    flags.DEFINE_list(
        "select_budgets", [],
        "b1,b2,...: after every Algorithm 1 epoch, measure the validation accuracy of the run-time knob at "
        f"these mean compute fractions (at most {SELECT_MAX_IMAGES} validation images) and keep the epoch "
        "with the best mean as the final model (rnp_tf.BestKnobWeights; needs --validation_split; the "
        "selection is resumable, in MODEL_DIR/knob_select.npz; default: the last epoch).", **fv,
    )
    flags.DEFINE_integer("agent_units", d.agent_units, "LSTM size.", lower_bound=1, **fv)
    flags.DEFINE_integer("agent_embed_dim", d.agent_embed_dim, "Encoder size.", lower_bound=1, **fv)
    flags.DEFINE_boolean("evaluate", d.evaluate, "Stage 4: evaluate on the test split.", **fv)
    flags.DEFINE_boolean("pictures", d.pictures, "Write the evaluation pictures.", **fv)
    flags.DEFINE_boolean("tensorboard", d.tensorboard, "Write TensorBoard logs.", **fv)
    flags.DEFINE_integer("verbose", d.verbose, "Keras verbosity: 0, 1 (progress bar), 2 (line per epoch).", 0, 2, **fv)
    flags.DEFINE_enum(
        "strategy", d.strategy, distribute.STRATEGIES,
        "tf.distribute strategy: default (one device), mirrored (every local GPU; without GPUs every logical "
        "CPU device), multi_worker (MultiWorkerMirroredStrategy, cluster from $TF_CONFIG), tpu (--tpu).",
        **fv,
    )
    flags.DEFINE_string("tpu", None, "--strategy=tpu: TPU name or grpc:// address (default: a local TPU).", **fv)
    flags.DEFINE_integer(
        "cpu_devices", None, "Split the CPU into this many logical devices (tf.distribute without accelerators).",
        lower_bound=1, **fv,
    )
    flags.DEFINE_boolean(
        "resume", d.resume,
        "Continue the run recorded in --model_dir (progress.json) after its last completed epoch. With false, a "
        "--model_dir holding a run is an error (it is never overwritten).",
        **fv,
    )
    flags.DEFINE_boolean(
        "reseed_every_epoch", d.reseed_every_epoch,
        "Re-seed and rebuild the compiled train steps at every epoch, so a resumed run draws exactly the random "
        "numbers of an uninterrupted one (costs one re-trace per phase and epoch).",
        **fv,
    )
    flags.DEFINE_string(
        "backbone_weights", d.backbone_weights,
        "vgg16 only: 'imagenet' (Keras application VGG16 weights from ~/.keras/models, downloaded if absent), "
        "a PATH to VGG16 weights (.h5 / .weights.h5), or 'none'.",
        **fv,
    )
    flags.DEFINE_boolean(
        "mixed_precision", d.mixed_precision, "Keras mixed precision (mixed_float16; mixed_bfloat16 on TPU).", **fv
    )


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
    if fv.tpu and fv.strategy != "tpu":
        raise ValueError(f"--tpu is only used with --strategy=tpu. Received: --strategy={fv.strategy}")
    if fv.backbone == "resnet50" and fv.width_multiplier != 1.0:
        raise ValueError(
            f"--width_multiplier scales --backbone=vgg16 and vgg_cifar only. Received: --width_multiplier={fv.width_multiplier}"
        )
    weights = fv.backbone_weights
    if weights != "none":
        if fv.backbone != "vgg16":
            raise ValueError(f"--backbone_weights={weights} needs --backbone=vgg16. Received: --backbone={fv.backbone}")
        if fv.width_multiplier != 1.0:
            raise ValueError(
                f"--backbone_weights needs the full VGG-16 (--width_multiplier=1). Received: {fv.width_multiplier}"
            )
        if fv.init_checkpoint:
            raise ValueError("--backbone_weights and --init_checkpoint both initialise the model; pass one.")
        if weights != "imagenet" and not os.path.isfile(weights):
            raise ValueError(
                f"--backbone_weights must be 'imagenet', 'none' or an existing weights file. Received: {weights!r}"
            )
    spread = None
    if fv.backbone_penalty_range:
        spread = _floats(fv.backbone_penalty_range)
        if len(spread) != 2 or not spread[0] < spread[1]:
            raise ValueError(
                "--backbone_penalty_range must be p_min,p_max with p_min < p_max. "
                f"Received: --backbone_penalty_range={','.join(fv.backbone_penalty_range)}"
            )
    select = None
    if fv.select_budgets:
        select = _floats(fv.select_budgets)
        if not select or not all(0.0 < b <= 1.0 for b in select):
            raise ValueError(
                "--select_budgets must be compute fractions in (0, 1]. "
                f"Received: --select_budgets={','.join(fv.select_budgets)}"
            )
        if not fv.validation_split or not fv.rnp_epochs:
            raise ValueError(
                "--select_budgets picks an Algorithm 1 epoch on validation images: it needs --validation_split > 0 "
                f"and --rnp_epochs > 0. Received: --validation_split={fv.validation_split}, "
                f"--rnp_epochs={fv.rnp_epochs}"
            )
    own = ("widths", "backbone_penalty_range", "select_budgets")
    config = TrainConfig(
        **{f.name: getattr(fv, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in own},
        widths=widths,
        backbone_penalty_range=spread,
        select_budgets=select,
    )
    _check_backbone(config)
    return config


def _floats(values):
    """The list flag's values as a tuple of floats, or `()` when one is not a number."""
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        return ()


def _backbone_spec(config):
    from rnp_tf import backbones

    if config.backbone == "cifar_cnn":
        return backbones.cifar_cnn(config.widths)
    if config.backbone == "resnet50":
        return backbones.resnet50()
    if config.backbone == "vgg_cifar":
        return backbones.vgg_cifar(max(1, int(round(48 * config.width_multiplier))))
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
    from rnp_tf.schedule import Schedule

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


def _load_dataset(config):
    return data_lib.load_dataset(
        config.dataset,
        batch_size=config.batch_size,
        validation_split=config.validation_split,
        augment=config.augment,
        tfds_data_dir=config.tfds_data_dir,
        seed=config.seed,
        max_train_examples=config.max_train_examples,
    )


def check_strategy(config, strategy):
    """Checks the global batch against the strategy's replicas (ValueError)."""
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
        config: a `TrainConfig`.
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
    dataset = _load_dataset(config)
    if strategy.num_replicas_in_sync > 1 and dataset.num_train < config.batch_size:
        raise ValueError(
            f"--batch_size={config.batch_size} exceeds the {dataset.num_train} training images; multi-replica "
            "strategies train on full global batches only."
        )
    with strategy.scope():
        model = build_model(config, dataset)
    if config.backbone_weights != "none":
        load_backbone_weights(model, config.backbone_weights, dataset)
    if config.init_checkpoint:
        _load_init_checkpoint(model, config.init_checkpoint)
    return dataset, model


# --------------------------------------------------------------- VGG-16 weights
_VGG16_FILES = {
    True: ("vgg16_weights_tf_dim_ordering_tf_kernels.h5", "WEIGHTS_PATH"),
    False: ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "WEIGHTS_PATH_NO_TOP"),
}
# keras.applications.vgg16.preprocess_input ("caffe"): BGR, 0..255, minus these means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def _keras_cache_file(name):
    root = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(root, "models", name)


def keras_vgg16(weights, include_top, input_shape):
    """`keras.applications.VGG16` with `weights` ('imagenet' or a file), or a ValueError.

    'imagenet' uses the cached file in `~/.keras/models` (or `$KERAS_HOME`);
    when it is absent Keras downloads it, and when that fails (offline) the
    error says where to put the file.
    """
    import socket

    import keras

    name, _ = _VGG16_FILES[include_top]
    kwargs = dict(include_top=include_top, input_shape=tuple(input_shape))
    if weights != "imagenet":
        try:
            return keras.applications.VGG16(weights=weights, **kwargs)
        except (ValueError, OSError, KeyError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--backbone_weights={weights}: not VGG16 weights for this input ({message}).")
    cached = _keras_cache_file(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return keras.applications.VGG16(weights="imagenet", **kwargs)
    except Exception as error:  # offline, proxy, truncated download: say what to do
        from keras.src.applications import vgg16 as keras_vgg16_module

        url = getattr(keras_vgg16_module, _VGG16_FILES[include_top][1], name)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--backbone_weights=imagenet: the Keras VGG16 ImageNet weights are not in {cached} and could not be "
            f"downloaded ({message}). Download {url} on a machine with internet access and copy it to {cached}, "
            "or pass --backbone_weights=PATH (or none)."
        )
    finally:
        socket.setdefaulttimeout(previous)


def map_keras_vgg16(source, model, input_mean=None, input_std=None):
    """Copies a Keras VGG16's weights onto an `RNPModel` with the vgg16 backbone.

    Our gated convs have no bias but BatchNorm (one set per input width);
    a conv with bias and no BatchNorm is mapped exactly by `gamma = 1`,
    `beta = bias`, `moving_mean = 0`, `moving_variance = 1 - epsilon` (so
    `gamma / sqrt(var + eps)` is exactly 1) in every set. The dense layers
    `fc1`, `fc2`, `predictions` map onto `fc_0`, `fc_1`, `classifier` when
    their shapes match (VGG flattens (h, w, c) as we do); our logits are the
    inputs of Keras' final softmax.

    `input_mean` / `input_std` (the per-channel normalisation of our input
    pipelines, images in [0, 1]) fold Keras' "caffe" preprocessing (BGR,
    0..255, mean subtraction) into the first conv: its kernel is scaled and
    its input channels reversed, and the constant term goes into `beta`.
    Exact except at the one-pixel border, where zero padding means a
    slightly different pixel in the two conventions.

    Args:
        source: a `keras.applications.VGG16` (with or without top).
        model: an `RNPModel` built from `rnp_tf.backbones.vgg16()`.
        input_mean, input_std: optional per-channel arrays of length 3.

    Returns:
        True when the head was copied too, False for the convolutions only.

    Raises:
        ValueError: the shapes do not fit.
    """
    import keras
    import numpy as np

    convs = [layer for layer in source.layers if isinstance(layer, keras.layers.Conv2D)]
    if len(convs) != len(model.convs):
        raise ValueError(f"VGG16 has {len(convs)} convolutions, the model {len(model.convs)}.")
    for index, (src, dst) in enumerate(zip(convs, model.convs)):
        kernel = np.asarray(src.kernel, np.float32)
        bias = np.asarray(src.bias, np.float32) if src.use_bias else np.zeros(src.filters, np.float32)
        if tuple(kernel.shape) != tuple(dst.kernel.shape):
            raise ValueError(f"{src.name}: kernel {kernel.shape} does not fit {dst.name} {tuple(dst.kernel.shape)}.")
        if index == 0 and input_mean is not None:
            mean = np.asarray(input_mean, np.float32).reshape(3)
            std = np.asarray(input_std, np.float32).reshape(3)
            caffe = np.asarray(CAFFE_BGR_MEAN, np.float32)
            # caffe input channel j (BGR) = 255 * std[2-j] * ours[2-j] + 255 * mean[2-j] - caffe[j]
            shift = 255.0 * mean[::-1] - caffe
            bias = bias + np.einsum("hwjo,j->o", kernel, shift)
            kernel = kernel[:, :, ::-1, :] * (255.0 * std)[None, None, :, None]
        dst.kernel.assign(kernel)
        if dst.normalization:
            sets = dst.num_bn_sets
            dst.gamma.assign(np.ones((sets, dst.filters), np.float32))
            dst.beta.assign(np.tile(bias, (sets, 1)))
            dst.moving_mean.assign(np.zeros((sets, dst.filters), np.float32))
            dst.moving_variance.assign(np.full((sets, dst.filters), 1.0 - dst.epsilon, np.float32))
        else:
            dst.bias.assign(bias)
    dense = [layer for layer in source.layers if isinstance(layer, keras.layers.Dense)]
    if len(dense) != len(model.head_layers) or any(
        tuple(s.kernel.shape) != tuple(d.kernel.shape) for s, d in zip(dense, model.head_layers)
    ):
        return False
    for src, dst in zip(dense, model.head_layers):
        dst.kernel.assign(np.asarray(src.kernel))
        dst.bias.assign(np.asarray(src.bias))
    return True


def load_backbone_weights(model, weights, dataset):
    """`--backbone_weights`: Keras VGG16 weights ('imagenet' or a file) onto the model.

    The head is copied when it fits (1000 classes at 224x224); otherwise
    only the convolutions are, and the head keeps its initialisation.
    Keras' caffe preprocessing is folded into the first conv for the
    dataset's normalisation (see `map_keras_vgg16`).
    """
    top = model.num_classes == 1000 and tuple(model.image_shape) == (224, 224, 3)
    try:
        source = keras_vgg16(weights, top, model.image_shape)
    except ValueError:
        if not top or weights == "imagenet":
            raise
        top = False
        source = keras_vgg16(weights, False, model.image_shape)
    head = map_keras_vgg16(source, model, input_mean=dataset.mean, input_std=dataset.std)
    print(
        f"rnp_tf.train: VGG16 weights from {weights}: 13 convolutions"
        + (" and the classifier head." if head else "; the head keeps its random initialisation.")
    )
    del source


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


def _stage_plan(config):
    """`[(stage, epochs)]` of the enabled stages, in order (`reorder` has 1)."""
    plan = []
    if config.pretrain_epochs:
        plan.append(("backbone", config.pretrain_epochs))
    if config.reorder:
        plan.append(("reorder", 1))
    if config.robust_epochs:
        plan.append(("robust", config.robust_epochs))
    if config.rnp_epochs:
        plan.append(("rnp", config.rnp_epochs))
    return plan


def _new_progress(config):
    return {
        "format": 1,
        "stages": {stage: {"epochs": epochs, "epochs_done": 0, "seconds": 0.0, "history": {}}
                   for stage, epochs in _stage_plan(config)},
        "checkpoint": None,
        "checkpoints": [],
        "complete": False,
    }


def _jsonable_config(config):
    import json

    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_compatible(config, saved, model_dir):
    """Raises a ValueError naming the flags that differ from the recorded run."""
    now = _jsonable_config(config)
    defaults = _jsonable_config(TrainConfig(model_dir=""))
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


def _next_stage(config, progress):
    for stage, epochs in _stage_plan(config):
        if progress["stages"][stage]["epochs_done"] < epochs:
            return stage, progress["stages"][stage]["epochs_done"]
    return None, 0


def resume_point(config, model, strategy=None):
    """Reads `progress.json` of `--model_dir` and restores the recorded state.

    Nothing is written. For a fresh `--model_dir` this returns a new
    progress record. Otherwise the flags are compared with `flags.json`,
    the last checkpoint is verified (sizes and SHA-256 of its files) and
    restored: the model's variables (weights, BatchNorm statistics,
    schedule counters, epsilon) and, when the run stopped inside a stage,
    that stage's two optimizers (the model is compiled for it first).

    Args:
        config: a `TrainConfig`.
        model: the model `prepare(config)` built.
        strategy: the run's strategy.

    Returns:
        A `ResumePoint`.

    Raises:
        ValueError: (including `CheckpointError`) one line: `--resume=false`
            on a recorded run, other flags, a corrupt progress or checkpoint.
    """
    import tensorflow as tf

    from rnp_tf import callbacks as callbacks_lib
    from rnp_tf import io_utils

    strategy = strategy or tf.distribute.get_strategy()
    info = distribute.task_info(strategy)
    path = os.path.join(config.model_dir, PROGRESS)
    if not os.path.exists(path) or (not config.resume and not info.is_chief):
        return ResumePoint(_new_progress(config), fresh=True)
    if not config.resume:
        raise ValueError(
            f"--model_dir {config.model_dir} holds a run ({PROGRESS}) and --resume=false; it is never overwritten: "
            "resume it (--resume=true), delete it, or choose another --model_dir."
        )
    try:
        progress = io_utils.read_json(path)
        saved_flags = io_utils.read_json(os.path.join(config.model_dir, "flags.json"))
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"--model_dir {config.model_dir}: cannot resume, its run record is corrupt ({error}).")
    if not isinstance(progress, dict) or progress.get("format") != 1 or "stages" not in progress:
        raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} is corrupt or of an unknown format.")
    _check_compatible(config, saved_flags, config.model_dir)
    if progress.get("complete"):
        return ResumePoint(progress, fresh=False)
    stage, epoch = _next_stage(config, progress)
    name = progress.get("checkpoint")
    compiled = None
    if name:
        checkpoint = os.path.join(config.model_dir, STATE_DIR, name)
        inside = stage is not None and stage != "reorder" and epoch > 0
        if inside and name != f"{stage}-{epoch:04d}":
            raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} records {stage} epoch {epoch} but names "
                             f"checkpoint {name}; the run record is corrupt.")
        if inside:
            _compile_stage(model, config, stage, strategy)
            compiled = stage
        callbacks_lib.read_training_state(model, checkpoint, optimizers=inside)
        print(f"rnp_tf.train: resuming {config.model_dir} from {name}"
              + (f" (stage {stage}, epoch {epoch + 1})" if stage else " (training complete)"))
    elif any(progress["stages"][s]["epochs_done"] for s in progress["stages"]):
        raise ValueError(f"--model_dir {config.model_dir}: {PROGRESS} records completed epochs but no checkpoint.")
    return ResumePoint(progress, fresh=False, compiled_stage=compiled)


def _compile_stage(model, config, stage, strategy):
    lr = {"backbone": config.pretrain_lr, "robust": config.robust_lr, "rnp": config.backbone_lr}[stage]
    with strategy.scope():
        model.compile(
            optimizer=_optimizer(config.optimizer, lr),
            agent_optimizer=_optimizer(config.agent_optimizer, config.agent_lr),
        )
    distribute.adapt_model(model, strategy)
    model.set_phase(_STAGE_PHASE[stage])


def training_input(config, strategy, start_epoch, dataset=None):
    """The training stream of one stage, positioned at `start_epoch`.

    A freshly loaded pipeline (its shuffle and augmentation seeds restart),
    repeated: epoch e is batches `[e * steps, (e + 1) * steps)` of the
    stream, with `steps = --steps_per_epoch` or one pass. To start at epoch
    e the earlier passes' reshuffles are advanced without reading data
    (creating an iterator draws a pass's seeds) and only the part of a pass
    before the epoch is skipped (read). Multi-replica strategies drop each
    pass's last partial batch so every replica gets an equal share.

    `tf.data` folds the global TensorFlow seed into its shuffle seeds, so
    the caller must set the same global seed whatever `start_epoch` is.

    Args:
        config: a `TrainConfig`.
        strategy: the run's strategy.
        start_epoch: the first epoch to train.
        dataset: a freshly loaded dataset to use (default: load one).

    Returns:
        `(stream, steps_per_epoch)`.
    """
    dataset = dataset or _load_dataset(config)
    base = dataset.train
    batch = config.batch_size
    if strategy.num_replicas_in_sync > 1 or distribute.is_tpu(strategy):
        base = base.rebatch(batch, drop_remainder=True)
        passes = dataset.num_train // batch
    else:
        passes = math.ceil(dataset.num_train / batch)
    steps = config.steps_per_epoch or passes
    skip_passes, skip_batches = divmod(start_epoch * steps, passes)
    for _ in range(skip_passes):
        iter(base)  # draws this pass's shuffle / augmentation seeds; reads nothing
    stream = base.repeat()
    if skip_batches:
        stream = stream.skip(skip_batches)
    in_memory = config.dataset not in data_lib.TFDS_DATASETS
    stream = stream.with_options(distribute.distribute_options(strategy, in_memory))
    return stream, steps


def _validation_input(config, dataset, strategy):
    import tensorflow as tf

    validation = dataset.validation
    if validation is None:
        return None
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:  # an empty per-replica batch trips oneDNN's conv (FINDINGS.md)
        validation = validation.filter(lambda x, y: tf.shape(x)[0] >= replicas)
    in_memory = config.dataset not in data_lib.TFDS_DATASETS
    return validation.with_options(distribute.distribute_options(strategy, in_memory))


def run(config, dataset=None, model=None, strategy=None, resume=None, callbacks=None):
    """Runs (or resumes) every enabled stage of a training run and writes its outputs.

    Args:
        config: a `TrainConfig` (see `config_from_flags`).
        dataset, model: the result of `prepare(config, strategy)`; prepared
            here when omitted.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        resume: the `resume_point(config, model, strategy)`; computed here
            when omitted.
        callbacks: extra Keras callbacks, added after rnp_tf's own to the
            `model.fit` of every trained stage (backbone, robust, rnp).

    Returns:
        The dict written to `metrics.json` (on the chief; other workers of
        a multi-worker run return the training history only).

    Example:

    >>> metrics = run(TrainConfig(model_dir="/tmp/rnp", rnp_epochs=1))
    """
    import keras
    import tensorflow as tf

    from rnp_tf import evaluation
    from rnp_tf import io_utils
    from rnp_tf import report
    from rnp_tf.callbacks import AtomicCheckpoint
    from rnp_tf.callbacks import BestKnobWeights
    from rnp_tf.callbacks import CompactProgressBar
    from rnp_tf.callbacks import EpochSeeder
    from rnp_tf.callbacks import ResumableCheckpoint
    from rnp_tf.callbacks import derive_seed
    from rnp_tf.callbacks import write_training_state
    from rnp_tf.reorder import reorder_channels

    extra_callbacks = list(callbacks or [])
    strategy = strategy or tf.distribute.get_strategy()
    if dataset is None or model is None:
        dataset, model = prepare(config, strategy)
    if resume is None:
        resume = resume_point(config, model, strategy)
    progress = resume.progress
    chief = distribute.task_info(strategy).is_chief
    metrics_path = os.path.join(config.model_dir, "metrics.json")
    if progress.get("complete"):
        print(f"rnp_tf.train: {config.model_dir} holds a complete run ({PROGRESS}); nothing to do.")
        return io_utils.read_json(metrics_path) if os.path.exists(metrics_path) else {}
    checkpoints = os.path.join(config.model_dir, "checkpoints")
    states = os.path.join(config.model_dir, STATE_DIR)
    progress_path = os.path.join(config.model_dir, PROGRESS)
    selection_path = os.path.join(config.model_dir, SELECTION)
    if chief:
        os.makedirs(checkpoints, exist_ok=True)
        os.makedirs(states, exist_ok=True)
        if resume.fresh:
            io_utils.write_json(os.path.join(config.model_dir, "flags.json"), dataclasses.asdict(config))
            io_utils.write_json(progress_path, progress)
    print(
        f"rnp_tf.train: {dataset.name}: {dataset.num_train} train / {dataset.num_test} test images "
        f"{dataset.input_shape}, {config.backbone} with {model.num_prunable} prunable convs, "
        f"k={config.groups}, {model.full_macs / 1e6:.2f}M MACs per image, "
        f"{strategy.num_replicas_in_sync} replica(s) ({config.strategy})."
    )

    def record_checkpoint(stage, name, done, logs, seconds):
        record = progress["stages"][stage]
        record["epochs_done"] = done
        record["seconds"] = seconds
        for key, value in logs.items():
            record["history"].setdefault(key, []).append(float(value))
        progress["checkpoint"] = name
        kept = [c for c in progress["checkpoints"] if c != name] + [name]
        progress["checkpoints"] = kept[-KEEP_STATES:]
        if chief:
            io_utils.write_json(progress_path, progress)  # names the new state before older ones go
            for old in kept[:-KEEP_STATES]:
                shutil.rmtree(os.path.join(states, old), ignore_errors=True)

    def fit(stage, epochs, start_epoch):
        record = progress["stages"][stage]
        print(f"rnp_tf.train: stage {stage} ({epochs} epochs" + (f", from epoch {start_epoch + 1})" if start_epoch else ")"))
        if resume.compiled_stage != stage:
            _compile_stage(model, config, stage, strategy)
        # tf.data folds the global seed into its shuffle seeds: build the input
        # under a seed of the stage alone, then seed the epoch it starts with.
        keras.utils.set_random_seed(derive_seed(config.seed, STAGES[stage]))
        stream, steps = training_input(config, strategy, start_epoch)
        keras.utils.set_random_seed(derive_seed(config.seed, STAGES[stage], start_epoch))
        base_seconds, start = record["seconds"], time.time()
        callbacks = [EpochSeeder(config.seed, STAGES[stage], rebuild=config.reseed_every_epoch)]
        if chief and stage == "rnp" and config.select_budgets:
            # measured before the epoch's state is saved, so no resume point skips a measurement
            x, y = dataset.validation_arrays(SELECT_MAX_IMAGES)
            callbacks.append(BestKnobWeights(x, y, config.select_budgets, restore=False, path=selection_path))
        if chief:
            callbacks.append(AtomicCheckpoint(checkpoints, prefix=stage))
        callbacks.append(
            ResumableCheckpoint(
                states, stage, write=chief,
                on_saved=lambda name, done, logs: record_checkpoint(
                    stage, name, done, logs, base_seconds + time.time() - start
                ),
            )
        )
        callbacks.append(CompactProgressBar(config.verbose if chief else 0))
        if config.tensorboard and chief:
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs", stage)))
        callbacks.extend(extra_callbacks)
        model.fit(
            stream,
            epochs=epochs,
            initial_epoch=start_epoch,
            steps_per_epoch=steps,
            validation_data=_validation_input(config, dataset, strategy),
            callbacks=callbacks,
            shuffle=False,  # tf.data shuffles the stream
            verbose=0,
        )

    for stage, epochs in _stage_plan(config):
        done = progress["stages"][stage]["epochs_done"]
        if done >= epochs:
            continue
        if stage == "reorder":
            start = time.time()
            reorder_channels(model)
            name = "reorder-0001"
            if chief:
                write_training_state(model, os.path.join(states, name), optimizers=False,
                                     extra={"stage": "reorder", "epoch": 1})
            record_checkpoint("reorder", name, 1, {}, time.time() - start)
        else:
            fit(stage, epochs, done)
    history = {s: r["history"] for s, r in progress["stages"].items() if s != "reorder"}
    if not chief:
        return {"history": history}
    if not model.compiled:
        with strategy.scope():
            model.compile()
    selection = None
    if config.select_budgets:
        selection = BestKnobWeights.read(selection_path)
        model.set_weights(selection["weights"])
        print(f"rnp_tf.train: kept Algorithm 1 epoch {selection['best_epoch'] + 1} of {config.rnp_epochs} (mean "
              f"validation accuracy {selection['accuracy']:.4f} at budgets {list(config.select_budgets)})")
    io_utils.save_model_atomic(model, os.path.join(config.model_dir, "model.keras"))
    metrics = {
        "dataset": dataset.name,
        "full_macs": model.full_macs,
        "strategy": config.strategy,
        "replicas": strategy.num_replicas_in_sync,
        "stage_seconds": {s: r["seconds"] for s, r in progress["stages"].items()},
        "history": history,
        "schedule_step": int(model._schedule_step.numpy()),
        "agent_updates": int(model._agent_updates.numpy()),
    }
    if selection:
        metrics["knob_select"] = {"best_epoch": selection["best_epoch"], "accuracy": selection["accuracy"],
                                  "history": selection["history"]}
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
    io_utils.write_json(metrics_path, metrics)
    progress["complete"] = True
    io_utils.write_json(progress_path, progress)
    print(f"rnp_tf.train: wrote {config.model_dir}")
    return metrics


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    try:
        config = config_from_flags(flags.FLAGS)
        if config.cpu_devices:
            distribute.configure_cpu_devices(config.cpu_devices)
        strategy = distribute.get_strategy(config.strategy, config.tpu)
        dataset, model = prepare(config, strategy)
        resume = resume_point(config, model, strategy)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    run(config, dataset, model, strategy=strategy, resume=resume)


def _fail(message):
    validation.exit_with_error("rnp_tf.train", message)


if __name__ == "__main__":
    define_flags()
    app.run(main)
