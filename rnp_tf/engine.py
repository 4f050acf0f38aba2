"""Inference execution that computes only what the agent chose.

`RNPModel.rollout` (the training path) *masks* pruned channels: it computes
every convolution in full and multiplies by zero, so it is never faster than
the unpruned network. `InferenceEngine` runs the same network for inference
and really skips the work:

- every prunable convolution runs on the BatchNorm-folded weight prefix
  `W[:, :, :in_prefix, :out_prefix]` chosen by the previous and the current
  action, and the pooling, the agent and the next layer work on the narrow
  tensor (nothing is zero-padded back to full width);
- **batch 1**: the branch, one of the `k * k` (previous action, action)
  pairs, is chosen inside the graph with `tf.switch_case`;
- **batch N**: samples are bucketed by their current width and, inside a
  bucket, sorted by the next action, so that every (previous action, action)
  group is a zero-copy slice of one tensor and runs one convolution on its
  weight slice. A bucket is copied at most twice per layer (a concat when
  several buckets merge, a gather when it is not already in order); when
  every sample of the batch takes the same action nothing is copied at all
  and the whole batch runs one convolution. Empty groups are skipped
  (`tf.cond`), which also keeps oneDNN's empty-batch convolution bug away.
- The agent (pooling, encoders, LSTM, decoders) runs inside the same graph on
  the narrow features; its cost counts in every timing.
- Both paths are executors of the one rollout (`rnp_tf.rollout`): the
  engine supplies how a step is computed (`SwitchExecutor` for batch 1,
  `BucketedExecutor` for batch N), the rollout walks the plan and asks the
  policy for the actions. Greedy choices
  follow the model's inference policy: Q-values re-priced to the run-time
  penalty, then masked by the per-image MAC cap.

Its outputs equal the masked path's (`model.rollout`) up to float rounding:
the same actions and logits within 1e-4.

The folded weights are computed once when the engine is built; call
`refresh()` after the model's weights change (e.g. after training), or
`sync()`, which folds them again only if they changed. The batch-1
graphs hold the agent's weights as graph constants (a decision's small
matmuls then read no variable) and are traced again after a refresh; with
`constant_weights=True` (by default for backbones with at most 32 MB of
conv kernels, such as MobileNetV2) they hold the folded conv weights that
way too (faster, more memory while the graph is optimised).

`RNPModel.predict` and `RNPModel.predict_details` run through an engine by
default (see `RNPModel(inference_engine=...)`).
"""

import numbers

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import agent as agent_lib
from rnp_tf import rollout as rollout_lib
from rnp_tf import validation
from rnp_tf.layers import GatedDepthwiseConv2D

WEIGHT_CACHES = ("pairs", "sets")
CONSTANT_WEIGHTS_LIMIT = 32 * 2**20
"""Bytes of conv kernels up to which `constant_weights="auto"` makes the batch-1 weights graph constants."""


def constant_weights_for(model, constant_weights="auto"):
    """Whether the batch-1 graphs of `model`'s runners hold the folded conv weights as graph constants.

    Args:
        model: the `RNPModel`.
        constant_weights: True, False, or `"auto"`: True when the
            backbone's conv kernels take at most `CONSTANT_WEIGHTS_LIMIT`
            bytes (MobileNetV2: 8.9 MB, the CIFAR CNN; not ResNet-50's 94
            MB or VGG-16's 59 MB, whose constant graphs peak at several GB
            while they are optimised).

    Returns:
        A bool.

    Example:

    >>> constant_weights_for(model)  # a MobileNetV2: True
    True
    """
    if isinstance(constant_weights, str) and constant_weights == "auto":
        folded_bytes = sum(4 * int(np.prod(conv.kernel.shape)) for conv in model.plan.convs)  # float32
        return folded_bytes <= CONSTANT_WEIGHTS_LIMIT
    if not isinstance(constant_weights, bool):
        raise ValueError(
            f"`constant_weights` must be True, False or 'auto'. Received: constant_weights={constant_weights!r}"
        )
    return constant_weights


def _check_model(model):
    plan = getattr(model, "plan", None)
    if plan is None or not hasattr(model, "agent"):
        raise ValueError(
            f"`model` must be an rnp_tf.RNPModel. Received: model={type(model).__name__}"
        )


def map_op(layer, h):
    """The Keras layer's operation on any channel width (pooling; zero padding)."""
    if isinstance(layer, keras.layers.ZeroPadding2D):
        return layer(h)
    pool = tf.nn.max_pool2d if isinstance(layer, keras.layers.MaxPooling2D) else tf.nn.avg_pool2d
    return pool(h, ksize=layer.pool_size, strides=layer.strides, padding=layer.padding.upper())


