"""Dataset loading for Runtime Neural Pruning, as `tf.data` pipelines.

`load_dataset()` turns a dataset name into a `Dataset`: batched, normalised
`tf.data.Dataset`s for training, testing and (optionally) validation, plus the
metadata the models and reports need (number of classes, input shape, class
names, normalisation constants).

Three kinds of names are accepted:

1. `"digits"`: the 8x8 handwritten digits bundled with scikit-learn
   (`sklearn.datasets.load_digits`, 1797 images, no download). Pixels are
   0..16 and are scaled to [0, 1] by dividing by 16. The 80% / 20%
   train / test split is stratified and fixed (`random_state=0`): it does not
   depend on `seed`, so test accuracies are comparable across runs.
2. `"npz:PATH"`: a `.npz` archive holding `x_train, y_train, x_test, y_test`
   (the layout of Keras' `mnist.npz`). Images are `uint8` (0..255) or floats
   in [0, 1], shaped `(N, H, W)` (grey-scale) or `(N, H, W, C)`; labels are
   integer class ids. Class names are read from the `class_names` key of a
   `.json` file next to the archive (same stem) when there is one.
3. A TensorFlow Datasets name: `"cifar10"`, `"cifar100"`, `"mnist"`,
   `"fashion_mnist"` or `"imagenet2012"`. The data must already be prepared
   in `tfds_data_dir` (nothing is downloaded; see `load_dataset()`).

Normalisation: images are scaled to [0, 1] and then standardised per channel,
`x_norm = (x / 255 - mean) / std` for `uint8` data. For `"digits"` and
`"npz:..."` datasets `mean` and `std` are computed from the training split
(the part left after holding out the validation set). For TFDS datasets the
usual published constants are used:

| dataset        | mean                     | std                      |
| -------------- | ------------------------ | ------------------------ |
| cifar10        | 0.4914, 0.4822, 0.4465   | 0.2470, 0.2435, 0.2616   |
| cifar100       | 0.5071, 0.4865, 0.4409   | 0.2673, 0.2564, 0.2762   |
| mnist          | 0.1307                   | 0.3081                   |
| fashion_mnist  | 0.2860                   | 0.3530                   |
| imagenet2012   | 0.485, 0.456, 0.406      | 0.229, 0.224, 0.225      |

Example:

```python
from rnp_tf import data

ds = data.load_dataset("digits", batch_size=64, validation_split=0.1)
model.fit(ds.train, validation_data=ds.validation, epochs=10)
x_test, y_test = ds.test_arrays()
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
import zipfile
import zlib

import numpy as np
import tensorflow as tf

# Names accepted through TensorFlow Datasets.
TFDS_DATASETS = (
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "imagenet2012",
)

# Per-channel (mean, std) of images scaled to [0, 1], for TFDS datasets.
NORMALIZATION_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

IMAGENET_IMAGE_SIZE = 224
IMAGENET_RESIZE_SIZE = 256

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_MAX_CLASSES = 100_000

_ACCEPTED_FORMS = (
    "'digits' (scikit-learn's bundled 8x8 digits, no download), "
    "'npz:PATH' (a .npz with x_train, y_train, x_test, y_test, e.g. "
    "npz:../shared/data/fashion_mnist.npz), or a TensorFlow Datasets name "
    "prepared in --tfds_data_dir: " + ", ".join(TFDS_DATASETS)
)


@dataclasses.dataclass(eq=False)
class Dataset:
    """A loaded dataset: batched `tf.data` pipelines plus metadata.

    Every pipeline yields `(x, y)` batches, `x` float32 NHWC normalised
    images and `y` int32 class ids of shape `[batch]`.

    Attributes:
        train: Training batches, reshuffled every epoch (and augmented when
            requested).
        test: Test batches in a fixed order, neither shuffled nor augmented.
        validation: Batches held out from the training split, like `test`;
            `None` when `validation_split == 0`.
        num_classes: Number of classes.
        input_shape: Shape of one image, `(H, W, C)`.
        class_names: One name per class id.
        num_train: Number of training examples (one epoch).
        num_test: Number of test examples.
        num_validation: Number of validation examples (0 without validation).
        mean: Per-channel float32 mean, shape `(C,)`, of images in [0, 1].
        std: Per-channel float32 standard deviation, shape `(C,)`.
        name: The dataset name given to `load_dataset()`.

    Example:

    ```python
    ds = load_dataset("digits")
    for x, y in ds.train.take(1):
        print(x.shape, y.shape)  # (128, 8, 8, 1) (128,)
    ```
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    validation: tf.data.Dataset | None
    num_classes: int
    input_shape: tuple
    class_names: list[str]
    num_train: int
    num_test: int
    num_validation: int
    mean: np.ndarray
    std: np.ndarray
    name: str
    _test_arrays_cache: tuple | None = dataclasses.field(
        default=None, repr=False
    )

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the whole normalised test split as NumPy arrays.

        The arrays are computed once and cached (and read-only, copy them
        before modifying them in place). Beware that for `"imagenet2012"`
        this materialises all 50000 validation images (about 30 GB); iterate
        `test` instead.

        Returns:
            A tuple `(x, y)`: `x` float32 of shape `(num_test, H, W, C)`,
            `y` int32 of shape `(num_test,)`, in the order of `test`.

        Example:

        ```python
        x_test, y_test = load_dataset("digits").test_arrays()
        accuracy = np.mean(model.predict(x_test).argmax(-1) == y_test)
        ```
        """
        if self._test_arrays_cache is None:
            self._test_arrays_cache = _read_only(*_split_arrays(self.test, self.input_shape))
        return self._test_arrays_cache

    def validation_arrays(self, max_images=None) -> tuple[np.ndarray, np.ndarray]:
        """Returns the first `max_images` validation images and labels as NumPy arrays.

        Not cached; iteration stops once `max_images` are read.

        Args:
            max_images: how many images at most. Defaults to None (all).

        Returns:
            A tuple `(x, y)` as for `test_arrays`, in the order of
            `validation`.

        Raises:
            ValueError: the dataset was loaded without a validation split.

        Example:

        ```python
        x_val, y_val = load_dataset("digits", validation_split=0.1).validation_arrays(1000)
        ```
        """
        if self.validation is None:
            raise ValueError(
                f"Dataset {self.name!r} has no validation split; load it with validation_split > 0. "
                f"Received: num_validation={self.num_validation}"
            )
        return _split_arrays(self.validation, self.input_shape, max_images)

    def denormalize(self, x) -> np.ndarray:
        """Maps normalised images back to [0, 1] floats, for display.

        Args:
            x: Normalised images (NumPy array or tensor) whose last axis is
                the channel axis, e.g. one image `(H, W, C)` or a batch
                `(N, H, W, C)`.

        Returns:
            A float32 NumPy array of the same shape, `x * std + mean`
            clipped to [0, 1].

        Example:

        ```python
        x_test, _ = ds.test_arrays()
        plt.imshow(ds.denormalize(x_test[0]).squeeze(), cmap="gray")
        ```
        """
        x = np.asarray(x, dtype=np.float32)
        channels = self.mean.shape[0]
        if x.ndim == 0 or x.shape[-1] != channels:
            raise ValueError(
                f"denormalize() expects images whose last axis holds the "
                f"{channels} channel(s) of dataset {self.name!r}. "
                f"Received: x.shape={x.shape}"
            )
        return np.clip(x * self.std + self.mean, 0.0, 1.0).astype(np.float32)


def load_dataset(
    name: str,
    *,
    batch_size: int = 128,
    validation_split: float = 0.0,
    augment: bool = False,
    tfds_data_dir: str | None = None,
    seed: int = 0,
    shuffle_buffer: int = 10000,
    max_train_examples: int | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Loads a dataset as batched, normalised `tf.data` pipelines.

    TFDS datasets must already be prepared in `tfds_data_dir`: this function
    never downloads. On a machine with internet access, run
    `tfds build NAME --data_dir DIR` (for `imagenet2012` first put
    `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` into
    `DIR/downloads/manual/`), then copy `DIR` here.

    Preprocessing: `augment=True` pads small images by `max(1, min(H, W)//8)`
    pixels (reflect; 4 for 32x32), randomly crops them back and, for colour
    images (C == 3) only, flips them horizontally; training data only.
    `"imagenet2012"` always uses the standard ImageNet preprocessing:
    training images get a random-resized crop to 224x224 (area 8%-100%,
    aspect ratio 3/4-4/3) and a random horizontal flip, evaluation images are
    resized so that the shorter side is 256 and center-cropped to 224x224.
    All randomness (shuffling, augmentation) is derived from `seed`.

    Args:
        name: `"digits"`, `"npz:PATH"`, or one of `"cifar10"`, `"cifar100"`,
            `"mnist"`, `"fashion_mnist"`, `"imagenet2012"`.
        batch_size: Examples per batch; the last batch may be smaller.
        validation_split: Fraction in [0, 1) of the training split held out
            as `validation`. For `"digits"` / `"npz:..."` the held-out
            examples are the last ones of the training split shuffled with
            `seed`; for TFDS datasets they are the last examples of the
            `train` split (`train[-N:]`, independent of `seed`).
        augment: Whether to augment training images of small datasets (see
            above). Validation and test data are never augmented.
        tfds_data_dir: TFDS data directory (`None`: the TFDS default,
            `~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
        seed: Seed for the training shuffle order, the augmentation, the
            validation hold-out and the `max_train_examples` subset.
        shuffle_buffer: Size of the training shuffle buffer (capped at the
            number of training examples).
        max_train_examples: If set, keep only this many training examples
            (a `seed`-dependent subset for `"digits"` / `"npz:..."`, the
            first ones for TFDS datasets), for quick runs and tests.
        num_classes: If set, the number of classes `C`: the labels must be
            integer ids in `0..C-1`, and a dataset with a fixed number of
            classes (digits, TFDS, an `.npz` with class names) must have
            `C`. `None` (default): from the data (the largest id + 1 for an
            `.npz` without class names). Either way the training examples
            must hold at least two distinct classes.

    Returns:
        A `Dataset`.

    Example:

    ```python
    ds = load_dataset("npz:../shared/data/cifar10_subset.npz",
                      batch_size=64, augment=True, validation_split=0.1)
    print(ds.num_classes, ds.input_shape, ds.class_names[:3])
    ```
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"The dataset name must be a non-empty string, one of "
            f"{_ACCEPTED_FORMS}. Received: name={name!r}"
        )
    name = name.strip()
    _check_options(
        batch_size=batch_size,
        validation_split=validation_split,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        max_train_examples=max_train_examples,
    )
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
        raise ValueError(
            f"num_classes must be None (from the data) or an integer >= 2. Received: num_classes={num_classes!r}"
        )
    options = dict(
        batch_size=int(batch_size),
        validation_split=float(validation_split),
        augment=bool(augment),
        seed=int(seed),
        shuffle_buffer=int(shuffle_buffer),
        max_train_examples=(
            None if max_train_examples is None else int(max_train_examples)
        ),
    )
    if name.startswith("npz:"):
        return _load_npz(name, num_classes=num_classes, **options)
    if name == "digits":
        dataset = _load_digits(name, **options)
    elif name.lower() in TFDS_DATASETS:
        dataset = _load_tfds(name.lower(), tfds_data_dir=tfds_data_dir, **options)
    else:
        raise ValueError(
            f"Unknown dataset {name!r}. Accepted forms: {_ACCEPTED_FORMS}. "
            f"Received: name={name!r}"
        )
    if num_classes is not None and num_classes != dataset.num_classes:
        raise ValueError(
            f"Dataset {name!r} has {dataset.num_classes} classes, but num_classes={num_classes} was given; "
            f"leave num_classes unset to take it from the data. Received: num_classes={num_classes}"
        )
    return dataset


# ---------------------------------------------------------------------------
# Option checks and small helpers.


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_options(
    *, batch_size, validation_split, seed, shuffle_buffer, max_train_examples
):
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    if (
        isinstance(validation_split, (bool, np.bool_))
        or not isinstance(validation_split, (int, float, np.number))
        or not 0.0 <= float(validation_split) < 1.0
    ):
        raise ValueError(
            f"validation_split must be a number in [0, 1), e.g. 0.1 to hold "
            f"out 10% of the training data. "
            f"Received: validation_split={validation_split!r}"
        )
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(
            f"seed must be a non-negative integer. Received: seed={seed!r}"
        )
    if not _is_int(shuffle_buffer) or shuffle_buffer < 1:
        raise ValueError(
            f"shuffle_buffer must be a positive integer. "
            f"Received: shuffle_buffer={shuffle_buffer!r}"
        )
    if max_train_examples is not None and (
        not _is_int(max_train_examples) or max_train_examples < 1
    ):
        raise ValueError(
            f"max_train_examples must be None or a positive integer. "
            f"Received: max_train_examples={max_train_examples!r}"
        )


def _ids(*labels):
    """The distinct class ids of label arrays, as a short text."""
    ids = np.unique(np.concatenate([np.ravel(y) for y in labels]))
    text = ", ".join(str(int(i)) for i in ids[:10])
    return text + (f", ... ({len(ids)} ids, up to {int(ids[-1])})" if len(ids) > 10 else "")


def _source(name):
    """The file of an `npz:PATH` name, or the name itself."""
    return name[len("npz:"):].strip() if name.startswith("npz:") else name


def _split_arrays(split, input_shape, max_images=None):
    """`(x, y)` float32 / int32 arrays of a batched split, its first `max_images` at most."""
    xs, ys, count = [], [], 0
    for x, y in split.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        count += len(y)
        if max_images is not None and count >= max_images:
            break
    if not xs:
        return np.zeros((0,) + tuple(input_shape), np.float32), np.zeros((0,), np.int32)
    x = np.concatenate(xs)[:max_images].astype(np.float32, copy=False)
    return x, np.concatenate(ys)[:max_images].astype(np.int32, copy=False)


def _read_only(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return tuple(arrays)


def _num_validation(n, validation_split, name):
    """Number of examples held out for validation (0 if split is 0)."""
    if validation_split == 0.0:
        return 0
    n_val = max(1, int(round(n * validation_split)))
    if n_val >= n:
        raise ValueError(
            f"validation_split={validation_split} leaves no training examples "
            f"out of the {n} of dataset {name!r}; use a smaller fraction. "
            f"Received: validation_split={validation_split}"
        )
    return n_val


# ---------------------------------------------------------------------------
# Pipelines shared by all datasets.


def _augment_small_images(dataset, input_shape, seed):
    """Pad + random crop (+ horizontal flip for colour) per example."""
    height, width, channels = input_shape
    pad = max(1, min(height, width) // 8)
    mode = "REFLECT" if pad < min(height, width) else "CONSTANT"
    flip = channels == 3

    def augment(example, rng_seed):
        x, y = example
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(rng_seed, num=2)
        )
        x = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode=mode)
        x = tf.image.stateless_random_crop(
            x, size=(height, width, channels), seed=crop_seed
        )
        if flip:
            x = tf.image.stateless_random_flip_left_right(x, seed=flip_seed)
        return x, y

    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True
    ).batch(2)
    return tf.data.Dataset.zip((dataset, seeds)).map(
        augment, num_parallel_calls=tf.data.AUTOTUNE
    )


def _eval_pipeline(x, y, batch_size):
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# In-memory datasets ("digits" and "npz:PATH").


def _normalize_np(x_raw, scale, mean, std):
    x = x_raw.astype(np.float32) * np.float32(scale)
    return ((x - mean) / std).astype(np.float32, copy=False)


def _channel_stats(x_raw, scale):
    """Per-channel mean / std of `x_raw * scale`, in float64, chunked."""
    channels = x_raw.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    count = 0
    for start in range(0, len(x_raw), 4096):
        chunk = x_raw[start : start + 4096].astype(np.float64) * scale
        chunk = chunk.reshape(-1, channels)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
        count += chunk.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    # A constant channel would divide by zero: leave it unscaled.
    std = np.where(std < 1e-6, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def _from_arrays(
    name,
    *,
    x_train,
    y_train,
    x_test,
    y_test,
    scale,
    num_classes,
    class_names,
    batch_size,
    validation_split,
    augment,
    seed,
    shuffle_buffer,
    max_train_examples,
):
    """Builds a `Dataset` from raw in-memory arrays (x NHWC, y int)."""
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    n = len(x_train)
    n_val = _num_validation(n, validation_split, name)
    order = np.random.default_rng(seed).permutation(n)
    train_idx = order[: n - n_val]
    val_idx = np.sort(order[n - n_val :])
    if max_train_examples is not None:
        train_idx = train_idx[:max_train_examples]
    train_idx = np.sort(train_idx)
    present = np.unique(y_train[train_idx])
    if len(present) < 2:
        held = "" if len(train_idx) == n else f" (the {len(train_idx)} of {n} examples left for training)"
        raise ValueError(
            f"{_source(name)}: the training labels{held} hold only class id {_ids(y_train[train_idx])}; "
            f"training needs at least two classes (integer ids 0..num_classes-1). Received: name={name!r}"
        )

    # Statistics from all the training examples (not the validation ones).
    mean, std = _channel_stats(x_train[np.sort(order[: n - n_val])], scale)

    x_tr = x_train[train_idx]
    y_tr = y_train[train_idx].astype(np.int32)
    mean_t = tf.constant(mean)
    std_t = tf.constant(std)
    scale_t = tf.constant(scale, tf.float32)

    def normalize(x, y):
        x = tf.cast(x, tf.float32) * scale_t
        return (x - mean_t) / std_t, y

    train = tf.data.Dataset.from_tensor_slices((x_tr, y_tr))
    train = train.shuffle(
        min(shuffle_buffer, len(x_tr)), seed=seed, reshuffle_each_iteration=True
    )
    train = train.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        train = _augment_small_images(train, input_shape, seed)
    train = train.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    x_te = _normalize_np(x_test, scale, mean, std)
    y_te = y_test.astype(np.int32)
    test = _eval_pipeline(x_te, y_te, batch_size)

    validation = None
    if n_val:
        x_va = _normalize_np(x_train[val_idx], scale, mean, std)
        validation = _eval_pipeline(
            x_va, y_train[val_idx].astype(np.int32), batch_size
        )

    return Dataset(
        train=train,
        test=test,
        validation=validation,
        num_classes=int(num_classes),
        input_shape=input_shape,
        class_names=list(class_names),
        num_train=int(len(x_tr)),
        num_test=int(len(x_te)),
        num_validation=int(n_val),
        mean=mean,
        std=std,
        name=name,
        _test_arrays_cache=_read_only(x_te, y_te),
    )


def _load_digits(name, **options):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[..., None]  # 0..16, (N, 8, 8, 1)
    labels = bunch.target.astype(np.int32)
    # Fixed split, independent of `seed`, so test accuracy is comparable.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return _from_arrays(
        name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        scale=1.0 / 16.0,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        **options,
    )


def _load_npz(name, num_classes=None, **options):
    raw_path = name[len("npz:") :].strip()
    if not raw_path:
        raise ValueError(
            f"'npz:' must be followed by the path of a .npz file, e.g. "
            f"npz:../shared/data/fashion_mnist.npz. Received: name={name!r}"
        )
    path = pathlib.Path(raw_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Dataset file not found: {path} (resolved to {path.resolve()}). "
            f"Pass an existing archive, e.g. "
            f"--dataset=npz:../shared/data/fashion_mnist.npz (the shared "
            f"datasets live in ../shared/data relative to the repository), "
            f"or use --dataset=digits, which needs no files. "
            f"Received: name={name!r}"
        )
    if not path.is_file():
        raise ValueError(
            f"{path} is not a file; 'npz:PATH' must name a .npz archive. "
            f"Received: name={name!r}"
        )
    arrays = _read_npz(path, name)
    x_train, y_train, x_test, y_test, scale = _check_npz_arrays(
        path, name, arrays
    )
    max_label = int(max(y_train.max(), y_test.max()))
    given = num_classes
    if max_label >= _MAX_CLASSES:
        raise ValueError(
            f"{path}: labels go up to {max_label}, which is not a plausible "
            f"class id; labels must be class ids 0..num_classes-1 (remap "
            f"them, e.g. with np.unique(y, return_inverse=True)). "
            f"Received: name={name!r}"
        )
    class_names = _read_class_names(path)
    if given is not None and max_label >= given:
        raise ValueError(
            f"{path}: labels go up to {max_label} (class ids found: {_ids(y_train, y_test)}), but "
            f"num_classes={given} was given, so they must lie in 0..{given - 1}. Fix the labels or leave "
            f"num_classes unset to take it from the data. Received: num_classes={given}"
        )
    if class_names is None:
        num_classes = given or max_label + 1
        class_names = [str(i) for i in range(num_classes)]
    else:
        num_classes = len(class_names)
        if max_label >= num_classes:
            raise ValueError(
                f"{path}: labels go up to {max_label}, but "
                f"{path.with_suffix('.json')} lists only {num_classes} class "
                f"names, so labels must lie in 0..{num_classes - 1}. Fix the "
                f"labels or the 'class_names' of the .json file. "
                f"Received: name={name!r}"
            )
        if given is not None and given != num_classes:
            raise ValueError(
                f"{path.with_suffix('.json')} lists {num_classes} class names, but num_classes={given} was "
                f"given. Received: num_classes={given}"
            )
    return _from_arrays(
        name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        scale=scale,
        num_classes=num_classes,
        class_names=class_names,
        **options,
    )


def _read_npz(path, name):
    """Reads the four required arrays, with clear errors for bad files."""
    hint = (
        "It may be truncated (incomplete copy or download) or corrupt, or it "
        "is not a .npz file; write it with np.savez(path, x_train=..., "
        "y_train=..., x_test=..., y_test=...) or copy it again."
    )
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a readable .npz archive (no valid zip structure). "
            f"{hint} Received: name={name!r}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise _MissingKeys(missing, list(npz.files))
            return {k: npz[k] for k in _NPZ_KEYS}
    except _MissingKeys as e:
        raise ValueError(
            f"{path} is missing the required array(s) "
            f"{', '.join(e.missing)} (it holds: "
            f"{', '.join(e.found) or 'nothing'}). A dataset .npz must hold "
            f"x_train, y_train, x_test and y_test (the layout of Keras' "
            f"mnist.npz). Received: name={name!r}"
        ) from None
    except (
        zipfile.BadZipFile,
        zlib.error,
        ValueError,
        OSError,
        EOFError,
        KeyError,
        RuntimeError,
    ) as e:
        raise ValueError(
            f"{path} is not a readable .npz archive ({type(e).__name__}: "
            f"{e}). {hint} Received: name={name!r}"
        ) from e


class _MissingKeys(Exception):
    def __init__(self, missing, found):
        super().__init__(missing)
        self.missing = missing
        self.found = found


def _check_npz_arrays(path, name, arrays):
    """Validates and normalises the layout; returns (x/y train/test, scale)."""
    suffix = f" Received: name={name!r}"
    xs, ys = {}, {}
    scale = None
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        x, y = arrays[x_key], arrays[y_key]
        if x.dtype == np.uint8:
            split_scale = 1.0 / 255.0
        elif np.issubdtype(x.dtype, np.floating):
            if not np.all(np.isfinite(x)):
                raise ValueError(
                    f"{path}: {x_key} contains NaN or infinite values; "
                    f"clean the images before saving them.{suffix}"
                )
            lo, hi = (float(x.min()), float(x.max())) if x.size else (0, 0)
            if lo < 0.0 or hi > 1.0:
                raise ValueError(
                    f"{path}: {x_key} is floating-point with values in "
                    f"[{lo:g}, {hi:g}]; float images must lie in [0, 1] "
                    f"(divide 0..255 data by 255, or store uint8).{suffix}"
                )
            x = x.astype(np.float32, copy=False)
            split_scale = 1.0
        else:
            raise ValueError(
                f"{path}: {x_key} has dtype {x.dtype}; images must be uint8 "
                f"(0..255) or floating-point in [0, 1]. Convert with "
                f"x.astype('uint8') or x.astype('float32') / 255.{suffix}"
            )
        if scale is not None and split_scale != scale:
            raise ValueError(
                f"{path}: x_train and x_test have different dtypes "
                f"({arrays['x_train'].dtype} vs {x.dtype}); store both as "
                f"uint8 or both as floats in [0, 1].{suffix}"
            )
        scale = split_scale
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or min(x.shape[1:], default=0) < 1:
            raise ValueError(
                f"{path}: {x_key} has shape {x.shape}; expected (N, H, W) "
                f"for grey-scale or (N, H, W, C) for colour images.{suffix}"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]  # Keras' cifar10 layout: (N, 1).
        if y.ndim != 1:
            raise ValueError(
                f"{path}: {y_key} has shape {y.shape}; expected one integer "
                f"class id per image, shape (N,).{suffix}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: {y_key} has dtype {y.dtype}; labels must be "
                f"integer class ids 0..num_classes-1 (not one-hot, not "
                f"floats). Convert with y.astype('int64').{suffix}"
            )
        if len(x) != len(y):
            raise ValueError(
                f"{path}: {x_key} holds {len(x)} images but {y_key} holds "
                f"{len(y)} labels; they must have the same length.{suffix}"
            )
        if len(x) == 0:
            raise ValueError(f"{path}: {x_key} is empty.{suffix}")
        if int(y.min()) < 0:
            raise ValueError(
                f"{path}: {y_key} contains negative labels (min "
                f"{int(y.min())}); labels must be class ids "
                f"0..num_classes-1.{suffix}"
            )
        xs[split], ys[split] = x, y.astype(np.int64)
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise ValueError(
            f"{path}: train images have shape {xs['train'].shape[1:]} but "
            f"test images {xs['test'].shape[1:]}; both splits must use the "
            f"same image shape.{suffix}"
        )
    return xs["train"], ys["train"], xs["test"], ys["test"], scale


def _read_class_names(npz_path):
    """`class_names` from the .json next to the archive, or None."""
    json_path = npz_path.with_suffix(".json")
    if not json_path.is_file():
        return None
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        warnings.warn(
            f"Ignoring {json_path}: not readable JSON ({e}); using class ids "
            f"as class names.",
            stacklevel=4,
        )
        return None
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if names is None:
        return None
    if not isinstance(names, list) or not names:
        warnings.warn(
            f"Ignoring 'class_names' of {json_path}: expected a non-empty "
            f"list; using class ids as class names.",
            stacklevel=4,
        )
        return None
    return [str(n) for n in names]


# ---------------------------------------------------------------------------
# TensorFlow Datasets.


def _tfds_builder(name, data_dir):
    """Returns the TFDS builder, failing fast if the data is not prepared."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    version_dir = os.fspath(builder.data_dir)
    info_file = os.path.join(version_dir, "dataset_info.json")
    if not tf.io.gfile.exists(info_file):
        root = os.path.dirname(os.path.dirname(version_dir))
        manual = ""
        if name == "imagenet2012":
            manual = (
                f" (first put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar into {root}/downloads/manual/)"
            )
        shared = {
            "mnist": "mnist.npz",
            "fashion_mnist": "fashion_mnist.npz",
            "cifar10": "cifar10_subset.npz",
        }.get(name)
        example = (
            f", e.g. --dataset=npz:../shared/data/{shared}"
            if shared
            else " (or --dataset=digits, which needs no files)"
        )
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in {root} (no "
            f"{info_file}) and this loader never downloads. On a machine with "
            f"internet access run `tfds build {name} --data_dir {root}`"
            f"{manual} and copy the directory here, point --tfds_data_dir at "
            f"an existing TFDS data directory, or pass "
            f"--dataset=npz:PATH{example}. Received: name={name!r}"
        )
    return builder


