"""python -m export.tflite: one signature per branch, driven by rnp_tf.tflite_runner, checked in the interpreter."""

import json
import os

import numpy as np
import pytest

from export import exceptions

from export import sliced_network

from export import verification
from export import tflite
from rnp_tf import tflite_runner
from rnp_tf.tflite_runner import TFLiteRNPRunner


@pytest.fixture(scope="module")
def exported(tmp_path_factory, write_checkpoint):
    ckpt = tmp_path_factory.mktemp("ckpt")
    model = write_checkpoint(ckpt)
    report = tflite.export_tflite(ckpt, quantize="float16", num_parity_images=8, timing_runs=2, log=lambda m: None)
    return model, ckpt / "export", report


@pytest.mark.slow
def test_files_report_and_signatures(exported):
    _, out, report = exported
    assert sorted(os.listdir(out)) == ["export_manifest.json", "rnp.tflite", "rnp_float16.tflite", "tflite.json"]
    assert json.loads((out / "tflite.json").read_text())["parity"]["rnp.tflite"]["greedy"]["action_agreement"] == 1.0
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    k = runner.groups
    # stem + conv0 (input always full: k) + 2 x k^2 (previous, action) pairs + k heads + full + penalty_setting
    assert len(runner.signature_keys) == 1 + k + 2 * k**2 + k + 1 + 1
    assert (k, runner.num_prunable, runner.image_shape, runner.num_classes) == (2, 3, (8, 8, 1), 10)
    float16 = report["parity"]["rnp_float16.tflite"]
    assert float16["greedy"]["tolerance"] > verification.ATOL and 0.75 <= float16["greedy"]["action_agreement"] <= 1.0
    assert report["latency_ms"]["rnp.tflite"]["rnp_per_image"] > 0


@pytest.mark.slow
def test_runner_matches_rollout_for_every_action_tuple(exported):
    model, out, _ = exported
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    tuples = verification.action_tuples(3, runner.groups)
    x = np.random.default_rng(5).normal(size=(len(tuples), 8, 8, 1)).astype("float32")
    logits, actions, macs = runner.run(x, tuples)
    ref = model.rollout(x, actions=tuples)
    np.testing.assert_array_equal(actions, tuples)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)
    np.testing.assert_allclose(macs, ref["macs"], rtol=1e-5)
    # greedy, one image and a batch
    net = sliced_network.SlicedNetwork(model)
    images = verification.parity_images(net, 8)
    logits, actions, macs = runner.run(images)
    ref = model.rollout(images)
    np.testing.assert_array_equal(actions, ref["actions"])
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)
    assert len({tuple(a) for a in actions}) > 1
    one = runner.run_one(images[0])
    np.testing.assert_allclose(one[0], logits[0], atol=1e-6)


@pytest.mark.slow
def test_zero_copy_chaining_equals_the_signature_runners(exported):
    """One copy per signature boundary (the default) gives what the public signature runners give."""
    _, out, _ = exported
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    assert runner.zero_copy and tflite_runner._direct_wrapper(runner.interpreter) is not None  # TF's interpreter
    copying = TFLiteRNPRunner(out / "rnp.tflite", zero_copy=False)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 8, 8, 1)).astype("float32")
    k = runner.groups
    forced = rng.integers(0, k + 1, size=(6, 3))  # 0: the agent chooses
    for a, b in zip(runner.run(x, forced), copying.run(x, forced)):
        np.testing.assert_array_equal(a, b)
    # what run_one returns is the caller's: later calls (same signatures) do not overwrite it
    first = runner.run_one(x[0], [k, k, k])
    kept = [np.copy(v) for v in first]
    runner.run_one(x[1], [k, k, k])
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_runner_penalty_switches_operating_points(exported, check_penalty_input):
    """The deciding signatures take the penalty; the runner feeds `penalty=`, `set_penalty` or the file's default."""
    model, out, report = exported
    for name in ("rnp.tflite", "rnp_float16.tflite"):
        checks = report["parity"][name]["knob"]  # the export's own check ran at two penalties
        assert checks[0]["penalty"] == pytest.approx(0.3) and checks[1]["penalty"] < 0.3 and checks[1]["actions_differ"]
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    assert runner.penalty == runner.penalty_setting == pytest.approx(0.3)
    assert "penalty" in runner._inputs("stem") and "penalty" in runner._inputs(f"conv0_in{runner.groups}_out2")
    assert "penalty" not in runner._inputs("conv2_in2_out2")  # the last conv decides nothing
    check_penalty_input(model, lambda x, p: runner.run(x, penalty=p))
    x = np.random.default_rng(11).normal(size=(4, 8, 8, 1)).astype("float32") * 2
    cheap = runner.run(x, penalty=-0.2)
    runner.set_penalty(-0.2)
    np.testing.assert_array_equal(runner.run(x)[1], cheap[1])
    np.testing.assert_array_equal(TFLiteRNPRunner(out / "rnp.tflite", penalty=-0.2).run(x)[1], cheap[1])
    with pytest.raises(ValueError, match="finite float"):
        runner.set_penalty(float("nan"))


