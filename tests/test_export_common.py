"""export.common: checkpoint loading, the sliced graphs against model.rollout, parity, atomic writes."""

import itertools
import json
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


def text(content):
    def produce(tmp):
        with open(tmp, "w") as f:
            f.write(content)

    return produce


def export_set(target, program, contents, report=None):
    """`common.write_set` of text files `{name: content}` (the exporters' sets without conversions)."""
    artifacts = [common.Artifact(os.path.join(target.directory, n), text(c)) for n, c in contents.items()]
    return common.write_set(target.__class__(target.directory, program, target.source, target.overwrite),
                            artifacts, report)


def model_dirs(tmp_path):
    """Two model directories of different checkpoints (only their bytes matter here) and an output."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.keras").write_text(f"model {name}")
    return str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")


def folder(path):
    """`{name: content}` of the files in `path` (the manifest's hashes checked against them), not its temporaries."""
    out = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".export-")]
        for name in names:
            out[os.path.relpath(os.path.join(root, name), path)] = open(os.path.join(root, name)).read()
    manifest = json.loads(out[common.MANIFEST])
    for name, record in manifest["files"].items():
        assert common.sha256_file(os.path.join(path, name)) == record["sha256"], name
    assert set(manifest["files"]) == set(out) - {common.MANIFEST, "notes.txt"}  # notes.txt: the user's
    return out


def test_write_set_is_all_or_nothing(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    target = common.prepare_target("export.onnx", a, out)

    def bad(tmp):
        raise common.ParityError("boom")

    with pytest.raises(common.ParityError):
        common.write_set(target, [common.Artifact(os.path.join(out, "rnp.onnx"), text("a")),
                                  common.Artifact(os.path.join(out, "onnx.json"), bad)])
    assert os.listdir(out) == []
    export_set(target, "export.onnx", {"rnp.onnx": "a", "onnx.json": "{}"}, {"parity": {"rnp.onnx": 1e-6}})
    assert sorted(os.listdir(out)) == [common.MANIFEST, "onnx.json", "rnp.onnx"]
    manifest = json.loads(open(os.path.join(out, common.MANIFEST)).read())
    assert manifest["source"]["sha256"] == common.sha256_file(os.path.join(a, "model.keras"))
    assert manifest["exports"]["export.onnx"]["parity"] == {"parity": {"rnp.onnx": 1e-6}}


def test_a_folder_never_holds_two_models(tmp_path):
    """Issue 25, case 3: onnx A, tflite A, onnx B --nobatch1 into one folder."""
    a, b, out = model_dirs(tmp_path)
    target = common.prepare_target("export.onnx", a, out)
    os.mkdir(out)
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    export_set(target, "export.onnx", {"rnp.onnx": "A", "rnp_b1.onnx": "A", "full.onnx": "A", "onnx.json": "A"})
    export_set(common.prepare_target("export.tflite", a, out), "export.tflite", {"rnp.tflite": "A", "tflite.json": "A"})
    before = folder(out)
    with pytest.raises(common.ExportError, match="holds an export of another model.*rnp.tflite.*--overwrite") as info:
        common.prepare_target("export.onnx", b, out)
    assert "\n" not in str(info.value) and folder(out) == before
    export_set(common.prepare_target("export.onnx", b, out, overwrite=True), "export.onnx",
               {"rnp.onnx": "B", "full.onnx": "B", "onnx.json": "B"})
    assert folder(out) == {"rnp.onnx": "B", "full.onnx": "B", "onnx.json": "B", "notes.txt": "the user's",
                           common.MANIFEST: folder(out)[common.MANIFEST]}


def test_a_new_run_replaces_its_exporters_set_and_keeps_the_others(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(common.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "1", "rnp_b1.onnx": "1", "full.onnx": "1", "onnx.json": "1"})
    export_set(common.prepare_target("export.trt", a, out), "export.trt",
               {"rnp_trt.onnx": "2", "full.onnx": "2", "trt.json": "2"})
    export_set(common.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "3", "full.onnx": "3", "onnx.json": "3"})  # --nobatch1
    files = folder(out)
    assert {k: v for k, v in files.items() if k != common.MANIFEST} == {
        "rnp.onnx": "3", "full.onnx": "3", "onnx.json": "3", "rnp_trt.onnx": "2", "trt.json": "2"}
    manifest = json.loads(files[common.MANIFEST])
    assert manifest["exports"]["export.trt"]["files"] == ["full.onnx", "rnp_trt.onnx", "trt.json"]
    assert manifest["files"]["full.onnx"]["exporter"] == "export.onnx"


