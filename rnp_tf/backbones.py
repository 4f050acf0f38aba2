"""Backbone descriptions: a network's structure as plain data.

A backbone is a dict with two keys::

    {"stages": [{"type": "conv", "filters": 32, "kernel_size": 3, "strides": 1},
                {"type": "pool", "size": 2},
                ...],
     "head": {"pooling": "gap", "hidden": [], "dropout": 0.0}}

Every `conv` stage is a conv + BatchNorm + ReLU block; the first one is the
stem, always computed in full, and every later one is prunable. `pool` stages
are 2D max-pooling. The head pools the last feature map (`"gap"`: global
average; `"flatten"`: keep the spatial layout, as VGG does), applies the
`hidden` Dense+ReLU layers with `dropout`, then the classifier. The same
description builds the CIFAR CNN and VGG-16, so they share one code path.
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
    return _from_plan(plan, {"pooling": "flatten", "hidden": list(hidden), "dropout": dropout})


BACKBONES = {"cifar_cnn": cifar_cnn, "vgg16": vgg16}


def get_backbone(name, **kwargs):
    """Looks up a backbone description by name.

    Args:
        name: one of `BACKBONES` (`"cifar_cnn"`, `"vgg16"`).
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


def validate_backbone(spec, groups):
    """Checks a backbone description and returns a normalised deep copy.

    Args:
        spec: a backbone description dict.
        groups: the number of channel groups `k`; must divide every conv's
            channels.

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
    convs = [s for s in stages if s.get("type") == "conv"]
    if len(convs) < 2:
        raise ValueError(
            f"A backbone needs at least 2 conv stages (a stem and a prunable layer). "
            f"Received: {len(convs)} conv stages"
        )
    if stages[0].get("type") != "conv":
        raise ValueError(f"The first stage must be a conv (the stem). Received: stages[0]={stages[0]!r}")
    for i, stage in enumerate(stages):
        kind = stage.get("type")
        if kind == "conv":
            validation.check_positive_int(f"stages[{i}].filters", stage.get("filters"))
            stage.setdefault("kernel_size", 3)
            stage.setdefault("strides", 1)
            if stage["filters"] % groups:
                raise ValueError(
                    f"`groups` must divide the channels of every conv stage. Received: "
                    f"groups={groups}, stages[{i}].filters={stage['filters']}"
                )
        elif kind == "pool":
            stage.setdefault("size", 2)
            validation.check_positive_int(f"stages[{i}].size", stage["size"])
        else:
            raise ValueError(f"Stage type must be 'conv' or 'pool'. Received: stages[{i}]={stage!r}")
    head = spec.setdefault("head", {})
    head.setdefault("pooling", "gap")
    head.setdefault("hidden", [])
    head.setdefault("dropout", 0.0)
    if head["pooling"] not in ("gap", "flatten"):
        raise ValueError(f"head.pooling must be 'gap' or 'flatten'. Received: {head['pooling']!r}")
    head["hidden"] = [validation.check_positive_int("head.hidden", u) for u in head["hidden"]]
    if not 0.0 <= float(head["dropout"]) < 1.0:
        raise ValueError(f"head.dropout must be in [0, 1). Received: {head['dropout']!r}")
    return spec
