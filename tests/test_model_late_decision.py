"""RNPModel(late_decision=True): a narrow first pass whose confidence the agent reads."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from rnp_tf.agent import confidence_features


def late_model(**kwargs):
    return rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10,
                           late_decision=True, **kwargs)


def images(n=12, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 8, 8, 1)).astype("float32")


def test_confidence_features_on_hand_made_logits():
    certain, uniform = confidence_features(tf.constant([[20.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])).numpy()
    np.testing.assert_allclose(certain, [1.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(uniform, [0.25, 0.0, 1.0], atol=1e-6)


def test_the_agent_reads_the_narrow_confidence():
    model = late_model()
    assert model.agent.extra_inputs == 3
    with pytest.raises(ValueError, match="extra inputs"):
        model.agent.step(0, tf.zeros((2, 8, 8, 8)), model.agent.initial_state(2))
    # Same pooled features, other confidence: other Q-values.
    state = model.agent.initial_state(2)
    features = tf.ones((2, 8, 8, 8))
    q, _ = model.agent.step(0, features, state, extra=tf.constant([[1.0, 1.0, 0.0], [0.2, 0.0, 1.0]]))
    assert not np.allclose(q[0], q[1])


def test_stop_keeps_the_narrow_answer_and_costs_only_the_narrow_pass():
    model = late_model()
    x = images()
    narrow = model.rollout(x, actions=np.ones((len(x), 3), np.int32))
    model.set_penalty(-50.0)  # every extra group far too dear: all stop
    out = model.rollout(x)
    assert out["stopped"].numpy().all()
    np.testing.assert_allclose(out["logits"], narrow["logits"], atol=1e-6)
    np.testing.assert_allclose(out["macs"], model.min_macs)
    model.set_penalty(+50.0)  # every group rewarded: all escalate to the full network
    out = model.rollout(x)
    assert not out["stopped"].numpy().any()
    np.testing.assert_array_equal(out["actions"], np.full((len(x), 3), 4))
    np.testing.assert_allclose(out["macs"], model.min_macs + model.full_macs)
    full = model.rollout(x, actions=np.full((len(x), 3), 4))
    np.testing.assert_allclose(out["logits"], full["logits"], atol=1e-6)


def test_mixed_batch_sliced_and_predict_agree_with_rollout():
    model = late_model()
    x = images(16, seed=3)
    narrow = model.rollout(x, actions=np.ones((len(x), 3), np.int32))
    conf = confidence_features(narrow["logits"]).numpy()[:, 0]
    # Price the groups so that some images stop and some do not: search the penalty.
    for penalty in np.linspace(-1.0, 1.0, 81):
        model.set_penalty(float(penalty))
        stopped = model.rollout(x)["stopped"].numpy()
        if 0 < stopped.sum() < len(x):
            break
    else:
        pytest.skip(f"no penalty gives a mixed batch for this random agent (confidences {conf.round(2)})")
    out = model.rollout(x)
    sliced = model.sliced_rollout(x)
    np.testing.assert_array_equal(sliced["actions"], out["actions"])
    np.testing.assert_allclose(sliced["logits"], out["logits"], atol=1e-4)
    np.testing.assert_allclose(sliced["macs"], out["macs"], rtol=1e-6)
    details = model.predict_details(x)  # the masked path: the engine does not run late models
    np.testing.assert_allclose(details["macs"], out["macs"], rtol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), out["logits"], atol=1e-5)
    s = out["stopped"].numpy()
    np.testing.assert_allclose(details["logits"][s], narrow["logits"].numpy()[s], atol=1e-5)


def test_engine_cap_and_errors():
    model = late_model()
    with pytest.raises(ValueError, match="late_decision"):
        model.predict_details(images(), engine=True)
    with pytest.raises(ValueError, match="late_decision"):
        rnp_tf.InferenceEngine(model)
    with pytest.raises(ValueError, match="no compute cap"):
        model.set_compute_cap(0.5)
    with pytest.raises(ValueError, match="late_decision"):
        rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), (8, 8, 1), 10, late_decision="yes")


def test_trains_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    model = late_model(agent_steps=2, backbone_steps=2, epsilon_decay_steps=4)
    x, y = images(32), np.arange(32) % 10
    model.compile(optimizer="adam", agent_optimizer="adam")
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = tmp_path / "late.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.late_decision
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
