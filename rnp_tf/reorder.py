"""Reorder channels by importance so group 1 holds the strongest filters.

RNP's actions compute a *prefix* of each layer's output channels, so which
channels sit in the first groups matters. A normally trained layer has its
channels in arbitrary order; sorting them by importance before the RNP
phases lets the narrow prefixes keep the filters that matter most.
Reordering a layer's output channels, its BatchNorm, the next layer's input
channels (and the agent encoder or head that reads them) does not change
what the full-width network computes. A depthwise conv on the reordered
prefix (an inverted residual) has its channels, BatchNorm included,
permuted with it.
"""

import numpy as np

from rnp_tf.layers import GatedDepthwiseConv2D


def channel_importance(conv):
    """L1 norm of each output filter with full-width BatchNorm folded in.

    The BatchNorm scale multiplies the filter's output, so the folded filter
    `W[..., c] * gamma_c / sqrt(var_c + eps)` is what produces the channel
    (a conv without BatchNorm uses its kernel as is).

    Args:
        conv: a built `GatedConv2D`.

    Returns:
        numpy array `(filters,)` of importances.

    Example:

    >>> channel_importance(model.prunable[0]).shape
    (64,)
    """
    l1 = np.abs(np.asarray(conv.kernel)).sum(axis=(0, 1, 2))
    if not conv.normalization:
        return l1
    full = conv.num_bn_sets - 1
    gamma = np.asarray(conv.gamma)[full]
    variance = np.asarray(conv.moving_variance)[full]
    return l1 * np.abs(gamma) / np.sqrt(variance + conv.epsilon)


def reorder_channels(model):
    """Sorts every prunable conv's output channels by importance, in place.

    Group 1 of every prunable layer then holds its strongest filters. The
    consumers of each reordered output (the convs that read it, the agent
    encoder that pools it, the head) are permuted to match, so the
    full-width function of the model (logits and agent Q-values when every
    action is `k`) is unchanged.

    Args:
        model: an `RNPModel`.

    Returns:
        The list of permutations applied, one per prunable conv.

    Example:

    >>> perms = reorder_channels(model)
    """
    permutations = []
    for t, conv in enumerate(model.prunable):
        perm = np.argsort(-channel_importance(conv), kind="stable")
        permutations.append(perm)
        conv.kernel.assign(np.asarray(conv.kernel)[..., perm])
        _permute_outputs(conv, perm)
        for consumer in model.convs:
            decision, in_ref = model.plan.conv_refs[consumer.name]
            if in_ref != t:
                continue
            consumer.kernel.assign(np.asarray(consumer.kernel)[:, :, perm, :])
            if isinstance(consumer, GatedDepthwiseConv2D):  # its output is the permuted prefix too
                _permute_outputs(consumer, perm)
            if decision is not None and decision not in model.plan.tied_to:  # a tied decision reads no map
                encoder = model.agent.encoders[decision]
                kernel = np.asarray(encoder.kernel)
                kernel[: len(perm)] = kernel[: len(perm)][perm]
                encoder.kernel.assign(kernel)
        if model.plan.head.in_ref == t:
            _permute_head_rows(model, perm)
    return permutations


def _permute_outputs(conv, perm):
    """Permutes a conv's per-output-channel BatchNorm (or bias)."""
    if conv.normalization:
        for variable in (conv.gamma, conv.beta, conv.moving_mean, conv.moving_variance):
            variable.assign(np.asarray(variable)[:, perm])
    else:
        conv.bias.assign(np.asarray(conv.bias)[perm])


def _permute_head_rows(model, perm):
    """Permutes the channels the head's first Dense reads, in either row layout."""
    head = model.plan.head
    dense = head.layers[0]
    # channel-major rows: one block of `spatial` rows per channel
    kernel = head.relayout(dense.kernel, head.layout, "channel")
    kernel = kernel.reshape(len(perm), head.spatial, -1)[perm].reshape(kernel.shape)
    dense.kernel.assign(head.relayout(kernel, "channel", head.layout))
