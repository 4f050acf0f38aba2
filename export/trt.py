r"""Build TensorRT 10 engines of a trained RNP model: `python -m export.trt ckpt/`.

Writes into `--output` (default `ckpt/export/`):

- `rnp_trt.onnx`: the TensorRT-ready ONNX: the gather/scatter graph of
  `export.onnx` (per-sample actions by NonZero/Gather/ScatterND, no `If`
  or `Loop`: TensorRT's `If` needs a scalar condition, so per-sample
  choices at batch > 1 cannot be branches, and an empty group runs on a
  row of padding, where `rnp.onnx` skips it by an `If`), with two inputs: `images`
  and `penalty` (float32 `[1]`, required: the run-time knob of
  `RNPModel.set_penalty`; TensorRT would freeze an input that has a
  default, so its default, `--penalty` or the model's saved setting, is in
  the model's metadata `penalty_setting` and `TRTRunner` feeds it when no
  penalty is given). The agent always decides; the hard compute cap
  (`--compute_cap`, or the one saved with the model) is frozen in. It is
  checked statically against
  the ONNX operators TensorRT 10's parser supports (`TRT_ONNX_OPERATORS`,
  with their data types) and run in onnxruntime against `model.rollout`
  before it is written, also at a second, cheaper penalty (against
  `model.set_penalty(p)`), as the engine is after it is built.
- `full.onnx`: the unpruned network (the baseline engine).
- `rnp.engine`, `full.engine` (`rnp_fp16.engine`, `full_fp16.engine` with
  `--fp16`): serialized engines built with the TensorRT 10 Python API
  (`trt.Builder`, a network from `trt.OnnxParser` (explicit batch, the only
  mode of TensorRT 10), one optimisation profile for batch 1..64), each
  run on the parity images and compared with the Keras model before it is
  written (float32 engines are built without TF32).
- `trt.json`: the static check, parity and, with `--benchmark`, the
  latencies of the RNP engine against the full engine at batch 64 and 1.

Where `tensorrt` cannot be imported, or no NVIDIA GPU (or `cuda-python`,
used for device buffers) is present, the ONNX files are still written and
verified, one line says what is missing, and the exit status is 2.

Examples:

    python -m export.trt /tmp/rnp_quickstart
    python -m export.trt /tmp/rnp_quickstart --fp16 --benchmark
    python -m export.trt /tmp/rnp_quickstart --max_batch=128 --output=/tmp/trt
"""

import os
import time

import numpy as np
from absl import flags

from export import cli

from export import exceptions

from export import sliced_network

from export import verification

from export import writing
from rnp_tf import validation

PROGRAM = "export.trt"

