"""Shared pytest fixtures: two logical CPUs for tf.distribute, shared data."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Under pytest-xdist one worker runs per core: one TensorFlow intra-op thread
# each (and in the subprocesses they start), not two threads per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.models import randomise_batchnorm  # noqa: E402

# MirroredStrategy tests need two devices; logical devices must be configured
# before TensorFlow initialises its runtime, i.e. before any test runs.
_cpus = tf.config.list_physical_devices("CPU")
if tf.config.get_logical_device_configuration(_cpus[0]) is None:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_module():
    """`run_module(module, *args, timeout=600)`: `python -m module args` from the repo, output captured."""
    import subprocess
    import sys

    def run(module, *args, timeout=600):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env=env)

    return run


@pytest.fixture(scope="session")
def shared_npz():
    """Returns `find(name)`: the path of ../shared/data/name, or skips the test."""

    def find(name):
        path = SHARED_DATA / name
        if not path.exists():
            pytest.skip(
                f"{path} is absent: the shared datasets sit beside the checkout in ../shared/data"
            )
        return path

    return find


@pytest.fixture(autouse=True)
def _seed():
    tf.random.set_seed(0)
    np.random.seed(0)
    import keras

    keras.utils.set_random_seed(0)


# The exporters' test models take k = 2 channel groups: an export writes a
# branch per (previous action, action) pair of every conv and verifies every
# action tuple (k^T of them), which made these tests two to three times
# slower at k = 4 without reaching code that k = 2 does not. k = 4 is covered
# by the engine's tests (`test_engine.py`: every tuple and pair, residual
# blocks) and the models' (`test_model.py`).
EXPORT_GROUPS = 2


def _small_model(backbone=None, seed=0, penalty=0.3, groups=EXPORT_GROUPS, **kwargs):
    """The exporters' test model: random BatchNorm statistics and spread decoders so actions vary."""
    import keras

    import rnp_tf

    keras.utils.set_random_seed(seed)
    model = rnp_tf.RNPModel(backbone or rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10,
                            groups=groups, **kwargs)
    randomise_batchnorm(model, seed)
    for decoder in filter(None, model.agent.decoders):
        decoder.kernel.assign(np.random.default_rng(3).normal(0, 2.0, decoder.kernel.shape))
    if penalty is not None:
        model.set_penalty(penalty)  # a saved run-time knob the exports must follow
    return model


def _write_checkpoint(directory, seed=0, make=None, groups=EXPORT_GROUPS):
    """`make(seed=seed, groups=groups)` (default `_small_model`) saved as directory/model.keras."""
    model = (make or _small_model)(seed=seed, groups=groups)
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, "model.keras"))
    return model


# The exporters' small residual backbone: zero padding and a stem, a pool, a
# bottleneck with a projection and stride 2, one with an identity shortcut
# and a global-average head (4 decisions); 16x16 RGB images.
RESIDUAL = {
    "stages": [
        {"type": "zeropad", "padding": 1},
        {"type": "conv", "filters": 8, "padding": "valid"},
        {"type": "pool", "size": 2, "mode": "max"},
        {"type": "bottleneck", "filters": 4, "strides": 2, "projection": True, "expansion": 2},
        {"type": "bottleneck", "filters": 4, "projection": False, "expansion": 2},
    ],
    "head": {"pooling": "gap"},
}


def _residual_model(seed=0, groups=EXPORT_GROUPS, penalty=0.3, backbone=None, image_shape=(16, 16, 3)):
    """The exporters' residual test model (`RESIDUAL`), random BatchNorm statistics, spread decoders."""
    import keras

    import rnp_tf

    keras.utils.set_random_seed(seed)
    model = rnp_tf.RNPModel(backbone=backbone or RESIDUAL, image_shape=image_shape, num_classes=10, groups=groups)
    randomise_batchnorm(model, seed)
    for decoder in filter(None, model.agent.decoders):
        decoder.kernel.assign(np.random.default_rng(3).normal(0, 2.0, decoder.kernel.shape))
    if penalty is not None:
        model.set_penalty(penalty)
    return model


