r"""Export a trained RNP model as a TensorFlow SavedModel: `python -m export.saved_model ckpt/`.

Writes into `--output` (default `ckpt/export/`):

- `saved_model/`: a SavedModel (TF Serving ready) with three signatures:
    * `serving_default(images)`: images float32 `[batch, H, W, C]` ->
      `logits` float32 `[batch, classes]`, `actions` int32 `[batch, T]`
      (groups computed at each prunable conv, the agent's greedy policy)
      and `macs` float32 `[batch]` (multiply-accumulates of each image),
      at the default penalty (`--penalty`, else the model's saved setting);
    * `serving_knob(images, penalty)`: the same at a run-time penalty,
      float32 scalar, `[1]` or `[batch]` (one per image): the knob of
      `RNPModel.set_penalty`, so one deployed model serves every
      operating point (more negative: cheaper). A signature cannot have
      an optional input, hence the second signature;
    * `forced(images, actions)`: the same with the actions given
      (int32 `[batch, T]`, values 1..k; the sliced graph also takes 0 for
      "the agent decides"): every action at every layer can be run
      through the artifact itself;
    * `serving_single`, `serving_knob_single`, `forced_single`: the same
      three for one image (`images` `[1, H, W, C]`). In the sliced graph
      they run the batch-1 `If` tree, which computes one branch per conv,
      where the batch-N signatures run every (previous action, action)
      group on a padded row (ResNet-50: 53 ms against 560 ms at half
      width; the full network 87 ms). Both sliced graphs read their
      kernels from the SavedModel's variables.
- `saved_model.json`: the parity results.

`--graph=masked` (default) exports `model.rollout` itself, the exact
reference: every convolution is computed in full and the pruned channels
are zeroed, so it saves nothing at run time. `--graph=sliced` exports the
gather/scatter graph of `export.sliced_network.SlicedNetwork.batched` instead:
samples are grouped by their (previous action, action) pair at each
prunable conv and only the chosen weight prefixes are convolved (empty
groups run on one padding sample; see FINDINGS.md's oneDNN empty-batch
bug), at every batch size: a batch of one runs every branch on one row,
so its `*_single` signatures run the If tree of `rnp_b1.onnx` instead, in
a graph of its own (beside the gather/scatter graph in one `tf.cond`,
TensorFlow's grappler constant folding made that graph compute wrong
actions). Both follow the model's run-time knob: the penalty is an input
(`serving_knob`; `serving_default` uses the saved setting or `--penalty`),
the hard per-image compute cap (saved with the model, or `--compute_cap`) is
frozen in.

The SavedModel is reloaded and checked before it is moved into place: greedy
actions on fixed images that drive different actions and every action tuple
through `forced`, against `model.rollout` in inference mode (identical
actions, max |logits difference| <= 1e-4), and the greedy actions through
`serving_knob` at two penalties (the default and a cheaper one at which the
actions differ) against `model.set_penalty(p)` + `model.rollout`. A failed
check writes nothing and exits 2 with the measured difference.

Examples:

    python -m export.saved_model /tmp/rnp_quickstart
    python -m export.saved_model /tmp/rnp_quickstart --graph=sliced --output=/tmp/serving/rnp/1

Serving (TF Serving REST, or in Python):

    loaded = tf.saved_model.load("/tmp/rnp_quickstart/export/saved_model")
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    out["logits"], out["actions"], out["macs"]
    cheap = loaded.signatures["serving_knob"](images=tf.constant(x), penalty=tf.constant(-0.5))
"""

import os

import numpy as np
from absl import flags

from export import cli

from export import exceptions

from export import sliced_network

from export import verification

from export import writing
from rnp_tf import validation

PROGRAM = "export.saved_model"
GRAPHS = ("masked", "sliced")


def define_flags(flag_values=flags.FLAGS):
    """Defines the flags of `python -m export.saved_model` on `flag_values` (once)."""
    if "graph" in flag_values:
        return
    fv = {"flag_values": flag_values}
    cli.define_output_flags(flag_values)
    flags.DEFINE_enum(
        "graph", "masked", GRAPHS,
        "masked: model.rollout itself (exact, computes every channel); sliced: gather/scatter on "
        "weight prefixes (computes only the chosen channels).", **fv,
    )
    flags.DEFINE_integer("num_parity_images", 16, "Images of the greedy parity check.", lower_bound=1, **fv)
    flags.DEFINE_integer(
        "max_forced_tuples", 256,
        "Check every action tuple when there are at most this many, else a set covering every "
        "(previous action, action) pair at every layer.", lower_bound=1, **fv,
    )
    cli.define_knob_flags(flag_values)
    for name in cli.KNOB_FLAGS:  # list them in this command's --help
        flags.declare_key_flag(name, flag_values=flag_values)