# ONNX operators TensorRT 10's ONNX parser supports, with the data types it
# lists for them (onnx/onnx-tensorrt docs/operators.md, the TensorRT 10.x
# support matrix, which covers opsets 9..20 for TensorRT 10.0). Operators
# marked N there (e.g. Compress, Unique, Sequence*, Optional*, String*,
# BitShift, the Bitwise* family, DFT, Col2Im, ...) are absent.
_FLOAT = ("FP32", "FP16", "BF16")
_NUM = _FLOAT + ("INT32", "INT64")
_ALL = _NUM + ("BOOL",)
TRT_ONNX_OPERATORS = {
    "Abs": _NUM, "Acos": _FLOAT, "Acosh": _FLOAT, "Add": _NUM, "And": ("BOOL",), "ArgMax": _NUM,
    "ArgMin": _NUM, "Asin": _FLOAT, "Asinh": _FLOAT, "Atan": _FLOAT, "Atanh": _FLOAT,
    "Attention": _FLOAT + ("INT8", "FP8"), "AveragePool": _FLOAT, "BatchNormalization": _FLOAT,
    "BlackmanWindow": ("FP32", "FP16"), "Cast": _ALL + ("UINT8",), "CastLike": _ALL + ("UINT8",),
    "Ceil": _FLOAT, "Celu": _FLOAT, "Clip": _FLOAT, "Concat": _ALL, "Constant": _ALL + ("FP8", "FP4", "INT4"),
    "ConstantOfShape": _ALL + ("FP8", "FP4", "INT4"), "Conv": _FLOAT, "ConvTranspose": _FLOAT, "Cos": _FLOAT,
    "Cosh": _FLOAT, "CumSum": _FLOAT, "DeformConv": ("FP32", "FP16"), "DepthToSpace": _NUM,
    "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"), "Div": _NUM, "Dropout": _FLOAT, "Einsum": _FLOAT,
    "Elu": _FLOAT, "Equal": _NUM, "Erf": _FLOAT, "Exp": _FLOAT, "Expand": _ALL, "EyeLike": _ALL,
    "Flatten": _ALL, "Floor": _FLOAT, "Gather": _ALL, "GatherElements": _ALL, "GatherND": _ALL,
    "Gelu": _NUM + ("INT8",), "Gemm": _FLOAT, "GlobalAveragePool": _FLOAT, "GlobalLpPool": _FLOAT,
    "GlobalMaxPool": _FLOAT, "Greater": _NUM, "GreaterOrEqual": _NUM, "GridSample": ("FP32", "FP16"),
    "GroupNormalization": _FLOAT, "GRU": _FLOAT, "HammingWindow": ("FP32", "FP16"),
    "HannWindow": ("FP32", "FP16"), "HardSigmoid": _FLOAT, "HardSwish": _FLOAT, "Hardmax": _FLOAT,
    "Identity": _ALL, "If": _ALL, "ImageScaler": _FLOAT, "InstanceNormalization": _FLOAT, "IsInf": _FLOAT,
    "IsNaN": _NUM, "LayerNormalization": _FLOAT, "LeakyRelu": _FLOAT, "Less": _NUM, "LessOrEqual": _NUM,
    "Log": _FLOAT, "LogSoftmax": _FLOAT, "Loop": _ALL, "LRN": _FLOAT, "LSTM": _FLOAT,
    "LpNormalization": _FLOAT, "LpPool": _FLOAT, "MatMul": _FLOAT, "Max": _NUM, "MaxPool": _FLOAT,
    "Mean": _NUM + ("FP8",), "MeanVarianceNormalization": _FLOAT, "Min": _NUM, "Mish": ("FP32", "FP16"),
    "Mod": _NUM, "Mul": _NUM, "Neg": _NUM, "NonMaxSuppression": ("FP32", "FP16"),
    "NonZero": ("FP32", "FP16"), "Not": ("BOOL",), "OneHot": _ALL, "Or": ("BOOL",), "Pad": _NUM,
    "ParametricSoftplus": _FLOAT, "Pow": _NUM, "PRelu": _FLOAT, "QuantizeLinear": _FLOAT,
    "RandomNormal": _FLOAT, "RandomNormalLike": _FLOAT, "RandomUniform": _FLOAT,
    "RandomUniformLike": _FLOAT, "Range": _NUM, "Reciprocal": _FLOAT, "ReduceL1": _NUM, "ReduceL2": _NUM,
    "ReduceLogSum": _NUM, "ReduceLogSumExp": _NUM, "ReduceMax": _NUM, "ReduceMean": _NUM,
    "ReduceMin": _NUM, "ReduceProd": _NUM, "ReduceSum": _NUM, "ReduceSumSquare": _NUM, "Relu": _NUM,
    "Reshape": _ALL, "Resize": _FLOAT, "ReverseSequence": _ALL, "RMSNormalization": _FLOAT, "RNN": _FLOAT,
    "RoiAlign": ("FP32", "FP16"), "RotaryEmbedding": _FLOAT, "Round": _FLOAT, "STFT": ("FP32",),
    "ScaledTanh": _FLOAT, "Scan": _FLOAT, "Scatter": _NUM, "ScatterElements": _NUM, "ScatterND": _NUM,
    "Selu": _FLOAT, "Shape": _ALL, "Shrink": _NUM, "Sigmoid": _FLOAT, "Sign": _NUM, "Sin": _FLOAT,
    "Sinh": _FLOAT, "Size": _ALL, "Slice": _ALL, "Softmax": _FLOAT, "Softplus": _FLOAT, "Softsign": _FLOAT,
    "SpaceToDepth": _NUM, "Split": _ALL, "Sqrt": _FLOAT, "Squeeze": _ALL, "Sub": _NUM, "Sum": _NUM,
    "Tan": _FLOAT, "Tanh": _FLOAT, "ThresholdedRelu": _FLOAT, "Tile": _ALL, "TopK": _NUM, "Transpose": _ALL,
    "Trilu": _ALL, "Unsqueeze": _ALL, "Upsample": _FLOAT, "Where": _ALL, "Xor": ("BOOL",),
}
# Control flow is supported by the parser but not usable here: `If` needs a
# scalar condition (one branch for the whole batch) and `Loop` carries fixed
# shapes, so the batch > 1 graph must not contain them.
FORBIDDEN_AT_BATCH = ("If", "Loop", "Scan")
TRT_OPSETS = (9, 20)  # TensorRT 10.0's range (later 10.x accept up to 24)
_ONNX_TYPES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8", 3: "INT8"}


