"""The sliced network the exporters build, on the one rollout.

- `load_checkpoint`: a trained model directory (`model_dir/model.keras`) to an
  `RNPModel`, with one-line errors for a missing directory, a missing or a
  corrupt file.
- `SlicedNetwork`: the network rebuilt from the model's public pieces (the
  stem, the prunable `GatedConv2D`s with BatchNorm folded by
  `folded_weights`, the pooling layers, the agent's weights and the head,
  all as constants) as plain TensorFlow functions that compute only the
  chosen channel prefixes, deciding as `RNPModel.rollout` does (penalty
  re-pricing, compute cap). Its graphs run the one loop,
  `rnp_tf.rollout.rollout`, with executors of their own. The penalty is a
  run-time input of every form (`penalty`, default: the model's penalty
  setting when the network was built), so one artifact serves every
  operating point; the compute cap is frozen in. Three forms, one per
  deployment target:

  * `batched(images, forced_actions, penalty)`: any batch size, per-sample
    actions by gather/scatter (`GatherScatterExecutor`: samples grouped by
    their (previous action, action) pair, one convolution per group on its
    weight slice; the groups stay narrow until a conv of full output or
    the head, whose results are stitched back in batch order). No control
    flow by default, so it converts to ONNX for TensorRT and runs in a
    SavedModel; with `skip_empty=True` (`rnp.onnx`, for onnxruntime) each
    group's convs sit in a `tf.cond` that skips an empty group.
  * `single(image, forced_actions, penalty)`: batch 1, the branch picked by
    a nested binary tree of `tf.cond` on the scalar action
    (`IfTreeExecutor`; ONNX `If` after freezing with lowered control flow).
  * `stem` / `sliced_conv` / `kept_conv` / `stretch` / `head`: the pieces
    of the TFLite signatures driven by `rnp_tf.tflite_runner`, one per
    (prunable conv, previous action, action) and, in residual networks,
    one per (block's last conv, input width): see `stretches`.

  Residual plans (bottleneck `BlockStep`s) run in every form, as the
  inference engine runs them: the block's inner convs on their prefixes,
  its last conv (full output) on the prefix its input holds, by input
  width (an `If` tree at batch 1, gather/scatter at batch N), the
  projection shortcut in full, then `relu(body + shortcut)`. So do
  MobileNetV2's `InvertedResidualStep`s: each branch of the expansion
  (its decided prefix) also runs the depthwise conv on that prefix and
  the projection (full output), then `+ input` with an identity shortcut.

  `forced_actions` is an int32 `[batch, num_prunable]` (or `[1, num_prunable]`,
  broadcast) tensor: 0 lets the agent choose greedily, 1..k forces that many
  groups. It is what lets the parity check run every action at every layer
  through the exported artifact itself.
- The parity check shared by every exporter: fixed inputs that drive
  different actions (`parity_images`), every action tuple or a set that
  covers every (previous action, action) pair at every layer
  (`action_tuples`), the reference `model.rollout` in inference mode
  (`reference`) and `compare`, which raises `ParityError` with the measured
  difference; the greedy check runs again at two penalties fed to the
  artifact (`knob_inputs`: the saved setting and a cheaper one at which the
  actions differ) against `model.set_penalty(p)` + `model.rollout`.
- The output folder: `open_checkpoint` checks everything the user gave
  before any work (`check_output`: the folder can be written;
  `prepare_target`: it holds no other model's export unless `--overwrite`),
  and `write_set` writes one export run's files as one set: produced and
  verified in a staging folder inside the output, committed by one rename,
  moved into place with `export_manifest.json` (the source checkpoint and
  its SHA-256, each exporter's files and parity results, each file's
  SHA-256); `recover` completes a set whose move was killed.
"""

import contextlib

import numpy as np

from export.exceptions import ExportError


# ------------------------------------------------------------ the network
def check_exportable(model):
    """Raises ExportError unless every step of the model's plan can be exported.

    Chains (a stem, prunable convs, pooling) and residual networks
    (bottleneck `BlockStep`s, MobileNetV2's `InvertedResidualStep`s, zero
    padding) export; a map step other than pooling or zero padding does not.
    """
    from rnp_tf import plan as plan_lib

    for step in model.plan.steps:
        if isinstance(step, plan_lib.MapStep) and pool_spec(step.layer) is None:
            raise ExportError(
                f"the exported graphs run pooling and zero padding between convs; this model has a "
                f"{type(step.layer).__name__} stage ({step.layer.name})"
            )
        if not isinstance(step, (plan_lib.ConvStep, plan_lib.MapStep, plan_lib.BlockStep,
                                 plan_lib.InvertedResidualStep)):
            raise ExportError(
                f"the exported graphs run chains, ResNet bottlenecks and inverted residuals; this model has a "
                f"{type(step).__name__} step"
            )


def is_depthwise(layer):
    """Whether a conv layer is an inverted residual's depthwise conv (`rnp_tf.layers.GatedDepthwiseConv2D`)."""
    from rnp_tf.layers import GatedDepthwiseConv2D

    return isinstance(layer, GatedDepthwiseConv2D)


def pool_spec(layer):
    """A Keras map layer as a tuple: pooling `(mode, pool_size, strides, padding)`, or `("pad", padding, None, None)`.

    `mode` is `"max"` or `"avg"` with upper-case padding; zero padding gives
    its `((top, bottom), (left, right))`. None for any other layer.
    """
    import keras

    if isinstance(layer, keras.layers.ZeroPadding2D):
        return ("pad", tuple(tuple(int(v) for v in side) for side in layer.padding), None, None)
    if "Pooling" not in type(layer).__name__:
        return None
    return (
        "avg" if "average" in type(layer).__name__.lower() else "max",
        tuple(layer.pool_size),
        tuple(layer.strides),
        layer.padding.upper(),
    )


