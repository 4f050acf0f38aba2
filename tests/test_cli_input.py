"""Bad input to rnp_tf.train and rnp_tf.evaluate: one line naming the flag or file, exit 2, nothing written.

Most cases run in this process through the same functions the command lines
call before any data is read (the flag parser, `make_config`, the output
probe, `evaluate_dir`'s checks); a handful run the real command lines
(`slow`: each pays a TensorFlow import).
"""

import hashlib
import math
import os

import numpy as np
import pytest
from absl import flags

from rnp_tf import evaluate
from rnp_tf import evaluation
from rnp_tf import train
from rnp_tf import validation

UNWRITABLE = "/proc/rnp_unwritable"  # /proc refuses new entries, even to root


def snapshot(folder):
    """`{relative path: sha256}` of every file under `folder` (empty when it is absent)."""
    if not os.path.isdir(folder):
        return {}
    return {
        os.path.relpath(os.path.join(root, name), folder):
            hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
        for root, _, names in os.walk(folder) for name in names
    }


def train_check(*args):
    """What `rnp_tf.train` checks before reading data, in process: the error line (or None) and the exit code."""
    fv = flags.FlagValues()
    train.define_flags(fv)
    try:
        validation.parse_flags("rnp_tf.train", ["rnp_tf.train", *args], fv)
        train.check_outputs(train.config_from_flags(fv))
    except SystemExit as exit:
        return None, exit.code
    except ValueError as error:
        return str(error), 2
    return "", 0


def outcome(capsys, check, *args):
    message, code = check(*args)
    if message is None:  # absl's own errors went through exit_with_error
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        message = lines[0]
    return message, code


TRAIN_CASES = [
    # (flag, bad values)
    ("penalty", ["nan", "-inf", "inf", "0.5", "", "abc"]),
    ("alpha", ["nan", "inf", "0", "-1", "x"]),
    ("gamma", ["nan", "-0.1", "1.5", "inf"]),
    ("agent_lr", ["nan", "inf", "-1e-3", "fast"]),
    ("backbone_lr", ["nan", "-inf"]),
    ("pretrain_lr", ["nan"]),
    ("robust_lr", ["inf"]),
    ("epsilon_start", ["nan", "2"]),
    ("epsilon_end", ["nan", "-1"]),
    ("full_width_fraction", ["nan", "1.1"]),
    ("validation_split", ["nan", "0.95", "-0.1"]),
    ("width_multiplier", ["nan", "inf", "0"]),
    ("batch_size", ["0", "-4", "nan", "", "1.5"]),
    ("rnp_epochs", ["-1", "x"]),
    ("groups", ["0", "three"]),
    ("seed", ["-1", "nan"]),
    ("num_classes", ["1", "0", "x"]),
    ("backbone_penalty_range", ["nan,0", "-inf,0", "0.1,-0.1", "a,b", "-0.1"]),
    ("select_budgets", ["nan", "inf", "0", "1.5", "x"]),
    ("widths", ["", "a,b,c,d", "8,8,8", "8,8,8,-8"]),
    ("dataset", ["", "cifar11", "npz:/nonexistent/data.npz"]),
    ("init_checkpoint", ["/nonexistent/model.keras"]),
    ("verbose", ["3", "-1"]),
]


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in TRAIN_CASES for v in values])
def test_train_bad_flag_values(tmp_path, capsys, flag, value):
    run_dir = tmp_path / "run"
    message, code = outcome(capsys, train_check, f"--model_dir={run_dir}", "--validation_split=0.1",
                            f"--{flag}={value}")
    assert code == 2 and f"--{flag}" in message, message
    assert "Traceback" not in message and "\n" not in message
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "model_dir,match",
    [
        ("", "--model_dir is required"),
        (UNWRITABLE, "--model_dir: cannot write to '/proc/rnp_unwritable'"),
        (UNWRITABLE + "/run", "--model_dir: the parent directory"),
        ("/nonexistent/deep/run", "--model_dir: the parent directory"),
    ],
)
def test_train_bad_model_dir(capsys, model_dir, match):
    message, code = outcome(capsys, train_check, f"--model_dir={model_dir}")
    assert code == 2 and match in message, message


