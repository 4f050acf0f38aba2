"""The settings of a training run: `TrainConfig` and its validation.

`make_config(**values)` checks every setting that can be checked before any
data is read (paths, names, ranges, combinations, that `--groups` fits the
backbone) and returns a `TrainConfig`. The errors are one-line `ValueError`s
naming the flag of `python -m rnp_tf.train` the setting comes from.

Example:

>>> config = make_config(model_dir="/tmp/rnp", rnp_epochs=1, widths=["16", "32", "32", "32"])
>>> config.widths
(16, 32, 32, 32)
"""

import dataclasses
import math
import os

from rnp_tf import data as data_lib
from rnp_tf import validation

BACKBONE_CHOICES = ("cifar_cnn", "vgg_cifar", "vgg16", "resnet50")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
# Numeric settings: (low, high, low_open); every one must also be finite.
FLOAT_RANGES = {
    "width_multiplier": (0.01, math.inf, False),
    "validation_split": (0.0, 0.9, False),
    "pretrain_lr": (0.0, math.inf, False),
    "robust_lr": (0.0, math.inf, False),
    "backbone_lr": (0.0, math.inf, False),
    "agent_lr": (0.0, math.inf, False),
    "epsilon_start": (0.0, 1.0, False),
    "epsilon_end": (0.0, 1.0, False),
    "penalty": (-math.inf, 0.0, False),
    "alpha": (0.0, math.inf, True),
    "gamma": (0.0, 1.0, False),
    "full_width_fraction": (0.0, 1.0, False),
}
POSITIVE_INTS = ("groups", "batch_size", "max_train_examples", "steps_per_epoch", "agent_units", "agent_embed_dim",
                 "cpu_devices", "num_classes")
OPTIONAL = ("alpha", "max_train_examples", "steps_per_epoch", "cpu_devices", "num_classes")  # None: not set
NON_NEGATIVE_INTS = ("seed", "pretrain_epochs", "robust_epochs", "rnp_epochs", "agent_steps", "backbone_steps",
                     "epsilon_decay_steps")


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
    num_classes: int | None = None
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


def make_config(**values):
    """Validates training settings and returns the `TrainConfig` they describe.

    Nothing is read but the file system's answer to "does this path
    exist". The list settings may be given as strings (as absl's list
    flags hold them) or numbers.

    Args:
        **values: `TrainConfig` fields; `widths`, `backbone_penalty_range`
            and `select_budgets` as sequences (empty: the default).

    Returns:
        A `TrainConfig`.

    Raises:
        ValueError: with one line naming the bad flag.
    """
    v = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "model_dir"}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(
            f"Unknown training setting(s) {', '.join(unknown)}. Received: {unknown[0]}={values[unknown[0]]!r}"
        )
    v.update(values)
    _check_numbers(v)
    model_dir = v.get("model_dir")
    if not model_dir:
        raise ValueError("--model_dir is required (where the model, checkpoints and reports go).")
    parent = os.path.dirname(os.path.abspath(model_dir))
    if not os.path.isdir(parent):
        raise ValueError(f"--model_dir: the parent directory {parent!r} does not exist.")
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ValueError(f"--model_dir: {model_dir!r} exists and is not a directory.")
    dataset = v["dataset"]
    known = isinstance(dataset, str) and (
        dataset == "digits" or dataset.startswith("npz:") or dataset in data_lib.TFDS_DATASETS
    )
    if not known:
        raise ValueError(
            f"--dataset: unknown dataset {dataset!r}; use 'digits', 'npz:PATH' or one of "
            f"{', '.join(data_lib.TFDS_DATASETS)}."
        )
    try:
        widths = tuple(int(w) for w in v["widths"])
    except (TypeError, ValueError):
        raise ValueError(f"--widths must be integers. Received: --widths={_joined(v['widths'])}")
    if v["backbone"] == "cifar_cnn" and (len(widths) != 4 or min(widths) < 1):
        raise ValueError(f"--widths must list 4 positive channel counts. Received: --widths={_joined(v['widths'])}")
    if dataset.startswith("npz:") and not os.path.isfile(dataset[len("npz:"):].strip()):
        raise ValueError(f"--dataset: no such file {dataset[len('npz:'):].strip()!r}. Received: --dataset={dataset}")
    if v["init_checkpoint"] and not os.path.isfile(v["init_checkpoint"]):
        raise ValueError(f"--init_checkpoint: no such file {v['init_checkpoint']!r}.")
    if v["epsilon_end"] > v["epsilon_start"]:
        raise ValueError(
            f"--epsilon_end ({v['epsilon_end']}) must not exceed --epsilon_start ({v['epsilon_start']})."
        )
    if v["rnp_epochs"] and v["agent_steps"] == 0 and v["backbone_steps"] == 0:
        raise ValueError("--agent_steps and --backbone_steps cannot both be 0 when --rnp_epochs > 0.")
    if v["tpu"] and v["strategy"] != "tpu":
        raise ValueError(f"--tpu is only used with --strategy=tpu. Received: --strategy={v['strategy']}")
    if v["backbone"] == "resnet50" and v["width_multiplier"] != 1.0:
        raise ValueError(
            "--width_multiplier scales --backbone=vgg16 and vgg_cifar only. "
            f"Received: --width_multiplier={v['width_multiplier']}"
        )
    _check_backbone_weights(v)
    spread = _checked_penalty_range(v["backbone_penalty_range"])
    select = _checked_select_budgets(v["select_budgets"], v["validation_split"], v["rnp_epochs"])
    config = TrainConfig(**{**v, "widths": widths, "backbone_penalty_range": spread, "select_budgets": select})
    _check_backbone(config)
    return config


