"""Tests for `rnp_tf.data` on real data (scikit-learn digits, shared .npz)."""

import collections
import json
import pathlib
import time
import types
import unittest.mock

import numpy as np
import pytest

from rnp_tf import data

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION = SHARED_DATA / "fashion_mnist.npz"
MNIST = SHARED_DATA / "mnist.npz"
CIFAR = SHARED_DATA / "cifar10_subset.npz"


def _require(path):
    if not path.is_file():
        pytest.skip(
            f"shared dataset {path} is absent (expected the shared data "
            f"directory next to the repository)"
        )
    return path


def _collect(dataset):
    xs, ys = [], []
    for x, y in dataset.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _row_counter(x):
    return collections.Counter(row.tobytes() for row in x)


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", batch_size=64)


# ---------------------------------------------------------------------------
# digits


def test_digits_shapes_and_counts(digits):
    assert digits.input_shape == (8, 8, 1)
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    assert (digits.num_train, digits.num_test) == (1437, 360)
    assert digits.num_validation == 0 and digits.validation is None
    assert digits.mean.shape == (1,) and digits.mean.dtype == np.float32
    assert digits.std.shape == (1,) and digits.std.dtype == np.float32
    x, y = next(iter(digits.train))
    assert x.shape == (64, 8, 8, 1) and x.dtype.name == "float32"
    assert y.shape == (64,) and y.dtype.name == "int32"
    x_train, y_train = _collect(digits.train)
    assert x_train.shape == (1437, 8, 8, 1) and y_train.shape == (1437,)
    x_test, y_test = digits.test_arrays()
    assert x_test.shape == (360, 8, 8, 1) and x_test.dtype == np.float32
    assert y_test.shape == (360,) and y_test.dtype == np.int32
    assert set(np.unique(y_test)) == set(range(10))
    # `test` is in the same order as `test_arrays()`.
    x_iter, y_iter = _collect(digits.test)
    np.testing.assert_allclose(x_iter, x_test, atol=1e-6)
    np.testing.assert_array_equal(y_iter, y_test)


def test_digits_train_is_normalised(digits):
    x_train, _ = _collect(digits.train)
    assert abs(float(x_train.mean())) < 1e-3
    assert abs(float(x_train.std()) - 1.0) < 1e-3
    # x_norm = (x / 16 - mean) / std: denormalize gives multiples of 1/16.
    raw = digits.denormalize(x_train) * 16
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)
    assert raw.min() >= 0 and raw.max() <= 16


def test_digits_split_independent_of_seed(digits):
    other = data.load_dataset("digits", batch_size=64, seed=123)
    x0, y0 = digits.test_arrays()
    x1, y1 = other.test_arrays()
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_allclose(x0, x1, atol=1e-6)
    train0 = _collect(digits.train)
    train1 = _collect(other.train)
    assert _row_counter(train0[0]) == _row_counter(train1[0])
    assert not np.array_equal(train0[1], train1[1])  # different shuffle


def test_train_shuffle_is_seeded_and_reshuffled_each_epoch():
    first = data.load_dataset("digits", batch_size=64, seed=7)
    again = data.load_dataset("digits", batch_size=64, seed=7)
    _, y_a = _collect(first.train)
    _, y_b = _collect(again.train)
    np.testing.assert_array_equal(y_a, y_b)  # same seed, same order
    _, y_epoch2 = _collect(first.train)
    assert not np.array_equal(y_a, y_epoch2)  # reshuffled every epoch