def _tfds_split_size(builder, split, name):
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(
            f"TFDS dataset {name!r} in {builder.data_dir} has no {split!r} "
            f"split (available: {', '.join(splits.keys())}); prepare it "
            f"again with all splits. Received: name={name!r}"
        )
    return int(splits[split].num_examples)


def _load_tfds(
    name,
    *,
    tfds_data_dir,
    batch_size,
    validation_split,
    augment,
    seed,
    shuffle_buffer,
    max_train_examples,
):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, tfds_data_dir)
    imagenet = name == "imagenet2012"
    test_split = "validation" if imagenet else "test"
    n = _tfds_split_size(builder, "train", name)
    n_test = _tfds_split_size(builder, test_split, name)
    n_val = _num_validation(n, validation_split, name)
    n_train = n - n_val
    if max_train_examples is not None:
        n_train = min(n_train, max_train_examples)
    train_split = f"train[:{n_train}]"
    val_split = f"train[{n - n_val}:]"

    label_feature = builder.info.features["label"]
    class_names = list(label_feature.names)
    mean = np.asarray(NORMALIZATION_STATS[name][0], np.float32)
    std = np.asarray(NORMALIZATION_STATS[name][1], np.float32)
    mean_t, std_t = tf.constant(mean), tf.constant(std)

    def normalize(x):
        return (tf.cast(x, tf.float32) / 255.0 - mean_t) / std_t

    def read(split, training):
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(
            options=options,
            shuffle_seed=seed,
            try_autocache=False,
        )
        decoders = {"image": tfds.decode.SkipDecoding()} if imagenet else None
        return builder.as_dataset(
            split=split,
            as_supervised=True,
            shuffle_files=training,
            read_config=read_config,
            decoders=decoders,
        )

    if imagenet:
        input_shape = (IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE, 3)

        def train_map(example, rng_seed):
            image_bytes, label = example
            image = _imagenet_train_image(image_bytes, rng_seed)
            return normalize(image), tf.cast(label, tf.int32)

        def eval_map(image_bytes, label):
            image = _imagenet_eval_image(image_bytes)
            return normalize(image), tf.cast(label, tf.int32)

        train = read(train_split, True)
        train = train.shuffle(
            min(shuffle_buffer, n_train),
            seed=seed,
            reshuffle_each_iteration=True,
        )
        seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        ).batch(2)
        train = tf.data.Dataset.zip((train, seeds)).map(
            train_map, num_parallel_calls=tf.data.AUTOTUNE
        )

        def evaluation(split):
            ds = read(split, False).map(
                eval_map, num_parallel_calls=tf.data.AUTOTUNE
            )
            return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    else:
        image_shape = builder.info.features["image"].shape
        input_shape = tuple(int(d) for d in image_shape)

        def to_int32(x, y):
            return x, tf.cast(y, tf.int32)

        def norm_map(x, y):
            return normalize(x), y

        train = read(train_split, True).map(to_int32).cache()
        train = train.shuffle(
            min(shuffle_buffer, n_train),
            seed=seed,
            reshuffle_each_iteration=True,
        )
        train = train.map(norm_map, num_parallel_calls=tf.data.AUTOTUNE)
        if augment:
            train = _augment_small_images(train, input_shape, seed)

        def evaluation(split):
            ds = read(split, False).map(to_int32).cache()
            ds = ds.map(norm_map, num_parallel_calls=tf.data.AUTOTUNE)
            return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    train = train.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return Dataset(
        train=train,
        test=evaluation(test_split),
        validation=evaluation(val_split) if n_val else None,
        num_classes=int(label_feature.num_classes),
        input_shape=input_shape,
        class_names=class_names,
        num_train=n_train,
        num_test=n_test,
        num_validation=n_val,
        mean=mean,
        std=std,
        name=name,
    )


