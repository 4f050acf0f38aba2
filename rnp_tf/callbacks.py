"""Keras callbacks of rnp_tf."""

import os

import keras

from rnp_tf import io_utils


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
        self.saved = []

    def on_epoch_end(self, epoch, logs=None):
        name = f"{self.prefix}-{epoch + 1:03d}.keras"
        path = os.path.join(self.directory, name)
        io_utils.save_model_atomic(self.model, path)
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
        self._bar = None
        self._seen = 0

    def _update(self, logs, finalize):
        values = self._shown(logs)
        if self._bar is None:
            self._bar = keras.utils.Progbar(
                self.params.get("steps"), verbose=self.verbose, stateful_metrics=[k for k, _ in values]
            )
        self._bar.update(self._seen, values=values, finalize=finalize)

    def on_train_batch_end(self, batch, logs=None):
        self._seen = batch + 1
        if self.verbose == 1:
            self._update(logs, finalize=False)

    def on_epoch_end(self, epoch, logs=None):
        if self.verbose:
            self._update(logs, finalize=True)
