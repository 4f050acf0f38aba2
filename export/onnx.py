r"""Export a trained RNP model to ONNX: `python -m export.onnx ckpt/`.

Writes into `--output` (default `ckpt/export/`):

- `rnp.onnx`: any batch size (dynamic `batch`), per-sample actions with
  gather/scatter: at each prunable conv the samples are grouped by their
  (previous action, action) pair (NonZero + Gather), each group convolved on
  its weight slice inside an `If` that skips the group when no sample took
  it, and the groups are stitched back in batch order (Concat + Gather).
  `export.trt` writes the same graph without any `If` (an empty group runs
  on one padding sample), the form TensorRT accepts.
- `rnp_b1.onnx`: batch 1 only; the branch of every prunable conv is picked
  by nested `If` nodes on the scalar action (from nested `tf.cond`, frozen
  with lowered control flow), so only the chosen slice runs: the fast path
  at batch 1, where `rnp.onnx` would still gather and stitch.
- `full.onnx`: the unpruned network (every group, no agent), the baseline
  for latency comparisons.
- `onnx.json`: the parity results, the operators used and onnxruntime
  latencies of the three models.

Inputs and outputs (opset 17):
    images          float32 [batch, H, W, C]
    forced_actions  int32 [batch or 1, T], optional (an overridable
                    initializer, zeros by default): 0 lets the agent
                    choose; 1..k forces that many groups at that layer
    penalty         float32 [1] (rnp.onnx: [1] or [batch], one per image),
                    optional (an overridable initializer holding the
                    default, `--penalty` or the model's saved setting):
                    the run-time knob of `RNPModel.set_penalty`, so one
                    deployed model serves every operating point (more
                    negative: cheaper). Also in the model's metadata
                    (`penalty_setting`). The hard compute cap
                    (`--compute_cap`, or the one saved with the model) is
                    frozen in, not an input.
    logits          float32 [batch, classes]
    actions         int32 [batch, T]  (groups computed at each prunable conv)
    macs            float32 [batch]   (multiply-accumulates of each image)

Every model passes `onnx.checker.check_model(full_check=True)` and is run in
onnxruntime before it is written: greedy actions on fixed images that drive
different actions, and every action at every layer through
`forced_actions`, against `model.rollout` (identical actions, max |logits
difference| <= 1e-4), and the greedy actions with `penalty` fed at two
settings (the default and a cheaper one at which the actions differ)
against `model.set_penalty(p)` + `model.rollout`; otherwise nothing is
written and the command exits 2 with the measured difference.

Examples:

    python -m export.onnx /tmp/rnp_quickstart
    python -m export.onnx /tmp/rnp_quickstart --output=/tmp/onnx --nobatch1
    python -m export.onnx /tmp/rnp_quickstart --timing_runs=0   # skip the latencies

In Python:

    import onnxruntime as ort
    sess = ort.InferenceSession("/tmp/rnp_quickstart/export/rnp.onnx")
    logits, actions, macs = sess.run(["logits", "actions", "macs"], {"images": x})
    cheap = sess.run(["logits", "actions", "macs"], {"images": x, "penalty": np.array([-0.5], np.float32)})
"""

import contextlib
import os

import numpy as np
from absl import flags

from export import cli

from export import exceptions

from export import sliced_network

from export import verification

from export import writing
from rnp_tf import validation

PROGRAM = "export.onnx"
OPSET = 17
# tf2onnx's optimisers that matter for these graphs (the transposes around
# every NHWC convolution, constant folding, duplicates); the others do
# nothing here but cost a deep copy of the graph each.
OPTIMIZERS = (
    "optimize_transpose",
    "fold_constants",
    "merge_duplication",
    "reshape_optimizer",
    "global_pool_optimizer",
    "remove_identity",
    "remove_back_to_back",
)
# The batch-1 graph: its many branch subgraphs make merge_duplication slow
# (10 s on a 3-layer net) for nothing measurable.
SINGLE_OPTIMIZERS = tuple(name for name in OPTIMIZERS if name != "merge_duplication")