def conv_op(layer, h, kernel, bias):
    """`activation(conv(h, kernel) + bias)`: a fused Conv2D+BiasAdd+ReLU (depthwise for a `GatedDepthwiseConv2D`)."""
    if isinstance(layer, GatedDepthwiseConv2D):
        strides = [1, layer.strides, layer.strides, 1]
        y = tf.nn.depthwise_conv2d(h, kernel, strides=strides, padding=layer.padding.upper())
    else:
        y = tf.nn.conv2d(h, kernel, strides=layer.strides, padding=layer.padding.upper())
    return layer.activation(tf.nn.bias_add(y, bias))


def _read(weights, constant):
    """`weights` (a tuple of variables) as they are, or as graph constants of their current values."""
    if not constant:
        return weights
    with tf.init_scope():  # read eagerly, also while a graph is traced
        values = [w.numpy() for w in weights]
    return tuple(tf.constant(value) for value in values)


class _Piece:
    """Samples that share their current width: features, sample ids, width."""

    __slots__ = ("x", "idx", "width")

    def __init__(self, x, idx, width):
        self.x, self.idx, self.width = x, idx, width


class _FoldedWeights:
    """BN-folded weights of one model, stored once in non-trainable variables.

    `pairs[(t, p, a)]`: decided conv `t` after previous action `p` with
    action `a`; `kept[(name, p)]`: a conv with no decision of its own (the
    stem, a residual block's last conv, a projection: full output; a
    depthwise conv: the input's prefix) after previous action `p` (`k`
    when its input has full width).
    """

    def __init__(self, model, pairs):
        self.model = model
        k = model.groups
        self.kept = {}
        for step in model.plan.conv_steps():
            if step.decision is None:
                for p in (range(1, k + 1) if step.in_ref is not None else (k,)):
                    self.kept[(step.layer.name, p)] = self._variables(
                        *step.layer.folded_weights(p, k), f"{step.layer.name}_{p}"
                    )
        self.stem = self.kept[(model.stem.name, k)]
        self.pairs = {}
        if pairs is None:
            return
        for t, layer in enumerate(model.prunable):
            for p, a in pairs(t):
                name = f"{layer.name}_{p}_{a}"
                self.pairs[(t, p, a)] = self._variables(*layer.folded_weights(p, a), name)

    @staticmethod
    def _variables(kernel, bias, name):
        return (
            tf.Variable(tf.cast(kernel, tf.float32), trainable=False, name=f"{name}_kernel"),
            tf.Variable(tf.cast(bias, tf.float32), trainable=False, name=f"{name}_bias"),
        )

    def assign(self):
        k = self.model.groups
        layers = {conv.name: conv for conv in self.model.plan.convs}
        for (name, p), variables in self.kept.items():
            for var, value in zip(variables, layers[name].folded_weights(p, k)):
                var.assign(tf.cast(value, tf.float32))
        for (t, p, a), variables in self.pairs.items():
            values = self.model.prunable[t].folded_weights(p, a)
            for var, value in zip(variables, values):
                var.assign(tf.cast(value, tf.float32))


