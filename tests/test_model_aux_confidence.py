"""RNPModel(aux_confidence=True): the agent reads how sure a cheap classifier on its own features is."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import rnp_tf
from rnp_tf.agent import DecisionAgent, confidence_features


def aux_model(**kwargs):
    return rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10,
                           aux_confidence=True, **kwargs)


def images(n=12, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 8, 8, 1)).astype("float32")


def test_the_agent_reads_its_classifier_confidence():
    agent = DecisionAgent([8, 16], groups=4, aux_classes=5)
    agent.build()
    assert [head.kernel.shape for head in agent.aux_heads] == [(8, 5), (16, 5)]
    assert agent.encoders[1].kernel.shape == (16 + 3, 64)
    plain = DecisionAgent([8, 16], groups=4)
    assert agent.macs() == plain.macs() + 3 * 2 * 64 + (8 + 16) * 5
    features = tf.ones((2, 4, 4, 8))
    state = agent.initial_state(2)
    q_before, _ = agent.step(0, features, state)
    # only the classifier changes: the confidence it reports moves the Q-values
    agent.aux_heads[0].kernel.assign(np.random.default_rng(0).normal(scale=5.0, size=(8, 5)))
    q_after, _ = agent.step(0, features, state)
    assert not np.allclose(q_before, q_after)
    # the logits the step computed on the way are the classifier's own
    q, _, aux = agent.step(0, features, state, return_aux=True)
    np.testing.assert_allclose(q, q_after)
    np.testing.assert_allclose(aux, agent.aux_logits(0, features), atol=1e-6)
    assert plain.step(0, features, plain.initial_state(2), return_aux=True)[2] is None
    # a channel prefix counts the rest as zero, as the pooled features do
    prefix = agent.aux_logits(0, features[..., :4])
    padded = agent.aux_logits(0, tf.concat([features[..., :4], tf.zeros((2, 4, 4, 4))], axis=-1))
    np.testing.assert_allclose(prefix, padded, atol=1e-6)
    with pytest.raises(ValueError, match="no auxiliary classifiers"):
        plain.aux_logits(0, features)
    with pytest.raises(ValueError, match="aux_classes"):
        DecisionAgent([8], aux_classes=1)


def test_gradient_stops_keep_q_learning_out_of_the_classifiers_and_the_backbone():
    model = aux_model()
    x = images()
    y = np.arange(len(x)) % 10
    with tf.GradientTape(persistent=True) as tape:
        out = model.rollout(x, policy="epsilon", epsilon=0.5)
        q_loss = tf.reduce_sum(out["q_values"])
        aux_loss = model._aux_loss(y, out["aux_logits"])
    heads = [v for head in model.agent.aux_heads for v in head.trainable_variables]
    assert all(g is None for g in tape.gradient(q_loss, heads))
    assert all(g is None for g in tape.gradient(aux_loss, model.backbone_variables))
    assert all(g is not None for g in tape.gradient(aux_loss, heads))
    assert out["aux_logits"].shape == (len(x), 3, 10)


def test_engine_and_sliced_paths_agree_with_rollout():
    model = aux_model()
    rng = np.random.default_rng(1)
    for head in model.agent.aux_heads:  # confident, varied classifiers: varied actions
        head.kernel.assign(rng.normal(scale=10.0, size=head.kernel.shape))
    x = images(16, seed=3) * rng.uniform(0.0, 4.0, size=(16, 1, 1, 1)).astype("float32")
    out = model.rollout(x)
    details = model.predict_details(x, engine=True)
    np.testing.assert_array_equal(details["actions"], out["actions"])
    np.testing.assert_allclose(details["logits"], out["logits"], atol=1e-4)
    sliced = model.sliced_rollout(x)
    np.testing.assert_array_equal(sliced["actions"], out["actions"])
    np.testing.assert_allclose(sliced["logits"], out["logits"], atol=1e-4)


def test_training_teaches_the_classifiers_and_the_model_saves(tmp_path):
    keras.utils.set_random_seed(0)
    model = aux_model(agent_steps=4, backbone_steps=2, epsilon_decay_steps=4)
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2  # two classes a linear probe on pooled features separates: bright and black
    x = (rng.uniform(size=(64, 8, 8, 1)) * np.where(y == 1, 4.0, 0.0)[:, None, None, None]).astype("float32")
    model.compile(optimizer="adam", agent_optimizer=keras.optimizers.Adam(0.05))
    before = float(model._aux_loss(y, model.rollout(x)["aux_logits"]))
    history = model.fit(x, y, epochs=4, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = model.rollout(x)["aux_logits"]
    assert float(model._aux_loss(y, after)) < 0.5 * before
    assert np.mean(np.argmax(after[:, 0], axis=-1) == y) > 0.9  # the first layer's classifier learned it
    path = tmp_path / "aux.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.aux_confidence and loaded.agent.aux_classes == 10
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(confidence_features(loaded.rollout(x)["aux_logits"][:, 0]),
                               confidence_features(after[:, 0]), atol=1e-5)
    with pytest.raises(ValueError, match="aux_confidence"):
        rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), (8, 8, 1), 10, aux_confidence=1)
