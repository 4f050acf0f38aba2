"""python -m export.onnx: gather/scatter model (dynamic batch, empty groups skipped by If), batch-1 If model, full model."""

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import sliced_network

from export import verification
from export import onnx as onnx_export


pytestmark = pytest.mark.slow  # every test runs the exporter and tf2onnx (the `exported` fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, write_checkpoint):
    ckpt = tmp_path_factory.mktemp("ckpt")
    model = write_checkpoint(ckpt)
    report = onnx_export.export_onnx(ckpt, num_parity_images=8, timing_runs=2, log=lambda m: None)
    return model, ckpt / "export", report


def test_files_pass_the_full_checker(exported):
    _, out, report = exported
    assert sorted(os.listdir(out)) == ["export_manifest.json", "full.onnx", "onnx.json", "rnp.onnx", "rnp_b1.onnx"]
    for name in ("rnp.onnx", "rnp_b1.onnx", "full.onnx"):
        proto = onnx.load(str(out / name))
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version >= 13
    # rnp.onnx: an `If` around each group's convs skips the empty ones; no loop
    assert "If" in report["operators"]["rnp.onnx"] and "Loop" not in report["operators"]["rnp.onnx"]
    assert "If" in report["operators"]["rnp_b1.onnx"]
    assert set(report["latency_ms"]) == {"rnp.onnx", "rnp_b1.onnx", "full.onnx"}


def test_interface_names_and_dynamic_batch(exported):
    _, out, _ = exported
    proto = onnx.load(str(out / "rnp.onnx"))
    inputs = {v.name: v for v in proto.graph.input}
    assert set(inputs) == {"images", "forced_actions", "penalty"}
    assert inputs["images"].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.name for o in proto.graph.output} == {"actions", "logits", "macs"}
    for output in proto.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = onnx_export.session(str(out / "rnp.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["images"]  # forced_actions and penalty are optional


def test_penalty_input_in_both_models(exported, check_penalty_input):
    """`penalty` fed at two settings is `set_penalty(p)` + `rollout`; its default (initializer) is the setting."""
    model, out, report = exported
    for name in ("rnp.onnx", "rnp_b1.onnx"):
        checks = report["parity"][name]["knob"]  # the export's own check ran at two penalties
        assert checks[0]["penalty"] == pytest.approx(0.3) and checks[1]["penalty"] < 0.3 and checks[1]["actions_differ"]
        proto = onnx.load(str(out / name))
        defaults = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        np.testing.assert_allclose(defaults["penalty"], [0.3], rtol=1e-6)
        assert onnx_export.default_penalty(proto) == pytest.approx(0.3)
        run = onnx_export.runner(onnx_export.session(str(out / name)), batch1=name == "rnp_b1.onnx")
        check_penalty_input(model, lambda x, p, run=run: tuple(run(x, penalty=p)[k] for k in ("logits", "actions", "macs")))
    # rnp.onnx: one penalty per image
    sess = onnx_export.session(str(out / "rnp.onnx"))
    x = np.random.default_rng(11).normal(size=(16, 8, 8, 1)).astype("float32") * 2
    per_image = np.where(np.arange(16) % 2 == 0, 0.3, -0.2).astype("float32")
    (got,) = sess.run(["actions"], {"images": x, "penalty": per_image})
    (setting,) = sess.run(["actions"], {"images": x})
    (cheap,) = sess.run(["actions"], {"images": x, "penalty": np.array([-0.2], np.float32)})
    np.testing.assert_array_equal(got, np.where((np.arange(16) % 2 == 0)[:, None], setting, cheap))


def test_every_action_tuple_in_both_models(exported):
    model, out, _ = exported
    all_tuples = verification.action_tuples(3, model.groups)
    x = np.random.default_rng(2).normal(size=(len(all_tuples), 8, 8, 1)).astype("float32")
    ref = verification.reference(model, x, all_tuples)
    batched = onnx_export.runner(onnx_export.session(str(out / "rnp.onnx")))
    single = onnx_export.runner(onnx_export.session(str(out / "rnp_b1.onnx")), batch1=True)
    for run in (batched, single):
        got = run(x, all_tuples)
        np.testing.assert_array_equal(got["actions"], all_tuples)
        np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4)
        np.testing.assert_allclose(got["macs"], ref["macs"], rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_with_empty_groups(exported, batch):
    model, out, _ = exported
    run = onnx_export.runner(onnx_export.session(str(out / "rnp.onnx")))
    net = sliced_network.SlicedNetwork(model)
    images = verification.parity_images(net, 8)
    result = onnx_export.check_dynamic_batch(model, run, images, sizes=(batch,))[str(batch)]
    assert result["samples"] == batch and result["action_agreement"] == 1.0
    # greedy only, without the optional input; at batch 1 or 7 most of the
    # 16 (previous action, action) groups of a layer are empty
    x = images[np.arange(batch) % len(images)]
    got = run(x)
    ref = model.rollout(x)
    np.testing.assert_array_equal(got["actions"], ref["actions"])
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4)
    groups = {(int(a), int(b)) for a, b in ref["actions"].numpy()[:, :2]}
    assert len(groups) < 16


def test_full_model_is_the_unpruned_network(exported):
    model, out, _ = exported
    x = np.random.default_rng(3).normal(size=(7, 8, 8, 1)).astype("float32")
    sess = onnx_export.session(str(out / "full.onnx"))
    ref = model.rollout(x, actions=np.full((7, 3), model.groups))
    np.testing.assert_allclose(sess.run(["logits"], {"images": x})[0], ref["logits"], atol=1e-4)


def test_compute_cap_holds_in_onnxruntime(exported):
    """Both graphs choose through `RNPModel.greedy_q`, so the cap is frozen into them."""
    model, _, _ = exported
    images = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    cap = 0.45
    assert verification.reference(model, images)["macs"].max() > cap * model.full_macs  # the cap binds
    model.set_compute_cap(cap)
    try:
        net = sliced_network.SlicedNetwork(model)
        ref = verification.reference(model, images)
        for proto, batch1 in ((onnx_export.convert_batched(net), False), (onnx_export.convert_single(net), True)):
            got = onnx_export.runner(onnx_export.session(proto.SerializeToString()), batch1=batch1)(images)
            np.testing.assert_array_equal(got["actions"], ref["actions"])
            np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4)
            assert got["macs"].max() <= cap * model.full_macs * (1 + 1e-5)
    finally:
        model.set_compute_cap(None)