class InferenceEngine:
    """Runs an `RNPModel` computing only the channel groups that are used.

    Greedy policy (the agent decides, as `model.rollout(x)`, including the
    run-time knobs `model.set_penalty` / `set_budget` (read at every call)
    and `model.set_compute_cap` (a new cap retraces)) or forced actions (as
    `model.rollout(x, actions=...)`), float32, compiled with `tf.function`:
    one graph for batch 1 and one, with a dynamic batch size, for every
    other batch size, per mode. Chains (the CIFAR CNN, VGG-16) and residual
    networks: a bottleneck prunes its inner width, its last conv and its
    shortcut keep their full width; an inverted residual (MobileNetV2)
    prunes its expansion, runs its depthwise conv on that prefix and its
    projection on the narrow input.

    Args:
        model: a built `rnp_tf.RNPModel`.
        weight_cache: `"pairs"` (default) stores the folded kernel of every
            (previous action, action) pair of every prunable conv: fastest,
            `(k + 1)^2 / 4` times the conv weights in memory (6.25x for
            k = 4). `"sets"` stores one folded kernel per previous action
            (the input prefix, all outputs; `(k + 1) / 2` times the conv
            weights) and slices the output prefix at every call, which
            copies the kernel slice (slower at batch 1, same at large
            batches).
        control_flow: if True (default) empty groups are skipped and
            buckets already in place are not copied, using `tf.cond` /
            `tf.switch_case`. If False the batch path has no conditionals
            (every group is gathered and convolved, an empty group padded to
            one zero sample because of oneDNN's empty-batch bug, then sliced
            back), batch 1 included: slower, for exporters that reject
            convolutions inside conditionals.
        constant_weights: if True the batch-1 graphs hold the folded
            conv weights as graph constants (they always hold the agent's:
            `rnp_tf.agent.ConstantDecisions`), which lets oneDNN keep its
            reordered filters between calls instead of reordering them at
            every call: 14-23% less time per image on ResNet-50,
            MobileNetV2 and VGG-16 at batch 1, but 3-4.5x the peak memory
            (ResNet-50: 6.9 GB against 1.5 GB) while the graph is built
            and optimised, and `refresh()` retraces it
            (`docs/results/speed.md`). False: the weights stay in
            variables. `"auto"` (default): True for a backbone whose conv
            kernels take at most 32 MB (`constant_weights_for`: MobileNetV2,
            where the engine at 2x then runs 1.21x-1.30x its full network's
            speed instead of 1.02x), False for larger ones (ResNet-50,
            VGG-16).
            The batch-N graphs always read variables.

    Call arguments:
        x: float images `(batch, height, width, channels)`.
        actions: optional int `[batch, num_prunable]` forced actions in
            `1..k`. None (default): the agent chooses greedily.
        run_agent: whether the agent runs. Defaults to True without forced
            actions and False with them; `True` with forced actions runs the
            agent anyway (its Q-values are returned, its choices ignored,
            and every layer waits for its decision as under a real policy),
            which is how the latency benchmark times "the agent chose these
            actions".

    Returns:
        A dict of tensors: `logits` float32 `[batch, num_classes]`,
        `actions` int32 `[batch, num_prunable]`, `macs` float32 `[batch]`
        (backbone MACs per image, as `model.macs`) and `q_values` float32
        `[batch, num_prunable, k]` (None when the agent did not run).

    Example:

    >>> model = rnp_tf.RNPModel(rnp_tf.cifar_cnn(), image_shape=(32, 32, 3),
    ...                         num_classes=10)
    >>> engine = InferenceEngine(model)
    >>> out = engine(x_test[:64])                       # greedy actions
    >>> out = engine(x_test[:1], actions=[[1, 2, 4]])   # forced actions
    >>> out["logits"].shape, out["actions"].shape
    (TensorShape([1, 10]), TensorShape([1, 3]))
    >>> # ... after training the model further:
    >>> engine.refresh()
    """

    def __init__(self, model, weight_cache="pairs", control_flow=True, constant_weights="auto"):
        _check_model(model)
        if weight_cache not in WEIGHT_CACHES:
            raise ValueError(
                f"`weight_cache` must be one of {WEIGHT_CACHES}. "
                f"Received: weight_cache={weight_cache!r}"
            )
        validation.check_bool("control_flow", control_flow)
        self.model = model
        self.plan = model.plan
        self.groups = model.groups
        self.constant_weights = constant_weights_for(model, constant_weights)
        self.num_prunable = model.num_prunable
        self.weight_cache = weight_cache
        self.control_flow = control_flow
        k = self.groups
        if weight_cache == "pairs":
            pairs = lambda t: [(p, a) for p in self.previous_actions(t) for a in range(1, k + 1)]  # noqa: E731
        else:
            pairs = lambda t: [(p, k) for p in self.previous_actions(t)]  # noqa: E731
        self._weights = _FoldedWeights(model, pairs)
        self._functions = {}
        self._fingerprint = tf.function(self._weights_fingerprint, autograph=False)
        self._folded_fingerprint = self._fingerprint().numpy()

    # ------------------------------------------------------------ public
    def refresh(self):
        """Folds the model's current weights again (after they changed).

        The batch-N graphs read the cached weights from variables; the
        batch-1 graphs hold the agent's weights (and, with
        `constant_weights=True`, the folded ones) as constants and are
        traced again at their next call.
        """
        self._weights.assign()
        self._folded_fingerprint = self._fingerprint().numpy()
        self._functions = {key: fn for key, fn in self._functions.items() if not key[0]}

    def sync(self):
        """Refreshes the folded weights only if the model's weights changed.

        Compares a fingerprint of every weight that the folding reads (per
        conv: the kernel's sums per output and per input channel, the
        BatchNorm parameters and statistics or the bias; and the agent's
        weights, which the batch-1 graphs hold) with the one taken when the
        weights were last folded. Much cheaper than `refresh()`: two
        reductions over the conv kernels, nothing written (VGG-16 on 2
        shared cores: 17 ms against 534 ms). `RNPModel.predict` calls it
        once per call.

        Returns:
            True if the weights were folded again.
        """
        current = self._fingerprint().numpy()
        if np.array_equal(current, self._folded_fingerprint, equal_nan=True):
            return False
        self.refresh()
        return True

    def _weights_fingerprint(self):
        parts = []
        for conv in self.plan.convs:
            kernel = tf.convert_to_tensor(conv.kernel)
            parts += [tf.reduce_sum(kernel, [0, 1, 2]), tf.reduce_sum(kernel, [0, 1, 3])]
            names = ("gamma", "beta", "moving_mean", "moving_variance") if conv.normalization else ("bias",)
            parts += [tf.reshape(tf.convert_to_tensor(getattr(conv, name)), [-1]) for name in names]
        for weight in self.model.agent.weights:  # the batch-1 graphs hold them as constants
            value = tf.convert_to_tensor(weight)
            parts += [value] if len(value.shape) == 1 else [tf.reduce_sum(value, 0), tf.reduce_sum(value, 1)]
        return tf.concat([tf.cast(part, tf.float32) for part in parts], 0)

    def logits(self, x):
        """Greedy logits of a batch of any size; traceable.

        Unlike `__call__`, this also works inside a `tf.function` whose batch
        size is unknown, as in Keras's `predict_step`: a static batch of one
        takes the batch-1 graph, an unknown batch size the batch-N graph
        (correct for every size, one image included). The batch-1 graph is
        not chosen at run time with a `tf.cond`: nested in a conditional,
        its static batch of one was trusted by the graph optimiser and the
        reshapes inside it failed on larger batches (TF 2.21).

        Args:
            x: float images `(batch, height, width, channels)`, batch >= 1.

        Returns:
            float32 logits `[batch, num_classes]`.
        """
        x = tf.cast(x, tf.float32)
        return self._compiled(x.shape[0] == 1, False, True)(x)["logits"]

    def __call__(self, x, actions=None, run_agent=None):
        x = validation.check_images(x, self.model.image_shape)
        x = tf.cast(x, tf.float32)
        if actions is not None:
            actions = validation.check_actions(
                actions, x.shape[0], self.num_prunable, self.groups, self.plan.skip_columns
            )
        if x.shape[0] == 0:  # nothing to decide or compute (oneDNN would also mis-shape an empty conv)
            return {
                "logits": tf.zeros([0, self.model.num_classes], tf.float32),
                "actions": tf.zeros([0, self.num_prunable], tf.int32),
                "macs": tf.zeros([0], tf.float32),
                "q_values": tf.zeros([0, self.num_prunable, self.plan.q_width], tf.float32) if actions is None else None,
            }
        if run_agent is None:
            run_agent = actions is None
        if not isinstance(run_agent, bool):
            raise ValueError(f"`run_agent` must be a bool or None. Received: run_agent={run_agent!r}")
        if actions is None and not run_agent:
            raise ValueError(
                "Without forced `actions` the agent must choose them: "
                "run_agent=False needs actions. Received: actions=None, run_agent=False"
            )
        return self._compiled(x.shape[0] == 1, actions is not None, run_agent)(x, actions)

    def _compiled(self, single, forced, run_agent):
        """One graph per (batch 1 or N, forced or greedy, agent or not).

        The batch-N graphs have a dynamic batch dimension, so any batch size
        reuses them without retracing.
        """
        single = single and self.control_flow
        # The MAC cap (`model.set_compute_cap`) is a Python value read when
        # tracing: a new cap gets a new graph.
        key = (single, forced, run_agent, self.model.compute_cap)
        if key not in self._functions:
            batch = 1 if single else None
            signature = [tf.TensorSpec([batch, *self.model.image_shape], tf.float32)]
            if forced:
                signature.append(tf.TensorSpec([batch, self.num_prunable], tf.int32))

            def run(x, actions=None):
                if single:
                    return self.run(SwitchExecutor(self, self.constant_weights), x, actions, run_agent,
                                    constant_agent=True)
                return self.run(BucketedExecutor(self), x, actions, run_agent)

            self._functions[key] = tf.function(run, input_signature=signature, autograph=False)
        return self._functions[key]

    def run(self, executor, x, actions=None, run_agent=True, constant_agent=False):
        """The rollout on one of this engine's executors (traceable).

        Args:
            executor: a `SwitchExecutor` or `BucketedExecutor` of this engine.
            x: float32 images.
            actions: optional forced int32 actions `[batch, T]`.
            run_agent: whether the agent runs (always with greedy actions).
            constant_agent: whether the agent's weights are graph
                constants (`rnp_tf.agent.ConstantDecisions`).

        Returns:
            The dict of `__call__`.
        """
        if actions is None:
            policy = rollout_lib.Greedy(self.model.greedy_q)
        else:
            policy = rollout_lib.Forced(actions, run_agent=run_agent)
        agent = agent_lib.ConstantDecisions(self.model.agent) if constant_agent else self.model.agent
        out = rollout_lib.rollout(self.plan, agent, x, policy, executor)
        return out.stacked(self.plan.macs)

    @property
    def cache_bytes(self):
        """Bytes of the folded weights this engine holds in variables.

        With `constant_weights=True`, every traced batch-1 graph holds one
        more copy of them as constants.
        """
        total = 0
        cached = [*self._weights.kept.values(), *self._weights.pairs.values()]
        for var in (v for vs in cached for v in vs):
            total += var.shape.num_elements() * var.dtype.size
        return total

    def agent_step(self, t, pieces, state, identity=False):
        """The agent's work at prunable layer `t` on bucketed narrow features.

        Pools every piece, pads the pooled vectors to the layer's full input
        width, puts them back in sample order and advances the agent (the
        encoder `t`, the shared LSTM, the decoder `t`): what the batch-N
        executor does at every decision. Public so that the latency
        benchmark can time the agent alone on the same tensors.

        Args:
            t: Python int, index of the prunable layer.
            pieces: list of `(features, sample_ids)`: features
                `(n_i, h, w, c_i)` (any prefix width `c_i`; None for samples
                whose block is skipped: zero features), `sample_ids`
                int32 `[n_i]`; together the ids cover `0..batch-1` once.
            state: the agent's LSTM state for the whole batch.
            identity: True when `pieces` is one piece whose ids are
                `0..batch-1` in order (skips the re-ordering).

        Returns:
            `(q_values [batch, k], new_state)`.
        """
        return self.model.agent.decide(t, self.pooled(t, pieces, identity), state)

    def pooled(self, t, pieces, identity=False):
        """Pooled features `[batch, C_t]` of bucketed pieces, in sample order (see `agent_step`)."""
        channels = self.plan.feature_channels[t]
        pooled = [
            tf.zeros([tf.shape(ids)[0], channels]) if features is None  # a skipped block's samples
            else rollout_lib.pad_channels(rollout_lib.spatial_mean(features), channels)
            for features, ids in pieces
        ]
        if identity and len(pieces) == 1:
            return pooled[0]
        return tf.dynamic_stitch([ids for _, ids in pieces], pooled)

    def start_agent(self, batch):
        """The agent's initial LSTM state for a batch (an int or a scalar int tensor)."""
        return self.model.agent.initial_state(batch)

    # ----------------------------------------------------------- weights
    def previous_actions(self, t):
        """Possible previous actions of prunable layer t (k: full input)."""
        if self.model.prunable[t].gated_input:
            return range(1, self.groups + 1)
        return (self.groups,)

    def folded(self, t, p, a, constant=False):
        """(kernel, bias) of prunable layer t for previous action p, action a (graph constants if `constant`)."""
        if self.weight_cache == "pairs":
            return _read(self._weights.pairs[(t, p, a)], constant)
        kernel, bias = _read(self._weights.pairs[(t, p, self.groups)], constant)
        out_prefix = a * self.model.prunable[t].group_size
        return kernel[..., :out_prefix], bias[:out_prefix]

    def in_width(self, t, p):
        """Input channels of prunable layer t after previous action p."""
        layer = self.model.prunable[t]
        return p * layer.in_group_size if layer.gated_input else layer.in_channels

    def stem(self, x):
        """The stem conv (full width) on the folded weights."""
        return conv_op(self.plan.stem, x, *self._weights.stem)

    def kept(self, layer, h, p=None, constant=False, batch=-1):
        """A conv with no decision (full output; a depthwise conv: `p` groups) on `h` holding `p` groups (None: all).

        `batch`: the static batch size of `h`'s narrow view (-1: dynamic).
        """
        k = self.groups
        if p is None or p == k:
            return conv_op(layer, h, *_read(self._weights.kept[(layer.name, k)], constant))
        narrow = tf.reshape(h, [batch, *h.shape[1:3], p * layer.in_group_size])
        return conv_op(layer, narrow, *_read(self._weights.kept[(layer.name, p)], constant))

    def branch(self, t, h, p, a):
        """Prunable conv `t` on the folded slice for previous action `p`, action `a` (`h` holds its input prefix)."""
        return conv_op(self.model.prunable[t], h, *self.folded(t, p, a))

    def head(self, h, width_action, batch=-1):
        """The classifier head on features holding `width_action` groups (`batch`: static batch size, -1: dynamic)."""
        head = self.plan.head
        first = head.layers[0]
        if head.in_ref is None:  # the map feeding the head keeps its full width (a residual network)
            channels = head.in_shape[-1]
        else:
            channels = width_action * self.model.prunable[-1].group_size
        kernel = tf.convert_to_tensor(first.kernel)
        hf, wf, full = head.in_shape
        h = tf.reshape(h, [batch, hf, wf, channels])
        if head.contiguous or channels == full:
            # one matmul on a row prefix of the kernel: a zero-copy slice
            y = tf.matmul(head.flatten(h), head.rows(kernel, channels))
        else:
            # Layout "spatial": rows are (position, channel), so a channel
            # prefix is one contiguous row block per position, a zero-copy
            # slice; a strided slice of the whole kernel would copy it at
            # every call.
            per_position = tf.unstack(tf.transpose(tf.reshape(h, [batch, hf * wf, channels]), [1, 0, 2]))
            y = tf.add_n(
                [tf.matmul(part, kernel[s * full : s * full + channels]) for s, part in enumerate(per_position)]
            )
        y = first.activation(tf.nn.bias_add(y, tf.convert_to_tensor(first.bias)))
        for dense in head.layers[1:]:
            y = dense(y)
        return y


