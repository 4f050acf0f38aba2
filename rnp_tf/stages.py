"""The stages of a training run: their order, which are enabled, how each is compiled.

A run (`rnp_tf.trainer.run`) trains, each stage skippable:

1. `backbone`: the backbone at full width (`--pretrain_epochs`);
2. `reorder`: every layer's channels sorted by importance (one "epoch");
3. `robust`: the prefix-robust phase (`--robust_epochs`);
4. `rnp`: Algorithm 1, alternating agent / backbone phases (`--rnp_epochs`).

Example:

>>> stage_plan(TrainConfig(model_dir="/tmp/rnp", pretrain_epochs=2, rnp_epochs=3))
[('backbone', 2), ('reorder', 1), ('rnp', 3)]
"""

from rnp_tf import distribute

# Training stages in order; the integer identifies the stage in derived seeds.
STAGES = {"backbone": 0, "reorder": 1, "robust": 2, "rnp": 3}
# The `RNPModel.set_phase` of each trained stage (None: Algorithm 1's alternation).
STAGE_PHASE = {"backbone": "full", "robust": "robust", "rnp": None}


def stage_plan(config):
    """The enabled stages of a config, in order.

    Args:
        config: a `rnp_tf.run_config.TrainConfig`.

    Returns:
        `[(stage, epochs)]`; `reorder` has 1.
    """
    plan = []
    if config.pretrain_epochs:
        plan.append(("backbone", config.pretrain_epochs))
    if config.reorder:
        plan.append(("reorder", 1))
    if config.robust_epochs:
        plan.append(("robust", config.robust_epochs))
    if config.rnp_epochs:
        plan.append(("rnp", config.rnp_epochs))
    return plan


def make_optimizer(name, learning_rate):
    """The Keras optimizer a `--optimizer` / `--agent_optimizer` name gives.

    Args:
        name: 'adam', 'sgd' (momentum 0.9) or 'rmsprop'.
        learning_rate: its learning rate.

    Returns:
        A `keras.optimizers.Optimizer`.
    """
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def compile_stage(model, config, stage, strategy):
    """Compiles the model with a trained stage's two optimizers and sets its phase.

    Args:
        model: the run's `RNPModel`.
        config: a `rnp_tf.run_config.TrainConfig`.
        stage: 'backbone', 'robust' or 'rnp'.
        strategy: the `tf.distribute.Strategy` whose scope holds the model.
    """
    lr = {"backbone": config.pretrain_lr, "robust": config.robust_lr, "rnp": config.backbone_lr}[stage]
    with strategy.scope():
        model.compile(
            optimizer=make_optimizer(config.optimizer, lr),
            agent_optimizer=make_optimizer(config.agent_optimizer, config.agent_lr),
        )
    distribute.adapt_model(model, strategy)
    model.set_phase(STAGE_PHASE[stage])
