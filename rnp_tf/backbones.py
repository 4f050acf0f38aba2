"""Backbone descriptions: a network's structure as plain data.

A backbone is a dict with two keys::

    {"stages": [{"type": "conv", "filters": 32, "kernel_size": 3, "strides": 1},
                {"type": "pool", "size": 2},
                ...],
     "head": {"pooling": "gap", "hidden": [], "dropout": 0.0}}

Every `conv` stage is a conv + BatchNorm + ReLU block; the first one is the
stem, always computed in full, and every later one is prunable. `pool` stages
are 2D max-pooling. Residual networks add `bottleneck` stages (ResNet) and
`inverted_residual` stages (MobileNetV2). The head pools the last feature map (`"gap"`: global
average; `"flatten"`: keep the spatial layout, as VGG does), applies the
`hidden` Dense+ReLU layers with `dropout`, then the classifier. The same
description builds the CIFAR CNN and VGG-16, so they share one code path.
After `"flatten"`, `head["layout"]` orders the first Dense's rows:
`"spatial"` (Keras' `Flatten`, the default when the key is absent) or
`"channel"` (channel-major, what `vgg16()` and `from_keras` produce: the
rows that read the agent's channel prefix are one contiguous block).
"""

import copy

from rnp_tf import validation

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _from_plan(plan, head):
    stages = []
    for item in plan:
        if item == "M":
            stages.append({"type": "pool", "size": 2})
        else:
            stages.append({"type": "conv", "filters": int(item), "kernel_size": 3, "strides": 1})
    return {"stages": stages, "head": dict(head)}


def cifar_cnn(widths=(32, 64, 128, 128)):
    """The small 4-conv CNN of the paper's CIFAR experiments (~34M MACs at 32x32).

    conv(w0) - pool - conv(w1) - conv(w2) - pool - conv(w3) - GAP - Dense.

    Args:
        widths: output channels of the four 3x3 convolutions. Defaults to
            `(32, 64, 128, 128)`.

    Returns:
        A backbone description dict.

    Example:

    >>> spec = cifar_cnn()
    >>> [s["filters"] for s in spec["stages"] if s["type"] == "conv"]
    [32, 64, 128, 128]
    """
    if len(widths) != 4:
        raise ValueError(f"`widths` must list 4 channel counts. Received: widths={widths!r}")
    w0, w1, w2, w3 = widths
    plan = [w0, "M", w1, w2, "M", w3]
    return _from_plan(plan, {"pooling": "gap", "hidden": [], "dropout": 0.0})


def vgg16(width_multiplier=1.0, hidden=(4096, 4096), dropout=0.5):
    """VGG-16 (13 convs, for 224x224 ImageNet images) as a description.

    Args:
        width_multiplier: scales every conv's channels (1.0 is VGG-16).
        hidden: sizes of the fully connected layers before the classifier.
        dropout: dropout rate after each hidden layer.

    Returns:
        A backbone description dict.

    Example:

    >>> sum(s["type"] == "conv" for s in vgg16()["stages"])
    13
    """
    if width_multiplier <= 0:
        raise ValueError(
            f"`width_multiplier` must be positive. Received: width_multiplier={width_multiplier}"
        )
    plan = [item if item == "M" else max(1, int(round(item * width_multiplier))) for item in _VGG16]
    return _from_plan(plan, {"pooling": "flatten", "layout": "channel", "hidden": list(hidden), "dropout": dropout})


