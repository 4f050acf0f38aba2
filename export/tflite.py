r"""Export a trained RNP model to TFLite for batch-1 CPU inference: `python -m export.tflite ckpt/`.

Writes into `--output` (default `ckpt/export/`):

- `rnp.tflite`: one signature per piece of the network, so that only the
  chosen channel prefixes are computed and every piece runs through
  XNNPACK (a single graph with TFLite `IF` branches converts, but its
  branch subgraphs are not delegated and run slower than the full model;
  see FINDINGS.md):
    * `stem`: the stem conv, the pooling before the first prunable conv and
      the agent's first decision;
    * `conv{t}_in{p}_out{a}`: prunable conv `t` on the weight prefix for
      previous action `p` and action `a`, its pooling and the agent's next
      decision (re-priced to the run-time penalty and masked by the
      compute cap, as `RNPModel.rollout` decides);
    * `tail{t}_in{p}` (bottlenecks): a bottleneck's last conv on the `p`
      groups that decision `t` chose, the sum with the block's `shortcut`
      (an output of the signature that opened the block), what follows and
      the agent's next decision. An inverted residual's depthwise conv and
      projection (a tail whose conv reads a full-width input,
      `fuses_tail`) run inside the expansion's `conv{t}_in{p}_out{a}`
      instead, so its expanded map is never copied between signatures;
    * `skip{t}_to{u}` (skippable blocks): the block whose decisions `t..u`
      the agent skipped (action `k + 1` at `t`): what follows the block,
      on its shortcut alone, and the agent's next decision;
    * `head_in{a}`: the classifier on `a` groups (`head` when its input
      keeps its full width, as in a residual network);
    * `full`: the unpruned network, the latency baseline;
    * `penalty_setting`: no inputs; the default penalty (`--penalty`, else
      the model's saved setting);
    * `ties` (networks deciding once per stage): no inputs; per decision,
      the earlier decision whose action it takes (-1: the agent's own).

  Every signature that decides (`stem` and every `conv` but the last)
  takes the run-time penalty as an input (`penalty`, float32 `[1]`, the
  knob of `RNPModel.set_penalty`), so one file serves every operating
  point; `TFLiteRNPRunner` feeds its `penalty` (default: the
  `penalty_setting` signature's). The hard compute cap (`--compute_cap`,
  or the one saved with the model) is frozen in.
- `rnp_float16.tflite` / `rnp_dynamic.tflite` with `--quantize`: the same
  with float16 weights or dynamic-range int8 weights.
- `tflite.json`: parity results and latencies.

Large models are converted in pieces of at most `CHUNK_MB` of weights, each
by a process of its own (the converter needs 17 to 30 times what it
converts), and merged into one file whose weights follow the flatbuffer
(`merge_models`, TFLite's buffer offsets; the interpreter of TensorFlow
2.21 reads it): the single SavedModel of VGG-16 with every branch (2.2 GB
of constants) could not even be written (protobuf's 2 GB limit). The
largest single signature sets the converter's peak (VGG-16's `full`: 528 MB
of weights, about 9 GB).

Run it with the driver shipped in the package:

    from rnp_tf.tflite_runner import TFLiteRNPRunner
    runner = TFLiteRNPRunner("ckpt/export/rnp.tflite")
    logits, actions, macs = runner.run(images)            # images [n, H, W, C]
    runner.set_penalty(-0.5)                              # cheaper, from now on
    logits, actions, macs = runner.run(images, penalty=-0.5)   # or for one call

Every file is checked before it is written, through `TFLiteRNPRunner` and
the TFLite interpreter: greedy actions on fixed images that drive different
actions, and every action at every layer (forced), against
`model.rollout`, and the greedy actions at two penalties fed to the
signatures (the default and a cheaper one at which the actions differ)
against `model.set_penalty(p)` + `model.rollout`. float32: identical
actions and max |logits difference| <=
1e-4. float16 / dynamic: logits within the tolerance of
`export.verification.QUANTIZED_TOLERANCES` (relative to the largest logit) and
greedy actions agreeing on at least its `min_agreement` share of the images
(the agreement rate is reported). A failed check writes nothing and exits 2.

Examples:

    python -m export.tflite /tmp/rnp_quickstart
    python -m export.tflite /tmp/rnp_quickstart --quantize=float16
    python -m export.tflite /tmp/rnp_quickstart --quantize=dynamic --output=/tmp/tfl
"""

