"""rnp_tf.stages: which stages a config trains and their optimizers."""

import keras

from rnp_tf import stages
from rnp_tf.run_config import TrainConfig


def test_stage_plan():
    config = TrainConfig(model_dir="run", pretrain_epochs=2, rnp_epochs=3)
    assert stages.stage_plan(config) == [("backbone", 2), ("reorder", 1), ("rnp", 3)]
    config = TrainConfig(model_dir="run", reorder=False, robust_epochs=4, rnp_epochs=0)
    assert stages.stage_plan(config) == [("robust", 4)]


def test_make_optimizer():
    assert isinstance(stages.make_optimizer("sgd", 0.1), keras.optimizers.SGD)
    assert isinstance(stages.make_optimizer("rmsprop", 0.1), keras.optimizers.RMSprop)
    assert isinstance(stages.make_optimizer("adam", 0.1), keras.optimizers.Adam)