@pytest.mark.slow
def test_runner_rejects_bad_inputs(exported):
    _, out, _ = exported
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    with pytest.raises(ValueError, match="float images"):
        runner.run(np.zeros((2, 9, 8, 1), "float32"))
    with pytest.raises(ValueError, match="actions"):
        runner.run(np.zeros((2, 8, 8, 1), "float32"), actions=[[5, 1, 1], [1, 1, 1]])


@pytest.mark.slow
def test_dynamic_range_variant_within_its_tolerance(exported, tmp_path):
    model, _, _ = exported
    net = sliced_network.SlicedNetwork(model)
    path = tmp_path / "rnp_dynamic.tflite"
    path.write_bytes(tflite.convert(net, "dynamic"))
    run = tflite.runner_function(TFLiteRNPRunner(path))
    images = verification.parity_images(net, 8)
    result = verification.check_artifact("dynamic", model, run, images, verification.action_tuples(3, model.groups),
                                         quantize="dynamic")
    assert result["greedy"]["action_agreement"] >= verification.QUANTIZED_TOLERANCES["dynamic"]["min_agreement"]
    assert 0 < result["forced"]["max_abs_logit_diff"] <= result["forced"]["tolerance"]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "float16"])
def test_compute_cap_holds_in_the_interpreter(exported, tmp_path, quantize):
    """The cap's feasibility test (`RNPModel.greedy_q`) runs inside the signatures, fed the earlier actions."""
    model, _, _ = exported
    net = sliced_network.SlicedNetwork(model)
    images = verification.parity_images(net, 8)
    cap = 0.45
    assert verification.reference(model, images)["macs"].max() > cap * model.full_macs  # the cap binds
    model.set_compute_cap(cap)
    try:
        net = sliced_network.SlicedNetwork(model)
        path = tmp_path / "capped.tflite"
        path.write_bytes(tflite.convert(net, quantize))
        runner = TFLiteRNPRunner(path)
        assert "actions" in runner._inputs("conv1_in1_out2")
        quant = None if quantize == "none" else quantize
        result = verification.check_artifact("capped", model, tflite.runner_function(runner), images,
                                       verification.action_tuples(3, model.groups), quantize=quant)
        assert result["greedy"]["action_agreement"] == 1.0
        _, _, macs = runner.run(images)
        assert macs.max() <= cap * model.full_macs * (1 + 1e-5)
    finally:
        model.set_compute_cap(None)


@pytest.mark.slow
def test_large_export_is_converted_in_pieces_and_merged(exported, tmp_path):
    """With a small `chunk_mb` the signatures are converted in pieces (child processes); the merged file is the same model."""
    model, out, _ = exported
    net = sliced_network.SlicedNetwork(model)
    path = tmp_path / "merged.tflite"
    with net.recording_kernels() as kernels:
        for fn in tflite.signature_functions(net).values():
            fn.get_concrete_function()
    total = sum(a.nbytes for a in kernels.values()) / 2**20
    path.write_bytes(tflite.convert(net, chunk_mb=total * 0.6))  # two pieces, two child processes
    merged, whole = TFLiteRNPRunner(path), TFLiteRNPRunner(out / "rnp.tflite")
    assert merged.signature_keys == whole.signature_keys
    # the weights sit after the flatbuffer, each at a 64-byte boundary
    from tensorflow.lite.python import schema_py_generated as schema

    data = path.read_bytes()
    buffers = [b for b in schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0)).buffers if b.size]
    assert len(buffers) > 20 and all(b.offset % 64 == 0 and b.offset + b.size <= len(data) for b in buffers)
    images = verification.parity_images(net, 8)
    tuples = verification.action_tuples(3, model.groups, limit=16)  # the alternating tuples: every signature runs
    result = verification.check_artifact("merged", model, tflite.runner_function(merged), images, tuples)
    assert result["greedy"]["action_agreement"] == 1.0
    np.testing.assert_allclose(merged.run_full(images), whole.run_full(images), atol=1e-6)
    for name in ("stem", "conv1_in1_out2", "head_in2"):
        assert merged._inputs(name) == whole._inputs(name)