def vgg_cifar(width=48):
    """A VGG-style CNN for 32x32 inputs: wider and deeper than `cifar_cnn`.

    conv(w) - conv(w) - pool - conv(2w) - conv(2w) - pool - conv(4w) -
    conv(4w) - GAP - Dense: six 3x3 convs (five prunable), VGG's pattern
    of doubling widths after each pooling, about 87M MACs at 32x32 with
    the default `width=48` (`cifar_cnn` has 34M). More redundancy per
    layer, as in the paper's VGG experiments, at a cost a 2-core CPU
    trains in minutes.

    Args:
        width: channels of the first two convs. Defaults to 48.

    Returns:
        A backbone description dict.

    Example:

    >>> [s["filters"] for s in vgg_cifar(16)["stages"] if s["type"] == "conv"]
    [16, 16, 32, 32, 64, 64]
    """
    width = validation.check_positive_int("width", width)
    plan = [width, width, "M", 2 * width, 2 * width, "M", 4 * width, 4 * width]
    return _from_plan(plan, {"pooling": "gap", "hidden": [], "dropout": 0.0})


BACKBONES = {"cifar_cnn": cifar_cnn, "vgg16": vgg16, "vgg_cifar": vgg_cifar}  # residual ones added below


def get_backbone(name, **kwargs):
    """Looks up a backbone description by name.

    Args:
        name: one of `BACKBONES` (`"cifar_cnn"`, `"vgg_cifar"`, `"vgg16"`,
            `"resnet50"`, `"resnet_cifar"`, `"mobilenet_v2"`).
        **kwargs: passed to the builder.

    Returns:
        A backbone description dict.

    Example:

    >>> get_backbone("cifar_cnn", widths=(8, 8, 16, 16))["head"]["pooling"]
    'gap'
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone. Expected one of {sorted(BACKBONES)}. Received: name={name!r}")
    return BACKBONES[name](**kwargs)


def resnet50(expansion=4, bn_epsilon=1.001e-5, skippable=False):
    """ResNet-50 (v1, as `keras.applications.ResNet50`) as a description.

    The stem (7x7/2 conv, 3x3/2 max-pool) and the last 1x1 conv of every
    bottleneck (it feeds the residual `Add`) keep their full output; the
    first two convs of every bottleneck are prunable, as FBS prunes ResNets.
    BatchNorm's epsilon is Keras' (1.001e-5), so the weights of
    `rnp_tf.from_keras(keras.applications.ResNet50(...))` load exactly into
    a model of this description (`rnp_tf.train --init_checkpoint`).

    Args:
        expansion: output channels of a bottleneck over its inner width.
        bn_epsilon: BatchNormalization epsilon of every conv.
        skippable: when True, the 12 bottlenecks with an identity shortcut
            (all but the first of each group) are skippable: the agent may
            skip their residual branch (`rnp_tf.plan.NetworkPlan`).
            Defaults to False.

    Returns:
        A backbone description dict.

    Example:

    >>> sum(s["type"] == "bottleneck" for s in resnet50()["stages"])
    16
    >>> sum(s.get("skippable", False) for s in resnet50(skippable=True)["stages"])
    12
    """
    stages = [
        {"type": "zeropad", "padding": 3},
        {"type": "conv", "filters": 64, "kernel_size": 7, "strides": 2, "padding": "valid", "prunable": False,
         "bn_epsilon": bn_epsilon},
        {"type": "zeropad", "padding": 1},
        {"type": "pool", "size": 3, "strides": 2, "padding": "valid"},
    ]
    for filters, blocks, strides in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            stages.append(
                {
                    "type": "bottleneck",
                    "filters": filters,
                    "strides": strides if i == 0 else 1,
                    "projection": i == 0,
                    "expansion": expansion,
                    "bn_epsilon": bn_epsilon,
                    **({"skippable": True} if skippable and i > 0 else {}),
                }
            )
    return {"stages": stages, "head": {"pooling": "gap", "hidden": [], "dropout": 0.0}}


BACKBONES["resnet50"] = resnet50


def resnet_cifar(widths=(16, 32, 64), blocks=2, expansion=4, skippable=False):
    """A small bottleneck ResNet for 32x32 inputs, ResNet-50's blocks at CIFAR scale.

    A 3x3 stem of `widths[0] * expansion` channels (full width), then one
    stage per entry of `widths`: `blocks` bottlenecks of that inner width
    (the first of a later stage has stride 2 and a projection shortcut),
    each pruned as in `resnet50`: its first two convs are prunable, its
    last conv and the shortcut keep their full width. About 32M MACs at
    32x32 with the defaults (`cifar_cnn`: 34M); 12 decisions.

    Args:
        widths: inner width of each stage's bottlenecks (divisible by the
            model's `groups`). Defaults to (16, 32, 64).
        blocks: bottlenecks per stage. Defaults to 2.
        expansion: output channels of a bottleneck over its inner width.
        skippable: when True, every bottleneck with an identity shortcut
            (all but the first of each stage) is skippable. Defaults to False.

    Returns:
        A backbone description dict.

    Example:

    >>> [s["filters"] for s in resnet_cifar()["stages"] if s["type"] == "bottleneck"]
    [16, 16, 32, 32, 64, 64]
    >>> sum(s.get("skippable", False) for s in resnet_cifar(skippable=True)["stages"])
    4
    """
    blocks = validation.check_positive_int("blocks", blocks)
    expansion = validation.check_positive_int("expansion", expansion)
    widths = [validation.check_positive_int("widths", w) for w in widths]
    stages = [{"type": "conv", "filters": widths[0] * expansion, "kernel_size": 3, "strides": 1, "prunable": False}]
    for j, filters in enumerate(widths):
        for i in range(blocks):
            first = i == 0
            stages.append(
                {
                    "type": "bottleneck",
                    "filters": filters,
                    "strides": 2 if first and j > 0 else 1,
                    "projection": first and j > 0,
                    "expansion": expansion,
                    **({"skippable": True} if skippable and not (first and j > 0) else {}),
                }
            )
    return {"stages": stages, "head": {"pooling": "gap", "hidden": [], "dropout": 0.0}}


BACKBONES["resnet_cifar"] = resnet_cifar

# MobileNetV2's inverted residual blocks: (output channels, blocks, first stride, expansion).
_MOBILENET_V2 = ((16, 1, 1, 1), (24, 2, 2, 6), (32, 3, 2, 6), (64, 4, 2, 6), (96, 3, 1, 6), (160, 3, 2, 6),
                 (320, 1, 1, 6))


def _make_divisible(value, divisor=8):
    """Keras's channel rounding of MobileNetV2: the nearest multiple of 8, never 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mobilenet_v2(alpha=1.0, skippable=False):
    """MobileNetV2 (as `keras.applications.MobileNetV2`) as a description.

    The stem (3x3/2 conv `Conv1` + ReLU6) keeps its full output; each of the
    17 inverted residual blocks prunes its expansion (the 1x1 conv's output
    prefix, the depthwise conv on that prefix, the projection's input), and
    the last 1x1 conv (`Conv_1`, 1280 channels) is prunable too, so the
    agent takes 17 decisions. The first block (expansion 1) has no
    expansion conv: its depthwise conv reads the stem's full output and
    stays unpruned. Widths follow Keras's rounding for `alpha`; BatchNorm
    epsilon is Keras's 1e-3; about 300M MACs at 224x224 for `alpha=1.0`.

    Args:
        alpha: width multiplier of every layer. Defaults to 1.0.
        skippable: when True, the 10 blocks with an identity shortcut (all
            but the first of each group) are skippable. Defaults to False.

    Returns:
        A backbone description dict.

    Example:

    >>> sum(s["type"] == "inverted_residual" for s in mobilenet_v2()["stages"])
    17
    >>> sum(s.get("skippable", False) for s in mobilenet_v2(skippable=True)["stages"])
    10
    """
    if not alpha > 0:
        raise ValueError(f"`alpha` must be positive. Received: alpha={alpha}")
    relu6 = {"activation": "relu6", "bn_epsilon": 1e-3}
    stages = [{"type": "conv", "filters": _make_divisible(32 * alpha), "kernel_size": 3, "strides": 2,
               "prunable": False, **relu6}]
    for filters, blocks, strides, expansion in _MOBILENET_V2:
        for i in range(blocks):
            stages.append({"type": "inverted_residual", "filters": _make_divisible(int(filters * alpha)),
                           "expansion": expansion, "strides": strides if i == 0 else 1, **relu6,
                           **({"skippable": True} if skippable and i > 0 else {})})
    last = _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    stages.append({"type": "conv", "filters": last, "kernel_size": 1, "padding": "valid", **relu6})
    return {"stages": stages, "head": {"pooling": "gap", "hidden": [], "dropout": 0.0}}


