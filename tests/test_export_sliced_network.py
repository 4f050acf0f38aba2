"""export.sliced_network: the sliced graphs (batched, single, full) against model.rollout, on the one rollout."""

import os

import numpy as np
import pytest
import tensorflow as tf

from export import sliced_network
from export import verification


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tf(net, fn_name):
    """`run(images, forced, penalty=None)` over a traced SlicedNetwork function (penalty an input)."""
    t = net.num_prunable
    h, w, c = net.image_shape
    batch = None if fn_name.startswith("batched") else 1
    method = getattr(net, fn_name.removesuffix("_nchw").removesuffix("_onnx"))
    if fn_name.endswith("_nchw"):  # the layout the ONNX exports compute in
        graph = method

        def method(images, forced, penalty):
            return graph(images, forced, penalty, channels_first=True)

    if fn_name == "batched_onnx":  # what `rnp.onnx` is traced from: empty groups skipped by `tf.cond`
        def method(images, forced, penalty):
            return net.batched(images, forced, penalty, channels_first=True, skip_empty=True)

    fn = tf.function(
        method,
        input_signature=[
            tf.TensorSpec([batch, h, w, c], tf.float32),
            tf.TensorSpec([batch, t], tf.int32),
            tf.TensorSpec([None], tf.float32),
        ],
        autograph=False,
    )

    def run(images, forced=None, penalty=None):
        p = np.full([1], net.penalty_setting if penalty is None else penalty, np.float32)
        if batch is None:
            f = np.zeros((1, t), np.int32) if forced is None else forced
            return {k: v.numpy() for k, v in fn(images, f, p).items()}
        zeros = np.zeros((1, t), np.int32)
        outs = [fn(images[i : i + 1], zeros if forced is None else forced[i : i + 1], p) for i in range(len(images))]
        return {k: np.concatenate([o[k].numpy() for o in outs]) for k in outs[0]}

    return run


def test_batched_and_single_graphs_match_rollout_for_every_action_tuple(export_model):
    model = export_model()
    net = sliced_network.SlicedNetwork(model)
    images = verification.parity_images(net, 12)
    tuples = verification.action_tuples(net.num_prunable, net.groups)
    assert len(tuples) == net.groups**3
    for name in ("batched", "batched_nchw", "single"):
        result = verification.check_artifact(name, model, run_tf(net, name), images, tuples)
        assert result["greedy"]["action_agreement"] == 1.0
        assert result["greedy"]["distinct_action_tuples"] > 1
        assert result["forced"]["distinct_action_tuples"] == len(tuples)
        assert result["forced"]["max_abs_logit_diff"] <= verification.ATOL


def test_penalty_is_an_input_of_both_graphs(export_model):
    """Re-pricing of the Q-values follows a tensor penalty."""
    model = export_model()
    net = sliced_network.SlicedNetwork(model)
    knob = verification.knob_inputs(net, 8)
    assert knob[0]["penalty"] == pytest.approx(model.penalty_setting)
    assert knob[1]["penalty"] != pytest.approx(knob[0]["penalty"]) and knob[1]["actions_differ"]
    # the agent is monotone in the penalty: a cheaper one is found
    assert knob[1]["penalty"] < knob[0]["penalty"]
    assert verification.cheaper_penalty(model, knob[0]["images"])[1] >= 0.25
    tuples = verification.action_tuples(net.num_prunable, net.groups)[:8]
    for name in ("batched", "single"):
        result = verification.check_artifact(name, model, run_tf(net, name), knob[0]["images"], tuples, knob=knob)
        assert [r["action_agreement"] for r in result["knob"]] == [1.0, 1.0]
    assert model.penalty_setting == pytest.approx(knob[0]["penalty"])  # restored after the checks


