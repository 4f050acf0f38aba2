"""bench.agent_cost: every part runs, the earlier pooling decides as the engine does, stages are found."""

import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from bench import agent_cost
from test_engine import RESIDUAL


@pytest.mark.parametrize(
    "spec,batch", [(rnp_tf.cifar_cnn((8, 8, 16, 16)), 1), (RESIDUAL, 3)], ids=["chain-batch1", "residual-batch3"]
)
def test_parts_run_and_the_earlier_pooling_chooses_the_same_actions(spec, batch):
    tf.random.set_seed(0)
    model = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=3)
    engine = rnp_tf.InferenceEngine(model)
    fns, baselines = agent_cost.part_functions(engine, batch)
    assert set(baselines) == set(agent_cost.PARTS) and set(baselines.values()) <= set(fns)
    for fn in fns.values():
        fn()
    np.testing.assert_array_equal(fns["agent"](), fns["agent_before"]())  # same maps, same actions
    h = tf.random.stateless_normal([2, 4, 6, 5], seed=[0, 1])
    np.testing.assert_allclose(agent_cost.matvec_spatial_mean(h), tf.reduce_mean(h, [1, 2]), rtol=1e-5, atol=1e-6)


def test_stage_decisions_pick_the_largest_map_of_each_spatial_size():
    model = rnp_tf.RNPModel(RESIDUAL, image_shape=(8, 8, 1), num_classes=3)
    stages = agent_cost.stage_decisions(model)
    # the bottlenecks' decisions at 8x8, then the conv after the pool at 4x4
    assert len(stages) == 2 and stages[-1] == model.num_prunable - 1