BACKBONES["mobilenet_v2"] = mobilenet_v2

_BLOCKS = ("bottleneck", "inverted_residual")


def decide_per_stage(backbone):
    """A copy of a description whose agent decides once per stage instead of once per block.

    Every block with an identity shortcut that follows a block of the same
    kind (the later blocks of a ResNet or MobileNetV2 stage) is marked
    `"tied"`: its decisions take the actions of the stage's first block, and
    the agent neither pools its maps nor runs there (`rnp_tf.plan.NetworkPlan`).
    ResNet-50 then takes 8 decisions instead of 32, MobileNetV2 7 instead
    of 17: the agent's cost falls with them; whether its accuracy holds is
    what `bench.accuracy` measures.

    Args:
        backbone: a description dict (not modified). Blocks may not be
            `skippable` (not supported together yet).

    Returns:
        The new description.

    Example:

    >>> spec = decide_per_stage(resnet_cifar())
    >>> [s.get("tied", False) for s in spec["stages"] if s["type"] == "bottleneck"]
    [False, True, False, True, False, True]
    """
    spec = copy.deepcopy(backbone)
    previous = None
    for i, stage in enumerate(spec["stages"]):
        kind = stage.get("type")
        if kind in _BLOCKS and stage.get("skippable", False):
            raise ValueError(f"decide_per_stage: stages[{i}] is skippable; tied blocks cannot be skipped yet. "
                             f"Received: stages[{i}]={stage!r}")
        if kind == "bottleneck":
            identity = not stage.get("projection", False)
        elif kind == "inverted_residual":
            identity = (stage.get("strides", 1) == 1 and stage.get("expansion", 6) != 1 and previous is not None
                        and previous.get("filters") == stage.get("filters") and stage.get("residual") is not False)
        else:
            identity = False
        if identity and previous is not None and previous.get("type") == kind:
            stage["tied"] = True
        previous = stage if kind in _BLOCKS else None
    return spec
