"""rnp_tf.train / rnp_tf.trainer beyond one device and one uninterrupted process.

- kill -9 in the middle of a stage, re-run the same command: the final state
  (every model variable, both optimizers, the schedule counters) equals an
  uninterrupted run's, bit for bit (`--reseed_every_epoch`);
- kill -9 while a checkpoint is being written, re-run: it resumes from the
  one before, bit for bit;
- a truncated newest checkpoint: one warning line naming it, the run
  continues from the newest one that verifies; other flags: one line, exit
  status 2, nothing overwritten;
- MirroredStrategy on the two logical CPUs of the test session and
  MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1: every
  phase, finite losses, identical weights on both workers;
- the ImageNet path: `--backbone_weights` and configs/imagenet.flags (the
  weight mapping itself: test_keras_weights.py).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from rnp_tf import callbacks
from rnp_tf import distribute
from rnp_tf import resume
from rnp_tf import train
from rnp_tf import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small run through every stage: 1 full-width epoch, reorder, 2 robust
# epochs, 1 Algorithm-1 epoch (3 agent warm-up steps, 2 backbone, 2 agent,
# 1 backbone), 8 steps each.
SMALL = [
    "--dataset=digits", "--widths=8,8,8,8", "--batch_size=64", "--pretrain_epochs=1", "--robust_epochs=2",
    "--rnp_epochs=1", "--steps_per_epoch=8", "--agent_steps=2", "--backbone_steps=2", "--epsilon_decay_steps=3",
    "--evaluate=false", "--tensorboard=false", "--verbose=2",
]


def parse(*args):
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["rnp_tf.train", *args])
    return fv


def config_of(*args):
    return train.config_from_flags(parse(*args))


def env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "rnp_tf.train", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env=env(),
    )


def state(path):
    """Every tensor of a training-state checkpoint directory, by name."""
    reader = tf.train.load_checkpoint(os.path.join(path, callbacks.STATE_PREFIX))
    names = [n for n, _ in tf.train.list_variables(os.path.join(path, callbacks.STATE_PREFIX))]
    return {n: reader.get_tensor(n) for n in names if n.endswith("VARIABLE_VALUE")}


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("rnp_tf.train: error")]


# The killed run: the CLI's code with one extra callback that SIGKILLs the
# process after the 4th of the 8 steps of the second robust epoch (the only
# stage with two epochs), a fixed point whatever the machine's load.
_KILLED_RUN = """
import os, signal, sys
import keras
from absl import flags
from rnp_tf import train, trainer

class KillMidEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 3:
            os.kill(os.getpid(), signal.SIGKILL)