@pytest.mark.parametrize("layout", ["spatial", "channel"])
def test_flatten_head_and_compute_cap_follow_rollout(export_model, layout):
    backbone = {
        "stages": [
            {"type": "conv", "filters": 8},
            {"type": "pool", "size": 2},
            {"type": "conv", "filters": 8},
            {"type": "conv", "filters": 16},
            {"type": "pool", "size": 2},
            {"type": "conv", "filters": 16},
        ],
        "head": {"pooling": "flatten", "hidden": [16], "dropout": 0.5, "layout": layout},
    }
    model = export_model(backbone, seed=1)
    assert model.plan.head.layout == layout and model.plan.head.spatial == 4
    if hasattr(model, "set_compute_cap"):
        model.set_compute_cap(0.45)
    net = sliced_network.SlicedNetwork(model)
    images = verification.parity_images(net, 12)
    tuples = verification.action_tuples(net.num_prunable, net.groups)
    result = verification.check_artifact("flatten", model, run_tf(net, "batched"), images, tuples)
    assert result["greedy"]["action_agreement"] == 1.0
    if hasattr(model, "set_compute_cap"):
        macs = verification.reference(model, images)["macs"]
        assert macs.max() <= 0.45 * model.full_macs * (1 + 1e-6)


def test_mac_tables_equal_model_macs(export_model):
    model = export_model()
    net = sliced_network.SlicedNetwork(model)
    tuples = verification.action_tuples(3, net.groups)
    np.testing.assert_allclose(net.macs_of(tuples), model.macs(tuples).numpy(), rtol=1e-6)


def test_residual_graphs_match_rollout_for_every_action_tuple(residual_model):
    """Bottlenecks (projection with stride 2, identity) in the batch-1 If tree, gather/scatter and full graphs."""
    model = residual_model()
    assert not model.plan.is_chain and model.num_prunable == 4
    net = sliced_network.SlicedNetwork(model)
    assert sorted(net.tails) == [1, 3] and net.head_group is None  # each block's last conv; a full-width head
    images = verification.parity_images(net, 12)
    tuples = verification.action_tuples(net.num_prunable, net.groups)
    assert len(tuples) == net.groups**4 and [1, 1, 1, 1] in tuples.tolist()
    # batch 1: the k * k alternating tuples still run every branch of every tree (all-ones too)
    pairs = verification.action_tuples(net.num_prunable, net.groups, limit=16)
    assert [1, 1, 1, 1] in pairs.tolist()
    for name, forced in (("batched", tuples), ("single", pairs)):
        result = verification.check_artifact(name, model, run_tf(net, name), images[:6], forced, per_tuple=1)
        assert result["greedy"]["action_agreement"] == 1.0
        assert result["greedy"]["distinct_action_tuples"] > 1
        assert result["forced"]["distinct_action_tuples"] == len(forced)
        assert result["forced"]["max_abs_logit_diff"] <= verification.ATOL
    full = tf.function(net.full)(images)["logits"]
    ref = model.rollout(images, actions=np.full((len(images), 4), net.groups))["logits"]
    np.testing.assert_allclose(full, ref, atol=verification.ATOL)
    np.testing.assert_allclose(net.macs_of(tuples), model.macs(tuples).numpy(), rtol=1e-6)


def test_residual_graphs_restricted_to_one_tuple(residual_model):
    """A network restricted to one action tuple (`bench.export`'s files): each conv has one input width."""
    model = residual_model(groups=4)
    forced = np.array([[2, 3, 1, 2]], np.int32)
    net = sliced_network.SlicedNetwork(model, action_tuples=forced.tolist())
    images = verification.parity_images(net, 2)
    ref = model.rollout(images, actions=np.repeat(forced, 2, axis=0))["logits"].numpy()
    for name in ("single", "batched"):
        run = run_tf(net, name)
        got = np.concatenate([run(images[i : i + 1], forced)["logits"] for i in range(2)])
        np.testing.assert_allclose(got, ref, atol=verification.ATOL)


@pytest.mark.parametrize("batch", [1, 7, pytest.param(64, marks=pytest.mark.slow)])
def test_residual_batched_graph_at_any_batch(residual_model, check_residual_batches, batch):
    """Per-sample actions in one batch: most (previous action, action) groups and input widths are empty."""
    model = residual_model()
    net = sliced_network.SlicedNetwork(model)
    for name in ("batched", "batched_nchw", "batched_onnx"):
        check_residual_batches(model, run_tf(net, name), verification.parity_images(net, 8), batch)