import gc
import os
import tempfile

import numpy as np
from absl import flags

from export import cli

from export import exceptions

from export import sliced_network

from export import verification

from export import writing
from rnp_tf import validation

PROGRAM = "export.tflite"
QUANTIZE = ("none", "float16", "dynamic")


def define_flags(flag_values=flags.FLAGS):
    """Defines the flags of `python -m export.tflite` on `flag_values` (once)."""
    if "quantize" in flag_values:
        return
    fv = {"flag_values": flag_values}
    cli.define_output_flags(flag_values)
    flags.DEFINE_enum(
        "quantize", "none", QUANTIZE,
        "Also write a quantised variant: float16 weights or dynamic-range int8 weights.", **fv,
    )
    flags.DEFINE_integer("num_parity_images", 16, "Images of the greedy parity check.", lower_bound=1, **fv)
    flags.DEFINE_integer(
        "max_forced_tuples", 256,
        "Check every action tuple when there are at most this many, else a set covering every "
        "(previous action, action) pair at every layer.", lower_bound=1, **fv,
    )
    flags.DEFINE_integer("timing_runs", 20, "Images timed per model (0: skip).", lower_bound=0, **fv)
    cli.define_knob_flags(flag_values)
    for name in cli.KNOB_FLAGS:  # list them in this command's --help
        flags.declare_key_flag(name, flag_values=flag_values)


