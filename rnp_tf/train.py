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
import os

from absl import flags

from rnp_tf import data as data_lib
from rnp_tf import distribute
from rnp_tf import io_utils
from rnp_tf import resume
from rnp_tf import run_config
from rnp_tf import trainer
from rnp_tf import validation
from rnp_tf.run_config import TrainConfig


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
        "backbone", d.backbone, run_config.BACKBONE_CHOICES,
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
    flags.DEFINE_integer(
        "num_classes", None,
        "Number of classes C; the labels must be ids 0..C-1 (default: from the data; a value that disagrees with "
        "the data is an error).", lower_bound=2, **fv,
    )
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: one pass).", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", d.seed, "Random seed.", **fv)
    flags.DEFINE_string(
        "init_checkpoint", None, "A .keras RNPModel whose weights initialise the model (skips no stage).", **fv
    )
    flags.DEFINE_enum("optimizer", d.optimizer, run_config.OPTIMIZERS, "Optimizer of the backbone stages.", **fv)
    flags.DEFINE_enum("agent_optimizer", d.agent_optimizer, run_config.OPTIMIZERS, "Optimizer of the agent.", **fv)
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
        f"these mean compute fractions (at most {trainer.SELECT_MAX_IMAGES} validation images) and keep the epoch "
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
    """Validates the parsed flags and returns a `TrainConfig` (`rnp_tf.run_config.make_config`).

    Args:
        flag_values: parsed `absl.flags.FlagValues`.

    Returns:
        A `TrainConfig`.

    Raises:
        ValueError: with one line naming the bad flag.
    """
    return run_config.make_config(**{f.name: getattr(flag_values, f.name) for f in dataclasses.fields(TrainConfig)})


def check_outputs(config):
    """Proves that `--model_dir` and its checkpoint folders can be created and written.

    Nothing is left behind (`rnp_tf.io_utils.check_writable_dir`): the run
    creates them when it starts writing.

    Args:
        config: a `TrainConfig`.

    Raises:
        ValueError: one line naming `--model_dir` and the folder.
    """
    for folder in (None, "checkpoints", resume.STATE_DIR):
        path = os.path.join(config.model_dir, folder) if folder else config.model_dir
        io_utils.check_writable_dir(path, "--model_dir")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
    try:
        config = config_from_flags(flags.FLAGS)
        check_outputs(config)
        if config.cpu_devices:
            distribute.configure_cpu_devices(config.cpu_devices)
        strategy = distribute.get_strategy(config.strategy, config.tpu)
        dataset, model = trainer.prepare(config, strategy)
        point = resume.resume_point(config, model, strategy)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    trainer.run(config, dataset, model, strategy=strategy, resume=point)


def _fail(message):
    validation.exit_with_error("rnp_tf.train", message)


if __name__ == "__main__":
    validation.run_cli("rnp_tf.train", main, define_flags)
