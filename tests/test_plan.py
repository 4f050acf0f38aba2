"""NetworkPlan: steps, decisions, widths and the one MAC table."""

import dataclasses

import numpy as np
import pytest

import rnp_tf
from rnp_tf import backbones
from rnp_tf.plan import BlockStep
from rnp_tf.layers import GatedDepthwiseConv2D
from rnp_tf.plan import ConvStep
from rnp_tf.plan import InvertedResidualStep
from rnp_tf.plan import MapStep
from rnp_tf.plan import build_plan


def plan_of(spec, image_shape=(8, 8, 1), groups=4):
    return build_plan(backbones.validate_backbone(spec, groups), image_shape, num_classes=10, groups=groups)


def test_chain_plan_steps_decisions_and_widths():
    plan = plan_of(backbones.cifar_cnn((8, 8, 16, 16)))
    assert [type(s).__name__ for s in plan.steps] == ["ConvStep", "MapStep", "ConvStep", "ConvStep", "MapStep",
                                                      "ConvStep"]
    convs = [s for s in plan.steps if isinstance(s, ConvStep)]
    assert [(s.decision, s.in_ref) for s in convs] == [(None, None), (0, None), (1, 0), (2, 1)]
    assert plan.num_decisions == 3 and plan.is_chain
    assert plan.feature_channels == [8, 8, 16]
    assert plan.head.in_ref == 2 and plan.head.pooling == "gap" and plan.head.spatial == 1
    assert plan.stem is plan.convs[0] and plan.prunable == [s.layer for s in convs[1:]]


def test_macs_are_the_sum_of_the_layers_at_their_prefixes():
    plan = plan_of(backbones.cifar_cnn((8, 8, 16, 16)))
    actions = np.array([[1, 2, 3], [4, 4, 4], [2, 1, 1]])
    stem, c1, c2, c3 = plan.convs
    classifier = plan.head.layers[-1]
    for row, total in zip(actions, plan.macs(actions).numpy()):
        a1, a2, a3 = row
        expected = (stem.full_macs + c1.macs(4, a1) + c2.macs(a1, a2) + c3.macs(a2, a3)
                    + a3 * c3.group_size * classifier.units)
        assert total == pytest.approx(expected, rel=1e-6)
    assert plan.full_macs == pytest.approx(float(plan.macs([[4, 4, 4]])[0]))
    assert plan.min_macs == pytest.approx(float(plan.macs([[1, 1, 1]])[0]))


def test_conv_and_head_tables_agree_with_macs():
    plan = plan_of(backbones.cifar_cnn((8, 8, 16, 16)))
    k = plan.groups
    table = plan.conv_macs_table(1)
    for p in range(1, k + 1):
        for a in range(1, k + 1):
            assert table[(p - 1) * k + a - 1] == pytest.approx(float(plan.prunable[1].macs(p, a)))
    first = plan.head.layers[0]
    np.testing.assert_allclose(plan.head_macs_table(), np.arange(1, k + 1) * plan.prunable[-1].group_size * first.units)


def test_residual_plan_has_blocks_and_is_not_a_chain():
    spec = {"stages": [{"type": "conv", "filters": 16},
                       {"type": "bottleneck", "filters": 4, "expansion": 4, "projection": False},
                       {"type": "bottleneck", "filters": 8, "strides": 2, "projection": True}],
            "head": {"pooling": "gap"}}
    plan = plan_of(spec)
    blocks = [s for s in plan.steps if isinstance(s, BlockStep)]
    assert len(blocks) == 2 and blocks[0].shortcut is None and blocks[1].shortcut is not None
    assert [(s.decision, s.in_ref) for s in blocks[0].body] == [(0, None), (1, 0), (None, 1)]
    assert (blocks[1].shortcut.decision, blocks[1].shortcut.in_ref) == (None, None)
    assert plan.num_decisions == 4 and not plan.is_chain
    # creation order: each block's body, then its projection
    names = [c.name for c in plan.convs]
    assert names.index("block2_c") < names.index("block2_shortcut")


