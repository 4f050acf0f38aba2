"""Turn an existing Keras CNN into an `RNPModel`: `rnp_tf.from_keras`.

The converter walks a `Sequential` or functional Keras model backwards from
its output, recognises conv (+ BatchNormalization) (+ ReLU / ReLU6) blocks,
pooling, zero-padding, the classifier head (Flatten or global average
pooling, Dense, Dropout), ResNet bottlenecks (a residual `Add` of 1x1 -> 3x3
-> 1x1 convs and an identity or 1x1 projection shortcut) and MobileNetV2
inverted residuals (a 1x1 expansion, a depthwise conv, a linear 1x1
projection, with or without an identity `Add`), and builds the matching
backbone description with the same weights. Every conv whose output can be
pruned safely becomes prunable; a conv whose output feeds a residual `Add`
(or the stem) keeps its full output, while its input side still benefits
where the previous conv was pruned.

BatchNormalization and conv biases are folded exactly into the gated convs'
BatchNorm (copied into every per-width set); at full actions the converted
model's logits equal the original's pre-softmax outputs.
"""

import keras
import numpy as np

from rnp_tf import backbones
from rnp_tf.model import RNPModel

_POOLS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


class ConversionError(ValueError):
    """A layer or structure `from_keras` cannot convert faithfully."""


def _fail(layer, why):
    raise ConversionError(f"Cannot convert layer {layer.name!r} ({type(layer).__name__}): {why}")


def _producer(tensor):
    return tensor._keras_history.operation


def _inputs(layer):
    nodes = layer._inbound_nodes
    if len(nodes) != 1:
        _fail(layer, f"it is called {len(nodes)} times; shared layers have no single channel layout")
    return list(nodes[0].input_tensors)


def _is_input(layer):
    return isinstance(layer, keras.layers.InputLayer)


def _activation_name(layer):
    if isinstance(layer, keras.layers.ReLU):
        plain = float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0
        if plain and layer.max_value is None:
            return "relu"
        if plain and float(layer.max_value) == 6.0:
            return "relu6"
        _fail(layer, "only a plain ReLU or ReLU6 is supported")
    if isinstance(layer, keras.layers.Activation):
        return keras.activations.serialize(layer.activation)
    return None


def _linear_chain(tensor, stop_ids):
    """Layers from `tensor` back to the first tensor in `stop_ids` (or the input)."""
    layers = []
    while id(tensor) not in stop_ids:
        layer = _producer(tensor)
        if _is_input(layer):
            break
        if isinstance(layer, keras.layers.Add):
            _fail(layer, "a residual sum inside another residual branch is not supported")
        inputs = _inputs(layer)
        if len(inputs) != 1:
            _fail(layer, "only single-input layers are supported inside a residual block")
        layers.append(layer)
        tensor = inputs[0]
    return layers[::-1], tensor


def _walk(model):
    """The model's layers from input to output; residual sums become tuples."""
    if len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ConversionError(f"from_keras needs one input and one output. Received: model {model.name!r}")
    items = []
    tensor = model.outputs[0]
    while True:
        layer = _producer(tensor)
        if _is_input(layer):
            break
        if isinstance(layer, keras.layers.Add):
            first, second = _inputs(layer)
            ancestors = {}
            probe = first
            while True:
                ancestors[id(probe)] = probe
                producer = _producer(probe)
                if _is_input(producer) or isinstance(producer, keras.layers.Add):
                    break
                inputs = _inputs(producer)
                if len(inputs) != 1:
                    break
                probe = inputs[0]
            side, source = _linear_chain(second, ancestors)
            if id(source) not in ancestors:
                _fail(layer, "its two inputs do not share a block input")
            main, _ = _linear_chain(first, {id(source)})
            if len([l for l in side if isinstance(l, keras.layers.Conv2D)]) > len(
                [l for l in main if isinstance(l, keras.layers.Conv2D)]
            ):
                main, side = side, main
            items.append(("add", layer, main, side))
            tensor = source
            continue
        inputs = _inputs(layer)
        if len(inputs) != 1:
            _fail(layer, "layers with several inputs (Concatenate, Multiply, ...) have channel counts that must stay "
                  "fixed and are not supported")
        items.append(layer)
        tensor = inputs[0]
    return items[::-1]


