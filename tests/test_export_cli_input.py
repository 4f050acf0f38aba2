"""Bad input to the exporters: one line naming the flag or file, exit 2, the output folder unchanged.

Most cases run in this process through `export.cli.run_cli`, the body of
every exporter's `main`, with each exporter's own flags (parsed by
`rnp_tf.validation.parse_flags`, as `validation.run_cli` does); everything
is refused before any conversion. A few run the real command lines (`slow`:
each pays a TensorFlow import).
"""

import os

import pytest
from absl import flags

from export import cli

from export import writing
from export import onnx as onnx_export
from export import saved_model
from export import tflite
from export import trt
from rnp_tf import validation

from test_cli_input import UNWRITABLE
from test_cli_input import one_error_line
from test_cli_input import snapshot

EXPORTERS = {
    "export.saved_model": (saved_model, saved_model.export_saved_model),
    "export.tflite": (tflite, tflite.export_tflite),
    "export.onnx": (onnx_export, onnx_export.export_onnx),
    "export.trt": (trt, trt.export_trt),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, write_checkpoint):
    directory = tmp_path_factory.mktemp("export_input") / "ckpt"
    write_checkpoint(directory)
    return directory


def run(capsys, program, *args):
    """Parses `args` with the exporter's flags and runs its `main` body: (error line, exit code)."""
    module, export = EXPORTERS[program]
    fv = flags.FlagValues()
    module.define_flags(fv)
    try:
        argv = validation.parse_flags(program, [program, *args], fv)
        cli.run_cli(program, argv, lambda model_dir: export(
            model_dir, fv.output, penalty=fv.penalty, compute_cap=fv.compute_cap, overwrite=fv.overwrite,
            log=lambda m: None,
        ))
    except SystemExit as exit:
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), lines
        assert "Traceback" not in lines[0]
        return lines[0], exit.code
    raise AssertionError(f"{program} {args} was accepted")


CASES = [
    # (arguments after the model directory, what the line must name)
    (["--penalty=nan"], "--penalty"),
    (["--penalty=inf"], "--penalty"),
    (["--penalty=-inf"], "--penalty"),
    (["--penalty=abc"], "--penalty"),
    (["--compute_cap=nan"], "--compute_cap"),
    (["--compute_cap=0"], "--compute_cap"),
    (["--compute_cap=1.5"], "--compute_cap"),
    (["--compute_cap=1e-6"], "--compute_cap"),  # below the narrowest network: known once the model is loaded
    ([f"--output={UNWRITABLE}"], "--output: cannot write to '/proc/rnp_unwritable'"),
    ([f"--output={UNWRITABLE}/deeper"], "--output: parent directory"),
    (["--no_such_flag=1"], "no_such_flag"),
]


@pytest.mark.parametrize("program", EXPORTERS)
@pytest.mark.parametrize("args,named", CASES)
def test_bad_flags_are_one_line_naming_the_flag(model_dir, tmp_path, capsys, program, args, named):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    before, checkpoint = snapshot(out), snapshot(model_dir)
    line, code = run(capsys, program, str(model_dir), f"--output={out}", *args)
    assert code == 2 and named in line, line
    assert "compute_fraction" not in line
    assert snapshot(out) == before and snapshot(model_dir) == checkpoint


@pytest.mark.parametrize("program", EXPORTERS)
def test_a_missing_model_dir_or_an_extra_argument(tmp_path, capsys, program):
    line, code = run(capsys, program, str(tmp_path / "nope"), f"--output={tmp_path / 'out'}")
    assert code == 2 and repr(str(tmp_path / "nope")) in line and "does not exist" in line
    line, code = run(capsys, program, str(tmp_path), str(tmp_path))
    assert code == 2 and "exactly one positional argument" in line
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("program", EXPORTERS)
def test_an_output_holding_another_models_export_is_refused(model_dir, tmp_path, capsys, program):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rnp.onnx").write_text("of another model")
    before = snapshot(out)
    line, code = run(capsys, program, str(model_dir), f"--output={out}")
    assert code == 2 and "--output" in line and "another model" in line and "--overwrite" in line, line
    assert snapshot(out) == before


def test_output_flags_are_in_every_exporters_help():
    for module, _ in EXPORTERS.values():
        fv = flags.FlagValues()
        module.define_flags(fv)
        assert "--overwrite" in fv["output"].help and writing.MANIFEST in fv["output"].help
        assert {"output", "overwrite", "penalty", "compute_cap"} <= set(fv)


@pytest.mark.slow
@pytest.mark.parametrize("program,args,named", [
    ("export.onnx", ["--penalty=abc"], "--penalty=abc"),
    ("export.tflite", [f"--output={UNWRITABLE}"], "--output: cannot write to"),
])
def test_cli_usage_errors_exit_2_with_the_message_last(model_dir, run_module, program, args, named):
    before = snapshot(model_dir)
    result = run_module(program, str(model_dir), *args)
    assert named in one_error_line(result, program)
    assert "helpshort" not in result.stderr and snapshot(model_dir) == before
