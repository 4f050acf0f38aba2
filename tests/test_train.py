"""rnp_tf.train: flag validation, the quickstart run end to end (through rnp_tf.trainer), errors."""

import json
import os

import numpy as np
import pytest
from absl import flags

from rnp_tf import train
from rnp_tf import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.flags")


def parse(*args):
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["rnp_tf.train", *args])
    return fv


def test_flags_give_a_config(tmp_path):
    config = train.config_from_flags(parse(f"--flagfile={QUICKSTART}", f"--model_dir={tmp_path / 'run'}"))
    assert config.dataset == "digits" and config.widths == (16, 32, 32, 32)
    assert config.robust_epochs > 0 and config.rnp_epochs > 0
    assert config.backbone_penalty_range is None
    config = train.config_from_flags(parse(f"--flagfile={QUICKSTART}", f"--model_dir={tmp_path / 'run'}",
                                           "--backbone_penalty_range=-0.3,0.05"))
    assert config.backbone_penalty_range == (-0.3, 0.05)
    from rnp_tf import data

    model = trainer.build_model(config, data.load_dataset("digits", batch_size=32))
    assert model.schedule.backbone_penalty_range == (-0.3, 0.05)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--dataset=imagenet"], "--dataset"),
        (["--groups=3"], "--groups"),
        (["--widths=16,32,32"], "--widths"),
        (["--widths=a,b,c,d"], "--widths"),
        (["--epsilon_start=0.1", "--epsilon_end=0.5"], "--epsilon_end"),
        (["--agent_steps=0", "--backbone_steps=0"], "--agent_steps"),
        (["--init_checkpoint=/nonexistent/m.keras"], "--init_checkpoint"),
        (["--alpha=-1"], "--alpha"),
        (["--backbone_penalty_range=-0.1"], "--backbone_penalty_range"),
        (["--backbone_penalty_range=0.1,-0.3"], "--backbone_penalty_range"),
        (["--backbone_penalty_range=a,b"], "--backbone_penalty_range"),
        (["--select_budgets=0.5"], "--select_budgets.*--validation_split"),
        (["--validation_split=0.1", "--select_budgets=0.5", "--rnp_epochs=0"], "--rnp_epochs"),
        (["--validation_split=0.1", "--select_budgets=0,0.5"], "--select_budgets"),
        (["--validation_split=0.1", "--select_budgets=a"], "--select_budgets"),
    ],
)
def test_bad_flags_name_the_flag(tmp_path, args, match):
    fv = parse(f"--model_dir={tmp_path / 'run'}", *args)
    with pytest.raises(ValueError, match=match):
        train.config_from_flags(fv)


