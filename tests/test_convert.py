"""rnp_tf.from_keras: exact conversion of Keras CNNs, reports, training, errors."""


import keras
import numpy as np
import pytest

import rnp_tf
from rnp_tf.convert import ConversionError
from rnp_tf.convert import prunable_table


def _randomise_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 0.3, layer.beta.shape))
            layer.moving_mean.assign(rng.normal(0, 0.3, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))


def user_cnn(classifier="linear"):
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(16, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(20, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation=classifier),
        ],
        name="user_cnn",
    )
    _randomise_bn(model)
    return model


def images(n, shape, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def full_logits(rnp, x):
    full = np.full((len(x), rnp.num_prunable), rnp.groups)
    return rnp.rollout(x, actions=full)["logits"].numpy()


def test_user_sequential_cnn_logits_equal():
    source = user_cnn()
    rnp = rnp_tf.from_keras(source, k=4)
    x = images(8, (16, 16, 3))
    np.testing.assert_allclose(full_logits(rnp, x), source.predict(x, verbose=0), atol=1e-5)
    assert rnp.num_prunable == 2 and not rnp.output_softmax
    # Flatten's fc1 rows are stored channel-major, moved once at conversion
    head = rnp.plan.head
    assert rnp.backbone["head"]["layout"] == head.layout == "channel" and head.spatial == 36
    keras_fc1 = np.asarray(source.layers[-3].kernel)
    np.testing.assert_array_equal(
        rnp.head_layers[0].kernel.numpy(), keras_fc1.reshape(6, 6, 32, 20).transpose(2, 0, 1, 3).reshape(-1, 20)
    )
    assert rnp.is_chain  # stem, then prunable convs and pools only
    table = prunable_table(rnp)
    assert "conv2d" in table and table.count("True") >= 2


def test_softmax_classifier_is_reported_and_dropped():
    source = user_cnn("softmax")
    rnp = rnp_tf.from_keras(source)
    x = images(4, (16, 16, 3))
    assert rnp.output_softmax
    probabilities = keras.ops.softmax(full_logits(rnp, x)).numpy()
    np.testing.assert_allclose(probabilities, source.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("builder", [keras.applications.VGG16, keras.applications.VGG19])
def test_vgg_applications(builder):
    source = builder(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    rnp = rnp_tf.from_keras(source)
    x = images(2, (32, 32, 3))
    np.testing.assert_allclose(full_logits(rnp, x), source.predict(x, verbose=0), atol=1e-4, rtol=1e-4)
    convs = [l for l in source.layers if isinstance(l, keras.layers.Conv2D)]
    assert rnp.num_prunable == len(convs) - 1


@pytest.fixture(scope="module")
def resnet():
    source = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None)
    _randomise_bn(source)
    return source, rnp_tf.from_keras(source)


def test_resnet50_logits_equal(resnet):
    source, rnp = resnet
    x = images(2, (64, 64, 3))
    np.testing.assert_allclose(full_logits(rnp, x), source.predict(x, verbose=0), atol=1e-4, rtol=1e-4)


def test_resnet50_report_excludes_convs_feeding_add(resnet):
    source, rnp = resnet
    prunable_sources = {rnp.source_names[c.name] for c in rnp.prunable}
    feeding_add = set()
    for layer in source.layers:
        if isinstance(layer, keras.layers.Add):
            for tensor in layer._inbound_nodes[0].input_tensors:
                bn = tensor._keras_history.operation
                conv = bn._inbound_nodes[0].input_tensors[0]._keras_history.operation
                if isinstance(conv, keras.layers.Conv2D):
                    feeding_add.add(conv.name)
    assert feeding_add and not prunable_sources & feeding_add
    assert "conv1_conv" not in prunable_sources
    assert len(prunable_sources) == 32  # two inner convs in each of 16 bottlenecks
    table = prunable_table(rnp)
    assert "conv2_block1_3_conv" in table and "conv2_block1_1_conv" in table


def test_resnet_masked_and_sliced_paths_agree(resnet):
    _, rnp = resnet
    x = images(3, (64, 64, 3), seed=1)
    actions = np.random.default_rng(0).integers(1, 5, size=(3, rnp.num_prunable))
    masked = rnp.rollout(x, actions=actions)
    sliced = rnp.sliced_rollout(x, actions=actions)
    np.testing.assert_allclose(sliced["logits"], masked["logits"], atol=1e-4)
    assert masked["macs"].numpy().max() < rnp.full_macs


def test_prunable_override_and_errors():
    source = user_cnn()
    names = [l.name for l in source.layers if isinstance(l, keras.layers.Conv2D)]
    rnp = rnp_tf.from_keras(source, prunable=[names[2]])
    assert [rnp.source_names[c.name] for c in rnp.prunable] == [names[2]]
    with pytest.raises(ConversionError, match="stem"):
        rnp_tf.from_keras(source, prunable=[names[0]])
    with pytest.raises(ConversionError, match="does not have"):
        rnp_tf.from_keras(source, prunable=["nope"])
    with pytest.raises(ValueError, match="divisible"):
        rnp_tf.from_keras(source, k=3, prunable=[names[1]])


class Custom(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


@pytest.mark.parametrize(
    "middle,match",
    [
        (lambda: Custom(name="mystery"), "mystery"),
        (lambda: keras.layers.DepthwiseConv2D(3, padding="same", name="dw"), "dw"),
        (lambda: keras.layers.BatchNormalization(name="lone_bn"), "lone_bn"),
    ],
)
def test_unsupported_layers_are_named(middle, match):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            middle(),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(ConversionError, match=match):
        rnp_tf.from_keras(model)


def test_channels_first_flatten_is_rejected():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Flatten(data_format="channels_first", name="nchw_flatten"),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(ConversionError, match="nchw_flatten"):
        rnp_tf.from_keras(model)


def test_concatenate_is_rejected():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    b = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(keras.layers.Concatenate(name="cat")([a, b])))
    with pytest.raises(ConversionError, match="cat"):
        rnp_tf.from_keras(keras.Model(inputs, out))


@pytest.fixture(scope="module")
def mobilenet():
    source = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3))
    _randomise_bn(source)
    return source, rnp_tf.from_keras(source)


