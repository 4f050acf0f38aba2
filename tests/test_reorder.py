import numpy as np
import pytest

import rnp_tf
from rnp_tf.reorder import channel_importance
from rnp_tf.reorder import reorder_channels


def randomised(model, seed=0):
    rng = np.random.default_rng(seed)
    for conv in model.convs:
        conv.kernel.assign(rng.normal(0, 0.3, conv.kernel.shape) * rng.uniform(0.1, 2, conv.kernel.shape[-1]))
        if conv.normalization:
            shape = conv.gamma.shape
            conv.gamma.assign(rng.uniform(0.2, 2.0, shape))
            conv.beta.assign(rng.normal(0, 0.3, shape))
            conv.moving_mean.assign(rng.normal(0, 0.3, shape))
            conv.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    return model


def spec_with_head(pooling, layout="spatial"):
    spec = rnp_tf.cifar_cnn((8, 8, 16, 16))
    spec["head"] = {"pooling": pooling, "hidden": [12] if pooling == "flatten" else [], "dropout": 0.0,
                    "layout": layout}
    return spec


@pytest.mark.parametrize("pooling,layout", [("gap", "spatial"), ("flatten", "spatial"), ("flatten", "channel")])
def test_reordering_keeps_full_width_logits_and_q_values(pooling, layout):
    model = randomised(rnp_tf.RNPModel(spec_with_head(pooling, layout), image_shape=(8, 8, 1), num_classes=10))
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype("float32")
    full = np.full((16, 3), 4)
    before = model.rollout(x, actions=full)["logits"].numpy()
    perms = reorder_channels(model)
    after = model.rollout(x, actions=full)["logits"].numpy()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert len(perms) == 3 and any((p != np.arange(len(p))).any() for p in perms)
    for conv in model.prunable:
        importance = channel_importance(conv)
        assert np.all(np.diff(importance) <= 1e-6)  # strongest filters first


def test_reordering_changes_narrow_prefixes_only():
    model = randomised(rnp_tf.RNPModel(spec_with_head("gap"), image_shape=(8, 8, 1), num_classes=10))
    x = np.random.default_rng(2).normal(size=(8, 8, 8, 1)).astype("float32")
    narrow = np.ones((8, 3), np.int32)
    before = model.rollout(x, actions=narrow)["logits"].numpy()
    reorder_channels(model)
    assert not np.allclose(model.rollout(x, actions=narrow)["logits"].numpy(), before)


def test_reordering_keeps_the_agents_full_width_decisions():
    model = randomised(rnp_tf.RNPModel(spec_with_head("gap"), image_shape=(8, 8, 1), num_classes=10))
    for decoder in model.agent.decoders:
        decoder.kernel.assign(np.random.default_rng(3).normal(0, 1, decoder.kernel.shape))
    x = np.random.default_rng(4).normal(size=(8, 8, 8, 1)).astype("float32")
    greedy_before = model.rollout(x)["q_values"].numpy()[:, 0]  # first decision sees the stem output only
    reorder_channels(model)
    np.testing.assert_allclose(model.rollout(x)["q_values"].numpy()[:, 0], greedy_before, atol=1e-5)


def test_reordering_a_residual_model():
    spec = {
        "stages": [
            {"type": "conv", "filters": 8},
            {"type": "bottleneck", "filters": 4, "projection": True},
            {"type": "conv", "filters": 8},
        ],
        "head": {"pooling": "gap"},
    }
    model = randomised(rnp_tf.RNPModel(spec, image_shape=(8, 8, 3), num_classes=4, groups=2))
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype("float32")
    full = np.full((4, model.num_prunable), 2)
    before = model.rollout(x, actions=full)["logits"].numpy()
    reorder_channels(model)
    np.testing.assert_allclose(model.rollout(x, actions=full)["logits"].numpy(), before, atol=1e-4)


def test_reordering_an_inverted_residual_permutes_its_depthwise_conv(tiny_mobilenet):
    model = randomised(rnp_tf.RNPModel(tiny_mobilenet, image_shape=(32, 32, 3), num_classes=10))
    x = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype("float32")
    full, narrow = np.full((4, 4), 4), np.full((4, 4), 2)
    before, before_narrow = (model.rollout(x, actions=a)["logits"].numpy() for a in (full, narrow))
    reorder_channels(model)
    np.testing.assert_allclose(model.rollout(x, actions=full)["logits"].numpy(), before, rtol=1e-4, atol=1e-4)
    assert not np.allclose(model.rollout(x, actions=narrow)["logits"].numpy(), before_narrow)


def test_reordering_moves_the_same_head_rows_in_both_layouts():
    """A "spatial" and a "channel" model of the same weights stay equal at every width after reordering."""
    spatial = randomised(rnp_tf.RNPModel(spec_with_head("flatten", "spatial"), image_shape=(8, 8, 1), num_classes=10))
    channel = rnp_tf.RNPModel(spec_with_head("flatten", "channel"), image_shape=(8, 8, 1), num_classes=10)
    channel.set_weights(spatial.get_weights())
    head = channel.plan.head
    assert head.spatial == 4
    head.layers[0].kernel.assign(head.relayout(spatial.head_layers[0].kernel, "spatial", "channel"))
    reorder_channels(spatial)
    reorder_channels(channel)
    x = np.random.default_rng(5).normal(size=(6, 8, 8, 1)).astype("float32")
    actions = np.random.default_rng(6).integers(1, 5, (6, 3))
    np.testing.assert_allclose(
        channel.rollout(x, actions=actions)["logits"], spatial.rollout(x, actions=actions)["logits"], atol=1e-5
    )