def _check_numbers(v):
    """Every numeric setting is a finite number in its range (NaN, inf, text and bools are refused)."""
    given = {name: value for name, value in v.items() if value is not None or name not in OPTIONAL}
    for name, (low, high, low_open) in FLOAT_RANGES.items():
        if name in given:
            validation.check_float(f"--{name}", v[name], low, high, low_open=low_open)
    for name in POSITIVE_INTS:
        if name in given:
            validation.check_positive_int(f"--{name}", v[name])
    for name in NON_NEGATIVE_INTS:
        validation.check_non_negative_int(f"--{name}", v[name])
    if v["num_classes"] is not None and (isinstance(v["num_classes"], bool) or v["num_classes"] in (0, 1)):
        raise ValueError(f"--num_classes must be at least 2. Received: --num_classes={v['num_classes']!r}")
    if isinstance(v["verbose"], bool) or v["verbose"] not in (0, 1, 2):
        raise ValueError(f"--verbose must be 0, 1 or 2. Received: --verbose={v['verbose']!r}")


def _check_backbone_weights(v):
    """`--backbone_weights`: only for the full VGG-16, alone, 'imagenet' or an existing file."""
    weights = v["backbone_weights"]
    if weights == "none":
        return
    if v["backbone"] != "vgg16":
        raise ValueError(f"--backbone_weights={weights} needs --backbone=vgg16. Received: --backbone={v['backbone']}")
    if v["width_multiplier"] != 1.0:
        raise ValueError(
            f"--backbone_weights needs the full VGG-16 (--width_multiplier=1). Received: {v['width_multiplier']}"
        )
    if v["init_checkpoint"]:
        raise ValueError("--backbone_weights and --init_checkpoint both initialise the model; pass one.")
    if weights != "imagenet" and not os.path.isfile(weights):
        raise ValueError(
            f"--backbone_weights must be 'imagenet', 'none' or an existing weights file. Received: {weights!r}"
        )


def _checked_penalty_range(values):
    """`--backbone_penalty_range` as `(p_min, p_max)`, or None when not given."""
    if not values:
        return None
    spread = _floats(values)
    if len(spread) != 2 or not all(math.isfinite(p) for p in spread) or not spread[0] < spread[1]:
        raise ValueError(
            "--backbone_penalty_range must be p_min,p_max, finite, with p_min < p_max. "
            f"Received: --backbone_penalty_range={_joined(values)}"
        )
    return spread


def _checked_select_budgets(values, validation_split, rnp_epochs):
    """`--select_budgets` as a tuple of compute fractions, or None when not given."""
    if not values:
        return None
    select = _floats(values)
    if not select or not all(0.0 < b <= 1.0 for b in select):
        raise ValueError(
            f"--select_budgets must be compute fractions in (0, 1]. Received: --select_budgets={_joined(values)}"
        )
    if not validation_split or not rnp_epochs:
        raise ValueError(
            "--select_budgets picks an Algorithm 1 epoch on validation images: it needs --validation_split > 0 "
            f"and --rnp_epochs > 0. Received: --validation_split={validation_split}, --rnp_epochs={rnp_epochs}"
        )
    return select


def _joined(values):
    """A list setting as it is written on the command line."""
    return ",".join(str(value) for value in values)


def _floats(values):
    """The list flag's values as a tuple of floats, or `()` when one is not a number."""
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return ()


def backbone_spec(config):
    """The backbone description (`rnp_tf.backbones`) a config trains.

    Args:
        config: a `TrainConfig`.

    Returns:
        A list of stage specs.
    """
    from rnp_tf import backbones

    if config.backbone == "cifar_cnn":
        return backbones.cifar_cnn(config.widths)
    if config.backbone == "resnet50":
        return backbones.resnet50()
    if config.backbone == "vgg_cifar":
        return backbones.vgg_cifar(max(1, int(round(48 * config.width_multiplier))))
    return backbones.vgg16(width_multiplier=config.width_multiplier)


def _check_backbone(config):
    """Raises a ValueError naming `--groups` when it does not fit the backbone."""
    from rnp_tf import backbones

    try:
        backbones.validate_backbone(backbone_spec(config), config.groups)
    except ValueError as error:
        raise ValueError(f"--groups={config.groups} does not fit --backbone={config.backbone}: {error}")