def test_map_steps_and_flatten_head():
    plan = plan_of(backbones.vgg16(width_multiplier=1 / 16, hidden=(32,)), image_shape=(64, 64, 3))
    assert sum(isinstance(s, MapStep) for s in plan.steps) == 5
    assert plan.head.pooling == "flatten" and plan.head.in_shape == (2, 2, 32) and plan.head.spatial == 4
    first = plan.head.layers[0]
    assert first.kernel.shape[0] == 4 * 32
    k = plan.groups
    np.testing.assert_allclose(plan.head_macs_table(), np.arange(1, k + 1) * 8 * 4 * 32)


def test_model_uses_its_plan():
    model = rnp_tf.RNPModel(backbones.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10)
    assert model.convs == model.plan.convs and model.num_prunable == model.plan.num_decisions
    np.testing.assert_allclose(model.macs([[2, 3, 1]]), model.plan.macs([[2, 3, 1]]))


def test_inverted_residual_plan_refs_and_macs_by_hand(tiny_mobilenet):
    """The expansion decides; the depthwise conv and the projection read its prefix (MobileNetV2)."""
    plan = plan_of(tiny_mobilenet, image_shape=(32, 32, 3))
    blocks = [s for s in plan.steps if isinstance(s, InvertedResidualStep)]
    assert [b.residual for b in blocks] == [True, True, False, True] and not plan.is_chain
    assert [len(b.body) for b in blocks] == [2, 3, 3, 3]  # expansion 1: depthwise + projection only
    assert isinstance(blocks[0].body[0].layer, GatedDepthwiseConv2D)
    assert [(s.decision, s.in_ref) for s in blocks[0].body] == [(None, None), (None, None)]
    for t, block in enumerate(blocks[1:]):
        assert [(s.decision, s.in_ref) for s in block.body] == [(t, None), (None, t), (None, t)]
    assert plan.num_decisions == 4 and plan.feature_channels == [8, 8, 12, 12] and plan.head.in_ref == 3

    def hand(a0, a1, a2, a3):
        stem = 16 * 16 * 9 * 3 * 8
        block1 = 16 * 16 * 9 * 8 + 16 * 16 * 8 * 8
        block2 = 16 * 16 * 8 * (8 * a0) + 16 * 16 * 9 * (8 * a0) + 16 * 16 * (8 * a0) * 8
        block3 = 16 * 16 * 8 * (8 * a1) + 8 * 8 * 9 * (8 * a1) + 8 * 8 * (8 * a1) * 12  # stride-2 depthwise
        block4 = 8 * 8 * 12 * (6 * a2) + 8 * 8 * 9 * (6 * a2) + 8 * 8 * (6 * a2) * 12
        last = 8 * 8 * 12 * (4 * a3)
        return stem + block1 + block2 + block3 + block4 + last + (4 * a3) * 10

    tuples = np.array([[4, 4, 4, 4], [1, 1, 1, 1], [2, 4, 1, 3], [3, 1, 4, 2]])
    np.testing.assert_allclose(plan.macs(tuples).numpy(), [hand(*t) for t in tuples])


def test_mobilenet_v2_macs_match_keras():
    """About 300M multiply-accumulates at 224x224, as Keras quotes for MobileNetV2 1.0."""
    plan = build_plan(backbones.validate_backbone(backbones.mobilenet_v2(), 4), (224, 224, 3), 1000, 4)
    assert plan.num_decisions == 17 and 295e6 < plan.full_macs < 305e6
    assert plan.min_macs < 0.4 * plan.full_macs


def vgg_models(seed=0):
    """A small VGG-16 in both head layouts, the same weights (fc1's rows moved)."""
    spec = backbones.vgg16(width_multiplier=1 / 16, hidden=(32, 32))
    models = {}
    for layout in ("spatial", "channel"):
        spec["head"]["layout"] = layout
        models[layout] = rnp_tf.RNPModel(spec, image_shape=(64, 64, 3), num_classes=10)  # a 2x2 last map
    spatial, channel = models["spatial"], models["channel"]
    rng = np.random.default_rng(seed)
    spatial.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in spatial.get_weights()])
    channel.set_weights(spatial.get_weights())
    head = channel.plan.head
    head.layers[0].kernel.assign(head.relayout(spatial.head_layers[0].kernel, "spatial", "channel"))
    return spatial, channel