class SlicedNetwork:
    """An RNPModel rebuilt as TensorFlow functions that compute only the chosen prefixes.

    Built from the model's public pieces: `stem`, `prunable` (BatchNorm
    folded into the kernel with `GatedConv2D.folded_weights`, one folded
    kernel per input width since each width has its own BatchNorm set), the
    pooling layers of `model.plan`, the agent's weights
    (`DecisionAgent.weights_of`, run by `rnp_tf.agent.equations`) and
    `head_layers`. `batched`, `single` and `full` run
    `rnp_tf.rollout.rollout` on `model.plan` with this network's policy
    (`KnobPolicy`), agent (`ConstantAgent`) and an executor each
    (`GatherScatterExecutor`, `IfTreeExecutor`, `FullExecutor`). Greedy
    decisions go through `RNPModel.greedy_q` (the run-time knob: Q-values
    re-priced to the penalty, masked by the compute cap). The penalty is
    an input of the graphs (`penalty`: a float32 scalar, `[1]` or
    `[batch]` tensor); when it is not given, the model's
    `penalty_setting` when the network was built (`penalty_setting`) is
    used. The compute cap is read when the network is built and frozen in.
    Every weight is a float32 constant, so no exported graph holds a
    variable.

    Every prunable convolution `t` is a *segment*: the convolution on the
    weight prefix `W[:, :, :in_prefix, :out_prefix]`, its activation and the
    pooling layers that follow it up to the next prunable convolution (or
    the head).

    Graph-building methods run inside `with net.constants():` (the
    top-level functions `batched`, `single` and `full` do it themselves), so
    that each weight is one constant per graph, sliced where it is used.

    Args:
        model: a built `rnp_tf.RNPModel` (a chain or a residual backbone).
        action_tuples: optional int `[n, T]` action tuples: build only the
            (previous action, action) branches and heads they use (a
            benchmark of a few operating points on a large network, where
            all `k * k` weight slices per layer would weigh too much).
            Other actions then have no branch: force only these tuples.
            None (default): every branch.

    Example:

    >>> net = SlicedNetwork(model)
    >>> fn = tf.function(net.batched)
    >>> out = fn(images, tf.zeros([1, net.num_prunable], tf.int32))  # greedy
    >>> out = fn(images, tf.zeros([1, net.num_prunable], tf.int32), tf.constant([-0.5]))  # cheaper
    """

    def __init__(self, model, action_tuples=None):
        import tensorflow as tf

        check_exportable(model)
        self._tf = tf
        self.model = model
        self.groups = int(model.groups)
        self.num_prunable = int(model.num_prunable)
        self.image_shape = tuple(int(d) for d in model.image_shape)
        self.num_classes = int(model.num_classes)
        self._walk(model.plan)
        stem = model.stem
        self.stem_conv = (int(stem.strides), getattr(stem, "padding", "same").upper(), stem.activation)
        self.stem_channels = int(stem.filters)
        self.convs = [
            (int(c.strides), getattr(c, "padding", "same").upper(), c.activation) for c in model.prunable
        ]
        self.gated = [bool(c.gated_input) for c in model.prunable]
        self.skippable = set(model.plan.skippable)  # decisions whose action 0 skips their block
        self.skipped_by = dict(model.plan.skipped_by)
        self.full_in = [int(c.in_channels) for c in model.prunable]
        self.in_group = [int(c.in_group_size) if c.gated_input else None for c in model.prunable]
        self.out_group = [int(c.group_size) for c in model.prunable]
        self.out_channels = [int(c.filters) for c in model.prunable]
        self.conv_ops = {  # every conv's (strides, padding, activation)
            c.name: (int(c.strides), getattr(c, "padding", "same").upper(), c.activation) for c in model.plan.convs
        }
        head_ref = model.plan.head.in_ref
        # channels per group of the map feeding the head (None: it keeps its full width)
        self.head_group = None if head_ref is None else int(model.prunable[head_ref].group_size)
        self.head_full = int(model.plan.head.in_shape[-1])
        self.flatten = model.backbone["head"]["pooling"] != "gap"
        self._pairs, self._heads = self._restriction(action_tuples)
        self._arrays = self._extract(model)
        self._decision_settings(model)
        # MACs: the plan's table (`NetworkPlan.conv_macs_table`, `head_macs_table`,
        # `fixed_macs`), the stem (and every other conv of full input and
        # output) counted in the fixed part; a conv of full output on a
        # narrow input (a bottleneck's last conv) by the action setting its input.
        fixed = 0.0
        self.tail_macs = {}
        for step in model.plan.conv_steps():
            if step.decision is None and step.in_ref is None:
                fixed += float(step.layer.full_macs)
            elif step.decision is None:  # a tail's convs add up (an inverted residual's depthwise and projection)
                macs = np.asarray([float(step.layer.macs(p, self.groups)) for p in range(1, self.groups + 1)])
                self.tail_macs[step.in_ref] = self.tail_macs.get(step.in_ref, 0.0) + macs
        self.fixed_macs = fixed + float(model.plan.fixed_macs)
        self.head_macs = {a: float(m) for a, m in enumerate(self.head_macs_table(), start=1)}
        self._consts = None
        self._kernel_mode = None  # see `kernels_as_inputs`
        self.channels_first = False  # the maps' layout while a graph is traced (see `batched`)

    def _walk(self, plan):
        """Splits the plan into *stretches*: what runs between two convs whose weights follow an action.

        Such a conv is a prunable conv `t` (its (previous action, action)
        branch) or the convs that run on the narrow input decision `t` set,
        by its width: a *tail* (a bottleneck's last conv, of full output; an
        inverted residual's depthwise conv and projection, `tails[t]` in
        order). `stretches["stem"]` holds everything before the first of
        them, `stretches[("conv", t)]` and `stretches[("tail", t)]` what
        follows each, as ops `("map", pool_spec)`, `("conv", ConvStep)` (full
        input and output), `("open", shortcut ConvStep or None)` (a block
        begins: its shortcut is taken from the current map),
        `("residual",)` (`relu(h + shortcut)`) and `("add",)` (an inverted
        residual's `h + shortcut`). `decides[key]` is the decision
        taken on a stretch's last map, if any; `before[t]` the stretch
        that ends at decision `t`'s conv. The TFLite signatures are
        built from these; the graphs of `batched`, `single` and `full` walk
        the plan with `rnp_tf.rollout.rollout`.
        """
        from rnp_tf import plan as plan_lib

        key, hw = "stem", tuple(self.image_shape[:2])
        self.stretches = {"stem": []}
        self.before = {}  # decision -> the stretch that ends at its conv
        self.in_hw, self.out_hw = [None] * self.num_prunable, [None] * self.num_prunable
        self.conv_in_hw = {}
        # The tail after decision t: its conv layers (`tails[t]`); per stretch,
        # the `(H, W, C)` of the first block it ends (its shortcut's shape).
        self.tails, self.block_out = {}, {}

        def conv(step):
            nonlocal key, hw
            self.conv_in_hw[step.layer.name] = hw
            if step.decision is not None:
                self.before[step.decision] = key
                self.in_hw[step.decision] = hw
                key = ("conv", step.decision)
            elif step.in_ref is not None:
                if key == ("tail", step.in_ref):  # an inverted residual's projection after its depthwise conv
                    self.tails[step.in_ref].append(step.layer)
                    hw = tuple(step.layer.output_hw)
                    return
                self.tails[step.in_ref] = [step.layer]
                key = ("tail", step.in_ref)
            else:
                self.stretches[key].append(("conv", step))
                hw = tuple(step.layer.output_hw)
                return
            self.stretches[key] = []
            hw = tuple(step.layer.output_hw)
            if key[0] == "conv":
                self.out_hw[key[1]] = hw

        for step in plan.steps:
            if isinstance(step, plan_lib.MapStep):
                self.stretches[key].append(("map", pool_spec(step.layer)))
                hw = tuple(step.layer.compute_output_shape((None, *hw, 1))[1:3])
                if key[0] == "conv" and all(op[0] == "map" for op in self.stretches[key]):
                    self.out_hw[key[1]] = hw
            elif isinstance(step, plan_lib.BlockStep):
                self.stretches[key].append(("open", step.shortcut))
                if step.shortcut is not None:
                    self.conv_in_hw[step.shortcut.layer.name] = hw
                for inner in step.body:
                    conv(inner)
                self.stretches[key].append(("residual",))
                self.block_out.setdefault(key, (*hw, int(step.body[-1].layer.filters)))
            elif isinstance(step, plan_lib.InvertedResidualStep):
                if step.residual:
                    self.stretches[key].append(("open", None))
                for inner in step.body:
                    conv(inner)
                if step.residual:
                    self.stretches[key].append(("add",))
                    self.block_out.setdefault(key, (*hw, int(step.body[-1].layer.filters)))
            else:
                conv(step)
        self.head_hw = hw
        # the agent decides at the end of these stretches (a tied decision takes its leader's action: no agent)
        self.decides = {key: t for t, key in self.before.items() if t not in plan.tied_to}

        def leading_maps(ops):
            maps = []
            for op in ops:
                if op[0] != "map":
                    break
                maps.append(op[1])
            return maps

        stem_ops = self.stretches["stem"]
        after_stem = next(i for i, op in enumerate(stem_ops) if op[0] == "conv") + 1
        self.pre_pools = leading_maps(stem_ops[after_stem:])
        self.post_pools = [leading_maps(self.stretches[("conv", t)]) for t in range(self.num_prunable)]

    def _restriction(self, action_tuples):
        """Per layer, the (previous action, action) pairs of `action_tuples`; the last actions."""
        if action_tuples is None:
            return None, None
        k, T = self.groups, self.num_prunable
        tuples = np.asarray(action_tuples)
        low = np.ones(T, int)
        low[sorted(self.model.plan.skip_columns)] = 0  # where 0 (a skipped block) may appear
        if tuples.ndim != 2 or tuples.shape[1] != T or len(tuples) == 0 or (tuples < low).any() or tuples.max() > k:
            raise ValueError(
                f"`action_tuples` must be ints in 1..{k} (0 at a skippable block's decisions) of shape [n, {T}]. "
                f"Received: action_tuples={action_tuples!r}"
            )
        previous = np.concatenate([np.full((len(tuples), 1), k), tuples[:, :-1]], axis=1)
        pairs = [  # a skipped block's decisions need no branch
            sorted({(int(p) if self.varies(t) else k, int(a)) for p, a in zip(previous[:, t], tuples[:, t]) if a})
            for t in range(T)
        ]
        return pairs, sorted({int(a) for a in tuples[:, -1]})

    def _decision_settings(self, model):
        """The run-time knob of `RNPModel.rollout`'s greedy choice: the default penalty, the frozen cap."""
        self.penalty_setting = float(model.penalty_setting)
        cap = getattr(model, "compute_cap_macs", None)
        self.cap = None if cap is None else float(cap)

    def _extract(self, model):
        """Every weight as a float32 numpy array (BatchNorm folded)."""
        k = self.groups
        arrays = {}
        kernel, bias = model.stem.folded_weights(k, k)
        arrays["stem"] = (np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
        for t, conv in enumerate(model.prunable):
            # the full width's set always: `full` runs it
            for p in sorted({p for p, _ in self.branches(t)} | {k}):
                # Full kernel folded with the BatchNorm set of input width p;
                # (p, a) uses its prefix [:, :, :in_prefix(p), :a * group].
                kernel, bias = conv.folded_weights(p, k)
                arrays[("conv", t, p)] = (np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
        for step in model.plan.conv_steps():  # convs that keep their full output, the stem's own above
            if step.decision is None and step.layer is not model.stem:
                for p in range(1, k + 1) if step.in_ref is not None else (k,):
                    kernel, bias = step.layer.folded_weights(p, k)
                    arrays[("kept", step.layer.name, p)] = (np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
        first = model.head_layers[0]
        head = model.plan.head
        # Channel-major rows, so that the first a groups are a row prefix (no
        # copy when the head's layout already is).
        kernel = head.relayout(np.asarray(first.kernel, np.float32), head.layout, "channel")
        arrays["head0"] = (np.ascontiguousarray(kernel), self._bias(first), first.activation)
        for i, dense in enumerate(model.head_layers[1:]):
            arrays[("head", i + 1)] = (np.asarray(dense.kernel, np.float32), self._bias(dense), dense.activation)
        agent = model.agent
        self.units = int(agent.units)
        self.agent_channels = [int(c) for c in agent.feature_channels]
        for t in model.plan.leaders:  # a tied decision has no weights: the agent does not run there
            weights = agent.weights_of(t)  # what `rnp_tf.agent.equations` reads
            for name in ("encoder", "decoder"):
                arrays[(name, t)] = tuple(np.asarray(w, np.float32) for w in weights[name])
        arrays["lstm"] = tuple(np.asarray(w, np.float32) for w in weights["lstm"])  # shared by every layer
        self.lstm_activation = weights["activation"]
        self.lstm_recurrent_activation = weights["recurrent_activation"]
        return arrays

    @staticmethod
    def _bias(layer):
        if getattr(layer, "use_bias", True) and getattr(layer, "bias", None) is not None:
            return np.asarray(layer.bias, np.float32)
        return np.zeros(int(layer.kernel.shape[-1]), np.float32)

    # ------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def constants(self):
        """Scope of one graph: each weight becomes one constant, created on first use.

        A constant made in one `tf.cond` branch cannot be used in another,
        so `single` creates the shared ones up front; what one branch alone
        uses (its conv's weight slice, its head's row prefix) is created in
        that branch, so that it is a constant of the branch itself: a slice
        of an outer constant would be computed at run time (onnxruntime
        then slices, transposes and re-packs the weights at every call).
        """
        outer = self._consts
        self._consts = {}
        try:
            yield
        finally:
            self._consts = outer

    def _kernel(self, name, array):
        """A conv or dense kernel, made once per graph (see `constants`) under its unique `name`.

        A constant, or under `kernels_as_inputs` the input standing in for
        it, or under `recording_kernels` zeros of its shape.
        """
        tf = self._tf
        if ("kernel", name) not in self._graph_consts():
            mode = self._kernel_mode
            if mode is None:
                tensor = tf.constant(array)
            elif mode["tensors"] is None:  # recording: no weight in the graph
                mode["arrays"][name] = array
                tensor = tf.zeros(array.shape, tf.float32)
            else:
                tensor = mode["tensors"][name]
            self._consts[("kernel", name)] = tensor
        return self._consts[("kernel", name)]

    @contextlib.contextmanager
    def recording_kernels(self):
        """Within it, graphs built record their kernels and hold zeros (a `Fill` op) in their place.

        Yields:
            A dict, filled as graphs are built: kernel name -> float32
            array (a view of the network's weights).

        Example:

        >>> with net.recording_kernels() as kernels:
        ...     tf.function(net.full).get_concrete_function(tf.TensorSpec([1, 32, 32, 3]))
        >>> megabytes = sum(a.nbytes for a in kernels.values()) / 2**20
        """
        mode = {"arrays": {}, "tensors": None}
        self._kernel_mode = mode
        try:
            yield mode["arrays"]
        finally:
            self._kernel_mode = None

    def kernels_as_inputs(self, method, input_signature):
        """`method` traced with every conv and dense kernel as an extra input instead of a constant.

        For converters that copy every constant many times (tf2onnx held 20
        to 50 times the weights at its peak, so VGG-16 at 224x224 did not
        convert in 24 GB): the graph they convert holds no large weight,
        and `export.onnx.bind_kernels` puts the arrays back into the
        converted model as initializers. Inputs are named after the
        kernels (`kernel_conv<t>_p<previous>_in<ci>_out<co>`,
        `kernel_head0_rows<rows>`, ...). `method` is traced twice: once to
        find the kernels it uses, once with them as inputs.

        Args:
            method: a graph method, for example `net.batched`.
            input_signature: its `tf.TensorSpec`s.

        Returns:
            `(fn, signature, kernels)`: a `tf.function` taking the original
            inputs followed by the kernels, its full signature, and the
            kernels as `{name: float32 array}` in input order.

        Example:

        >>> fn, sig, kernels = net.kernels_as_inputs(net.full, [tf.TensorSpec([None, 32, 32, 3])])
        >>> out = fn(images, *kernels.values())  # the same as net.full(images)
        """
        tf = self._tf
        with self.recording_kernels() as kernels:
            tf.function(method, input_signature=input_signature, autograph=False).get_concrete_function()
        n = len(input_signature)
        signature = list(input_signature) + [
            tf.TensorSpec(array.shape, tf.float32, name=name) for name, array in kernels.items()
        ]

        def fn(*args):
            self._kernel_mode = {"arrays": {}, "tensors": dict(zip(kernels, args[n:]))}
            try:
                return method(*args[:n])
            finally:
                self._kernel_mode = None

        return tf.function(fn, input_signature=signature, autograph=False), signature, kernels

    def _graph_consts(self):
        """The constants of the graph being traced (see `constants`)."""
        if self._consts is None:
            raise RuntimeError("SlicedNetwork graph methods must run inside `with net.constants():`")
        return self._consts

    def _const(self, key, index=0):
        tf = self._tf
        if (key, index) not in self._graph_consts():
            self._consts[(key, index)] = tf.constant(self._arrays[key][index])
        return self._consts[(key, index)]

    def _all_constants(self):
        """Makes up front the constants that several `tf.cond` branches share (`single`, `batched(skip_empty=True)`)."""
        for key, value in self._arrays.items():
            kind = key[0] if isinstance(key, tuple) else key
            for index, item in enumerate(value):
                if kind in ("conv", "kept") or index == 0 and kind in ("head0", "stem", "encoder", "decoder"):
                    continue  # one branch each (`segment`, `_dense`), or used outside the branches only
                if kind == "head" and index == 0:
                    self._dense_kernel(key)  # shared by every head branch
                elif isinstance(item, np.ndarray):
                    self._const(key, index)

    def previous_actions(self, t):
        """The previous actions that can feed prunable conv `t` (the stem's output is always full)."""
        return list(range(1, self.groups + 1)) if self.varies(t) else [self.groups]

    def varies(self, t):
        """Whether the input width of prunable conv `t` follows the previous decision."""
        return t > 0 and self.gated[t]

    def branches(self, t):
        """The (previous action, action) pairs of prunable conv `t` (those built)."""
        if self._pairs is not None:
            return list(self._pairs[t])
        return [(p, a) for p in self.previous_actions(t) for a in range(1, self.groups + 1)]

    def heads(self):
        """The last actions whose head is built."""
        return list(self._heads) if self._heads is not None else list(range(1, self.groups + 1))

    def in_channels(self, t, p):
        """Input channels of prunable conv `t` after previous action `p`."""
        return p * self.in_group[t] if self.varies(t) else self.full_in[t]

    def macs_of(self, actions):
        """MACs per sample for an int array `[n, T]` (numpy float64; `spent` in numpy; 0: a skipped block).

        A tied decision counts at its leader's action, as `NetworkPlan.macs`.
        """
        actions = np.asarray(actions).reshape(-1, self.num_prunable)
        actions = actions[:, self.model.plan.action_sources]
        k1 = self.groups + 1
        total = np.full(len(actions), self.fixed_macs)
        prev = np.full(len(actions), self.groups)
        for t in range(self.num_prunable):
            total += self.skip_macs_table(t)[prev * k1 + actions[:, t]]
            prev = actions[:, t]
        for t, table in self.tail_macs.items():
            total += np.concatenate([[0.0], table])[actions[:, t]]
        return total + np.concatenate([[0.0], self.head_macs_table()])[prev]

    def skip_macs_table(self, t):
        """`[(k + 1) * (k + 1)]` MACs of conv `t`, indexed `previous * (k + 1) + action`, 0 for a skipped block.

        Action 0 (a skipped block's) costs nothing; a conv whose input has
        full width costs the same after a previous action 0 as after any.
        """
        k = self.groups
        base = self.macs_table(t)
        table = np.zeros((k + 1) * (k + 1))
        for p in range(k + 1):
            if p == 0 and self.varies(t):
                continue
            for a in range(1, k + 1):
                table[p * (k + 1) + a] = base[((p or k) - 1) * k + a - 1]
        return table

    def macs_constant(self, values):
        """MAC counts as an int64 constant.

        The graphs add MACs in int64 and cast the total to float32 at the
        end: exact, and out of reach of TFLite's float16 quantisation, which
        would store float constants as float16 (clipped at 65504).
        """
        tf = self._tf
        return tf.constant(np.rint(np.asarray(values, np.float64)).astype(np.int64))

    def head_macs_table(self):
        """`[k]` MACs of the head's first Dense for last action 1..k (`NetworkPlan.head_macs_table`).

        Zeros when the head's input keeps its full width: `fixed_macs` counts it then.
        """
        if self.head_group is None:
            return np.zeros(self.groups)
        return self.model.plan.head_macs_table()

    def macs_table(self, t):
        """`[k * k]` MACs of conv `t`, indexed `(previous - 1) * k + action - 1` (`NetworkPlan.conv_macs_table`)."""
        return self.model.plan.conv_macs_table(t)

    def pool(self, h, pools):
        """`h` through pooling (and zero padding) layers given as `pool_spec`s, in order."""
        tf = self._tf
        for mode, size, strides, padding in pools:
            if mode == "pad":
                sides = [list(size[0]), list(size[1])]
                h = tf.pad(h, [[0, 0], [0, 0], *sides] if self.channels_first else [[0, 0], *sides, [0, 0]])
                continue
            pool = tf.nn.max_pool2d if mode == "max" else tf.nn.avg_pool2d
            h = pool(h, ksize=size, strides=strides, padding=padding, data_format=self._format)
        return h

    @property
    def _format(self):
        return "NCHW" if self.channels_first else "NHWC"

    def channels(self, h):
        """The channel count of a map in the current layout."""
        return h.shape[1] if self.channels_first else h.shape[-1]

    def map_shape(self, hw, channels):
        """`[-1, ...]`: the shape of a batch of maps of `hw` and `channels` in the current layout."""
        return [-1, channels, hw[0], hw[1]] if self.channels_first else [-1, hw[0], hw[1], channels]

    def zeros_map(self, hw, channels):
        """Zeros of one map of `hw` and `channels` in the current layout (batch 1)."""
        return self._tf.zeros([1, *self.map_shape(hw, channels)[1:]])

    def first_channels(self, h, channels):
        """`h` cut to its first `channels` channels, or zero-padded to them."""
        have = self.channels(h)
        if channels < have:
            return h[:, :channels] if self.channels_first else h[..., :channels]
        if channels > have:
            pad = [[0, 0], [0, channels - have], [0, 0], [0, 0]]
            return self._tf.pad(h, pad if self.channels_first else [pad[0], pad[2], pad[3], pad[1]])
        return h

    def _conv(self, h, kernel, bias, conv):
        tf = self._tf
        strides, padding, activation = conv
        y = tf.nn.conv2d(h, kernel, strides=strides, padding=padding, data_format=self._format)
        return activation(tf.nn.bias_add(y, bias, data_format=self._format))

    def _dense(self, x, key, rows=None):
        tf = self._tf
        return self._arrays[key][2](tf.matmul(x, self._dense_kernel(key, rows)) + self._const(key, 1))

    def _dense_kernel(self, key, rows=None):
        """The kernel of a head Dense layer, or its first `rows` rows, made once per graph.

        A row prefix is its own constant (see `constants`); a graph holding
        the whole kernel once per head (VGG-16: 411 MB) would also pass
        protobuf's 2 GB.
        """
        full = self._arrays[key][0]
        rows = full.shape[0] if rows is None else rows
        name = "kernel_" + (key if isinstance(key, str) else "_".join(map(str, key))) + f"_rows{rows}"
        return self._kernel(name, full[:rows])

    # ------------------------------------------------------------ decisions
    def initial_state(self, n):
        """Zero LSTM state `[h, c]` for `n` samples."""
        tf = self._tf
        zeros = tf.zeros(tf.stack([n, self.units]), tf.float32)
        return [zeros, zeros]

    def penalties(self, penalty, n):
        """The run-time penalty of each sample, float32 `[n]`.

        Args:
            penalty: None (the default, `penalty_setting`), a float, or a
                float tensor of shape `[]`, `[1]` or `[n]`.
            n: the batch size (an int or a scalar int32 tensor).
        """
        tf = self._tf
        if penalty is None:
            penalty = self.penalty_setting
        penalty = tf.reshape(tf.cast(penalty, tf.float32), [-1])
        return penalty + tf.zeros(tf.stack([n]), tf.float32)

    def agent_step(self, t, pooled, state):
        """`rnp_tf.agent.equations` on the agent's constants (a channel prefix is zero-padded).

        Args:
            t: decision index.
            pooled: `[n, c]` pooled features (`c` up to the agent's width).
            state: `[h, c]` LSTM state.

        Returns:
            `(q_values [n, k], [h, c])` (raw Q-values, before re-pricing).
        """
        from rnp_tf import agent as agent_lib
        from rnp_tf import rollout as rollout_lib

        def dense(key):  # the kernel as the head's (`kernels_as_inputs` makes it an input)
            return self._dense_kernel(key), self._const(key, 1)

        return agent_lib.equations(
            rollout_lib.pad_channels(pooled, self.agent_channels[t]),
            state,
            encoder=dense(("encoder", t)),
            lstm=tuple(self._const("lstm", i) for i in range(3)),
            decoder=dense(("decoder", t)),
            activation=self.lstm_activation,
            recurrent_activation=self.lstm_recurrent_activation,
        )

    def policy(self, penalties=None, forced=None):
        """The exported graphs' policy (`KnobPolicy`) at run-time `penalties`, with optional `forced` actions."""
        return KnobPolicy(self.model, self.penalty_setting if penalties is None else penalties, forced)

    def start_spent(self, n):
        """MACs before the first decision's conv (`[n]` int64): the fixed part."""
        tf = self._tf
        return tf.fill(tf.stack([n]), self.macs_constant(self.fixed_macs))

    def spent(self, actions, n):
        """Float32 `[n]` MACs of a rollout's actions, summed exactly in int64 (see `macs_constant`).

        Args:
            actions: the int32 `[n]` action of every decision, in order.
            n: the batch size (an int or a scalar int32 tensor).
        """
        tf = self._tf
        k = self.groups
        spent, prev = self.start_spent(n), None
        for t, action in enumerate(actions):  # action 0: a skipped block, nothing spent
            prev = tf.fill(tf.shape(action), k) if prev is None else prev
            spent = spent + tf.gather(self.macs_constant(self.skip_macs_table(t)), prev * (k + 1) + action)
            prev = action
        for t, table in self.tail_macs.items():  # full-output convs on decision t's prefix
            spent = spent + tf.gather(self.macs_constant(np.concatenate([[0.0], table])), actions[t])
        head = self.macs_constant(np.concatenate([[0.0], self.head_macs_table()]))
        return tf.cast(spent + tf.gather(head, prev), tf.float32)

    def greedy_q_numpy(self, q, actions, penalty=None):
        """`RNPModel.greedy_q` of every decision, numpy `[n, T, k]` (for choosing parity images).

        Args:
            q: raw Q-values `[n, T, k]`.
            actions: the int actions `[n, T]` taken.
            penalty: the run-time penalty (default: `penalty_setting`).
        """
        import tensorflow as tf

        actions = tf.constant(np.asarray(actions, np.int32))
        penalty = self.penalty_setting if penalty is None else float(penalty)
        return np.stack(
            [
                self.model.greedy_q(t, tf.constant(q[:, t]), [actions[:, u] for u in range(t)], penalty).numpy()
                for t in range(self.num_prunable)
            ],
            axis=1,
        )

    def pooled(self, h, channels=None):
        """Global average of a (narrow) map, zero-padded to `channels`."""
        tf = self._tf
        from rnp_tf import rollout as rollout_lib

        axes = [2, 3] if self.channels_first else [1, 2]
        return rollout_lib.pad_channels(tf.reduce_mean(h, axis=axes), channels or self.channels(h))

    # ------------------------------------------------------------ segments
    def sliced_conv(self, t, h, previous=None, action=None):
        """One convolution on its weight slice, activated: the stem, or prunable conv `t`.

        Args:
            t: the decision index of a prunable conv, or None for the stem
                (full width).
            h: the input, holding exactly `previous` groups.
            previous: the previous action (unused when the input has full width).
            action: output groups to compute.

        Returns:
            A map with `action * out_group[t]` channels (the stem: all).
        """
        tf = self._tf
        if t is None:
            return self._conv(h, self._kernel("kernel_stem", self._arrays["stem"][0]), self._const("stem", 1),
                              self.stem_conv)
        ci, co = self.in_channels(t, previous), action * self.out_group[t]
        key = ("conv", t, previous if self.varies(t) else self.groups)
        kernel, bias = self._arrays[key]
        # the branch's own slice (see `constants`)
        kernel = self._kernel(f"kernel_conv{t}_p{key[2]}_in{ci}_out{co}", kernel[:, :, :ci, :co])
        if (key, ci, co) not in self._consts:
            self._consts[(key, ci, co)] = tf.constant(bias[:co])
        return self._conv(h, kernel, self._consts[(key, ci, co)], self.convs[t])

    def stem(self, images):
        """Stem conv (full width) and what follows it up to the first prunable conv (`stretches["stem"]`)."""
        return self.stretch("stem", images)[0]

    def kept_conv(self, layer, h, previous=None):
        """A conv with no decision of its own, activated.

        The stem, a projection, a bottleneck's last conv, an inverted
        residual's depthwise conv (its output keeps its input's prefix) or
        projection.

        Args:
            layer: its `GatedConv2D` (or `GatedDepthwiseConv2D`).
            h: the input, holding exactly `previous` groups when the input
                width follows an action, else full.
            previous: the action that set the input width (None: full).

        Returns:
            The full output map (a depthwise conv: the input's channels).
        """
        if layer is self.model.stem:
            return self.sliced_conv(None, h)
        p = self.groups if previous is None or not layer.gated_input else previous
        kernel, bias = self._arrays[("kept", layer.name, p)]
        kernel = self._kernel(f"kernel_{layer.name}_p{p}", kernel)
        key = ("kept", layer.name, p)
        if key not in self._graph_consts():
            self._consts[key] = self._tf.constant(bias)
        if is_depthwise(layer):  # a depthwise kernel (k, k, prefix, 1): the output keeps the prefix
            s = int(layer.strides)
            y = self._tf.nn.depthwise_conv2d(h, kernel, strides=[1, s, s, 1] if not self.channels_first else
                                             [1, 1, s, s], padding=layer.padding.upper(), data_format=self._format)
            return layer.activation(self._tf.nn.bias_add(y, self._consts[key], data_format=self._format))
        return self._conv(h, kernel, self._consts[key], self.conv_ops[layer.name])

    def tail(self, t, h, previous):
        """The tail of decision `t` (`tails[t]`) on `h`, holding exactly `previous` groups.

        A bottleneck's last conv, or an inverted residual's depthwise conv
        (on the prefix, folded with the BatchNorm set of that width) then its
        projection (full output): each by `kept_conv`.
        """
        for layer in self.tails[t]:
            h = self.kept_conv(layer, h, previous)
        return h

    def residual(self, h, shortcut):
        """A residual block's end: `relu(h + shortcut)`."""
        return self._tf.nn.relu(h + shortcut)

    def add(self, h, shortcut):
        """An inverted residual's end: `h + shortcut` (no activation)."""
        return h + shortcut

    def stretch(self, key, h, shortcut=None):
        """Runs `stretches[key]` on `h` (a stretch starting inside a block takes the block's `shortcut`).

        `h` None stands for a skipped block's branch: the stretch after the
        block's last conv then starts from the block's sum with nothing
        (`relu(shortcut)` after a bottleneck, `shortcut` after an inverted
        residual), with no map of zeros to add.

        Returns:
            `(map, shortcut)`: the last map and the shortcut of a block
            still open at the stretch's end (None if none is).
        """
        for op in self.stretches[key]:
            if op[0] == "map":
                h = self.pool(h, [op[1]])
            elif op[0] == "conv":
                h = self.kept_conv(op[1].layer, h)
            elif op[0] == "open":
                shortcut = h if op[1] is None else self.kept_conv(op[1].layer, h)
            elif op[0] == "add":
                h, shortcut = shortcut if h is None else self.add(h, shortcut), None
            else:
                h, shortcut = self._tf.nn.relu(shortcut) if h is None else self.residual(h, shortcut), None
        return h, shortcut

    def skip_end(self, t):
        """For skippable decision `t`: `(last, key)`, the block's last decision and the stretch after the block.

        Skipping the block at `t` sets decisions `t..last` to 0 and
        continues with `stretches[key]` on the block's shortcut
        (`stretch(key, None, shortcut)`).

        Example:

        >>> net.skip_end(0)  # a bottleneck deciding 0 and 1, its last conv a tail of 1
        (1, ('tail', 1))
        """
        if t not in self.skippable:
            raise ValueError(f"Decision {t} does not skip a block. Received: t={t}")
        last = max([t] + [u for u, first in self.skipped_by.items() if first == t])
        key = ("tail", last) if last in self.tails else ("conv", last)
        if not self.closes_block(key):
            raise ValueError(f"The stretch after decision {last} does not end the block of decision {t}.")
        return last, key

    def opens_block(self, key):
        """Whether a block is still open at the end of stretch `key` (its shortcut must be carried on)."""
        kinds = [op[0] for op in self.stretches[key] if op[0] in ("open", "residual", "add")]
        return bool(kinds) and kinds[-1] == "open"

    def closes_block(self, key):
        """Whether stretch `key` ends a block opened in an earlier stretch (it needs the shortcut)."""
        kinds = [op[0] for op in self.stretches[key] if op[0] in ("open", "residual", "add")]
        return bool(kinds) and kinds[0] in ("residual", "add")

    def segment(self, t, h, previous, action, pools=None, tail=()):
        """Prunable conv `t` on `h` (holding exactly `previous` groups), then its pools, then `tail`.

        Args:
            t, h, previous, action: as `sliced_conv`.
            pools: the `pool_spec`s that follow (default: `post_pools[t]`).
            tail: convs that run on the `action` groups (an inverted
                residual's depthwise conv and projection, `kept_conv`).

        Returns:
            A map with `action * out_group` channels (the last tail conv's
            full output when there is a tail).
        """
        h = self.pool(self.sliced_conv(t, h, previous, action), self.post_pools[t] if pools is None else pools)
        for layer in tail:
            h = self.kept_conv(layer, h, action)
        return h

    def segment_channels(self, t, tail=()):
        """Full channels of the map a segment of prunable conv `t` (and its `tail` convs) outputs."""
        return int(tail[-1].filters) if tail else self.out_channels[t]

    def head_channels(self, action):
        """Channels of the map feeding the head after last action `action` (all when its width is fixed)."""
        return self.head_full if self.head_group is None or action is None else action * self.head_group

    def head(self, h, action):
        """Logits from the last feature map, holding `action` groups (None: its full width)."""
        tf = self._tf
        ch = self.head_channels(action)
        if self.flatten:  # channel-major rows
            hf, wf = self.head_hw
            h = tf.reshape(h if self.channels_first else tf.transpose(h, [0, 3, 1, 2]), [-1, ch * hf * wf])
            rows = ch * hf * wf
        else:
            h = tf.reduce_mean(h, axis=[2, 3] if self.channels_first else [1, 2])
            rows = ch
        h = self._dense(h, "head0", rows)
        for i in range(1, len(self.model.head_layers)):
            h = self._dense(h, ("head", i))
        return h

    # -------------------------------------------------------------- graphs
    def run(self, images, executor, penalties=None, forced=None):
        """`rnp_tf.rollout.rollout` of the model's plan on the constants, with `policy(penalties, forced)`.

        Args:
            images: float32 `[n, H, W, C]`.
            executor: a `GatherScatterExecutor` or `IfTreeExecutor` of this network.
            penalties: float32 `[n]` run-time penalties (`penalties(...)`).
            forced: optional int32 `[n or 1, T]` forced actions (0: greedy).

        Returns:
            dict: `logits` `[n, classes]`, `actions` int32 `[n, T]`, `macs` float32 `[n]`.
        """
        from rnp_tf import rollout as rollout_lib

        out = rollout_lib.rollout(self.model.plan, ConstantAgent(self), images, self.policy(penalties, forced), executor)
        actions = self._tf.stack(out.actions, axis=1)
        return {"logits": out.logits, "actions": actions, "macs": self.spent(out.actions, executor.batch)}

    def batched(self, images, forced_actions=None, penalty=None, channels_first=False, skip_empty=False):
        """Any batch size; per-sample actions by gather/scatter (`GatherScatterExecutor`).

        Args:
            images: float32 `[n, H, W, C]`.
            forced_actions: optional int32 `[n or 1, T]`; 0 = the agent's greedy choice.
            penalty: optional float32 run-time penalty, `[]`, `[1]` or `[n]`
                (default: `penalty_setting`).
            channels_first: compute on `[n, C, H, W]` maps (the images are
                transposed once). What ONNX runtimes and TensorRT run: their
                convolutions are NCHW, so an NHWC graph converts with a
                transpose on each side of every conv, and onnxruntime cannot
                cancel those next to the gathers (`export.onnx`).
            skip_empty: run a group's convs only when it holds samples (a
                `tf.cond`, ONNX `If`), instead of on one row that belongs to
                no sample (`GatherScatterExecutor`).

        Returns:
            dict: `logits` `[n, classes]`, `actions` int32 `[n, T]`, `macs` float32 `[n]`.
        """
        with self.constants(), self.layout(channels_first):
            n = self._tf.shape(images)[0]
            if skip_empty:  # constants that several groups' `tf.cond` branches share
                self._all_constants()
            return self.run(self.laid_out(images), GatherScatterExecutor(self, n, skip_empty),
                            self.penalties(penalty, n), forced_actions)

    def single(self, images, forced_actions=None, penalty=None, channels_first=False):
        """Batch 1: the (previous action, action) branch chosen by nested `tf.cond` (`IfTreeExecutor`).

        Args:
            images: float32 `[1, H, W, C]`.
            forced_actions: optional int32 `[1, T]`; 0 = the agent's greedy choice.
            penalty: optional float32 run-time penalty, `[]` or `[1]`
                (default: `penalty_setting`).
            channels_first: compute on NCHW maps (as `batched`).

        Returns:
            dict like `batched`, batch 1.
        """
        with self.constants(), self.layout(channels_first):
            self._all_constants()
            return self.run(self.laid_out(images), IfTreeExecutor(self), self.penalties(penalty, 1), forced_actions)

    @contextlib.contextmanager
    def layout(self, channels_first):
        """Scope of a graph whose maps are NCHW (`channels_first`) or NHWC."""
        self.channels_first = bool(channels_first)
        try:
            yield
        finally:
            self.channels_first = False

    def laid_out(self, images):
        """NHWC images in the current layout (one transpose when channels-first)."""
        return self._tf.transpose(images, [0, 3, 1, 2]) if self.channels_first else images

    def full(self, images):
        """The unpruned network (every action k, no agent) with plain convolutions: the baseline."""
        from rnp_tf import rollout as rollout_lib

        with self.constants():
            return {"logits": rollout_lib.rollout(self.model.plan, None, images, FullWidth(), FullExecutor(self)).logits}


# ------------------------------------------------- policy, agent, executors
class KnobPolicy:
    """The exported graphs' policy: greedy as `RNPModel.rollout` chooses, unless forced.

    Greedy on `RNPModel.greedy_q` (Q-values re-priced to the run-time
    penalties, actions the frozen compute cap forbids masked), through
    `rnp_tf.rollout.Greedy`; `forced[:, t] > 0` overrides (clipped to 1..k;
    at a skippable decision `k + 1` skips the block, as the agent's last
    Q-value does). A policy of `rnp_tf.rollout.rollout`.

    Args:
        model: the `RNPModel`.
        penalties: float32 `[n]` run-time penalties, or a float.
        forced: None or int32 `[n or 1, T]` forced actions (0: greedy).
    """

    uses_agent = True

    def __init__(self, model, penalties, forced=None):
        from rnp_tf import rollout as rollout_lib

        self.groups = int(model.groups)
        self.skippable = set(model.plan.skippable)
        self.forced = forced
        self.greedy = rollout_lib.Greedy(lambda t, q, decided: model.greedy_q(t, q, decided, penalties))

    def choose(self, t, q, decided):
        """The int32 `[n]` action of decision `t` from raw Q-values `q` and the earlier actions `decided`."""
        import tensorflow as tf

        action = self.greedy.choose(t, q, decided)
        if self.forced is None:
            return action
        top = self.groups + 1 if t in self.skippable else self.groups
        f = tf.clip_by_value(tf.cast(self.forced[:, t], tf.int32), 0, top)
        return tf.where(f > 0, f, action)


class FullWidth:
    """The policy of the unpruned network: no agent, every action `None` (the full width)."""

    uses_agent = False

    def choose(self, t, q, decided):
        return None


class ConstantAgent:
    """The decision agent on a `SlicedNetwork`'s constants, as `rnp_tf.rollout.rollout` calls it.

    Args:
        net: the `SlicedNetwork`.
    """

    def __init__(self, net):
        self.net = net

    def initial_state(self, n):
        """Zero LSTM state for `n` samples."""
        return self.net.initial_state(n)

    def decide(self, t, pooled, state):
        """`(q_values, state)` of decision `t` (`SlicedNetwork.agent_step`)."""
        return self.net.agent_step(t, pooled, state)


class ChainExecutor:
    """Base of the executors of `rnp_tf.rollout.rollout` on a `SlicedNetwork`'s constants.

    Runs chains and residual plans: map steps (pooling, zero padding) and
    a block's `relu(h + shortcut)` on tensors.

    Args:
        net: the `SlicedNetwork`.
        batch: the batch size (an int or a scalar int32 tensor; None when no agent runs).
    """

    def __init__(self, net, batch=None):
        self.net = net
        self.batch = batch
        self.tf = net._tf

    def begin(self, images):
        return images

    def batch_size(self, images):
        return self.batch

    def map(self, step, h):
        return self.net.pool(h, [pool_spec(step.layer)])

    def residual(self, h, shortcut):
        return self.net.residual(h, shortcut)

    def add(self, h, shortcut):
        return self.net.add(h, shortcut)


class FullExecutor(ChainExecutor):
    """The unpruned network: every conv at full width, no branches (with the `FullWidth` policy).

    Args:
        net: the `SlicedNetwork`.
    """

    def pooled(self, h, t):
        raise ValueError("FullExecutor runs no agent.")

    def conv(self, step, h, in_action, out_action):
        k = self.net.groups
        if step.decision is None:
            return self.net.kept_conv(step.layer, h)
        return self.net.sliced_conv(step.decision, h, k, k)

    def head(self, h, last_action):
        return self.net.head(h, self.net.groups)


class Segment:
    """A prunable conv not built yet, with the pools that follow it: the lazy executors' `h`.

    Attributes:
        t: the decision index.
        h: the input map (built).
        previous: the previous action (int32 `[n]`), or None when the input has full width.
        action: the action (int32 `[n]`).
        pools: the `pool_spec`s appended by `map`.
        tail: the convs appended by `conv` that run on the `action` groups
            in the segment's branches (an inverted residual's depthwise conv
            and projection).
        built: None until built, then the executor's `(map, pooled or None)`.
    """

    def __init__(self, t, h, previous, action):
        self.t, self.h, self.previous, self.action = t, h, previous, action
        self.pools = []
        self.tail = []
        self.built = None


class SegmentExecutor(ChainExecutor):
    """Base of the branching executors: a prunable conv and the pools after it are built as one segment.

    The exported graphs compute each segment (prunable conv `t` and its
    pools) inside each of its branches, while `rnp_tf.rollout.rollout`
    passes the pools as separate `map` steps. So `conv` records a
    `Segment`, `map` appends its pool, and the segment is built (`build`,
    by the subclass) when its output is first needed: by `pooled`, the next
    `conv` or `head`. The stem and the pools before the first prunable conv
    run at once. A conv that keeps its full output runs at once too: on a
    full input as one conv, on a prefix set by an action (a bottleneck's
    last conv) as one branch per input width (`kept`); a residual block's
    sum takes built maps. An inverted residual's depthwise conv and
    projection join the expansion's segment (`Segment.tail`), so that the
    whole block runs in one branch per action. Subclasses define `build(segment, pooled=True) -> (map, pooled
    or None)` (pooled features computed in the branches, or None: pool the
    map; `pooled=False`: no decision reads the map, a full-output conv
    follows), `kept(layer, map, in_action) -> map` and `classify(map,
    last_action) -> logits`.

    Args:
        net: the `SlicedNetwork`.
        batch: the batch size (an int or a scalar int32 tensor).
    """

    def pooled(self, h, t):
        h, pooled = self._built(h)
        return self.net.pooled(h) if pooled is None else pooled

    def conv(self, step, h, in_action, out_action):
        if step.decision is None and in_action is not None:
            if isinstance(h, Segment) and h.built is None and (is_depthwise(step.layer) or h.tail):
                h.tail.append(step.layer)  # an inverted residual: in the expansion's branches
                return h
            # no decision reads this map: no pooled features
            return self.kept(step.layer, self._built(h, pooled=False)[0], in_action)
        h, _ = self._built(h)
        if step.decision is None:
            return self.net.kept_conv(step.layer, h)
        return Segment(step.decision, h, in_action, out_action)

    def residual(self, h, shortcut):
        return super().residual(self._built(h)[0], self._built(shortcut)[0])

    def add(self, h, shortcut):
        return super().add(self._built(h, pooled=False)[0], self._built(shortcut)[0])

    def map(self, step, h):
        if not isinstance(h, Segment):
            return super().map(step, h)
        if h.built is not None:
            raise ValueError(f"A pool after segment {h.t} was already built.")
        h.pools.append(pool_spec(step.layer))
        return h

    def head(self, h, last_action):
        if last_action is None:  # the head's input keeps its full width (a residual network)
            return self.net.head(self._built(h)[0], None)
        return self.classify(self._built(h)[0], last_action)

    def _built(self, h, pooled=True):
        if not isinstance(h, Segment):
            return h, None
        if h.built is None:
            h.built = self.build(h) if pooled else self.build(h, pooled=False)
        return h.built


class Piece:
    """Samples of one width in a `GatherScatterExecutor`'s batch: a map and where each sample is.

    Attributes:
        x: a map holding exactly `width` groups (or full width), at least
            one row (an empty group keeps one row that belongs to no sample)
            unless the executor skips empty groups.
        idx: int32 `[m]`, the batch rows of the piece's samples (None: every
            row of the batch, in order).
        sel: int32 `[m]`, the rows of `x` that hold them (None: the first `m`).
        width: the action that set the width (the groups `x` holds).
    """

    def __init__(self, x, idx, width, sel=None):
        self.x, self.idx, self.width, self.sel = x, idx, width, sel


class GatherScatterExecutor(SegmentExecutor):
    """Any batch size: per-sample actions by gather and one stitch per block.

    At each prunable conv the samples are grouped by their (previous
    action, action) pair: each group is gathered from the `Piece` of its
    previous action and runs its segment on its weight slice. The samples
    stay in narrow pieces, one per action (as the inference engine's
    batch-N executor keeps them), until a map must be in batch order: a
    conv of full output (a bottleneck's last conv, an inverted residual's
    projection) runs on each piece at its width and one stitch (a concat
    and a gather) puts the full maps back in their rows. The agent's pooled
    features and the logits are stitched the same way. No map is padded
    to full width and scattered after every conv, as before (ResNet-50,
    batch 64 at 224x224 in onnxruntime at 2x: 0.44x -> 0.59x the full
    network's speed, 0.84x once channels-first; `docs/results/speed.md`).

    An empty group runs on one row that belongs to no sample (no control
    flow: what TensorRT's graph keeps) or, with `skip_empty`, not at all:
    its convs sit in a `tf.cond` (ONNX `If`) and it yields a piece of no
    rows. In onnxruntime that saves a whole one-row conv per empty group:
    every (previous action, action) branch of a file with every branch.

    Args:
        net: the `SlicedNetwork`.
        batch: the batch size, a scalar int32 tensor.
        skip_empty: guard each group's convs by `tf.cond` instead of
            running them on a row of padding.
    """

    def __init__(self, net, batch, skip_empty=False):
        super().__init__(net, batch)
        self.skip_empty = bool(skip_empty)

    def build(self, segment, pooled=True):
        tf, net, t = self.tf, self.net, segment.t
        sources = segment.h if isinstance(segment.h, list) else [Piece(segment.h, None, net.groups)]
        by_width = {}
        for pc in sources:
            if pc.width == 0:  # a skipped block's samples: nothing is computed, they stay skipped
                by_width.setdefault(0, []).append(pc)
                continue
            action = self._of_piece(segment.action, pc)
            for p, b in net.branches(t):
                if net.varies(t) and p != pc.width:
                    continue
                fn = lambda z, p=p, b=b: net.segment(t, z, p, b, segment.pools, segment.tail)  # noqa: E731
                local = self._indices(tf.equal(action, b))
                by_width.setdefault(b, []).append(self._group(pc, local, net.in_channels(t, p), net.in_hw[t], fn, b))
            if t in net.skippable:  # action 0 skips the block: a piece of rows only
                local = self._indices(tf.equal(action, 0))
                by_width.setdefault(0, []).append(Piece(None, local if pc.idx is None else tf.gather(pc.idx, local), 0))
        pieces = [self._merged(group) for group in by_width.values()]
        if segment.tail:  # an inverted residual's projection: full output, back in batch order
            layer = segment.tail[-1]
            return self._stitch(pieces, [self._or_zeros(pc, pc.x, layer.output_hw, layer.filters) for pc in pieces]), None
        if not pooled:
            return pieces, None
        channels = net.segment_channels(t)
        return pieces, self._stitch(pieces, [self._or_zeros(pc, pc.width and net.pooled(pc.x, channels), None, channels)
                                             for pc in pieces])

    def kept(self, layer, h, in_action):
        """A conv of full output on each piece at its input width, stitched back to batch order."""
        hw = self.net.conv_in_hw[layer.name]
        pieces = self._split(h, in_action, layer.in_group_size, hw)
        outs = [self._or_zeros(pc, pc.width and self._guarded(
            pc.x, lambda x, w=pc.width: self.net.kept_conv(layer, x, w)), layer.output_hw, layer.filters)
            for pc in pieces]
        return self._stitch(pieces, outs)

    def _guarded(self, x, fn):
        """`fn(x)`, or with `skip_empty` `fn` in a `tf.cond` that returns no rows when `x` has none."""
        if not self.skip_empty:
            return fn(x)
        tf = self.tf
        shape = {}

        def run():  # traced first (cond_v2): the empty branch takes its output's shape
            y = fn(x)
            shape["y"] = y.shape[1:]
            return y

        return tf.cond(tf.shape(x)[0] > 0, run, lambda: tf.zeros([0, *shape["y"]], tf.float32))

    def _or_zeros(self, pc, y, hw, channels):
        """`y`, or for a skipped block's piece (width 0) zeros of its rows: maps of `hw` or (`hw` None) vectors."""
        if pc.width:
            return y
        tf = self.tf
        m = tf.reshape(tf.shape(pc.idx)[0], [1])
        shape = [channels] if hw is None else self.net.map_shape(hw, channels)[1:]
        return tf.zeros(tf.concat([m, shape], 0), tf.float32)

    def classify(self, h, last_action):
        net = self.net
        pieces = self._split(h, last_action, net.head_group, net.head_hw)
        return self._stitch(pieces, [self._guarded(pc.x, lambda x, w=pc.width: net.head(x, w)) for pc in pieces])

    def _split(self, h, action, group_size, hw):
        """Pieces as they are, or a full map (zero beyond each sample's prefix) split by `action`."""
        if isinstance(h, list):
            return h
        tf, net = self.tf, self.net
        full = Piece(h, None, net.groups)
        return [self._group(full, self._indices(tf.equal(action, p)), p * group_size, hw, lambda z: z, p)
                for p in range(1, net.groups + 1)]

    def _of_piece(self, values, pc):
        """Per-sample `values` `[batch]` of the piece's samples."""
        return values if pc.idx is None else self.tf.gather(values, pc.idx)

    def _group(self, pc, local, channels, hw, fn, width):
        """`fn` on the samples `local` (int32 `[m]`, positions among its samples) of piece `pc`.

        The group's rows are gathered and cut (or zero-padded) to
        `channels`. An empty group runs on one row that belongs to no
        sample: the padding is in the gather's indices, so no map is copied
        twice. It keeps oneDNN (FINDINGS.md) and every runtime away from
        zero-sized convolutions; the reshape restores the static inner dims.

        Returns:
            The new `Piece` of `width`.
        """
        tf = self.tf
        positions = local if pc.sel is None else tf.gather(pc.sel, local)
        if not self.skip_empty:
            missing = tf.maximum(1 - tf.shape(positions)[0], 0)
            positions = tf.concat([positions, tf.zeros(tf.reshape(missing, [1]), tf.int32)], 0)
        x = tf.gather(pc.x, positions)
        x = self.net.first_channels(x, channels)  # zero-padded: a full-width input after a prefix
        rows = local if pc.idx is None else tf.gather(pc.idx, local)
        return Piece(self._guarded(tf.reshape(x, self.net.map_shape(hw, channels)), fn), rows, width)

    def _merged(self, group):
        """One piece from pieces of one width: their maps concatenated, their samples' rows tracked."""
        if len(group) == 1:
            return group[0]
        tf = self.tf
        if group[0].width == 0:
            return Piece(None, tf.concat([self._batch_rows(pc) for pc in group], 0), 0)
        offsets = self._offsets([pc.x for pc in group])
        sel = [offsets[i] + self._rows_in(pc) for i, pc in enumerate(group)]
        idx = [self._batch_rows(pc) for pc in group]
        return Piece(tf.concat([pc.x for pc in group], 0), tf.concat(idx, 0), group[0].width, tf.concat(sel, 0))

    def _offsets(self, maps):
        """Where each of `maps` starts in their concat along the batch (scalar adds: TensorRT has no int32 CumSum)."""
        offsets, at = [], 0
        for y in maps:
            offsets.append(at)
            at = at + self.tf.shape(y)[0]
        return offsets

    def _rows_in(self, pc):
        """int32 rows of `pc.x` that hold the piece's samples."""
        if pc.sel is not None:
            return pc.sel
        return self.tf.range(self.batch if pc.idx is None else self.tf.shape(pc.idx)[0])

    def _batch_rows(self, pc):
        return self.tf.range(self.batch) if pc.idx is None else pc.idx

    def _stitch(self, pieces, outs):
        """`outs` (one per piece, rows as the piece's map) back in batch order: a concat and a gather."""
        tf = self.tf
        offsets = self._offsets(outs)
        positions = tf.concat([offsets[i] + self._rows_in(pc) for i, pc in enumerate(pieces)], 0)
        rows = tf.concat([self._batch_rows(pc) for pc in pieces], 0)
        order = tf.scatter_nd(rows[:, None], positions, tf.reshape(self.batch, [1]))
        out = tf.gather(tf.concat(outs, 0), order)
        out.set_shape([None, *outs[0].shape[1:]])
        return out

    def _indices(self, mask):
        """int32 indices of the True entries of a `[n]` mask (NonZero on float32, as TensorRT wants)."""
        tf = self.tf
        return tf.cast(tf.reshape(tf.where(tf.cast(mask, tf.float32)), [-1]), tf.int32)


class IfTreeExecutor(SegmentExecutor):
    """Batch 1: each segment's (previous action, action) branch picked by a nested binary `tf.cond` tree.

    Each branch returns its narrow map and the map's pooled features, so
    only the chosen branch runs (nested ONNX `If` once frozen and lowered);
    the head is picked the same way by the last action.

    Args:
        net: the `SlicedNetwork`.
    """

    def __init__(self, net):
        super().__init__(net, 1)

    def build(self, segment, pooled=True):
        tf, net, t = self.tf, self.net, segment.t
        hw, nxt = net.in_hw[t], net.segment_channels(t, segment.tail)

        def branch(p, b):
            x = tf.reshape(segment.h, net.map_shape(hw, net.in_channels(t, p)))
            y = net.segment(t, x, p, b, segment.pools, segment.tail)
            return (y, net.pooled(y, nxt)) if pooled else y

        fns = [lambda p=p, b=b: branch(p, b) for p, b in net.branches(t)]
        previous = None if segment.previous is None else segment.previous[0]

        def skipped():  # a skipped block: nothing computed (a tail's full output is zero, as the sum needs)
            last = segment.tail[-1] if segment.tail else None
            y = net.zeros_map((1, 1), 0) if last is None else net.zeros_map(last.output_hw, last.filters)
            return (y, tf.zeros([1, nxt])) if pooled else y

        def chosen():
            return self._tree(self._branch_index(t, previous, segment.action[0]), fns)

        if not fns:  # a network restricted to tuples that all skip this block
            out = skipped()
        elif t in net.skippable or t in net.skipped_by:
            out = tf.cond(tf.equal(segment.action[0], 0), skipped, chosen)
        else:
            out = chosen()
        if not pooled:  # a conv of full output follows (a bottleneck's last): no decision reads this map
            return out, None
        h, features = out
        return h, tf.reshape(features, [1, nxt])

    def classify(self, h, last_action):
        tf, net = self.tf, self.net
        k, g = net.groups, net.head_group
        hf, wf = net.head_hw
        built = net.heads()
        heads = [(lambda b=b: net.head(tf.reshape(h, net.map_shape((hf, wf), b * g)), b)) for b in built]
        index = last_action[0] - 1
        if built != list(range(1, k + 1)):
            lookup = np.zeros(k, np.int32)
            lookup[np.asarray(built) - 1] = np.arange(len(built))
            index = tf.gather(tf.constant(lookup), index)
        return tf.reshape(self._tree(index, heads), [1, net.num_classes])

    def kept(self, layer, h, in_action):
        """A conv of full output on `h` (holding the groups of `in_action`), its input width's branch picked by a tree."""
        tf, net = self.tf, self.net
        hw = net.conv_in_hw[layer.name]

        def branch(p):
            return net.kept_conv(layer, tf.reshape(h, net.map_shape(hw, p * layer.in_group_size)), p)

        def chosen():
            if net.channels(h) is not None:  # one input width only (a network restricted to some action tuples)
                return branch(net.channels(h) // layer.in_group_size)
            return self._tree(in_action[0] - 1, [lambda p=p: branch(p) for p in range(1, net.groups + 1)])

        if net.channels(h) == 0:  # a network restricted to tuples that all skip this block
            y = net.zeros_map(layer.output_hw, layer.filters)
        elif layer.name in net.model.plan.skip_of_conv:  # a skipped block's branch outputs zeros
            y = tf.cond(tf.equal(in_action[0], 0), lambda: net.zeros_map(layer.output_hw, layer.filters), chosen)
        else:
            y = chosen()
        return tf.reshape(y, net.map_shape(layer.output_hw, layer.filters))

    def _tree(self, index, fns, lo=0, hi=None):
        """Nested binary `tf.cond` over `fns[index]` (nested ONNX If once frozen and lowered)."""
        tf = self.tf
        hi = len(fns) if hi is None else hi
        if hi - lo == 1:
            return fns[lo]()
        mid = (lo + hi) // 2
        return tf.cond(index < mid, lambda: self._tree(index, fns, lo, mid), lambda: self._tree(index, fns, mid, hi))

    def _branch_index(self, t, previous, action):
        """int32 scalar: position of `(previous, action)` in `branches(t)` (`previous` None: full input)."""
        tf, net = self.tf, self.net
        k = net.groups
        varies = net.varies(t)
        every = [(p, a) for p in net.previous_actions(t) for a in range(1, k + 1)]
        branches = net.branches(t)
        if branches == every:
            return (previous - 1) * k + action - 1 if varies else action - 1
        key = (previous - 1) * k + action - 1 if varies else (k - 1) * k + action - 1
        lookup = np.zeros(k * k, np.int32)
        for i, (p, a) in enumerate(branches):
            lookup[(p - 1) * k + a - 1] = i
        return tf.gather(tf.constant(lookup), key)