def test_kernels_are_bound_where_they_are_used(exported):
    """tf2onnx converts a graph without large weights; each branch's kernel is an initializer of its own `If` branch."""
    model, out, _ = exported
    net = sliced_network.SlicedNetwork(model)
    import tensorflow as tf

    fn, sig, kernels = net.kernels_as_inputs(net.full, [tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    # every prunable conv and every dense kernel is an input, nothing large is a constant
    assert sorted(kernels) == sorted(
        ["kernel_stem"]
        + [f"kernel_conv{t}_p{net.groups}_in{net.in_channels(t, net.groups)}_out{net.out_channels[t]}" for t in range(3)]
        + [f"kernel_head0_rows{net._arrays['head0'][0].shape[0]}"]
        + [f"kernel_head_{i}_rows{net._arrays[('head', i)][0].shape[0]}" for i in range(1, len(model.head_layers))]
    )
    graph = fn.get_concrete_function().graph.as_graph_def()
    const_shapes = {
        tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim) for node in graph.node if node.op == "Const"
    }
    assert not const_shapes & {a.shape for a in kernels.values()}
    x = np.random.default_rng(5).normal(size=(3, 8, 8, 1)).astype("float32")
    with net.constants():
        np.testing.assert_allclose(fn(x, *kernels.values())["logits"], net.full(x)["logits"], atol=1e-5)

    proto = onnx.load(str(out / "rnp_b1.onnx"))
    assert not [v.name for v in proto.graph.input if v.name.startswith("kernel_")]
    nested = [i for g in list(onnx_export.graphs(proto.graph))[1:] for i in g.initializer]
    # a conv kernel of one branch: stored transposed (OIHW) in that branch, not in the main graph
    conv_kernels = [i for i in nested if len(i.dims) == 4]
    assert len(conv_kernels) == sum(len(net.branches(t)) for t in range(3))
    assert len([i for i in proto.graph.initializer if len(i.dims) == 4]) == 1  # the stem's
    # no Transpose is left on a kernel: each Conv reads its weight initializer directly
    for g in onnx_export.graphs(proto.graph):
        inits = {i.name: i for i in g.initializer}
        for node in g.node:
            if node.op_type == "Conv":
                assert node.input[1] in inits and len(inits[node.input[1]].dims) == 4


@pytest.fixture(scope="module", params=["residual", pytest.param("mobilenet", marks=pytest.mark.slow)])
def block_exported(request, tmp_path_factory):
    """The small residual model and the small MobileNetV2, exported (their own parity checks passed)."""
    ckpt = tmp_path_factory.mktemp(request.param)
    model = request.getfixturevalue(f"write_{request.param}_checkpoint")(ckpt)
    report = onnx_export.export_onnx(ckpt, num_parity_images=8, max_forced_tuples=16, timing_runs=0, log=lambda m: None)
    return model, ckpt / "export", report


@pytest.mark.parametrize("batch", [1, 7, pytest.param(64, marks=pytest.mark.slow)])
def test_block_models_match_rollout(block_exported, check_residual_batches, batch):
    """Bottlenecks and inverted residuals in rnp.onnx (gather/scatter, any batch), rnp_b1.onnx (If) and full.onnx."""
    model, out, report = block_exported
    assert report["parity"]["rnp.onnx"]["dynamic_batch"]["64"]["action_agreement"] == 1.0
    assert "If" in report["operators"]["rnp.onnx"] and "If" in report["operators"]["rnp_b1.onnx"]
    images = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    check_residual_batches(model, onnx_export.runner(onnx_export.session(str(out / "rnp.onnx"))), images, batch)
    if batch == 1:
        single = onnx_export.runner(onnx_export.session(str(out / "rnp_b1.onnx")), batch1=True)
        check_residual_batches(model, single, images, 7)  # one image per call
        full = onnx_export.session(str(out / "full.onnx"))
        x = images[:7]
        np.testing.assert_allclose(full.run(["logits"], {"images": x})[0],
                                   model.rollout(x, actions=np.full((7, 4), model.groups))["logits"], atol=1e-4)


def test_skipped_blocks_in_both_models(tmp_path, residual_model, skippable_bottleneck, half_skipping):
    """A model with a skippable bottleneck: the exporter's own parity (skip tuples included), then greedy batches.

    The agent skips about half of the images (`half_skipping`), so one
    batch mixes skipped and computed samples in `rnp.onnx`, and `rnp_b1.onnx`
    takes both sides of the skip's `If`.
    """
    model = residual_model(groups=4, backbone=skippable_bottleneck, image_shape=(8, 8, 1))  # > 16 tuples with skips
    half_skipping(model, 0)
    model.save(str(tmp_path / "model.keras"))
    report = onnx_export.export_onnx(tmp_path, num_parity_images=8, max_forced_tuples=16, timing_runs=0,
                                     log=lambda m: None)
    forced = report["parity"]["rnp.onnx"]["forced"]
    assert forced["action_agreement"] == 1.0 and forced["distinct_action_tuples"] > 16  # with the skipped ones
    x = np.random.default_rng(4).normal(size=(16, 8, 8, 1)).astype("float32")
    ref = verification.reference(model, x)
    assert 0 < (ref["actions"][:, 0] == 0).mean() < 1
    for name, batch1 in (("rnp.onnx", False), ("rnp_b1.onnx", True)):
        run = onnx_export.runner(onnx_export.session(str(tmp_path / "export" / name)), batch1=batch1)
        verification.compare(name, ref, run(x))
    from export import trt

    # the batch-N graph TensorRT takes (empty groups on a row of padding, as `export.trt` builds it): no If and
    # only supported operators
    proto = onnx_export.convert_batched(sliced_network.SlicedNetwork(model), skip_empty=False)
    assert trt.check_tensorrt_compatible(proto) == [] and "If" not in onnx_export.operators(proto)