def test_digits_validation_split(digits):
    full_x, _ = _collect(digits.train)
    ds = data.load_dataset("digits", validation_split=0.2, seed=3)
    assert ds.num_validation == 287 and ds.num_train == 1437 - 287
    assert ds.num_test == 360
    x_train, y_train = _collect(ds.train)
    x_val, y_val = _collect(ds.validation)
    assert len(x_train) == ds.num_train and len(x_val) == ds.num_validation
    assert y_val.dtype == np.int32
    # validation_arrays: the same images in the same order, all of them or the first n
    x_all, y_all = ds.validation_arrays()
    np.testing.assert_array_equal(x_all, x_val)
    np.testing.assert_array_equal(y_all, y_val)
    x_some, y_some = ds.validation_arrays(100)
    assert x_some.dtype == np.float32 and y_some.dtype == np.int32
    np.testing.assert_array_equal(x_some, x_val[:100])
    np.testing.assert_array_equal(y_some, y_val[:100])
    with pytest.raises(ValueError, match="no validation split"):
        digits.validation_arrays()
    # Train and validation partition the training split (compared as raw
    # 0..16 pixels: mean / std now come from the smaller training part).
    def raw(dataset, x):
        return np.round(dataset.denormalize(x) * 16).astype(np.uint8)

    assert _row_counter(raw(ds, x_train)) + _row_counter(
        raw(ds, x_val)
    ) == _row_counter(raw(digits, full_x))
    # Deterministic given the seed, different for another seed.
    again = data.load_dataset("digits", validation_split=0.2, seed=3)
    np.testing.assert_array_equal(_collect(again.validation)[0], x_val)
    other = data.load_dataset("digits", validation_split=0.2, seed=4)
    assert other.num_validation == 287
    assert _row_counter(raw(other, _collect(other.validation)[0])) != (
        _row_counter(raw(ds, x_val))
    )
    # The test split never changes.
    np.testing.assert_array_equal(
        raw(ds, ds.test_arrays()[0]), raw(digits, digits.test_arrays()[0])
    )
    np.testing.assert_array_equal(ds.test_arrays()[1], digits.test_arrays()[1])


def test_max_train_examples():
    ds = data.load_dataset("digits", batch_size=32, max_train_examples=100)
    assert ds.num_train == 100
    x, y = _collect(ds.train)
    assert x.shape == (100, 8, 8, 1) and y.shape == (100,)
    assert ds.num_test == 360


def test_denormalize(digits):
    x_test, _ = digits.test_arrays()
    img = digits.denormalize(x_test[0])
    assert img.shape == (8, 8, 1) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    with pytest.raises(ValueError, match="channel"):
        digits.denormalize(np.zeros((8, 8, 3)))


def test_invalid_options():
    with pytest.raises(ValueError, match="batch_size"):
        data.load_dataset("digits", batch_size=0)
    with pytest.raises(ValueError, match="validation_split"):
        data.load_dataset("digits", validation_split=1.0)
    with pytest.raises(ValueError, match="max_train_examples"):
        data.load_dataset("digits", max_train_examples=0)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown dataset") as info:
        data.load_dataset("svhn")
    message = str(info.value)
    assert "digits" in message and "npz:" in message and "cifar10" in message


# ---------------------------------------------------------------------------
# npz: shared real data


def test_fashion_mnist_npz():
    path = _require(FASHION)
    ds = data.load_dataset(f"npz:{path}", batch_size=256)
    assert ds.input_shape == (28, 28, 1)
    assert (ds.num_train, ds.num_test) == (8517, 6978)
    assert ds.num_classes == 10
    expected = json.loads(path.with_suffix(".json").read_text())["class_names"]
    assert ds.class_names == expected and ds.class_names[0] == "T-shirt/top"
    x, y = next(iter(ds.train))
    assert x.shape == (256, 28, 28, 1) and y.dtype.name == "int32"
    x_test, y_test = ds.test_arrays()
    assert x_test.shape == (6978, 28, 28, 1)
    with np.load(path) as raw:
        np.testing.assert_array_equal(y_test, raw["y_test"])
        np.testing.assert_allclose(
            ds.denormalize(x_test[:50]), raw["x_test"][:50, ..., None] / 255.0,
            atol=1e-5,
        )

    aug = data.load_dataset(
        f"npz:{path}", batch_size=256, augment=True, max_train_examples=512
    )
    xa, ya = next(iter(aug.train))
    assert xa.shape == (256, 28, 28, 1) and ya.shape == (256,)
    assert aug.test_arrays()[0].shape == (6978, 28, 28, 1)


def test_cifar_npz_augment_changes_train_only():
    path = _require(CIFAR)
    kwargs = dict(batch_size=64, max_train_examples=256, seed=1)
    plain = data.load_dataset(f"npz:{path}", **kwargs)
    aug = data.load_dataset(f"npz:{path}", augment=True, **kwargs)
    assert aug.input_shape == (32, 32, 3) and aug.class_names[0] == "airplane"
    x_plain, y_plain = next(iter(plain.train))
    x_aug, y_aug = next(iter(aug.train))
    assert x_aug.shape == (64, 32, 32, 3)
    np.testing.assert_array_equal(y_plain, y_aug)  # same shuffle order
    assert not np.allclose(x_plain, x_aug)
    np.testing.assert_allclose(plain.test_arrays()[0], aug.test_arrays()[0])
    # Augmentation is deterministic given the seed.
    again = data.load_dataset(f"npz:{path}", augment=True, **kwargs)
    np.testing.assert_array_equal(next(iter(again.train))[0], x_aug)


