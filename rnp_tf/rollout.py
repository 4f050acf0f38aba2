"""The one rollout: walk a `NetworkPlan`, ask a policy for actions, an executor to compute.

RNP's per-layer loop is written here once::

    h = executor.begin(images)
    for step in plan.steps:
        conv step with a decision t:
            q_t, state = agent.decide(t, executor.pooled(h, t), state)
            a_t = policy.choose(t, q_t, actions so far)
            h = executor.conv(step, h, in_action, a_t)
        other conv: h = executor.conv(step, h, in_action, None)
        map step (pooling, padding): h = executor.map(step, h)
        residual block: the body's convs as above, then executor.residual
        inverted residual: the body's convs as above, then executor.add (identity shortcut)
        a skippable block's first decision may be 0 ("skip"): its later decisions are 0
            too and each executor computes nothing for the branch (`skip_actions`)
        a tied decision (`plan.tied_to`) takes its leader's action: no pooling, no agent
    logits = executor.head(h, last action)

A *policy* says how actions are chosen (`Greedy`, `EpsilonGreedy`,
`Forced`, or any object with `uses_agent` and `choose`). An *executor* says
how a step is computed and what `h` is: `MaskedExecutor` (full tensors,
pruned channels zeroed: differentiable, for training), `SlicedExecutor`
(the reference: each conv on its weight prefix, eager), the inference
engine's batch-1 and batch-N executors (`rnp_tf.engine`) and the exporters'
graph builders (`export.sliced_network`). Actions are whatever the policy returns
(int32 tensors `[batch]`); `None` stands for the full width.

Example:

>>> out = rollout(model.plan, model.agent, images, Greedy(), MaskedExecutor(model.plan))
>>> out.logits.shape, len(out.actions)
"""

import tensorflow as tf

from rnp_tf import agent as agent_lib
from rnp_tf.layers import GatedDepthwiseConv2D
from rnp_tf.plan import BlockStep
from rnp_tf.plan import ConvStep
from rnp_tf.plan import InvertedResidualStep
from rnp_tf.plan import MapStep


class Rollout:
    """What one rollout produced.

    Attributes:
        logits: the executor's logits.
        actions: list of the actions, one per decision (as the policy gave them).
        q_values: list of the agent's raw Q-values `[batch, k]` (`k + 1` at
            a skippable decision; empty when the policy did not run the agent).
    """

    __slots__ = ("logits", "actions", "q_values")

    def __init__(self, logits, actions, q_values):
        self.logits, self.actions, self.q_values = logits, actions, q_values

    def stacked(self, macs_fn):
        """The usual dict: `logits`, `actions` `[batch, T]`, `q_values` `[batch, T, k]` (`k + 1` with skips) or None, `macs`."""
        actions = tf.stack(self.actions, axis=1)
        return {
            "logits": self.logits,
            "actions": actions,
            "q_values": agent_lib.stack_q_values(self.q_values) if self.q_values else None,
            "macs": macs_fn(actions),
        }


# ----------------------------------------------------------------- policies
class Greedy:
    """The inference policy: `argmax` of the Q-values as the run-time knob sees them.

    Args:
        greedy_q: optional `greedy_q(t, q, decided) -> q`, the knob's view of
            the raw Q-values (re-priced to the run-time penalty, masked by the
            compute cap: `RNPModel.greedy_q`). None: the raw Q-values.
    """

    uses_agent = True

    def __init__(self, greedy_q=None):
        self.greedy_q = greedy_q

    def choose(self, t, q, decided):
        if self.greedy_q is not None:
            q = self.greedy_q(t, q, decided)
        return agent_lib.greedy_actions(q)


class EpsilonGreedy:
    """Exploration: a uniformly random action with probability `epsilon`, else greedy on the raw Q-values."""

    uses_agent = True

    def __init__(self, epsilon):
        self.epsilon = epsilon

    def choose(self, t, q, decided):
        return agent_lib.epsilon_greedy_actions(q, self.epsilon)


class Forced:
    """Given actions, `[batch, T]` int32.

    Args:
        actions: the actions of every decision.
        run_agent: run the agent anyway (its Q-values are recorded, its
            choice ignored, and each layer waits for the decision as under a
            real policy: how the latency benchmark times "the agent chose
            these actions"). Defaults to False.
    """

    def __init__(self, actions, run_agent=False):
        self.actions = actions
        self.uses_agent = bool(run_agent)

    def choose(self, t, q, decided):
        if q is None:
            return self.actions[:, t]
        with tf.control_dependencies([q]):
            return tf.identity(self.actions[:, t])


class Chooser:
    """Any `choose(t, q) -> actions` function as a policy (e.g. training's mixes of widths)."""

    def __init__(self, choose, uses_agent=True):
        self._choose = choose
        self.uses_agent = bool(uses_agent)

    def choose(self, t, q, decided):
        return self._choose(t, q)


