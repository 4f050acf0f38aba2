"""rnp_tf.imitation: oracle labels checked against forced rollouts, and an agent that learns a rule."""

import numpy as np
import pytest

import rnp_tf
from rnp_tf import imitation


def _model(**kwargs):
    return rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=3, **kwargs)


def _images(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 8, 8, 1)).astype("float32")
    return x, rng.integers(0, 3, n)


def test_oracle_picks_the_cheapest_qualifying_mix():
    fractions = np.array([1.0, 0.2, 0.5])
    ok = np.array([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], bool)  # [mixes, images]
    np.testing.assert_array_equal(imitation.oracle_choice(ok, fractions, fallback=0), [2, 1, 0, 0])


def test_candidate_mixes_all_or_a_sample_with_the_uniform_ones():
    every = imitation.candidate_mixes(3, 4, max_mixes=64)
    assert len(every) == 64 and len({tuple(m) for m in every}) == 64
    sample = imitation.candidate_mixes(5, 4, max_mixes=40, seed=1)
    assert len(sample) == 40 and len({tuple(m) for m in sample}) == 40
    assert sample.min() >= 1 and sample.max() <= 4
    for a in range(1, 5):
        assert any((m == a).all() for m in sample)
    np.testing.assert_array_equal(sample[-1], [4] * 5)  # the full network last
    with pytest.raises(ValueError, match="max_mixes"):
        imitation.candidate_mixes(5, 4, max_mixes=3)


def test_soft_oracle_is_the_cheapest_mix_within_the_margin():
    model = _model()
    x, y = _images()
    mixes = imitation.candidate_mixes(model.num_prunable, model.groups, 64)
    margin = 0.02
    targets = imitation.soft_oracle_actions(model, x, y, mixes, margin=margin)
    assert targets.shape == (len(x), model.num_prunable) and targets.dtype == np.int32
    full_loss, _ = imitation.per_image_loss(model, x, y, np.full((1, 3), 4))
    target_loss, _ = imitation.per_image_loss(model, x, y, targets)
    assert (target_loss <= full_loss + margin + 1e-6).all()
    # no cheaper mix qualifies for any image
    fractions = model.compute_fraction(mixes).numpy()
    target_fraction = model.compute_fraction(targets).numpy()
    for mix, fraction in zip(mixes, fractions):
        loss, _ = imitation.per_image_loss(model, x, y, mix[None, :])
        cheaper = fraction < target_fraction - 1e-9
        assert not (cheaper & (loss <= full_loss + margin)).any()
    # an unbounded margin: the narrowest mix for every image
    assert (imitation.soft_oracle_actions(model, x, y, mixes, margin=1e9) == 1).all()


def test_imitate_teaches_the_agent_a_rule_it_can_see():
    model = _model()
    x, _ = _images(256)
    x[::2] *= 0.05  # dark images: one group everywhere; bright images: the full width
    targets = np.where(np.arange(256)[:, None] % 2 == 0, 1, 4).repeat(model.num_prunable, axis=1).astype("int32")
    before = model.rollout(x)["actions"].numpy()
    history = imitation.imitate(model, x, targets, epochs=15, batch_size=64, learning_rate=3e-3)
    assert len(history["loss"]) == 15 and history["loss"][-1] < history["loss"][0]
    assert history["agreement"][-1] > 0.95
    after = model.rollout(x)["actions"].numpy()  # greedy, no teacher forcing
    assert (after == targets).mean() > 0.95 > (before == targets).mean()


def test_bad_inputs_name_the_problem():
    model = _model()
    x, y = _images(8)
    with pytest.raises(ValueError, match="margin"):
        imitation.soft_oracle_actions(model, x, y, margin=-1.0)
    with pytest.raises(ValueError, match="one label per image"):
        imitation.soft_oracle_actions(model, x, y[:5])
    with pytest.raises(ValueError, match="actions"):
        imitation.imitate(model, x, np.full((8, 3), 7))
    with pytest.raises(ValueError, match="epochs"):
        imitation.imitate(model, x, np.ones((8, 3), int), epochs=0)
