"""Random-weight models that behave like trained ones, for benchmarks and tests.

A freshly built `RNPModel` has identity BatchNorm (gamma 1, beta 0, mean 0,
variance 1): every width gives nearly the same activations and folded
weights are trivial. Timing and equivalence checks want the general case.
"""

import numpy as np


def randomise_batchnorm(model, seed=0, spread=0.2):
    """Gives every conv's BatchNorm sets random, plausible statistics, in place.

    Args:
        model: an `rnp_tf.RNPModel`.
        seed: numpy seed, or a `np.random.Generator` to draw from (its
            state advances, so the caller can keep drawing).
        spread: standard deviation of beta and of the moving mean.

    Returns:
        `model`.

    Example:

    >>> model = randomise_batchnorm(rnp_tf.RNPModel(rnp_tf.cifar_cnn(), (32, 32, 3), 10))
    """
    rng = np.random.default_rng(seed)
    for conv in model.convs:
        if not hasattr(conv, "gamma"):
            continue
        shape = conv.gamma.shape
        conv.gamma.assign(rng.uniform(0.5, 1.5, shape))
        conv.beta.assign(rng.normal(0.0, spread, shape))
        conv.moving_mean.assign(rng.normal(0.0, spread, shape))
        conv.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    return model
