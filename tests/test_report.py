"""Tests for `rnp_tf.report`."""

import os

import numpy as np
import pytest

from rnp_tf import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_leaked_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    yield
    assert plt.get_fignums() == []


def _check_png(path, min_h=150, min_w=200):
    import matplotlib.image as mpimg

    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] == 4  # Agg writes RGBA.
    assert img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img.shape[0] < 5000 and img.shape[1] < 5000
    # Not a blank canvas.
    assert float(img[..., :3].std()) > 0.01
    return img


def _no_temp_files(directory):
    return [f for f in os.listdir(directory) if ".tmp-" in f] == []


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- plot_compute_histogram -------------------------------------------------


def test_compute_histogram(tmp_path, rng):
    cf = rng.uniform(0.2, 1.0, size=500)
    out = report.plot_compute_histogram(cf, tmp_path / "h.png", title="t")
    assert out == str(tmp_path / "h.png")
    img = _check_png(out)
    assert img.shape[:2] == (420, 640)
    assert _no_temp_files(tmp_path)


def test_compute_histogram_accepts_list_and_edges(tmp_path):
    out = report.plot_compute_histogram(
        [1.0, 1.0 + 1e-9, 0.5], str(tmp_path / "h.png")
    )
    _check_png(out)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "compute_fraction"),
        ([0.5, float("nan")], "compute_fraction"),
        ([0.5, float("inf")], "compute_fraction"),
        ([0.5, 1.5], "compute_fraction"),
        ([[0.5, 0.2]], "compute_fraction"),
        (["a", "b"], "compute_fraction"),
    ],
)
def test_compute_histogram_invalid(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        report.plot_compute_histogram(bad, tmp_path / "h.png")
    assert os.listdir(tmp_path) == []


def test_missing_parent_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.plot_compute_histogram([0.5], tmp_path / "no" / "h.png")


# --- plot_extreme_images ----------------------------------------------------


def _fake_data(rng, n, channels):
    shape = (n, 12, 12) if channels is None else (n, 12, 12, channels)
    images = rng.uniform(size=shape).astype("float32")
    labels = rng.integers(0, 3, size=n)
    preds = labels.copy()
    preds[::3] = (preds[::3] + 1) % 3  # Some wrong predictions.
    cf = rng.uniform(0.1, 1.0, size=n)
    return images, labels, preds, cf


@pytest.mark.parametrize("channels", [1, 3, None])
def test_extreme_images(tmp_path, rng, channels):
    images, labels, preds, cf = _fake_data(rng, 40, channels)
    out = report.plot_extreme_images(
        images, labels, preds, cf, tmp_path / "x.png",
        class_names=["cat", "dog", "ship"], n=16,
    )
    _check_png(out, min_h=400, min_w=600)
    assert _no_temp_files(tmp_path)


def test_extreme_images_fewer_than_2n(tmp_path, rng):
    images, labels, preds, cf = _fake_data(rng, 5, 3)
    out = report.plot_extreme_images(
        images, labels, preds, cf, tmp_path / "x.png", n=16
    )
    _check_png(out)
    # A single image also works.
    out = report.plot_extreme_images(
        images[:1], labels[:1], preds[:1], cf[:1], tmp_path / "one.png"
    )
    _check_png(out, min_h=100, min_w=100)


def test_extreme_images_one_hot_and_scores(tmp_path, rng):
    images, labels, preds, cf = _fake_data(rng, 10, 1)
    one_hot = np.eye(3)[labels]
    scores = rng.normal(size=(10, 3))
    out = report.plot_extreme_images(
        images, one_hot, scores, cf, tmp_path / "x.png", n=4
    )
    _check_png(out)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("labels", np.zeros(9, dtype=int), "labels"),
        ("predictions", np.zeros(11, dtype=int), "predictions"),
        ("compute_fraction", np.full(9, 0.5), "compute_fraction"),
        ("compute_fraction", np.r_[np.full(9, 0.5), np.nan],
         "compute_fraction"),
        ("images", np.zeros((10, 12, 12, 2)), "images"),
        ("images", np.full((10, 12, 12, 3), 255.0), "images"),
        ("images", np.zeros((0, 12, 12, 3)), "images"),
        ("labels", np.full(10, 0.5), "labels"),
        ("n", 0, "n"),
        ("class_names", ["only-one"], "class_names"),
    ],
)
def test_extreme_images_invalid(tmp_path, rng, field, value, match):
    images, labels, preds, cf = _fake_data(rng, 10, 3)
    kwargs = dict(
        images=images, labels=labels, predictions=preds, compute_fraction=cf,
        path=tmp_path / "x.png", n=4, class_names=None,
    )
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        report.plot_extreme_images(**kwargs)
    assert os.listdir(tmp_path) == []


# --- plot_accuracy_vs_compute -----------------------------------------------


