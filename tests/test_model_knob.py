"""The run-time knob of RNPModel: penalty / budget settings and the hard cap."""

import keras
import numpy as np
import pytest

import rnp_tf


@pytest.fixture(scope="module")
def trained():
    """A small model trained on digits (real data bundled with scikit-learn)."""
    keras.utils.set_random_seed(1)
    data = rnp_tf.load_dataset("digits", batch_size=64, validation_split=0.2)
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 16, 16, 16)), image_shape=data.input_shape, num_classes=10,
        schedule=rnp_tf.Schedule(robust_steps=120, agent_steps=15, backbone_steps=15, epsilon_decay_steps=60),
        penalty=-0.05,
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(data.train, epochs=10, verbose=0)
    return model, data


@pytest.mark.slow  # the `trained` fixture trains for 10 epochs
def test_compute_is_monotone_in_the_penalty(trained):
    model, data = trained
    x, _ = data.test_arrays()
    penalties = model.penalty + np.array([1.0, 0.5, 0.2, 0.0, -0.2, -0.5, -1.0, -2.0])
    means = [float(model.macs(model.rollout(x, penalty=p)["actions"]).numpy().mean()) for p in penalties]
    assert all(b <= a for a, b in zip(means, means[1:])), means
    assert means[0] > 1.3 * means[-1], means  # the knob really moves compute


@pytest.mark.slow  # the `trained` fixture trains for 10 epochs
def test_set_penalty_is_what_rollout_call_and_predict_use(trained):
    model, data = trained
    x, _ = data.test_arrays()
    model.set_penalty(model.penalty - 1.0)
    try:
        cheap = model.predict_details(x)
        np.testing.assert_array_equal(cheap["actions"], model.rollout(x)["actions"])
        np.testing.assert_allclose(model.predict(x, verbose=0), cheap["logits"], atol=1e-5)
        sliced = model.sliced_rollout(x[:5])
        np.testing.assert_array_equal(sliced["actions"], cheap["actions"][:5])
    finally:
        model.set_penalty(model.penalty)
    default = model.predict_details(x)
    assert cheap["compute_fraction"].mean() <= default["compute_fraction"].mean()


@pytest.mark.slow  # the `trained` fixture trains for 10 epochs
def test_budget_calibration_and_setting(trained):
    model, data = trained
    table = model.calibrate_budget(data.validation, num_points=7)
    penalties, fractions = zip(*table)
    assert list(penalties) == sorted(penalties, reverse=True)
    chosen = [model.set_budget(b) for b in (0.9, 0.6, 0.4, 0.2)]
    assert chosen == sorted(chosen, reverse=True)  # smaller budget, more negative penalty
    achieved = []
    for b in (0.9, 0.6, 0.4, 0.2):
        model.set_budget(b)
        achieved.append(model.predict_details(data.validation)["compute_fraction"].mean())
    assert all(b <= a + 1e-6 for a, b in zip(achieved, achieved[1:])), achieved
    model.set_penalty(model.penalty)


@pytest.mark.slow  # the `trained` fixture trains for 10 epochs
def test_knob_survives_saving(trained, tmp_path):
    model, data = trained
    model.calibrate_budget(data.validation, num_points=5)
    model.set_budget(0.5)
    path = tmp_path / "knob.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.penalty_setting == pytest.approx(model.penalty_setting)
    np.testing.assert_allclose(loaded._calibration.numpy(), model._calibration.numpy())
    x, _ = data.test_arrays()
    np.testing.assert_array_equal(loaded.predict_details(x)["actions"], model.predict_details(x)["actions"])
    model.set_penalty(model.penalty)


@pytest.mark.slow  # the `trained` fixture trains for 10 epochs
def test_set_budget_refined_on_data_lands_within_tolerance(trained):
    model, data = trained
    x, _ = data.test_arrays()
    table = model.calibrate_budget(x, num_points=5)
    low, high = min(f for _, f in table), max(f for _, f in table)
    # the budgets between, and one 6% above the cheapest calibrated point (within an absolute 0.01 of it)
    budgets = [*np.linspace(low, high, 5)[1:-1], low / 0.94]
    try:
        for budget in budgets:
            model.set_budget(float(budget), x)
            measured = float(model.predict_details(x)["compute_fraction"].mean())
            assert abs(measured - budget) <= 0.05 * budget, (budget, measured, table)
        with pytest.raises(ValueError, match="tolerance"):
            model.set_budget(0.5, x, tolerance=0.0)
    finally:
        model.set_penalty(model.penalty)


def test_compute_cap_survives_saving(tmp_path):
    model = greedy_spender()
    model.set_compute_cap(0.5)
    path = tmp_path / "cap.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.compute_cap == pytest.approx(0.5)
    x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype("float32")
    fractions = loaded.predict_details(x)["compute_fraction"]
    assert fractions.max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(loaded.predict_details(x)["actions"], model.predict_details(x)["actions"])