def _imagenet_train_image(image_bytes, rng_seed):
    """Random-resized crop to 224x224 + random flip; float32 in 0..255."""
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(rng_seed, num=2)
    )
    shape = tf.image.extract_jpeg_shape(image_bytes)
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole_image,
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    window = tf.stack([offset_y, offset_x, height, width])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(
        image,
        (IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE),
        method="bilinear",
        antialias=True,
    )
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image.set_shape((IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE, 3))
    return image


def _imagenet_eval_image(image_bytes):
    """Shorter side to 256, center crop 224x224; float32 in 0..255."""
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = IMAGENET_RESIZE_SIZE / tf.reduce_min(shape)
    new_size = tf.cast(tf.round(shape * factor), tf.int32)
    new_size = tf.maximum(new_size, IMAGENET_IMAGE_SIZE)
    image = tf.image.resize(image, new_size, method="bilinear", antialias=True)
    top = (new_size[0] - IMAGENET_IMAGE_SIZE) // 2
    left = (new_size[1] - IMAGENET_IMAGE_SIZE) // 2
    image = tf.image.crop_to_bounding_box(
        image, top, left, IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE
    )
    image.set_shape((IMAGENET_IMAGE_SIZE, IMAGENET_IMAGE_SIZE, 3))
    return image