_CONV_DEFAULTS = {
    "kernel_size": 3, "strides": 1, "padding": "same", "normalization": True, "activation": "relu", "bn_epsilon": 1e-3,
}


def validate_backbone(spec, groups):
    """Checks a backbone description and returns a normalised deep copy.

    Stage types: `conv` (`filters`, `kernel_size`=3, `strides`=1,
    `padding`="same", `normalization`=True, `activation`="relu",
    `prunable`: default True for every conv but the first, False for a conv
    whose output feeds a bottleneck's residual sum), `pool` (`size`=2,
    `strides`=size, `padding`="same", `mode`="max" or "avg"), `zeropad`
    (`padding`) and `bottleneck` (`filters`, `strides`=1, `projection`,
    `expansion`=4, `prunable`=[True, True]: 1x1 -> 3x3 -> 1x1 with a
    residual sum; the first two convs may be pruned, the last feeds the
    sum). Convs also take `bn_epsilon` (1e-3). A bottleneck or inverted
    residual with an identity shortcut may set `skippable` (False): the
    agent may then skip its residual branch (`rnp_tf.plan.NetworkPlan`);
    a block may set `tied` (False): its decisions then take the actions of
    the block just before it (`decide_per_stage`). The head takes `pooling`
    ("gap"), `hidden` ([]), `dropout` (0.0) and `layout` ("spatial" or
    "channel", default "spatial"; see `check_layout`).

    Args:
        spec: a backbone description dict.
        groups: the number of channel groups `k`; must divide the channels
            of every prunable conv (and the inputs of gated ones).

    Returns:
        The description with defaults filled in.

    Example:

    >>> len(validate_backbone(cifar_cnn(), groups=4)["stages"])
    6
    """
    if not isinstance(spec, dict) or "stages" not in spec:
        raise ValueError(f"A backbone must be a dict with 'stages' and 'head'. Received: backbone={spec!r}")
    spec = copy.deepcopy(spec)
    stages = spec["stages"]
    kinds = [s.get("type") for s in stages]
    if "conv" not in kinds:
        raise ValueError("A backbone needs a conv stage (the stem). Received: no conv stage")
    first_conv = kinds.index("conv")
    if any(kind in _BLOCKS for kind in kinds[:first_conv]):
        raise ValueError("The first conv (the stem) must come before any bottleneck or inverted_residual stage.")
    channels = None  # output channels of the stages so far
    for i, stage in enumerate(stages):
        kind = stage.get("type")
        if "skippable" in stage and kind not in _BLOCKS:
            raise ValueError(
                f"stages[{i}]: only a bottleneck or an inverted_residual with an identity shortcut can be "
                f"skippable. Received: stages[{i}]={stage!r}"
            )
        if "tied" in stage and (kind not in _BLOCKS or not isinstance(stage["tied"], bool)):
            raise ValueError(
                f"stages[{i}]: `tied` (a bool) is a key of a bottleneck or an inverted_residual only. "
                f"Received: stages[{i}]={stage!r}"
            )
        if kind == "conv":
            channels = stage.get("filters")
            for key, value in _CONV_DEFAULTS.items():
                stage.setdefault(key, value)
            validation.check_positive_int(f"stages[{i}].filters", stage.get("filters"))
            validation.check_positive_int(f"stages[{i}].kernel_size", stage["kernel_size"])
            validation.check_positive_int(f"stages[{i}].strides", stage["strides"])
            feeds_block = next((k for k in kinds[i + 1 :] if k in ("conv", *_BLOCKS)), None) in _BLOCKS
            stage.setdefault("prunable", i != first_conv and not feeds_block)
            if i == first_conv and stage["prunable"]:
                raise ValueError(f"The stem (stages[{i}]) has no feature map before it and cannot be prunable.")
            if stage["prunable"] and feeds_block:
                raise ValueError(
                    f"stages[{i}] feeds a residual block (a residual sum, or an inverted residual's full-width "
                    "input) and cannot be pruned at its output."
                )
            if stage["prunable"] and stage["filters"] % groups:
                raise ValueError(
                    f"`groups` must divide the channels of every prunable conv stage. Received: "
                    f"groups={groups}, stages[{i}].filters={stage['filters']}"
                )
        elif kind == "pool":
            stage.setdefault("size", 2)
            validation.check_positive_int(f"stages[{i}].size", stage["size"])
            stage.setdefault("strides", stage["size"])
            stage.setdefault("padding", "same")
            stage.setdefault("mode", "max")
            if stage["mode"] not in ("max", "avg"):
                raise ValueError(f"Pool mode must be 'max' or 'avg'. Received: stages[{i}]={stage!r}")
        elif kind == "zeropad":
            validation.check_positive_int(f"stages[{i}].padding", stage.get("padding"))
        elif kind == "inverted_residual":
            _check_inverted_residual(i, stage, channels, groups)
            channels = stage["filters"]
        elif kind == "bottleneck":
            validation.check_positive_int(f"stages[{i}].filters", stage.get("filters"))
            stage.setdefault("strides", 1)
            stage.setdefault("expansion", 4)
            stage.setdefault("projection", True)
            stage.setdefault("bn_epsilon", 1e-3)
            stage.setdefault("prunable", [True, True])
            if len(stage["prunable"]) != 2:
                raise ValueError(f"stages[{i}].prunable must be two booleans (its 1x1 and 3x3 convs).")
            if any(stage["prunable"]) and stage["filters"] % groups:
                raise ValueError(
                    f"`groups` must divide the inner channels of every bottleneck. Received: "
                    f"groups={groups}, stages[{i}].filters={stage['filters']}"
                )
            channels = stage["filters"] * stage["expansion"]
        else:
            raise ValueError(
                "Stage type must be 'conv', 'pool', 'zeropad', 'bottleneck' or 'inverted_residual'. "
                f"Received: stages[{i}]={stage!r}"
            )
    if not any(
        any(s["prunable"]) if s["type"] == "bottleneck" else s["prunable"]
        for s in stages
        if s["type"] in ("conv", *_BLOCKS)
    ):
        raise ValueError("A backbone needs at least one prunable conv (a conv after the stem).")
    head = spec.setdefault("head", {})
    head.setdefault("pooling", "gap")
    head.setdefault("hidden", [])
    head.setdefault("dropout", 0.0)
    if head["pooling"] not in ("gap", "flatten"):
        raise ValueError(f"head.pooling must be 'gap' or 'flatten'. Received: {head['pooling']!r}")
    head.setdefault("layout", "spatial")
    check_layout(head["layout"])
    head["hidden"] = [validation.check_positive_int("head.hidden", u) for u in head["hidden"]]
    if not 0.0 <= float(head["dropout"]) < 1.0:
        raise ValueError(f"head.dropout must be in [0, 1). Received: {head['dropout']!r}")
    return spec


