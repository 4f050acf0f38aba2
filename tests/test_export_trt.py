"""python -m export.trt: TensorRT-ready ONNX (static operator check, no If), exit 2 without TensorRT."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper

from export import onnx as onnx_export
from export import trt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, write_checkpoint):
    """`python -m export.trt ckpt --output=out` on this machine (no TensorRT)."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here: the no-TensorRT path does not apply")
    ckpt = tmp_path_factory.mktemp("ckpt")
    model = write_checkpoint(ckpt)
    out = tmp_path_factory.mktemp("trt") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "export.trt", str(ckpt), f"--output={out}", "--num_parity_images=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    return model, out, proc


@pytest.mark.slow
def test_without_tensorrt_exits_2_with_the_onnx_written(cli_run):
    _, out, proc = cli_run
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("export.trt:")]
    assert len(errors) == 1
    assert "TensorRT is not installed" in errors[0] and "rnp_trt.onnx" in errors[0]
    assert sorted(os.listdir(out)) == ["export_manifest.json", "full.onnx", "rnp_trt.onnx", "trt.json"]
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["exports"]["export.trt"]["files"] == ["full.onnx", "rnp_trt.onnx", "trt.json"]
    assert set(manifest["exports"]["export.trt"]["parity"]["onnx_parity"]) >= {"rnp_trt.onnx", "full.onnx"}
    for name, record in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == record["sha256"], name


@pytest.mark.slow
def test_tensorrt_onnx_uses_only_supported_ops_and_no_if(cli_run):
    model, out, _ = cli_run
    for name in ("rnp_trt.onnx", "full.onnx"):
        proto = onnx.load(str(out / name))
        onnx.checker.check_model(proto, full_check=True)
        ops = onnx_export.operators(proto)
        assert set(ops) <= set(trt.TRT_ONNX_OPERATORS), set(ops) - set(trt.TRT_ONNX_OPERATORS)
        assert not set(ops) & set(trt.FORBIDDEN_AT_BATCH)
        assert trt.check_tensorrt_compatible(proto) == []
    # the penalty is a required input: TensorRT would freeze one with a default
    proto = onnx.load(str(out / "rnp_trt.onnx"))
    assert [v.name for v in proto.graph.input] == ["images", "penalty"]
    assert "penalty" not in {i.name for i in proto.graph.initializer}
    assert [v.name for v in onnx.load(str(out / "full.onnx")).graph.input] == ["images"]
    # and it runs, with the agent's actions, at batch 1 and 64
    sess = onnx_export.session(str(out / "rnp_trt.onnx"))
    default = np.array([onnx_export.default_penalty(sess)], np.float32)
    for n in (1, 64):
        x = np.random.default_rng(n).normal(size=(n, 8, 8, 1)).astype("float32")
        logits, actions = sess.run(["logits", "actions"], {"images": x, "penalty": default})
        ref = model.rollout(x)
        np.testing.assert_array_equal(actions, ref["actions"])
        np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


@pytest.mark.slow
def test_tensorrt_onnx_penalty_input(cli_run, check_penalty_input):
    model, out, _ = cli_run
    checks = json.loads((out / "trt.json").read_text())["onnx_parity"]["rnp_trt.onnx knob"]
    assert checks[0]["penalty"] == pytest.approx(0.3) and checks[1]["penalty"] < 0.3 and checks[1]["actions_differ"]
    run = onnx_export.runner(onnx_export.session(str(out / "rnp_trt.onnx")), has_forced=False)
    check_penalty_input(model, lambda x, p: tuple(run(x, penalty=p)[k] for k in ("logits", "actions", "macs")))