def greedy_spender():
    """An untrained model whose agent prefers the widest actions."""
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10)
    for decoder in model.agent.decoders:
        decoder.bias.assign([0.0, 1.0, 2.0, 3.0])
    return model


@pytest.fixture(scope="module")
def spender():
    """One `greedy_spender()` for the cap levels below: its compiled predict paths are traced once."""
    return greedy_spender()


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])  # the floor, a binding cap, no binding cap
def test_hard_cap_is_never_exceeded(spender, share):
    model = spender
    model.set_compute_cap(None)  # as built, whatever an earlier cap level left
    floor = model.min_macs / model.full_macs
    cap = floor + share * (1.0 - floor)
    x = np.random.default_rng(0).normal(size=(256, 8, 8, 1)).astype("float32") * 3
    uncapped = model.predict_details(x)["compute_fraction"]
    model.set_compute_cap(cap)
    capped = model.predict_details(x)
    assert capped["compute_fraction"].max() <= cap + 1e-6
    if cap < uncapped.max():
        assert capped["compute_fraction"].mean() < uncapped.mean()
    np.testing.assert_array_equal(model.rollout(x[:16])["actions"], capped["actions"][:16])
    np.testing.assert_array_equal(model.sliced_rollout(x[:4])["actions"], capped["actions"][:4])
    model.set_compute_cap(None)
    np.testing.assert_allclose(model.predict_details(x)["compute_fraction"], uncapped)


def test_knob_errors():
    model = greedy_spender()
    with pytest.raises(ValueError, match="narrowest"):
        model.set_compute_cap(0.01)
    with pytest.raises(ValueError, match="finite"):
        model.set_penalty(float("nan"))
    with pytest.raises(ValueError, match="calibrate_budget"):
        model.set_budget(0.5)
    with pytest.raises(ValueError, match="compute_fraction"):
        model.set_budget(1.5)


def test_greedy_q_is_the_knob_the_rollout_applies():
    """`greedy_q` re-prices by (p - p0) * (a - 1), masks what the cap forbids, and its argmax is rollout's choice."""
    model = greedy_spender()
    x = np.random.default_rng(1).normal(size=(32, 8, 8, 1)).astype("float32") * 3
    raw = model.rollout(x, policy="epsilon", epsilon=1.0)["q_values"]  # raw, at random actions
    model.set_penalty(model.penalty - 0.7)
    np.testing.assert_allclose(
        model.greedy_q(0, raw[:, 0], []), raw[:, 0] - 0.7 * np.arange(4.0)[None], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(  # a float penalty is the same knob without the variable
        model.greedy_q(0, raw[:, 0], [], model.penalty_setting), model.greedy_q(0, raw[:, 0], []), atol=1e-6
    )
    model.set_penalty(model.penalty)  # the spender wants every group: the cap binds
    model.set_compute_cap(0.35)
    out = model.rollout(x)
    decided = [out["actions"][:, u] for u in range(model.num_prunable)]
    masked = 0
    for t in range(model.num_prunable):
        q = model.greedy_q(t, out["q_values"][:, t], decided[:t]).numpy()
        np.testing.assert_array_equal(np.argmax(q, axis=-1) + 1, out["actions"][:, t])
        masked += int((q <= -1e29).sum())
    assert masked > 0  # the cap forbade some wide actions
    model.set_compute_cap(None)
    with pytest.raises(ValueError, match="decision index"):
        model.greedy_q(model.num_prunable, raw[:, 0], [])
    with pytest.raises(ValueError, match="earlier actions"):
        model.greedy_q(1, raw[:, 0], [])


@pytest.mark.parametrize("penalties, action", [((-50.0, -40.0), 1), ((40.0, 50.0), 4)])
def test_backbone_phases_act_under_the_backbone_penalty_range(penalties, action):
    """The backbone phase's choice is re-priced to the drawn penalty; the agent phase keeps `penalty`."""
    keras.utils.set_random_seed(0)
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10, penalty=-0.1,
        schedule=rnp_tf.Schedule(
            backbone_penalty_range=penalties, full_width_fraction=0.0, epsilon_start=0.0, epsilon_end=0.0
        ),
    )
    model.compile()
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 10
    model.set_phase("backbone")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    shares = model.shares_tracker.shares()
    np.testing.assert_array_equal(shares[:, action - 1], 1.0)  # every image, every layer
    model.set_phase("agent")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert model.shares_tracker.shares()[:, action - 1].min() < 1.0  # greedy on the raw Q-values: some other action
    clone = rnp_tf.RNPModel.from_config(model.get_config())
    assert clone.schedule.backbone_penalty_range == penalties


def test_backbone_penalty_range_errors():
    for bad in ((-0.1, -0.3), (float("nan"), 0.0)):
        with pytest.raises(ValueError, match="backbone_penalty_range"):
            rnp_tf.Schedule(backbone_penalty_range=bad)