# ---------------------------------------------------------------------------
# A tiny ImageNet-shaped TFDS directory, for smoke runs of the ImageNet path.


def write_imagenet2012_sample(
    data_dir,
    *,
    num_train: int = 8,
    num_validation: int = 4,
    num_classes: int = 1000,
    seed: int = 0,
    min_side: int = 160,
    max_side: int = 320,
) -> str:
    """Writes a tiny `imagenet2012` TFDS directory of random JPEG images.

    The directory has the layout `tfds build imagenet2012` produces
    (`DATA_DIR/imagenet2012/VERSION/` with TFRecord shards,
    `dataset_info.json` and `features.json`), written with the builder's own
    feature encoding and `tfds.folder_dataset.write_metadata`, so
    `load_dataset("imagenet2012", tfds_data_dir=data_dir)` reads it exactly
    like the real dataset: JPEG bytes decoded in parallel, random-resized
    crops, 1000 classes. The images are smooth random colour fields of random
    sizes between `min_side` and `max_side` pixels; labels are random class
    ids. Use it to check that the ImageNet configuration runs end to end
    (and how fast the input pipeline is) before spending hours on the real
    data; it teaches a model nothing.

    Args:
        data_dir: the TFDS data directory to write into (created if absent).
        num_train: number of `train` examples.
        num_validation: number of `validation` examples.
        num_classes: labels are drawn from `0..num_classes - 1` (at most
            1000, the dataset's classes).
        seed: seed of the images and labels.
        min_side, max_side: range of the image heights and widths.

    Returns:
        The version directory written, `DATA_DIR/imagenet2012/VERSION`.

    Example:

    ```python
    write_imagenet2012_sample("/tmp/tfds", num_train=16)
    ds = load_dataset("imagenet2012", tfds_data_dir="/tmp/tfds", batch_size=2)
    ```
    """
    import io

    import tensorflow_datasets as tfds

    for key, value in (("num_train", num_train), ("num_validation", num_validation)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{key} must be a positive integer. Received: {key}={value!r}")
    if not _is_int(num_classes) or not 1 <= num_classes <= 1000:
        raise ValueError(f"num_classes must be in 1..1000. Received: num_classes={num_classes!r}")
    if not (_is_int(min_side) and _is_int(max_side) and 1 <= min_side <= max_side):
        raise ValueError(
            f"min_side and max_side must be integers with 1 <= min_side <= max_side. "
            f"Received: min_side={min_side!r}, max_side={max_side!r}"
        )
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
    version_dir = os.fspath(builder.data_dir)
    features = builder.info.features
    rng = np.random.default_rng(seed)
    tf.io.gfile.makedirs(version_dir)
    for split, count in (("train", num_train), ("validation", num_validation)):
        path = os.path.join(version_dir, f"imagenet2012-{split}.tfrecord-00000-of-00001")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(count):
                height, width = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
                coarse = rng.uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
                image = tf.cast(tf.image.resize(coarse, (height, width))[0], tf.uint8)
                example = {
                    "image": io.BytesIO(tf.io.encode_jpeg(image, quality=90).numpy()),
                    "label": int(rng.integers(num_classes)),
                    "file_name": f"{split}_{i:08d}.JPEG",
                }
                writer.write(features.serialize_example(example))
    tfds.folder_dataset.write_metadata(
        data_dir=version_dir,
        features=features,
        split_infos=None,
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        check_data=False,
    )
    return version_dir