@pytest.fixture
def tied_residual():
    """`RESIDUAL` deciding once per stage (`rnp_tf.decide_per_stage`): the identity block takes decisions 0 and 1."""
    import rnp_tf

    return rnp_tf.decide_per_stage(RESIDUAL)


@pytest.fixture(scope="session")
def residual_model():
    """Returns `make(seed=0, groups=EXPORT_GROUPS, penalty=0.3)`: the exporters' small residual RNPModel."""
    return _residual_model


@pytest.fixture(scope="session")
def write_residual_checkpoint():
    """Returns `write(directory, seed=0, groups=EXPORT_GROUPS)`: saves the small residual RNPModel as directory/model.keras."""
    return lambda directory, seed=0, groups=EXPORT_GROUPS: _write_checkpoint(directory, seed, _residual_model, groups)


def _mobilenet_model(seed=0, groups=EXPORT_GROUPS, penalty=0.3):
    """The exporters' MobileNetV2 test model (`_tiny_mobilenet()`, 32x32 RGB), as `_residual_model`."""
    return _residual_model(seed, groups, penalty, backbone=_tiny_mobilenet(), image_shape=(32, 32, 3))


@pytest.fixture(scope="session")
def mobilenet_model():
    """Returns `make(seed=0, groups=EXPORT_GROUPS, penalty=0.3)`: the exporters' small MobileNetV2 RNPModel (`tiny_mobilenet`)."""
    return _mobilenet_model


@pytest.fixture(scope="session")
def write_mobilenet_checkpoint():
    """Returns `write(directory, seed=0, groups=EXPORT_GROUPS)`: saves the small MobileNetV2 RNPModel as directory/model.keras."""
    return lambda directory, seed=0, groups=EXPORT_GROUPS: _write_checkpoint(directory, seed, _mobilenet_model, groups)


def _check_residual_batches(model, run, images, batch, forced=True):
    """An artifact's `run(images, forced=None)` on `batch` images against `model.rollout`.

    Greedy on `images` (repeated to `batch`); with `forced`, random forced
    actions and then the all-ones (smallest groups) and all-k actions.
    Identical actions, logits within 1e-4, MACs within 1e-5.
    """
    from export import verification

    x = images[np.arange(batch) % len(images)]
    checks = [("greedy", None)]
    if forced:
        rng = np.random.default_rng(batch)
        shape = (batch, model.num_prunable)
        checks += [
            ("random", rng.integers(1, model.groups + 1, size=shape).astype(np.int32)),
            ("ones", np.ones(shape, np.int32)),
            ("full", np.full(shape, model.groups, np.int32)),
        ]
    for label, actions in checks:
        ref = verification.reference(model, x, actions)
        got = run(x) if actions is None else run(x, actions)
        verification.compare(f"batch {batch} {label}", ref, got)


@pytest.fixture(scope="session")
def check_residual_batches():
    """Returns `check(model, run, images, batch, forced=True)` (see `_check_residual_batches`)."""
    return _check_residual_batches


@pytest.fixture(scope="session")
def export_model():
    """Returns `make(backbone=None, seed=0, penalty=0.3, **kwargs)`: the exporters' small RNPModel."""
    return _small_model


@pytest.fixture(scope="session")
def write_checkpoint():
    """Returns `write(directory, seed=0)`: saves a small exportable RNPModel (the exporters' tests)."""
    return _write_checkpoint


# The exporters' run-time knob: the small model's saved setting and a cheaper
# penalty at which its greedy actions differ on `_knob_images()`.
KNOB_PENALTIES = (0.3, -0.2)


def _knob_images(count=16, seed=11):
    return (np.random.default_rng(seed).normal(size=(count, 8, 8, 1)) * 2).astype("float32")