def test_mobilenet_v2_logits_equal_and_structure(mobilenet):
    source, rnp = mobilenet
    x = images(3, (96, 96, 3))
    assert rnp.output_softmax  # Keras's classifier applies softmax: compare probabilities of 1000 classes
    np.testing.assert_allclose(_softmax(full_logits(rnp, x)), source.predict(x, verbose=0), rtol=1e-4, atol=1e-7)
    spec = rnp_tf.backbones.validate_backbone(rnp_tf.mobilenet_v2(alpha=0.35), 4)
    ours = [{k: v for k, v in s.items() if k not in ("source", "residual")} for s in rnp.backbone["stages"]]
    assert ours == [{k: v for k, v in s.items() if k != "residual"} for s in spec["stages"]]
    residual = [s["residual"] for s in rnp.backbone["stages"] if s["type"] == "inverted_residual"]
    assert residual == [isinstance(s, rnp_tf.plan.InvertedResidualStep) and s.residual for s in
                        rnp_tf.build_plan(spec, (96, 96, 3), 1000, 4).steps if hasattr(s, "residual")]
    prunable = [rnp.source_names[c.name] for c in rnp.prunable]
    assert prunable == [f"block_{i}_expand" for i in range(1, 17)] + ["Conv_1"]
    assert rnp.source_names[rnp.convs[1].name] == "expanded_conv_depthwise"  # expansion 1: kept full


def test_mobilenet_v2_per_stage_ties_the_later_blocks_of_each_stage(mobilenet):
    """`per_stage=True`: 7 decisions taken by the agent instead of 17, the same weights and full-width logits."""
    source, rnp = mobilenet
    staged = rnp_tf.from_keras(source, per_stage=True)
    assert staged.num_prunable == 17 and len(staged.plan.leaders) == 7 and not rnp.plan.tied_to
    x = images(2, (96, 96, 3))
    np.testing.assert_allclose(full_logits(staged, x), full_logits(rnp, x), atol=1e-5)


