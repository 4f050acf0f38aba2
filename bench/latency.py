"""Latency of the inference engine against the full model: `python -m bench.latency`.

For VGG-16 (224x224, 1000 classes, random weights) and the CIFAR CNN
(32x32), at batch 1 and 64, the benchmark forces action assignments whose
theoretical MAC reduction (`model.full_macs / mean(model.macs(actions))`,
the backbone's MACs: stem, prunable convs and head; the agent's tiny MAC
count is left out) is about 1x, 2x, 3x, 4x, 5x and 10x, and times, interleaved
in one run (median of `--repeats` rounds after `--warmup` calls):

- `full`: the dense network as a plain graph (`rnp_tf.engine.DenseRunner`:
  BatchNorm folded, no agent, no branches);
- `rnp`: `InferenceEngine` with the agent running and every layer waiting
  for its decision (forced actions, `run_agent=True`), i.e. what a policy
  that chose these actions costs;
- `rnp_no_agent`: the engine on the same actions without the agent;
- `agent`: the agent alone (pooling, encoders, LSTM, decoders, greedy
  argmax, re-ordering) on feature maps shaped as the engine sees them.

At batch > 1 every point runs twice: `uniform` (every sample the same
actions) and `mixed` (per-sample actions, each layer's action of each sample
perturbed by -1/0/+1 from the uniform tuple, then adjusted until the batch's
mean MACs match the uniform tuple's within 0.5%).

With `--skips`, ResNet-50 and MobileNetV2 are timed a second time with
their identity blocks skippable (rows `resnet50+skip`, `mobilenet_v2+skip`):
each operating point skips as many blocks (action 0, in `skip_order`) as
its target allows, and the mixed batch flips a quarter of the samples'
skips. The agent still takes every decision (a skipped block's on zero
features), as in the engine. With `--per_stage`, they are timed again
deciding once per stage (`rnp_tf.decide_per_stage`, rows
`resnet50+stage`, `mobilenet_v2+stage`): the later blocks of a stage take
its first block's actions and the agent does not run there.

Peak memory: CPU TensorFlow has no allocator statistics
(`tf.config.experimental.get_memory_info` is GPU-only) and `tracemalloc`
does not see TensorFlow's allocations, so each configuration runs in a fresh
subprocess that builds the model, resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`), builds the runner (its folded weights count) and
calls it twice; the peak RSS (`VmHWM`) is the whole process (Python,
TensorFlow, the Keras model's weights, the runner, activations). For the
engine all points of one batch size run in the same subprocess, the mark
reset before each, so a later point's peak is at least the memory the
earlier ones kept (conservative).

Outputs (in `--output`): `latency.json`, `latency.md` (table, targets,
machine, command) and `latency.png` (measured against theoretical speed-up,
with the ideal line and the paper's GPU measurements).

Usage:

    python -m bench.latency                       # full run (~30+ min on 2 cores)
    python -m bench.latency --quick               # CIFAR CNN smoke run (~1 min)
    python -m bench.latency --models=vgg16 --batch_sizes=1 --repeats=9
    python -m bench.latency --stages --models=vgg16  # batch-1 time of every stage
    python -m bench.latency --models=mobilenet_v2,resnet50 --skips  # residual networks (224x224), with block skips
"""

import datetime
import gc
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

from bench import models
from bench import timing

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags (only when run as a script: other benchmarks share the registry)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "Smoke run: CIFAR CNN, batch 1 and 16, 1x/2x/4x, 3 repeats.", **fv)
    flags.DEFINE_string("output", "bench/results", "Directory of latency.json / .md / .png.", **fv)
    flags.DEFINE_list("models", ["vgg16", "cifar_cnn"], "Models to time: vgg16, cifar_cnn, resnet50, mobilenet_v2.", **fv)
    flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes.", **fv)
    flags.DEFINE_list("targets", ["1", "2", "3", "4", "5", "10"], "Theoretical speed-ups to aim at.", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed rounds per point (the median is reported).", **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed calls of each function first (the first traces).", **fv)
    flags.DEFINE_float("min_sample_seconds", 0.05, "Fast calls are repeated until a sample lasts this long.", **fv)
    flags.DEFINE_integer("vgg_size", 224, "Input resolution of the ImageNet models (vgg16, resnet50, mobilenet_v2).", **fv)
    flags.DEFINE_enum("weight_cache", "pairs", ["pairs", "sets"], "InferenceEngine weight cache.", **fv)
    flags.DEFINE_enum("constant_weights", "auto", ["auto", "true", "false"], "Whether the batch-1 graphs of the "
                      "engine and of the full model hold their folded weights as graph constants "
                      "(`InferenceEngine(constant_weights=...)`; auto: the engine's default, constants for backbones "
                      "with at most 32 MB of conv kernels).", **fv)
    flags.DEFINE_bool("memory", True, "Measure peak RSS in subprocesses.", **fv)
    flags.DEFINE_bool("no_agent_variant", True, "Also time the engine without the agent.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of weights, inputs and mixed actions.", **fv)
    flags.DEFINE_bool("skips", False, "Also time resnet50 / mobilenet_v2 with their identity blocks skippable "
                      "(rows `resnet50+skip`): operating points that skip as many blocks as the target allows.", **fv)
    flags.DEFINE_bool("per_stage", False, "Also time resnet50 / mobilenet_v2 deciding once per stage (rows "
                      "`resnet50+stage`, `rnp_tf.decide_per_stage`).", **fv)
    flags.DEFINE_bool("stages", False, "Instead of the benchmark: time every stage of batch-1 inference (stem, each conv, each pool, the head) alone, full and at every operating point; writes latency_stages.json.", **fv)