# --------------------------------------------------------------- the loop
def rollout(plan, agent, images, policy, executor):
    """Runs the network of `plan` on `images`, deciding layer by layer.

    Args:
        plan: the `rnp_tf.plan.NetworkPlan`.
        agent: the `rnp_tf.DecisionAgent` (unused when `policy.uses_agent`
            is False).
        images: the input batch, as the executor takes it.
        policy: chooses each action (see the module docstring).
        executor: computes each step (see the module docstring).

    Returns:
        A `Rollout`.
    """
    h = executor.begin(images)
    state = agent.initial_state(executor.batch_size(images)) if policy.uses_agent else None
    actions, q_values = [], []

    def width(ref):
        return None if ref is None else actions[ref]

    def conv(step, h):
        nonlocal state
        t = step.decision
        if t in plan.tied_to:  # one decision per stage: the leader's action, the agent not run
            leader = plan.tied_to[t]
            if q_values:
                q_values.append(tf.zeros_like(q_values[leader]))  # no Q-value: `plan.live` is 0 here
            actions.append(actions[leader])
        elif t is not None:
            q = None
            skipper = actions[plan.skipped_by[t]] if t in plan.skipped_by else None
            live = None if skipper is None else skipper > 0  # None also under a policy of full widths
            if policy.uses_agent:
                q, new_state = agent.decide(t, executor.pooled(h, t), state)
                if live is not None:  # a skipped sample's state does not advance
                    new_state = [tf.where(live[:, None], new, old) for new, old in zip(new_state, state)]
                state = new_state
                q_values.append(q)
            actions.append(skip_actions(plan, t, policy.choose(t, q, actions), live))
        return executor.conv(step, h, width(step.in_ref), width(t))

    for step in plan.steps:
        if isinstance(step, ConvStep):
            h = conv(step, h)
        elif isinstance(step, MapStep):
            h = executor.map(step, h)
        elif isinstance(step, BlockStep):
            shortcut = h if step.shortcut is None else executor.conv(step.shortcut, h, None, None)
            for inner in step.body:
                h = conv(inner, h)
            h = executor.residual(h, shortcut)
        elif isinstance(step, InvertedResidualStep):
            block_in = h
            for inner in step.body:
                h = conv(inner, h)
            if step.residual:
                h = executor.add(h, block_in)
        else:
            raise ValueError(f"Unknown plan step. Received: step={step!r}")
    return Rollout(executor.head(h, width(plan.head.in_ref)), actions, q_values)


def skip_actions(plan, t, action, live=None):
    """The action of decision `t` with block skipping applied.

    At a skippable decision the policy's `k + 1` (the agent's last Q-value,
    "skip") becomes 0; at a later decision of a skippable block `live`
    (False where the block was skipped) forces 0. Elsewhere the action is
    returned as it is.

    Args:
        plan: the `NetworkPlan`.
        t: the decision index.
        action: int32 `[batch]`, what the policy chose.
        live: bool `[batch]` or None.

    Returns:
        int32 `[batch]` (None when `action` is None: the full width, no agent).
    """
    if action is None:
        return None
    if t in plan.skippable:
        return tf.where(action > plan.groups, 0, action)
    if live is not None:
        return tf.where(live, action, 0)
    return action


# ---------------------------------------------------------------- executors
SMALL_MAP = 1 << 17
"""Maps of at most this many elements (the whole batch) are pooled by `reduce_mean` (see `spatial_mean`)."""


def spatial_mean(h):
    """Per-sample, per-channel mean over height and width, `[batch, c]`.

    An average pooling whose window is the whole map (oneDNN's pooling
    kernel), or `reduce_mean` when the map's shape is static and it holds
    at most `SMALL_MAP` elements: the same numbers up to summation order.
    Timed in a graph, single-threaded, 20 pools of one map per call
    (2026-12-07): on wide maps the pooling kernel is 1.5-6x faster (56 x
    56 x 256: 139 against 784 us; 224 x 224 x 64: 0.53 against 3.3 ms),
    on maps up to 2^17 elements (MobileNetV2's decisions from 56 x 56 x
    24 down, ResNet-50's on 7 x 7 maps) it costs 4-7 us more per call than
    `reduce_mean`; at batch 1 MobileNetV2's engine took 2-5% less time
    with those pooled by `reduce_mean` (paired runs), while ResNet-50's
    took 2% more with every map pooled that way (`docs/results/speed.md`).
    Works on an empty batch and on a channel count known only at run time
    (a `tf.switch_case` of widths).

    Example:

    >>> spatial_mean(tf.ones([2, 3, 3, 4])).shape
    TensorShape([2, 4])
    """
    size = h.shape.num_elements()
    if size is not None and 0 < size <= SMALL_MAP:
        return tf.reduce_mean(h, axis=[1, 2])
    pooled = tf.nn.avg_pool2d(h, ksize=h.shape[1:3], strides=1, padding="VALID")
    return tf.squeeze(pooled, axis=[1, 2])


def pad_channels(pooled, channels):
    """Zero-pads pooled features `[n, c]` to `channels` (a prefix counts the rest as zero)."""
    width = pooled.shape[-1]
    if width is None:
        return tf.pad(pooled, [[0, 0], [0, channels - tf.shape(pooled)[1]]])
    return tf.pad(pooled, [[0, 0], [0, channels - width]]) if channels - width else pooled


