"""RNPModel: rollout, costs, execution paths, training phases, saving, errors."""

import itertools
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from bench.models import randomise_batchnorm
from rnp_tf import data

SMALL = rnp_tf.cifar_cnn((8, 8, 16, 16))


def small_model(**kwargs):
    kwargs.setdefault("image_shape", (8, 8, 1))
    kwargs.setdefault("num_classes", 10)
    return rnp_tf.RNPModel(SMALL, **kwargs)


def images(n, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def test_rollout_shapes_and_costs():
    model = small_model()
    out = model.rollout(images(5))
    assert out["logits"].shape == (5, 10)
    assert out["actions"].shape == (5, 3) and out["actions"].dtype == tf.int32
    assert out["q_values"].shape == (5, 3, 4)
    np.testing.assert_allclose(out["macs"], model.macs(out["actions"]))
    assert np.all((out["actions"].numpy() >= 1) & (out["actions"].numpy() <= 4))


def test_mac_count_of_the_whole_model_by_hand():
    model = small_model()
    # 8x8x1 -> stem 8 (8x8) -> pool 4x4 -> conv 8 -> conv 16 -> pool 2x2 -> conv 16 -> GAP -> 10
    def hand(a1, a2, a3):
        stem = 8 * 8 * 9 * 1 * 8
        c1 = 4 * 4 * 9 * 8 * (a1 * 2)
        c2 = 4 * 4 * 9 * (a1 * 2) * (a2 * 4)
        c3 = 2 * 2 * 9 * (a2 * 4) * (a3 * 4)
        head = (a3 * 4) * 10
        return stem + c1 + c2 + c3 + head

    tuples = np.array(list(itertools.product(range(1, 5), repeat=3)))
    np.testing.assert_allclose(model.macs(tuples).numpy(), [hand(*t) for t in tuples])
    assert model.full_macs == hand(4, 4, 4)
    np.testing.assert_allclose(model.compute_fraction([[4, 4, 4]]).numpy(), [1.0])


@pytest.mark.parametrize("pooling", ["gap", "flatten"])
def test_masked_and_sliced_execution_agree_for_every_action(pooling):
    spec = rnp_tf.cifar_cnn((8, 8, 16, 16))
    spec["head"] = {"pooling": pooling, "hidden": [12] if pooling == "flatten" else [], "dropout": 0.0}
    model = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=10)
    randomise_batchnorm(model)
    x = images(64, seed=1)
    tuples = np.array(list(itertools.product(range(1, 5), repeat=3)))
    masked = model.rollout(x, actions=tuples)
    sliced = model.sliced_rollout(x, actions=tuples)
    np.testing.assert_allclose(sliced["logits"], masked["logits"], atol=1e-5)
    np.testing.assert_allclose(sliced["macs"], masked["macs"])


def test_greedy_sliced_matches_masked_actions_and_logits():
    model = small_model()
    randomise_batchnorm(model)
    # spread the decoders so that different images pick different actions
    for decoder in model.agent.decoders:
        decoder.kernel.assign(np.random.default_rng(3).normal(0, 2.0, decoder.kernel.shape))
    x = images(16, seed=2) * 3
    masked = model.rollout(x)
    sliced = model.sliced_rollout(x)
    np.testing.assert_array_equal(sliced["actions"], masked["actions"])
    np.testing.assert_allclose(sliced["logits"], masked["logits"], atol=1e-5)
    assert len({tuple(a) for a in sliced["actions"]}) > 1


def test_call_and_predict_return_greedy_logits():
    model = small_model()
    x = images(6)
    np.testing.assert_allclose(model(x), model.rollout(x)["logits"], atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), model.rollout(x)["logits"], atol=1e-5)
    details = model.predict_details(x, batch_size=4)
    np.testing.assert_array_equal(details["actions"], model.rollout(x)["actions"])
    np.testing.assert_allclose(details["compute_fraction"], details["macs"] / model.full_macs)