class SwitchExecutor(rollout_lib.Executor):
    """Batch 1: each prunable conv's weight slice is picked in the graph by (previous action, action).

    An executor of `rnp_tf.rollout` (see there) over an `InferenceEngine`'s
    folded weights: one `tf.switch_case` per conv over its `k * k` branches
    (`k` when its input has full width), and one over the `k` heads. Every
    narrow view has the static batch size 1 (with a dynamic one the graph
    took 4-5% longer on MobileNetV2, `docs/results/speed.md`).

    Args:
        engine: the `InferenceEngine` whose weights it reads.
        constant: whether the graph holds the folded weights as constants
            (read from the engine's variables when traced).
    """

    def __init__(self, engine, constant=False):
        self.engine = engine
        self.k = engine.groups
        self.constant = constant

    def batch_size(self, images):
        return 1

    def pooled(self, h, t):
        if t in self.engine.plan.skipped_by:  # after a skip, `h` has no channel: zero features
            channels = self.engine.plan.feature_channels[t]
            return tf.cond(
                tf.shape(h)[-1] > 0,
                lambda: self.engine.pooled(t, [(h, None)], identity=True),
                lambda: tf.zeros([1, channels]),
            )
        return self.engine.pooled(t, [(h, None)], identity=True)

    def conv(self, step, h, in_action, out_action):
        skip = self.engine.plan.skip_of_conv.get(step.layer.name)
        if skip is None:
            return self._conv(step, h, in_action, out_action)
        # a skippable block's branch: action 0 computes nothing (a decided conv's own action, else its input's)
        action = out_action if step.decision is not None else in_action
        return tf.cond(
            action[0] > 0,
            lambda: self._conv(step, h, in_action, out_action),
            lambda: rollout_lib.skipped_conv(step, 1),
        )

    def _conv(self, step, h, in_action, out_action):
        if step.decision is None:
            if in_action is None:
                return self.engine.kept(step.layer, h, constant=self.constant)
            # the full output of a conv whose input holds the previous action's groups
            branches = [lambda p=p: self.engine.kept(step.layer, h, p, self.constant, batch=1) for p in range(1, self.k + 1)]
            return tf.switch_case(in_action[0] - 1, branches)
        t, k = step.decision, self.k
        previous = tf.constant(k) if in_action is None else in_action[0]
        action = out_action[0]
        height, width = h.shape[1], h.shape[2]
        pairs = [(p, a) for p in self.engine.previous_actions(t) for a in range(1, k + 1)]

        def branch(p, a):
            narrow = tf.reshape(h, [1, height, width, self.engine.in_width(t, p)])
            return conv_op(step.layer, narrow, *self.engine.folded(t, p, a, self.constant))

        index = action - 1 if len(pairs) == k else (previous - 1) * k + action - 1
        return tf.switch_case(index, [lambda p=p, a=a: branch(p, a) for p, a in pairs])

    def map(self, step, h):
        return map_op(step.layer, h)

    def head(self, h, last_action):
        if last_action is None:
            return self.engine.head(h, self.k, batch=1)
        return tf.switch_case(
            last_action[0] - 1,
            [lambda w=w: self.engine.head(h, w, batch=1) for w in range(1, self.k + 1)],
        )