def test_train_model_dir_that_is_a_file_or_holds_a_file_in_the_way(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    message, code = outcome(capsys, train_check, f"--model_dir={tmp_path / 'file'}")
    assert code == 2 and "not a directory" in message
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    before = snapshot(tmp_path)
    message, code = outcome(capsys, train_check, f"--model_dir={tmp_path / 'run'}")
    assert code == 2 and "--model_dir: cannot write to" in message and "checkpoints" in message, message
    assert snapshot(tmp_path) == before


def test_train_probe_leaves_nothing_behind(tmp_path, capsys):
    message, code = outcome(capsys, train_check, f"--model_dir={tmp_path / 'run'}")
    assert (message, code) == ("", 0)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("kept")
    before = snapshot(tmp_path / "run")
    assert outcome(capsys, train_check, f"--model_dir={tmp_path / 'run'}") == ("", 0)
    assert snapshot(tmp_path / "run") == before and sorted(os.listdir(tmp_path / "run")) == ["notes.txt"]


def test_absl_usage_errors_exit_2_with_the_message_last(capsys):
    for args, flag in ((["--penalty=abc"], "--penalty"), (["--gamma=2"], "--gamma"),
                       (["--no_such_flag=1"], "no_such_flag"), (["--batch_size="], "--batch_size")):
        fv = flags.FlagValues()
        train.define_flags(fv)
        with pytest.raises(SystemExit) as exit:
            validation.parse_flags("rnp_tf.train", ["rnp_tf.train", *args], fv)
        assert exit.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rnp_tf.train: error: ") and flag in err[0], err
        assert "helpshort" not in err[0]


def test_exit_with_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        validation.exit_with_error("rnp_tf.train", "first\nsecond")
    assert exit.value.code == 2 and capsys.readouterr().err == "rnp_tf.train: error: first second\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, write_checkpoint):
    """A directory holding a small model.keras (no flags.json: --dataset must be given)."""
    directory = tmp_path_factory.mktemp("evaluate") / "run"
    write_checkpoint(directory)
    return directory


EVALUATE_CASES = [
    ("penalty", [math.nan, math.inf, -math.inf]),
    ("budget", [math.nan, math.inf, 0.0, -0.5, 1.5]),
    ("compute_cap", [math.nan, -math.inf, 0.0, 2.0, 1e-6]),
]


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in EVALUATE_CASES for v in values])
def test_evaluate_bad_knob_values_name_the_flag(model_dir, flag, value):
    before = snapshot(model_dir)
    with pytest.raises(ValueError) as error:
        evaluation.evaluate_dir(str(model_dir), "digits", pictures=False, **{flag: value})
    message = str(error.value)
    assert f"--{flag}" in message and "compute_fraction" not in message, message
    assert snapshot(model_dir) == before


def test_evaluate_bad_locations(model_dir, tmp_path):
    before = snapshot(model_dir)
    with pytest.raises(ValueError, match="--output_dir: cannot write to '/proc/rnp_unwritable'"):
        evaluation.evaluate_dir(str(model_dir), "digits", output_dir=UNWRITABLE)
    with pytest.raises(FileNotFoundError, match="--model_dir: no model.keras"):
        evaluation.evaluate_dir(str(tmp_path / "missing"), "digits")
    with pytest.raises(ValueError, match="--penalty and --budget"):
        evaluation.evaluate_dir(str(model_dir), "digits", penalty=-0.1, budget=0.5)
    assert snapshot(model_dir) == before


# ------------------------------------------------------------ real command lines
def one_error_line(result, program):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: "), result.stderr[-2000:]
    return last


@pytest.mark.slow
def test_cli_train_nan_penalty_writes_nothing(tmp_path, run_module):
    """Issue 25, case 1: --penalty=nan used to train, write a model with NaN weights, then die."""
    run_dir = tmp_path / "run"
    result = run_module("rnp_tf.train", "--flagfile=configs/quickstart.flags", f"--model_dir={run_dir}",
                        "--penalty=nan")
    assert "--penalty" in one_error_line(result, "rnp_tf.train")
    assert not run_dir.exists()


@pytest.mark.slow
def test_cli_train_unwritable_model_dir_and_absl_errors(tmp_path, run_module):
    result = run_module("rnp_tf.train", f"--model_dir={UNWRITABLE}", "--rnp_epochs=1")
    assert "--model_dir: cannot write to" in one_error_line(result, "rnp_tf.train")
    result = run_module("rnp_tf.train", f"--model_dir={tmp_path / 'run'}", "--gamma=abc")
    assert "--gamma=abc" in one_error_line(result, "rnp_tf.train")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_train_one_class_labels_name_the_file(tmp_path, run_module):
    """Issue 25, case 5: one-class data is refused with a message about the data, not about `num_classes`.

    Class 0 alone, where `num_classes` would also be wrong (1); every label's
    message is tested in-process in `test_data.py`.
    """
    labels, match = 0, "only class id 0"
    path = tmp_path / "one_class.npz"
    np.savez(path, x_train=np.zeros((16, 8, 8), "uint8"), y_train=np.full(16, labels, "int64"),
             x_test=np.zeros((4, 8, 8), "uint8"), y_test=np.full(4, labels, "int64"))
    run_dir = tmp_path / "run"
    result = run_module("rnp_tf.train", f"--dataset=npz:{path}", f"--model_dir={run_dir}", "--widths=8,8,8,8")
    line = one_error_line(result, "rnp_tf.train")
    assert str(path) in line and match in line and "num_classes` must" not in line, line
    assert not run_dir.exists()


@pytest.mark.slow
def test_cli_evaluate_budget_names_the_flag(model_dir, run_module):
    """Issue 25, case 8: --budget / --compute_cap errors named compute_fraction (the command once; the rest below)."""
    before = snapshot(model_dir)
    result = run_module("rnp_tf.evaluate", f"--model_dir={model_dir}", "--dataset=digits", "--budget=1.5")
    line = one_error_line(result, "rnp_tf.evaluate")
    assert "--budget" in line and "compute_fraction" not in line, line
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("flag, kwargs", [("--compute_cap", {"compute_cap": float("nan")}),
                                          ("--output_dir", {"output_dir": UNWRITABLE})])
def test_evaluate_dir_names_the_flag(model_dir, flag, kwargs):
    """The errors `rnp_tf.evaluate` prints as one line: each names its flag, before any work."""
    from rnp_tf import evaluation

    before = snapshot(model_dir)
    with pytest.raises(ValueError) as info:
        evaluation.evaluate_dir(model_dir, "digits", **kwargs)
    assert flag in str(info.value) and "compute_fraction" not in str(info.value), str(info.value)
    assert snapshot(model_dir) == before


def test_evaluate_flags_are_defined_once():
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    evaluate.define_flags(fv)
    assert {"budget", "compute_cap", "output_dir"} <= set(fv)