def build_module(model, graph="masked", action_tuples=None):
    """A `tf.Module` holding the model and the three signature functions.

    Args:
        model: the RNPModel, its knob set (its `penalty_setting` is the
            default of `serve` and `forced`).
        graph: "masked" or "sliced".
        action_tuples: with "sliced", optionally only the branches these
            action tuples take (as `SlicedNetwork`; `bench.export` times
            a few operating points without every branch's weights).

    Returns:
        A `tf.Module` with the `tf.function`s `serve(images)`,
        `knob(images, penalty)` and `forced(images, actions)`.
    """
    import tensorflow as tf


    h, w, c = model.image_shape
    images_spec = tf.TensorSpec([None, h, w, c], tf.float32, name="images")
    actions_spec = tf.TensorSpec([None, model.num_prunable], tf.int32, name="actions")
    image_spec = tf.TensorSpec([1, h, w, c], tf.float32, name="images")
    action_spec = tf.TensorSpec([1, model.num_prunable], tf.int32, name="actions")
    penalty_spec = tf.TensorSpec(None, tf.float32, name="penalty")  # scalar, [1] or [batch]
    module = tf.Module()
    keys = ("logits", "actions", "macs")
    if graph == "masked":
        module.model = model  # tracks the variables

        def serve(images):
            out = model.rollout(images)
            return {k: out[k] for k in keys}

        def knob(images, penalty):
            out = model.rollout(images, penalty=penalty)
            return {k: out[k] for k in keys}

        def forced(images, actions):
            out = model.rollout(images, actions=actions)
            return {k: out[k] for k in keys}

        serve_single, knob_single, forced_single = serve, knob, forced

    elif graph == "sliced":
        net = sliced_network.SlicedNetwork(model, action_tuples=action_tuples)
        # Every conv and dense kernel of both graphs is a variable of the
        # module, saved once in `variables/` and read by both: as graph
        # constants, ResNet-50's 2,000-odd weight slices were held in each
        # graph's proto (its batch-N save alone took 5 minutes, and adding
        # the batch-1 graph grew the save past 14 GB).
        spec = [images_spec, actions_spec, penalty_spec]
        single_spec = [image_spec, action_spec, penalty_spec]
        # The gather/scatter graph at every batch size, and the batch-1 If
        # tree (`net.single`) in a graph of its own: beside the first in a
        # `tf.cond` on the batch size, TensorFlow 2.21's grappler constant
        # folding made the gather/scatter side compute wrong actions
        # (reproduced; right with constant folding off; docs/export.md).
        batched, _, batched_kernels = net.kernels_as_inputs(net.batched, spec)
        single, _, single_kernels = net.kernels_as_inputs(net.single, single_spec)
        module.kernels = _variables({**batched_kernels, **single_kernels})

        @tf.function(input_signature=spec, autograph=False)
        def sliced(images, actions, penalty):
            return batched(images, actions, penalty, *(module.kernels[name] for name in batched_kernels))

        @tf.function(input_signature=single_spec, autograph=False)
        def sliced_single(images, actions, penalty):
            return single(images, actions, penalty, *(module.kernels[name] for name in single_kernels))

        module.sliced = sliced  # one traced graph for the three batch-N signatures
        module.sliced_single = sliced_single  # and one for the three batch-1 signatures
        greedy = tf.zeros([1, model.num_prunable], tf.int32)  # forced = 0: the agent decides
        default = tf.constant(net.penalty_setting, tf.float32)

        serve, knob, forced = _knob_signatures(sliced, greedy, default)
        serve_single, knob_single, forced_single = _knob_signatures(sliced_single, greedy, default)

    else:
        raise exceptions.ExportError(f"--graph must be one of {GRAPHS}, got {graph!r}")
    module.forced = tf.function(forced, input_signature=[images_spec, actions_spec], autograph=False)
    module.knob = tf.function(knob, input_signature=[images_spec, penalty_spec], autograph=False)
    module.serve = tf.function(serve, input_signature=[images_spec], autograph=False)
    module.forced_single = tf.function(forced_single, input_signature=[image_spec, action_spec], autograph=False)
    module.knob_single = tf.function(knob_single, input_signature=[image_spec, penalty_spec], autograph=False)
    module.serve_single = tf.function(serve_single, input_signature=[image_spec], autograph=False)
    return module


