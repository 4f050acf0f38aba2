import itertools

import keras
import numpy as np
import pytest

import rnp_tf
from bench.models import randomise_batchnorm
from rnp_tf import backbones


def test_cifar_cnn_scale_of_the_paper():
    model = rnp_tf.RNPModel(backbones.cifar_cnn(), image_shape=(32, 32, 3), num_classes=10)
    assert model.num_prunable == 3
    assert 30e6 < model.full_macs < 40e6  # the paper's CIFAR net: tens of millions of MACs


def test_vgg16_description():
    spec = backbones.validate_backbone(backbones.vgg16(), groups=4)
    convs = [s for s in spec["stages"] if s["type"] == "conv"]
    assert len(convs) == 13 and [c["prunable"] for c in convs] == [False] + [True] * 12
    assert spec["head"] == {"pooling": "flatten", "layout": "channel", "hidden": [4096, 4096], "dropout": 0.5}


def test_head_layout_defaults_to_spatial_and_is_checked():
    spec = {"stages": [{"type": "conv", "filters": 8}, {"type": "conv", "filters": 8}], "head": {"pooling": "flatten"}}
    assert backbones.validate_backbone(spec, groups=4)["head"]["layout"] == "spatial"
    spec["head"]["layout"] = "rows"
    with pytest.raises(ValueError, match=r"head.layout must be 'spatial' or 'channel'. Received: layout='rows'"):
        backbones.validate_backbone(spec, groups=4)


def test_resnet50_description_and_block_rules():
    spec = backbones.validate_backbone(backbones.resnet50(), groups=4)
    blocks = [s for s in spec["stages"] if s["type"] == "bottleneck"]
    assert len(blocks) == 16 and all(b["prunable"] == [True, True] for b in blocks)
    bad = {"stages": [{"type": "conv", "filters": 8}, {"type": "conv", "filters": 8, "prunable": True},
                      {"type": "bottleneck", "filters": 4}], "head": {}}
    with pytest.raises(ValueError, match="residual sum"):
        backbones.validate_backbone(bad, groups=4)


def small_residual():
    return {
        "stages": [
            {"type": "conv", "filters": 8},
            {"type": "bottleneck", "filters": 4, "projection": True},
            {"type": "bottleneck", "filters": 4, "projection": False},
            {"type": "pool", "size": 2, "mode": "avg"},
            {"type": "conv", "filters": 8},
        ],
        "head": {"pooling": "gap"},
    }


def test_residual_model_masked_equals_sliced_for_every_action():
    model = rnp_tf.RNPModel(small_residual(), image_shape=(8, 8, 3), num_classes=5, groups=2)
    assert model.num_prunable == 5 and not model.is_chain
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32")
    tuples = np.array(list(itertools.product((1, 2), repeat=5)))
    masked = model.rollout(x, actions=tuples)
    sliced = model.sliced_rollout(x, actions=tuples)
    np.testing.assert_allclose(sliced["logits"], masked["logits"], atol=1e-5)