def test_merge_refuses_control_flow(tmp_path):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
    def branchy(x):
        return {"y": tf.cond(x[0] > 0, lambda: x * 2.0, lambda: x - 1.0)}

    tf.saved_model.save(tf.Module(), str(tmp_path / "sm"), signatures={"branchy": branchy.get_concrete_function()})
    data = tflite.convert_saved(str(tmp_path / "sm"), ["branchy"])
    with pytest.raises(exceptions.ExportError, match="control flow"):
        tflite.merge_models([data, data])


@pytest.fixture(scope="module")
def residual_exported(tmp_path_factory, write_residual_checkpoint):
    ckpt = tmp_path_factory.mktemp("residual")
    model = write_residual_checkpoint(ckpt, groups=4)  # k = 4: the signature names below
    report = tflite.export_tflite(ckpt, num_parity_images=8, max_forced_tuples=16, timing_runs=0, log=lambda m: None)
    return model, ckpt / "export", report


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_residual_runner_matches_rollout(residual_exported, check_residual_batches, batch):
    """Bottlenecks: a signature per (decided conv, input width, output width), one per block tail and input width."""
    model, out, report = residual_exported
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    # stem, conv0 and conv2 (full input: 4 each), conv1 and conv3 (16 each), tail1 and tail3 (4 each),
    # one head (its input keeps its full width), full, penalty_setting
    assert report["parity"]["rnp.tflite"]["signatures"] == len(runner.signature_keys) == 1 + 4 + 16 + 4 + 4 + 16 + 4 + 3
    assert "shortcut" in runner._inputs("tail1_in2") and "shortcut" in runner._inputs("tail3_in1")
    assert "shortcut" not in runner._inputs("conv1_in2_out3")  # carried past the block's inner convs
    assert (runner.groups, runner.num_prunable, runner.image_shape) == (4, 4, (16, 16, 3))
    images = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    check_residual_batches(model, tflite.runner_function(runner), images, batch)
    np.testing.assert_allclose(runner.run_full(images[:3]), model.rollout(images[:3], actions=np.full((3, 4), 4))["logits"],
                               atol=1e-4)


def test_tails_fuse_into_the_conv_signatures_that_read_a_full_input(mobilenet_model, residual_model):
    """An inverted residual's tail joins its expansion's signatures; a bottleneck's, whose conv follows a decision, does not."""
    net = sliced_network.SlicedNetwork(mobilenet_model())
    assert [tflite.fuses_tail(net, t) for t in range(net.num_prunable)] == [True, True, True, False]  # 3: no tail
    names = set(tflite.signature_functions(net, parts=("rnp",)))
    assert "conv0_in2_out1" in names and not [n for n in names if n.startswith("tail")]
    bottlenecks = sliced_network.SlicedNetwork(residual_model())
    assert sorted(bottlenecks.tails) == [1, 3] and not any(tflite.fuses_tail(bottlenecks, t) for t in (1, 3))


@pytest.fixture(scope="module")
def mobilenet_exported(tmp_path_factory, write_mobilenet_checkpoint):
    ckpt = tmp_path_factory.mktemp("mobilenet")
    model = write_mobilenet_checkpoint(ckpt, groups=4)  # k = 4: the signature names below
    report = tflite.export_tflite(ckpt, num_parity_images=8, max_forced_tuples=16, timing_runs=0, log=lambda m: None)
    return model, ckpt / "export", report


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_mobilenet_runner_matches_rollout(mobilenet_exported, check_residual_batches, batch):
    """Inverted residuals: `conv{t}_in4_out{a}` the expansion with its depthwise conv, projection and sum."""
    model, out, report = mobilenet_exported
    runner = TFLiteRNPRunner(out / "rnp.tflite")
    # stem, four decided convs on full inputs (4 each, three with their tails inside), four heads, full,
    # penalty_setting: no `tail` signature, the expanded map stays inside one signature
    assert report["parity"]["rnp.tflite"]["signatures"] == len(runner.signature_keys) == 1 + 16 + 4 + 2
    assert not [key for key in runner.signature_keys if key.startswith("tail")]
    # a block with a sum takes its shortcut from its own input map: no second copy of it in
    assert tflite.shortcut_is_features(sliced_network.SlicedNetwork(model), 0)
    assert not [key for key in runner.signature_keys if "shortcut" in runner._inputs(key)]
    assert "shortcut" not in runner._call("stem", {"images": np.zeros((1, 32, 32, 3), np.float32),
                                                   "penalty": np.zeros([1], np.float32)})
    assert (runner.groups, runner.num_prunable, runner.image_shape) == (4, 4, (32, 32, 3))
    images = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    check_residual_batches(model, tflite.runner_function(runner), images, batch)
    np.testing.assert_allclose(runner.run_full(images[:3]), model.rollout(images[:3], actions=np.full((3, 4), 4))["logits"],
                               atol=1e-4)


