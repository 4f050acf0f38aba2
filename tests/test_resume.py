"""rnp_tf.resume: the run record (flags.json, progress.json) and where a run continues."""

import json
import shutil

import pytest

from rnp_tf import resume
from rnp_tf import run_config


def make(tmp_path, **values):
    return run_config.make_config(model_dir=str(tmp_path / "run"), widths=(16, 32, 32, 32), pretrain_epochs=5,
                                  robust_epochs=15, rnp_epochs=10, **values)


def test_a_run_recorded_with_a_removed_option_is_not_resumed(tmp_path):
    """flags.json of a run before the options were removed: their defaults resume, other values are refused."""
    config = make(tmp_path)
    saved = {**resume.jsonable_config(config), "late_decision": False, "aux_confidence": False,
             "backbone_distill_weight": 0.0}
    resume.check_compatible(config, saved, "run")
    for key, value in (("late_decision", True), ("aux_confidence", True), ("backbone_distill_weight", 0.5)):
        with pytest.raises(ValueError, match=rf"--{key}={value!r} there, an option removed after commit 7fe7dd6"):
            resume.check_compatible(config, {**saved, key: value}, "run")


def test_other_flags_are_named_and_where_it_runs_may_change(tmp_path):
    config = make(tmp_path)
    saved = resume.jsonable_config(config)
    resume.check_compatible(config, {**saved, "verbose": 0, "strategy": "mirrored", "model_dir": "elsewhere"}, "run")
    with pytest.raises(ValueError, match=r"other flags \(--rnp_epochs=3 there, 10 now\)"):
        resume.check_compatible(config, {**saved, "rnp_epochs": 3}, "run")


def test_progress_names_the_next_stage(tmp_path):
    config = make(tmp_path)
    progress = resume.new_progress(config)
    assert list(progress["stages"]) == ["backbone", "reorder", "robust", "rnp"]
    assert resume.next_stage(config, progress) == ("backbone", 0)
    progress["stages"]["backbone"]["epochs_done"] = 5
    progress["stages"]["reorder"]["epochs_done"] = 1
    progress["stages"]["robust"]["epochs_done"] = 7
    assert resume.next_stage(config, progress) == ("robust", 7)
    for stage in progress["stages"].values():
        stage["epochs_done"] = stage["epochs"]
    assert resume.next_stage(config, progress) == (None, 0)