@pytest.mark.parametrize(
    "x,match",
    [
        (np.zeros((8, 8, 1), "float32"), "4D"),
        (np.zeros((2, 8, 8, 3), "float32"), "channels"),
        (np.zeros((2, 9, 8, 1), "float32"), "8x8"),
        (np.zeros((2, 8, 8, 1), "uint8"), "float"),
        (np.zeros((2, 8, 8, 1), "int32"), "float"),
    ],
)
def test_bad_images_raise(x, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        model.rollout(x)
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize(
    "actions,match",
    [
        ([[0, 1, 1], [1, 1, 1]], "1..4"),
        ([[5, 1, 1], [1, 1, 1]], "1..4"),
        ([[1, 1], [1, 1]], "shape"),
        ([[1, 1, 1]], "one row per input"),
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "integers"),
    ],
)
def test_bad_actions_raise(actions, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        model.rollout(images(2), actions=np.asarray(actions))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"groups": 3}, "groups"),
        ({"num_classes": 1}, "num_classes"),
        ({"image_shape": (8, 8)}, "image_shape"),
        ({"gamma": 1.5}, "gamma"),
        ({"agent_steps": -1}, "agent_steps"),
        ({"q_loss": "l1"}, "q_loss"),
        ({"full_width_fraction": 2.0}, "full_width_fraction"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_model(**kwargs)


def test_compile_rejects_foreign_loss_and_metrics():
    model = small_model()
    with pytest.raises(ValueError, match="loss"):
        model.compile(loss="mse")
    with pytest.raises(ValueError, match="metrics"):
        model.compile(metrics=["accuracy"])


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


@pytest.fixture(scope="module")
def fashion(shared_npz):
    path = shared_npz("fashion_mnist.npz")
    return data.load_dataset(f"npz:{path}", batch_size=64, max_train_examples=1024)


@pytest.mark.slow  # trains on Fashion-MNIST until the loss drops
def test_fit_phases_update_only_their_variables(fashion):
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 16, 16, 16)), image_shape=fashion.input_shape, num_classes=10
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.set_phase("full")
    first = model.fit(fashion.train, epochs=1, steps_per_epoch=4, verbose=0).history["loss"][0]
    later = model.fit(fashion.train, epochs=2, steps_per_epoch=8, verbose=0).history["loss"][-1]
    assert later < first - 0.3, (first, later)

    for phase, updated, frozen in (
        ("agent", model.agent_variables, model.backbone_variables),
        ("backbone", model.backbone_variables, model.agent_variables),
        ("robust", model.backbone_variables, model.agent_variables),
    ):
        model.set_phase(phase)
        before_u, before_f = _snapshot(updated), _snapshot(frozen)
        model.fit(fashion.train, epochs=1, steps_per_epoch=3, verbose=0)
        assert all(_changed(before_u, updated)), phase
        assert not any(_changed(before_f, frozen)), phase


def test_schedule_runs_the_phases_of_algorithm_1(fashion):
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 16, 16, 16)),
        image_shape=fashion.input_shape,
        num_classes=10,
        schedule=rnp_tf.Schedule(robust_steps=2, agent_steps=2, backbone_steps=3, epsilon_decay_steps=4),
    )
    model.compile()
    seen = []
    original = model._train_step_for_phase

    def spy(phase, batch):
        seen.append(phase)  # recorded once per trace, i.e. per compiled phase
        return original(phase, batch)

    model._train_step_for_phase = spy
    history = model.fit(fashion.train, epochs=1, steps_per_epoch=13, verbose=0)
    assert sorted(set(seen)) == ["agent", "backbone", "robust"]
    assert int(model._schedule_step.numpy()) == 13
    # robust 2, warm-up agent max(2, 4) = 4, backbone 3, agent 2, backbone 2
    assert int(model._agent_updates.numpy()) == 6
    assert model.current_phase() == "backbone"
    assert np.isfinite(history.history["agent_loss"][0])