@pytest.mark.parametrize("kind", ["bottleneck", "mobilenet"])
def test_skipped_blocks_run_in_the_interpreter(tmp_path, kind, residual_model, skippable_bottleneck, tiny_mobilenet,
                                               half_skipping):
    """A skipped block runs `skip{t}_to{u}` (what follows it, on its shortcut) instead of its convs.

    The exporter's own parity check forces every tuple again with each
    skippable block skipped; the agent skips about half of the images
    (`half_skipping`), so the greedy check takes both ways.
    """
    if kind == "bottleneck":  # a skippable identity bottleneck (decisions 0, 1), then a prunable conv
        model = residual_model(groups=4, backbone=skippable_bottleneck, image_shape=(8, 8, 1))  # > 16 tuples with skips
        skips = {"skip0_to1"}
    else:  # the two expanded inverted residuals with an identity shortcut (decisions 0 and 2)
        for i in (2, 4):
            tiny_mobilenet["stages"][i]["skippable"] = True
        model = residual_model(backbone=tiny_mobilenet, image_shape=(32, 32, 3))
        skips = {"skip0_to0", "skip2_to2"}
    first = min(model.plan.skippable)
    half_skipping(model, first)
    model.save(str(tmp_path / "model.keras"))
    report = tflite.export_tflite(tmp_path, num_parity_images=8, max_forced_tuples=16, timing_runs=0,
                                  log=lambda m: None)
    forced = report["parity"]["rnp.tflite"]["forced"]
    assert forced["action_agreement"] == 1.0 and forced["distinct_action_tuples"] > 16  # with the skipped ones
    runner = TFLiteRNPRunner(tmp_path / "export" / "rnp.tflite")
    assert {key for key in runner.signature_keys if key.startswith("skip")} == skips
    assert runner.skippable == sorted(model.plan.skippable)
    # a skip reads the block's shortcut alone: its own `features` input when the block's convs would too
    # (an inverted residual, `shortcut_is_features`), else the `shortcut` the block's opening signature gave
    first_skip = runner._inputs(sorted(skips)[0])
    assert ("features" in first_skip) == (kind == "mobilenet") and ("shortcut" in first_skip) == (kind == "bottleneck")
    x = np.random.default_rng(4).normal(size=(16, *model.image_shape)).astype("float32")
    ref = verification.reference(model, x)
    assert 0 < (ref["actions"][:, first] == 0).mean() < 1
    verification.compare("rnp.tflite", ref, tflite.runner_function(runner)(x))
    # a skipped image runs the skip's signature, not the block's convs
    skipped = int(np.argmax(ref["actions"][:, first] == 0))
    timings = {}
    runner.run_one(x[skipped], timings=timings)
    assert f"skip{first}" in timings and f"conv{first}" not in timings
    with pytest.raises(ValueError, match="skip, at the skippable decisions"):
        runner.run(x[:1], actions=[[0] * (runner.num_prunable - 1) + [runner.groups + 1]])


def test_tied_decisions_in_the_interpreter(tmp_path, residual_model, tied_residual):
    """A `ties` signature tells the runner which decisions take an earlier action; no agent runs there."""
    model = residual_model(backbone=tied_residual)
    model.save(str(tmp_path / "model.keras"))
    report = tflite.export_tflite(tmp_path, num_parity_images=8, max_forced_tuples=16, timing_runs=0,
                                  log=lambda m: None)
    assert report["parity"]["rnp.tflite"]["forced"]["action_agreement"] == 1.0
    runner = TFLiteRNPRunner(tmp_path / "export" / "rnp.tflite")
    assert runner.tied_to == {2: 0, 3: 1} and "ties" in runner.signature_keys
    assert "state_h" not in runner._inputs("tail1_in2")  # the stretch to the tied block decides nothing
    x = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    ref = verification.reference(model, x)
    assert len({tuple(a) for a in ref["actions"]}) > 1
    verification.compare("rnp.tflite", ref, tflite.runner_function(runner)(x))