def _is_conv(layer):
    return isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D)


def _conv_unit(layers, i, depthwise=False):
    """Parses Conv2D (or DepthwiseConv2D) [+ BatchNormalization] [+ ReLU / ReLU6] starting at `layers[i]`."""
    conv = layers[i]
    if depthwise:
        if not isinstance(conv, keras.layers.DepthwiseConv2D):
            _fail(conv, "expected a DepthwiseConv2D")
        if conv.depth_multiplier != 1:
            _fail(conv, f"only depth_multiplier=1 is supported (depth_multiplier {conv.depth_multiplier})")
    elif not _is_conv(conv):
        _fail(conv, "expected a Conv2D")
    ks, st = conv.kernel_size, conv.strides
    if ks[0] != ks[1] or st[0] != st[1]:
        _fail(conv, f"only square kernels and strides are supported (kernel {ks}, strides {st})")
    if tuple(conv.dilation_rate) != (1, 1) or (not depthwise and conv.groups != 1):
        _fail(conv, "dilated and grouped convolutions are not supported")
    if conv.data_format != "channels_last":
        _fail(conv, "only channels_last is supported")
    activation = keras.activations.serialize(conv.activation)
    bn = None
    j = i + 1
    if activation == "linear" and j < len(layers) and isinstance(layers[j], keras.layers.BatchNormalization):
        bn = layers[j]
        if bn.axis not in (-1, 3, [3], [-1]):
            _fail(bn, "only BatchNormalization over the channel axis is supported")
        j += 1
    if activation == "linear" and j < len(layers) and _activation_name(layers[j]) is not None:
        activation = _activation_name(layers[j])
        j += 1
    if activation not in ("relu", "relu6", "linear"):
        _fail(conv, f"activation {activation!r} is not supported (relu, relu6 or none)")
    unit = {
        "conv": conv,
        "bn": bn,
        "filters": conv.kernel.shape[2] if depthwise else conv.filters,
        "kernel_size": ks[0],
        "strides": st[0],
        "padding": conv.padding,
        "activation": activation,
    }
    return unit, j