def test_accuracy_vs_compute(tmp_path):
    curves = {
        "RNP": [(0.8, 0.92), (0.3, 0.85), (0.5, 0.90)],  # Unsorted on input.
        "static": np.array([[0.3, 0.80], [0.6, 0.88]]),
        "single": [(0.4, 0.7)],
    }
    out = report.plot_accuracy_vs_compute(
        curves, tmp_path / "a.png", title="CIFAR-10",
        reference={"full network": (1.0, 0.93)},
    )
    _check_png(out)
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "curves, reference, match",
    [
        ({}, None, "curves"),
        ([(0.5, 0.9)], None, "curves"),
        ({"a": []}, None, "curves"),
        ({"a": [(0.5, float("nan"))]}, None, "curves"),
        ({"a": [(0.5, 0.9, 1.0)]}, None, "curves"),
        ({"a": [(0.5, 91.0)]}, None, "fraction"),
        ({"a": [(0.5, 0.9)]}, {"full": (1.0,)}, "reference"),
        ({"a": [(0.5, 0.9)]}, {"full": (1.0, float("inf"))}, "reference"),
        ({"a": [(0.5, 0.9)]}, [(1.0, 0.9)], "reference"),
    ],
)
def test_accuracy_vs_compute_invalid(tmp_path, curves, reference, match):
    with pytest.raises(ValueError, match=match):
        report.plot_accuracy_vs_compute(
            curves, tmp_path / "a.png", reference=reference
        )
    assert os.listdir(tmp_path) == []


# --- plot_differences -------------------------------------------------------


def test_differences(tmp_path):
    groups = {"p=-0.1": [1.2, -0.4, 2.0, 2.0], "p=-0.25": np.array([0.5]), "p=-0.3": [0, 1]}
    out = report.plot_differences(groups, tmp_path / "g.png", title="gaps", ylabel="points", threshold=1.0)
    _check_png(out)
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "groups, threshold, match",
    [
        ({}, None, "groups"),
        ([1.0, 2.0], None, "groups"),
        ({"a": []}, None, "groups"),
        ({"a": [1.0, float("nan")]}, None, "finite"),
        ({"a": [[1.0, 2.0]]}, None, "1-D"),
        ({"a": [1.0]}, float("inf"), "threshold"),
        ({"a": [1.0]}, "1", "threshold"),
    ],
)
def test_differences_invalid(tmp_path, groups, threshold, match):
    with pytest.raises(ValueError, match=match):
        report.plot_differences(groups, tmp_path / "g.png", threshold=threshold)
    assert os.listdir(tmp_path) == []


# --- plot_action_histogram --------------------------------------------------


def test_action_histogram(tmp_path, rng):
    raw = rng.uniform(size=(13, 4))
    shares = raw / raw.sum(axis=1, keepdims=True)
    out = report.plot_action_histogram(shares, tmp_path / "act.png")
    _check_png(out)
    out = report.plot_action_histogram(
        [[1.0], [1.0]], tmp_path / "k1.png", layer_names=["conv1", "conv2"],
        title="k=1",
    )
    _check_png(out)
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "shares, match",
    [
        ([[0.5, 0.4]], "sum to 1"),
        ([[1.5, -0.5]], "non-negative"),
        ([0.5, 0.5], "shares"),
        (np.zeros((0, 4)), "shares"),
        ([[np.nan, 1.0]], "shares"),
    ],
)
def test_action_histogram_invalid(tmp_path, shares, match):
    with pytest.raises(ValueError, match=match):
        report.plot_action_histogram(shares, tmp_path / "act.png")
    with pytest.raises(ValueError, match="layer_names"):
        report.plot_action_histogram(
            [[1.0]], tmp_path / "act.png", layer_names=["a", "b"]
        )
    assert os.listdir(tmp_path) == []


# --- format_table -----------------------------------------------------------


def test_format_table_exact():
    rows = [
        {"model": "RNP (k=4)", "acc": 0.912345, "macs": 1234567, "ok": True},
        {"model": "full", "acc": np.float32(0.5), "macs": np.int64(40)},
        {"model": "a|b", "acc": 12345.678, "macs": None, "extra": 1},
    ]
    expected = "\n".join([
        "| model     |       acc |    macs | ok   |",
        "| --------- | --------: | ------: | ---- |",
        "| RNP (k=4) |    0.9123 | 1234567 | True |",
        "| full      |       0.5 |      40 |      |",
        "| a\\|b      | 1.235e+04 |         |      |",
    ])
    assert report.format_table(rows, ["model", "acc", "macs", "ok"]) == expected


def test_format_table_small():
    table = report.format_table([{"x": 1, "y": 2.0}], ["y", "x"])
    assert table == "|   y |   x |\n| --: | --: |\n|   2 |   1 |"
    assert report.format_table([], ["a"]) == "| a   |\n| --- |"


@pytest.mark.parametrize(
    "rows, columns, match",
    [
        ([{"a": 1}], [], "columns"),
        ([{"a": 1}], "a", "columns"),
        ({"a": 1}, ["a"], "rows"),
        ([{"a": 1}, 3], ["a"], "rows"),
    ],
)
def test_format_table_invalid(rows, columns, match):
    with pytest.raises(ValueError, match=match):
        report.format_table(rows, columns)


def test_matplotlib_only_imported_lazily():
    # Importing rnp_tf pulls in keras (which itself imports matplotlib), so
    # check the source instead: no module-level matplotlib import and no
    # global backend switch in report.py / io_utils.py.
    import ast

    from rnp_tf import io_utils

    for module in (report, io_utils):
        with open(module.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.startswith("matplotlib") for n in names), names
        assert "matplotlib.use(" not in ast.unparse(tree)
