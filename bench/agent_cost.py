"""Where the decision agent's time goes in the inference engine: `python -m bench.agent_cost`.

For each model (random weights, `bench.latency.build_model`) and batch size,
at full width (every action `k`, so every decision pools its largest map),
times interleaved in one process (`bench.timing.measure`, median of
`--repeats` rounds):

- `full`: the dense network (`rnp_tf.engine.DenseRunner`), the reference;
- `agent`: the agent alone as the engine runs it (`InferenceEngine.agent_step`
  for every decision and the greedy argmax, `bench.latency.agent_alone_function`);
- `agent_before`: the same work as the engine did it before this benchmark
  was written (commit 3a24e73): the spatial mean as a batched
  matrix-vector product (`matvec_spatial_mean`, kept here as the baseline),
  then `DecisionAgent.decide` and the argmax (`before_agent_step`), on the
  same inputs;
- `pool`: only the pooling of every decision's map (`InferenceEngine.pooled`);
- `decide`: only the agent's equations and the argmax, on given pooled
  vectors (`DecisionAgent.decide`);
- `decide_xla`: the same with every decision compiled by XLA
  (`tf.function(jit_compile=True)`), one compiled call per decision as the
  engine would make it (decisions are interleaved with convolutions);
- `per_stage`: pooling and deciding once per stage (at the largest map of
  each stage: `stage_decisions`), an upper estimate of what a structural
  change to per-stage decisions would cost (the engine does not offer it);
- `call`, `call_maps`, `call_pooled`: empty `tf.function`s taking the same
  inputs as the parts (the fixed cost of a call, subtracted from each).

Each part is reported in ms (after subtracting its call's fixed cost) and
as a share of the full model's time. Absolute times on a shared machine
drift; the shares and the before/after ratio are measured in the same
rounds.

Usage:

    python -m bench.agent_cost                      # ResNet-50 and VGG-16, batch 1 and 64
    python -m bench.agent_cost --models=resnet50 --batch_sizes=1 --repeats=3
    python -m bench.agent_cost --quick              # CIFAR CNN, batch 1 and 8; writes nothing
"""

import datetime
import json
import statistics
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
MODELS = ("resnet50", "vgg16", "cifar_cnn")
PARTS = ("agent", "agent_before", "pool", "pool_before", "decide", "decide_xla", "per_stage")


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags (only when run as a script)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "Smoke run: CIFAR CNN, batch 1 and 8, 2 repeats; writes nothing.", **fv)
    flags.DEFINE_string("output", "bench/results", "Directory of agent_cost.json / .md.", **fv)
    flags.DEFINE_list("models", ["resnet50", "vgg16"], f"Models: {', '.join(MODELS)}.", **fv)
    flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes.", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed rounds (the median is reported).", lower_bound=1, **fv)
    flags.DEFINE_integer("warmup", 2, "Untimed calls of each function first.", lower_bound=0, **fv)
    flags.DEFINE_float("min_sample_seconds", 0.2, "Fast calls are repeated until a sample lasts this long.", **fv)
    flags.DEFINE_integer("vgg_size", 224, "Input resolution of VGG-16 and ResNet-50.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights and inputs.", **fv)


def matvec_spatial_mean(h):
    """The spatial mean as the engine computed it before: a batched matrix-vector product (the baseline)."""
    import tensorflow as tf

    batch = tf.shape(h)[0]
    positions = h.shape[1] * h.shape[2]
    weights = tf.fill(tf.stack([batch, 1, positions]), 1.0 / positions)
    flat = tf.reshape(h, tf.stack([batch, positions, tf.shape(h)[3]]))
    return tf.matmul(weights, flat)[:, 0, :]


def before_agent_step(engine):
    """`InferenceEngine.agent_step` as it was before (commit 3a24e73): the matrix-vector spatial mean, then `decide`."""
    import tensorflow as tf

    from rnp_tf import rollout as rollout_lib

    def agent_step(t, pieces, state, identity=False):
        channels = engine.plan.feature_channels[t]
        pooled = [rollout_lib.pad_channels(matvec_spatial_mean(features), channels) for features, _ in pieces]
        if not (identity and len(pieces) == 1):
            pooled = [tf.dynamic_stitch([ids for _, ids in pieces], pooled)]
        return engine.model.agent.decide(t, pooled[0], state)

    return agent_step


def stage_decisions(model):
    """One decision per stage, the costliest to pool: the largest map of each run of maps sharing their height and width.

    An upper bound of what deciding once per stage would pool (a stage's
    own input, e.g. ResNet's block input before a strided block, is never
    larger than its largest map).
    """
    from bench import latency

    shapes = [shape for shape, _ in latency._feeding_shapes(model)]
    chosen, start = [], 0
    for t in range(1, len(shapes) + 1):
        if t == len(shapes) or shapes[t][:2] != shapes[start][:2]:
            run = range(start, t)
            chosen.append(max(run, key=lambda i: shapes[i][2]))
            start = t
    return chosen