def signature_functions(net, parts=("rnp", "full")):
    """The `tf.function`s of every signature, by name (static batch 1).

    Args:
        net: the `sliced_network.SlicedNetwork`.
        parts: "rnp" (stem, branch and head signatures) and/or "full" (the
            unpruned network, for latency comparisons).
    """
    import tensorflow as tf

    k, units = net.groups, net.units
    h, w, c = net.image_shape

    def state_specs():
        return [
            tf.TensorSpec([1, units], tf.float32, name="state_h"),
            tf.TensorSpec([1, units], tf.float32, name="state_c"),
        ]

    spent_spec = tf.TensorSpec([1], tf.int64, name="spent")  # MACs so far, exact
    # Under a compute cap a decision needs every earlier action: the runner
    # feeds them as `actions` (0 for decisions still to come).
    actions_spec = tf.TensorSpec([1, net.num_prunable], tf.int32, name="actions")
    penalty_spec = tf.TensorSpec([1], tf.float32, name="penalty")  # the run-time knob

    def decision(t, y, state, decided, penalty):
        penalties = net.penalties(penalty, 1)
        q, (sh, sc) = net.agent_step(t, net.pooled(y), state)
        action = net.policy(penalties).choose(t, q, decided)
        return {"q": q, "action": action, "state_h": sh, "state_c": sc}

    functions = {}
    if "full" in parts:

        @tf.function(input_signature=[tf.TensorSpec([1, h, w, c], tf.float32, name="images")], autograph=False)
        def full(images):
            return net.full(images)

        functions["full"] = full
    if "rnp" not in parts:
        return functions

    @tf.function(input_signature=[], autograph=False)
    def penalty_setting():
        return {"penalty_setting": tf.constant([net.penalty_setting], tf.float32)}

    functions["penalty_setting"] = penalty_setting
    tied_to = net.model.plan.tied_to
    if tied_to:
        leaders = np.asarray([tied_to.get(t, -1) for t in range(net.num_prunable)], np.int32)

        @tf.function(input_signature=[], autograph=False)
        def ties():
            return {"tied_to": tf.constant(leaders)}

        functions["ties"] = ties

    def shortcut_spec(key):
        return tf.TensorSpec([1, *net.block_out[key]], tf.float32, name="shortcut")

    # the stretches at whose end a block opens whose shortcut the next signature takes from its `features`
    carried_in_features = {before for u, before in net.before.items() if shortcut_is_features(net, u)}

    @tf.function(
        input_signature=[tf.TensorSpec([1, h, w, c], tf.float32, name="images"), penalty_spec], autograph=False
    )
    def stem(images, penalty):
        with net.constants():
            y, shortcut = net.stretch("stem", images)
            spent = net.start_spent(1)
            out = decision(0, y, net.initial_state(1), [], penalty)
            out.update(features=y, spent=spent)
            if net.opens_block("stem") and "stem" not in carried_in_features:
                out["shortcut"] = shortcut
            return out

    functions["stem"] = stem

    def piece(key, conv, own, cost, in_spec):
        """The signature of one (branch of a) conv whose weights follow an action, and of `net.stretches[key]`.

        `conv(features)` is its conv, `own` the action it runs for (the
        decision it follows), `cost` its MACs; then the stretch, and the
        agent's next decision when the stretch ends at a prunable conv.
        Inputs: `features`, `spent`, then `state_h`, `state_c`, `penalty`
        when it decides, `actions` when a compute cap needs the earlier
        ones, `shortcut` when it ends a block opened before it (unless
        `shortcut_is_features`: then `features` is the shortcut). `conv`
        None (a skipped block: the stretch after it on the shortcut alone)
        takes no `features`, or only as that shortcut.
        """
        t = key[1]
        decides = net.decides.get(key)
        fed = net.cap is not None and decides is not None and decides > 1
        # a whole block whose shortcut is its input map: that map is its only
        # copy in (a skipped one's too: its shortcut is then all it reads)
        own_input = key == ("tail", t) and shortcut_is_features(net, t)
        if conv is None and own_input:
            in_spec = tf.TensorSpec([1, *net.block_out[key]], tf.float32, name="features")
        names = ["features", "spent"] if conv is not None or own_input else ["spent"]
        specs = [in_spec, spent_spec] if conv is not None or own_input else [spent_spec]
        if decides is not None:
            names += ["state_h", "state_c", "penalty"]
            specs += state_specs() + [penalty_spec]
        if fed:
            names.append("actions")
            specs.append(actions_spec)
        if net.closes_block(key) and not own_input:
            names.append("shortcut")
            specs.append(shortcut_spec(key))

        def body(*args):
            inputs = dict(zip(names, args))
            with net.constants():
                h = None if conv is None else conv(inputs["features"])
                y, shortcut = net.stretch(key, h, inputs["features"] if own_input else inputs.get("shortcut"))
                out = {"features": y, "spent": inputs["spent"] + net.macs_constant(cost)}
                if decides is not None:  # the agent's next decision, fed by this map
                    # earlier actions: fed under a cap, else unread placeholders
                    decided = [inputs["actions"][:, u] if fed else tf.zeros([1], tf.int32) for u in range(t)]
                    decided.append(tf.constant([own], tf.int32))
                    out.update(decision(decides, y, [inputs["state_h"], inputs["state_c"]], decided, inputs["penalty"]))
                if net.opens_block(key) and key not in carried_in_features:
                    out["shortcut"] = shortcut
                return out

        return tf.function(body, input_signature=specs, autograph=False)

    for t in range(net.num_prunable):
        hw = net.in_hw[t]
        fused = fuses_tail(net, t)
        for p, a in net.branches(t):
            features = tf.TensorSpec([1, hw[0], hw[1], net.in_channels(t, p)], tf.float32, name="features")
            cost = float(net.macs_table(t)[(p - 1) * k + a - 1])
            if fused:  # the conv, then its tail on the same prefix: the wide map never leaves the signature
                functions[f"conv{t}_in{p}_out{a}"] = piece(
                    ("tail", t),
                    lambda x, t=t, p=p, a=a: net.tail(t, net.stretch(("conv", t), net.sliced_conv(t, x, p, a))[0], a),
                    a, cost + net.tail_macs[t][a - 1], features,
                )
                continue
            functions[f"conv{t}_in{p}_out{a}"] = piece(
                ("conv", t), lambda x, t=t, p=p, a=a: net.sliced_conv(t, x, p, a), a, cost, features
            )
        # the convs on this decision's prefix (a bottleneck's last conv; an
        # inverted residual's depthwise conv and projection)
        if t in net.tails and not fused:
            layer = net.tails[t][0]
            hw = net.conv_in_hw[layer.name]
            for p in range(1, k + 1):
                features = tf.TensorSpec([1, hw[0], hw[1], p * layer.in_group_size], tf.float32, name="features")
                functions[f"tail{t}_in{p}"] = piece(
                    ("tail", t), lambda x, t=t, p=p: net.tail(t, x, p), p, net.tail_macs[t][p - 1], features
                )
    for t in sorted(net.skippable):  # a skipped block: its decisions are 0, the shortcut goes on
        last, key = net.skip_end(t)
        functions[f"skip{t}_to{last}"] = piece(key, None, 0, 0.0, None)
    g = net.head_group
    for a in net.heads() if g is not None else [None]:

        def make_head(a=a):
            channels = net.head_channels(a)

            @tf.function(
                input_signature=[tf.TensorSpec([1, *net.head_hw, channels], tf.float32, name="features"), spent_spec],
                autograph=False,
            )
            def head(features, spent):
                with net.constants():
                    extra = net.head_macs[a] if a is not None else 0.0
                    return {"logits": net.head(features, a), "macs": tf.cast(spent + net.macs_constant(extra), tf.float32)}

            return head

        # a head whose input keeps its full width is one signature, `head`
        functions["head" if a is None else f"head_in{a}"] = make_head()
    return functions


