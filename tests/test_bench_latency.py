"""bench.latency: operating points, mixed actions, the agent-alone timing function and the stage profile."""

import json

import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from bench import latency
from test_engine import RESIDUAL, make_model


@pytest.mark.parametrize("spec", [rnp_tf.cifar_cnn((8, 8, 16, 16)), RESIDUAL], ids=["chain", "residual"])
@pytest.mark.parametrize("batch", [1, 5])
def test_agent_alone_runs_on_maps_shaped_as_the_engine_holds_them(spec, batch):
    tf.random.set_seed(0)
    model = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=3)
    engine = rnp_tf.InferenceEngine(model)
    actions = np.random.default_rng(0).integers(1, 5, size=(batch, model.num_prunable)).astype(np.int32)
    agent, call = latency.agent_alone_function(engine, actions)
    chosen = np.asarray(agent())
    assert chosen.shape == (batch, model.num_prunable) and chosen.min() >= 1 and chosen.max() <= 4
    call()


def skippable_residual():
    """`RESIDUAL` with its identity bottleneck skippable (decisions 2 and 3), random BatchNorm statistics."""
    from bench.models import randomise_batchnorm

    spec = {"stages": [dict(s) for s in RESIDUAL["stages"]], "head": RESIDUAL["head"]}
    spec["stages"][2]["skippable"] = True
    tf.random.set_seed(0)
    return randomise_batchnorm(rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=3), 0)


def test_operating_points_skip_where_the_target_allows():
    model = skippable_residual()
    assert latency.skip_order(model) == [2]
    full, small, large = latency.operating_points(model, [1.0, 1.2, 3.0])
    assert full["actions"] == [4] * 5 and full["skipped_blocks"] == 0
    for point in (small, large):
        macs = float(model.macs(np.array([point["actions"]]))[0])
        assert point["theoretical_speedup"] == pytest.approx(model.full_macs / macs)
    assert large["skipped_blocks"] == 1 and large["actions"][2:4] == [0, 0]  # the skip and its untaken decision
    mixed = latency.mixed_actions(model, large["actions"], 64, seed=0)
    skipped = mixed[:, 2] == 0
    assert 0 < skipped.sum() < 64  # a quarter of the samples take the block
    np.testing.assert_array_equal(mixed[skipped, 3], 0)
    assert mixed[~skipped].min() >= 1 and mixed[skipped][:, [0, 1, 4]].min() >= 1
    mean = model.macs(mixed).numpy().mean()
    assert mean == pytest.approx(float(model.macs(np.array([large["actions"]]))[0]), rel=0.006)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 5])
def test_time_point_runs_skip_points(batch):
    """The engine, the agent alone and the row at a point that skips the block, uniform and mixed."""
    model = skippable_residual()
    engine = rnp_tf.InferenceEngine(model)
    full = rnp_tf.engine.DenseRunner(model)
    config = latency.default_config(quick=True, repeats=1, warmup=1, min_sample_seconds=0.0)
    point = latency.operating_points(model, [3.0])[0]
    x = tf.random.normal([batch, 8, 8, 1], seed=0)
    uniform = np.tile(np.asarray(point["actions"], np.int32), (batch, 1))
    for actions in (uniform, latency.mixed_actions(model, point["actions"], batch, seed=1)):
        row = latency.time_point("residual", model, engine, full, x, actions, 3.0, config)
        assert row["rnp_ms"] > 0 and row["agent_ms"] >= 0
        assert row["theoretical_speedup"] == pytest.approx(
            model.full_macs / float(model.macs(actions).numpy().mean()))


def test_model_names_add_the_skippable_residual_networks():
    config = latency.default_config(models=["vgg16", "resnet50", "mobilenet_v2"], skips=True)
    assert latency.model_names(config) == ["vgg16", "resnet50", "mobilenet_v2", "resnet50+skip", "mobilenet_v2+skip"]
    assert latency.model_names(dict(config, skips=False)) == ["vgg16", "resnet50", "mobilenet_v2"]


def test_operating_points_and_mixed_actions():
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn(), image_shape=(32, 32, 3), num_classes=10)
    points = latency.operating_points(model, [1.0, 2.0, 4.0])
    assert points[0]["actions"] == [4, 4, 4] and points[0]["theoretical_speedup"] == pytest.approx(1.0)
    for point in points[1:]:
        assert abs(np.log(point["theoretical_speedup"] / point["target"])) < 0.15
    mixed = latency.mixed_actions(model, points[2]["actions"], 64, seed=0)
    assert mixed.shape == (64, 3) and len({tuple(a) for a in mixed}) > 5
    mean = model.macs(mixed).numpy().mean()
    assert mean == pytest.approx(float(model.macs([points[2]["actions"]])[0]), rel=0.006)