def _check_inverted_residual(i, stage, in_channels, groups):
    """Fills an `inverted_residual` stage's defaults and checks it (errors name `stages[i]`)."""
    validation.check_positive_int(f"stages[{i}].filters", stage.get("filters"))
    for key, value in (("expansion", 6), ("strides", 1), ("kernel_size", 3)):
        validation.check_positive_int(f"stages[{i}].{key}", stage.setdefault(key, value))
    stage.setdefault("padding", "same")
    stage.setdefault("activation", "relu6")
    stage.setdefault("bn_epsilon", 1e-3)
    stage.setdefault("residual", None)
    stage.setdefault("prunable", stage["expansion"] != 1)
    if stage["padding"] not in ("same", "valid"):
        raise ValueError(f"stages[{i}].padding must be 'same' or 'valid'. Received: padding={stage['padding']!r}")
    if stage["prunable"] not in (True, False):
        raise ValueError(f"stages[{i}].prunable must be a bool. Received: prunable={stage['prunable']!r}")
    if stage["prunable"] and stage["expansion"] == 1:
        raise ValueError(
            f"stages[{i}] has no expansion conv (expansion=1): its depthwise conv reads the block's full-width "
            "input and nothing can be pruned. Received: prunable=True, expansion=1"
        )
    if stage["prunable"] and (in_channels * stage["expansion"]) % groups:
        raise ValueError(
            f"`groups` must divide the expanded channels of every prunable inverted residual. Received: "
            f"groups={groups}, stages[{i}] expands {in_channels} channels x{stage['expansion']}"
        )
    identity = stage["strides"] == 1 and in_channels == stage["filters"]
    if stage["residual"] not in (None, True, False) or (stage["residual"] and not identity):
        raise ValueError(
            f"stages[{i}].residual must be None, False, or True for a block with stride 1 and as many input as "
            f"output channels. Received: residual={stage['residual']!r}, strides={stage['strides']}, "
            f"input channels={in_channels}, filters={stage['filters']}"
        )


HEAD_LAYOUTS = ("spatial", "channel")


def check_layout(layout):
    """`layout` if it is a head layout, else a ValueError naming it.

    `"spatial"`: the first Dense's rows in Keras' `Flatten` order (position,
    then channel), the default of a description without `head.layout`;
    `"channel"`: channel-major rows, so the rows that read a channel prefix
    are one row prefix (`rnp_tf.plan.Head`).

    Example:

    >>> check_layout("channel")
    'channel'
    """
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"head.layout must be 'spatial' or 'channel'. Received: layout={layout!r}")
    return layout