def test_model_dir_checks(tmp_path):
    with pytest.raises(ValueError, match="--model_dir is required"):
        train.config_from_flags(parse())
    with pytest.raises(ValueError, match="parent directory"):
        train.config_from_flags(parse(f"--model_dir={tmp_path / 'missing' / 'run'}"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        train.config_from_flags(parse(f"--model_dir={tmp_path / 'file'}"))


@pytest.mark.parametrize("flag", ["--rnp_epochs=-1", "--agent_steps=-5", "--batch_size=0", "--penalty=0.5"])
def test_out_of_range_numbers_are_rejected_at_parse_time(flag):
    with pytest.raises(flags.IllegalFlagValueError):
        parse(flag)


@pytest.mark.slow
def test_cli_bad_flag_is_one_line_and_no_work(tmp_path, run_module):
    run_dir = tmp_path / "run"
    result = run_module("rnp_tf.train", "--dataset=cifar11", f"--model_dir={run_dir}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("rnp_tf.train: error")]
    assert len(lines) == 1 and "--dataset" in lines[0], result.stderr
    assert result.stderr.rstrip().endswith(lines[0])
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_cli_corrupt_npz_is_a_clear_error(tmp_path, run_module):
    good = tmp_path / "good.npz"
    np.savez(good, x_train=np.zeros((8, 8, 8), "uint8"), y_train=np.zeros(8, "int64"),
             x_test=np.zeros((4, 8, 8), "uint8"), y_test=np.zeros(4, "int64"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = run_module("rnp_tf.train", f"--dataset=npz:{bad}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "not a readable .npz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, run_module):
    """The quickstart config with fewer epochs, through the real CLI."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_module(
        "rnp_tf.train",
        f"--flagfile={QUICKSTART}",
        f"--model_dir={run_dir}",
        "--pretrain_epochs=3",
        "--robust_epochs=4",
        "--rnp_epochs=3",
        "--verbose=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.mark.slow
def test_quickstart_writes_every_output(quickstart_run):
    run_dir, result = quickstart_run
    for name in ("model.keras", "metrics.json", "eval.json", "flags.json", "compute_histogram.png",
                 "extreme_images.png", "accuracy_vs_compute.png", "action_shares.png"):
        assert (run_dir / name).is_file(), name
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["prefix"] == "rnp" and latest["epoch"] == 3
    assert (run_dir / "checkpoints" / latest["checkpoint"]).is_file()
    assert any((run_dir / "logs" / "rnp").rglob("events.out.tfevents.*"))
    assert "| RNP (agent)" in result.stdout  # the summary table
    assert "share_l1" not in result.stdout  # shares kept out of the console


@pytest.mark.slow
def test_quickstart_metrics(quickstart_run):
    run_dir, _ = quickstart_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["full_accuracy"] >= 0.9
    assert metrics["rnp_accuracy"] >= 0.8
    assert 0.1 < metrics["compute_fraction"] < 1.0
    shares = np.asarray(metrics["action_shares"])
    assert shares.shape == (3, 4)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-6)
    assert set(metrics["stage_seconds"]) == {"backbone", "reorder", "robust", "rnp", "evaluate"}
    assert len(metrics["compute_per_class"]) == 10
    assert [p["action"] for p in metrics["static"]] == [1, 2, 3, 4]
    assert metrics["static"][-1]["compute_fraction"] == pytest.approx(1.0)
    flags_used = json.loads((run_dir / "flags.json").read_text())
    assert flags_used["rnp_epochs"] == 3 and flags_used["dataset"] == "digits"


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_training_report(quickstart_run, tmp_path, run_module):
    run_dir, _ = quickstart_run
    result = run_module("rnp_tf.evaluate", f"--model_dir={run_dir}", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(trained["rnp_accuracy"])
    assert evaluated["compute_fraction"]["mean"] == pytest.approx(trained["compute_fraction"], rel=1e-5)
    assert evaluated["compute_fraction"]["p10"] <= evaluated["compute_fraction"]["p90"]
    assert (tmp_path / "extreme_images.png").stat().st_size > 1000
    assert "distinct action tuples" in result.stdout


@pytest.mark.slow
def test_evaluate_cli_missing_model(tmp_path, run_module):
    result = run_module("rnp_tf.evaluate", f"--model_dir={tmp_path}")
    assert result.returncode == 2 and "no model.keras" in result.stderr


@pytest.mark.slow
def test_init_checkpoint_round_trip(quickstart_run, tmp_path):
    run_dir, _ = quickstart_run
    config = train.config_from_flags(
        parse(f"--flagfile={QUICKSTART}", f"--model_dir={tmp_path / 'b'}",
              f"--init_checkpoint={run_dir / 'model.keras'}")
    )
    dataset, model = trainer.prepare(config)
    import keras

    source = keras.models.load_model(run_dir / "model.keras")
    x, _ = dataset.test_arrays()
    np.testing.assert_allclose(model(x[:32]), source(x[:32]), atol=1e-5)
    wrong = train.config_from_flags(
        parse(f"--model_dir={tmp_path / 'c'}", "--widths=8,8,8,8", f"--init_checkpoint={run_dir / 'model.keras'}")
    )
    with pytest.raises(ValueError, match="does not match"):
        trainer.prepare(wrong)


@pytest.mark.parametrize("name", ["quickstart", "cifar10", "cifar100", "imagenet"])
def test_every_config_parses_and_validates(name, tmp_path):
    config = train.config_from_flags(
        parse(f"--flagfile={os.path.join(REPO, 'configs', name + '.flags')}", f"--model_dir={tmp_path / name}")
    )
    assert config.rnp_epochs > 0 and config.penalty < 0


@pytest.mark.slow
def test_resnet50_backbone_trains_from_converted_keras_resnet50_weights(tmp_path):
    """--backbone=resnet50 (the choice configs/imagenet.flags offers besides vgg16) through trainer.run: the
    weights of a keras.applications.ResNet50 converted by rnp_tf.from_keras fit it exactly (what
    --init_checkpoint loads; the .keras round trip itself is tested in test_convert.py), then one
    Algorithm-1 backbone step on 32x32 images (the smallest ResNet-50 takes)."""
    import keras

    import rnp_tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=images, y_train=np.arange(8) % 4, x_test=images[:4], y_test=np.arange(4))
    config = train.config_from_flags(parse(
        f"--dataset=npz:{npz}", "--backbone=resnet50", "--batch_size=4", "--steps_per_epoch=1", "--reorder=false",
        "--robust_epochs=0", "--rnp_epochs=1", "--agent_steps=0", "--agent_warmup=false", "--backbone_steps=1",
        "--evaluate=false", "--tensorboard=false", "--verbose=0", f"--model_dir={tmp_path / 'run'}",
    ))
    dataset, model = trainer.prepare(config)
    assert model.num_prunable == 32  # the inner 1x1 and 3x3 convs of the 16 bottlenecks
    keras.utils.set_random_seed(3)
    resnet = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=4)
    converted = rnp_tf.from_keras(resnet, k=4)
    model.set_weights(converted.get_weights())  # as train --init_checkpoint does
    x = dataset.test_arrays()[0][:2]
    full = np.full((2, model.num_prunable), model.groups)
    np.testing.assert_array_equal(
        model.rollout(x, actions=full)["logits"].numpy(), converted.rollout(x, actions=full)["logits"].numpy()
    )
    before = model.convs[5].kernel.numpy()
    metrics = trainer.run(config, dataset, model)
    assert metrics["schedule_step"] == 1 and metrics["agent_updates"] == 0
    assert np.isfinite(metrics["history"]["rnp"]["loss"]).all()
    assert not np.array_equal(model.convs[5].kernel.numpy(), before)  # the backbone step trained the convs
    assert os.path.getsize(tmp_path / "run" / "model.keras") > 0


@pytest.mark.slow
def test_mixed_precision_trains_every_phase(tmp_path, run_module):
    # mixed_float16: convolutions in float16, the agent and the logits in float32
    # (the agent's TD targets once met float16 Q-values in the first agent step).
    run = tmp_path / "run"
    result = run_module(
        "rnp_tf.train", f"--flagfile={QUICKSTART}", f"--model_dir={run}", "--mixed_precision",
        "--pretrain_epochs=1", "--robust_epochs=1", "--rnp_epochs=1", "--steps_per_epoch=2",
        "--agent_steps=1", "--backbone_steps=1", "--epsilon_decay_steps=1", "--pictures=false",
        "--tensorboard=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["agent_updates"] >= 1
    for stage in metrics["history"].values():
        for name, values in stage.items():
            assert np.all(np.isfinite(values)), (name, values)


@pytest.mark.slow
def test_init_checkpoint_of_a_spatial_head_moves_into_the_channel_major_one(tmp_path):
    """A VGG-16 saved before heads were channel-major (layout "spatial") initialises today's (`"channel"`)."""
    import rnp_tf
    from bench.models import randomise_batchnorm

    rng = np.random.default_rng(0)
    path = tmp_path / "images64.npz"
    np.savez(path, x_train=rng.integers(0, 256, (16, 64, 64, 3), np.uint8), y_train=np.arange(16) % 4,
             x_test=rng.integers(0, 256, (8, 64, 64, 3), np.uint8), y_test=np.arange(8) % 4)
    flags_ = [f"--dataset=npz:{path}", "--backbone=vgg16", "--width_multiplier=0.0625", "--batch_size=8",
              f"--model_dir={tmp_path / 'run'}"]
    dataset, model = trainer.prepare(train.config_from_flags(parse(*flags_)))
    assert model.plan.head.layout == "channel" and model.plan.head.spatial == 4  # 64x64 ends at 2x2
    config = model.get_config()
    config["backbone"] = {**config["backbone"], "head": {**config["backbone"]["head"], "layout": "spatial"}}
    old = rnp_tf.RNPModel.from_config(config)
    old.set_weights(model.get_weights())
    randomise_batchnorm(old, rng)
    fc1 = old.head_layers[0].kernel
    fc1.assign(rng.normal(0, 0.3, fc1.shape))
    old.save(tmp_path / "old.keras")
    _, loaded = trainer.prepare(train.config_from_flags(parse(*flags_, f"--init_checkpoint={tmp_path / 'old.keras'}")))
    x, _ = dataset.test_arrays()
    full = np.full((len(x), loaded.num_prunable), loaded.groups)
    want = old.rollout(x, actions=full)["logits"].numpy()
    assert np.std(want) > 0
    np.testing.assert_allclose(loaded.rollout(x, actions=full)["logits"].numpy(), want, atol=1e-4 * np.abs(want).max())