@pytest.mark.slow
def test_mobilenet_v2_narrow_widths_run_in_the_engine(mobilenet):
    _, rnp = mobilenet
    x = images(3, (96, 96, 3), seed=1)
    actions = np.random.default_rng(0).integers(1, 5, size=(3, rnp.num_prunable))
    masked = rnp.rollout(x, actions=actions)
    engine = rnp_tf.InferenceEngine(rnp)
    for out in (engine(x, actions=actions), engine(x[:1], actions=actions[:1])):
        n = len(out["logits"])
        np.testing.assert_allclose(out["logits"], masked["logits"][:n], atol=1e-4)
        np.testing.assert_allclose(out["macs"], masked["macs"][:n], rtol=1e-6)
    assert masked["macs"].numpy().max() < rnp.full_macs


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inverted_residual_model(activation="relu6", pad=None, project_activation=None, depth_multiplier=1,
                            dw_activation=None):
    """A user's small MobileNetV2-like functional model: two blocks (with and without `Add`)."""
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation(activation)(x)
    y = keras.layers.Conv2D(16, 1, use_bias=False, name="expand")(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.Activation(activation)(y)
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw",
                                     depth_multiplier=depth_multiplier)(y)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.Activation(dw_activation or activation)(y)
    y = keras.layers.Conv2D(8, 1, use_bias=False, activation=project_activation, name="project")(y)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.Add()([x, y])
    z = keras.layers.Conv2D(24, 1, use_bias=False, name="expand2")(x)
    z = keras.layers.BatchNormalization()(z)
    z = keras.layers.Activation(activation)(z)
    z = keras.layers.ZeroPadding2D(pad or ((0, 1), (0, 1)), name="pad2")(z)
    z = keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw2")(z)
    z = keras.layers.BatchNormalization()(z)
    z = keras.layers.Activation(activation)(z)
    z = keras.layers.Conv2D(12, 1, use_bias=False, name="project2")(z)
    z = keras.layers.BatchNormalization()(z)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(z))
    model = keras.Model(inputs, out)
    _randomise_bn(model)
    return model


def test_user_inverted_residual_model_converts_exactly():
    source = inverted_residual_model(activation="relu")
    rnp = rnp_tf.from_keras(source)
    blocks = [s for s in rnp.backbone["stages"] if s["type"] == "inverted_residual"]
    assert [(b["expansion"], b["strides"], b["residual"], b["activation"]) for b in blocks] == [
        (2, 1, True, "relu"), (3, 2, False, "relu")]
    x = images(5, (12, 12, 3))
    np.testing.assert_allclose(full_logits(rnp, x), source.predict(x, verbose=0), atol=1e-4, rtol=1e-4)
    assert [rnp.source_names[c.name] for c in rnp.prunable] == ["expand", "expand2"]
    with pytest.raises(ConversionError, match="expand2"):
        rnp_tf.from_keras(source, k=16, prunable=["expand2"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pad": ((1, 1), (1, 1))}, "pad2.*SAME padding"),
        ({"project_activation": "relu"}, "project.*linear 1x1"),
        ({"depth_multiplier": 2}, "dw.*depth_multiplier"),
        ({"dw_activation": "relu"}, "dw.*same activation"),
        ({"activation": "swish"}, "silu"),
    ],
)
def test_inverted_residuals_off_the_pattern_are_named(kwargs, match):
    with pytest.raises(ConversionError, match=match):
        rnp_tf.from_keras(inverted_residual_model(**kwargs))


def test_converted_model_trains_reorders_and_saves(tmp_path):
    source = user_cnn()
    rnp = rnp_tf.from_keras(source, schedule=rnp_tf.Schedule(agent_steps=2, backbone_steps=2, epsilon_decay_steps=2))
    x = images(32, (16, 16, 3))
    before = full_logits(rnp, x)
    rnp_tf.reorder_channels(rnp)
    np.testing.assert_allclose(full_logits(rnp, x), before, atol=1e-4)
    y = np.arange(32) % 10
    rnp.compile()
    history = rnp.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    path = tmp_path / "converted.keras"
    rnp.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.rollout(x)["logits"], rnp.rollout(x)["logits"], atol=1e-5)