# ---------------------------------------------------------------------------
# npz: generated files and error paths


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (40, 6, 5), dtype=np.uint8),
        y_train=np.arange(40) % 4,
        x_test=rng.integers(0, 256, (12, 6, 5), dtype=np.uint8),
        y_test=np.arange(12) % 4,
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_generated_grey_npz(tmp_path):
    name = _write_npz(tmp_path / "grey.npz")
    ds = data.load_dataset(name, batch_size=16, validation_split=0.25)
    assert ds.input_shape == (6, 5, 1)
    assert ds.num_classes == 4 and ds.class_names == ["0", "1", "2", "3"]
    assert (ds.num_train, ds.num_validation, ds.num_test) == (30, 10, 12)
    x, y = _collect(ds.train)
    assert x.shape == (30, 6, 5, 1) and x.dtype == np.float32
    aug = data.load_dataset(name, batch_size=16, augment=True)
    assert _collect(aug.train)[0].shape == (40, 6, 5, 1)


def test_generated_colour_npz_with_class_names(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "colour.npz"
    name = _write_npz(
        path,
        x_train=rng.random((20, 4, 4, 3), dtype=np.float32),
        y_train=(np.arange(20) % 3).reshape(-1, 1),  # Keras cifar layout
        x_test=rng.random((9, 4, 4, 3), dtype=np.float32),
        y_test=np.arange(9) % 3,
    )
    path.with_suffix(".json").write_text(
        json.dumps({"class_names": ["cat", "dog", "bird", "fish"]})
    )
    ds = data.load_dataset(name, batch_size=8, augment=True)
    assert ds.input_shape == (4, 4, 3)
    assert ds.num_classes == 4  # from the json, although labels stop at 2
    assert ds.class_names == ["cat", "dog", "bird", "fish"]
    x, y = _collect(ds.train)
    assert x.shape == (20, 4, 4, 3) and y.shape == (20,)
    assert ds.mean.shape == (3,) and ds.std.shape == (3,)


def test_truncated_npz(tmp_path):
    source = FASHION if FASHION.is_file() else None
    if source is None:
        source = tmp_path / "source.npz"
        _write_npz(source)
    payload = source.read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match="not a readable .npz archive") as info:
        data.load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)


def test_corrupt_member_npz(tmp_path):
    path = tmp_path / "corrupt.npz"
    _write_npz(path)
    payload = bytearray(path.read_bytes())
    start = payload.index(b"x_train.npy") + 200  # inside the array data
    payload[start : start + 64] = bytes(64)
    path.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        data.load_dataset(f"npz:{path}")


def test_random_bytes_and_npy(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        data.load_dataset(f"npz:{path}")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        data.load_dataset(f"npz:{npy}")


def test_missing_key(tmp_path):
    name = _write_npz(tmp_path / "nokey.npz", y_test=None)
    with pytest.raises(ValueError, match="y_test"):
        data.load_dataset(name)


def test_nan_images(tmp_path):
    x = np.full((10, 4, 4), 0.5, np.float32)
    x[3, 1, 1] = np.nan
    name = _write_npz(
        tmp_path / "nan.npz", x_train=x, y_train=np.arange(10) % 2
    )
    with pytest.raises(ValueError, match="NaN"):
        data.load_dataset(name)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(y_train=np.arange(40) - 1), "negative"),
        (dict(y_train=np.arange(40) % 4 + 0.5), "integer class ids"),
        (dict(y_test=np.arange(11) % 4), "same length"),
        (dict(x_train=np.zeros((40, 6), np.uint8)), "shape"),
        (dict(x_train=np.zeros((40, 6, 5), np.int32)), "dtype"),
        (dict(x_train=np.full((40, 6, 5), 200.0, np.float32)), r"\[0, 1\]"),
        (dict(x_test=np.zeros((12, 5, 5), np.uint8)), "same image shape"),
    ],
)
def test_invalid_npz_contents(tmp_path, overrides, pattern):
    name = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=pattern):
        data.load_dataset(name)