def _knob_signatures(graph, greedy, default):
    """`(serve, knob, forced)` over one `graph(images, actions, penalty)`.

    Greedy at the `default` penalty, greedy at a given penalty, and forced
    actions at the default penalty (`greedy`: forced actions of 0).
    """
    return (
        lambda images: graph(images, greedy, default),
        lambda images, penalty: graph(images, greedy, penalty),
        lambda images, actions: graph(images, actions, default),
    )


def _variables(kernels):
    """`{name: tf.Variable}` of `{name: array}` (not trainable)."""
    import tensorflow as tf

    return {name: tf.Variable(array, trainable=False, name=name) for name, array in kernels.items()}


def full_module(model):
    """A `tf.Module` whose `serve(images)` runs the unpruned network: the SavedModel latency baseline.

    Every conv on its BatchNorm-folded full weights (`SlicedNetwork.full`),
    the kernels held as variables as in the sliced graphs of
    `build_module`; any batch size. Save it with `save_full`.

    Args:
        model: the RNPModel.

    Returns:
        A `tf.Module` with the `tf.function` `serve(images) -> {"logits"}`.

    Example:

    >>> save_full(full_module(model), "/tmp/full_savedmodel")
    """
    import tensorflow as tf

    net = sliced_network.SlicedNetwork(model, action_tuples=[[model.groups] * model.num_prunable])
    spec = [tf.TensorSpec([None, *model.image_shape], tf.float32, name="images")]
    full, _, kernels = net.kernels_as_inputs(net.full, spec)
    module = tf.Module()
    module.kernels = _variables(kernels)

    def serve(images):
        return full(images, *(module.kernels[name] for name in kernels))

    module.serve = tf.function(serve, input_signature=spec, autograph=False)
    return module


def save_full(module, path):
    """`tf.saved_model.save` of a `full_module` with its `serving_default` signature."""
    import tensorflow as tf

    tf.saved_model.save(module, path, signatures={"serving_default": module.serve.get_concrete_function()})


def save(module, path):
    """`tf.saved_model.save` with the batch-N and batch-1 signatures (`serving_default`, ..., `forced_single`)."""
    import tensorflow as tf

    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        "serving_knob": module.knob.get_concrete_function(),
        "forced": module.forced.get_concrete_function(),
        "serving_single": module.serve_single.get_concrete_function(),
        "serving_knob_single": module.knob_single.get_concrete_function(),
        "forced_single": module.forced_single.get_concrete_function(),
    }
    tf.saved_model.save(module, path, signatures=signatures)