def part_functions(engine, batch_size, seed=0):
    """Zero-argument callables for every part timed (see the module docstring).

    Args:
        engine: an `rnp_tf.engine.InferenceEngine`.
        batch_size: positive int.
        seed: seed of the random feature maps.

    Returns:
        `(fns, baselines)`: `fns` maps each name of `PARTS` and each
        baseline (`call`, `call_maps`, `call_pooled`: empty functions taking
        the same inputs) to a callable; `baselines` maps each part to the
        name of the baseline to subtract.

    Example:

    >>> fns, baselines = part_functions(InferenceEngine(model), 1)
    >>> baselines["pool"]
    'call_maps'
    """
    import numpy as np
    import tensorflow as tf

    import rnp_tf
    from bench import latency

    model = engine.model
    network = model.agent
    actions = np.full([batch_size, model.num_prunable], model.groups, np.int32)
    tf.random.set_seed(seed)  # the same random maps for both
    agent, call = latency.agent_alone_function(engine, actions)
    tf.random.set_seed(seed)
    agent_before, _ = latency.agent_alone_function(engine, actions, before_agent_step(engine))
    maps = [tf.random.normal([batch_size, *shape]) for shape, _ in latency._feeding_shapes(model)]
    pooled_inputs = [tf.random.normal([batch_size, c]) for c in model.plan.feature_channels]

    @tf.function(autograph=False)
    def pool(maps):
        return [engine.pooled(t, [(h, None)], identity=True) for t, h in enumerate(maps)]

    @tf.function(autograph=False)
    def pool_before(maps):
        return [matvec_spatial_mean(h) for h in maps]

    def decisions(pooled, step, which):
        state = network.initial_state(batch_size)
        chosen = []
        for t in which:
            q, state = step(t, pooled[t], state)
            chosen.append(rnp_tf.greedy_actions(q))
        return tf.stack(chosen, axis=1)

    every = range(model.num_prunable)
    per_stage_decisions = stage_decisions(model)
    compiled = [
        tf.function(lambda p, h, c, t=t: network.decide(t, p, [h, c]), autograph=False, jit_compile=True)
        for t in every
    ]
    decide = tf.function(lambda pooled: decisions(pooled, network.decide, every), autograph=False)
    decide_xla = tf.function(
        lambda pooled: decisions(pooled, lambda t, p, s: compiled[t](p, *s), every), autograph=False
    )

    @tf.function(autograph=False)
    def per_stage(maps):
        pooled = {t: engine.pooled(t, [(maps[t], None)], identity=True) for t in per_stage_decisions}
        return decisions(pooled, network.decide, per_stage_decisions)

    @tf.function(autograph=False)
    def empty(inputs):
        return tf.constant(0, tf.int32)

    fns = {
        "agent": agent,
        "agent_before": agent_before,
        "pool": lambda: pool(maps),
        "pool_before": lambda: pool_before(maps),
        "decide": lambda: decide(pooled_inputs),
        "decide_xla": lambda: decide_xla(pooled_inputs),
        "per_stage": lambda: per_stage(maps),
        "call": call,
        "call_maps": lambda: empty(maps),
        "call_pooled": lambda: empty(pooled_inputs),
    }
    baselines = {"agent": "call", "agent_before": "call", "pool": "call_maps", "pool_before": "call_maps", "decide": "call_pooled",
                 "decide_xla": "call_pooled", "per_stage": "call_maps"}
    return fns, baselines


def measure_point(name, batch_size, config):
    """Times every part for one model and batch size; returns a result row."""
    import tensorflow as tf

    from bench import latency
    from bench import timing
    from rnp_tf import engine as engine_lib

    model = latency.build_model(name, config)
    engine = engine_lib.InferenceEngine(model)
    full = engine_lib.DenseRunner(model)
    x = tf.random.normal([batch_size, *model.image_shape], seed=config["seed"])
    parts, baselines = part_functions(engine, batch_size, config["seed"])
    fns = {"full": lambda: full(x), **parts}
    times = timing.measure(
        fns, repeats=config["repeats"], warmup=config["warmup"],
        min_sample_seconds=config["min_sample_seconds"], seed=config["seed"],
    )
    median = {key: 1e3 * value["median_s"] for key, value in times.items()}
    row = {"model": name, "batch_size": batch_size, "decisions": model.num_prunable,
           "full_ms": median["full"], "call_ms": median["call"]}
    for part in PARTS:
        ms = max(median[part] - median[baselines[part]], 0.0)
        row[f"{part}_ms"] = ms
        row[f"{part}_share"] = ms / median["full"]
    row["after_over_before"] = row["agent_ms"] / row["agent_before_ms"] if row["agent_before_ms"] else None
    row["pool_after_over_before"] = row["pool_ms"] / row["pool_before_ms"] if row["pool_before_ms"] else None
    # the same ratios per round (both timed in that round), their median: load that drifts cancels
    for key, (after, before, base) in {"paired_after_over_before": ("agent", "agent_before", "call"),
                                       "paired_pool_after_over_before": ("pool", "pool_before", "call_maps")}.items():
        ratios = [(a - c) / (b - c) for a, b, c in zip(*(times[n]["samples_s"] for n in (after, before, base))) if b > c]
        row[key] = float(statistics.median(ratios)) if ratios else None
    row["samples_ms"] = {key: [1e3 * s for s in value["samples_s"]] for key, value in times.items()}
    return row