def test_labels_beyond_json_class_names(tmp_path):
    path = tmp_path / "names.npz"
    name = _write_npz(path)
    names = {"class_names": ["a", "b"]}
    path.with_suffix(".json").write_text(json.dumps(names))
    with pytest.raises(ValueError, match="class names"):
        data.load_dataset(name)


def test_missing_file(tmp_path):
    path = tmp_path / "nothing_here.npz"
    with pytest.raises(FileNotFoundError, match="digits") as info:
        data.load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)
    assert "shared/data" in str(info.value)


# ---------------------------------------------------------------------------
# TensorFlow Datasets


@pytest.mark.parametrize("name", data.TFDS_DATASETS)
def test_tfds_not_prepared_fails_fast(tmp_path, name):
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        data.load_dataset(name, tfds_data_dir=str(tmp_path))
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert name in message and str(tmp_path) in message
    assert "tfds build" in message and "npz:" in message
    if name == "imagenet2012":
        assert "downloads/manual" in message


def _prepare_tfds(name, data_dir, splits):
    """Writes a real TFDS directory for `name` from in-memory examples.

    The builder's own feature encoding and writers are used; only the source
    of the examples (normally a download) is replaced.
    """
    import tensorflow_datasets as tfds

    builder_cls = type(tfds.builder(name))

    def split_generators(self, dl_manager):
        return {
            split: self._generate_examples(rows)
            for split, rows in splits.items()
        }

    def generate_examples(self, rows):
        yield from enumerate(rows)

    try:
        with unittest.mock.patch.object(
            builder_cls, "_split_generators", split_generators
        ), unittest.mock.patch.object(
            builder_cls, "_generate_examples", generate_examples
        ), unittest.mock.patch.object(
            builder_cls,
            "_make_download_manager",
            lambda self, **kwargs: types.SimpleNamespace(downloaded_size=0),
        ):
            builder = tfds.builder(name, data_dir=str(data_dir))
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    compute_stats=tfds.download.ComputeStatsMode.SKIP
                )
            )
    except Exception as e:  # TFDS internals differ: cannot build offline.
        pytest.skip(f"could not write a {name} TFDS directory offline: {e!r}")


@pytest.fixture(scope="module")
def tfds_mnist_dir(tmp_path_factory):
    path = _require(MNIST)
    with np.load(path) as raw:
        splits = {
            "train": [
                {"image": x[..., None], "label": int(y)}
                for x, y in zip(raw["x_train"][:50], raw["y_train"][:50])
            ],
            "test": [
                {"image": x[..., None], "label": int(y)}
                for x, y in zip(raw["x_test"][:20], raw["y_test"][:20])
            ],
        }
    data_dir = tmp_path_factory.mktemp("tfds_mnist")
    _prepare_tfds("mnist", data_dir, splits)
    return data_dir, splits