def test_residual_mac_count_by_hand():
    model = rnp_tf.RNPModel(small_residual(), image_shape=(8, 8, 3), num_classes=5, groups=2)

    def hand(a1, b1, a2, b2, c):
        stem = 64 * 9 * 3 * 8
        block1 = 64 * (8 * 2 * a1) + 64 * 9 * (2 * a1) * (2 * b1) + 64 * (2 * b1) * 16 + 64 * 8 * 16
        block2 = 64 * 16 * (2 * a2) + 64 * 9 * (2 * a2) * (2 * b2) + 64 * (2 * b2) * 16
        last = 16 * 9 * 16 * (4 * c)
        return stem + block1 + block2 + last + (4 * c) * 5

    tuples = np.array(list(itertools.product((1, 2), repeat=5)))
    np.testing.assert_allclose(model.macs(tuples).numpy(), [hand(*t) for t in tuples])


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"stages": [{"type": "pool"}]}, "conv"),
        ({"stages": [{"type": "conv", "filters": 8}, {"type": "dense"}]}, "Stage type"),
        ({"stages": [{"type": "conv", "filters": 8}, {"type": "conv", "filters": 6}]}, "divide"),
        ({"stages": [{"type": "conv", "filters": 8, "prunable": True}]}, "stem"),
        ({"stages": [{"type": "conv", "filters": 8}, {"type": "conv", "filters": 8}], "head": {"pooling": "max"}}, "pooling"),
        ({"stages": [{"type": "conv", "filters": 8}]}, "prunable"),
        ("vgg", "dict"),
        (
            {"stages": [{"type": "conv", "filters": 8}, {"type": "inverted_residual", "filters": 8, "expansion": 1,
                                                         "prunable": True}]},
            r"stages\[1\] has no expansion conv",
        ),
        (
            {"stages": [{"type": "conv", "filters": 6}, {"type": "inverted_residual", "filters": 8, "expansion": 3}]},
            r"expanded channels.*stages\[1\]",
        ),
        (
            {"stages": [{"type": "conv", "filters": 8}, {"type": "inverted_residual", "filters": 8, "strides": 2,
                                                         "residual": True}]},
            r"stages\[1\].residual",
        ),
        (
            {"stages": [{"type": "conv", "filters": 8}, {"type": "conv", "filters": 8, "prunable": True},
                        {"type": "inverted_residual", "filters": 8}]},
            r"stages\[1\] feeds a residual block",
        ),
        (
            {"stages": [{"type": "conv", "filters": 8}, {"type": "inverted_residual", "filters": 8, "padding": "full"}]},
            r"stages\[1\].padding",
        ),
    ],
)
def test_bad_descriptions(spec, match):
    with pytest.raises(ValueError, match=match):
        backbones.validate_backbone(spec, groups=4)


def test_get_backbone():
    assert backbones.get_backbone("vgg16", width_multiplier=0.25)["stages"][0]["filters"] == 16
    with pytest.raises(ValueError, match="Unknown backbone"):
        backbones.get_backbone("alexnet")


def test_vgg_cifar_is_a_wider_deeper_chain():
    spec = rnp_tf.vgg_cifar()
    assert [s["filters"] for s in spec["stages"] if s["type"] == "conv"] == [48, 48, 96, 96, 192, 192]
    model = rnp_tf.RNPModel(spec, image_shape=(32, 32, 3), num_classes=10)
    small = rnp_tf.RNPModel(rnp_tf.cifar_cnn(), image_shape=(32, 32, 3), num_classes=10)
    assert model.num_prunable == 5 and model.is_chain
    assert 2.0 < model.full_macs / small.full_macs < 3.0
    with pytest.raises(ValueError, match="width"):
        rnp_tf.vgg_cifar(0)


def test_mobilenet_v2_description():
    """Keras's MobileNetV2: a ReLU6 stem, 17 inverted residuals, Conv_1, 17 decisions."""
    spec = backbones.validate_backbone(backbones.mobilenet_v2(), groups=4)
    stem, *blocks, last = spec["stages"]
    assert (stem["filters"], stem["strides"], stem["activation"], stem["prunable"]) == (32, 2, "relu6", False)
    assert [b["filters"] for b in blocks] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    assert [b["strides"] for b in blocks] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert [b["expansion"] for b in blocks] == [1] + [6] * 16
    assert [b["prunable"] for b in blocks] == [False] + [True] * 16
    assert (last["filters"], last["kernel_size"], last["prunable"]) == (1280, 1, True)
    assert backbones.get_backbone("mobilenet_v2", alpha=0.35)["stages"][0]["filters"] == 16  # Keras' rounding
    assert backbones.mobilenet_v2(alpha=1.4)["stages"][-1]["filters"] == 1792
    with pytest.raises(ValueError, match="alpha"):
        backbones.mobilenet_v2(alpha=0)


