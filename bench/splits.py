"""The benchmarks' data splits of the shared `.npz` datasets, made the same way by every script.

Example:

    data = load_split("cifar10_subset", seed=3)   # 7,000 training, 1,000 validation images
    x_test, y_test = arrays(data.test)
"""

import pathlib

import numpy as np

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "cifar10_subset": "cifar10_subset.npz",
    "fashion_mnist": "fashion_mnist.npz",
}


def load_split(name, seed, validation=1000, max_train_examples=8000, batch_size=128):
    """One seed's training / validation / test split of a shared dataset (or scikit-learn's digits).

    Args:
        name: a key of `DATASETS`, or `"digits"` (smoke runs).
        seed: seeds the training subset, the validation hold-out and the shuffles.
        validation: training images held out for validation.
        max_train_examples: cap on training images before the hold-out.
        batch_size: batch size of the splits.

    Returns:
        An `rnp_tf.Dataset`.
    """
    import rnp_tf

    if name == "digits":
        return rnp_tf.load_dataset("digits", batch_size=batch_size, validation_split=0.2, seed=seed)
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset. Expected one of {sorted(DATASETS)} or 'digits'. Received: name={name!r}")
    path = SHARED / DATASETS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the benchmark reads ../shared/data/{DATASETS[name]}")
    ds = rnp_tf.load_dataset(f"npz:{path}", batch_size=batch_size, seed=seed, max_train_examples=max_train_examples)
    fraction = validation / ds.num_train
    return rnp_tf.load_dataset(f"npz:{path}", batch_size=batch_size, seed=seed,
                               validation_split=min(0.5, fraction), max_train_examples=max_train_examples)


def arrays(split):
    """A `tf.data` split as `(x, y)` numpy arrays."""
    xs, ys = [], []
    for x, y in split:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def interp(curve, fraction):
    """Accuracy of a `[(compute, accuracy), ...]` curve at `fraction` (clamped at its ends)."""
    xs, ys = zip(*sorted(curve))
    return float(np.interp(fraction, xs, ys))


def interp_inside(curve, fraction):
    """`interp` where `fraction` lies within the curve's compute range, else None (no extrapolation)."""
    xs = [c[0] for c in curve]
    return interp(curve, fraction) if min(xs) <= fraction <= max(xs) else None