class TensorRTUnavailable(exceptions.ExportError):
    """TensorRT, cuda-python or a GPU is missing: engines cannot be built here."""


def define_flags(flag_values=flags.FLAGS):
    """Defines the flags of `python -m export.trt` on `flag_values` (once)."""
    if "fp16" in flag_values:
        return
    fv = {"flag_values": flag_values}
    cli.define_output_flags(flag_values)
    flags.DEFINE_boolean("fp16", False, "Build FP16 engines (BuilderFlag.FP16).", **fv)
    flags.DEFINE_boolean("benchmark", False, "Time the RNP engine against the full engine at batch 64 and 1.", **fv)
    flags.DEFINE_integer("max_batch", 64, "Largest batch of the optimisation profile (smallest: 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("opt_batch", 64, "Batch TensorRT optimises the profile for.", lower_bound=1, **fv)
    flags.DEFINE_integer("workspace_mb", 2048, "Builder workspace memory pool (MiB).", lower_bound=16, **fv)
    flags.DEFINE_integer("timing_runs", 50, "Timed runs per engine and batch with --benchmark.", lower_bound=1, **fv)
    flags.DEFINE_integer("num_parity_images", 16, "Images of the greedy parity check.", lower_bound=1, **fv)
    cli.define_knob_flags(flag_values)
    for name in cli.KNOB_FLAGS:  # list them in this command's --help
        flags.declare_key_flag(name, flag_values=flag_values)


# ------------------------------------------------------------ static check
def check_tensorrt_compatible(proto):
    """Problems that would stop TensorRT 10's ONNX parser, as a list of strings (empty: none).

    Checks every node (including any subgraph) against `TRT_ONNX_OPERATORS`,
    the type of its first input against the types listed for the operator
    (after ONNX shape inference), forbids `If`/`Loop`/`Scan`, and checks the
    opset against `TRT_OPSETS`.

    Example:

    >>> assert not check_tensorrt_compatible(onnx.load("rnp_trt.onnx"))
    """
    import onnx

    problems = []
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if opset is None or not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
        problems.append(f"opset {opset} outside TensorRT 10.0's range {TRT_OPSETS}")
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type

    from export.onnx import graphs

    for g in graphs(graph):
        for node in g.node:
            if node.domain not in ("", "ai.onnx"):
                problems.append(f"{node.name}: custom-domain op {node.domain}::{node.op_type}")
                continue
            if node.op_type in FORBIDDEN_AT_BATCH:
                problems.append(f"{node.name}: {node.op_type} (per-sample choices at batch > 1 must be gather/scatter)")
            elif node.op_type not in TRT_ONNX_OPERATORS:
                problems.append(f"{node.name}: {node.op_type} is not supported by TensorRT 10's ONNX parser")
            elif node.input and node.input[0] in types:
                kind = _ONNX_TYPES.get(types[node.input[0]], str(types[node.input[0]]))
                if kind not in TRT_ONNX_OPERATORS[node.op_type]:
                    problems.append(f"{node.name}: {node.op_type} on {kind} (TensorRT supports {TRT_ONNX_OPERATORS[node.op_type]})")
    return problems


# ---------------------------------------------------------------- TensorRT
def probe_tensorrt():
    """`(tensorrt, cudart)` modules, or raises TensorRTUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except Exception as error:  # ImportError, or OSError for missing libnvonnxparser / libnvinfer
        raise TensorRTUnavailable(f"TensorRT is not installed or does not load ({exceptions.first_line(error)})") from None
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except Exception as error:
        raise TensorRTUnavailable(f"cuda-python is not installed, needed for device buffers ({exceptions.first_line(error)})") from None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise TensorRTUnavailable(f"no NVIDIA GPU is visible (cudaGetDeviceCount: {err}, {count} devices)")
    return trt, cudart


def build_engine(trt, onnx_bytes, max_batch=64, opt_batch=64, fp16=False, workspace_mb=2048, logger=None):
    """Serialized TensorRT engine of an ONNX model with a dynamic batch (TensorRT 10 Python API).

    Args:
        trt: the `tensorrt` module.
        onnx_bytes: the ONNX model.
        max_batch, opt_batch: the optimisation profile covers batch 1..max_batch, tuned for opt_batch.
        fp16: set `BuilderFlag.FP16`; otherwise TF32 is cleared for exact float32.
        workspace_mb: workspace memory pool limit.
        logger: a `trt.Logger` (default WARNING).

    Returns:
        The serialized engine (bytes).
    """
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the flag is gone (0 = defaults).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise exceptions.ExportError(f"TensorRT's ONNX parser rejected the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    opt_batch = min(opt_batch, max_batch)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if -1 not in tuple(tensor.shape):
            continue  # a static input (`penalty`, [1]) needs no profile
        inner = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *inner), (opt_batch, *inner), (max_batch, *inner))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise exceptions.ExportError("TensorRT could not build the engine (see the TensorRT log above)")
    return bytes(serialized)


class TRTRunner:
    """Runs a serialized engine on numpy batches (device buffers with cuda-python).

    Args:
        trt, cudart: the modules of `probe_tensorrt`.
        engine_bytes: a serialized engine.
        logger: a `trt.Logger` (default WARNING).
        penalty: the default of the engine's `penalty` input, if it has one.
    """

    def __init__(self, trt, cudart, engine_bytes, logger=None, penalty=None):
        self.trt, self.cudart = trt, cudart
        self.penalty = penalty
        self.runtime = trt.Runtime(logger or trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise exceptions.ExportError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        _, self.stream = cudart.cudaStreamCreate()

    def _check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise exceptions.ExportError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def run(self, images, penalty=None):
        """`{output name: numpy array}` for float32 images `[n, H, W, C]`.

        Args:
            images: float32 `[n, H, W, C]`.
            penalty: the run-time penalty (a float) for an engine with a
                `penalty` input; default: the runner's `penalty`.
        """
        cudart, trt = self.cudart, self.trt
        host = {"images": np.ascontiguousarray(images, np.float32)}
        if "penalty" in self.inputs:
            penalty = self.penalty if penalty is None else penalty
            if penalty is None:
                raise ValueError("This engine has a `penalty` input and the runner no default. Received: penalty=None")
            host["penalty"] = np.full([1], penalty, np.float32)
        for name in self.inputs:
            self.context.set_input_shape(name, host[name].shape)
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            host[name] = np.empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
        device = {}
        try:
            for name, array in host.items():
                device[name] = self._check(cudart.cudaMalloc(max(array.nbytes, 1)))
                self.context.set_tensor_address(name, device[name])
            h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            for name in self.inputs:
                self._check(cudart.cudaMemcpyAsync(device[name], host[name].ctypes.data, host[name].nbytes, h2d, self.stream))
            if not self.context.execute_async_v3(self.stream):
                raise exceptions.ExportError("TensorRT execution failed")
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name in self.outputs:
                self._check(cudart.cudaMemcpyAsync(host[name].ctypes.data, device[name], host[name].nbytes, d2h, self.stream))
            self._check(cudart.cudaStreamSynchronize(self.stream))
        finally:
            for ptr in device.values():
                cudart.cudaFree(ptr)
        return {name: host[name] for name in self.outputs}

    def time(self, batch, image_shape, runs):
        """Median ms of one batch (host copies included)."""
        x = np.random.default_rng(batch).normal(size=(batch, *image_shape)).astype(np.float32)
        return cli.timed(lambda: self.run(x), repeats=runs, warmup=3)


# ----------------------------------------------------------------- export
def export_trt(model_dir, output=None, fp16=False, benchmark=False, max_batch=64, opt_batch=64, workspace_mb=2048,
               timing_runs=50, num_parity_images=16, penalty=None, compute_cap=None, log=None, overwrite=False):
    """Writes the TensorRT-ready ONNX, then builds, verifies and saves the engines.

    Args:
        model_dir: directory holding `model.keras`.
        output: output directory (default `<model_dir>/export`).
        fp16: FP16 engines.
        benchmark: time RNP against full engines at batch 64 and 1.
        max_batch, opt_batch, workspace_mb: builder settings.
        timing_runs: runs per timing.
        num_parity_images: images of the greedy parity check.
        penalty, compute_cap: run-time knob applied before export.
        log: `log(message)` for progress lines.
        overwrite: replace an export of another model in `output` (see
            `writing.write_set`); otherwise it is refused before any work.

    Returns:
        The report dict (also written to `trt.json`).

    Raises:
        TensorRTUnavailable: after the ONNX files were written, when
            TensorRT, cuda-python or a GPU is missing.
        exceptions.ExportError: missing/corrupt checkpoint, an ONNX graph
            TensorRT would reject, failed parity.
    """
    import onnx

    from export import onnx as onnx_export

    model, target, log = cli.open_checkpoint(PROGRAM, model_dir, output, penalty, compute_cap, log, overwrite)
    with writing.output_directory(target.directory) as out:
        net = sliced_network.SlicedNetwork(model)
        images = verification.parity_images(net, num_parity_images)
        knob = verification.knob_inputs(net, num_parity_images)
        log(f"converting the gather/scatter model for TensorRT (opset {onnx_export.OPSET})")
        protos = {
            "rnp_trt.onnx": onnx_export.bake_greedy(onnx_export.convert_batched(net, skip_empty=False)),
            "full.onnx": onnx_export.convert_full(net),
        }
        report = {
            "model_dir": os.path.abspath(model_dir),
            "knob": cli.knob_report(net),
            "full_macs": float(model.full_macs),
            "profile": {"min": 1, "opt": min(opt_batch, max_batch), "max": max_batch},
            "static_check": {},
            "onnx_parity": {},
        }
        for name, proto in protos.items():
            problems = check_tensorrt_compatible(proto)
            if problems:
                raise exceptions.ExportError(f"{name} is not TensorRT-ready: {problems[0]} (and {len(problems) - 1} more)")
            report["static_check"][name] = {"operators": onnx_export.operators(proto), "problems": []}

        def producer(name, proto):
            def produce(tmp):
                onnx.save(proto, tmp)
                sess = onnx_export.session(tmp)
                if name == "full.onnx":
                    report["onnx_parity"][name] = onnx_export.check_full(name, model, onnx_export.full_runner(sess), images)
                else:
                    run = onnx_export.runner(sess, has_forced=False)
                    report["onnx_parity"][name] = verification.compare(f"{name} (greedy)", verification.reference(model, images), run(images))
                    x = images[np.arange(64) % len(images)]
                    report["onnx_parity"][name + " batch 64"] = verification.compare(f"{name} (batch 64)", verification.reference(model, x), run(x))
                    report["onnx_parity"][name + " knob"] = verification.check_knob(
                        name, model, lambda x, p: run(x, penalty=p), knob
                    )
                log(f"{name}: TensorRT operator check and onnxruntime parity passed")

            return produce

        artifacts = [writing.Artifact(os.path.join(out, n), producer(n, p)) for n, p in protos.items()]
        artifacts.append(writing.json_artifact(os.path.join(out, "trt.json"), report))
        writing.write_set(target, artifacts, report)
        report["output"] = out
        try:
            trt, cudart = probe_tensorrt()
        except TensorRTUnavailable as error:
            raise TensorRTUnavailable(
                f"{error}; wrote the TensorRT-ready rnp_trt.onnx and full.onnx to {out}: build the engines "
                f"where TensorRT 10 and an NVIDIA GPU are present"
            ) from None
        report["tensorrt_version"] = getattr(trt, "__version__", None)
        suffix = "_fp16" if fp16 else ""
        engines, runners = {}, {}
        quant = "float16" if fp16 else None
        for name, proto in protos.items():
            stem = "rnp" if name == "rnp_trt.onnx" else "full"
            log(f"building {stem}{suffix}.engine (batch 1..{max_batch}{', FP16' if fp16 else ''})")
            engines[stem] = build_engine(trt, proto.SerializeToString(), max_batch, opt_batch, fp16, workspace_mb)
            runners[stem] = TRTRunner(trt, cudart, engines[stem], penalty=net.penalty_setting)
        tol = verification.tolerance_for(quant)
        got = runners["rnp"].run(images)
        report["engine_parity"] = {
            "rnp": verification.compare("rnp engine", verification.reference(model, images), got, **tol),
            "rnp_knob": verification.check_knob("rnp engine", model, lambda x, p: runners["rnp"].run(x, p), knob, quant),
            "full": verification.compare(
                "full engine",
                verification.reference(model, images, np.full((len(images), model.num_prunable), model.groups)),
                runners["full"].run(images),
                logits_only=True,
                **{k: v for k, v in tol.items() if k != "min_agreement"},
            ),
        }
        if benchmark:
            report["benchmark_ms"] = {
                stem: {str(b): runners[stem].time(b, net.image_shape, timing_runs) for b in (64, 1)} for stem in runners
            }
            report["benchmark_ms"]["speedup"] = {
                b: report["benchmark_ms"]["full"][b] / report["benchmark_ms"]["rnp"][b] for b in ("64", "1")
            }
            report["benchmark_ms"]["mean_compute_fraction"] = float(np.mean(got["macs"]) / model.full_macs)

        def engine_artifact(stem):
            def produce(tmp):
                with open(tmp, "wb") as f:
                    f.write(engines[stem])

            return writing.Artifact(os.path.join(out, f"{stem}{suffix}.engine"), produce)

        report["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        writing.write_set(
            target,
            [engine_artifact(s) for s in engines] + [writing.json_artifact(os.path.join(out, "trt.json"), report)],
            report,
            keep=tuple(protos),
        )
    return report


def main(argv):
    fv = flags.FLAGS
    report = cli.run_cli(PROGRAM, argv, lambda model_dir: export_trt(
        model_dir, fv.output, fv.fp16, fv.benchmark, fv.max_batch, fv.opt_batch, fv.workspace_mb,
        fv.timing_runs, fv.num_parity_images, fv.penalty, fv.compute_cap, overwrite=fv.overwrite,
    ))
    print(f"{PROGRAM}: wrote the engines and trt.json to {report['output']}")
    if "benchmark_ms" in report:
        b = report["benchmark_ms"]
        for batch in ("64", "1"):
            print(
                f"{PROGRAM}: batch {batch}: RNP {b['rnp'][batch]:.3f} ms, full {b['full'][batch]:.3f} ms, "
                f"speed-up {b['speedup'][batch]:.2f}x (compute {b['mean_compute_fraction']:.2f} of full)"
            )


if __name__ == "__main__":
    validation.run_cli(PROGRAM, main, define_flags)