def test_residual_stretches_split_at_convs_that_follow_an_action(residual_model):
    """What the TFLite signatures run between two action-dependent convs."""
    net = sliced_network.SlicedNetwork(residual_model())
    kinds = {key: [op[0] for op in ops] for key, ops in net.stretches.items()}
    # zero padding, the stem, its pool, then the first block opens (projection shortcut)
    assert kinds["stem"] == ["map", "conv", "map", "open"] and net.stretches["stem"][0][1][0] == "pad"
    assert kinds[("conv", 0)] == kinds[("conv", 1)] == []
    assert kinds[("tail", 1)] == ["residual", "open"] and kinds[("tail", 3)] == ["residual"]
    assert net.decides == {"stem": 0, ("conv", 0): 1, ("tail", 1): 2, ("conv", 2): 3}
    assert net.opens_block("stem") and net.closes_block(("tail", 1)) and net.opens_block(("tail", 1))
    assert net.block_out[("tail", 1)] == (4, 4, 8)


def test_mobilenet_graphs_match_rollout_for_every_action_pair(mobilenet_model):
    """Inverted residuals (expansion 1, identity, stride 2) in the batch-1 If tree, gather/scatter and full graphs."""
    model = mobilenet_model()
    assert model.num_prunable == 4
    net = sliced_network.SlicedNetwork(model)
    # each pruned block's depthwise conv and projection run on its expansion's prefix
    assert {t: [layer.name for layer in layers] for t, layers in net.tails.items()} == {
        t: [f"block{t + 2}_depthwise", f"block{t + 2}_project"] for t in range(3)
    }
    images = verification.parity_images(net, 12)
    pairs = verification.action_tuples(net.num_prunable, net.groups, limit=16)
    assert [1, 1, 1, 1] in pairs.tolist() and [net.groups] * 4 in pairs.tolist()
    for name in ("batched", "single"):
        result = verification.check_artifact(name, model, run_tf(net, name), images[:6], pairs, per_tuple=1)
        assert result["greedy"]["action_agreement"] == 1.0
        assert result["greedy"]["distinct_action_tuples"] > 1
        assert result["forced"]["distinct_action_tuples"] == len(pairs)
        assert result["forced"]["max_abs_logit_diff"] <= verification.ATOL
    full = tf.function(net.full)(images)["logits"]
    ref = model.rollout(images, actions=np.full((len(images), 4), net.groups))["logits"]
    np.testing.assert_allclose(full, ref, atol=verification.ATOL)
    tuples = verification.action_tuples(net.num_prunable, net.groups)
    np.testing.assert_allclose(net.macs_of(tuples), model.macs(tuples).numpy(), rtol=1e-6)


@pytest.mark.parametrize("batch", [1, 7, pytest.param(64, marks=pytest.mark.slow)])
def test_mobilenet_batched_graph_at_any_batch(mobilenet_model, check_residual_batches, batch):
    """Per-sample actions in one batch: one gather/scatter group per action runs a whole inverted residual."""
    model = mobilenet_model()
    net = sliced_network.SlicedNetwork(model)
    for name in ("batched", "batched_nchw", "batched_onnx"):
        check_residual_batches(model, run_tf(net, name), verification.parity_images(net, 8), batch)


def test_mobilenet_stretches_split_at_each_expansion_and_its_tail(mobilenet_model):
    """The stretches: `conv{t}` the expansion, `tail{t}` the depthwise conv, projection and sum."""
    net = sliced_network.SlicedNetwork(mobilenet_model())
    kinds = {key: [op[0] for op in ops] for key, ops in net.stretches.items()}
    # the stem, the unpruned first block (its depthwise conv and projection in full) and its sum, then block 2 opens
    assert kinds["stem"] == ["conv", "open", "conv", "conv", "add", "open"]
    assert sliced_network.is_depthwise(net.stretches["stem"][2][1].layer)
    assert all(kinds[("conv", t)] == [] for t in range(4))
    assert kinds[("tail", 0)] == ["add"] and kinds[("tail", 1)] == ["open"] and kinds[("tail", 2)] == ["add"]
    assert net.decides == {"stem": 0, ("tail", 0): 1, ("tail", 1): 2, ("tail", 2): 3}
    assert net.opens_block("stem") and net.closes_block(("tail", 0)) and not net.opens_block(("tail", 0))
    assert net.opens_block(("tail", 1)) and net.closes_block(("tail", 2))
    assert net.block_out[("tail", 2)] == (8, 8, 12)


