"""python -m bench.export: a real --quick run (CIFAR CNN exported and timed in TFLite and onnxruntime)."""

import json

import pytest

from bench import export as bench_export


@pytest.mark.slow
def test_quick_run_writes_the_table_json_and_plot(tmp_path, run_module):
    done = run_module("bench.export", "--quick", "--breakdown", f"--output={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "export.json").read_text())
    assert result["complete"] and result["benchmark"] == "export"
    assert result["config"]["models"] == ["cifar_cnn"] and result["config"]["targets"] == [2.0, 4.0]
    assert len(result["machine"]["load_average"]) == 3 and result["machine"]["onnxruntime"]
    info = result["models"]["cifar_cnn 32px"]
    assert [p["target"] for p in info["operating_points"]] == [2.0, 4.0]
    sizes = info["artifacts"]["size_mb"]
    assert set(sizes) == {"rnp_point0.tflite", "rnp_point1.tflite", "full.tflite", "rnp.onnx", "rnp_b1.onnx",
                          "full.onnx"}
    assert all(v > 0 for v in sizes.values())
    assert info["artifacts"]["all_branches_estimate_mb"] > 0
    # the runner's one-copy chaining against its signature runners, same rounds
    copies = info["tflite_runner_copies"]
    assert set(copies) == {"2x", "4x"}
    assert all(c["zero_copy_ms"] > 0 and c["signature_runner_ms"] > 0 and c["paired_gain"] > 0 for c in copies.values())
    assert set(info["breakdown"]) == {"tflite_ms_per_signature", "onnxruntime_b1", "onnxruntime_b1_split"}
    split = info["breakdown"]["onnxruntime_b1_split"]
    assert set(split) == {"full.onnx", "2x", "4x"}
    for key in ("2x", "4x"):
        assert split[key]["conv_ms"] > 0 and split[key]["bound_efficiency"] >= split[key]["efficiency"] > 0
    rows = result["rows"]
    # TFLite at batch 1, onnxruntime at batch 1 and 8 (uniform and per-sample mixed actions); two points each
    assert sorted((r["runtime"], r["batch_size"], r["mode"]) for r in rows) == sorted(
        [("tflite", 1, "uniform")] * 2 + [("onnxruntime", 1, "uniform")] * 2
        + [("onnxruntime", 8, "uniform")] * 2 + [("onnxruntime", 8, "mixed")] * 2
    )
    mixed = info["mixed_actions"]["8"]
    assert len(mixed) == 2 and all(len(a) == 8 and len(set(map(tuple, a))) > 1 for a in mixed)
    for r in rows:
        assert set(r) == set(bench_export.ROW_KEYS)
        assert r["full_ms"] > 0 and r["rnp_ms"] > 0
        assert r["measured_speedup"] == pytest.approx(r["full_ms"] / r["rnp_ms"])
        assert r["efficiency"] == pytest.approx(r["measured_speedup"] / r["theoretical_speedup"])
        assert r["max_abs_logit_diff"] <= 1e-4
        assert 1.5 < r["theoretical_speedup"] < 5.0
    assert [t["met"] for t in result["targets"]] == [None] * 4  # no 224x224 rows in a quick run
    table = (tmp_path / "export.md").read_text()
    assert "| cifar_cnn 32px | tflite" in table and "ORT rnp_b1.onnx" in table and "| mixed " in table
    assert "## Where onnxruntime's batch-1 time goes" in table and "| cifar_cnn 32px | 4x " in table
    assert (tmp_path / "export.png").stat().st_size > 1000


def test_targets_take_the_worst_vgg16_batch1_point():
    def row(runtime, batch, efficiency, model="vgg16"):
        return {"model": model, "image_size": 224, "runtime": runtime, "batch_size": batch,
                "efficiency": efficiency, "paired_efficiency": efficiency}

    rows = [row("tflite", 1, 0.9), row("tflite", 1, 0.79), row("onnxruntime", 1, 0.85),
            row("onnxruntime", 64, 0.1), row("tflite", 1, 0.1, model="cifar_cnn"),
            dict(row("tflite", 1, 0.1), image_size=112)]
    tflite, ort, resnet, mobilenet = bench_export.evaluate_targets(rows)
    assert (tflite["value"], tflite["met"], tflite["points"]) == (0.79, False, 2)
    assert resnet["met"] is None and mobilenet["met"] is None
    assert (ort["value"], ort["met"], ort["points"]) == (0.85, True, 1)
    # without 224x224 rows, the largest size measured, named
    ort = bench_export.evaluate_targets([dict(row("onnxruntime", 1, 0.7), image_size=112)])[1]
    assert (ort["value"], ort["met"], ort["name"]) == (0.7, False, "VGG-16 112px batch 1 onnxruntime: efficiency at every point")


def test_residual_targets_take_their_own_rows():
    """ResNet-50: TFLite efficiency at 2-3x >= 0.8; MobileNetV2: TFLite speed-up at 2x >= 1.5."""
    def row(model, theoretical, measured, runtime="tflite"):
        return {"model": model, "image_size": 224, "runtime": runtime, "batch_size": 1, "theoretical_speedup": theoretical,
                "measured_speedup": measured, "efficiency": measured / theoretical,
                "paired_efficiency": measured / theoretical}

    rows = [row("resnet50", 2.0, 1.8), row("resnet50", 3.0, 2.1), row("resnet50", 5.0, 0.5),
            row("mobilenet_v2", 2.0, 1.6), row("mobilenet_v2", 2.0, 0.1, runtime="onnxruntime")]
    _, _, resnet, mobilenet = bench_export.evaluate_targets(rows)
    assert (resnet["value"], resnet["points"], resnet["met"]) == (pytest.approx(0.7), 2, False)
    assert (mobilenet["value"], mobilenet["points"], mobilenet["met"]) == (1.6, 1, True)


@pytest.mark.slow
def test_quick_run_times_the_saved_model(tmp_path, run_module):
    """`--runtimes=saved_model`: the sliced SavedModel's batch-1 and batch-N signatures against the full one."""
    done = run_module("bench.export", "--quick", "--runtimes=saved_model", f"--output={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "export.json").read_text())
    sizes = result["models"]["cifar_cnn 32px"]["artifacts"]["size_mb"]
    assert set(sizes) == {"rnp.savedmodel", "full.savedmodel"} and all(v > 0.1 for v in sizes.values())
    rows = result["rows"]
    assert sorted((r["runtime"], r["batch_size"], r["artifact"]) for r in rows) == sorted(
        [("saved_model", 1, "rnp.savedmodel (forced_single)")] * 2 + [("saved_model", 8, "rnp.savedmodel (forced)")] * 2
    )
    for r in rows:
        assert r["full_ms"] > 0 and r["rnp_ms"] > 0 and r["max_abs_logit_diff"] <= 1e-4
    assert "| cifar_cnn 32px | TF rnp.savedmodel (forced_single) |" in (tmp_path / "export.md").read_text()


def test_runtimes_select_the_jobs():
    def runtimes(**overrides):
        config = bench_export.default_config(**overrides)
        return [(name, job["vgg_size"], r) for name, job, r in bench_export.jobs(config)]

    assert runtimes(ort_vgg_size=112) == [("vgg16", 224, ("tflite",)), ("vgg16", 112, ("onnxruntime",)),
                                          ("cifar_cnn", 224, ("tflite", "onnxruntime"))]
    assert runtimes(runtimes=["tflite"], ort_vgg_size=112) == [("vgg16", 224, ("tflite",)),
                                                               ("cifar_cnn", 224, ("tflite",))]
    assert runtimes(runtimes=["onnxruntime"], ort_vgg_size=112)[0] == ("vgg16", 112, ("onnxruntime",))
    assert runtimes(runtimes=["saved_model", "onnxruntime"], ort_vgg_size=112)[:2] == [
        ("vgg16", 224, ("saved_model",)), ("vgg16", 112, ("onnxruntime",))]


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown or no runtimes"):
        bench_export.default_config(runtimes=["tensorrt"])
    with pytest.raises(ValueError, match="Unknown model"):
        bench_export.default_config(models=["resnet"])
    with pytest.raises(ValueError, match="targets"):
        bench_export.default_config(targets=[0.5])


def test_time_split_separates_kernels_reorders_and_the_rest():
    ort_b1 = {
        "full.onnx": {"total_ms": 100.0, "by_op_ms": {"Conv": 80.0, "FusedGemm": 15.0, "Gemm": 1.0, "MaxPool": 4.0}},
        "rnp_b1.onnx 4x": {"total_ms": 40.0, "by_op_ms": {"If": 39.0, "Conv": 20.0, "FusedGemm": 7.0, "Gemm": 0.5,
                                                          "ReorderInput": 2.0, "ReorderOutput": 1.5, "Sigmoid": 0.2}},
    }
    split = bench_export.ort_time_split(ort_b1, [{"target": 4.0, "theoretical_speedup": 4.0}])
    assert split["full.onnx"] == {"total_ms": 100.0, "conv_ms": 80.0, "dense_ms": 16.0, "reorder_ms": 0.0,
                                  "other_ms": 4.0}
    point = split["4x"]
    # If holds its branches' time: "other" is what no named kernel accounts for, not If added on top
    assert (point["conv_ms"], point["dense_ms"], point["reorder_ms"]) == (20.0, 7.5, 3.5)
    assert point["other_ms"] == pytest.approx(9.0)
    assert point["efficiency"] == pytest.approx(100.0 / 40.0 / 4.0)
    assert point["bound_efficiency"] == pytest.approx(100.0 / 27.5 / 4.0)
    lines = bench_export.time_split_markdown({"models": {"vgg16 224px": {"breakdown": {"onnxruntime_b1_split": split}}}})
    assert "| vgg16 224px | 4x " in "\n".join(lines) and "0.909" in "\n".join(lines)
    assert bench_export.time_split_markdown({"models": {"m": {}}}) == []


def test_skip_models_run_in_every_runtime():
    """`+skip` models are timed in TFLite and onnxruntime like the others; unknown names are refused."""
    config = bench_export.default_config(models=["resnet50+skip", "mobilenet_v2"])
    assert [(name, runtimes) for name, _, runtimes in bench_export.jobs(config)] == [
        ("resnet50+skip", ("tflite", "onnxruntime")), ("mobilenet_v2", ("tflite", "onnxruntime"))]
    with pytest.raises(ValueError, match="Unknown model"):
        bench_export.default_config(models=["vgg16+skip"])


def test_artifact_plan_puts_the_mixed_rows_in_the_batched_onnx_only():
    """The mixed batches' rows widen `rnp.onnx`'s restriction, once each; the other files keep the points'."""
    points = [{"actions": [2, 2]}, {"actions": [1, 1]}]
    plan = bench_export.artifact_plan(points, False, [[1, 2], [2, 2], [1, 2], [2, 1]])
    assert plan["rnp.onnx"] == ("onnx_batched", [[2, 2], [1, 1], [1, 2], [2, 1]])
    assert plan["rnp_b1.onnx"] == ("onnx_single", [[2, 2], [1, 1]])
    assert plan["rnp_point0.tflite"] == ("tflite_rnp", [[2, 2]])
    assert bench_export.artifact_plan(points, True, [[1, 2]])["rnp.onnx"] == ("onnx_batched", None)
