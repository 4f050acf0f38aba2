"""Keras callbacks of rnp_tf, and the resumable training state they write.

- `AtomicCheckpoint`: a `.keras` model file per epoch (for people: load it
  with `keras.models.load_model`).
- `ResumableCheckpoint`: the complete training state per epoch (every model
  variable, including the schedule counters and epsilon, and both
  optimizers' variables), atomically, with a manifest of sizes and SHA-256
  digests so that a truncated or foreign checkpoint is reported, never
  loaded. `write_training_state` / `read_training_state` do the work.
- `EpochSeeder`: sets every random seed at the start of each epoch from
  `(seed, stage, epoch)`, so that an epoch's random draws do not depend on
  whether the process was restarted before it.
- `CompactProgressBar`: the progress bar without the per-action columns.
- `BestKnobWeights`: keeps the epoch whose validation accuracy, averaged
  over several run-time budgets, is best (early-stopping style selection
  for a model used at many operating points).

Why not `keras.callbacks.BackupAndRestore`? Measured with Keras 3.15: its
`model.save_weights` does cover both optimizers (`optimizer` and
`agent_optimizer`), but not the LSTM's seed-generator state, it writes the
weights file and then the epoch number without atomicity (a kill between the
two resumes the wrong epoch; a kill during the write leaves a truncated
file), and it neither detects a corrupt file nor a different configuration.
A plain `tf.train.Checkpoint(model=model)` is worse: it silently misses
every layer held in a Python list (the gated convs, the head, the agent's
encoders), so the state here is checkpointed as explicit variable lists.
"""

import os

import keras
import numpy as np

from rnp_tf import io_utils
from rnp_tf import validation

STATE_PREFIX = "state"
MANIFEST = "manifest.json"
_FORMAT = 1


class CheckpointError(ValueError):
    """A training-state checkpoint that is missing, corrupt or from another model."""


def derive_seed(seed, *keys):
    """A 31-bit seed derived from `seed` and integer `keys` (stage, epoch, ...).

    Example:

    >>> derive_seed(0, 2, 5) == derive_seed(0, 2, 5) != derive_seed(0, 2, 6)
    True
    """
    return int(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(1)[0] >> 1)


def state_groups(model, optimizers=True):
    """The variables a training checkpoint holds, as named lists.

    `model`: `model.variables` (weights, BatchNorm statistics, the schedule
    counters `schedule_step` / `agent_updates`, `epsilon`, seed-generator
    states; not the metrics, which restart every epoch). With `optimizers`:
    `optimizer` and, for an `RNPModel`, `agent_optimizer` (their iteration
    counters, learning rates and slots).
    """
    groups = {"model": list(model.variables)}
    if optimizers:
        if getattr(model, "optimizer", None) is None:
            raise ValueError("The model must be compiled to checkpoint its optimizers.")
        groups["optimizer"] = list(model.optimizer.variables)
        agent_optimizer = getattr(model, "agent_optimizer", None)
        if agent_optimizer is not None:
            groups["agent_optimizer"] = list(agent_optimizer.variables)
    return groups


def _describe(variables):
    return [[v.path, [int(d) for d in v.shape], str(np.dtype(v.dtype))] for v in variables]


def _sha256(path):
    return io_utils.sha256_file(path)


def write_training_state(model, path, optimizers=True, extra=None):
    """Writes the model's (and optimizers') variables to directory `path`, atomically.

    The checkpoint is written into a hidden temporary directory, then a
    `manifest.json` (variable paths, shapes and dtypes; size and SHA-256 of
    every file; `extra`) and the directory is renamed into place: a crash
    leaves either the previous state or the new one, never a mix.

    Args:
        model: a built (and, with `optimizers`, compiled) Keras model.
        path: destination directory (its parent must exist).
        optimizers: also save the optimizers' variables.
        extra: JSON-serialisable dict stored in the manifest.

    Returns:
        The manifest dict.

    Example:

    >>> write_training_state(model, "/tmp/run/state/rnp-0003", extra={"epoch": 3})
    """
    import tensorflow as tf

    groups = state_groups(model, optimizers)
    manifest = {
        "format": _FORMAT,
        "groups": {name: _describe(variables) for name, variables in groups.items()},
        "extra": extra or {},
    }

    def write(tmp):
        from absl import logging as absl_logging

        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.WARNING)  # the saver logs an INFO line per write
        try:
            tf.train.Checkpoint(**groups).write(os.path.join(tmp, STATE_PREFIX))
        finally:
            absl_logging.set_verbosity(verbosity)
        manifest["files"] = {
            name: {"size": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256(os.path.join(tmp, name))}
            for name in sorted(os.listdir(tmp))
        }
        io_utils.write_json(os.path.join(tmp, MANIFEST), manifest)

    io_utils.atomic_write(path, write, directory=True)
    return manifest