def define_flags(flag_values=flags.FLAGS):
    """Defines the flags of `python -m export.onnx` on `flag_values` (once)."""
    if "batch1" in flag_values:
        return
    fv = {"flag_values": flag_values}
    cli.define_output_flags(flag_values)
    flags.DEFINE_boolean("batch1", True, "Also write rnp_b1.onnx, the batch-1 model with nested If.", **fv)
    flags.DEFINE_integer("num_parity_images", 16, "Images of the greedy parity check.", lower_bound=1, **fv)
    flags.DEFINE_integer(
        "max_forced_tuples", 256,
        "Check every action tuple when there are at most this many, else a set covering every "
        "(previous action, action) pair at every layer.", lower_bound=1, **fv,
    )
    flags.DEFINE_integer("timing_runs", 20, "onnxruntime timing runs per model and batch (0: skip).", lower_bound=0, **fv)
    cli.define_knob_flags(flag_values)
    for name in cli.KNOB_FLAGS:  # list them in this command's --help
        flags.declare_key_flag(name, flag_values=flag_values)


# ------------------------------------------------------------- conversion
@contextlib.contextmanager
def _few_optimizers(names=OPTIMIZERS, catch_errors=False):
    """Runs tf2onnx with only `names` of its optimisers.

    With `catch_errors=False` tf2onnx does not deep-copy the whole graph
    before every optimiser (most of its conversion time on these graphs);
    `_convert` retries with copies if an optimiser fails.
    """
    import tf2onnx.optimizer as opt
    from tf2onnx import constants

    saved = opt._optimizers
    saved_env = os.environ.get(constants.ENV_TF2ONNX_CATCH_ERRORS)
    opt._optimizers = type(saved)((k, v) for k, v in saved.items() if k in names)
    os.environ[constants.ENV_TF2ONNX_CATCH_ERRORS] = "TRUE" if catch_errors else "FALSE"
    try:
        yield
    finally:
        opt._optimizers = saved
        if saved_env is None:
            os.environ.pop(constants.ENV_TF2ONNX_CATCH_ERRORS, None)
        else:
            os.environ[constants.ENV_TF2ONNX_CATCH_ERRORS] = saved_env


def _convert(convert_fn, names=OPTIMIZERS):
    """`convert_fn()` under `_few_optimizers`; retried with tf2onnx's own error catching on failure."""
    try:
        with _few_optimizers(names, catch_errors=False):
            return convert_fn()
    except Exception:  # an optimiser failed on this graph: let tf2onnx skip it
        with _few_optimizers(names, catch_errors=True):
            return convert_fn()