class BucketedExecutor(rollout_lib.Executor):
    """Batch N with per-sample actions: samples bucketed by width, sorted by action.

    An executor of `rnp_tf.rollout` over an `InferenceEngine`'s folded
    weights. `h` is one tensor until the first prunable conv, then a list of
    pieces (samples sharing their width). At each prunable conv the samples
    of each input width are sorted by their action, so every (previous
    action, action) group is a zero-copy slice that runs one convolution on
    its weight slice; a bucket is copied at most twice per layer (a concat
    when several buckets merge, a gather when it is not in order), and
    nothing is copied when the whole batch takes one action.

    Args:
        engine: the `InferenceEngine` whose weights it reads.
    """

    def __init__(self, engine):
        self.engine = engine
        self.k = engine.groups
        self.control_flow = engine.control_flow

    def begin(self, images):
        self.batch = tf.shape(images)[0]
        return images

    def batch_size(self, images):
        return self.batch

    def pooled(self, h, t):
        if isinstance(h, list):
            return self.engine.pooled(t, [(pc.x if pc.width else None, pc.idx) for pc in h])
        return self.engine.pooled(t, [(h, None)], identity=True)

    def conv(self, step, h, in_action, out_action):
        if step.decision is None:
            if not isinstance(h, list):
                return self.engine.kept(step.layer, h)
            if isinstance(step.layer, GatedDepthwiseConv2D):
                return self._depthwise_on_pieces(step.layer, h)
            return self._kept_on_pieces(step.layer, h)
        if not isinstance(h, list):
            h = [_Piece(h, tf.range(self.batch), self.k)]
        return self._bucketed_conv(step.decision, step.layer, h, out_action)

    def map(self, step, h):
        if isinstance(h, list):
            return [_Piece(map_op(step.layer, pc.x), pc.idx, pc.width) for pc in h]
        return map_op(step.layer, h)

    def _kept_on_pieces(self, layer, pieces):
        """A conv that keeps its full output on every piece at its own input width, back in sample order.

        The result is one tensor again (a residual sum needs every sample
        at full width): each width's samples run one conv on the weights
        folded for that width, and a stitch puts them back in order.
        """
        out_shape = [*layer.output_hw, layer.filters]

        def kept(features, idx, p):
            if p == 0:  # a skipped block's samples: the branch's output is zero
                return tf.zeros([tf.shape(idx)[0], *out_shape])
            return self._nonempty(tf.shape(idx)[0], lambda rows: self.engine.kept(layer, rows, p), features, out_shape)

        return self._by_width(pieces, kept)

    def _depthwise_on_pieces(self, layer, pieces):
        """A depthwise conv on every piece at its own width: the pieces stay (their width is the output's)."""
        out = []
        for pc in pieces:
            if pc.width == 0:  # a skipped block's samples stay as they are
                out.append(pc)
                continue
            shape = [*layer.output_hw, pc.width * layer.in_group_size]
            y = self._nonempty(tf.shape(pc.idx)[0], lambda rows, w=pc.width: self.engine.kept(layer, rows, w), pc.x, shape)
            out.append(_Piece(y, pc.idx, pc.width))
        return out

    def _by_width(self, pieces, fn):
        """`fn(features, sample_ids, width)` on the samples of each width, stitched back in sample order."""
        outputs, ids = [], []
        for w in range(0, self.k + 1):  # width 0: the samples of a skipped block
            group = [pc for pc in pieces if pc.width == w]
            if not group:
                continue
            features, idx, _ = self._merge(group, keys=None)
            outputs.append(fn(features, idx, w))
            ids.append(idx)
        return self._stitch(ids, outputs)

    def _stitch(self, ids, outputs):
        """`tf.dynamic_stitch(ids, outputs)`, without the copy when one output already holds every sample in order.

        With control flow, a batch whose samples all took the same width
        (the common case of a uniform batch) returns that width's output as
        it is: the stitch would copy the whole feature map.
        """
        if not self.control_flow:
            return tf.dynamic_stitch(ids, outputs)
        in_order = [
            tf.logical_and(tf.equal(tf.shape(i)[0], self.batch),
                           tf.reduce_all(tf.equal(i, tf.range(tf.shape(i)[0], dtype=i.dtype))))
            for i in ids
        ]
        flags = tf.cast(tf.stack(in_order), tf.int32)
        branch = tf.where(tf.reduce_sum(flags) > 0, tf.argmax(flags, output_type=tf.int32), len(outputs))
        branches = [lambda j=j: tf.identity(outputs[j]) for j in range(len(outputs))]
        return tf.switch_case(branch, branches + [lambda: tf.dynamic_stitch(ids, outputs)])

    def _nonempty(self, n, fn, rows, out_shape):
        """`fn(rows)` on `n` rows, never a conv on an empty batch.

        oneDNN (TF 2.21) returns the input's channel count for a conv on an
        empty batch: with control flow an empty group is skipped (`tf.cond`);
        without, it is padded to one zero sample, convolved and sliced back.
        """
        if self.control_flow:
            return tf.cond(n > 0, lambda: fn(rows), lambda: tf.zeros([0, *out_shape], tf.float32))
        pad = tf.maximum(1 - n, 0)
        padded = tf.concat([rows, tf.zeros(tf.concat([[pad], tf.shape(rows)[1:]], 0))], 0)
        return tf.reshape(fn(padded)[:n], [-1, *out_shape])

    def head(self, pieces, last_action):
        if not isinstance(pieces, list):
            return self.engine.head(pieces, self.k)
        return self._by_width(pieces, lambda features, idx, w: self.engine.head(features, w))

    def _bucketed_conv(self, t, layer, pieces, action):
        """Prunable conv t on per-sample actions; returns the new pieces."""
        k = self.k
        out_h, out_w = layer.output_hw
        # Block skipping: at a skippable decision the samples of action 0 become a piece of width 0
        # (nothing computed; its rows are the block's input, never read); later convs pass it on.
        first = 0 if t in self.engine.plan.skippable else 1
        new_pieces = [pc for pc in pieces if pc.width == 0]
        for p in self.engine.previous_actions(t):
            group = [pc for pc in pieces if pc.width == p]
            if not group:
                continue
            keys = [tf.gather(action, pc.idx) for pc in group]
            features, idx, key = self._merge(group, keys)
            # `features` is sorted by action: each (p, a) group is a slice.
            size = k + 1 - first
            counts = tf.math.bincount(key - first, minlength=size, maxlength=size, dtype=tf.int32)
            starts = tf.cumsum(counts, exclusive=True)
            for a in range(first, k + 1):
                n, start = counts[a - first], starts[a - first]
                rows = tf.slice(features, tf.stack([start, 0, 0, 0]), tf.stack([n, -1, -1, -1]))
                rows.set_shape([None, *group[0].x.shape[1:]])
                ids = tf.slice(idx, tf.reshape(start, [1]), tf.reshape(n, [1]))
                if a == 0:
                    new_pieces.append(_Piece(rows, ids, 0))
                    continue
                out_channels = a * layer.group_size
                y = self._group_conv(t, layer, rows, n, p, a, [out_h, out_w, out_channels])
                new_pieces.append(_Piece(y, ids, a))
        return new_pieces

    def _group_conv(self, t, layer, rows, n, p, a, out_shape):
        return self._nonempty(n, lambda r: conv_op(layer, r, *self.engine.folded(t, p, a)), rows, out_shape)

    def _merge(self, group, keys):
        """One tensor for pieces of equal width, sorted by `keys` if given.

        Copies only what must move: a single non-empty piece is passed
        through (no concat), features already in key order are not gathered.

        Returns:
            `(features, sample_ids, keys)` (keys None when not given).
        """
        xs = [pc.x for pc in group]
        ids = [pc.idx for pc in group]
        parts = [xs, ids] + ([keys] if keys is not None else [])
        if len(group) == 1:
            merged = [part[0] for part in parts]
        elif self.control_flow:
            sizes = tf.stack([tf.shape(i)[0] for i in ids])
            nonempty = tf.cast(sizes > 0, tf.int32)
            only = tf.argmax(nonempty, output_type=tf.int32)
            branch = tf.where(tf.reduce_sum(nonempty) == 1, only, len(group))
            branches = [lambda j=j: [part[j] for part in parts] for j in range(len(group))]
            branches.append(lambda: [tf.concat(part, 0) for part in parts])
            merged = tf.switch_case(branch, branches)
        else:
            merged = [tf.concat(part, 0) for part in parts]
        if keys is None:
            return merged[0], merged[1], None
        features, idx, key = merged

        def gather():
            order = tf.argsort(key, stable=True)
            return [tf.gather(features, order), tf.gather(idx, order), tf.gather(key, order)]

        if not self.control_flow:
            return tuple(gather())
        in_order = tf.reduce_all(key[1:] >= key[:-1])
        features, idx, key = tf.cond(in_order, lambda: [features, idx, key], gather)
        return features, idx, key