def test_record_epoch_keeps_the_last_states(tmp_path):
    config = make(tmp_path)
    (tmp_path / "run").mkdir()
    progress = resume.new_progress(config)
    resume.write_record(config, progress)
    assert json.loads((tmp_path / "run" / resume.FLAGS).read_text())["rnp_epochs"] == 10
    names = ["backbone-0001", "backbone-0002", "backbone-0003"]
    for done, name in enumerate(names, 1):
        (tmp_path / "run" / resume.STATE_DIR / name).mkdir(parents=True)
        resume.record_epoch(progress, config.model_dir, "backbone", name, done, {"loss": 1.0 / done}, 2.0 * done)
    written = json.loads((tmp_path / "run" / resume.PROGRESS).read_text())
    assert written == progress
    assert written["checkpoint"] == "backbone-0003" and written["checkpoints"] == names[-resume.KEEP_STATES:]
    assert written["stages"]["backbone"]["history"]["loss"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert sorted(p.name for p in (tmp_path / "run" / resume.STATE_DIR).iterdir()) == names[-resume.KEEP_STATES:]
    resume.mark_complete(progress, config.model_dir)
    assert json.loads((tmp_path / "run" / resume.PROGRESS).read_text())["complete"]


def _checkpoints(tmp_path, config, names):
    """A recorded run whose state/ holds verifying checkpoints `names` (of a tiny Keras model)."""
    import keras

    from rnp_tf import callbacks

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    (tmp_path / "run" / resume.STATE_DIR).mkdir(parents=True)
    progress = resume.new_progress(config)
    for name in names:
        callbacks.write_training_state(model, str(tmp_path / "run" / resume.STATE_DIR / name), optimizers=False)
        stage, _, epoch = name.rpartition("-")
        for earlier, _ in resume.stage_plan(config):
            if earlier == stage:
                break
            progress["stages"][earlier]["epochs_done"] = progress["stages"][earlier]["epochs"]
        progress["stages"][stage]["epochs_done"] = int(epoch)
        progress["stages"][stage]["history"] = {"loss": [1.0] * int(epoch)}
        progress["checkpoint"] = name
        progress["checkpoints"] = (progress["checkpoints"] + [name])[-resume.KEEP_STATES:]
    return progress


def test_a_missing_newest_checkpoint_falls_back_with_one_warning(tmp_path, capsys):
    """Issue 25, case 6: after the corrupt newest checkpoint is deleted the run resumes from the one before."""

    config = make(tmp_path)
    progress = _checkpoints(tmp_path, config, ["robust-0015", "rnp-0001", "rnp-0002"])
    shutil.rmtree(tmp_path / "run" / resume.STATE_DIR / "rnp-0002")
    assert resume._usable_checkpoint(config, progress) == "rnp-0001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "rnp-0002 is missing" in err[0] and "rnp-0001" in err[0]
    assert progress["checkpoint"] == "rnp-0001" and progress["checkpoints"] == ["rnp-0001"]
    assert progress["stages"]["rnp"]["epochs_done"] == 1 and progress["stages"]["rnp"]["history"]["loss"] == [1.0]
    assert resume.next_stage(config, progress) == ("rnp", 1)


def test_falling_back_across_a_stage_rewinds_the_later_stage(tmp_path, capsys):

    config = make(tmp_path)
    progress = _checkpoints(tmp_path, config, ["robust-0015", "rnp-0001"])
    shutil.rmtree(tmp_path / "run" / resume.STATE_DIR / "rnp-0001")
    assert resume._usable_checkpoint(config, progress) == "robust-0015"
    assert "rnp-0001 is missing" in capsys.readouterr().err
    assert progress["stages"]["rnp"] == {**progress["stages"]["rnp"], "epochs_done": 0, "history": {}}
    assert resume.next_stage(config, progress) == ("rnp", 0)


def test_a_corrupt_newest_checkpoint_falls_back_with_one_warning(tmp_path, capsys):
    """Issue 25, case 6: a truncated newest checkpoint is skipped, naming it; no hand editing."""
    from rnp_tf import callbacks

    config = make(tmp_path)
    progress = _checkpoints(tmp_path, config, ["rnp-0001", "rnp-0002"])
    data = next((tmp_path / "run" / resume.STATE_DIR / "rnp-0002").glob("*.data-*"))
    data.write_bytes(data.read_bytes()[:-1])
    assert resume._usable_checkpoint(config, progress) == "rnp-0001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "rnp-0002 is corrupt" in err[0] and "truncated" in err[0], err
    assert "resuming from rnp-0001" in err[0]
    assert progress["checkpoint"] == "rnp-0001" and resume.next_stage(config, progress) == ("rnp", 1)
    assert data.exists()  # left as it is until the resumed run writes that epoch again

    progress = _checkpoints(tmp_path / "again", config, ["rnp-0001", "rnp-0002"])
    for name in ("rnp-0001", "rnp-0002"):
        data = next((tmp_path / "again" / "run" / resume.STATE_DIR / name).glob("*.data-*"))
        data.write_bytes(data.read_bytes()[:-1])
    config = make(tmp_path / "again")
    record = json.dumps(progress)
    with pytest.raises(callbacks.CheckpointError, match="rnp-0002 is corrupt.*rnp-0001 is corrupt.*no recorded checkpoint"):
        resume._usable_checkpoint(config, progress)
    assert json.dumps(progress) == record

    shutil.rmtree(tmp_path / "again" / "run" / resume.STATE_DIR)
    with pytest.raises(callbacks.CheckpointError, match="rnp-0002 is missing"):
        resume._usable_checkpoint(config, progress)