PAPER_GPU = {
    "source": "Lin et al. 2017, VGG-16, Titan X (Pascal), batch 64 (authors' poster)",
    "theoretical": [3.0, 4.0, 5.0, 10.0],
    "measured": [2.3, 3.0, 3.7, 5.9],
}
SCHEMA_VERSION = 1
NUM_CLASSES = {"vgg16": 1000, "cifar_cnn": 10, "resnet50": 1000, "mobilenet_v2": 1000}
SKIP = "+skip"  # suffix of a model name: its identity blocks are skippable
STAGE = "+stage"  # suffix of a model name: it decides once per stage
SKIPPABLE = ("resnet50", "mobilenet_v2")  # the models that take either suffix
ROW_KEYS = (
    "model", "image_size", "batch_size", "mode", "target_speedup", "theoretical_speedup",
    "actions", "distinct_action_tuples", "full_ms", "rnp_ms", "rnp_no_agent_ms", "agent_ms",
    "measured_speedup", "paired_speedup", "min_speedup", "efficiency", "paired_efficiency", "no_agent_speedup", "agent_overhead", "agent_in_engine",
    "call_overhead_ms",
    "full_ms_p25", "full_ms_p75", "rnp_ms_p25", "rnp_ms_p75",
    "full_peak_rss_mb", "rnp_peak_rss_mb", "memory_ratio", "base_rss_mb",
)
REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------- config
def default_config(**overrides):
    """The benchmark's settings as a dict (the flags' defaults).

    Args:
        **overrides: settings to change (same names as the flags).

    Returns:
        A dict.

    Example:

    >>> default_config(quick=True)["models"]
    ['cifar_cnn']
    """
    config = {
        "quick": False,
        "models": ["vgg16", "cifar_cnn"],
        "batch_sizes": [1, 64],
        "targets": [1.0, 2.0, 3.0, 4.0, 5.0, 10.0],
        "repeats": 5,
        "warmup": 2,
        "min_sample_seconds": 0.05,
        "vgg_size": 224,
        "weight_cache": "pairs",
        "constant_weights": "auto",
        "memory": True,
        "no_agent_variant": True,
        "seed": 0,
        "skips": False,
        "per_stage": False,
    }
    quick = {"models": ["cifar_cnn"], "batch_sizes": [1, 16], "targets": [1.0, 2.0, 4.0], "repeats": 3}
    config = timing.settings(config, overrides, quick, "batch_sizes")
    setting = config["constant_weights"]  # the flag's strings; the engine takes True, False or "auto"
    config["constant_weights"] = {"true": True, "false": False}.get(setting, setting)
    for name in config["models"]:
        if name not in NUM_CLASSES and name not in variant_names():
            raise ValueError(f"Unknown model. Expected some of {sorted(NUM_CLASSES) + variant_names()}. "
                             f"Received: models={config['models']}")
    if int(config["repeats"]) < 1:
        raise ValueError(f"`repeats` must be >= 1. Received: {config['repeats']}")
    return config


def build_model(name, config):
    """The model to time, with random weights (and random BatchNorm statistics)."""
    import rnp_tf

    skips, per_stage = name.endswith(SKIP), name.endswith(STAGE)
    name = name.removesuffix(SKIP).removesuffix(STAGE)
    if name != "cifar_cnn":  # the ImageNet backbones, by their `rnp_tf.get_backbone` names
        spec, size = rnp_tf.get_backbone(name, **({"skippable": True} if skips else {})), int(config["vgg_size"])
        spec = rnp_tf.decide_per_stage(spec) if per_stage else spec
        shape = (size, size, 3)
    else:
        spec, shape = rnp_tf.cifar_cnn(), (32, 32, 3)
    import keras

    keras.utils.set_random_seed(config["seed"])
    model = rnp_tf.RNPModel(spec, image_shape=shape, num_classes=NUM_CLASSES[name])
    return models.randomise_batchnorm(model, config["seed"], spread=0.1)