def _spec_and_weights(model, groups, prunable):
    items = _walk(model)
    stages, units, head, dense = [], [], {"pooling": None, "hidden": [], "dropout": 0.0}, []
    softmax = False
    flat = []
    for item in items:
        flat.append(item)
    i = 0
    layers = [x for x in flat]
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, tuple) and any(isinstance(x, keras.layers.DepthwiseConv2D) for x in layer[2]):
            stages.append(_inverted_residual(layer[2], 0, units, add=layer)[0])
            i += 1
            continue
        if isinstance(layer, tuple):
            stages.append(_bottleneck(layer, units))
            i += 1
            if i >= len(layers) or isinstance(layers[i], tuple) or _activation_name(layers[i]) != "relu":
                _fail(layer[1], "a residual sum must be followed by a ReLU")
            i += 1
            continue
        if head["pooling"] is not None:
            if isinstance(layer, keras.layers.Dense):
                dense.append(layer)
            elif isinstance(layer, keras.layers.Dropout):
                head["dropout"] = float(layer.rate)
            elif _activation_name(layer) == "softmax":
                softmax = True
            else:
                _fail(layer, "only Dense, Dropout and a final softmax may follow the head's pooling")
            i += 1
            continue
        if _starts_inverted_residual(layers, i, stem=not units):
            stage, i = _inverted_residual(layers, i, units)
            stages.append(stage)
            continue
        if _is_conv(layer):
            unit, i = _conv_unit(layers, i)
            units.append(unit)
            stage = {
                "type": "conv",
                "filters": unit["filters"],
                "kernel_size": unit["kernel_size"],
                "strides": unit["strides"],
                "padding": unit["padding"],
                "normalization": unit["bn"] is not None,
                "activation": unit["activation"],
                "bn_epsilon": float(unit["bn"].epsilon) if unit["bn"] is not None else 1e-3,
                "source": unit["conv"].name,
            }
            stages.append(stage)
            continue
        if isinstance(layer, _POOLS):
            ps, pst = layer.pool_size, layer.strides
            if ps[0] != ps[1] or pst[0] != pst[1]:
                _fail(layer, "only square pooling is supported")
            mode = "max" if isinstance(layer, keras.layers.MaxPooling2D) else "avg"
            stages.append({"type": "pool", "size": ps[0], "strides": pst[0], "padding": layer.padding, "mode": mode})
        elif isinstance(layer, keras.layers.ZeroPadding2D):
            (top, bottom), (left, right) = layer.padding
            if not top == bottom == left == right:
                _fail(layer, "only symmetric zero padding is supported")
            stages.append({"type": "zeropad", "padding": int(top)})
        elif isinstance(layer, keras.layers.Flatten):
            if layer.data_format != "channels_last":
                _fail(layer, "only channels_last is supported")
            # fc1's rows are permuted into channel-major order once, at conversion
            head["pooling"], head["layout"] = "flatten", "channel"
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            if layer.keepdims:
                _fail(layer, "keepdims=True is not supported")
            head["pooling"] = "gap"
        elif isinstance(layer, (keras.layers.Dropout, keras.layers.SpatialDropout2D)):
            pass  # no-op at inference; the gated backbone has no dropout between convs
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _fail(layer, "a depthwise conv is only supported inside an inverted residual (after the stem, followed by "
                  "a 1x1 projection)")
        elif isinstance(layer, keras.layers.BatchNormalization):
            _fail(layer, "BatchNormalization is only supported right after a Conv2D (before its activation)")
        elif _activation_name(layer) is not None:
            _fail(layer, "a stand-alone activation is only supported right after a Conv2D (+ BatchNormalization)")
        else:
            _fail(layer, "this layer's channel semantics are unknown to rnp_tf")
        i += 1
    if head["pooling"] is None or not dense:
        raise ConversionError(
            f"from_keras needs a classifier head (Flatten or GlobalAveragePooling2D, then Dense). "
            f"Received: model {model.name!r}"
        )
    for layer in dense[:-1]:
        if keras.activations.serialize(layer.activation) != "relu":
            _fail(layer, "hidden Dense layers must use relu")
    last = keras.activations.serialize(dense[-1].activation)
    if last not in ("linear", "softmax"):
        _fail(dense[-1], f"the classifier's activation must be linear or softmax, not {last!r}")
    softmax = softmax or last == "softmax"
    head["hidden"] = [layer.units for layer in dense[:-1]]
    _choose_prunable(stages, units, groups, prunable)
    return {"stages": stages, "head": head}, units, dense, softmax


def _bottleneck(item, units):
    _, add, main, side = item
    parsed = []
    i = 0
    while i < len(main):
        unit, i = _conv_unit(main, i)
        parsed.append(unit)
    if len(parsed) != 3 or [u["kernel_size"] for u in parsed] != [1, 3, 1]:
        _fail(add, "only bottleneck blocks (1x1 -> 3x3 -> 1x1 convs on the residual branch) are supported")
    a, b, c = parsed
    if a["activation"] != "relu" or b["activation"] != "relu" or c["activation"] != "linear":
        _fail(add, "a bottleneck needs ReLU after its first two convs and none before the sum")
    if b["strides"] != 1 or c["strides"] != 1 or b["padding"] != "same":
        _fail(add, "the 3x3 conv of a bottleneck must have stride 1 and 'same' padding")
    shortcut = None
    if side:
        shortcut, end = _conv_unit(side, 0)
        if end != len(side) or shortcut["kernel_size"] != 1 or shortcut["activation"] != "linear":
            _fail(add, "the shortcut must be the identity or a 1x1 conv (+ BatchNormalization)")
        if shortcut["strides"] != a["strides"]:
            _fail(add, "the shortcut and the first conv of a bottleneck must share their stride")
    elif a["strides"] != 1:
        _fail(add, "an identity shortcut needs stride 1")
    if c["filters"] % a["filters"]:
        _fail(add, "the last conv's channels must be a multiple of the inner width")
    eps = {float(u["bn"].epsilon) for u in parsed + ([shortcut] if shortcut else []) if u["bn"] is not None}
    if len(eps) > 1:
        _fail(add, "all BatchNormalization layers of a block must share one epsilon")
    units.extend([a, b, c] + ([shortcut] if shortcut else []))
    return {
        "type": "bottleneck",
        "filters": a["filters"],
        "strides": a["strides"],
        "projection": shortcut is not None,
        "expansion": c["filters"] // a["filters"],
        "bn_epsilon": eps.pop() if eps else 1e-3,
        "source": [u["conv"].name for u in (a, b)],
    }