fv = flags.FlagValues(); train.define_flags(fv); fv(["rnp_tf.train", *sys.argv[1:]])
trainer.run(train.config_from_flags(fv), callbacks=[KillMidEpoch()])
"""


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """One run killed (SIGKILL) inside the robust stage and resumed; one uninterrupted, in this process."""
    root = tmp_path_factory.mktemp("resume")
    killed = root / "killed"
    args = [*SMALL, "--reseed_every_epoch=true", f"--model_dir={killed}"]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, *args], cwd=REPO, env=env(), capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "state" / "robust-0001").exists(), "the first robust epoch never completed"
    at_kill = json.loads((killed / "progress.json").read_text())
    snapshot = root / "snapshot"
    shutil.copytree(killed, snapshot)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = root / "uninterrupted"
    config = config_of(*SMALL, "--reseed_every_epoch=true", f"--model_dir={reference}", "--verbose=0")
    metrics = trainer.run(config)
    return {"killed": killed, "reference": reference, "at_kill": at_kill, "snapshot": snapshot,
            "resumed": resumed, "metrics": metrics, "args": args}


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_equals_uninterrupted(killed_and_resumed):
    r = killed_and_resumed
    # Killed inside the robust stage: backbone and reorder done, robust epoch 2 of 2 running.
    stages = r["at_kill"]["stages"]
    assert stages["backbone"]["epochs_done"] == 1 and stages["reorder"]["epochs_done"] == 1
    assert stages["robust"]["epochs_done"] == 1 and stages["rnp"]["epochs_done"] == 0
    assert "resuming" in r["resumed"].stdout and "stage robust (2 epochs, from epoch 2)" in r["resumed"].stdout
    assert "stage backbone" not in r["resumed"].stdout  # completed stages are skipped

    resumed = json.loads((r["killed"] / "metrics.json").read_text())
    reference = r["metrics"]
    # Same number of steps: the schedule counters are model weights.
    assert resumed["schedule_step"] == reference["schedule_step"] == 8
    assert resumed["agent_updates"] == reference["agent_updates"]
    for stage in ("backbone", "robust", "rnp"):
        assert resumed["history"][stage]["loss"] == pytest.approx(reference["history"][stage]["loss"], abs=0)

    # Bit-identical final state: model variables and both optimizers (incl. the agent's).
    final_resumed, final_reference = state(r["killed"] / "state" / "rnp-0001"), state(r["reference"] / "state" / "rnp-0001")
    assert final_resumed.keys() == final_reference.keys()
    assert any(k.startswith("agent_optimizer/") for k in final_resumed)
    for name, value in final_reference.items():
        np.testing.assert_array_equal(final_resumed[name], value, err_msg=name)
    # Older states are pruned; the .keras checkpoints are there as before.
    assert sorted(os.listdir(r["killed"] / "state")) == ["rnp-0001", "robust-0002"]
    assert json.loads((r["killed"] / "checkpoints" / "latest.json").read_text())["epoch"] == 1


@pytest.mark.slow
def test_rerunning_a_complete_run_does_nothing(killed_and_resumed, capsys):
    config = config_of(*killed_and_resumed["args"])
    before = (killed_and_resumed["killed"] / "metrics.json").read_text()
    assert trainer.run(config) == json.loads(before)
    assert "nothing to do" in capsys.readouterr().out
    assert (killed_and_resumed["killed"] / "metrics.json").read_text() == before


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_older_one(killed_and_resumed, tmp_path):
    """Issue 25, case 6: one warning line naming the skipped checkpoint, training continues from the older one."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_and_resumed["snapshot"], run_dir)
    checkpoint = run_dir / "state" / "robust-0001"
    data = next(p for p in checkpoint.iterdir() if ".data-" in p.name)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    older = killed_and_resumed["at_kill"]["checkpoints"][-2]
    result = run_cli(*killed_and_resumed["args"][:-1], f"--model_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("rnp_tf.train: warning")]
    assert len(warnings) == 1 and "robust-0001 is corrupt" in warnings[0] and "truncated" in warnings[0], warnings
    assert f"resuming from {older}" in warnings[0] and "Traceback" not in result.stderr
    assert f"resuming {run_dir} from {older}" in result.stdout
    assert "stage robust (2 epochs)" in result.stdout and "stage backbone" not in result.stdout
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["complete"] and progress["stages"]["robust"]["epochs_done"] == 2
    assert sorted(os.listdir(run_dir / "state")) == ["rnp-0001", "robust-0002"]  # the corrupt one rewritten, pruned
    for name in ("rnp-0001", "robust-0002"):
        callbacks.read_manifest(str(run_dir / "state" / name))


# Killed while it writes a checkpoint: the CLI's code with the digest of the
# checkpoint's files (computed after TensorFlow wrote them into the hidden
# temporary directory, before the manifest and the rename) SIGKILLing the
# process when it reaches the second robust epoch's checkpoint.
_KILLED_IN_WRITE = """
import os, signal, sys
from absl import flags
from rnp_tf import callbacks, train, trainer

digest = callbacks._sha256

def sha256_then_die(path):
    if ".robust-0002.tmp-" in path:
        os.kill(os.getpid(), signal.SIGKILL)
    return digest(path)

callbacks._sha256 = sha256_then_die
fv = flags.FlagValues(); train.define_flags(fv); fv(["rnp_tf.train", *sys.argv[1:]])
trainer.run(train.config_from_flags(fv))
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(killed_and_resumed, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "--reseed_every_epoch=true", f"--model_dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_WRITE, *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [n for n in os.listdir(run_dir / "state") if n.startswith(".robust-0002.tmp-")]
    assert len(leftovers) == 1 and os.listdir(run_dir / "state" / leftovers[0])  # killed mid-write
    assert json.loads((run_dir / "progress.json").read_text())["checkpoint"] == "robust-0001"

    metrics = trainer.run(config_of(*args[:-1], f"--model_dir={run_dir}", "--verbose=0"))
    assert metrics["schedule_step"] == killed_and_resumed["metrics"]["schedule_step"]
    assert sorted(os.listdir(run_dir / "state")) == ["rnp-0001", "robust-0002"]  # the temporary is gone
    final, reference = state(run_dir / "state" / "rnp-0001"), state(killed_and_resumed["reference"] / "state" / "rnp-0001")
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


@pytest.mark.slow
def test_other_flags_or_resume_false_are_refused(killed_and_resumed):
    run_dir = killed_and_resumed["snapshot"]
    config = config_of(*SMALL, "--reseed_every_epoch=true", f"--model_dir={run_dir}", "--rnp_epochs=3")
    dataset, model = trainer.prepare(config)
    with pytest.raises(ValueError, match=r"other flags \(--rnp_epochs=1 there, 3 now\)"):
        resume.resume_point(config, model)
    config = config_of(*SMALL, "--reseed_every_epoch=true", f"--model_dir={run_dir}", "--resume=false")
    with pytest.raises(ValueError, match="never overwritten"):
        resume.resume_point(config, model)
    # Where it runs may change: --strategy, --verbose, --tensorboard, ...
    config = config_of(*SMALL, "--reseed_every_epoch=true", f"--model_dir={run_dir}", "--verbose=0")
    point = resume.resume_point(config, model)  # gets as far as the checkpoint
    assert not point.fresh and point.progress["checkpoint"] == "robust-0001"


# ---------------------------------------------------------------- strategies
def _history_finite(metrics):
    for stage, history in metrics["history"].items():
        for key in ("loss",) + (("agent_loss",) if stage == "rnp" else ()):
            assert history[key] and np.all(np.isfinite(history[key])), (stage, key)


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    """Interrupts a run after its first epoch has been saved (rnp_tf's own callbacks run first)."""

    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("interrupted")


@pytest.mark.slow
def test_knob_selection_survives_a_resume_and_becomes_the_model(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "--pretrain_epochs=0", "--robust_epochs=0", "--reorder=false", "--rnp_epochs=2",
            "--validation_split=0.2", "--select_budgets=0.4,0.8", "--verbose=0", f"--model_dir={run_dir}"]
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.run(config_of(*args), callbacks=[_StopAfterFirstEpoch()])
    (first,) = callbacks.BestKnobWeights.read(run_dir / trainer.SELECTION)["history"]
    assert first["epoch"] == 0 and set(first["by_budget"]) == {0.4, 0.8}
    selected = trainer.run(config_of(*args))["knob_select"]
    assert selected["history"][0] == first  # read back, not measured again
    assert [h["epoch"] for h in selected["history"]] == [0, 1]
    scores = [h["accuracy"] for h in selected["history"]]
    assert selected["best_epoch"] == int(np.argmax(scores)) and selected["accuracy"] == max(scores)
    # the saved model holds the kept epoch's weights: the last epoch's checkpoint's only if that was the best
    model = keras.models.load_model(run_dir / "model.keras")
    kept = callbacks.BestKnobWeights.read(run_dir / trainer.SELECTION)["weights"]
    for a, b in zip(model.get_weights(), kept):
        np.testing.assert_array_equal(a, b)
    last = keras.models.load_model(run_dir / "checkpoints" / "rnp-002.keras").get_weights()
    same = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), last))
    assert same == (selected["best_epoch"] == 1)