def test_stage_times_scale_convs_by_their_macs():
    model = make_model()
    engine = rnp_tf.InferenceEngine(model)
    config = latency.default_config(quick=True, repeats=1, warmup=1, min_sample_seconds=0.0)
    points = latency.operating_points(model, [1.0, 2.0, 4.0])
    out = latency.stage_times(model, engine, points, config)
    stages = out["stages_ms"]
    full, *others = out["points"]
    assert full["conv_ideal_ms"] == full["conv_ms"]
    for point in others:
        acts = point["actions"]
        # the first prunable conv reads the unpruned stem: only its output shrinks
        fractions = [acts[0] / 4] + [acts[t - 1] * acts[t] / 16 for t in range(1, 3)]
        expected = sum(stages[f"conv_{t}_4_4"] * f for t, f in enumerate(fractions))
        assert point["conv_ideal_ms"] == pytest.approx(expected)
        assert point["conv_ideal_ms"] < full["conv_ms"]
        assert point["stem_ms"] == full["stem_ms"]  # the stem is never pruned
        parts = point["stem_ms"] + point["conv_ms"] + point["pool_ms"] + point["add_ms"] + point["head_ms"]
        assert point["total_ms"] == pytest.approx(parts)
    assert {"stem", "head_4", f"head_{others[-1]['actions'][-1]}"} <= set(stages)
    with pytest.raises(ValueError, match="full width"):
        latency.stage_times(model, engine, points[1:], config)




def test_residual_targets_take_their_own_rows():
    """ResNet-50: efficiency >= 0.8 at 2-3x and the agent <= 3%; MobileNetV2: the agent <= 5% at batch 1."""
    def row(model, batch, theoretical, efficiency, agent):
        return {"model": model, "image_size": 224, "batch_size": batch, "mode": "uniform",
                "theoretical_speedup": theoretical, "efficiency": efficiency, "paired_efficiency": efficiency,
                "agent_overhead": agent}

    rows = [row("resnet50", 1, 2.0, 0.9, 0.02), row("resnet50", 1, 3.0, 0.85, 0.025), row("resnet50", 1, 5.0, 0.1, 0.01),
            row("resnet50", 64, 2.0, 0.7, 0.04), row("mobilenet_v2", 1, 2.0, 0.5, 0.06)]
    targets = {t["name"]: t for t in latency.evaluate_targets(rows)}
    assert targets["ResNet-50 batch 1: efficiency at 2-3x"]["value"] == 0.85
    assert targets["ResNet-50 batch 64: efficiency at 2-3x"]["met"] is False
    assert (targets["ResNet-50: agent overhead (of the full model's time)"]["value"], ) == (0.04,)
    assert targets["MobileNetV2 batch 1: agent overhead (of the full model's time)"]["met"] is False
    assert targets["VGG-16 batch 1: efficiency at 3-5x"]["met"] is None


@pytest.mark.slow
def test_latency_benchmark_quick_schema(tmp_path):
    from bench import timing

    config = latency.default_config(
        quick=True, batch_sizes=[1, 4], targets=[3.0], repeats=1, warmup=1,
        min_sample_seconds=0.0, memory=False, no_agent_variant=False,
    )
    assert config["models"] == ["cifar_cnn"]
    result = latency.run_benchmark(config, log=lambda line: None)
    paths = latency.write_outputs(result, tmp_path)
    data = json.loads(open(paths["json"], encoding="utf-8").read())
    assert data["complete"] is True
    for key in ("schema_version", "date", "machine", "config", "rows", "targets", "paper_gpu"):
        assert key in data
    assert len(data["rows"]) == 1 + 2  # batch 1: uniform; batch 4: uniform + mixed
    for row in data["rows"]:
        assert set(latency.ROW_KEYS) <= set(row)
        assert row["full_ms"] > 0 and row["rnp_ms"] > 0 and row["agent_ms"] >= 0
        assert row["efficiency"] == pytest.approx(row["measured_speedup"] / row["theoretical_speedup"])
    modes = {(r["batch_size"], r["mode"]) for r in data["rows"]}
    assert modes == {(1, "uniform"), (4, "uniform"), (4, "mixed")}
    mixed = [r for r in data["rows"] if r["mode"] == "mixed" and r["target_speedup"] == 3.0][0]
    uniform = [r for r in data["rows"] if r["mode"] == "uniform" and r["batch_size"] == 4
               and r["target_speedup"] == 3.0][0]
    assert mixed["theoretical_speedup"] == pytest.approx(uniform["theoretical_speedup"], rel=0.01)
    assert all(t["met"] is None for t in data["targets"])  # no VGG rows
    text = open(paths["markdown"], encoding="utf-8").read()
    assert "| cifar_cnn" in text and "Targets" in text
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the shared timing helper
    times = timing.measure({"a": lambda: tf.zeros(3), "b": lambda: None}, repeats=3, warmup=0)
    assert set(times) == {"a", "b"} and len(times["a"]["samples_s"]) == 3
    with pytest.raises(ValueError, match="repeats"):
        timing.measure({"a": lambda: None}, repeats=0)


