"""rnp_tf.run_config: settings validated before any data is read (the flag-level cases are in test_train.py)."""

import pytest

from rnp_tf import run_config


def test_values_may_be_numbers_or_strings(tmp_path):
    a = run_config.make_config(model_dir=str(tmp_path / "run"), widths=(8, 8, 8, 8), select_budgets=(0.5,),
                               validation_split=0.1, backbone_penalty_range=(-0.3, 0.05))
    b = run_config.make_config(model_dir=str(tmp_path / "run"), widths=["8", "8", "8", "8"], select_budgets=["0.5"],
                               validation_split=0.1, backbone_penalty_range=["-0.3", "0.05"])
    assert a == b and a.widths == (8, 8, 8, 8) and a.backbone_penalty_range == (-0.3, 0.05)
    defaults = run_config.make_config(model_dir=str(tmp_path / "run"))
    assert defaults == run_config.TrainConfig(model_dir=str(tmp_path / "run"))


def test_errors_quote_the_values(tmp_path):
    with pytest.raises(ValueError, match=r"Received: --widths=16,32,32$"):
        run_config.make_config(model_dir=str(tmp_path / "run"), widths=(16, 32, 32))
    with pytest.raises(ValueError, match="--model_dir is required"):
        run_config.make_config()
    with pytest.raises(ValueError, match="--groups=3 does not fit --backbone=cifar_cnn"):
        run_config.make_config(model_dir=str(tmp_path / "run"), groups=3)


def test_backbone_spec_follows_the_config():
    assert run_config.backbone_spec(run_config.TrainConfig(model_dir="run", widths=(8, 8, 8, 8))) != \
        run_config.backbone_spec(run_config.TrainConfig(model_dir="run"))