def test_static_check_names_each_problem():
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    nodes = [
        helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other),
        helper.make_node("Greater", ["x", "x"], ["m"], name="mask"),
        helper.make_node("NonZero", ["m"], ["idx"], name="nonzero_on_bool"),
        helper.make_node("Unique", ["x"], ["u"], name="unique"),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("y", "idx", "u")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [cond, x], outputs), opset_imports=[helper.make_opsetid("", 17)])
    problems = trt.check_tensorrt_compatible(proto)
    assert any(p.startswith("branch: If") for p in problems)
    assert any(p.startswith("nonzero_on_bool: NonZero on BOOL") for p in problems)
    assert any(p.startswith("unique: Unique is not supported") for p in problems)


class FakeTensorRT(types.SimpleNamespace):
    """The slice of the TensorRT 10 Python API that `build_engine` uses, recording calls."""

    def __init__(self):
        calls = []

        class Logger:
            WARNING = 2

            def __init__(self, level):
                self.level = level

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse(self, data):
                graph = onnx.load_from_string(data).graph
                weights = {i.name for i in graph.initializer}
                for value in graph.input:
                    if value.name not in weights:
                        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                        self.network.inputs.append(Tensor(value.name, tuple(dims)))
                return True

        class Profile:
            def set_shape(self, name, low, opt, high):
                calls.append(("set_shape", name, low, opt, high))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def set_flag(self, flag):
                calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("add_profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build",))
                return b"engine"

        super().__init__(
            calls=calls, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
            BuilderFlag=types.SimpleNamespace(FP16="FP16", TF32="TF32"),
        )


@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True])
def test_build_engine_uses_the_tensorrt_10_calls(cli_run, fp16):
    _, out, _ = cli_run
    fake = FakeTensorRT()
    data = (out / "rnp_trt.onnx").read_bytes()
    assert trt.build_engine(fake, data, max_batch=64, opt_batch=32, fp16=fp16, workspace_mb=256) == b"engine"
    assert ("create_network", 0) in fake.calls
    assert ("set_shape", "images", (1, 8, 8, 1), (32, 8, 8, 1), (64, 8, 8, 1)) in fake.calls
    assert not [c for c in fake.calls if c[:2] == ("set_shape", "penalty")]  # static [1]: no profile
    assert ("pool", "WORKSPACE", 256 << 20) in fake.calls
    assert (("set_flag", "FP16") in fake.calls) == fp16
    assert (("clear_flag", "TF32") in fake.calls) == (not fp16)
    assert fake.calls[-1] == ("build",)


def test_probe_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(trt.TensorRTUnavailable, match="TensorRT is not installed"):
        trt.probe_tensorrt()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["residual", "mobilenet"])
def test_block_tensorrt_onnx_is_ready_and_matches_rollout(tmp_path, request, kind, check_residual_batches):
    """Bottlenecks and inverted residuals in rnp_trt.onnx: supported operators only, no If, the agent's actions."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here: the no-TensorRT path does not apply")
    from export import sliced_network
    from export import verification

    model = request.getfixturevalue(f"write_{kind}_checkpoint")(tmp_path / "ckpt")
    with pytest.raises(trt.TensorRTUnavailable, match="rnp_trt.onnx"):
        trt.export_trt(tmp_path / "ckpt", tmp_path / "out", num_parity_images=8, log=lambda m: None)
    proto = onnx.load(str(tmp_path / "out" / "rnp_trt.onnx"))
    assert trt.check_tensorrt_compatible(proto) == [] and "If" not in onnx_export.operators(proto)
    run = onnx_export.runner(onnx_export.session(str(tmp_path / "out" / "rnp_trt.onnx")), has_forced=False)
    images = verification.parity_images(sliced_network.SlicedNetwork(model), 8)
    for batch in (1, 7, 64):
        check_residual_batches(model, run, images, batch, forced=False)
    # no forced input: a very negative penalty makes the agent take the smallest groups everywhere, a high one all k
    x = images[np.arange(7) % len(images)]
    for penalty, action in ((-100.0, 1), (100.0, model.groups)):
        with verification.penalty_scope(model, penalty):
            ref = verification.reference(model, x)
        assert (ref["actions"] == action).all()
        verification.compare(f"all {action}", ref, run(x, penalty=penalty))