def test_resnet_cifar_is_a_small_bottleneck_resnet():
    """Three stages of two bottlenecks at CIFAR scale: 12 decisions, MACs near `cifar_cnn`'s, widths checked."""
    spec = backbones.validate_backbone(rnp_tf.resnet_cifar(), groups=4)
    stem, *blocks = spec["stages"]
    assert (stem["filters"], stem["prunable"]) == (64, False)
    assert [b["strides"] for b in blocks] == [1, 1, 2, 1, 2, 1]
    assert [b["projection"] for b in blocks] == [False, False, True, False, True, False]
    model = rnp_tf.RNPModel(spec, image_shape=(32, 32, 3), num_classes=10)
    small = rnp_tf.RNPModel(rnp_tf.cifar_cnn(), image_shape=(32, 32, 3), num_classes=10)
    assert model.num_prunable == 12 and 0.8 < model.full_macs / small.full_macs < 1.0
    assert backbones.get_backbone("resnet_cifar", widths=(8, 8), blocks=1)["stages"][-1]["filters"] == 8
    with pytest.raises(ValueError, match="blocks"):
        rnp_tf.resnet_cifar(blocks=0)
    with pytest.raises(ValueError, match="divide"):
        backbones.validate_backbone(rnp_tf.resnet_cifar(widths=(6, 8, 8)), groups=4)


@pytest.mark.parametrize("name, skips", [("resnet50", 12), ("mobilenet_v2", 10), ("resnet_cifar", 4)])
def test_skippable_marks_every_identity_block_and_the_plan_accepts_them(name, skips):
    """`skippable=True` marks exactly the blocks with an identity shortcut; the plan would refuse any other."""
    from rnp_tf import plan as plan_lib

    spec = backbones.validate_backbone(backbones.get_backbone(name, skippable=True), groups=4)
    built = plan_lib.build_plan(spec, (32, 32, 3), num_classes=10, groups=4)
    assert len(built.skippable) == skips and built.q_width == 5  # k Q-values and the skip's
    plain = plan_lib.build_plan(backbones.validate_backbone(backbones.get_backbone(name), groups=4),
                                (32, 32, 3), num_classes=10, groups=4)
    assert not plain.skippable and plain.q_width == 4


def test_inverted_residual_model_masked_equals_sliced_and_reloads(tiny_mobilenet, tmp_path):
    model = rnp_tf.RNPModel(tiny_mobilenet, image_shape=(32, 32, 3), num_classes=5)
    randomise_batchnorm(model, 0)
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype("float32")
    forced = np.array([[1, 1, 1, 1], [4, 4, 4, 4], [2, 3, 1, 4], [4, 1, 2, 3], [3, 4, 4, 1], [1, 2, 3, 2]])
    masked = model.rollout(x, actions=forced)
    sliced = model.sliced_rollout(x, actions=forced)
    np.testing.assert_allclose(sliced["logits"], masked["logits"], atol=1e-4)
    np.testing.assert_allclose(sliced["macs"], masked["macs"])
    assert len(set(masked["logits"].numpy()[:, 0].round(4))) == 6
    path = tmp_path / "mobilenet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.rollout(x, actions=forced)["logits"], masked["logits"], atol=1e-6)
    np.testing.assert_array_equal(loaded.rollout(x)["actions"], model.rollout(x)["actions"])


@pytest.mark.parametrize("name, decisions, leaders", [("resnet50", 32, 8), ("mobilenet_v2", 17, 7),
                                                     ("resnet_cifar", 12, 6)])
def test_decide_per_stage_ties_the_later_blocks_of_every_stage(name, decisions, leaders):
    """Every identity block after a block of its kind is tied: one decision per stage (per block position)."""
    from rnp_tf import plan as plan_lib

    original = backbones.get_backbone(name)
    spec = rnp_tf.decide_per_stage(original)
    assert not any("tied" in s for s in original["stages"])  # a copy
    built = plan_lib.build_plan(backbones.validate_backbone(spec, groups=4), (32, 32, 3), num_classes=10, groups=4)
    assert built.num_decisions == decisions and len(built.leaders) == leaders
    assert all(leader in built.leaders and leader < t for t, leader in built.tied_to.items())
    with pytest.raises(ValueError, match="skippable; tied blocks cannot be skipped"):
        rnp_tf.decide_per_stage(backbones.get_backbone(name, skippable=True))
    with pytest.raises(ValueError, match=r"`tied` \(a bool\) is a key of a bottleneck"):
        backbones.validate_backbone({"stages": [{"type": "conv", "filters": 8, "tied": True}]}, groups=4)