def test_head_layouts_give_the_same_logits():
    spatial, channel = vgg_models()
    assert spatial.plan.head.layout == "spatial" and channel.plan.head.layout == "channel"
    assert not np.allclose(spatial.head_layers[0].kernel.numpy(), channel.head_layers[0].kernel.numpy())
    x = np.random.default_rng(1).uniform(size=(3, 64, 64, 3)).astype("float32")
    for actions in ([[4] * 12] * 3, [[1] * 12] * 3, np.random.default_rng(2).integers(1, 5, (3, 12))):
        np.testing.assert_allclose(
            channel.rollout(x, actions=actions)["logits"], spatial.rollout(x, actions=actions)["logits"], atol=1e-4
        )


def test_head_rows_read_a_channel_prefix():
    plan = plan_of(backbones.vgg16(width_multiplier=1 / 16, hidden=(32,)), image_shape=(64, 64, 3))
    h = np.random.default_rng(5).normal(size=(2, 2, 2, 32)).astype("float32")
    kernel = plan.head.layers[0].kernel.numpy()  # layout "channel": row c * 4 + position
    head = plan.head
    assert head.layout == "channel" and head.contiguous
    spatial_kernel = head.relayout(kernel, "channel", "spatial")
    np.testing.assert_array_equal(spatial_kernel, kernel.reshape(32, 2, 2, -1).transpose(1, 2, 0, 3).reshape(128, -1))
    np.testing.assert_array_equal(head.relayout(spatial_kernel, "spatial", "channel"), kernel)
    spatial = dataclasses.replace(head, layout="spatial")
    assert not spatial.contiguous
    for channels in (8, 24, 32):
        want = np.einsum("nyxc,cyxu->nu", h[..., :channels], kernel.reshape(32, 2, 2, -1)[:channels])
        rows = head.rows(kernel, channels)
        np.testing.assert_array_equal(rows, kernel[: channels * 4])
        np.testing.assert_allclose(head.flatten(h[..., :channels]).numpy() @ rows, want, rtol=1e-5, atol=1e-5)
        rows = spatial.rows(spatial_kernel, channels)
        np.testing.assert_allclose(spatial.flatten(h[..., :channels]).numpy() @ rows, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Received: layout='nchw'"):
        head.relayout(kernel, "nchw", "channel")


# An identity bottleneck (decisions 0, 1) made skippable, then a prunable conv (decision 2).
SKIPPABLE = {"stages": [{"type": "conv", "filters": 16},
                        {"type": "bottleneck", "filters": 4, "expansion": 4, "projection": False, "skippable": True},
                        {"type": "conv", "filters": 8}],
             "head": {"pooling": "gap"}}


def test_skipped_block_costs_nothing_by_hand():
    plan = plan_of(SKIPPABLE)
    stem, a, b, c, last = plan.convs
    assert plan.skippable == {0} and plan.skipped_by == {1: 0} and plan.skip_columns == {0: 0, 1: 0}
    assert [s.skippable for s in plan.steps if isinstance(s, BlockStep)] == [True]
    classifier = plan.head.layers[-1]
    head = 3 * last.group_size * classifier.units
    skipped = stem.full_macs + last.macs(4, 3) + head
    taken = skipped + a.macs(4, 2) + b.macs(2, 1) + c.macs(1, 4)
    # a skip costs 0 whatever its later action says (the cap's completions put 1 there)
    np.testing.assert_allclose(plan.macs([[0, 0, 3], [0, 1, 3], [2, 1, 3]]).numpy(), [skipped, skipped, taken],
                               rtol=1e-6)
    np.testing.assert_array_equal(plan.live([[0, 0, 3], [2, 1, 3]]).numpy(), [[1, 0, 1], [1, 1, 1]])
    assert plan_of(backbones.cifar_cnn((8, 8, 16, 16))).live([[1, 2, 3]]) is None


def test_inverted_residual_can_be_skipped(tiny_mobilenet):
    tiny_mobilenet["stages"][2]["skippable"] = True  # expansion 4, identity shortcut: decision 0
    plan = plan_of(tiny_mobilenet, image_shape=(32, 32, 3))
    assert plan.skippable == {0} and plan.skipped_by == {}
    block = [s for s in plan.steps if isinstance(s, InvertedResidualStep)][1]
    full, skipped = plan.macs([[4, 4, 4, 4], [0, 4, 4, 4]]).numpy()
    branch = sum(float(s.layer.macs(4, 4)) for s in block.body)  # expand, depthwise, project at full width
    assert full - skipped == pytest.approx(branch, rel=1e-6)


@pytest.mark.parametrize(
    "index, stage, match",
    [
        (1, {"type": "bottleneck", "filters": 4, "expansion": 4, "projection": True, "skippable": True},
         r"stages\[1\]: only a block with an identity shortcut"),
        (1, {"type": "bottleneck", "filters": 4, "expansion": 4, "projection": False, "prunable": [False, True],
             "skippable": True}, r"stages\[1\]: only a block with an identity shortcut and a prunable first conv"),
        (1, {"type": "bottleneck", "filters": 4, "expansion": 4, "projection": False, "skippable": "yes"},
         r"stages\[1\]\.skippable must be a bool"),
        (2, {"type": "conv", "filters": 8, "skippable": True}, r"stages\[2\]: only a bottleneck or an inverted"),
    ],
)
def test_skippable_is_refused_where_there_is_no_branch_to_skip(index, stage, match):
    spec = {"stages": [dict(s) for s in SKIPPABLE["stages"]], "head": {"pooling": "gap"}}
    spec["stages"][index] = stage
    with pytest.raises(ValueError, match=match):
        plan_of(spec)


@pytest.mark.parametrize("name", ["cifar_cnn", "mobilenet_v2"])
def test_full_macs_of_a_description_equal_the_models(name):
    """`plan.full_macs` counts a description without building a model; it equals the model's count."""
    spec = rnp_tf.get_backbone(name, **({"alpha": 0.35} if name == "mobilenet_v2" else {}))
    model = rnp_tf.RNPModel(spec, image_shape=(32, 32, 3), num_classes=7)
    assert rnp_tf.plan.full_macs(spec, (32, 32, 3), 7) == model.full_macs


def test_tied_blocks_take_their_leaders_decisions_and_prices():
    """`tied_to` maps each tied decision to the first block of its run; `live` is 0 there; weights count them."""
    stages = [{"type": "conv", "filters": 8}] + [
        {"type": "bottleneck", "filters": 4, "projection": False, "expansion": 2, **({"tied": True} if i else {})}
        for i in range(3)
    ]
    plan = plan_of({"stages": stages, "head": {"pooling": "gap"}})
    assert plan.tied_to == {2: 0, 3: 1, 4: 0, 5: 1} and plan.leaders == [0, 1]
    assert [plan.decision_weight(t) for t in range(6)] == [3, 3, 1, 1, 1, 1]
    np.testing.assert_array_equal(plan.live([[2, 3, 2, 3, 2, 3]]).numpy(), [[1, 1, 0, 0, 0, 0]])
    # MACs count what runs: a tied decision at its leader's action, whatever it is given
    np.testing.assert_array_equal(plan.macs([[2, 3, 1, 1, 4, 4]]).numpy(), plan.macs([[2, 3, 2, 3, 2, 3]]).numpy())
    assert plan_of(backbones.cifar_cnn((8, 8, 16, 16))).leaders == [0, 1, 2]
    stages[1] = {"type": "conv", "filters": 8, "prunable": False}  # a tied block after a conv
    with pytest.raises(ValueError, match="A tied block takes the decisions of the block just before it"):
        plan_of({"stages": stages, "head": {"pooling": "gap"}})
    stages[1:3] = [{"type": "bottleneck", "filters": 4, "projection": False, "expansion": 2, "skippable": True},
                   {"type": "bottleneck", "filters": 4, "projection": False, "expansion": 2, "tied": True}]
    with pytest.raises(ValueError, match="cannot be both tied and skippable"):
        plan_of({"stages": stages, "head": {"pooling": "gap"}})