def format_markdown(result):
    """The report: one row per model and batch size."""
    lines = [
        "# The decision agent's share of inference time",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {result['machine']}  ",
        f"Settings: median of {result['config']['repeats']} interleaved rounds after "
        f"{result['config']['warmup']} warm-up calls, full width (every action k), float32, random weights.",
        "",
        "| model | batch | decisions | full ms | agent ms (%) | agent before ms (%) | after / before (paired) "
        "| pool ms (%) | pool before ms (%) | pool after / before (paired) | decide ms (%) | decide XLA ms (%) "
        "| per stage ms (%) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        def cell(part):
            return f"{r[part + '_ms']:.2f} ({100 * r[part + '_share']:.1f}%)"

        def ratio(key):
            paired = r["paired_" + key]
            return "" if r[key] is None else f"{r[key]:.2f}" + ("" if paired is None else f" ({paired:.2f})")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['decisions']} | {r['full_ms']:.1f} | {cell('agent')} | "
            f"{cell('agent_before')} | {ratio('after_over_before')} | {cell('pool')} | {cell('pool_before')} | "
            f"{ratio('pool_after_over_before')} | {cell('decide')} | {cell('decide_xla')} | "
            f"{cell('per_stage')} |"
        )
    lines += [
        "",
        "*agent* = pooling, the agent's equations and the argmax for every decision as the engine runs "
        "them; *agent before* = the same with the engine's earlier spatial mean (a batched "
        "matrix-vector product); *pool* = the pooling alone (*pool before*: with the earlier spatial mean); *(paired)* = median over rounds of the ratio measured in each round; *decide* = the equations and the argmax "
        "alone; *decide XLA* = the same, each decision compiled by XLA; *per stage* = pooling and "
        "deciding once per stage, at its largest map (an upper estimate of per-stage decisions). Every time is net of the fixed cost of a call with the same inputs; % = of the full "
        "model's time.",
    ]
    return "\n".join(lines)


def run(config, log=print):
    """Runs every (model, batch size); returns the result dict."""
    from bench import latency

    rows = []
    for name in config["models"]:
        for batch_size in config["batch_sizes"]:
            row = measure_point(name, batch_size, config)
            log(f"{name} b{batch_size}: full {row['full_ms']:.1f} ms, agent {100 * row['agent_share']:.2f}% "
                f"(before {100 * row['agent_before_share']:.2f}%), pool {100 * row['pool_share']:.2f}%, "
                f"decide {100 * row['decide_share']:.2f}%")
            rows.append(row)
    machine = latency.machine_info()
    return {
        "benchmark": "agent_cost",
        "command": "python -m bench.agent_cost " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "machine": f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average']}",
        "machine_info": machine,
        "rows": rows,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in FLAGS.models:
        if name not in MODELS:
            raise app.UsageError(f"Unknown model. Expected some of {MODELS}. Received: models={FLAGS.models}")
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        raise app.UsageError(f"`batch_sizes` must be ints. Received: {FLAGS.batch_sizes}")
    if any(b < 1 for b in batch_sizes):
        raise app.UsageError(f"`batch_sizes` must be positive. Received: {FLAGS.batch_sizes}")
    config = {
        "quick": FLAGS.quick, "models": FLAGS.models, "batch_sizes": batch_sizes, "repeats": FLAGS.repeats,
        "warmup": FLAGS.warmup, "min_sample_seconds": FLAGS.min_sample_seconds, "vgg_size": FLAGS.vgg_size,
        "seed": FLAGS.seed,
    }
    if FLAGS.quick:
        quick = {"models": ["cifar_cnn"], "batch_sizes": [1, 8], "repeats": 2, "warmup": 1, "min_sample_seconds": 0.0}
        config.update({key: value for key, value in quick.items() if not FLAGS[key].present})
    result = run(config, log=lambda line: print(line, flush=True))
    print(format_markdown(result))
    if not FLAGS.quick:
        from bench import timing

        print(json.dumps(timing.write_outputs(result, FLAGS.output, "agent_cost", format_markdown)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