def shortcut_is_features(net, t):
    """Whether decision `t`'s signatures take the block's shortcut from their own `features` input.

    So it is when they hold the whole block (`fuses_tail`) and the block
    opened, with an identity shortcut, right where the stretch before them
    ended: the shortcut is then the map they start from, and it is neither
    an output of the signatures before nor a second input (an inverted
    residual with a sum: one copy of its input map less per block).

    Example:

    >>> shortcut_is_features(net, 0)  # an inverted residual with a sum
    True
    """
    before = net.before.get(t)
    return (
        fuses_tail(net, t) and net.closes_block(("tail", t)) and before is not None
        and bool(net.stretches[before]) and net.stretches[before][-1] == ("open", None)
    )


def fuses_tail(net, t):
    """Whether decision `t`'s tail runs inside its conv signatures (no `tail{t}_in{a}` signatures).

    It does when the conv reads a full-width input (its branches do not
    depend on the previous action, so the tail's weights are not copied
    per branch) and nothing between the conv and its tail decides or
    touches a shortcut: an inverted residual's expansion, depthwise conv and
    projection then run in one signature, and the expanded map, the
    block's largest, is not copied from one signature into the next (on
    MobileNetV2 those copies made the pieces at full width about 40% slower
    than the one-signature full model).

    Example:

    >>> fuses_tail(net, 0)  # an inverted residual's only decision
    True
    """
    key = ("conv", t)
    return (
        t in net.tails and not net.varies(t) and key not in net.decides
        and not net.opens_block(key) and not net.closes_block(key)
    )


# Weights per converter call. The TFLite converter peaks at 17 to 30 times
# the weights it converts (VGG-16's 528 MB full network: 8.9 GB), and a
# SavedModel whose constants pass 2 GB cannot be written: an export with
# every branch of VGG-16 (2.2 GB) is converted in pieces and merged.
CHUNK_MB = 256


def convert(net, quantize="none", workdir=None, parts=("rnp", "full"), chunk_mb=CHUNK_MB):
    """The `.tflite` bytes: multi-signature SavedModels, `TFLiteConverter.from_saved_model`, merged.

    Signatures are converted together while their weights stay under
    `chunk_mb`. When that takes more than one piece, each piece is
    converted in a process of its own (the converter's memory goes back to
    the system after each) and the pieces are merged into one file by
    `merge_models` (weights stored after the flatbuffer, as TFLite's
    buffer offsets allow).

    Args:
        net: the `sliced_network.SlicedNetwork`.
        quantize: "none", "float16" or "dynamic".
        workdir: where the temporary SavedModels go.
        parts: see `signature_functions`.
        chunk_mb: weights (MB) per converter call.
    """
    sizes = {}
    for name, fn in signature_functions(net, parts).items():  # traced with zeros for kernels: no weight held
        with net.recording_kernels() as kernels:
            fn.get_concrete_function()
        sizes[name] = sum(array.nbytes for array in kernels.values()) / 2**20
    chunks, size = [[]], 0.0
    for name, megabytes in sizes.items():
        if chunks[-1] and size + megabytes > chunk_mb:
            chunks.append([])
            size = 0.0
        chunks[-1].append(name)
        size += megabytes
    blobs = [_convert_chunk(net, parts, names, quantize, workdir, isolate=len(chunks) > 1) for names in chunks]
    return blobs[0] if len(blobs) == 1 else merge_models(blobs)