def test_save_and_load_round_trip(tmp_path, fashion):
    model = rnp_tf.RNPModel(
        rnp_tf.cifar_cnn((8, 16, 16, 16)),
        image_shape=fashion.input_shape,
        num_classes=10,
        penalty=-0.05,
        schedule=rnp_tf.Schedule(agent_steps=3),
    )
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(fashion.train, epochs=1, steps_per_epoch=4, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, rnp_tf.RNPModel)
    assert loaded.get_config() == model.get_config()
    x, _ = fashion.test_arrays()
    a, b = model.rollout(x[:128]), loaded.rollout(x[:128])
    np.testing.assert_array_equal(a["actions"], b["actions"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6)
    assert int(loaded._schedule_step.numpy()) == 4
    assert loaded.agent_optimizer.learning_rate.numpy() == pytest.approx(1e-3)
    assert loaded.optimizer.learning_rate.numpy() == pytest.approx(2e-3)


OLD_DEFAULTS = {"late_decision": False, "aux_confidence": False, "penalty_range": None, "backbone_distill_weight": 0.0}


def test_config_of_an_older_release_loads_when_removed_options_hold_their_defaults():
    model = small_model(penalty=-0.05, schedule=rnp_tf.Schedule(backbone_penalty_range=(-0.3, 0.05)))
    config = {**model.get_config(), **OLD_DEFAULTS}
    loaded = rnp_tf.RNPModel.from_config(config)
    assert loaded.get_config() == model.get_config()
    agent = {**model.agent.get_config(), "conditioned": False, "extra_inputs": 0, "aux_classes": 0}
    assert rnp_tf.DecisionAgent.from_config(agent).get_config() == model.agent.get_config()


@pytest.mark.parametrize(
    "option, value",
    [("late_decision", True), ("aux_confidence", True), ("penalty_range", [-0.5, -0.01]),
     ("backbone_distill_weight", 0.5)],
)
def test_config_of_an_older_release_with_a_removed_option_is_refused(option, value):
    config = {**small_model().get_config(), **OLD_DEFAULTS, option: value}
    with pytest.raises(ValueError, match=rf"`{option}` was removed .* measured no better .* check out rnp-tf at "
                                         rf"commit 7fe7dd6\. Received: {option}="):
        rnp_tf.RNPModel.from_config(config)
    agent = {**small_model().agent.get_config(), "conditioned": True}
    with pytest.raises(ValueError, match="`conditioned` was removed .* commit 7fe7dd6"):
        rnp_tf.DecisionAgent.from_config(agent)


DATA = pathlib.Path(__file__).parent / "data"


def test_keras_file_written_before_the_plan_loads():
    """A `.keras` file of 7fe7dd6 (flat schedule arguments, no plan) loads and gives the same numbers."""
    expected = np.load(DATA / "pre_redesign_expected.npz")
    model = keras.saving.load_model(DATA / "pre_redesign.keras")
    assert model.schedule == rnp_tf.Schedule()
    assert model.penalty_setting == pytest.approx(-0.05)
    out = model.rollout(expected["x"])
    np.testing.assert_array_equal(out["actions"], expected["actions"])
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-6)
    np.testing.assert_allclose(out["macs"], expected["macs"])
    forced = model.rollout(expected["x"], actions=expected["forced"])
    np.testing.assert_allclose(forced["logits"], expected["forced_logits"], atol=1e-6)


def test_schedule_arguments_of_the_model_say_where_they_moved():
    with pytest.raises(ValueError, match=r"`agent_steps` moved into the training schedule: pass "
                                         r"`schedule=rnp_tf.Schedule\(agent_steps=...\)`. Received: agent_steps=3"):
        small_model(agent_steps=3)
    config = {**small_model().get_config(), "agent_steps": 7}
    config.pop("schedule")
    assert rnp_tf.RNPModel.from_config(config).schedule.agent_steps == 7


def test_empty_batch_gives_empty_outputs_everywhere():
    model = small_model()
    empty = np.zeros((0, 8, 8, 1), "float32")
    assert model(empty).shape == (0, 10)
    out = model.rollout(empty)
    assert out["logits"].shape == (0, 10) and out["actions"].shape == (0, 3)
    assert out["q_values"].shape == (0, 3, 4) and out["macs"].shape == (0,)
    assert model.rollout(empty, actions=np.zeros((0, 3), "int32"))["q_values"] is None
    assert model.predict(empty, verbose=0).shape == (0, 10)
    sliced = model.sliced_rollout(empty)
    assert sliced["logits"].shape == (0, 10) and sliced["actions"].shape == (0, 3)
    with pytest.raises(ValueError, match="8x8"):
        model.predict(np.zeros((0, 9, 8, 1), "float32"))


def _fit_every_phase(model):
    """Seven `fit` steps on 64 random 8x8x1 images of 3 classes (every phase of a short schedule).

    Asserts finite losses and a moved agent; returns the images.
    """
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    before = [v.numpy() for v in model.agent.trainable_variables]
    history = model.fit(data, epochs=1, steps_per_epoch=7, verbose=0)
    assert np.isfinite(history.history["agent_loss"][0]) and np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.agent.trainable_variables))
    return x


