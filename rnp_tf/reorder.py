"""Reorder channels by importance so group 1 holds the strongest filters.

RNP's actions compute a *prefix* of each layer's output channels, so which
channels sit in the first groups matters. A normally trained layer has its
channels in arbitrary order; sorting them by importance before the RNP
phases lets the narrow prefixes keep the filters that matter most.
Reordering a layer's output channels, its BatchNorm, the next layer's input
channels (and the agent encoder or head that reads them) does not change
what the full-width network computes.
"""

import numpy as np


def channel_importance(conv):
    """L1 norm of each output filter with full-width BatchNorm folded in.

    The BatchNorm scale multiplies the filter's output, so the folded filter
    `W[..., c] * gamma_c / sqrt(var_c + eps)` is what produces the channel.

    Args:
        conv: a built `GatedConv2D`.

    Returns:
        numpy array `(filters,)` of importances.

    Example:

    >>> channel_importance(model.stem).shape
    (32,)
    """
    full = conv.num_bn_sets - 1
    gamma = np.asarray(conv.gamma)[full]
    variance = np.asarray(conv.moving_variance)[full]
    scale = np.abs(gamma) / np.sqrt(variance + conv.epsilon)
    l1 = np.abs(np.asarray(conv.kernel)).sum(axis=(0, 1, 2))
    return l1 * scale


def reorder_channels(model):
    """Sorts every conv's output channels by importance, in place.

    Group 1 of every layer then holds its strongest filters. The full-width
    function of the model (logits and agent Q-values when every action is
    `k`) is unchanged.

    Args:
        model: an `RNPModel`.

    Returns:
        The list of permutations applied, one per conv (stem first).

    Example:

    >>> perms = reorder_channels(model)
    """
    permutations = []
    for i, conv in enumerate(model.convs):
        perm = np.argsort(-channel_importance(conv), kind="stable")
        permutations.append(perm)
        conv.kernel.assign(np.asarray(conv.kernel)[..., perm])
        for variable in (conv.gamma, conv.beta, conv.moving_mean, conv.moving_variance):
            variable.assign(np.asarray(variable)[:, perm])
        if i + 1 < len(model.convs):
            following = model.convs[i + 1]
            following.kernel.assign(np.asarray(following.kernel)[:, :, perm, :])
            encoder = model.agent.encoders[i]
            encoder.kernel.assign(np.asarray(encoder.kernel)[perm, :])
        else:
            _permute_head_rows(model, perm)
    return permutations


def _permute_head_rows(model, perm):
    dense = model.head_layers[0]
    kernel = np.asarray(dense.kernel)
    if model.backbone["head"]["pooling"] == "gap":
        dense.kernel.assign(kernel[perm])
        return
    hf, wf, channels = model._head_in_shape
    kernel = kernel.reshape(hf, wf, channels, -1)[:, :, perm, :]
    dense.kernel.assign(kernel.reshape(hf * wf * channels, -1))
