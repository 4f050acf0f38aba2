"""python -m export.saved_model: the batch-N and batch-1 signatures, verified after reload."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from export import exceptions

from export import sliced_network

from export import verification

from export import writing
from export import saved_model



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, write_checkpoint):
    directory = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """Returns `get(graph) -> (output directory, report)`, exporting each graph once."""
    cache = {}

    def get(graph):
        if graph not in cache:
            out = tmp_path_factory.mktemp(graph) / "export"
            report = saved_model.export_saved_model(checkpoint, out, graph=graph, num_parity_images=8, log=lambda m: None)
            cache[graph] = (out, report)
        return cache[graph]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["masked", "sliced"])
def test_export_verifies_every_action_tuple(checkpoint, exported, graph):
    out, report = exported(graph)
    parity = report["parity"]["saved_model"]
    assert parity["greedy"]["action_agreement"] == 1.0
    assert parity["forced"]["distinct_action_tuples"] == 2**3  # every tuple: k = 2 groups (the conftest's), 3 decisions
    assert parity["forced"]["max_abs_logit_diff"] <= verification.ATOL
    assert sorted(os.listdir(out)) == ["export_manifest.json", "saved_model", "saved_model.json"]
    manifest = json.loads((out / writing.MANIFEST).read_text())
    assert manifest["source"]["sha256"] == writing.sha256_file(checkpoint / "model.keras")
    assert "saved_model/saved_model.pb" in manifest["files"] and manifest["exports"]["export.saved_model"]["parity"]
    for name, record in manifest["files"].items():
        assert writing.sha256_file(out / name) == record["sha256"], name
    assert json.loads((out / "saved_model.json").read_text())["graph"] == graph
    loaded = tf.saved_model.load(str(out / "saved_model"))
    serve = loaded.signatures["serving_default"]
    assert set(serve.structured_outputs) == {"logits", "actions", "macs"}
    x = np.random.default_rng(1).normal(size=(5, 8, 8, 1)).astype("float32")
    got = serve(images=tf.constant(x))
    assert got["actions"].dtype == tf.int32 and got["actions"].shape == (5, 3)
    assert got["macs"].shape == (5,) and got["logits"].shape == (5, 10)
    forced = loaded.signatures["forced"](images=tf.constant(x), actions=tf.constant(np.full((5, 3), 2, np.int32)))
    model = keras.models.load_model(checkpoint / "model.keras")
    ref = model.rollout(x, actions=np.full((5, 3), 2))
    np.testing.assert_allclose(forced["logits"], ref["logits"], atol=1e-4)
    np.testing.assert_array_equal(forced["actions"], ref["actions"])
    # one image: the `*_single` signatures (verified by the export at every pair, `parity["batch1"]`)
    assert parity["batch1"]["forced"]["max_abs_logit_diff"] <= verification.ATOL
    one = loaded.signatures["serving_single"](images=tf.constant(x[:1]))
    np.testing.assert_array_equal(one["actions"], got["actions"][:1])
    np.testing.assert_allclose(one["logits"], got["logits"][:1], atol=1e-4)
    actions = np.array([[1, 2, 1]], np.int32)
    one = loaded.signatures["forced_single"](images=tf.constant(x[:1]), actions=tf.constant(actions))
    np.testing.assert_allclose(one["logits"], model.rollout(x[:1], actions=actions)["logits"], atol=1e-4)
    knob = loaded.signatures["serving_knob_single"](images=tf.constant(x[:1]), penalty=tf.constant(-5.0))
    assert np.all(knob["actions"].numpy() == 1)  # a penalty that steep makes every layer take one group
    if graph == "sliced":  # the batch-1 If tree: a branch per conv, not the gather/scatter groups
        ops = {node.op for fn in loaded.signatures["serving_single"].graph.as_graph_def().library.function
               for node in fn.node_def}
        assert ops & {"If", "StatelessIf"} and not ops & {"ScatterNd", "Where"}  # Where, ScatterNd: the groups
        # the kernels are variables, saved once and read by both graphs, not constants of each graph
        assert any(name.startswith("kernel_conv") for name in loaded.kernels)
        for key in ("serving_default", "serving_single"):
            graph_def = loaded.signatures[key].graph.as_graph_def()
            constants = [node for fn in graph_def.library.function for node in fn.node_def if node.op == "Const"]
            constants += [node for node in graph_def.node if node.op == "Const"]
            assert constants and not [node for node in constants if len(node.attr["value"].tensor.tensor_shape.dim) == 4]


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["masked", "sliced"])
def test_penalty_is_a_run_time_input(checkpoint, exported, graph, check_penalty_input):
    """`serving_knob(images, penalty)` at two penalties is `set_penalty(p)` + `rollout`; the default is the setting."""
    out, report = exported(graph)
    checks = report["parity"]["saved_model"]["knob"]  # the export's own check ran at two penalties
    assert checks[0]["penalty"] == pytest.approx(0.3) and checks[1]["penalty"] < 0.3 and checks[1]["actions_differ"]
    assert len(report["parity"]["saved_model"]["batch1"]["knob"]) == 2
    loaded = tf.saved_model.load(str(out / "saved_model"))
    knob = loaded.signatures["serving_knob"]
    assert set(knob.structured_input_signature[1]) == {"images", "penalty"}
    model = keras.models.load_model(checkpoint / "model.keras")

    def run(x, penalty):  # a scalar penalty
        got = knob(images=tf.constant(x), penalty=tf.constant(penalty, tf.float32))
        return got["logits"].numpy(), got["actions"].numpy(), got["macs"].numpy()

    check_penalty_input(model, run)
    x = np.random.default_rng(11).normal(size=(16, 8, 8, 1)).astype("float32") * 2
    setting, cheap = run(x, 0.3), run(x, -0.2)
    default = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_array_equal(default["actions"], setting[1])
    # one penalty per image ([batch]), and batch 1 (the sliced graph's tf.cond path) with a [1] penalty
    per_image = np.where(np.arange(16) % 2 == 0, 0.3, -0.2).astype("float32")
    got = knob(images=tf.constant(x), penalty=tf.constant(per_image))["actions"].numpy()
    np.testing.assert_array_equal(got, np.where((np.arange(16) % 2 == 0)[:, None], setting[1], cheap[1]))
    for i in range(3):
        one = knob(images=tf.constant(x[i : i + 1]), penalty=tf.constant([-0.2]))
        np.testing.assert_array_equal(one["actions"][0], cheap[1][i])


def test_failed_parity_writes_nothing(checkpoint, tmp_path, monkeypatch):
    real = saved_model.runner

    def broken(loaded, batch1=False):
        run = real(loaded, batch1)
        return lambda images, forced=None: dict(run(images, forced), logits=run(images, forced)["logits"] + 1e-3)

    monkeypatch.setattr(saved_model, "runner", broken)
    with pytest.raises(exceptions.ParityError, match=r"max \|logits diff\| = 0.001"):
        saved_model.export_saved_model(checkpoint, tmp_path / "export", num_parity_images=4, log=lambda m: None)
    assert os.listdir(tmp_path) == []


def test_corrupt_checkpoint_is_refused_before_any_output(tmp_path):
    """What `export.saved_model` prints as its one-line error (the command itself: test_export_cli.py)."""
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(exceptions.CheckpointError, match="is not a loadable Keras model"):
        saved_model.export_saved_model(tmp_path)
    assert os.listdir(tmp_path) == ["model.keras"]


@pytest.fixture(scope="module", params=["residual", "mobilenet"])
def block_export(request, tmp_path_factory):
    """The small residual model and the small MobileNetV2, exported with the sliced graph (parity checks passed)."""
    ckpt = tmp_path_factory.mktemp(request.param)
    model = request.getfixturevalue(f"write_{request.param}_checkpoint")(ckpt)
    report = saved_model.export_saved_model(ckpt, graph="sliced", num_parity_images=8, max_forced_tuples=16,
                                            log=lambda m: None)
    return model, ckpt / "export", report


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_block_sliced_export_matches_rollout(block_export, check_residual_batches, batch):
    """Bottlenecks and inverted residuals through the reloaded SavedModel: the If tree at batch 1, gather/scatter above."""
    model, out, report = block_export
    parity = report["parity"]["saved_model"]
    # batch 1: the k * k alternating tuples, which run every branch
    assert parity["greedy"]["action_agreement"] == 1.0
    assert parity["batch1"]["forced"]["distinct_action_tuples"] == model.groups**2
    run = saved_model.runner(str(out / "saved_model"))
    images = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    check_residual_batches(model, run, images, batch)


def test_skipped_blocks_in_the_saved_model(tmp_path, residual_model, skippable_bottleneck, half_skipping):
    """A skippable bottleneck: the exporter's parity (skip tuples, batch 1 and N) passes; greedy batches mix skips."""
    model = residual_model(backbone=skippable_bottleneck, image_shape=(8, 8, 1))
    half_skipping(model, 0)
    model.save(str(tmp_path / "model.keras"))
    report = saved_model.export_saved_model(tmp_path, graph="sliced", num_parity_images=8, max_forced_tuples=16,
                                            log=lambda m: None)
    parity = report["parity"]["saved_model"]
    assert parity["forced"]["action_agreement"] == 1.0 and parity["batch1"]["forced"]["action_agreement"] == 1.0
    loaded = tf.saved_model.load(str(tmp_path / "export" / "saved_model"))
    x = np.random.default_rng(4).normal(size=(16, 8, 8, 1)).astype("float32")
    ref = verification.reference(model, x)
    assert 0 < (ref["actions"][:, 0] == 0).mean() < 1
    got = {k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(x)).items()}
    verification.compare("saved_model", ref, got)