def test_per_stage_models_points_mixes_and_agent_alone():
    """`+stage` rows: the points and mixed batches repeat each leader's action at its tied decisions."""
    config = latency.default_config(models=["resnet50", "mobilenet_v2"], per_stage=True, skips=True)
    assert latency.model_names(config)[2:] == ["resnet50+skip", "mobilenet_v2+skip", "resnet50+stage",
                                               "mobilenet_v2+stage"]
    tf.random.set_seed(0)
    model = rnp_tf.RNPModel(rnp_tf.decide_per_stage(RESIDUAL), image_shape=(8, 8, 1), num_classes=3)
    assert model.plan.tied_to == {2: 0, 3: 1}
    points = latency.operating_points(model, [1.0, 2.0, 3.0])
    assert points[0]["actions"] == [4] * 5
    for point in points:
        assert point["actions"][2:4] == point["actions"][0:2]
        macs = float(model.macs(np.array([point["actions"]]))[0])
        assert point["theoretical_speedup"] == pytest.approx(model.full_macs / macs)
    mixed = latency.mixed_actions(model, points[2]["actions"], 64, seed=0)
    np.testing.assert_array_equal(mixed[:, 2:4], mixed[:, 0:2])
    assert model.macs(mixed).numpy().mean() == pytest.approx(float(model.macs([points[2]["actions"]])[0]), rel=0.006)
    agent, call = latency.agent_alone_function(rnp_tf.InferenceEngine(model), mixed[:5])
    chosen = np.asarray(agent())
    np.testing.assert_array_equal(chosen[:, 2:4], chosen[:, 0:2])


def test_models_take_the_variant_names_directly():
    """`--models=resnet50+stage` times the variant alone; unknown names are refused with the list."""
    config = latency.default_config(models=["resnet50+stage"], per_stage=True)
    assert latency.model_names(config) == ["resnet50+stage"]
    with pytest.raises(ValueError, match=r"Unknown model.*mobilenet_v2\+stage"):
        latency.default_config(models=["vgg16+stage"])


@pytest.mark.parametrize("kind", ["bottleneck", "mobilenet"])
def test_stage_times_cover_residual_blocks(kind, tiny_mobilenet):
    """Blocks: their convs of full output on narrow inputs are stages with an ideal, the sums are stages; a skip has none."""
    if kind == "bottleneck":
        spec = {"stages": [dict(s) for s in RESIDUAL["stages"]], "head": RESIDUAL["head"]}
        spec["stages"][2]["skippable"] = True
        shape = (8, 8, 1)
    else:
        spec, shape = tiny_mobilenet, (32, 32, 3)
    tf.random.set_seed(0)
    model = rnp_tf.RNPModel(spec, image_shape=shape, num_classes=3)
    engine = rnp_tf.InferenceEngine(model)
    config = latency.default_config(quick=True, repeats=1, warmup=1, min_sample_seconds=0.0)
    points = latency.operating_points(model, [1.0, 2.0])
    out = latency.stage_times(model, engine, points, config)
    stages = out["stages_ms"]
    full, half = out["points"]
    assert any(n.startswith("kept_") for n in stages) and any(n.startswith("add_") for n in stages)
    assert full["conv_ideal_ms"] == pytest.approx(full["conv_ms"]) and full["add_ms"] > 0
    assert half["conv_ideal_ms"] < full["conv_ms"]
    parts = half["stem_ms"] + half["conv_ms"] + half["pool_ms"] + half["add_ms"] + half["head_ms"]
    assert half["total_ms"] == pytest.approx(parts)
    if kind == "bottleneck":  # skipping the identity block removes its three convs and its sum
        skipped = dict(points[1], actions=[4, 4, 0, 0, 4])
        # one call: both points read the same measured stages (a second call's timings are other samples)
        unskipped, with_skip = latency.stage_times(model, engine, [points[0], skipped], config)["points"]
        assert with_skip["add_ms"] < unskipped["add_ms"] and with_skip["conv_ms"] < unskipped["conv_ms"]