def _check_penalty_input(model, run, penalties=KNOB_PENALTIES, atol=1e-4):
    """An artifact fed each penalty reproduces `model.set_penalty(p)` + `model.rollout`, and the input matters.

    Args:
        model: the Keras model (its setting is restored).
        run: `run(images, penalty) -> (logits, actions, macs)` running the artifact.
        penalties: `(setting, cheaper)`.

    Returns:
        The artifact's mean MACs at each penalty.
    """
    x = _knob_images()
    saved = model.penalty_setting
    refs = []
    try:
        for penalty in penalties:
            model.set_penalty(penalty)
            refs.append({k: v.numpy() for k, v in model.rollout(x).items() if v is not None})
    finally:
        model.set_penalty(saved)
    # the Keras model itself switches: an artifact ignoring its input cannot pass
    assert (refs[0]["actions"] != refs[1]["actions"]).any(axis=1).mean() >= 0.25
    assert refs[1]["macs"].mean() < refs[0]["macs"].mean()
    means = []
    for penalty, ref in zip(penalties, refs):
        logits, actions, macs = run(x, penalty)
        np.testing.assert_array_equal(actions, ref["actions"], err_msg=f"penalty {penalty}")
        np.testing.assert_allclose(logits, ref["logits"], atol=atol, err_msg=f"penalty {penalty}")
        np.testing.assert_allclose(macs, ref["macs"], rtol=1e-5, err_msg=f"penalty {penalty}")
        means.append(float(np.mean(macs)))
    assert means[1] < means[0]
    return means


@pytest.fixture(scope="session")
def check_penalty_input():
    """Returns `check(model, run, penalties=KNOB_PENALTIES)`: the exporters' knob parity at two penalties."""
    return _check_penalty_input


@pytest.fixture
def tiny_mobilenet():
    """A MobileNetV2-like backbone for 32x32 images (4 decisions).

    A ReLU6 stem (stride 2), four inverted residuals: expansion 1 with an
    identity shortcut, expansion 4 with one, a stride-2 block without, and
    expansion 2 with one; then a prunable 1x1 conv feeding the head.
    """
    return _tiny_mobilenet()


def _tiny_mobilenet():
    """The backbone of the `tiny_mobilenet` fixture."""
    return {
        "stages": [
            {"type": "conv", "filters": 8, "strides": 2, "activation": "relu6"},
            {"type": "inverted_residual", "filters": 8, "expansion": 1},
            {"type": "inverted_residual", "filters": 8, "expansion": 4},
            {"type": "inverted_residual", "filters": 12, "expansion": 4, "strides": 2},
            {"type": "inverted_residual", "filters": 12, "expansion": 2},
            {"type": "conv", "filters": 16, "kernel_size": 1, "activation": "relu6"},
        ],
        "head": {"pooling": "gap"},
    }


def _half_skipping(model, t, seed=0):
    """Sets the skip's Q-value bias of decision `t` so that about half of random images skip its block."""
    import tensorflow as tf

    k = model.groups
    x = np.random.default_rng(seed).normal(size=(64, *model.image_shape)).astype("float32")
    q = model.rollout(x)["q_values"][:, t]
    g = model.greedy_q(t, q, [tf.zeros([64], tf.int32)] * t).numpy()
    decoder = model.agent.decoders[t]
    bias = decoder.bias.numpy()
    bias[k] += float(np.median(g[:, :k].max(1) - g[:, k]))
    decoder.bias.assign(bias)


@pytest.fixture(scope="session")
def half_skipping():
    """Returns `set(model, t, seed=0)` (`_half_skipping`): the agent then skips about half of the images at `t`."""
    return _half_skipping


@pytest.fixture
def skippable_bottleneck():
    """A stem, one skippable identity bottleneck (decisions 0, 1) and a prunable conv (decision 2), for 8x8x1."""
    return {
        "stages": [
            {"type": "conv", "filters": 8},
            {"type": "bottleneck", "filters": 4, "projection": False, "expansion": 2, "skippable": True},
            {"type": "conv", "filters": 8},
        ],
        "head": {"pooling": "gap"},
    }


# The heaviest test files (their summed durations, --durations=0, 2026-12-07),
# collected first: pytest-xdist's `--dist loadfile` hands files out in
# collection order, so the long ones start early on both workers and the
# light ones fill in at the end instead of one worker finishing a long file
# alone. Every other file keeps its place after them.
_HEAVY_FIRST = (
    "test_train_distributed.py", "test_engine.py", "test_train.py", "test_export_tflite.py",
    "test_export_saved_model.py", "test_model_knob.py", "test_model_training.py", "test_export_onnx.py",
    "test_bench_accuracy.py", "test_export_trt.py", "test_cli_input.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