def read_manifest(path):
    """Reads and checks a checkpoint directory's manifest and files.

    Raises:
        CheckpointError: one line naming the missing, truncated or altered file.
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is missing.")
    try:
        manifest = io_utils.read_json(manifest_path)
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: its {MANIFEST} is unreadable ({error}).")
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT or "files" not in manifest:
        raise CheckpointError(f"checkpoint {path} is corrupt or of an unknown format (bad {MANIFEST}).")
    for name, expected in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing.")
        size = os.path.getsize(file)
        if size != expected["size"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {size} bytes, {expected['size']} were written (truncated?)."
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its SHA-256 digest.")
    return manifest


def read_training_state(model, path, optimizers=True):
    """Restores what `write_training_state` wrote into `model` (and its optimizers).

    The manifest is checked first (every file's size and digest, then every
    variable's shape and dtype against the model's), so a corrupt checkpoint
    or one of another model is reported and nothing is assigned.

    Args:
        model: a model built like the one that wrote the checkpoint (and,
            with `optimizers`, compiled with the same optimizers).
        path: the checkpoint directory.
        optimizers: also restore the optimizers (the checkpoint must hold them).

    Returns:
        The manifest's `extra` dict.

    Raises:
        CheckpointError: one line saying what is wrong.

    Example:

    >>> read_training_state(model, "/tmp/run/state/rnp-0003")["epoch"]
    3
    """
    import tensorflow as tf

    manifest = read_manifest(path)
    groups = state_groups(model, optimizers)
    for name, variables in groups.items():
        saved = manifest["groups"].get(name)
        if saved is None:
            raise CheckpointError(f"checkpoint {path} holds no {name} state.")
        current = _describe(variables)
        if len(saved) != len(current):
            raise CheckpointError(
                f"checkpoint {path} was written by another model: {len(saved)} {name} variables, "
                f"the flags build {len(current)}."
            )
        for (saved_path, saved_shape, saved_dtype), (now_path, now_shape, now_dtype) in zip(saved, current):
            if saved_shape != now_shape or saved_dtype != now_dtype:
                raise CheckpointError(
                    f"checkpoint {path} was written by another model: {name} variable {saved_path} is "
                    f"{saved_dtype}{saved_shape} there, {now_path} is {now_dtype}{now_shape} here."
                )
    try:
        status = tf.train.Checkpoint(**groups).read(os.path.join(path, STATE_PREFIX))
        status.assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({message}).")
    status.expect_partial()
    return manifest.get("extra", {})


class ResumableCheckpoint(keras.callbacks.Callback):
    """Writes the full training state after every epoch (see `write_training_state`).

    Each epoch writes `{directory}/{stage}-{epoch:04d}/`; then
    `on_saved(name, epochs_done, logs)` is called (the training CLI records
    the checkpoint in its `progress.json` there and deletes older ones).

    Args:
        directory: existing directory for the checkpoints.
        stage: name prefix (the training stage).
        on_saved: optional callable `(name, epochs_done, logs)`.
        write: False on non-chief workers of a multi-worker run: they only
            call `on_saved`.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[ResumableCheckpoint("run/state", "rnp")])
    """

    def __init__(self, directory, stage, on_saved=None, write=True):
        super().__init__()
        if write and not os.path.isdir(directory):
            raise FileNotFoundError(f"Checkpoint directory does not exist. Received: directory={directory!r}")
        self.directory = directory
        self.stage = stage
        self.on_saved = on_saved
        self.write = bool(write)

    def on_epoch_end(self, epoch, logs=None):
        name = f"{self.stage}-{epoch + 1:04d}"
        if self.write:
            write_training_state(
                self.model, os.path.join(self.directory, name), extra={"stage": self.stage, "epoch": epoch + 1}
            )
        if self.on_saved is not None:
            self.on_saved(name, epoch + 1, dict(logs or {}))


class EpochSeeder(keras.callbacks.Callback):
    """Seeds every random generator at each epoch from `(seed, stage, epoch)`.

    `keras.utils.set_random_seed(derive_seed(seed, stage, epoch))` at every
    epoch start; with `rebuild=True` the model's train function is also
    rebuilt, because TensorFlow's stateful random ops inside a compiled step
    keep their own position that no seed resets and no checkpoint holds. A
    run resumed at epoch e then draws exactly the random numbers an
    uninterrupted run draws in epoch e, at the cost of re-tracing each
    training phase once per epoch (seconds).

    Args:
        seed: the run's seed.
        stage: an integer identifying the training stage.
        rebuild: rebuild the train function at each epoch.
    """

    def __init__(self, seed, stage, rebuild=True):
        super().__init__()
        self.seed = int(seed)
        self.stage = int(stage)
        self.rebuild = bool(rebuild)

    def on_epoch_begin(self, epoch, logs=None):
        keras.utils.set_random_seed(derive_seed(self.seed, self.stage, epoch))
        if self.rebuild:
            self.model.make_train_function(force=True)


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the model after every epoch, atomically, and records the latest.

    Each epoch writes `{directory}/{prefix}-{epoch:03d}.keras` through a
    temporary file and a rename, then rewrites `{directory}/latest.json`
    (also atomically) to point at it, so a crash at any moment leaves the
    previous checkpoint as the latest, never a half-written file. Only the
    newest `keep` checkpoints of this prefix are kept.

    Args:
        directory: an existing directory for the checkpoints.
        prefix: file name prefix, e.g. the training stage. Defaults to
            `"epoch"`.
        keep: how many checkpoints of this prefix to keep. Defaults to 2.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[AtomicCheckpoint("ckpt/checkpoints")])
    """

    def __init__(self, directory, prefix="epoch", keep=2):
        super().__init__()
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Checkpoint directory does not exist. Received: directory={directory!r}")
        if keep < 1:
            raise ValueError(f"`keep` must be >= 1. Received: keep={keep}")
        self.directory = directory
        self.prefix = prefix
        self.keep = int(keep)
        # Files of this prefix from an earlier (interrupted) run count too.
        self.saved = sorted(
            os.path.join(directory, name)
            for name in os.listdir(directory)
            if name.startswith(f"{prefix}-") and name.endswith(".keras") and name[len(prefix) + 1 : -6].isdigit()
        )

    def on_epoch_end(self, epoch, logs=None):
        name = f"{self.prefix}-{epoch + 1:03d}.keras"
        path = os.path.join(self.directory, name)
        io_utils.save_model_atomic(self.model, path)
        if path in self.saved:
            self.saved.remove(path)
        io_utils.write_json(
            os.path.join(self.directory, "latest.json"),
            {"checkpoint": name, "prefix": self.prefix, "epoch": epoch + 1},
        )
        self.saved.append(path)
        while len(self.saved) > self.keep:
            old = self.saved.pop(0)
            if os.path.exists(old):
                os.remove(old)