def runner(path_or_loaded, batch1=False):
    """`run(images, forced=None, penalty=None) -> dict` over a (re)loaded SavedModel.

    Args:
        path_or_loaded: the SavedModel directory or `tf.saved_model.load`'s result.
        batch1: one image per call, through the `*_single` signatures
            (the batch-N ones in an export that has none).

    Returns:
        `run`: `forced` goes through the `forced` signature, `penalty` (a
        float) through `serving_knob`, neither through `serving_default`.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(path_or_loaded) if isinstance(path_or_loaded, (str, os.PathLike)) else path_or_loaded
    signatures = loaded.signatures
    names = ("serving_default", "serving_knob", "forced")
    if batch1 and "serving_single" in signatures:
        names = ("serving_single", "serving_knob_single", "forced_single")
    serve, knob, forced_actions = (signatures[name] for name in names)

    def run_batch(images, forced=None, penalty=None):
        x = tf.constant(images, tf.float32)
        if forced is not None:
            out = forced_actions(images=x, actions=tf.constant(forced, tf.int32))
        elif penalty is not None:
            out = knob(images=x, penalty=tf.constant(penalty, tf.float32))
        else:
            out = serve(images=x)
        return {k: v.numpy() for k, v in out.items()}

    def run(images, forced=None, penalty=None):
        if forced is not None and penalty is not None:
            raise ValueError(f"Give forced actions or a penalty, not both. Received: penalty={penalty}")
        if not batch1:
            return run_batch(images, forced, penalty)
        outs = [
            run_batch(images[i : i + 1], None if forced is None else forced[i : i + 1], penalty)
            for i in range(len(images))
        ]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    return run


def export_saved_model(model_dir, output=None, graph="masked", num_parity_images=16, max_forced_tuples=256,
                       penalty=None, compute_cap=None, log=None, overwrite=False):
    """Exports `model_dir/model.keras` to `saved_model/` and verifies the reloaded SavedModel.

    Args:
        model_dir: directory holding `model.keras`.
        output: output directory (default `<model_dir>/export`).
        graph: "masked" (model.rollout) or "sliced" (gather/scatter).
        num_parity_images: images of the greedy parity check.
        max_forced_tuples: see `verification.action_tuples`.
        penalty, compute_cap: run-time knob applied before export.
        log: `log(message)` for progress lines.
        overwrite: replace an export of another model in `output` (see
            `writing.write_set`); otherwise it is refused before any work.

    Returns:
        The report dict (also written to `saved_model.json`).

    Raises:
        exceptions.ExportError: missing/corrupt checkpoint or failed parity check
            (nothing is written then).
    """
    if graph not in GRAPHS:
        raise exceptions.ExportError(f"--graph must be one of {GRAPHS}, got {graph!r}")
    model, target, log = cli.open_checkpoint(PROGRAM, model_dir, output, penalty, compute_cap, log, overwrite)
    with writing.output_directory(target.directory) as out:
        net = sliced_network.SlicedNetwork(model)
        images, knob, tuples = verification.parity_inputs(net, num_parity_images, max_forced_tuples)
        report = {
            "model_dir": os.path.abspath(model_dir),
            "graph": graph,
            "signatures": {
                "serving_default": "images float32 [batch, H, W, C] -> logits, actions int32 [batch, T], macs [batch]",
                "serving_knob": "images, penalty float32 [] or [1] or [batch] -> logits, actions, macs",
                "forced": "images, actions int32 [batch, T] (1..k) -> logits, actions, macs",
                "serving_single, serving_knob_single, forced_single": "the same three for images [1, H, W, C]",
            },
            "knob": cli.knob_report(net),
            "full_macs": float(model.full_macs),
            "parity": {},
        }

        def produce(tmp):
            log(f"saving the {graph} graph")
            save(build_module(model, graph), tmp)
            import tensorflow as tf

            loaded = tf.saved_model.load(tmp)
            result = verification.check_artifact("saved_model", model, runner(loaded), images, tuples, knob=knob)
            # one image per call through the `*_single` signatures (the sliced
            # graph's If tree): every (previous action, action) pair at every layer
            pairs = verification.action_tuples(model.num_prunable, model.groups, limit=model.groups**2,
                                               skips=model.plan.skip_columns)
            result["batch1"] = verification.check_artifact(
                "saved_model (batch 1)", model, runner(loaded, batch1=True), images[:4], pairs, per_tuple=1,
                knob=verification.knob_subset(knob, 4),
            )
            report["parity"]["saved_model"] = result
            log("saved_model: parity passed")

        writing.write_set(target, [
            writing.Artifact(os.path.join(out, "saved_model"), produce, directory=True),
            writing.json_artifact(os.path.join(out, "saved_model.json"), report),
        ], report)
    report["output"] = out
    return report


def summarize(report):
    parity = report["parity"]["saved_model"]
    g, f = parity["greedy"], parity["forced"]
    print(
        f"{PROGRAM}: {report['graph']} graph: greedy {g['samples']} images ({g['distinct_action_tuples']} action "
        f"tuples) max |dlogits| {g['max_abs_logit_diff']:.2e}; forced {f['distinct_action_tuples']} tuples "
        f"max |dlogits| {f['max_abs_logit_diff']:.2e}; {verification.knob_summary(parity)}"
    )
    print(f"{PROGRAM}: wrote saved_model/ and saved_model.json to {report['output']}")


def main(argv):
    fv = flags.FLAGS
    report = cli.run_cli(PROGRAM, argv, lambda model_dir: export_saved_model(
        model_dir, fv.output, fv.graph, fv.num_parity_images, fv.max_forced_tuples, fv.penalty, fv.compute_cap,
        overwrite=fv.overwrite,
    ))
    summarize(report)


if __name__ == "__main__":
    validation.run_cli(PROGRAM, main, define_flags)
