"""The input of a training run: the dataset a config names, as streams for `model.fit`.

`training_input` positions a stage's training stream at any epoch, so a
resumed run reads what an uninterrupted one would; `validation_input` is the
validation split prepared for the run's strategy.

Example:

>>> dataset = load_config_dataset(config)  # config: a TrainConfig
>>> stream, steps = training_input(config, tf.distribute.get_strategy(), 0, dataset)
"""

import math

from rnp_tf import data as data_lib
from rnp_tf import distribute


def load_config_dataset(config):
    """Loads the dataset a config names (`rnp_tf.data.load_dataset`).

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.

    Returns:
        An `rnp_tf.data.Dataset`.
    """
    return data_lib.load_dataset(
        config.dataset,
        batch_size=config.batch_size,
        validation_split=config.validation_split,
        augment=config.augment,
        tfds_data_dir=config.tfds_data_dir,
        seed=config.seed,
        max_train_examples=config.max_train_examples,
        num_classes=config.num_classes,
    )


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
        config: a `rnp_tf.run_config.TrainConfig`.
        strategy: the run's strategy.
        start_epoch: the first epoch to train.
        dataset: a freshly loaded dataset to use (default: load one).

    Returns:
        `(stream, steps_per_epoch)`.
    """
    dataset = dataset or load_config_dataset(config)
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
    return stream.with_options(_options(config, strategy)), steps


def validation_input(config, dataset, strategy):
    """The validation split for `model.fit`, or None when there is none.

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.
        dataset: the loaded `rnp_tf.data.Dataset`.
        strategy: the run's strategy.

    Returns:
        A `tf.data.Dataset` or None.
    """
    import tensorflow as tf

    validation = dataset.validation
    if validation is None:
        return None
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:  # an empty per-replica batch trips oneDNN's conv (FINDINGS.md)
        validation = validation.filter(lambda x, y: tf.shape(x)[0] >= replicas)
    return validation.with_options(_options(config, strategy))


def _options(config, strategy):
    """The `tf.data.Options` of the run's streams (`distribute.distribute_options`)."""
    in_memory = config.dataset not in data_lib.TFDS_DATASETS
    return distribute.distribute_options(strategy, in_memory)