class CompactProgressBar(keras.callbacks.Callback):
    """Keras progress bar without the per-action share columns.

    The shares (`share_l{t}_a{a}`) stay in the History, TensorBoard and
    `metrics.json`; only the console line is kept short. Use with
    `model.fit(..., verbose=0, callbacks=[CompactProgressBar()])`.

    Args:
        verbose: 1 for a progress bar, 2 for one line per epoch.
        hide: prefixes of the log keys not shown. Defaults to `("share_",)`.

    Example:

    >>> model.fit(ds, epochs=2, verbose=0, callbacks=[CompactProgressBar()])
    """

    def __init__(self, verbose=1, hide=("share_", "val_share_")):
        super().__init__()
        self.verbose = verbose
        self.hide = tuple(hide)
        self._bar = None
        self._seen = 0

    def _shown(self, logs):
        return [(k, v) for k, v in (logs or {}).items() if not k.startswith(self.hide)]

    def on_epoch_begin(self, epoch, logs=None):
        if self.verbose:
            print(f"Epoch {epoch + 1}/{self.params.get('epochs')}")
        # Made here, not at the first update, so that its clock (the epoch's
        # time and the time per step it prints) starts with the epoch.
        self._bar = keras.utils.Progbar(self.params.get("steps"), verbose=self.verbose) if self.verbose else None
        self._seen = 0

    def _update(self, logs, finalize):
        values = self._shown(logs)
        self._bar.stateful_metrics = {k for k, _ in values}  # Keras' logs are already epoch means
        self._bar.update(self._seen, values=values, finalize=finalize)

    def on_train_batch_end(self, batch, logs=None):
        self._seen = batch + 1
        if self.verbose == 1:
            self._update(logs, finalize=False)

    def on_epoch_end(self, epoch, logs=None):
        if self.verbose:
            self._update(logs, finalize=True)