class DenseExecutor(rollout_lib.Executor):
    """The unpruned network on BatchNorm-folded weights: every conv in full, no branches."""

    def __init__(self, runner, constant=False):
        self.runner = runner
        self.constant = constant

    def pooled(self, h, t):
        raise ValueError("DenseExecutor runs no agent.")

    def conv(self, step, h, in_action, out_action):
        return conv_op(step.layer, h, *_read(self.runner.weights[step.layer.name], self.constant))

    def map(self, step, h):
        return map_op(step.layer, h)

    def head(self, h, last_action):
        return rollout_lib.MaskedExecutor(self.runner.model.plan).head(h, None)


class DenseRunner:
    """The unpruned network as a plain graph: the latency baseline.

    Every convolution runs in full on BatchNorm-folded weights (one folded
    copy of the conv weights), no agent, no branches; the head is the
    model's own. The numbers equal `model.rollout(x, actions=all k)`.

    Args:
        model: a built `rnp_tf.RNPModel`.
        constant_weights: as for `InferenceEngine` (default `"auto"`, decided
            by the same rule): if True the batch-1 graph holds the folded
            weights as graph constants; give both the same value so that
            the baseline treats its weights as the engine does.

    Call arguments:
        x: float images `(batch, height, width, channels)`.

    Returns:
        float32 logits `[batch, num_classes]`.

    Example:

    >>> full = DenseRunner(model)
    >>> logits = full(x_test[:64])
    """

    def __init__(self, model, constant_weights="auto"):
        _check_model(model)
        self.model = model
        self.constant_weights = constant_weights_for(model, constant_weights)
        k = model.groups
        self.weights = {
            conv.name: _FoldedWeights._variables(*conv.folded_weights(k, k), conv.name)
            for conv in model.plan.convs
        }
        self._functions = {}

    def refresh(self):
        """Folds the model's current weights again (a constant batch-1 graph is traced again)."""
        k = self.model.groups
        for conv in self.model.plan.convs:
            for var, value in zip(self.weights[conv.name], conv.folded_weights(k, k)):
                var.assign(tf.cast(value, tf.float32))
        self._functions.pop(True, None)

    def __call__(self, x):
        x = validation.check_images(x, self.model.image_shape)
        constant = self.constant_weights and x.shape[0] == 1
        if constant not in self._functions:
            self._functions[constant] = tf.function(lambda images: self._run(images, constant), autograph=False)
        return self._functions[constant](tf.cast(x, tf.float32))

    def _run(self, x, constant=False):
        plan = self.model.plan
        full = tf.fill(tf.stack([tf.shape(x)[0], plan.num_decisions]), plan.groups)
        policy = rollout_lib.Forced(full)
        return rollout_lib.rollout(plan, self.model.agent, x, policy, DenseExecutor(self, constant)).logits


def uniform_actions(batch_size, actions):
    """Forced actions: one tuple repeated for every sample, int32 `[batch, L]`.

    Args:
        batch_size: positive int.
        actions: sequence of per-layer actions.

    Returns:
        An int32 tensor.

    Example:

    >>> uniform_actions(2, [4, 1]).numpy()
    array([[4, 1],
           [4, 1]], dtype=int32)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}")
    row = tf.constant([list(actions)], tf.int32)
    return tf.tile(row, [batch_size, 1])
