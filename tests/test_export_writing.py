"""export.writing: an export is one consistent set (staging, manifest, recovery after a kill)."""

import json
import os
import subprocess
import sys

import pytest

from export import exceptions
from export import writing


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def text(content):
    def produce(tmp):
        with open(tmp, "w") as f:
            f.write(content)

    return produce


def export_set(target, program, contents, report=None):
    """`writing.write_set` of text files `{name: content}` (the exporters' sets without conversions)."""
    artifacts = [writing.Artifact(os.path.join(target.directory, n), text(c)) for n, c in contents.items()]
    return writing.write_set(target.__class__(target.directory, program, target.source, target.overwrite),
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
    manifest = json.loads(out[writing.MANIFEST])
    for name, record in manifest["files"].items():
        assert writing.sha256_file(os.path.join(path, name)) == record["sha256"], name
    assert set(manifest["files"]) == set(out) - {writing.MANIFEST, "notes.txt"}  # notes.txt: the user's
    return out


def test_write_set_is_all_or_nothing(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    target = writing.prepare_target("export.onnx", a, out)

    def bad(tmp):
        raise exceptions.ParityError("boom")

    with pytest.raises(exceptions.ParityError):
        writing.write_set(target, [writing.Artifact(os.path.join(out, "rnp.onnx"), text("a")),
                                  writing.Artifact(os.path.join(out, "onnx.json"), bad)])
    assert os.listdir(out) == []
    export_set(target, "export.onnx", {"rnp.onnx": "a", "onnx.json": "{}"}, {"parity": {"rnp.onnx": 1e-6}})
    assert sorted(os.listdir(out)) == [writing.MANIFEST, "onnx.json", "rnp.onnx"]
    manifest = json.loads(open(os.path.join(out, writing.MANIFEST)).read())
    assert manifest["source"]["sha256"] == writing.sha256_file(os.path.join(a, "model.keras"))
    assert manifest["exports"]["export.onnx"]["parity"] == {"parity": {"rnp.onnx": 1e-6}}


def test_a_folder_never_holds_two_models(tmp_path):
    """Issue 25, case 3: onnx A, tflite A, onnx B --nobatch1 into one folder."""
    a, b, out = model_dirs(tmp_path)
    target = writing.prepare_target("export.onnx", a, out)
    os.mkdir(out)
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    export_set(target, "export.onnx", {"rnp.onnx": "A", "rnp_b1.onnx": "A", "full.onnx": "A", "onnx.json": "A"})
    export_set(writing.prepare_target("export.tflite", a, out), "export.tflite", {"rnp.tflite": "A", "tflite.json": "A"})
    before = folder(out)
    with pytest.raises(exceptions.ExportError, match="holds an export of another model.*rnp.tflite.*--overwrite") as info:
        writing.prepare_target("export.onnx", b, out)
    assert "\n" not in str(info.value) and folder(out) == before
    export_set(writing.prepare_target("export.onnx", b, out, overwrite=True), "export.onnx",
               {"rnp.onnx": "B", "full.onnx": "B", "onnx.json": "B"})
    assert folder(out) == {"rnp.onnx": "B", "full.onnx": "B", "onnx.json": "B", "notes.txt": "the user's",
                           writing.MANIFEST: folder(out)[writing.MANIFEST]}


def test_a_new_run_replaces_its_exporters_set_and_keeps_the_others(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(writing.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "1", "rnp_b1.onnx": "1", "full.onnx": "1", "onnx.json": "1"})
    export_set(writing.prepare_target("export.trt", a, out), "export.trt",
               {"rnp_trt.onnx": "2", "full.onnx": "2", "trt.json": "2"})
    export_set(writing.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "3", "full.onnx": "3", "onnx.json": "3"})  # --nobatch1
    files = folder(out)
    assert {k: v for k, v in files.items() if k != writing.MANIFEST} == {
        "rnp.onnx": "3", "full.onnx": "3", "onnx.json": "3", "rnp_trt.onnx": "2", "trt.json": "2"}
    manifest = json.loads(files[writing.MANIFEST])
    assert manifest["exports"]["export.trt"]["files"] == ["full.onnx", "rnp_trt.onnx", "trt.json"]
    assert manifest["files"]["full.onnx"]["exporter"] == "export.onnx"


def test_export_files_without_a_manifest_are_of_an_unknown_source(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    (tmp_path / "out" / "rnp.onnx").write_text("old")
    with pytest.raises(exceptions.ExportError, match="rnp.onnx without export_manifest.json"):
        writing.prepare_target("export.onnx", a, out)
    export_set(writing.prepare_target("export.tflite", a, out, overwrite=True), "export.tflite", {"rnp.tflite": "A"})
    assert sorted(os.listdir(out)) == [writing.MANIFEST, "rnp.tflite"]


class Killed(BaseException):
    """A SIGKILL simulated in process: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_a_kill_during_the_final_move_leaves_the_old_or_the_new_set(tmp_path, monkeypatch, moved):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(writing.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "old", "rnp_b1.onnx": "old", "onnx.json": "old"})
    old = folder(out)
    replace, calls = os.replace, []

    def replace_then_die(src, dst):
        if writing.COMMITTED in str(src):
            if len(calls) == moved:
                raise Killed()
            calls.append(dst)
        return replace(src, dst)

    monkeypatch.setattr(writing.os, "replace", replace_then_die)
    target = writing.prepare_target("export.onnx", a, out)
    with pytest.raises(Killed):
        export_set(target, "export.onnx", {"rnp.onnx": "new", "onnx.json": "new"})
    monkeypatch.setattr(writing.os, "replace", replace)
    if moved == 0:  # killed at the first move: the old set is intact
        assert {k: v for k, v in folder(out).items()} == old
    messages = writing.recover(out)
    assert len(messages) == 1 and "interrupted while moving" in messages[0]
    new = folder(out)
    assert {k: v for k, v in new.items() if k != writing.MANIFEST} == {"rnp.onnx": "new", "onnx.json": "new"}
    assert writing.recover(out) == []


def test_a_kill_before_the_commit_leaves_the_old_set(tmp_path, monkeypatch):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(writing.prepare_target("export.onnx", a, out), "export.onnx", {"rnp.onnx": "old"})
    old = folder(out)
    os.mkdir(os.path.join(out, f"{writing.STAGING}999999999-x"))  # a dead exporter's half-written set
    (tmp_path / "out" / f"{writing.STAGING}999999999-x" / "rnp.onnx").write_text("half")
    target = writing.prepare_target("export.onnx", a, out)  # clears it first
    assert folder(out) == old
    export_set(target, "export.onnx", {"rnp.onnx": "new"})
    assert folder(out)["rnp.onnx"] == "new"


_KILLED_IN_MOVE = """
import os, signal, sys
from export import writing


replace = os.replace
def replace_then_die(src, dst):
    if writing.COMMITTED in str(src) and dst.endswith("onnx.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)

model_dir, out = sys.argv[1:]
target = writing.prepare_target("export.onnx", model_dir, out)
os.replace = replace_then_die
writing.write_set(target, [writing.Artifact(os.path.join(out, n), lambda tmp: open(tmp, "w").write("new"))
                          for n in ("rnp.onnx", "onnx.json")])
"""


@pytest.mark.slow
def test_sigkill_during_the_final_move_then_rerun(tmp_path):
    a, _, out = model_dirs(tmp_path)
    os.mkdir(out)
    export_set(writing.prepare_target("export.onnx", a, out), "export.onnx",
               {"rnp.onnx": "old", "rnp_b1.onnx": "old", "onnx.json": "old"})
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_MOVE, a, out], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert any(n.startswith(writing.COMMITTED) for n in os.listdir(out))
    writing.prepare_target("export.onnx", a, out)  # the next export completes the move first
    assert {k: v for k, v in folder(out).items() if k != writing.MANIFEST} == {"rnp.onnx": "new", "onnx.json": "new"}


def test_output_directory_is_removed_when_the_export_fails(tmp_path):
    with pytest.raises(exceptions.ParityError):
        with writing.output_directory(tmp_path / "export"):
            raise exceptions.ParityError("x")
    assert not (tmp_path / "export").exists()
    with pytest.raises(exceptions.ExportError, match="parent directory"):
        with writing.output_directory(tmp_path / "a" / "b"):
            pass