class Executor:
    """Base of the executors: what most of them share.

    An executor says how each step of a plan is computed and what `h` is;
    `rollout` calls `begin(images)`, `batch_size(images)` (for the agent's
    state), `pooled(h, t)` (the agent's input at decision `t`, `[batch,
    feature_channels[t]]`), `conv(step, h, in_action, out_action)` (None: full
    width), `map(step, h)`, `residual(h, shortcut)`, `add(h, shortcut)` and
    `head(h, last_action)`. This base gives the defaults for a batch held as
    one tensor: the images as they are, the batch's first dimension, the
    Keras layer of a map step, `relu(h + shortcut)` (a bottleneck) and
    `h + shortcut` (an inverted residual); subclasses add `pooled`, `conv`
    and `head`. A conv step's layer may be a `GatedDepthwiseConv2D`: its
    output keeps its input's prefix (`in_action`).
    """

    def begin(self, images):
        return images

    def batch_size(self, images):
        return tf.shape(images)[0]

    def map(self, step, h):
        return step.layer(h)

    def residual(self, h, shortcut):
        return tf.nn.relu(h + shortcut)

    def add(self, h, shortcut):
        return h + shortcut


class MaskedExecutor(Executor):
    """Training's executor: every conv in full, the pruned groups multiplied by zero.

    Differentiable, with per-width BatchNorm in training mode; never faster
    than the full network.

    Args:
        plan: the `NetworkPlan`.
        training: BatchNorm/dropout mode.
        dtype: the agent's compute dtype (the pooled features are cast to it).
    """

    def __init__(self, plan, training=False, dtype="float32"):
        self.plan = plan
        self.training = training
        self.dtype = dtype

    def pooled(self, h, t):
        pooled = tf.reduce_mean(tf.cast(h, self.dtype), axis=[1, 2])
        return pad_channels(pooled, self.plan.feature_channels[t])

    def conv(self, step, h, in_action, out_action):
        if not self.plan.skippable:
            return step.layer(h, in_actions=in_action, out_actions=out_action, training=self.training)
        # Block skipping: a skipped sample (action 0) runs at width 1 and its output is zeroed,
        # so that the residual sum gives the block's input.
        live = [a > 0 for a in (in_action, out_action) if a is not None]
        in_action, out_action = (None if a is None else tf.maximum(a, 1) for a in (in_action, out_action))
        y = step.layer(h, in_actions=in_action, out_actions=out_action, training=self.training)
        if live:
            y = y * tf.cast(tf.reduce_all(tf.stack(live), axis=0), y.dtype)[:, None, None, None]
        return y

    def head(self, h, last_action):
        head = self.plan.head
        h = head.flatten(h)
        for dense in head.layers[:-1]:
            h = dense(h)
            if head.dropout is not None:
                h = head.dropout(h, training=self.training)
        return head.layers[-1](h)


def skipped_conv(step, batch):
    """What a conv of a skipped block's branch outputs: zeros, without a convolution.

    A decided conv or a depthwise conv gives no channel (its prefix is
    empty); a conv that keeps its full output (the bottleneck's last conv,
    the projection) gives zeros of its full width, so that the residual sum
    gives the block's input.
    """
    layer = step.layer
    narrow = step.decision is not None or isinstance(layer, GatedDepthwiseConv2D)
    return tf.zeros([batch, *layer.output_hw, 0 if narrow else layer.filters], layer.compute_dtype)


def head_on_prefix(head, h):
    """The head on a map holding only a channel prefix (the reference sliced head)."""
    first = head.layers[0]
    kernel = head.rows(tf.convert_to_tensor(first.kernel), h.shape[-1])
    h = first.activation(tf.matmul(head.flatten(h), kernel) + first.bias)
    for dense in head.layers[1:]:
        h = dense(h)
    return h


class SlicedExecutor(Executor):
    """The reference sliced path: each conv convolves only its weight prefix, eagerly.

    Every image of the batch shares the actions (run it one image at a
    time for per-image actions); BatchNorm is folded into each slice
    (`GatedConv2D.call_sliced`). Actions are read as Python ints.

    Args:
        plan: the `NetworkPlan`.
    """

    def __init__(self, plan):
        self.plan = plan

    def pooled(self, h, t):
        return pad_channels(tf.reduce_mean(h, axis=[1, 2]), self.plan.feature_channels[t])

    def _groups(self, action):
        return self.plan.groups if action is None else int(tf.reshape(action, [-1])[0])

    def conv(self, step, h, in_action, out_action):
        p, a = self._groups(in_action), self._groups(out_action)
        if p == 0 or a == 0:  # a skipped block's branch: nothing computed
            return skipped_conv(step, tf.shape(h)[0])
        return step.layer.call_sliced(h, p, a)

    def head(self, h, last_action):
        return head_on_prefix(self.plan.head, h)