def test_skippable_model_trains_and_round_trips(tmp_path, skippable_bottleneck):
    """Every phase trains with skips explored (epsilon 1); the .keras file keeps the k + 1 Q-head."""
    model = rnp_tf.RNPModel(
        skippable_bottleneck, image_shape=(8, 8, 1), num_classes=3,
        schedule=rnp_tf.Schedule(robust_steps=1, agent_steps=2, backbone_steps=2, epsilon_decay_steps=100),
    )
    assert [d.units for d in model.agent.decoders] == [5, 4, 4]
    x = _fit_every_phase(model)
    explored = model.rollout(x, policy="epsilon", epsilon=1.0)["actions"].numpy()
    assert (explored[:, 0] == 0).any() and (explored[:, 2] > 0).all()
    np.testing.assert_array_equal(explored[explored[:, 0] == 0, 1], 0)
    path = tmp_path / "skip.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config() and loaded.plan.skippable == {0}
    a, b = model.rollout(x), loaded.rollout(x)
    np.testing.assert_array_equal(a["actions"], b["actions"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6)


def _tied_model(**kwargs):
    """`RESIDUAL`-like blocks on 8x8x1, deciding once per stage: block 2 takes block 1's two decisions."""
    stages = [{"type": "conv", "filters": 8}] + [
        {"type": "bottleneck", "filters": 4, "projection": False, "expansion": 2} for _ in range(2)
    ] + [{"type": "conv", "filters": 8}]
    spec = rnp_tf.decide_per_stage({"stages": stages, "head": {"pooling": "gap"}})
    model = rnp_tf.RNPModel(spec, image_shape=(8, 8, 1), num_classes=3, **kwargs)
    for decoder in filter(None, model.agent.decoders):  # spread Q-values: varied actions
        decoder.kernel.assign(np.random.default_rng(3).normal(0, 2.0, decoder.kernel.shape))
    return model


class _CountingAgent:
    """The model's agent, counting the decisions it is asked for."""

    def __init__(self, agent):
        self.agent, self.decided = agent, []

    def initial_state(self, n):
        return self.agent.initial_state(n)

    def decide(self, t, pooled, state):
        self.decided.append(t)
        return self.agent.decide(t, pooled, state)


def test_tied_decisions_take_their_leaders_action_and_skip_the_agent():
    """Greedy, forced and exploring: a tied decision repeats its leader's action; the agent runs at leaders only."""
    from rnp_tf import rollout as rollout_lib

    model = _tied_model()
    assert model.plan.tied_to == {2: 0, 3: 1} and model.agent.encoders[2] is None and model.agent.decoders[3] is None
    plain = rnp_tf.RNPModel({**model.backbone, "stages": [{k: v for k, v in s.items() if k != "tied"}
                                                          for s in model.backbone["stages"]]},
                            image_shape=(8, 8, 1), num_classes=3)
    assert model.agent.macs() < plain.agent.macs()
    x = images(32)
    for out in (model.rollout(x), model.rollout(x, policy="epsilon", epsilon=1.0),
                model.rollout(x, actions=np.random.default_rng(0).integers(1, 5, size=(32, 5)))):
        actions = out["actions"].numpy()
        np.testing.assert_array_equal(actions[:, 2:4], actions[:, 0:2])
    greedy = model.rollout(x)
    assert len({tuple(a) for a in greedy["actions"].numpy()}) > 1  # the agent's choice varies
    np.testing.assert_array_equal(greedy["q_values"].numpy()[:, 2:4], 0)
    counting = _CountingAgent(model.agent)
    out = rollout_lib.rollout(model.plan, counting, x, model.greedy_policy(), rollout_lib.MaskedExecutor(model.plan))
    assert counting.decided == [0, 1, 4]
    np.testing.assert_array_equal(tf.stack(out.actions, axis=1), greedy["actions"])
    with pytest.raises(ValueError, match="Decision 2 is tied"):
        model.agent.weights_of(2)


@pytest.mark.slow
def test_tied_model_trains_prices_caps_and_round_trips(tmp_path):
    """Every phase trains; the knob prices a leader's action once per decision taking it; the cap holds."""
    model = _tied_model(schedule=rnp_tf.Schedule(robust_steps=1, agent_steps=2, backbone_steps=2,
                                                 epsilon_decay_steps=100))
    x = _fit_every_phase(model)
    q = tf.zeros([1, 4])
    model.set_penalty(model.penalty - 0.1)
    np.testing.assert_allclose(model.greedy_q(0, q, []).numpy(), [[0.0, -0.2, -0.4, -0.6]], atol=1e-6)  # 2 decisions
    np.testing.assert_allclose(model.greedy_q(4, q, [tf.ones([1], tf.int32)] * 4).numpy(),
                               [[0.0, -0.1, -0.2, -0.3]], atol=1e-6)
    model.set_penalty(model.penalty)
    wide = model.penalty + 1.0
    assert (model.rollout(x, penalty=wide)["macs"].numpy() > 0.5 * model.full_macs).any()  # the cap will bind
    model.set_compute_cap(0.5)
    out = model.rollout(x, penalty=wide)
    assert (out["macs"].numpy() <= 0.5 * model.full_macs * (1 + 1e-6)).all()
    np.testing.assert_array_equal(out["actions"].numpy()[:, 2:4], out["actions"].numpy()[:, 0:2])
    model.set_compute_cap(None)
    path = tmp_path / "tied.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config() and loaded.plan.tied_to == {2: 0, 3: 1}
    a, b = model.rollout(x), loaded.rollout(x)
    np.testing.assert_array_equal(a["actions"], b["actions"])
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-6)