def _convert_chunk(net, parts, names, quantize, workdir, isolate):
    """The `.tflite` bytes of the signatures `names`; with `isolate`, converted by a child process."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(dir=workdir, prefix=".tflite-savedmodel-") as tmp:
        save_signatures(net, tmp, parts, names)
        gc.collect()  # the traced constants, before the converter needs its memory
        if not isolate:
            return convert_saved(tmp, names, quantize)
        target = os.path.join(tmp, "piece.tflite")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        code = "import sys; from export import tflite; tflite._convert_to_file(*sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", code, tmp, ",".join(names), quantize, target],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit status {done.returncode}"]
            raise exceptions.ExportError(f"TFLite conversion of {len(names)} signatures failed: {lines[-1]}")
        with open(target, "rb") as f:
            return f.read()


def _convert_to_file(path, names, quantize, target):
    """Child-process entry of `_convert_chunk`: exits 2 with the converter's error."""
    import sys

    try:
        data = convert_saved(path, names.split(","), quantize)
    except exceptions.ExportError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    with open(target, "wb") as f:
        f.write(data)


# Operators whose options name other subgraphs: their indices would need
# remapping, and no signature here uses them.
_SUBGRAPH_OPTIONS = ("IfOptions", "WhileOptions", "CallOnceOptions", "CallOptions")