@pytest.mark.slow
def test_mirrored_strategy_runs_every_stage_on_two_replicas(tmp_path):
    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2  # the two logical CPUs of conftest.py
    config = config_of(*SMALL, "--strategy=mirrored", "--robust_epochs=1", "--rnp_epochs=1", "--steps_per_epoch=7",
                       f"--model_dir={tmp_path / 'run'}", "--verbose=0")
    dataset, model = trainer.prepare(config, strategy)
    assert model.distribute_strategy is strategy
    metrics = trainer.run(config, dataset, model, strategy=strategy)
    assert metrics["replicas"] == 2
    _history_finite(metrics)
    # Algorithm 1: warm-up 3 agent steps, 2 backbone, 2 agent.
    assert metrics["schedule_step"] == 7 and metrics["agent_updates"] == 5
    assert model.current_phase() == "backbone"
    for variable in (model._schedule_step, model.stem.kernel, model.agent_variables[0]):
        copies = [v.numpy() for v in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])  # the replicas agree


def test_global_batch_must_split_evenly(tmp_path):
    strategy = distribute.get_strategy("mirrored")
    config = config_of(*SMALL, "--batch_size=63", f"--model_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match="divisible by the 2 replicas"):
        trainer.prepare(config, strategy)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = """
import sys, numpy as np
from absl import flags
from rnp_tf import distribute, train, trainer
fv = flags.FlagValues(); train.define_flags(fv); fv(["w", *sys.argv[2:]])
config = train.config_from_flags(fv)
strategy = distribute.get_strategy(config.strategy)
dataset, model = trainer.prepare(config, strategy)
metrics = trainer.run(config, dataset, model, strategy=strategy)
np.savez(sys.argv[1], *[v.numpy() for v in model.variables], *[v.numpy() for v in model.agent_optimizer.variables],
         *[v.numpy() for v in model.optimizer.variables])
print("HISTORY", __import__("json").dumps(metrics["history"]))
"""


@pytest.mark.slow
def test_multi_worker_two_processes_every_phase(tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [*SMALL, "--strategy=multi_worker", "--robust_epochs=1", "--rnp_epochs=1", "--steps_per_epoch=6",
            "--batch_size=32", f"--model_dir={tmp_path / 'run'}"]
    procs = []
    for index in range(2):
        worker_env = dict(env(), TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path / f"w{index}.npz"), *args], cwd=REPO, env=worker_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    histories = [json.loads(out.split("HISTORY", 1)[1]) for out, _ in outputs]
    for stage in ("backbone", "robust", "rnp"):
        assert np.all(np.isfinite(histories[0][stage]["loss"]))
    assert np.all(np.isfinite(histories[0]["rnp"]["agent_loss"]))
    assert histories[0] == histories[1]  # metrics reduced over both workers
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # written by the chief only
    assert metrics["replicas"] == 2 and metrics["schedule_step"] == 6 and metrics["agent_updates"] == 4


@pytest.mark.parametrize(
    "args,match",
    [
        (["--backbone_weights=imagenet"], "needs --backbone=vgg16"),
        (["--backbone=vgg16", "--backbone_weights=/no/such.h5"], "existing weights file"),
        (["--backbone=vgg16", "--width_multiplier=0.5", "--backbone_weights=imagenet"], "width_multiplier"),
        (["--tpu=grpc://10.0.0.1:8470"], "only used with --strategy=tpu"),
        (["--backbone=resnet50", "--backbone_weights=imagenet"], "needs --backbone=vgg16"),
        (["--backbone=resnet50", "--width_multiplier=0.5"], "vgg16 and vgg_cifar only"),
    ],
)
def test_bad_distribution_and_weights_flags(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        config_of(f"--model_dir={tmp_path / 'run'}", *args)


IMAGENET_FLAGS = os.path.join(REPO, "configs", "imagenet.flags")


@pytest.mark.slow
def test_imagenet_config_short_run_on_a_generated_tfds_directory(tmp_path):
    """configs/imagenet.flags end to end on 8 generated ImageNet JPEGs: the tfds reader, parallel JPEG
    decoding with random-resized crops to 224x224, VGG-16 (at 1/8 width to fit a test's time; the same
    13-conv, flatten, 2x4096 structure), batch 2, reorder, the robust stage and both Algorithm-1 phases."""
    from rnp_tf import data

    data.write_imagenet2012_sample(tmp_path / "tfds", num_train=8, num_validation=2)
    config = config_of(
        f"--flagfile={IMAGENET_FLAGS}", f"--tfds_data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'run'}",
        "--backbone_weights=none", "--width_multiplier=0.125", "--batch_size=2", "--steps_per_epoch=2",
        "--robust_epochs=1", "--rnp_epochs=1", "--agent_steps=1", "--backbone_steps=1", "--epsilon_decay_steps=1",
        "--evaluate=false", "--tensorboard=false", "--verbose=0",
    )
    assert (config.dataset, config.backbone, config.optimizer, config.reorder) == ("imagenet2012", "vgg16", "rmsprop", True)
    dataset, model = trainer.prepare(config)
    assert dataset.input_shape == (224, 224, 3) and dataset.num_classes == 1000 and dataset.num_train == 8
    assert model.num_prunable == 12 and model.head_layers[0].units == 4096
    x, y = next(iter(dataset.train))
    assert x.shape == (2, 224, 224, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    metrics = trainer.run(config, dataset, model)
    _history_finite(metrics)
    assert metrics["schedule_step"] == 2 and metrics["agent_updates"] == 1  # one agent, one backbone step
    assert set(metrics["history"]) == {"robust", "rnp"}
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["complete"] and progress["stages"]["robust"]["epochs_done"] == 1
    assert (tmp_path / "run" / "model.keras").stat().st_size > 0


@pytest.mark.slow
def test_imagenet_config_offline_stops_at_once_with_what_to_do(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rnp_tf.train", f"--flagfile={IMAGENET_FLAGS}", f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(env(), TFDS_DATA_DIR=str(tmp_path / "tfds")),
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "'imagenet2012' is not prepared" in lines[0] and "downloads/manual" in lines[0]
    assert "tfds build imagenet2012" in lines[0] and "never downloads" in lines[0]
    assert not (tmp_path / "run").exists()
