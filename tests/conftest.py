"""Shared pytest fixtures: two logical CPUs for tf.distribute, shared data."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# MirroredStrategy tests need two devices; logical devices must be configured
# before TensorFlow initialises its runtime, i.e. before any test runs.
_cpus = tf.config.list_physical_devices("CPU")
if tf.config.get_logical_device_configuration(_cpus[0]) is None:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


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