def _starts_inverted_residual(layers, i, stem):
    """Whether `layers[i]` opens an inverted residual: [1x1 expansion unit] [ZeroPadding2D] DepthwiseConv2D."""
    j = i
    if not stem and _is_conv(layers[j]) and tuple(layers[j].kernel_size) == (1, 1):
        _, j = _conv_unit(layers, j)
    elif stem:
        return False
    if j < len(layers) and isinstance(layers[j], keras.layers.ZeroPadding2D):
        j += 1
    return j < len(layers) and isinstance(layers[j], keras.layers.DepthwiseConv2D)


def _same_padding(size, kernel, stride):
    """TensorFlow's SAME padding `(before, after)` of one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _inverted_residual(layers, i, units, add=None):
    """Parses a MobileNetV2 block from `layers[i]`: [expansion] [ZeroPadding2D] depthwise, projection.

    Returns:
        `(stage, next index)`; inside a residual branch (`add` given) the
        block must span the whole branch.
    """
    owner = add[1] if add is not None else layers[i]
    expand = None
    if _is_conv(layers[i]):
        expand, i = _conv_unit(layers, i)
        if expand["kernel_size"] != 1 or expand["strides"] != 1:
            _fail(expand["conv"], "an inverted residual's expansion must be a 1x1 conv with stride 1")
    pad = None
    if isinstance(layers[i], keras.layers.ZeroPadding2D):
        pad, i = layers[i], i + 1
    depthwise, i = _conv_unit(layers, i, depthwise=True)
    dw = depthwise["conv"]
    in_shape = (pad or dw).input.shape
    padding = depthwise["padding"]
    if pad is not None:
        expected = tuple(_same_padding(n, depthwise["kernel_size"], depthwise["strides"]) for n in in_shape[1:3])
        if padding != "valid" or tuple(tuple(p) for p in pad.padding) != expected:
            _fail(pad, f"zero padding before a depthwise conv must be TensorFlow's SAME padding {expected} "
                  "followed by a 'valid' conv")
        padding = "same"
    activation = depthwise["activation"]
    if activation == "linear" or (expand is not None and expand["activation"] != activation):
        _fail(dw, "the expansion and the depthwise conv of an inverted residual need the same activation "
              "(ReLU or ReLU6)")
    if i >= len(layers) or not _is_conv(layers[i]):
        _fail(dw, "a depthwise conv must be followed by an inverted residual's 1x1 projection")
    project, i = _conv_unit(layers, i)
    if project["kernel_size"] != 1 or project["strides"] != 1 or project["activation"] != "linear":
        _fail(project["conv"], f"the projection after {dw.name!r} must be a linear 1x1 conv with stride 1")
    block_in = (expand["conv"] if expand else pad or dw).input.shape[-1]
    if expand is not None and expand["filters"] % block_in:
        _fail(expand["conv"], f"the expansion's {expand['filters']} channels are not a multiple of its "
              f"{block_in} input channels")
    if add is not None and i != len(layers):
        _fail(owner, "a residual branch must be exactly one inverted residual block")
    block = [u for u in (expand, depthwise, project) if u is not None]
    eps = {float(u["bn"].epsilon) for u in block if u["bn"] is not None}
    if len(eps) > 1 or len({u["bn"] is None for u in block}) > 1:
        _fail(owner, "the convs of an inverted residual need BatchNormalization with one epsilon, or none at all")
    if block[0]["bn"] is None:
        _fail(owner, "an inverted residual needs BatchNormalization after its convs")
    units.extend(block)
    stage = {
        "type": "inverted_residual",
        "filters": project["filters"],
        "expansion": expand["filters"] // block_in if expand else 1,
        "strides": depthwise["strides"],
        "kernel_size": depthwise["kernel_size"],
        "padding": padding,
        "activation": activation,
        "bn_epsilon": eps.pop(),
        "residual": add is not None,
        "source": expand["conv"].name if expand else None,
        "expanded": expand["filters"] if expand else block_in,
    }
    return stage, i


def _choose_prunable(stages, units, groups, prunable):
    """Marks prunable convs: the defaults, or exactly the named ones."""
    names = None if prunable is None else set(prunable)
    known = set()
    convs = [s for s in stages if s["type"] == "conv"]
    for index, stage in enumerate(stages):
        if stage["type"] == "conv":
            known.add(stage["source"])
            later = [s["type"] for s in stages[index + 1 :] if s["type"] in ("conv", "bottleneck", "inverted_residual")]
            feeds_block = bool(later) and later[0] != "conv"
            allowed = stage is not convs[0] and not feeds_block
            if names is None:
                stage["prunable"] = allowed and stage["filters"] % groups == 0
            else:
                wanted = stage["source"] in names
                if wanted and not allowed:
                    raise ConversionError(
                        f"Conv {stage['source']!r} cannot be pruned at its output: it is the stem or feeds a "
                        "residual block."
                    )
                if wanted and stage["filters"] % groups:
                    raise ConversionError(
                        f"Conv {stage['source']!r} has {stage['filters']} channels, not divisible by k={groups}."
                    )
                stage["prunable"] = wanted
        elif stage["type"] == "bottleneck":
            known.update(stage["source"])
            ok = stage["filters"] % groups == 0
            if names is None:
                stage["prunable"] = [ok, ok]
            else:
                stage["prunable"] = [n in names for n in stage["source"]]
                if any(stage["prunable"]) and not ok:
                    raise ConversionError(
                        f"Block of {stage['source'][0]!r} has {stage['filters']} inner channels, not divisible "
                        f"by k={groups}."
                    )
        elif stage["type"] == "inverted_residual" and stage["source"] is not None:
            known.add(stage["source"])
            expanded = stage.pop("expanded")
            stage["prunable"] = expanded % groups == 0 if names is None else stage["source"] in names
            if stage["prunable"] and expanded % groups:
                raise ConversionError(
                    f"Conv {stage['source']!r} (an expansion) has {expanded} channels, not divisible by k={groups}."
                )
        elif stage["type"] == "inverted_residual":
            stage.pop("expanded")
            stage["prunable"] = False
    if names is not None and names - known:
        raise ConversionError(f"`prunable` names convs the model does not have: {sorted(names - known)}")


def _copy_conv(target, unit, groups):
    conv, bn = unit["conv"], unit["bn"]
    kernel = np.asarray(conv.kernel)
    bias = np.asarray(conv.bias) if conv.use_bias else np.zeros(target.filters, np.float32)
    target.kernel.assign(kernel)
    if bn is None:
        target.bias.assign(bias)
        return
    sets = target.num_bn_sets
    gamma = np.asarray(bn.gamma) if bn.scale else np.ones(target.filters, np.float32)
    beta = np.asarray(bn.beta) if bn.center else np.zeros(target.filters, np.float32)
    target.gamma.assign(np.tile(gamma, (sets, 1)))
    target.beta.assign(np.tile(beta, (sets, 1)))
    target.moving_mean.assign(np.tile(np.asarray(bn.moving_mean) - bias, (sets, 1)))
    target.moving_variance.assign(np.tile(np.asarray(bn.moving_variance), (sets, 1)))


def from_keras(model, k=4, prunable=None, per_stage=False, **kwargs):
    """Converts a Keras CNN into an `RNPModel` with the same weights.

    Supported: `Sequential` and functional CNNs built from Conv2D (square
    kernels, no dilation or groups) optionally followed by
    BatchNormalization and ReLU, MaxPooling2D / AveragePooling2D,
    ZeroPadding2D, Dropout, and a head of Flatten or
    GlobalAveragePooling2D, Dense (ReLU) layers and a final Dense (linear
    or softmax); ResNet bottleneck blocks (`keras.applications.ResNet50`);
    and MobileNetV2 inverted residuals (`keras.applications.MobileNetV2`:
    a 1x1 expansion, a depthwise conv (`ZeroPadding2D` + `"valid"` when it
    is TensorFlow's SAME padding), a linear 1x1 projection, with an
    identity `Add` or none; ReLU or ReLU6). An expansion's output is
    prunable; a block without expansion keeps its full width.
    Anything else raises a `ConversionError` (a `ValueError`) naming the
    layer and why.

    Args:
        model: a built Keras model with a fully defined input shape.
        k: number of channel groups per prunable conv. Defaults to 4.
        prunable: optional list of Keras conv layer names to make prunable
            (all others keep their full output). By default every conv
            whose output can be pruned safely and whose channels `k`
            divides is prunable: not the first conv and not a conv feeding
            a residual block; an inverted residual is named by its
            expansion conv.
        per_stage: decide once per stage (`rnp_tf.decide_per_stage`): the
            later blocks of a ResNet or MobileNetV2 stage take the first
            block's actions, and the agent runs there no more. Defaults to
            False (one decision per prunable conv, the paper's agent).
        **kwargs: other `RNPModel` arguments (penalty, agent_steps, ...).

    Returns:
        An `RNPModel`. Its logits at full actions equal the original's
        output before any final softmax (`model.output_softmax` says
        whether the original applied one). After a `Flatten`, the head has
        layout "channel": the first Dense's rows are stored channel-major
        (`rnp_tf.plan.Head.relayout` of the Keras kernel).

    Example:

    >>> vgg = keras.applications.VGG16(weights=None, input_shape=(64, 64, 3), classes=10)
    >>> rnp = rnp_tf.from_keras(vgg, k=4)
    >>> print(rnp_tf.convert.prunable_table(rnp))
    """
    if not isinstance(model, keras.Model):
        raise ConversionError(f"from_keras needs a keras.Model. Received: {type(model).__name__}")
    if not model.built or any(d is None for d in model.input_shape[1:]):
        raise ConversionError(
            f"from_keras needs a fully defined input shape (height, width, channels). "
            f"Received: input_shape={getattr(model, 'input_shape', None)}"
        )
    spec, units, dense, softmax = _spec_and_weights(model, k, prunable)
    spec = backbones.validate_backbone(backbones.decide_per_stage(spec) if per_stage else spec, k)
    rnp = RNPModel(spec, image_shape=tuple(model.input_shape[1:]), num_classes=dense[-1].units, groups=k, **kwargs)
    if len(rnp.convs) != len(units):
        raise ConversionError("Internal mismatch between the parsed convs and the built model.")
    for target, unit in zip(rnp.convs, units):
        _copy_conv(target, unit, k)
    for i, (target, source) in enumerate(zip(rnp.head_layers, dense)):
        kernel = np.asarray(source.kernel)
        if i == 0:  # Keras' Flatten order into the head's
            kernel = rnp.plan.head.relayout(kernel, "spatial", rnp.plan.head.layout)
        target.kernel.assign(kernel)
        target.bias.assign(np.asarray(source.bias) if source.use_bias else np.zeros(source.units, np.float32))
    rnp.output_softmax = softmax
    rnp.source_names = {conv.name: unit["conv"].name for conv, unit in zip(rnp.convs, units)}
    return rnp


def prunable_table(model):
    """The convs of an `RNPModel`: source layer, prunable or not, MACs.

    Args:
        model: an `RNPModel` (from `from_keras` or a description).

    Returns:
        A Markdown table (str) with one row per conv.

    Example:

    >>> print(prunable_table(rnp_tf.from_keras(keras_model)))
    """
    from rnp_tf import report

    names = getattr(model, "source_names", {})
    rows = []
    for conv in model.convs:
        decision, in_ref = model.plan.conv_refs[conv.name]
        rows.append(
            {
                "layer": conv.name,
                "source": names.get(conv.name, ""),
                "prunable": decision is not None,
                "input gated": in_ref is not None,
                "full MACs (M)": conv.full_macs / 1e6,
            }
        )
    return report.format_table(rows, ["layer", "source", "prunable", "input gated", "full MACs (M)"])
