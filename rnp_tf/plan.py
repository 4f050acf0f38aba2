"""`NetworkPlan`: one backbone as data, with its layers and its one MAC table.

A backbone description (`rnp_tf.backbones`) says what the network is; its
plan is that description built: a tuple of steps, each holding the layers it
runs, in the order data flows through them::

    ConvStep(stem)                      always full width
    MapStep(pool)                       works on any width
    ConvStep(conv, decision=0)          the agent decides its output prefix
    ConvStep(conv, decision=1, in_ref=0)
    BlockStep(body=(ConvStep, ...), shortcut=ConvStep | None)
    InvertedResidualStep(body=(expand, depthwise, project), residual)
    ...                                 then the head (`plan.head`)

Every path that runs a model walks these steps with `rnp_tf.rollout.rollout`:
training (masked), the inference engine (sliced, batch 1 and N) and the
exporters. A new kind of step is one new class here and one method per
executor, not a new loop.

Example:

>>> plan = build_plan(backbones.validate_backbone(backbones.cifar_cnn(), 4),
...                   image_shape=(32, 32, 3), num_classes=10, groups=4)
>>> [type(s).__name__ for s in plan.steps]
['ConvStep', 'MapStep', 'ConvStep', 'ConvStep', 'MapStep', 'ConvStep']
>>> plan.num_decisions
3
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import backbones
from rnp_tf.layers import GatedConv2D
from rnp_tf.layers import GatedDepthwiseConv2D


@dataclasses.dataclass(frozen=True, eq=False)
class ConvStep:
    """A convolution of the plan.

    Attributes:
        layer: the `GatedConv2D`.
        decision: index of the decision that sets its output prefix (the
            agent decides it on the feature map feeding this conv), or None
            for a conv that keeps its full output.
        in_ref: index of the decision that set the width of its input, or
            None when its input has full width.
    """

    layer: GatedConv2D
    decision: int | None = None
    in_ref: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class MapStep:
    """A width-agnostic layer (max/avg pooling, zero padding): runs on any prefix."""

    layer: keras.layers.Layer


@dataclasses.dataclass(frozen=True, eq=False)
class BlockStep:
    """A residual block: `relu(body(h) + shortcut(h))`.

    Attributes:
        body: the convs of the residual branch, in order.
        shortcut: the projection conv, or None for an identity shortcut.
        skippable: True when the agent may skip the residual branch (action
            0 at the body's first decision; see `NetworkPlan.skippable`).
        tied: True when its decisions take the actions of the block before
            it (see `NetworkPlan.tied_to`).
    """

    body: tuple
    shortcut: ConvStep | None = None
    skippable: bool = False
    tied: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class InvertedResidualStep:
    """A MobileNetV2 inverted residual: `project(depthwise(expand(h))) (+ h)`.

    The agent decides the expansion's output prefix; the depthwise conv
    (`GatedDepthwiseConv2D`, `in_ref` = that decision) runs on that prefix
    and keeps it, the linear projection reads it and keeps its full output.
    A block with expansion factor 1 has no expansion conv and nothing to
    decide: its depthwise conv and projection run at full width.

    Attributes:
        body: the `ConvStep`s `(expand, depthwise, project)`, or
            `(depthwise, project)` without expansion.
        residual: True when the block's input is added to its output (an
            identity shortcut, no activation after the sum).
        skippable: True when the agent may skip the residual branch (action
            0 at the expansion's decision; see `NetworkPlan.skippable`).
        tied: True when its decision takes the action of the block before it
            (see `NetworkPlan.tied_to`).
    """

    body: tuple
    residual: bool = False
    skippable: bool = False
    tied: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
    """The classifier head: pooling, hidden Dense+ReLU layers, classifier.

    Attributes:
        layers: the Dense layers, the classifier last.
        pooling: `"gap"` (global average) or `"flatten"`.
        in_shape: `(height, width, channels)` of the map feeding it.
        in_ref: the decision that sets the width of that map, or None.
        dropout: the Dropout layer after each hidden Dense, or None.
        layout: the order of the first Dense's rows after `"flatten"`:
            `"spatial"` (Keras' `Flatten`: row `(y * W + x) * C + c`) or
            `"channel"` (channel-major: row `c * H * W + y * W + x`, so a
            channel prefix reads a row prefix). Ignored after `"gap"`.

    Every path that runs the head flattens the map with `flatten` and reads
    the first Dense's rows with `rows`; `relayout` moves a kernel between
    the two layouts.

    Example:

    >>> head = plan.head  # a flatten head of layout "channel"
    >>> x, kernel = head.flatten(h[..., :8]), head.rows(head.layers[0].kernel, 8)
    >>> logits_part = tf.matmul(x, kernel)  # one matmul on a row prefix
    """

    layers: tuple
    pooling: str
    in_shape: tuple
    in_ref: int | None
    dropout: keras.layers.Layer | None = None
    layout: str = "spatial"

    @property
    def spatial(self):
        """Positions the first Dense reads per channel (1 after global pooling)."""
        return 1 if self.pooling == "gap" else int(self.in_shape[0] * self.in_shape[1])

    @property
    def contiguous(self):
        """True when the rows reading a channel prefix are a row prefix (a zero-copy slice)."""
        return self.pooling == "gap" or self.layout == "channel"

    def flatten(self, h):
        """The first Dense's input from a map `[batch, H, W, c]` holding a channel prefix (`c <= C`).

        Global average after `"gap"`; after `"flatten"`, the map flattened in
        this head's layout, so that it matches `rows(kernel, c)`.
        """
        if self.pooling == "gap":
            return tf.reduce_mean(h, axis=[1, 2])
        width = -1 if h.shape[-1] is None else self.spatial * h.shape[-1]
        if self.layout == "channel":
            h = tf.transpose(h, [0, 3, 1, 2])
        return tf.reshape(h, [tf.shape(h)[0], width])

    def rows(self, kernel, channels):
        """The rows of the first Dense's `kernel` that read the first `channels` channels.

        A row prefix after `"gap"` or for layout `"channel"`, taken as the
        leading blocks of a 3-D view `[C / g, g * H * W, units]` (`g` the
        greatest common divisor of `C` and `channels`): TensorFlow shares
        the buffer of a first-dimension slice only when each slice row
        spans a multiple of 64 bytes, which a 1000-class kernel's rows
        (4000 bytes) do not, so `kernel[:rows]` copied the prefix at every
        call (320 us per image on MobileNetV2's 1280 x 1000 head). Layout
        `"spatial"` gathers `H * W` blocks (a copy of the slice), so
        `InferenceEngine.head` multiplies those blocks one by one instead.
        """
        full = self.in_shape[-1]
        if channels == full:
            return kernel
        if self.contiguous:
            g = math.gcd(full, channels)
            units = kernel.shape[-1]
            blocks = tf.reshape(kernel, [full // g, g * self.spatial, units])[: channels // g]
            return tf.reshape(blocks, [channels * self.spatial, units])
        hf, wf, _ = self.in_shape
        kernel = tf.reshape(kernel, [hf, wf, full, -1])[:, :, :channels, :]
        return tf.reshape(kernel, [hf * wf * channels, -1])

    def relayout(self, kernel, source, target):
        """A numpy first-Dense kernel with rows in layout `source` reordered into layout `target`.

        Args:
            kernel: array `[H * W * C, units]` (or `[C, units]` after `"gap"`).
            source, target: `"spatial"` or `"channel"`.

        Returns:
            The kernel in `target`'s row order (`kernel` itself when nothing moves).

        Example:

        >>> keras_fc1 = source.get_layer("fc1").kernel  # Keras' Flatten order
        >>> head.layers[0].kernel.assign(head.relayout(keras_fc1, "spatial", head.layout))
        """
        for layout in (source, target):
            backbones.check_layout(layout)
        kernel = np.asarray(kernel)
        if self.pooling == "gap" or source == target:
            return kernel
        hf, wf, c = self.in_shape
        if source == "spatial":
            moved = kernel.reshape(hf, wf, c, -1).transpose(2, 0, 1, 3)
        else:
            moved = kernel.reshape(c, hf, wf, -1).transpose(1, 2, 0, 3)
        return np.ascontiguousarray(moved.reshape(kernel.shape))


class NetworkPlan:
    """The built network: steps, layers, decisions and the MAC table.

    Built by `build_plan`; read by `rnp_tf.rollout` and by everything that
    needs the structure (MAC counts, channel reordering, the exporters).

    Attributes:
        steps: tuple of `ConvStep`, `MapStep`, `BlockStep` and
            `InvertedResidualStep`.
        head: the `Head`.
        convs: every `GatedConv2D` (and `GatedDepthwiseConv2D`), in
            creation order (the stem first).
        prunable: the convs whose output prefix is decided, by decision index.
        groups: `k`.
        feature_channels: per decision, the channels of the map the agent
            reads (the input of the decided conv).
        conv_refs: per conv name, `(decision, in_ref)`.
        skippable: the decisions that may take action 0, "skip": the first
            decision of each skippable block (stage key `"skippable"`).
            Their Q-head has `k + 1` values, the last one for the skip.
        skipped_by: per later decision of a skippable block, the decision
            whose action 0 skips it. A skipped block's decisions are all
            recorded as 0 and cost nothing.
        skip_of_conv: per conv name of a skippable block's branch, the
            decision whose 0 skips it.
        tied_to: per decision of a tied block (stage key `"tied"`), the
            decision whose action it takes: the same position in the first
            untied block of the run of blocks it belongs to.

    Block skipping (Runtime Network Routing): when a skippable block's first
    decision is 0, its residual branch is not computed and its output is
    its input (`relu(0 + x) = x` after a bottleneck: its input is a ReLU's
    output). Its later decisions are 0 too (the rollout does not let the
    agent's state advance on them); its convs cost 0 MACs.

    Tied decisions (one decision per stage): a block marked `"tied"` takes,
    at each of its decisions, the action of the same decision of the block
    before it. The agent neither reads its maps nor advances its state
    there, so a stage of blocks costs one decision; the DQN passes tied
    decisions over (`live` is 0 there), so their rewards go to the decision
    they follow, and the run-time knob prices an action by every decision
    that takes it (`decision_weight`).
    """

    def __init__(self, steps, head, convs, groups):
        self.steps = tuple(steps)
        self.head = head
        self.convs = list(convs)
        self.groups = int(groups)
        self.conv_refs = {}
        self.prunable = []
        self.feature_channels = []
        self.skippable = set()
        self.skipped_by = {}
        self.skip_of_conv = {}
        self.tied_to = {}
        previous = None  # the decisions of the block just before
        for i, step in enumerate(self.steps):
            if not isinstance(step, (BlockStep, InvertedResidualStep)):
                previous = None
                continue
            decided = [inner.decision for inner in step.body if inner.decision is not None]
            if step.skippable:
                self.skippable.add(decided[0])
                self.skipped_by.update({t: decided[0] for t in decided[1:]})
                self.skip_of_conv.update({inner.layer.name: decided[0] for inner in step.body})
            if step.tied:
                if previous is None or len(previous) != len(decided) or not decided:
                    raise ValueError(
                        f"A tied block takes the decisions of the block just before it: that block must decide "
                        f"as many widths. Received: step {i} deciding {len(decided)}, the step before deciding "
                        f"{'none (not a block)' if previous is None else len(previous)}"
                    )
                self.tied_to.update({t: self.tied_to.get(u, u) for t, u in zip(decided, previous)})
            previous = decided
        if self.tied_to and (set(self.tied_to) | set(self.tied_to.values())) & set(self.skip_columns):
            raise ValueError("A block cannot be both tied and skippable, nor be followed by a tied block if it is "
                             "skippable (not supported yet).")
        for step in self.conv_steps():
            self.conv_refs[step.layer.name] = (step.decision, step.in_ref)
            if step.decision is not None:
                self.prunable.append(step.layer)
                self.feature_channels.append(int(step.layer.in_channels))
        if not self.prunable:
            raise ValueError("The backbone has no prunable conv: nothing for the agent to decide.")
        first = head.layers[0]
        fixed = sum(float(d.kernel.shape[0] * d.units) for d in head.layers[1:])
        if head.in_ref is None:
            fixed += float(head.in_shape[-1] * head.spatial * first.units)
            self._head_macs_per_group = 0.0
        else:
            producer = self.prunable[head.in_ref]
            self._head_macs_per_group = float(producer.group_size * head.spatial * first.units)
        self._fixed_macs = fixed
        self.full_macs = float(self.macs(np.full((1, self.num_decisions), self.groups))[0])
        self.min_macs = float(self.macs(np.ones((1, self.num_decisions), np.int32))[0])

    @property
    def num_decisions(self):
        """How many actions the agent takes per image."""
        return len(self.prunable)

    @property
    def stem(self):
        """The first conv (always full width)."""
        return self.convs[0]

    def conv_steps(self):
        """Every `ConvStep`, in the order of execution (block shortcuts after their body)."""
        for step in self.steps:
            if isinstance(step, ConvStep):
                yield step
            elif isinstance(step, BlockStep):
                yield from step.body
                if step.shortcut is not None:
                    yield step.shortcut
            elif isinstance(step, InvertedResidualStep):
                yield from step.body

    @property
    def is_chain(self):
        """True for a stem followed by decided convs and width-agnostic maps only.

        The batched inference engine and the exporters run such chains (the
        CIFAR CNN, VGG); residual blocks run on the masked path.
        """
        return all(isinstance(step, (ConvStep, MapStep)) for step in self.steps) and all(
            step.decision is not None for step in list(self.conv_steps())[1:]
        )

    # ---------------------------------------------------------------- costs
    def macs(self, actions):
        """Backbone multiply-accumulates per sample for a batch of actions.

        Counts every conv on its (input prefix, output prefix) and the head's
        Dense layers, whose first input shrinks with the width feeding it.

        A skipped block (action 0 at a decision of `skippable`) costs 0:
        its branch's convs are not counted, whatever its later actions. A
        tied decision is counted at its leader's action, whatever it is
        given (the rollout runs it so).

        Args:
            actions: int array or tensor `[batch, num_decisions]` in `1..k`
                (0 at a skippable block's decisions).

        Returns:
            A float32 tensor `[batch]`.
        """
        actions = tf.cast(actions, tf.int32)
        if self.tied_to:
            actions = tf.gather(actions, self.action_sources, axis=1)
        batch = tf.shape(actions)[0]
        full = tf.fill([batch], self.groups)
        total = tf.fill([batch], tf.constant(self._fixed_macs, tf.float32))
        for conv in self.convs:
            decision, in_ref = self.conv_refs[conv.name]
            in_actions = full if in_ref is None else actions[:, in_ref]
            out_actions = full if decision is None else actions[:, decision]
            cost = conv.macs(in_actions, out_actions)
            if conv.name in self.skip_of_conv:
                cost *= tf.cast(actions[:, self.skip_of_conv[conv.name]] > 0, tf.float32)
            total += cost
        if self.head.in_ref is not None:
            total += tf.cast(actions[:, self.head.in_ref], tf.float32) * self._head_macs_per_group
        return total

    def conv_macs_table(self, t):
        """`[k * k]` MACs of decided conv `t`, indexed `(previous - 1) * k + action - 1`.

        A conv whose input has full width costs the same for every previous
        action.
        """
        k = self.groups
        conv = self.prunable[t]
        table = np.zeros(k * k)
        for p in range(1, k + 1):
            for a in range(1, k + 1):
                table[(p - 1) * k + a - 1] = float(conv.macs(p if conv.gated_input else k, a))
        return table

    def head_macs_table(self):
        """`[k]` MACs of the head's first Dense for last action 1..k (full when not decided)."""
        k = self.groups
        first = self.head.layers[0]
        if self.head.in_ref is None:
            return np.full(k, float(self.head.in_shape[-1] * self.head.spatial * first.units))
        return np.arange(1, k + 1) * self._head_macs_per_group

    @property
    def q_width(self):
        """Q-values per decision in a stacked `[batch, T, n]` tensor: `k`, or `k + 1` when a block is skippable."""
        return self.groups + bool(self.skippable)

    @property
    def leaders(self):
        """The decisions the agent takes itself (every decision that is not tied), in order."""
        return [t for t in range(self.num_decisions) if t not in self.tied_to]

    @property
    def action_sources(self):
        """Per decision, the decision whose action it runs: itself, or its leader when tied."""
        return [self.tied_to.get(t, t) for t in range(self.num_decisions)]

    def decision_weight(self, t):
        """How many decisions take the action of decision `t` (itself and those tied to it)."""
        return 1 + sum(1 for u in self.tied_to.values() if u == t)

    @property
    def skip_columns(self):
        """Per decision of a skippable block, the decision whose 0 skips it (the first maps to itself)."""
        return {**{t: t for t in self.skippable}, **self.skipped_by}

    def live(self, actions):
        """Which decisions the agent took, float32 `[batch, T]`.

        0 for the later decisions of a skipped block and for tied decisions.
        Returns None when every decision is always taken.
        """
        if not self.skipped_by and not self.tied_to:
            return None
        actions = tf.cast(actions, tf.int32)
        columns = [
            tf.zeros_like(actions[:, t], tf.float32) if t in self.tied_to
            else tf.cast(actions[:, self.skipped_by[t]] > 0, tf.float32) if t in self.skipped_by
            else tf.ones_like(actions[:, t], tf.float32)
            for t in range(self.num_decisions)
        ]
        return tf.stack(columns, axis=1)

    @property
    def fixed_macs(self):
        """MACs that no action changes: the head's later Dense layers (and a full-width first one)."""
        return self._fixed_macs


def check_skippable(i, stage, allowed):
    """The stage's `"skippable"` key (default False), refused where there is no branch to skip.

    Args:
        i: the stage's index (named in the error).
        stage: a bottleneck or inverted residual stage.
        allowed: True for a block with an identity shortcut whose first
            branch conv is decided (the decision that takes the skip).

    Returns:
        The bool.
    """
    skippable = stage.get("skippable", False)
    if not isinstance(skippable, bool):
        raise ValueError(f"stages[{i}].skippable must be a bool. Received: skippable={skippable!r}")
    if skippable and not allowed:
        raise ValueError(
            f"stages[{i}]: only a block with an identity shortcut and a prunable first conv can be skipped "
            f"(the skip is its first decision's action 0). Received: stages[{i}]={stage!r}"
        )
    return skippable


def full_macs(backbone, image_shape, num_classes, groups=4):
    """MACs per image of a backbone description at full width, without building a model.

    Read from the plan's one MAC table (`NetworkPlan.full_macs`); no agent
    and no weights are created, so it is cheap enough to search over widths.

    Args:
        backbone: a backbone description dict (validated here).
        image_shape: `(height, width, channels)`.
        num_classes: classes of the classifier.
        groups: `k`. Defaults to 4.

    Returns:
        A float.

    Example:

    >>> full_macs(backbones.cifar_cnn(), (32, 32, 3), 10)
    33916160.0
    """
    spec = backbones.validate_backbone(backbone, groups)
    return build_plan(spec, image_shape, num_classes, groups).full_macs


def build_plan(backbone, image_shape, num_classes, groups):
    """Builds the layers of a validated backbone description and returns its plan.

    Layers are created in the order data flows (inside a bottleneck: its
    three convs, then the projection; inside an inverted residual: expand,
    depthwise, project), then the head, so that a seeded run
    initialises the same weights whatever walks the plan.

    Args:
        backbone: a description from `rnp_tf.backbones.validate_backbone`.
        image_shape: `(height, width, channels)`.
        num_classes: classes of the classifier.
        groups: `k`.

    Returns:
        A `NetworkPlan`.

    Example:

    >>> spec = backbones.validate_backbone(backbones.cifar_cnn((8, 8, 16, 16)), 4)
    >>> plan = build_plan(spec, (8, 8, 1), num_classes=10, groups=4)
    >>> plan.num_decisions, plan.stem.name
    (3, 'stem')
    """
    shape = (None, *image_shape)
    steps, convs = [], []
    decisions = 0
    width_ref = None  # decision whose action sets the current feature map's width

    def conv_step(name, filters, kernel_size, strides, padding, prunable, activation="relu",
                  normalization=True, eps=1e-3):
        nonlocal shape, width_ref, decisions
        layer = GatedConv2D(
            filters,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            normalization=normalization,
            groups=groups,
            gated_input=width_ref is not None,
            activation=activation,
            prunable_output=prunable,
            epsilon=eps,
            name=name,
        )
        layer.build(shape)
        decision = None
        if prunable:
            decision = decisions
            decisions += 1
        step = ConvStep(layer, decision, width_ref)
        convs.append(layer)
        shape = layer.compute_output_shape(shape)
        width_ref = decision
        return step

    def inverted_residual(i, stage):
        nonlocal shape
        if width_ref is not None:
            raise ValueError(f"stages[{i}]: an inverted residual's input must have full width.")
        block_in, eps, act = shape, stage["bn_epsilon"], stage["activation"]
        expanded = block_in[-1] * stage["expansion"]
        if stage["prunable"] and expanded % groups:
            raise ValueError(
                f"stages[{i}]: `groups` must divide the expanded channels of an inverted residual. "
                f"Received: groups={groups}, expanded channels={expanded}"
            )
        body = []
        if stage["expansion"] != 1:
            body.append(conv_step(f"block{i}_expand", expanded, 1, 1, "same", stage["prunable"], act, eps=eps))
        depthwise = GatedDepthwiseConv2D(
            kernel_size=stage["kernel_size"], groups=groups, strides=stage["strides"], padding=stage["padding"],
            gated_input=width_ref is not None, activation=act, epsilon=eps, name=f"block{i}_depthwise",
        )
        depthwise.build(shape)
        convs.append(depthwise)
        body.append(ConvStep(depthwise, None, width_ref))  # its output keeps the input's prefix: width_ref stays
        shape = depthwise.compute_output_shape(shape)
        body.append(conv_step(f"block{i}_project", stage["filters"], 1, 1, "same", False, "linear", eps=eps))
        identity = stage["strides"] == 1 and block_in[-1] == stage["filters"]
        residual = identity if stage["residual"] is None else stage["residual"]
        if residual and not identity:
            raise ValueError(
                f"stages[{i}]: an identity shortcut needs {stage['filters']} input channels and stride 1. "
                f"Received: input_shape={block_in}, strides={stage['strides']}"
            )
        skippable = check_skippable(i, stage, residual and stage["prunable"] and stage["expansion"] != 1)
        return InvertedResidualStep(tuple(body), residual, skippable, stage.get("tied", False))

    for i, stage in enumerate(backbone["stages"]):
        kind = stage["type"]
        if kind == "conv":
            stem = not convs
            name = "stem" if stem else (f"gated_conv_{i}" if stage["prunable"] else f"conv_{i}")
            steps.append(
                conv_step(
                    name, stage["filters"], stage["kernel_size"], stage["strides"], stage["padding"],
                    stage["prunable"], stage["activation"], stage["normalization"], stage["bn_epsilon"],
                )
            )
        elif kind == "pool":
            pool_class = keras.layers.MaxPooling2D if stage["mode"] == "max" else keras.layers.AveragePooling2D
            layer = pool_class(stage["size"], strides=stage["strides"], padding=stage["padding"], name=f"pool_{i}")
            shape = layer.compute_output_shape(shape)
            steps.append(MapStep(layer))
        elif kind == "zeropad":
            layer = keras.layers.ZeroPadding2D(stage["padding"], name=f"zeropad_{i}")
            shape = layer.compute_output_shape(shape)
            steps.append(MapStep(layer))
        elif kind == "inverted_residual":
            steps.append(inverted_residual(i, stage))
        else:
            if width_ref is not None:
                raise ValueError(f"stages[{i}]: a bottleneck's input must have full width (it feeds a sum).")
            block_in = shape
            f, s, e, eps = stage["filters"], stage["strides"], stage["expansion"], stage["bn_epsilon"]
            prune_a, prune_b = stage["prunable"]
            body = (
                conv_step(f"block{i}_a", f, 1, s, "valid", prune_a, eps=eps),
                conv_step(f"block{i}_b", f, 3, 1, "same", prune_b, eps=eps),
                conv_step(f"block{i}_c", f * e, 1, 1, "valid", False, activation="linear", eps=eps),
            )
            shortcut = None
            if stage["projection"]:
                after = shape
                shape, width_ref = block_in, None
                shortcut = conv_step(f"block{i}_shortcut", f * e, 1, s, "valid", False, activation="linear", eps=eps)
                shape = after
            elif block_in[-1] != f * e or s != 1:
                raise ValueError(
                    f"stages[{i}]: an identity shortcut needs {f * e} input channels and stride 1. "
                    f"Received: input_shape={block_in}, strides={s}; set projection=True"
                )
            skippable = check_skippable(i, stage, shortcut is None and prune_a)
            steps.append(BlockStep(body, shortcut, skippable, stage.get("tied", False)))
    if not decisions:
        raise ValueError("The backbone has no prunable conv: nothing for the agent to decide.")
    head_spec = backbone["head"]
    spatial = 1 if head_spec["pooling"] == "gap" else int(shape[1] * shape[2])
    width = shape[-1] * spatial
    layers = []
    for i, units in enumerate(head_spec["hidden"]):
        dense = keras.layers.Dense(units, activation="relu", name=f"fc_{i}")
        dense.build((None, width))
        layers.append(dense)
        width = units
    classifier = keras.layers.Dense(num_classes, name="classifier", dtype="float32")  # float32 logits
    classifier.build((None, width))
    layers.append(classifier)
    dropout = keras.layers.Dropout(head_spec["dropout"]) if head_spec["dropout"] else None
    layout = head_spec.get("layout", "spatial")
    head = Head(tuple(layers), head_spec["pooling"], tuple(shape[1:]), width_ref, dropout, layout)
    return NetworkPlan(steps, head, convs, groups)