def _quiet_tf2onnx():
    import logging

    for name in ("tf2onnx", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


# The optional inputs of the RNP models; each gets an overridable initializer.
OPTIONAL_INPUTS = ("forced_actions", "penalty")


def _name_dims(model_proto, batch):
    """Names the batch dimension of the images and every output `batch` (or fixes it to 1)."""
    graph = model_proto.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or value.name in OPTIONAL_INPUTS:
            continue
        if batch == 1:
            dims[0].dim_value = 1
        else:
            dims[0].dim_param = "batch"


def _optional_inputs(model_proto, net, batch):
    """Makes `forced_actions` and `penalty` optional: overridable initializers with their defaults.

    `forced_actions`: zeros `[1, T]` (the agent decides); `penalty`:
    `[net.penalty_setting]`. An initializer with the name of a graph input
    is ONNX's default value of that input. The default penalty is also
    written to the metadata (`penalty_setting`).
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    defaults = {
        "forced_actions": (np.zeros((1, net.num_prunable), np.int32), "forced_batch"),
        "penalty": (np.full([1], net.penalty_setting, np.float32), "penalty_batch"),
    }
    for name, (value, _) in defaults.items():
        graph.initializer.append(numpy_helper.from_array(value, name))
    for value in graph.input:
        if value.name in defaults:
            dim = value.type.tensor_type.shape.dim[0]
            if batch == 1:
                dim.dim_value = 1
            else:
                dim.dim_param = defaults[value.name][1]
    _set_metadata(model_proto, penalty_setting=repr(net.penalty_setting))


def _set_metadata(model_proto, **entries):
    """Sets `metadata_props` entries (string values) of a model."""
    props = {p.key: p for p in model_proto.metadata_props}
    for key, value in entries.items():
        if key not in props:
            props[key] = model_proto.metadata_props.add(key=key)
        props[key].value = str(value)


def default_penalty(sess_or_proto):
    """The default run-time penalty written into an RNP ONNX model (its `penalty_setting` metadata), or None."""
    if hasattr(sess_or_proto, "get_modelmeta"):
        value = sess_or_proto.get_modelmeta().custom_metadata_map.get("penalty_setting")
    else:
        value = {p.key: p.value for p in sess_or_proto.metadata_props}.get("penalty_setting")
    return None if value is None else float(value)


def bake_greedy(model_proto):
    """The TensorRT-bound form: inputs `images` and `penalty` (required, `[1]`).

    `forced_actions` is removed from the inputs (a constant zeros
    initializer: the agent always decides). `penalty` loses its
    initializer: TensorRT's ONNX parser imports an input that has an
    initializer as a constant weight, which would freeze the knob, so it
    is a required input of static shape `[1]`; its default stays in the
    metadata (`default_penalty`).
    """
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    keep = [v for v in proto.graph.input if v.name != "forced_actions"]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    inits = [i for i in proto.graph.initializer if i.name != "penalty"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    for value in proto.graph.input:
        if value.name == "penalty":
            value.type.tensor_type.shape.dim[0].dim_value = 1
    return proto


def _signature(net, batch):
    import tensorflow as tf

    h, w, c = net.image_shape
    return [
        tf.TensorSpec([batch, h, w, c], tf.float32, name="images"),
        tf.TensorSpec([batch, net.num_prunable], tf.int32, name="forced_actions"),
        tf.TensorSpec([batch], tf.float32, name="penalty"),
    ]


def convert_batched(net, skip_empty=True):
    """`rnp.onnx`: the gather/scatter graph (`SlicedNetwork.batched`), dynamic batch, computed channels-first.

    The images stay NHWC; the graph transposes them once and runs every map
    NCHW, the layout of ONNX convolutions (and of TensorRT). Traced NHWC,
    each conv converts between two transposes that onnxruntime cannot cancel
    next to the gathers: ResNet-50 at batch 64 spent 23% of its time in them.

    Args:
        net: the `SlicedNetwork`.
        skip_empty: each (previous action, action) group's convs in an `If`
            that skips the group when no sample took it (onnxruntime: 0-21%
            faster at batch 64). False for TensorRT (`export.trt`), whose
            `If` needs one condition for the whole batch: an empty group then
            runs on one row of padding.

    Returns:
        The checked `onnx.ModelProto`.
    """
    import tf2onnx

    _quiet_tf2onnx()

    def batched(images, forced_actions, penalty):
        return net.batched(images, forced_actions, penalty, channels_first=True, skip_empty=skip_empty)

    fn, sig, kernels = net.kernels_as_inputs(batched, _signature(net, None))
    proto, _ = _convert(lambda: tf2onnx.convert.from_function(fn, input_signature=sig, opset=OPSET))
    bind_kernels(proto, kernels)
    _name_dims(proto, None)
    _optional_inputs(proto, net, None)
    proto.graph.name = "rnp_gather_scatter"
    return check(proto)


def convert_single(net):
    """`rnp_b1.onnx`: nested `tf.cond` frozen with lowered control flow, then `from_graph_def`; channels-first."""
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    _quiet_tf2onnx()

    def single(images, forced_actions, penalty):
        return net.single(images, forced_actions, penalty, channels_first=True)

    fn, sig, kernels = net.kernels_as_inputs(single, _signature(net, 1))
    concrete = fn.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=True)
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    names = ("images", "forced_actions", "penalty", *kernels)
    rename = {t.name: name for name, t in zip(names, frozen.inputs)}
    structured = concrete.structured_outputs
    for name, tensor in structured.items():
        rename[outputs[[t.name for t in concrete.outputs].index(tensor.name)]] = name
    graph_def = frozen.graph.as_graph_def()
    proto, _ = _convert(
        lambda: tf2onnx.convert.from_graph_def(
            graph_def, input_names=inputs, output_names=outputs, opset=OPSET, tensors_to_rename=rename
        ),
        SINGLE_OPTIMIZERS,
    )
    bind_kernels(proto, kernels)
    _name_dims(proto, 1)
    _optional_inputs(proto, net, 1)
    proto.graph.name = "rnp_batch1_if"
    return check(_scalar_gemm_betas(proto))


def convert_full(net):
    """`full.onnx`: the unpruned network, dynamic batch."""
    import tf2onnx

    _quiet_tf2onnx()
    fn, sig, kernels = net.kernels_as_inputs(net.full, _signature(net, None)[:1])
    proto, _ = _convert(lambda: tf2onnx.convert.from_function(fn, input_signature=sig, opset=OPSET))
    bind_kernels(proto, kernels)
    _name_dims(proto, None)
    proto.graph.name = "full"
    return check(proto)


def graphs(graph):
    """`graph` and every subgraph in it (If branches, Loop bodies), outermost first.

    Example:

    >>> ops = {node.op_type for g in graphs(proto.graph) for node in g.node}
    """
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs(attr.g)
            for sub in attr.graphs:
                yield from graphs(sub)


def bind_kernels(proto, kernels):
    """Turns the kernel inputs of a model converted from `SlicedNetwork.kernels_as_inputs` into initializers.

    Each kernel becomes an initializer of the (sub)graph that uses it, so
    that a kernel used only inside one `If` branch is a constant of that
    branch (onnxruntime pre-packs it; a weight from an outer scope would be
    re-packed at every call). A kernel whose only use is a `Transpose`
    (tf2onnx's HWIO -> OIHW for `Conv`) is stored transposed instead. A
    kernel used in several subgraphs goes to the main graph.

    Args:
        proto: the converted `onnx.ModelProto` (changed in place).
        kernels: `{input name: float32 array}`.

    Returns:
        The proto.
    """
    from onnx import numpy_helper

    every = list(graphs(proto.graph))
    users = {}
    for graph in every:
        for node in graph.node:
            for name in node.input:
                if name in kernels:
                    users.setdefault(name, []).append((graph, node))
    keep = [value for value in proto.graph.input if value.name not in kernels]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    for name, array in kernels.items():
        found = users.get(name, [])
        if not found:
            continue
        graph, node = found[0]
        if len(found) == 1 and node.op_type == "Transpose" and len(node.input) == 1:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(array, perm)),
                                                             node.output[0]))
            graph.node.remove(node)
            continue
        if any(g is not graph for g, _ in found):
            graph = proto.graph
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return proto


def _scalar_gemm_betas(proto):
    """Repairs tf2onnx's `Gemm` nodes whose `beta` is a vector (invalid ONNX); returns the proto.

    tf2onnx rewrites `A @ B + c * C` into `Gemm(A, B, C, beta=c)` without
    checking that the constant `c` is a scalar. The penalty re-pricing of
    the batch-1 graph, `Q + (p - p0) * [0, 1, .., k-1]` after a linear
    decoder, has that form with a vector `c`: such a node gets
    `C := Mul(C, c)` (a Constant and a Mul beside it) and `beta = 1`.
    """
    from onnx import helper

    count = 0
    for graph in list(graphs(proto.graph)):
        nodes = list(graph.node)
        del graph.node[:]
        for node in nodes:
            beta = next((a for a in node.attribute if a.name == "beta" and a.floats), None)
            if node.op_type == "Gemm" and beta is not None and len(node.input) == 3:
                count += 1
                name = f"{node.name}__beta_vector_{count}"
                values = np.asarray(list(beta.floats), np.float32)
                graph.node.append(
                    helper.make_node("Constant", [], [name + "_value"], name=name + "_value",
                                     value=helper.make_tensor(name + "_value", 1, values.shape, values))
                )
                graph.node.append(helper.make_node("Mul", [node.input[2], name + "_value"], [name], name=name))
                node.input[2] = name
                beta.ClearField("floats")
                beta.type = helper.AttributeProto.FLOAT
                beta.f = 1.0
            graph.node.append(node)
    return proto


def check(proto):
    """`onnx.checker` with full (strict) shape inference; returns the proto."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:  # onnx raises ValidationError / InferenceError
        raise exceptions.ExportError(f"the ONNX model fails onnx.checker: {exceptions.first_line(error)}") from None
    return proto


def operators(proto):
    """Sorted op types of a model, including those inside If/Loop bodies."""
    return sorted({node.op_type for graph in graphs(proto.graph) for node in graph.node})


# ---------------------------------------------------------------- running
def session(path_or_bytes, num_threads=None):
    """An onnxruntime CPU session (warnings about the optional input silenced).

    Args:
        path_or_bytes: an `.onnx` path or the serialised model.
        num_threads: intra-op threads (default: onnxruntime's choice).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def runner(sess, batch1=False, has_forced=True):
    """`run(images, forced_actions=None, penalty=None) -> dict` over an onnxruntime session.

    `penalty` (a float) is fed as the `[1]` input `penalty`; when it is
    None and the model requires it (`rnp_trt.onnx`), its default from the
    metadata is fed.
    """
    names = [o.name for o in sess.get_outputs()]
    required = {i.name for i in sess.get_inputs()}
    default = default_penalty(sess)

    def run_batch(images, forced, penalty):
        feed = {"images": np.ascontiguousarray(images, np.float32)}
        if forced is not None:
            if not has_forced:
                raise ValueError("This model has no forced_actions input. Received: forced actions")
            feed["forced_actions"] = np.ascontiguousarray(forced, np.int32)
        if penalty is None and "penalty" in required:
            penalty = default
        if penalty is not None:
            feed["penalty"] = np.full([1], penalty, np.float32)
        return dict(zip(names, sess.run(names, feed)))

    def run(images, forced=None, penalty=None):
        if not batch1:
            return run_batch(images, forced, penalty)
        outs = [
            run_batch(images[i : i + 1], None if forced is None else forced[i : i + 1], penalty)
            for i in range(len(images))
        ]
        return {k: np.concatenate([o[k] for o in outs]) for k in names}

    return run


def full_runner(sess):
    """Parity runner of `full.onnx`: logits only (actions and MACs are those of the full width)."""

    def run(images, forced=None):
        return {"logits": sess.run(["logits"], {"images": np.ascontiguousarray(images, np.float32)})[0]}

    return run


def check_full(label, model, run, images):
    """The full network's logits against `model.rollout(x, actions=k everywhere)`."""
    full = np.full((len(images), model.num_prunable), model.groups, np.int32)
    ref = verification.reference(model, images, full)
    return verification.compare(f"{label} (full width)", ref, run(images), logits_only=True)


def latency(sess, image_shape, batch, runs):
    """Median onnxruntime latency in ms at a batch size (random images, default penalty)."""
    x = np.random.default_rng(batch).normal(size=(batch, *image_shape)).astype(np.float32)
    feed = {"images": x}
    if "penalty" in {i.name for i in sess.get_inputs()}:  # a required input (rnp_trt.onnx)
        feed["penalty"] = np.full([1], default_penalty(sess), np.float32)
    return cli.timed(lambda: sess.run(None, feed), repeats=runs, warmup=2)


# ----------------------------------------------------------------- export
def export_onnx(model_dir, output=None, batch1=True, num_parity_images=16, max_forced_tuples=256, timing_runs=20,
                penalty=None, compute_cap=None, log=None, overwrite=False):
    """Exports `model_dir/model.keras` to `rnp.onnx` (+ `rnp_b1.onnx`, `full.onnx`) and verifies them.

    Args:
        model_dir: directory holding `model.keras`.
        output: output directory (default `<model_dir>/export`).
        batch1: also write the batch-1 `If` model.
        num_parity_images: images of the greedy parity check.
        max_forced_tuples: see `verification.action_tuples`.
        timing_runs: onnxruntime timing runs (0: no latencies in the report).
        penalty, compute_cap: run-time knob applied before export (see
            `cli.apply_knob`).
        log: `log(message)` for progress lines (default: print).
        overwrite: replace an export of another model in `output` (see
            `writing.write_set`); otherwise it is refused before any work.

    Returns:
        The report dict (also written to `onnx.json`).

    Raises:
        exceptions.ExportError: missing/corrupt checkpoint, a failed parity check
            (nothing is written then).
    """
    model, target, log = cli.open_checkpoint(PROGRAM, model_dir, output, penalty, compute_cap, log, overwrite)
    with writing.output_directory(target.directory) as out:
        net = sliced_network.SlicedNetwork(model)
        images, knob, tuples = verification.parity_inputs(net, num_parity_images, max_forced_tuples)
        log(f"converting the gather/scatter model (opset {OPSET})")
        protos = {"rnp.onnx": convert_batched(net)}
        if batch1:
            log("converting the batch-1 model (nested If)")
            protos["rnp_b1.onnx"] = convert_single(net)
        protos["full.onnx"] = convert_full(net)
        report = {
            "model_dir": os.path.abspath(model_dir),
            "opset": OPSET,
            "groups": net.groups,
            "num_prunable": net.num_prunable,
            "full_macs": float(model.full_macs),
            "knob": cli.knob_report(net),
            "parity": {},
            "operators": {name: operators(p) for name, p in protos.items()},
        }
        sessions = {}

        def producer(name, proto):
            def produce(tmp):
                import onnx

                onnx.save(proto, tmp)
                sess = session(tmp)
                if name == "full.onnx":
                    report["parity"][name] = check_full(name, model, full_runner(sess), images)
                else:
                    run = runner(sess, batch1=name == "rnp_b1.onnx")
                    report["parity"][name] = verification.check_artifact(name, model, run, images, tuples, knob=knob)
                    if name == "rnp.onnx":
                        report["parity"][name]["dynamic_batch"] = check_dynamic_batch(model, run, images)
                sessions[name] = sess
                log(f"{name}: parity passed")

            return produce

        artifacts = [writing.Artifact(os.path.join(out, n), producer(n, p)) for n, p in protos.items()]

        def write_report(tmp):
            if timing_runs:
                report["latency_ms"] = timings(sessions, net.image_shape, timing_runs)
            writing.write_json(tmp, report)

        artifacts.append(writing.Artifact(os.path.join(out, "onnx.json"), write_report))
        writing.write_set(target, artifacts, report)
    report["output"] = out
    return report


def check_dynamic_batch(model, run, images, sizes=(1, 7, 64), seed=7):
    """Batches of 1, 7 and 64 against the model; most (previous action, action) groups are empty.

    The first half of each batch (at least one image) is chosen by the agent
    on the parity images, the rest runs random forced action tuples.

    Returns:
        `{str(batch): compare(...)}`.
    """
    rng = np.random.default_rng(seed)
    results = {}
    for n in sizes:
        n_agent = max(1, n // 2)
        x_agent = images[np.arange(n_agent) % len(images)]
        x_forced = rng.normal(size=(n - n_agent, *model.image_shape)).astype(np.float32)
        forced = rng.integers(1, model.groups + 1, size=(n - n_agent, model.num_prunable)).astype(np.int32)
        parts = [verification.reference(model, x_agent)]
        if n > n_agent:
            parts.append(verification.reference(model, x_forced, forced))
        ref = {k: np.concatenate([p[k] for p in parts]) for k in ("logits", "actions", "macs")}
        x = np.concatenate([x_agent, x_forced])
        all_forced = np.concatenate([np.zeros((n_agent, model.num_prunable), np.int32), forced])
        results[str(n)] = verification.compare(f"batch {n}", ref, run(x, all_forced))
    return results


def timings(sessions, image_shape, runs):
    """onnxruntime latencies (ms, median) of the written models at batch 1 and 64."""
    out = {}
    for name, sess in sessions.items():
        batches = (1,) if name == "rnp_b1.onnx" else (1, 64)
        out[name] = {str(b): latency(sess, image_shape, b, runs) for b in batches}
    return out


def main(argv):
    fv = flags.FLAGS
    report = cli.run_cli(PROGRAM, argv, lambda model_dir: export_onnx(
        model_dir, fv.output, fv.batch1, fv.num_parity_images, fv.max_forced_tuples, fv.timing_runs,
        fv.penalty, fv.compute_cap, overwrite=fv.overwrite,
    ))
    summarize(report)


def summarize(report):
    for name, parity in report["parity"].items():
        if "greedy" in parity:
            g, f = parity["greedy"], parity["forced"]
            print(
                f"{PROGRAM}: {name}: greedy {g['samples']} images ({g['distinct_action_tuples']} action tuples) "
                f"max |dlogits| {g['max_abs_logit_diff']:.2e}; forced {f['distinct_action_tuples']} tuples "
                f"max |dlogits| {f['max_abs_logit_diff']:.2e}; {verification.knob_summary(parity)}"
            )
        else:
            print(f"{PROGRAM}: {name}: full width max |dlogits| {parity['max_abs_logit_diff']:.2e}")
    for name, lat in report.get("latency_ms", {}).items():
        print(f"{PROGRAM}: {name}: onnxruntime latency " + ", ".join(f"batch {b}: {v:.3f} ms" for b, v in lat.items()))
    print(f"{PROGRAM}: wrote {', '.join(sorted(report['operators']))} and onnx.json to {report['output']}")


if __name__ == "__main__":
    validation.run_cli(PROGRAM, main, define_flags)