# ------------------------------------------------------------ operating points
def _candidates(num_layers, groups, rng, limit=20000):
    import itertools

    import numpy as np

    if groups**num_layers <= limit:
        return np.array(list(itertools.product(range(1, groups + 1), repeat=num_layers)))
    rows = [np.full(num_layers, a) for a in range(1, groups + 1)]
    for low in range(1, groups):
        if 2**num_layers <= limit // groups:
            masks = np.array(list(itertools.product((0, 1), repeat=num_layers)))
        else:
            masks = rng.integers(0, 2, size=(limit // groups, num_layers))
        rows.extend(low + masks)
    return np.unique(np.array(rows), axis=0)


def skip_order(model):
    """The skippable decisions in the order the operating points skip them: every other block first, spread out."""
    skippable = sorted(model.plan.skippable)
    return skippable[0::2] + skippable[1::2]


def canonical_actions(model, actions):
    """Actions as `RNPModel.rollout` records them, in place: 0 after a skip, a tied decision's leader's action."""
    for t, first in model.plan.skipped_by.items():
        actions[:, t] *= (actions[:, first] > 0).astype(actions.dtype)
    actions[:] = actions[:, model.plan.action_sources]
    return actions


def operating_points(model, targets, seed=0):
    """Uniform action tuples whose theoretical speed-up is closest to each target.

    Candidates: every tuple when `k^L` is small, else tuples whose layers
    take one of two adjacent actions (`u` or `u + 1`). The closest in log
    ratio wins; ties go to the tuple with the smaller spread. A model with
    skippable blocks also gets each candidate with its first `s` blocks of
    `skip_order` skipped (action 0), and among the candidates within 1% of
    the target the one that skips most wins.

    Args:
        model: an `RNPModel`.
        targets: list of theoretical speed-ups (>= 1).
        seed: seed for sampling candidates of very deep models.

    Returns:
        A list of dicts: `target`, `actions` (list of ints),
        `theoretical_speedup`, `skipped_blocks`.

    Example:

    >>> [p["actions"] for p in operating_points(model, [1.0])]
    [[4, 4, 4]]
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    leaders = model.plan.leaders  # a tied decision takes its leader's action: candidates vary at the leaders
    chosen = _candidates(len(leaders), model.groups, rng)
    cands = np.zeros((len(chosen), model.num_prunable), chosen.dtype)
    cands[:, leaders] = chosen
    canonical_actions(model, cands)
    order = skip_order(model)
    skipped = np.zeros(len(cands), np.int64)
    if order:
        rows, counts = [cands], [skipped]
        for count in range(1, len(order) + 1):
            rows.append(cands.copy())
            rows[-1][:, order[:count]] = 0
            counts.append(np.full(len(cands), count))
        cands, skipped = np.concatenate(rows), np.concatenate(counts)
        canonical_actions(model, cands)
    ratios = model.full_macs / model.macs(cands).numpy().astype(np.float64)
    taken = np.where(cands > 0, cands, cands.max(axis=1, keepdims=True))
    spread = taken.max(axis=1) - taken.min(axis=1)
    points = []
    for target in targets:
        error = np.abs(np.log(ratios) - math.log(target))
        best = np.lexsort((spread, -skipped, np.round(error, 2))) if order else np.lexsort((spread, np.round(error, 6)))
        best = best[0]
        points.append(
            {
                "target": float(target),
                "actions": [int(a) for a in cands[best]],
                "theoretical_speedup": float(ratios[best]),
                "skipped_blocks": int(skipped[best]),
            }
        )
    return points


def mixed_actions(model, actions, batch_size, seed=0, tolerance=0.005, max_steps=200000):
    """Per-sample actions whose mean MACs equal one uniform tuple's.

    Each sample's action at each layer is the tuple's, moved by -1, 0 or +1
    at random (clipped to `1..k`); each skippable block is skipped (action
    0) or taken with the tuple's choice flipped for a quarter of the
    samples. Then single actions of taken decisions are moved by one group,
    at random samples and layers, until the batch's mean MACs are within
    `tolerance` of the uniform tuple's (or no move is left).

    Args:
        model: an `RNPModel`.
        actions: the uniform tuple (list of ints).
        batch_size: number of samples.
        seed: random seed.
        tolerance: relative tolerance on the mean MACs. Defaults to 0.005.
        max_steps: bound on the adjustment moves.

    Returns:
        An int32 numpy array `[batch_size, num_prunable]`.

    Example:

    >>> a = mixed_actions(model, [2, 3, 2], 64)
    >>> a.shape
    (64, 3)
    """
    import numpy as np

    k = model.groups
    rng = np.random.default_rng(seed)
    base = np.asarray(actions, np.int64)[None]
    target = float(model.macs(base).numpy()[0])
    taken = np.where(base > 0, base, max(1, int(base.max())))
    chosen = np.clip(taken + rng.integers(-1, 2, size=(batch_size, base.shape[1])), 1, k)
    for t in sorted(model.plan.skippable):
        flip = rng.random(batch_size) < 0.25
        chosen[:, t] = np.where((base[0, t] == 0) != flip, 0, chosen[:, t])
    canonical_actions(model, chosen)
    movable_mask = chosen > 0  # the decisions taken (a skip and its untaken decisions are 0)
    movable_mask[:, sorted(model.plan.tied_to)] = False  # they follow their leader
    per_sample = model.macs(chosen).numpy().astype(np.float64)
    for _ in range(max_steps):
        mean = per_sample.mean()
        if abs(mean / target - 1.0) <= tolerance:
            break
        step = -1 if mean > target else 1
        movable = np.argwhere(movable_mask & (chosen + step >= 1) & (chosen + step <= k))
        if not len(movable):
            break
        i, layer = movable[rng.integers(len(movable))]
        chosen[i, layer] += step
        canonical_actions(model, chosen[i : i + 1])
        per_sample[i] = float(model.macs(chosen[i : i + 1]).numpy()[0])
    return chosen.astype(np.int32)


# ----------------------------------------------------------------- agent alone
def _feeding_shapes(model):
    """Per decision: (height, width, channels) of the map feeding it and the decision that set its width.

    The width-setting decision is the decided conv's `in_ref` (None: the
    map has full width, as a block's input does).
    """
    import rnp_tf

    shapes = []
    hw = model.image_shape[:2]

    def conv(step):
        nonlocal hw
        if step.decision is not None:
            shapes.append(((*hw, step.layer.in_channels), step.in_ref))
        hw = step.layer.output_hw

    for step in model.plan.steps:
        if isinstance(step, rnp_tf.plan.MapStep):
            hw = tuple(step.layer.compute_output_shape((None, *hw, 1))[1:3])
        elif isinstance(step, (rnp_tf.plan.BlockStep, rnp_tf.plan.InvertedResidualStep)):
            for inner in step.body:
                conv(inner)
        else:
            conv(step)
    return shapes


def agent_alone_function(engine, actions, agent_step=None):
    """A zero-argument callable running only the agent, as inside the engine.

    The feature maps are random tensors shaped (and, at batch > 1, split
    into the (previous action, action) pieces) as the engine holds them for
    `actions`; the callable runs the engine's `agent_step` for every layer
    and the greedy argmax.

    Args:
        engine: an `InferenceEngine`.
        actions: int numpy array `[batch, num_prunable]`.
        agent_step: the step timed, with the signature of
            `InferenceEngine.agent_step` (the default); `bench.agent_cost`
            passes an earlier implementation to time before and after.

    Returns:
        `(agent, call)`: zero-argument callables; `agent` returns the greedy
        actions `[batch, num_prunable]`, `call` is an empty `tf.function`
        taking the same feature maps (the fixed cost of a call with these
        arguments, to subtract).
    """
    import numpy as np
    import tensorflow as tf

    import rnp_tf

    model = engine.model
    k = model.groups
    batch = actions.shape[0]
    single = batch == 1 and engine.control_flow
    inputs, whole = [], []  # per layer: list of (features, sample ids); whether it is one full-width map
    shapes = _feeding_shapes(model)
    in_refs = [ref for _, ref in shapes]
    for t, ((height, width, channels), ref) in enumerate(shapes):
        in_group = channels // k
        whole.append(ref is None)
        if t in model.plan.tied_to:  # the agent does not run there
            inputs.append([])
            continue
        if single:
            previous = int(actions[0, ref]) if ref is not None else k
            inputs.append([(tf.random.normal([1, height, width, previous * in_group]), None)])
            continue
        if ref is None:
            inputs.append([(tf.random.normal([batch, height, width, channels]), tf.range(batch))])
            continue
        # The pieces feeding layer t are the outputs of layer `ref`, one per
        # (action before it, action at it) pair (a full-width input counts as k).
        grand = in_refs[ref]
        before = actions[:, grand] if grand is not None else np.full(batch, k)
        previous = actions[:, ref]
        skipped = np.flatnonzero(previous == 0).astype(np.int32)  # a skipped block's samples: no features
        pieces = [(None, tf.constant(skipped))] if len(skipped) else []
        for p2 in range(1, k + 1) if grand is not None else (k,):
            for p in range(1, k + 1):
                ids = np.flatnonzero((before == p2) & (previous == p)).astype(np.int32)
                features = tf.random.normal([len(ids), height, width, p * in_group])
                pieces.append((features, tf.constant(ids, tf.int32)))
        inputs.append(pieces)

    # The features are arguments, not captures: a traced function keeps its
    # captured tensors alive for as long as TensorFlow keeps the trace.
    @tf.function(autograph=False)
    def run(inputs):
        state = engine.start_agent(batch)
        chosen = []
        for t, pieces in enumerate(inputs):
            if t in model.plan.tied_to:
                chosen.append(chosen[model.plan.tied_to[t]])
                continue
            q, state = (agent_step or engine.agent_step)(t, pieces, state, single or whole[t])
            chosen.append(rnp_tf.greedy_actions(q))
        return tf.stack(chosen, axis=1)

    @tf.function(autograph=False)
    def call(inputs):
        return tf.constant(0, tf.int32)

    return (lambda: run(inputs)), (lambda: call(inputs))


# ------------------------------------------------------------------- memory
def _status_kb(field):
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{field} is not in /proc/self/status")


def _reset_peak():
    """Resets the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(spec):
    """Peak RSS of one runner (run in a fresh process by `measure_memory`).

    Args:
        spec: dict with `model`, `config` (benchmark settings), `batch_size`,
            `runner` (`"full"` or `"rnp"`) and `actions` (a list of
            `[batch, L]` action lists, one per point; ignored for `"full"`).

    Returns:
        A dict: `base_rss_mb` (after the model is built), `peak_rss_mb`
        (one per point, or one for `"full"`), `reset` (whether the peak mark
        could be reset; if not, peaks include the model's construction).
    """
    import numpy as np
    import tensorflow as tf

    from rnp_tf import engine as engine_lib

    model = build_model(spec["model"], spec["config"])
    x = tf.random.normal([spec["batch_size"], *model.image_shape], seed=1)
    base = _status_kb("VmRSS") / 1024.0
    reset = _reset_peak()
    peaks = []
    if spec["runner"] == "full":
        runner = engine_lib.DenseRunner(model, constant_weights=spec["config"]["constant_weights"])
        for _ in range(2):
            runner(x).numpy()
        peaks.append(_status_kb("VmHWM") / 1024.0)
    else:
        engine = engine_lib.InferenceEngine(model, weight_cache=spec["config"]["weight_cache"],
                                            constant_weights=spec["config"]["constant_weights"])
        for i, actions in enumerate(spec["actions"]):
            if i:
                _reset_peak()
            actions = tf.constant(np.asarray(actions, np.int32))
            for _ in range(2):
                engine(x, actions=actions, run_agent=True)["logits"].numpy()
            peaks.append(_status_kb("VmHWM") / 1024.0)
    return {"base_rss_mb": base, "peak_rss_mb": peaks, "reset": reset}


def _probe_main():
    """Entry point of a memory subprocess: JSON spec on stdin, result on stdout."""
    spec = json.loads(sys.stdin.read())
    print("RESULT " + json.dumps(memory_probe(spec)), flush=True)


def measure_memory(spec, timeout=3600):
    """Runs `memory_probe(spec)` in a fresh Python process and returns its dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(
        [sys.executable, "-c", "import bench.latency as m; m._probe_main()"],
        input=json.dumps(spec), capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(
        f"memory probe failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-5:]}"
    )


# ------------------------------------------------------------------- timing
def _ms(summary, key="median_s"):
    return 1e3 * summary[key]


def time_point(model_name, model, engine, full, x, actions, target, config):
    """Times one operating point (full, rnp, rnp without agent, agent alone).

    Returns:
        A result row (dict with the keys of `ROW_KEYS`, memory left None).
    """
    import numpy as np
    import tensorflow as tf


    actions_t = tf.constant(actions, tf.int32)
    agent, call = agent_alone_function(engine, actions)
    fns = {
        "full": lambda: full(x),
        "rnp": lambda: engine(x, actions=actions_t, run_agent=True),
        "agent": agent,
        "call": call,
    }
    if config["no_agent_variant"]:
        fns["rnp_no_agent"] = lambda: engine(x, actions=actions_t, run_agent=False)
    times = timing.measure(
        fns, repeats=config["repeats"], warmup=config["warmup"],
        min_sample_seconds=config["min_sample_seconds"], seed=config["seed"],
    )
    macs = model.macs(actions).numpy().astype(np.float64)
    theoretical = model.full_macs / float(macs.mean())
    full_ms, rnp_ms = _ms(times["full"]), _ms(times["rnp"])
    # The agent runs inside the engine's graph: the fixed cost of calling a
    # tf.function with its inputs (timed on an empty one) is not its cost.
    agent_ms = max(_ms(times["agent"]) - _ms(times["call"]), 0.0)
    distinct = len({tuple(row) for row in actions.tolist()})
    uniform = distinct == 1
    row = dict.fromkeys(ROW_KEYS)
    row.update(
        {
            "model": model_name,
            "image_size": int(model.image_shape[0]),
            "batch_size": int(actions.shape[0]),
            "mode": "uniform" if uniform or actions.shape[0] == 1 else "mixed",
            "target_speedup": target,
            "theoretical_speedup": theoretical,
            "actions": actions[0].tolist() if uniform else actions.tolist(),
            "distinct_action_tuples": distinct,
            "full_ms": full_ms,
            "rnp_ms": rnp_ms,
            "agent_ms": agent_ms,
            "call_overhead_ms": _ms(times["call"]),
            "measured_speedup": full_ms / rnp_ms,
            "paired_speedup": float(np.median(
                np.asarray(times["full"]["samples_s"]) / np.asarray(times["rnp"]["samples_s"])
            )),
            "min_speedup": times["full"]["min_s"] / times["rnp"]["min_s"],
            "efficiency": full_ms / rnp_ms / theoretical,
            "agent_overhead": agent_ms / full_ms,
            "full_ms_p25": _ms(times["full"], "p25_s"),
            "full_ms_p75": _ms(times["full"], "p75_s"),
            "rnp_ms_p25": _ms(times["rnp"], "p25_s"),
            "rnp_ms_p75": _ms(times["rnp"], "p75_s"),
        }
    )
    row["paired_efficiency"] = row["paired_speedup"] / theoretical
    del fns, agent, call
    gc.collect()
    if "rnp_no_agent" in times:
        row["rnp_no_agent_ms"] = _ms(times["rnp_no_agent"])
        row["no_agent_speedup"] = full_ms / row["rnp_no_agent_ms"]
        row["agent_in_engine"] = (rnp_ms - row["rnp_no_agent_ms"]) / full_ms
    return row


def stage_times(model, engine, points, config):
    """Batch-1 time of every stage alone, at full width and at each operating point.

    Each stage (the stem, every prunable conv on its BatchNorm-folded weight
    slice, every conv of full output on the groups it reads (a bottleneck's
    last conv, a projection shortcut, an inverted residual's depthwise conv
    and projection), every pooling layer, every residual sum (timed as the
    sum of the block's output with itself), the classifier head) runs as its
    own `tf.function` on a random input shaped as in the engine, and all are
    timed interleaved (`bench.timing.measure`). A conv's *ideal* time is its
    full-width time scaled by its MAC fraction: comparing the two shows
    which layers fall short of MAC scaling, and the stages that do not
    shrink (stem, pools, sums, head) bound the speed-up. A skipped block
    has no stage.

    Args:
        model: an `RNPModel` (a chain or a residual backbone).
        engine: its `InferenceEngine`.
        points: operating points (`operating_points`); the first must be
            the full width (all actions k).
        config: benchmark settings (`repeats`, `warmup`,
            `min_sample_seconds`, `seed`).

    Returns:
        A dict: `stages_ms` (stage name -> median ms) and `points`, one dict
        per point: `target`, `theoretical_speedup`, `actions`, `stem_ms`,
        `conv_ms`, `conv_ideal_ms`, `pool_ms`, `add_ms`, `head_ms`,
        `total_ms`.
    """
    import numpy as np
    import tensorflow as tf

    import rnp_tf
    from rnp_tf import engine as engine_lib

    k = model.groups
    if list(points[0]["actions"]) != [k] * model.num_prunable:
        raise ValueError(f"The first point must be the full width. Received: actions={points[0]['actions']}")
    fns = {}

    def add(name, fn, shape):
        if name not in fns:
            x = tf.random.normal(shape, seed=config["seed"])
            compiled = tf.function(fn, autograph=False)
            fns[name] = lambda: compiled(x)
        return name

    plan = model.plan
    per_point = []
    for point in points:
        acts = list(point["actions"])
        names, ideal_of = [], {}  # stage names in order; conv stage -> (its id, its MAC fraction)
        where = {"hw": tuple(model.image_shape[:2]), "width": model.image_shape[2]}

        def conv(step, acts=acts, names=names, ideal_of=ideal_of, where=where):
            layer, t, ref = step.layer, step.decision, step.in_ref
            hw, p = where["hw"], (k if step.in_ref is None else acts[ref])
            if layer is plan.stem:
                names.append(add("stem", engine.stem, [1, *hw, where["width"]]))
                where.update(hw=tuple(layer.output_hw), width=layer.filters)
                return
            if t is not None:
                p, a = (p if layer.gated_input else k), acts[t]
                name = add(f"conv_{t}_{p}_{a}", lambda x, t=t, p=p, a=a: engine.branch(t, x, p, a),
                           [1, *hw, engine.in_width(t, p)])
                ideal_of[name] = (f"conv_{t}", float(layer.macs(p, a)) / float(layer.macs(k, k)))
                width = a * layer.group_size
            else:  # a conv of full output on `p` groups (a bottleneck's last conv, a projection, a depthwise conv)
                in_width = layer.in_channels if ref is None else p * layer.in_group_size
                name = add(f"kept_{layer.name}_{p}", lambda x, layer=layer, p=p: engine.kept(layer, x, p),
                           [1, *hw, in_width])
                ideal_of[name] = (f"kept_{layer.name}", float(layer.macs(p, k)) / float(layer.macs(k, k)))
                width = in_width if isinstance(layer, rnp_tf.GatedDepthwiseConv2D) else layer.filters  # depthwise: kept
            names.append(name)
            where.update(hw=tuple(layer.output_hw), width=width)

        for step in plan.steps:
            if isinstance(step, rnp_tf.plan.MapStep):
                hw, width = where["hw"], where["width"]
                names.append(add(f"pool_{len(names)}_{width}", lambda x, l=step.layer: engine_lib.map_op(l, x),
                                 [1, *hw, width]))
                where["hw"] = tuple(engine_lib.map_op(step.layer, tf.zeros([1, *hw, 1])).shape[1:3])
            elif isinstance(step, rnp_tf.plan.ConvStep):
                conv(step)
            else:  # a residual block: its branch (unless skipped), its shortcut conv, the sum
                decided = [inner.decision for inner in step.body if inner.decision is not None]
                block_in = dict(where)
                if step.skippable and acts[decided[0]] == 0:
                    continue
                for inner in step.body:
                    conv(inner)
                out = dict(where)
                if getattr(step, "shortcut", None) is not None:
                    where.update(block_in)
                    conv(step.shortcut)
                    where.update(out)
                if isinstance(step, rnp_tf.plan.BlockStep) or step.residual:
                    relu = isinstance(step, rnp_tf.plan.BlockStep)
                    names.append(add(f"add_{'_'.join(map(str, out['hw']))}_{out['width']}_{int(relu)}",
                                     lambda x, relu=relu: tf.nn.relu(x + x) if relu else x + x,
                                     [1, *out["hw"], out["width"]]))
        last = acts[plan.head.in_ref] if plan.head.in_ref is not None else None
        names.append(add(f"head_{last if last is not None else k}", lambda x, a=last: engine.head(x, a),
                         [1, *where["hw"], where["width"]]))
        per_point.append((point, names, ideal_of))
    times = timing.measure(fns, repeats=config["repeats"], warmup=config["warmup"],
                           min_sample_seconds=config["min_sample_seconds"], seed=config["seed"])
    ms = {name: 1e3 * times[name]["median_s"] for name in fns}
    first = per_point[0][2]  # the full width's convs: each one's full time, by id
    full = {first[n][0]: ms[n] for n in per_point[0][1] if n in first}
    out = []
    for point, names, ideal_of in per_point:
        kinds = {kind: sum(ms[n] for n in names if n.startswith(prefixes))
                 for kind, prefixes in (("stem", "stem"), ("conv", ("conv", "kept")), ("pool", "pool"), ("add", "add"),
                                        ("head", "head"))}
        ideal = sum(full[ideal_of[n][0]] * ideal_of[n][1] for n in names if n in ideal_of)
        out.append({
            "target": point["target"], "theoretical_speedup": point["theoretical_speedup"],
            "actions": [int(a) for a in point["actions"]],
            "stem_ms": kinds["stem"], "conv_ms": kinds["conv"], "conv_ideal_ms": float(np.float64(ideal)),
            "pool_ms": kinds["pool"], "add_ms": kinds["add"], "head_ms": kinds["head"], "total_ms": sum(kinds.values()),
        })
    return {"stages_ms": ms, "points": out}


def variant_names():
    """`resnet50+skip`, `mobilenet_v2+skip`, `resnet50+stage`, `mobilenet_v2+stage`: names `--models` also takes."""
    return [name + suffix for suffix in (SKIP, STAGE) for name in SKIPPABLE]


def model_names(config):
    """The models to time: `config["models"]`, then each residual one again with skips (`skips`), per stage (`per_stage`)."""
    residual = [name for name in config["models"] if name in SKIPPABLE]
    skipping = [name + SKIP for name in residual if config.get("skips")]
    staged = [name + STAGE for name in residual if config.get("per_stage")]
    return list(dict.fromkeys(list(config["models"]) + skipping + staged))


def run_benchmark(config, log=print, progress=None):
    """Runs every configured model, batch size, operating point and mode.

    Args:
        config: a dict from `default_config`.
        log: progress printer (one line per point).
        progress: optional callable given the partial result dict (with
            `"complete": False`) after every point, e.g. to save it.

    Returns:
        The result dict written to `latency.json`.
    """
    import numpy as np
    import tensorflow as tf

    from rnp_tf import engine as engine_lib

    started = time.time()
    rows, points_out = [], {}
    for model_name in model_names(config):
        model = build_model(model_name, config)
        points = operating_points(model, config["targets"], seed=config["seed"])
        points_out[model_name] = points
        engine = engine_lib.InferenceEngine(model, weight_cache=config["weight_cache"],
                                            constant_weights=config["constant_weights"])
        full = engine_lib.DenseRunner(model, constant_weights=config["constant_weights"])
        for batch in config["batch_sizes"]:
            x = tf.random.normal([batch, *model.image_shape], seed=config["seed"])
            batch_rows = []
            for i, point in enumerate(points):
                uniform = np.tile(np.asarray(point["actions"], np.int32), (batch, 1))
                variants = [uniform]
                if batch > 1:
                    variants.append(
                        mixed_actions(model, point["actions"], batch, seed=config["seed"] + i)
                    )
                for actions in variants:
                    row = time_point(model_name, model, engine, full, x, actions, point["target"], config)
                    if batch > 1 and actions is not uniform:
                        row["mode"] = "mixed"
                    batch_rows.append((row, actions))
                    if progress is not None:
                        progress(_result(config, rows + [r for r, _ in batch_rows], points_out, started, False))
                    log(
                        f"{model_name} {model.image_shape[0]}px b{batch} {row['mode']:7s} "
                        f"theo {row['theoretical_speedup']:.2f}x: full {row['full_ms']:.1f} ms, "
                        f"rnp {row['rnp_ms']:.1f} ms -> {row['measured_speedup']:.2f}x "
                        f"(eff {row['efficiency']:.2f}), agent {100 * row['agent_overhead']:.1f}%"
                    )
            if config["memory"]:
                spec = {"model": model_name, "config": config, "batch_size": batch}
                full_mem = measure_memory({**spec, "runner": "full", "actions": []})
                rnp_mem = measure_memory(
                    {**spec, "runner": "rnp", "actions": [a.tolist() for _, a in batch_rows]}
                )
                for (row, _), peak in zip(batch_rows, rnp_mem["peak_rss_mb"]):
                    row["full_peak_rss_mb"] = full_mem["peak_rss_mb"][0]
                    row["rnp_peak_rss_mb"] = peak
                    row["memory_ratio"] = peak / full_mem["peak_rss_mb"][0]
                    row["base_rss_mb"] = full_mem["base_rss_mb"]
                log(f"{model_name} b{batch} memory: full {full_mem['peak_rss_mb'][0]:.0f} MB, "
                    f"rnp {max(rnp_mem['peak_rss_mb']):.0f} MB (max over points)")
            rows.extend(row for row, _ in batch_rows)
        del engine, full, model
        gc.collect()
    return _result(config, rows, points_out, started, True)


def _result(config, rows, points_out, started, complete):
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        "benchmark": "latency",
        "command": "python -m bench.latency " + " ".join(sys.argv[1:]) if sys.argv and "latency" in sys.argv[0] else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": config,
        "operating_points": points_out,
        "rows": rows,
        "targets": evaluate_targets(rows),
        "paper_gpu": PAPER_GPU,
        "seconds": time.time() - started,
    }


def machine_info():
    """Platform, CPU, core count, memory and library versions."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": len(tf.config.list_physical_devices("GPU")),
    }


# ------------------------------------------------------------------ targets
def evaluate_targets(rows):
    """The issues' targets, checked on the VGG-16, ResNet-50 and MobileNetV2 224x224 rows present.

    Returns:
        A list of dicts: `name`, `threshold`, `value` (the worst measured
        value, None when no row applies), `met` (None when not evaluated).
    """

    def pick(batch, mode, lo=2.5, hi=5.5, model="vgg16"):
        return [
            r for r in rows
            if r["model"] == model and r["image_size"] == 224 and r["batch_size"] == batch
            and r["mode"] == mode and lo <= r["theoretical_speedup"] <= hi
        ]

    def check(name, selected, key, threshold, worst=min, higher_is_better=True):
        values = [r[key] for r in selected if r.get(key) is not None]
        if not values:
            return {"name": name, "threshold": threshold, "value": None, "met": None, "points": 0}
        value = worst(values)
        met = value >= threshold if higher_is_better else value <= threshold
        out = {"name": name, "threshold": threshold, "value": value, "met": bool(met), "points": len(values)}
        if key == "efficiency":
            out["value_paired"] = worst(r["paired_efficiency"] for r in selected)
        return out

    vgg = [r for r in rows if r["model"] == "vgg16" and r["image_size"] == 224]
    b1 = [r for r in vgg if r["batch_size"] == 1]
    b64 = [r for r in vgg if r["batch_size"] == 64]
    return [
        check("VGG-16 batch 1: efficiency at 3-5x", pick(1, "uniform"), "efficiency", 0.8),
        check("VGG-16 batch 64 same actions: efficiency at 3-5x", pick(64, "uniform"), "efficiency", 0.8),
        check("VGG-16 batch 64 mixed actions: efficiency at 3-5x", pick(64, "mixed"), "efficiency", 0.6),
        check("VGG-16 batch 1: agent overhead (of the full model's time)", b1, "agent_overhead", 0.03,
              worst=max, higher_is_better=False),
        check("VGG-16 batch 64: agent overhead (of the full model's time)", b64, "agent_overhead", 0.03,
              worst=max, higher_is_better=False),
        check("VGG-16: engine peak memory / full model's", vgg, "memory_ratio", 1.2,
              worst=max, higher_is_better=False),
        check("ResNet-50 batch 1: efficiency at 2-3x", pick(1, "uniform", 1.7, 3.5, "resnet50"), "efficiency", 0.8),
        check("ResNet-50 batch 64: efficiency at 2-3x", pick(64, "uniform", 1.7, 3.5, "resnet50"), "efficiency", 0.8),
        check("ResNet-50: agent overhead (of the full model's time)", pick(1, "uniform", 0, 99, "resnet50")
              + pick(64, "uniform", 0, 99, "resnet50"), "agent_overhead", 0.03, worst=max, higher_is_better=False),
        check("MobileNetV2 batch 1: agent overhead (of the full model's time)", pick(1, "uniform", 0, 99, "mobilenet_v2"),
              "agent_overhead", 0.05, worst=max, higher_is_better=False),
    ]


# ------------------------------------------------------------------ outputs
TABLE_COLUMNS = [
    "model", "size", "batch", "mode", "target", "theoretical", "full ms", "rnp ms",
    "measured", "paired", "best-of", "efficiency", "no-agent", "agent %", "agent in engine %", "peak MB full", "peak MB rnp", "mem ratio",
]


def table_rows(rows):
    """Rows of the Markdown table (rounded, short column names)."""

    def rnd(v, digits):
        return None if v is None else round(float(v), digits)

    out = []
    for r in rows:
        out.append(
            {
                "model": r["model"],
                "size": r["image_size"],
                "batch": r["batch_size"],
                "mode": r["mode"],
                "target": f"{r['target_speedup']:g}x",
                "theoretical": f"{r['theoretical_speedup']:.2f}x",
                "full ms": rnd(r["full_ms"], 1),
                "rnp ms": rnd(r["rnp_ms"], 1),
                "measured": f"{r['measured_speedup']:.2f}x",
                "paired": f"{r['paired_speedup']:.2f}x",
                "best-of": f"{r['min_speedup']:.2f}x",
                "efficiency": rnd(r["efficiency"], 2),
                "no-agent": None if r["no_agent_speedup"] is None else f"{r['no_agent_speedup']:.2f}x",
                "agent %": rnd(100 * r["agent_overhead"], 1),
                "agent in engine %": None if r["agent_in_engine"] is None else rnd(100 * r["agent_in_engine"], 1),
                "peak MB full": rnd(r["full_peak_rss_mb"], 0),
                "peak MB rnp": rnd(r["rnp_peak_rss_mb"], 0),
                "mem ratio": rnd(r["memory_ratio"], 2),
            }
        )
    return out


def _weights_setting(constant_weights):
    """How the report names the batch-1 weights setting."""
    if constant_weights == "auto":
        from rnp_tf import engine as engine_lib

        limit = engine_lib.CONSTANT_WEIGHTS_LIMIT / 2**20
        return f"graph constants for backbones with at most {limit:g} MB of conv kernels, else variables (`auto`)"
    return "graph constants" if constant_weights else "variables"


def format_markdown(result):
    """The Markdown report: command, machine, table, targets, method."""
    from rnp_tf import report

    m = result["machine"]
    c = result["config"]
    memory = "" if m["memory_gb"] is None else f"{m['memory_gb']:.0f} GiB, "
    lines = [
        "# Latency: InferenceEngine against the full model",
        "",
        f"Command: `{result['command'] or 'python -m bench.latency'}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {memory}"
        f"{m['platform']}, Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
        f"{m['gpus']} GPU(s); load average at the end {m['load_average']}  ",
        f"Settings: median of {c['repeats']} interleaved rounds after {c['warmup']} warm-up calls; "
        f"weight cache `{c['weight_cache']}`; batch-1 weights as "
        f"{_weights_setting(c.get('constant_weights', False))}; float32; random weights.",
        "",
        report.format_table(table_rows(result["rows"]), TABLE_COLUMNS),
        "",
        "Columns: *theoretical* = full MACs / mean MACs of the forced actions (backbone: stem, "
        "prunable convs, head); *measured* = full ms / rnp ms; *efficiency* = measured / "
        "theoretical; *paired* = median over rounds of the two samples' ratio in the same round (cancels load that drifts between rounds); *best-of* = fastest full sample / fastest rnp sample (least disturbed by other processes); *no-agent* = speed-up of the engine without the agent; *agent %* = the "
        "agent alone (pooling, encoders, LSTM, decoders, argmax; minus the fixed cost of a "
        "tf.function call) as a share of the full model's time; *agent in engine %* = (rnp ms - "
        "no-agent ms) / full ms, the same cost seen from the outside (noisier, can be "
        "negative); *peak MB* = peak RSS of a fresh process holding the Keras model and the "
        "runner (see the module docstring of `bench/latency.py`).",
        "",
        "## Targets (224x224 rows)",
        "",
    ]
    for target in result["targets"]:
        if target["met"] is None:
            status = "not evaluated (no matching rows)"
        else:
            status = f"{'met' if target['met'] else 'MISSED'}: worst {target['value']:.3g} over {target['points']} point(s)"
            if target.get("value_paired") is not None:
                status += f" (paired estimate: worst {target['value_paired']:.3g})"
        lines.append(f"- {target['name']} (threshold {target['threshold']:g}): {status}")
    paper = result["paper_gpu"]
    pairs = ", ".join(f"{t:g}x -> {s:g}x" for t, s in zip(paper["theoretical"], paper["measured"]))
    lines += ["", f"Paper ({paper['source']}): theoretical -> measured {pairs}.", ""]
    return "\n".join(lines)


def plot_speedups(result, path):
    """Measured against theoretical speed-up, ideal line, the paper's GPU points."""
    from rnp_tf import report

    rows = result["rows"]
    fig = report._new_figure((6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    top = max([r["theoretical_speedup"] for r in rows] + [10.0]) * 1.05
    ax.plot([1, top], [1, top], color="grey", linestyle="--", label="ideal (measured = theoretical)")
    paper = result["paper_gpu"]
    ax.plot(paper["theoretical"], paper["measured"], marker="*", markersize=12, linestyle=":",
            color="black", label="paper, VGG-16 GPU batch 64")
    series = {}
    for r in rows:
        key = f"{r['model']} {r['image_size']}px b{r['batch_size']} {r['mode']}"
        series.setdefault(key, []).append((r["theoretical_speedup"], r["measured_speedup"]))
    timing.draw_speedups(ax, series, "InferenceEngine vs full model (CPU)")
    fig.tight_layout()
    return report._save_figure(fig, path)


def write_outputs(result, output_dir):
    """Writes latency.json, latency.md and latency.png; returns their paths."""
    return timing.write_outputs(result, output_dir, "latency", format_markdown, plot_speedups)


def run_stages(config, output):
    """`--stages`: `stage_times` at batch 1 for every model; writes latency_stages.json."""
    from rnp_tf import engine as engine_lib
    from rnp_tf import io_utils

    result = {"benchmark": "latency_stages", "command": "python -m bench.latency " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "models": {}}
    for name in config["models"]:
        model = build_model(name, config)
        points = operating_points(model, sorted(set([1.0] + config["targets"])), seed=config["seed"])
        stages = stage_times(model, engine_lib.InferenceEngine(model), points, config)
        result["models"][name] = stages
        full = stages["points"][0]["total_ms"]
        for p in stages["points"]:
            print(f"{name} b1 {p['theoretical_speedup']:.2f}x: stages {p['total_ms']:.1f} ms ({full / p['total_ms']:.2f}x): "
                  f"stem {p['stem_ms']:.1f}, convs {p['conv_ms']:.1f} (ideal {p['conv_ideal_ms']:.1f}), "
                  f"pools {p['pool_ms']:.1f}, sums {p['add_ms']:.1f}, head {p['head_ms']:.1f}", flush=True)
    result["machine"] = machine_info()
    io_utils.write_json(output / "latency_stages.json", result)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = default_config(
            quick=FLAGS.quick,
            **{
                name: getattr(FLAGS, name)
                for name in (
                    "models", "batch_sizes", "targets", "repeats", "warmup", "min_sample_seconds",
                    "vgg_size", "weight_cache", "constant_weights", "memory", "no_agent_variant", "seed", "skips",
                    "per_stage",
                )
                if not FLAGS.quick or FLAGS[name].present
            },
        )
    except ValueError as e:
        raise app.UsageError(str(e))
    from rnp_tf import io_utils

    files = ["latency_stages.json"] if FLAGS.stages else ["latency.json"]
    try:
        output = timing.smoke_output(FLAGS.output, FLAGS["output"].present, FLAGS.quick, files)
    except ValueError as e:
        raise app.UsageError(str(e))
    if FLAGS.quick:
        print(f"bench.latency --quick writes to {output}", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    if FLAGS.stages:
        run_stages(config, output)
        return
    result = run_benchmark(
        config,
        log=lambda line: print(line, flush=True),
        progress=lambda partial: io_utils.write_json(output / "latency.json", partial),
    )
    paths = write_outputs(result, output)
    print(format_markdown(result))
    print(json.dumps(paths))


if __name__ == "__main__":
    define_flags()
    app.run(main)