def test_export_files_without_a_manifest_are_of_an_unknown_source(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    (tmp_path / "out" / "rnp.onnx").write_text("old")
    with pytest.raises(common.ExportError, match="rnp.onnx without export_manifest.json"):
        common.prepare_target("export.onnx", a, out)
    export_set(common.prepare_target("export.tflite", a, out, overwrite=True), "export.tflite", {"rnp.tflite": "A"})
    assert sorted(os.listdir(out)) == [common.MANIFEST, "rnp.tflite"]


class Killed(BaseException):
    """A SIGKILL simulated in process: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_a_kill_during_the_final_move_leaves_the_old_or_the_new_set(tmp_path, monkeypatch, moved):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(common.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "old", "rnp_b1.onnx": "old", "onnx.json": "old"})
    old = folder(out)
    replace, calls = os.replace, []

    def replace_then_die(src, dst):
        if common.COMMITTED in str(src):
            if len(calls) == moved:
                raise Killed()
            calls.append(dst)
        return replace(src, dst)

    monkeypatch.setattr(common.os, "replace", replace_then_die)
    target = common.prepare_target("export.onnx", a, out)
    with pytest.raises(Killed):
        export_set(target, "export.onnx", {"rnp.onnx": "new", "onnx.json": "new"})
    monkeypatch.setattr(common.os, "replace", replace)
    if moved == 0:  # killed at the first move: the old set is intact
        assert {k: v for k, v in folder(out).items()} == old
    messages = common.recover(out)
    assert len(messages) == 1 and "interrupted while moving" in messages[0]
    new = folder(out)
    assert {k: v for k, v in new.items() if k != common.MANIFEST} == {"rnp.onnx": "new", "onnx.json": "new"}
    assert common.recover(out) == []


def test_a_kill_before_the_commit_leaves_the_old_set(tmp_path, monkeypatch):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(common.prepare_target("export.onnx", a, out), "export.onnx", {"rnp.onnx": "old"})
    old = folder(out)
    os.mkdir(os.path.join(out, f"{common.STAGING}999999999-x"))  # a dead exporter's half-written set
    (tmp_path / "out" / f"{common.STAGING}999999999-x" / "rnp.onnx").write_text("half")
    target = common.prepare_target("export.onnx", a, out)  # clears it first
    assert folder(out) == old
    export_set(target, "export.onnx", {"rnp.onnx": "new"})
    assert folder(out)["rnp.onnx"] == "new"


_KILLED_IN_MOVE = """
import os, signal, sys
from export import common

replace = os.replace
def replace_then_die(src, dst):
    if common.COMMITTED in str(src) and dst.endswith("onnx.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)

model_dir, out = sys.argv[1:]
target = common.prepare_target("export.onnx", model_dir, out)
os.replace = replace_then_die
common.write_set(target, [common.Artifact(os.path.join(out, n), lambda tmp: open(tmp, "w").write("new"))
                          for n in ("rnp.onnx", "onnx.json")])
"""


@pytest.mark.slow
def test_sigkill_during_the_final_move_then_rerun(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(common.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "old", "rnp_b1.onnx": "old", "onnx.json": "old"})
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_MOVE, a, out], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert any(n.startswith(common.COMMITTED) for n in os.listdir(out))
    common.prepare_target("export.onnx", a, out)  # the next export completes the move first
    assert {k: v for k, v in folder(out).items() if k != common.MANIFEST} == {"rnp.onnx": "new", "onnx.json": "new"}


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