class BestKnobWeights(keras.callbacks.Callback):
    """Keeps the weights whose validation accuracy over the run-time knob is best.

    A model trained for its run-time knob (`RNPModel.set_budget`) serves
    many operating points, and Algorithm 1's alternating agent and backbone
    phases move its accuracy at any one of them by points from epoch to
    epoch. At the end of every epoch this callback calibrates the knob on
    the validation images, sets each of `budgets` there (`set_budget(b, x)`),
    measures the validation accuracy at each, and keeps a copy of all
    weights when their mean is the best so far; at the end of training it
    restores that copy, as `keras.callbacks.EarlyStopping(
    restore_best_weights=True)` does for one metric. The model's knob
    setting and calibration are left as they were before each measurement.

    Args:
        x: validation images (numpy, `[n, height, width, channels]`).
        y: their integer labels, `[n]`.
        budgets: mean compute fractions, each in (0, 1], to average over.
            Defaults to `(0.12, 0.2, 0.33, 0.55, 0.8)`: from about the
            cheapest setting of a CIFAR-10 `cifar_cnn` (a budget below a
            model's cheapest setting measures that setting) to nearly full
            width. Without the cheapest one the kept epoch can be worse
            there by points (README, "One model, many operating points").
        restore: restore the best weights when training ends. Defaults to
            True; with False they stay in `best_weights`.
        path: optional `.npz` file that holds the selection (history, best
            epoch and weights), written atomically after every epoch and
            read back when training begins, so a resumed run
            (`initial_epoch > 0`) continues the selection of the
            interrupted one. A repeated epoch replaces its history entry.
            Load the kept weights with `BestKnobWeights.read(path)`.

    Attributes:
        history: one dict per epoch: `epoch`, `accuracy` (the mean) and
            `by_budget` (budget -> accuracy).
        best_epoch: the epoch (0-based) of the kept weights.
        best_weights: the kept weights (`model.get_weights()` order).

    Example:

    >>> best = BestKnobWeights(x_val, y_val)
    >>> model.fit(data.train, epochs=6, callbacks=[best])
    >>> best.best_epoch, best.history[-1]["accuracy"]
    """

    def __init__(self, x, y, budgets=(0.12, 0.2, 0.33, 0.55, 0.8), restore=True, path=None):
        super().__init__()
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        if x.ndim != 4 or len(x) != len(y) or not len(y):
            raise ValueError(
                f"`x` must be [n, height, width, channels] images with one label each in `y`. "
                f"Received: x.shape={x.shape}, y.shape={y.shape}"
            )
        if isinstance(budgets, str) or not np.iterable(budgets) or not len(budgets):
            raise ValueError(f"`budgets` must be compute fractions in (0, 1]. Received: budgets={budgets!r}")
        budgets = tuple(validation.check_float("budgets", b, 0.0, 1.0, low_open=True) for b in budgets)
        self.x, self.y, self.budgets, self.restore = x, y, budgets, bool(restore)
        self.path = None if path is None else os.fspath(path)
        if self.path is not None and not self.path.endswith(".npz"):
            raise ValueError(f"`path` must name a .npz file. Received: path={self.path!r}")
        self.history, self.best_epoch, self.best_weights = [], None, None
        self._best = -np.inf

    @staticmethod
    def read(path):
        """Reads a selection written with `path`.

        Args:
            path: the `.npz` file.

        Returns:
            A dict `history`, `best_epoch`, `accuracy` (the best mean) and
            `weights` (`model.get_weights()` order).

        Raises:
            ValueError: the file is missing, truncated or not a selection.

        Example:

        >>> model.set_weights(BestKnobWeights.read("ckpt/knob_select.npz")["weights"])
        """
        import json
        import zipfile

        try:
            with np.load(path) as stored:
                state = json.loads(str(stored["state"]))
                weights = [stored[f"w{i}"] for i in range(state["num_weights"])]
            state["history"] = [{**h, "by_budget": {float(b): a for b, a in h["by_budget"].items()}}
                                for h in state["history"]]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"Cannot read the knob selection {path!r} ({error}). Received: path={path!r}")
        return {"history": state["history"], "best_epoch": state["best_epoch"], "accuracy": state["accuracy"],
                "weights": weights}

    def _write(self):
        import json

        state = json.dumps({"history": self.history, "best_epoch": self.best_epoch, "accuracy": self._best,
                            "num_weights": len(self.best_weights)})
        arrays = {f"w{i}": w for i, w in enumerate(self.best_weights)}
        io_utils.atomic_write(self.path, lambda tmp: np.savez(tmp, state=np.array(state), **arrays), keep_suffix=True)

    def on_train_begin(self, logs=None):
        self.history, self.best_epoch, self.best_weights, self._best = [], None, None, -np.inf
        if self.path and os.path.exists(self.path):
            kept = self.read(self.path)
            self.history, self.best_epoch, self.best_weights = kept["history"], kept["best_epoch"], kept["weights"]
            self._best = kept["accuracy"]

    def on_epoch_end(self, epoch, logs=None):
        from rnp_tf.evaluation import budget_points

        model = self.model
        points = budget_points(model, self.budgets, self.x, self.x, self.y)
        by_budget = {p["budget"]: p["accuracy"] for p in points}
        accuracy = float(np.mean(list(by_budget.values())))
        self.history = [h for h in self.history if h["epoch"] < epoch]
        self.history.append({"epoch": epoch, "accuracy": accuracy, "by_budget": by_budget})
        if accuracy > self._best:
            self._best, self.best_epoch, self.best_weights = accuracy, epoch, model.get_weights()
        if self.path:
            self._write()

    def on_train_end(self, logs=None):
        if self.restore and self.best_weights is not None:
            self.model.set_weights(self.best_weights)
