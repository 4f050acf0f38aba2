"""export.common: checkpoint loading, the sliced graphs against model.rollout, parity, atomic writes."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from export import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tf(net, fn_name):
    """`run(images, forced, penalty=None)` over a traced SlicedNetwork function (penalty an input)."""
    t = net.num_prunable
    h, w, c = net.image_shape
    batch = None if fn_name == "batched" else 1
    fn = tf.function(
        getattr(net, fn_name),
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
    net = common.SlicedNetwork(model)
    images = common.parity_images(net, 12)
    tuples = common.action_tuples(net.num_prunable, net.groups)
    assert len(tuples) == 4**3
    for name in ("batched", "single"):
        result = common.check_artifact(name, model, run_tf(net, name), images, tuples)
        assert result["greedy"]["action_agreement"] == 1.0
        assert result["greedy"]["distinct_action_tuples"] > 1
        assert result["forced"]["distinct_action_tuples"] == 64
        assert result["forced"]["max_abs_logit_diff"] <= common.ATOL


def test_penalty_is_an_input_of_both_graphs(export_model):
    """Re-pricing of the Q-values follows a tensor penalty."""
    model = export_model()
    net = common.SlicedNetwork(model)
    knob = common.knob_inputs(net, 8)
    assert knob[0]["penalty"] == pytest.approx(model.penalty_setting)
    assert knob[1]["penalty"] != pytest.approx(knob[0]["penalty"]) and knob[1]["actions_differ"]
    # the agent is monotone in the penalty: a cheaper one is found
    assert knob[1]["penalty"] < knob[0]["penalty"]
    assert common.cheaper_penalty(model, knob[0]["images"])[1] >= 0.25
    tuples = common.action_tuples(net.num_prunable, net.groups)[:8]
    for name in ("batched", "single"):
        result = common.check_artifact(name, model, run_tf(net, name), knob[0]["images"], tuples, knob=knob)
        assert [r["action_agreement"] for r in result["knob"]] == [1.0, 1.0]
    assert model.penalty_setting == pytest.approx(knob[0]["penalty"])  # restored after the checks


def test_flatten_head_and_compute_cap_follow_rollout(export_model):
    backbone = {
        "stages": [
            {"type": "conv", "filters": 8},
            {"type": "pool", "size": 2},
            {"type": "conv", "filters": 8},
            {"type": "conv", "filters": 16},
            {"type": "pool", "size": 2},
            {"type": "conv", "filters": 16},
        ],
        "head": {"pooling": "flatten", "hidden": [16], "dropout": 0.5},
    }
    model = export_model(backbone, seed=1)
    if hasattr(model, "set_compute_cap"):
        model.set_compute_cap(0.45)
    net = common.SlicedNetwork(model)
    images = common.parity_images(net, 12)
    tuples = common.action_tuples(net.num_prunable, net.groups)
    result = common.check_artifact("flatten", model, run_tf(net, "batched"), images, tuples)
    assert result["greedy"]["action_agreement"] == 1.0
    if hasattr(model, "set_compute_cap"):
        macs = common.reference(model, images)["macs"]
        assert macs.max() <= 0.45 * model.full_macs * (1 + 1e-6)


def test_mac_tables_equal_model_macs(export_model):
    model = export_model()
    net = common.SlicedNetwork(model)
    tuples = np.asarray(list(itertools.product(range(1, 5), repeat=3)))
    np.testing.assert_allclose(net.macs_of(tuples), model.macs(tuples).numpy(), rtol=1e-6)


def test_covering_tuples_run_every_pair_at_every_layer():
    tuples = common.action_tuples(num_prunable=13, groups=4, limit=256)
    assert len(tuples) == 16
    for t in range(1, 13):
        assert {(int(a), int(b)) for a, b in tuples[:, t - 1 : t + 1]} == set(itertools.product(range(1, 5), repeat=2))


def test_compare_reports_the_measured_difference():
    ref = {"logits": np.zeros((2, 3)), "actions": np.ones((2, 2), np.int32), "macs": np.ones(2)}
    got = dict(ref, logits=np.full((2, 3), 3e-4))
    with pytest.raises(common.ParityError, match=r"max \|logits diff\| = 0.0003"):
        common.compare("x", ref, got)
    got = dict(ref, actions=np.array([[1, 1], [2, 1]]))
    with pytest.raises(common.ParityError, match="actions agree on 50.0%"):
        common.compare("x", ref, got)
    assert common.compare("x", ref, got, min_agreement=0.5)["action_agreement"] == 0.5


def test_write_artifacts_is_all_or_nothing(tmp_path):
    def good(tmp):
        with open(tmp, "w") as f:
            f.write("ok")

    def bad(tmp):
        raise common.ParityError("boom")

    with pytest.raises(common.ParityError):
        common.write_artifacts([common.Artifact(str(tmp_path / "a"), good), common.Artifact(str(tmp_path / "b"), bad)])
    assert os.listdir(tmp_path) == []
    common.write_artifacts([common.Artifact(str(tmp_path / "a"), good), common.Artifact(str(tmp_path / "b"), good)])
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(common.CheckpointError, match="does not exist"):
        common.load_checkpoint(tmp_path / "nope")
    with pytest.raises(common.CheckpointError, match="no model.keras"):
        common.load_checkpoint(tmp_path)
    (tmp_path / "model.keras").write_bytes(b"not a zip file")
    with pytest.raises(common.CheckpointError, match="not a loadable Keras model") as info:
        common.load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_output_directory_is_removed_when_the_export_fails(tmp_path):
    with pytest.raises(common.ParityError):
        with common.output_directory(tmp_path / "export"):
            raise common.ParityError("x")
    assert not (tmp_path / "export").exists()
    with pytest.raises(common.ExportError, match="parent directory"):
        with common.output_directory(tmp_path / "a" / "b"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("command", ["saved_model", "tflite", "onnx", "trt"])
def test_missing_checkpoint_cli_exits_2_and_writes_nothing(tmp_path, command):
    missing = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", f"export.{command}", str(missing)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"export.{command}: error: model directory {str(missing)!r} does not exist"
    assert os.listdir(tmp_path) == []


def test_residual_backbones_are_refused():
    stages = [{"type": "conv", "filters": 8}, {"type": "bottleneck", "filters": 4, "expansion": 2}]
    try:
        model = rnp_tf.RNPModel({"stages": stages, "head": {}}, image_shape=(8, 8, 1), num_classes=10)
    except ValueError:
        pytest.skip("this RNPModel has no residual blocks")
    with pytest.raises(common.ExportError, match="only chain backbones"):
        common.SlicedNetwork(model)

