"""bench.input: the JSON and Markdown it writes, on a small configuration."""

import json

import pytest

from bench import input as bench_input


@pytest.mark.slow
def test_quick_run_writes_the_documented_structure(tmp_path):
    argv = [
        "bench.input", "--quick", "--dataset=digits", "--backbone=cifar_cnn", "--widths=8,8,8,8",
        "--batch_size=16", "--robust_epochs=1", "--input_batches=3", "--train_steps=2",
        f"--model_dir={tmp_path / 'run'}", f"--output={tmp_path / 'out'}",
    ]
    config, options = bench_input.parse(argv)
    assert config.dataset == "digits" and config.batch_size == 16 and options["quick"]
    assert options["input_batches"] == 3 and options["warmup_batches"] == 2  # given flags win over --quick's
    result = bench_input.run_benchmark(config, options, log=lambda line: None)
    paths = bench_input.write_outputs(result, tmp_path / "out")
    written = json.loads(open(paths["json"]).read())
    assert written == json.loads(json.dumps(result))
    assert written["input"]["images"] == 3 * 16 and written["input"]["images_per_s"] > 0
    # imagenet.flags trains the robust and the two Algorithm-1 phases (no --pretrain_epochs).
    assert [row["phase"] for row in written["phases"]] == ["robust", "agent", "backbone"]
    for row in written["phases"]:
        assert len(row["step_s_all"]) == 2 and row["step_s"] > 0
        assert row["images_per_s"] == 16 / row["step_s"]
        assert row["input_bound"] == (written["input"]["images_per_s"] < row["images_per_s"])
    assert written["config"]["input_shape"] == [8, 8, 1] and written["machine"]["cores"] >= 1
    markdown = open(paths["markdown"]).read()
    assert "| robust |" in markdown and "images/s" in markdown and "python -m bench.input" in markdown
