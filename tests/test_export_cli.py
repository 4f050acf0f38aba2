"""export.cli: checkpoint loading and the exporters' one-line command-line errors."""

import os
import subprocess
import sys

import pytest

from export import cli
from export import exceptions


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(exceptions.CheckpointError, match="does not exist"):
        cli.load_checkpoint(tmp_path / "nope")
    with pytest.raises(exceptions.CheckpointError, match="no model.keras"):
        cli.load_checkpoint(tmp_path)
    (tmp_path / "model.keras").write_bytes(b"not a zip file")
    with pytest.raises(exceptions.CheckpointError, match="not a loadable Keras model") as info:
        cli.load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_missing_checkpoint_cli_exits_2_and_writes_nothing(tmp_path):
    """One exporter's command end to end (they share `cli.run_cli`; each export function is checked below)."""
    missing = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "export.tflite", str(missing)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"export.tflite: error: model directory {str(missing)!r} does not exist"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["saved_model", "tflite", "onnx", "trt"])
def test_every_exporter_checks_the_model_directory_first(tmp_path, command):
    """What `cli.run_cli` turns into the one-line error: each exporter refuses a missing directory, writing nothing."""
    import importlib

    export = getattr(importlib.import_module(f"export.{command}"), f"export_{command}")
    missing = tmp_path / "ckpt"
    with pytest.raises(exceptions.CheckpointError) as info:
        export(missing)
    assert str(info.value) == f"model directory {str(missing)!r} does not exist"
    assert os.listdir(tmp_path) == []
