"""bench.latency: the agent-alone timing function on chain and residual plans."""

import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from bench import latency
from test_engine import RESIDUAL


@pytest.mark.parametrize("spec", [rnp_tf.cifar_cnn((8, 8, 16, 16)), RESIDUAL], ids=["chain", "residual"])
@pytest.mark.parametrize("batch", [1, 5])
def test_agent_alone_runs_on_maps_shaped_as_the_engine_holds_them(spec, batch):
    tf.random.set_seed(0)
    model = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=3)
    engine = rnp_tf.InferenceEngine(model)
    actions = np.random.default_rng(0).integers(1, 5, size=(batch, model.num_prunable)).astype(np.int32)
    agent, call = latency.agent_alone_function(engine, actions)
    chosen = np.asarray(agent())
    assert chosen.shape == (batch, model.num_prunable) and chosen.min() >= 1 and chosen.max() <= 4
    call()