def merge_models(blobs, alignment=64):
    """One `.tflite` file holding every subgraph and signature of several.

    Operator codes are shared, buffers and subgraphs appended (their
    indices shifted) and signatures kept; metadata is the first file's.
    Every weight is stored after the flatbuffer at an `alignment`-byte
    boundary (`Buffer.offset` / `size`), so the file may pass the 2 GB that
    a flatbuffer can address. The TFLite interpreter of TensorFlow 2.21
    reads this layout (older runtimes may not).

    Args:
        blobs: `.tflite` files as bytes.
        alignment: byte alignment of each weight.

    Returns:
        The merged file as bytes.

    Example:

    >>> data = merge_models([convert(net, parts=("rnp",)), convert(net, parts=("full",))])
    """
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    models = [flatbuffer_utils.read_model_from_bytearray(bytearray(b)) for b in blobs]
    merged = models[0]
    option_names = {getattr(schema.BuiltinOptions, n) for n in _SUBGRAPH_OPTIONS if hasattr(schema.BuiltinOptions, n)}

    def code_key(code):
        return code.builtinCode, code.deprecatedBuiltinCode, code.customCode, code.version

    codes = {code_key(c): i for i, c in enumerate(merged.operatorCodes)}
    for index, model in enumerate(models):
        buffer_shift, subgraph_shift = (0, 0) if index == 0 else (len(merged.buffers), len(merged.subgraphs))
        remap = []
        for code in model.operatorCodes:
            if code_key(code) not in codes:
                codes[code_key(code)] = len(merged.operatorCodes)
                merged.operatorCodes.append(code)
            remap.append(codes[code_key(code)])
        for subgraph in model.subgraphs:
            for op in subgraph.operators:
                if op.builtinOptionsType in option_names:
                    raise exceptions.ExportError("cannot merge TFLite models with control flow between subgraphs")
        if index == 0:
            continue
        merged.buffers.extend(model.buffers)
        for subgraph in model.subgraphs:
            for tensor in subgraph.tensors:
                tensor.buffer += buffer_shift
            for op in subgraph.operators:
                op.opcodeIndex = remap[op.opcodeIndex]
            merged.subgraphs.append(subgraph)
        for signature in model.signatureDefs:
            signature.subgraphIndex += subgraph_shift
            merged.signatureDefs.append(signature)

    weights = []
    for buffer in merged.buffers:
        if buffer.data is not None and len(buffer.data):
            weights.append((buffer, np.asarray(buffer.data, np.uint8)))
            buffer.data, buffer.offset, buffer.size = None, 1, 1  # non-zero: the fields are written

    def pack():
        builder = flatbuffers.Builder(1024)
        builder.Finish(merged.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def aligned(n):
        return -(-n // alignment) * alignment

    size = len(pack())
    position = aligned(size)
    for buffer, data in weights:
        buffer.offset, buffer.size = position, len(data)
        position = aligned(position + len(data))
    head = pack()
    if len(head) != size:  # the offsets are fixed-width fields: the layout cannot move
        raise exceptions.ExportError(f"merging TFLite models: flatbuffer size changed from {size} to {len(head)}")
    parts, end = [head], len(head)
    for buffer, data in weights:
        parts += [bytes(buffer.offset - end), data.tobytes()]
        end = buffer.offset + len(data)
    return b"".join(parts)


def save_signatures(net, path, parts=("rnp", "full"), names=None):
    """Writes the signatures of `signature_functions` (or those in `names`) as a SavedModel; returns their keys.

    `save_signatures` + `convert_saved` is `convert` in one piece; apart,
    the conversion can run in a process that never held the model (a large
    network's converter needs many times its weights in memory).
    """
    import tensorflow as tf

    functions = signature_functions(net, parts)
    keys = list(functions) if names is None else list(names)
    tf.saved_model.save(tf.Module(), path, signatures={name: functions[name].get_concrete_function() for name in keys})
    return keys


def convert_saved(path, signature_keys, quantize="none"):
    """The `.tflite` bytes of a SavedModel written by `save_signatures`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=list(signature_keys))
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        return converter.convert()
    except Exception as error:  # converter errors are long MLIR dumps
        raise exceptions.ExportError(f"TFLite conversion failed: {exceptions.first_line(error)}") from None


def runner_function(runner):
    """`run(images, forced=None, penalty=None) -> dict` over a `TFLiteRNPRunner` (for `verification.check_artifact`)."""

    def run(images, forced=None, penalty=None):
        logits, actions, macs = runner.run(images, forced, penalty=penalty)
        return {"logits": logits, "actions": actions, "macs": macs}

    return run


def export_tflite(model_dir, output=None, quantize="none", num_parity_images=16, max_forced_tuples=256,
                  timing_runs=20, penalty=None, compute_cap=None, log=None, overwrite=False):
    """Exports `model_dir/model.keras` to `rnp.tflite` (+ a quantised variant) and verifies it.

    Args:
        model_dir: directory holding `model.keras`.
        output: output directory (default `<model_dir>/export`).
        quantize: "none", "float16" or "dynamic".
        num_parity_images: images of the greedy parity check.
        max_forced_tuples: see `verification.action_tuples`.
        timing_runs: images timed per model (0: no latencies).
        penalty, compute_cap: run-time knob applied before export (see
            `cli.apply_knob`).
        log: `log(message)` for progress lines.
        overwrite: replace an export of another model in `output` (see
            `writing.write_set`); otherwise it is refused before any work.

    Returns:
        The report dict (also written to `tflite.json`).

    Raises:
        exceptions.ExportError: missing/corrupt checkpoint, failed conversion or
            parity check (nothing is written then).
    """
    if quantize not in QUANTIZE:
        raise exceptions.ExportError(f"--quantize must be one of {QUANTIZE}, got {quantize!r}")
    model, target, log = cli.open_checkpoint(PROGRAM, model_dir, output, penalty, compute_cap, log, overwrite)
    from rnp_tf.tflite_runner import TFLiteRNPRunner

    with writing.output_directory(target.directory) as out:
        net = sliced_network.SlicedNetwork(model)
        images, knob, tuples = verification.parity_inputs(net, num_parity_images, max_forced_tuples)
        variants = ["none"] + ([quantize] if quantize != "none" else [])
        report = {
            "model_dir": os.path.abspath(model_dir),
            "groups": net.groups,
            "num_prunable": net.num_prunable,
            "full_macs": float(model.full_macs),
            "knob": cli.knob_report(net),
            "parity": {},
            "latency_ms": {},
        }
        artifacts = []
        for variant in variants:
            name = "rnp.tflite" if variant == "none" else f"rnp_{variant}.tflite"
            log(f"converting {name} ({'float32' if variant == 'none' else variant})")
            data = convert(net, variant, workdir=out)

            def produce(tmp, data=data, name=name, variant=variant):
                with open(tmp, "wb") as f:
                    f.write(data)
                runner = TFLiteRNPRunner(tmp)
                quant = None if variant == "none" else variant
                result = verification.check_artifact(
                    name, model, runner_function(runner), images, tuples, quantize=quant, knob=knob
                )
                full = verification.compare(
                    f"{name} (full signature)",
                    verification.reference(model, images, np.full((len(images), net.num_prunable), net.groups)),
                    {"logits": runner.run_full(images), "actions": None, "macs": None},
                    **{kk: v for kk, v in verification.tolerance_for(quant).items() if kk != "min_agreement"},
                    logits_only=True,
                )
                result["full"] = full
                result["signatures"] = len(runner.signature_keys)
                report["parity"][name] = result
                if timing_runs:
                    report["latency_ms"][name] = latencies(runner, images, timing_runs)
                log(f"{name}: parity passed ({len(runner.signature_keys)} signatures)")

            artifacts.append(writing.Artifact(os.path.join(out, name), produce))
        artifacts.append(writing.json_artifact(os.path.join(out, "tflite.json"), report))
        writing.write_set(target, artifacts, report)
    report["output"] = out
    return report


def latencies(runner, images, runs):
    """Median ms per image: the RNP driver (greedy) and the `full` signature, batch 1."""
    x = images[: max(1, min(len(images), runs))]
    rnp = cli.timed(lambda: runner.run(x), repeats=3, warmup=1) / len(x)
    full = cli.timed(lambda: runner.run_full(x), repeats=3, warmup=1) / len(x)
    _, actions, macs = runner.run(x)
    return {
        "rnp_per_image": rnp,
        "full_per_image": full,
        "speedup": full / rnp if rnp else None,
        "mean_compute_fraction": float(np.mean(macs) / runner_full_macs(runner)),
    }


def runner_full_macs(runner):
    """MACs of the full width, from the driver itself (every action k)."""
    x = np.zeros((1, *runner.image_shape), np.float32)
    _, _, macs = runner.run(x, np.full((1, runner.num_prunable), runner.groups))
    return float(macs[0])


def summarize(report):
    for name, parity in report["parity"].items():
        g, f = parity["greedy"], parity["forced"]
        print(
            f"{PROGRAM}: {name}: {parity['signatures']} signatures; greedy {g['samples']} images "
            f"({g['distinct_action_tuples']} action tuples) agreement {g['action_agreement']:.1%} "
            f"max |dlogits| {g['max_abs_logit_diff']:.2e} (tol {g['tolerance']:.1e}); forced "
            f"{f['distinct_action_tuples']} tuples max |dlogits| {f['max_abs_logit_diff']:.2e}; "
            f"{verification.knob_summary(parity)}"
        )
    for name, lat in report.get("latency_ms", {}).items():
        print(
            f"{PROGRAM}: {name}: batch 1 per image: RNP {lat['rnp_per_image']:.3f} ms "
            f"(compute {lat['mean_compute_fraction']:.2f} of full), full {lat['full_per_image']:.3f} ms"
        )
    print(f"{PROGRAM}: wrote {', '.join(report['parity'])} and tflite.json to {report['output']}")


def main(argv):
    fv = flags.FLAGS
    report = cli.run_cli(PROGRAM, argv, lambda model_dir: export_tflite(
        model_dir, fv.output, fv.quantize, fv.num_parity_images, fv.max_forced_tuples, fv.timing_runs,
        fv.penalty, fv.compute_cap, overwrite=fv.overwrite,
    ))
    summarize(report)


if __name__ == "__main__":
    validation.run_cli(PROGRAM, main, define_flags)