@pytest.mark.parametrize("kind", ["bottleneck", "mobilenet"])
def test_skipped_blocks_in_every_graph(kind, skippable_bottleneck, residual_model, tiny_mobilenet, half_skipping):
    """Block skips (greedy and forced, mixed in one batch) in the batch-N and batch-1 graphs, both layouts."""
    if kind == "bottleneck":  # a skippable identity bottleneck (decisions 0, 1), then a prunable conv
        model = residual_model(backbone=skippable_bottleneck, image_shape=(8, 8, 1))
    else:  # the two expanded inverted residuals with an identity shortcut skippable (decisions 0 and 2)
        for i in (2, 4):
            tiny_mobilenet["stages"][i]["skippable"] = True
        model = residual_model(backbone=tiny_mobilenet, image_shape=(32, 32, 3))
    first = min(model.plan.skippable)
    half_skipping(model, first)
    net = sliced_network.SlicedNetwork(model)
    images = verification.parity_images(net, 8)
    greedy = verification.reference(model, images)["actions"][:, first]
    assert 0 < (greedy == 0).mean() < 1  # the agent skips some images and not others
    tuples = verification.action_tuples(net.num_prunable, net.groups, limit=16, skips=model.plan.skip_columns)
    assert (tuples[:, first] == 0).any() and (tuples[:, first] > 0).any()
    for name in ("batched", "batched_nchw", "batched_onnx", "single", "single_nchw"):
        result = verification.check_artifact(name, model, run_tf(net, name), images, tuples)
        assert result["greedy"]["action_agreement"] == 1.0 and result["forced"]["action_agreement"] == 1.0
    np.testing.assert_allclose(net.macs_of(tuples), model.macs(tuples).numpy(), rtol=1e-6)




def test_network_restricted_to_tuples_with_skips(skippable_bottleneck, residual_model):
    """A network built for a few tuples, some skipping the block (what `bench.export` writes); 0 elsewhere is refused."""
    model = residual_model(groups=4, backbone=skippable_bottleneck, image_shape=(8, 8, 1))
    tuples = np.array([[0, 0, 2], [3, 1, 2], [0, 0, 4]], np.int32)
    net = sliced_network.SlicedNetwork(model, action_tuples=tuples)
    assert net.branches(1) == [(3, 1)] and net.branches(0) == [(4, 3)]
    images = verification.parity_images(net, 4)
    x, a = verification.forced_inputs(images, tuples)
    for name in ("batched_nchw", "single"):  # forced only: the greedy choice may take a branch not built
        got = run_tf(net, name)(x, verification.exported_forced(a, model.plan))
        assert verification.compare(name, verification.reference(model, x, a), got)["action_agreement"] == 1.0
    with pytest.raises(ValueError, match="0 at a skippable block"):
        sliced_network.SlicedNetwork(model, action_tuples=[[1, 1, 0]])


def test_tied_decisions_in_every_graph(residual_model, tied_residual):
    """Deciding once per stage: no agent weights for the tied decisions; every graph gives the leaders' actions."""
    model = residual_model(backbone=tied_residual)
    net = sliced_network.SlicedNetwork(model)
    assert ("encoder", 2) not in net._arrays and ("encoder", 1) in net._arrays
    assert net.decides == {"stem": 0, ("conv", 0): 1}  # no decision where the identity block opens
    images = verification.parity_images(net, 8)
    tuples = verification.action_tuples(net.num_prunable, net.groups, limit=16)
    for name in ("batched", "batched_nchw", "batched_onnx", "single", "single_nchw"):
        result = verification.check_artifact(name, model, run_tf(net, name), images, tuples)
        assert result["greedy"]["action_agreement"] == 1.0 and result["forced"]["action_agreement"] == 1.0
        assert result["greedy"]["distinct_action_tuples"] > 1
    np.testing.assert_allclose(net.macs_of(tuples), model.macs(tuples).numpy(), rtol=1e-6)