def test_tfds_prepared_mnist(tfds_mnist_dir):
    data_dir, splits = tfds_mnist_dir
    ds = data.load_dataset(
        "mnist", tfds_data_dir=str(data_dir), batch_size=16,
        validation_split=0.2, augment=True,
    )
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert (ds.num_train, ds.num_validation, ds.num_test) == (40, 10, 20)
    np.testing.assert_allclose(ds.mean, [0.1307], atol=1e-6)
    np.testing.assert_allclose(ds.std, [0.3081], atol=1e-6)
    x, y = _collect(ds.train)
    assert x.shape == (40, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32
    assert len(_collect(ds.validation)[1]) == 10
    x_test, y_test = ds.test_arrays()
    assert x_test.shape == (20, 28, 28, 1) and y_test.dtype == np.int32
    expected = sorted(row["label"] for row in splits["test"])
    assert sorted(y_test.tolist()) == expected
    # Deterministic order of `test`.
    np.testing.assert_array_equal(_collect(ds.test)[1], y_test)
    reloaded = data.load_dataset("mnist", tfds_data_dir=str(data_dir))
    np.testing.assert_array_equal(reloaded.test_arrays()[1], y_test)
    pixels = {row["image"].tobytes() for row in splits["test"]}
    restored = np.round(ds.denormalize(x_test) * 255).astype(np.uint8)
    assert {img.tobytes() for img in restored} == pixels


def test_tfds_prepared_imagenet_preprocessing(tmp_path):
    path = _require(CIFAR)
    with np.load(path) as raw:
        images, labels = raw["x_train"][:6], raw["y_train"][:6]
    # Real photos at ImageNet-like, non-square sizes (nearest upscaling).
    rows = [
        {
            "image": np.kron(img, np.ones((9 + i, 11 - i, 1), np.uint8)),
            "label": int(label),
            "file_name": f"img_{i}.JPEG",
        }
        for i, (img, label) in enumerate(zip(images, labels))
    ]
    _prepare_tfds(
        "imagenet2012", tmp_path, {"train": rows, "validation": rows[:4]}
    )
    ds = data.load_dataset(
        "imagenet2012", tfds_data_dir=str(tmp_path), batch_size=4
    )
    assert ds.input_shape == (224, 224, 3)
    assert ds.num_classes == 1000 and len(ds.class_names) == 1000
    assert (ds.num_train, ds.num_test) == (6, 4)
    x, y = _collect(ds.train)
    assert x.shape == (6, 224, 224, 3) and x.dtype == np.float32
    assert y.dtype == np.int32
    x_test, y_test = ds.test_arrays()
    assert x_test.shape == (4, 224, 224, 3)
    np.testing.assert_allclose(_collect(ds.test)[0], x_test)  # deterministic
    shown = ds.denormalize(x_test)
    assert 0.0 <= shown.min() and shown.max() <= 1.0


def test_generated_imagenet2012_sample_reads_like_imagenet(tmp_path):
    version_dir = data.write_imagenet2012_sample(tmp_path, num_train=6, num_validation=3, num_classes=5, seed=1)
    assert (pathlib.Path(version_dir) / "dataset_info.json").is_file()
    ds = data.load_dataset("imagenet2012", tfds_data_dir=str(tmp_path), batch_size=4)
    assert (ds.num_train, ds.num_test, ds.num_classes) == (6, 3, 1000)
    assert ds.input_shape == (224, 224, 3)
    x1, y1 = _collect(ds.train)
    x2, y2 = _collect(ds.train)
    assert x1.shape == (6, 224, 224, 3) and x1.dtype == np.float32
    assert sorted(y1.tolist()) == sorted(y2.tolist()) and y1.max() < 5
    assert not np.array_equal(np.sort(x1.reshape(6, -1), 0), np.sort(x2.reshape(6, -1), 0))  # new crops
    x_test, y_test = ds.test_arrays()
    assert x_test.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(_collect(ds.test)[0], x_test)  # evaluation: deterministic center crops
    with pytest.raises(ValueError, match="num_classes must be in 1..1000"):
        data.write_imagenet2012_sample(tmp_path / "other", num_classes=1001)


@pytest.mark.parametrize("label", [0, 3])
def test_one_class_training_labels_are_refused_naming_the_file(tmp_path, label):
    """Issue 25, case 5: labels all 0 were refused by RNPModel's num_classes, labels all 3 became 4 classes."""
    name = _write_npz(tmp_path / "one.npz", y_train=np.full(40, label), y_test=np.full(12, label))
    with pytest.raises(ValueError, match=rf"one.npz: the training labels hold only class id {label}; .*two classes"):
        data.load_dataset(name)


def test_a_subset_left_with_one_class_is_refused(tmp_path):
    name = _write_npz(tmp_path / "sorted.npz", y_train=np.repeat([0, 1], 20))
    with pytest.raises(ValueError, match=r"\(the 1 of 40 examples left for training\) hold only class id"):
        data.load_dataset(name, max_train_examples=1)


def test_num_classes_from_the_data_or_a_setting_that_agrees(tmp_path):
    name = _write_npz(tmp_path / "four.npz")
    assert data.load_dataset(name).num_classes == 4
    assert data.load_dataset(name, num_classes=6).num_classes == 6  # classes 4 and 5 absent from this file
    with pytest.raises(ValueError, match=r"labels go up to 3 \(class ids found: 0, 1, 2, 3\), but num_classes=3"):
        data.load_dataset(name, num_classes=3)
    with pytest.raises(ValueError, match="'digits' has 10 classes, but num_classes=5"):
        data.load_dataset("digits", num_classes=5)
    for bad in (1, 0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="num_classes must be None"):
            data.load_dataset(name, num_classes=bad)
