"""`RNPModel`: a backbone of gated convolutions driven by an LSTM agent.

The model composes the library's pieces and gives them a Keras face
(`fit`, `evaluate`, `predict`, `rollout`, `set_budget`, `.keras` saving):

- the network is a `rnp_tf.plan.NetworkPlan`, built from the backbone
  description (`model.plan`: steps, layers, the MAC table);
- every pass walks it with the one loop of `rnp_tf.rollout`: the masked
  executor for training and `call`, the sliced reference for
  `sliced_rollout`, the inference engine's executors for `predict`;
- the agent is a `rnp_tf.DecisionAgent`;
- Algorithm 1's schedule is a `rnp_tf.Schedule`;
- the run-time knob's maths is `rnp_tf.knob`; its state (penalty setting,
  calibration, cap) is saved with the model.

Training follows Algorithm 1 of Lin et al. (2017) as a custom `train_step`,
so `model.fit` drives it: phases of N1 agent (DQN) steps alternate with N2
backbone (classification) steps, each with its own optimizer. Each phase is
compiled into its own train function and the schedule picks one per step in
Python: choosing the phase with `tf.cond` inside one function fails under
`MirroredStrategy`.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from rnp_tf import agent as agent_lib
from rnp_tf import backbones as backbones_lib
from rnp_tf import dqn
from rnp_tf import engine as engine_lib
from rnp_tf import knob as knob_lib
from rnp_tf import metrics as metrics_lib
from rnp_tf import plan as plan_lib
from rnp_tf import rollout as rollout_lib
from rnp_tf import validation
from rnp_tf.schedule import FIELDS as SCHEDULE_FIELDS
from rnp_tf.schedule import PHASES
from rnp_tf.schedule import Schedule

# Options measured, not kept and removed after commit 7fe7dd6: their old
# default (dropped silently from an older config) and their write-up.
REMOVED_OPTIONS = {
    "late_decision": (False, "late_decision.md"),
    "aux_confidence": (False, "aux_confidence.md"),
    "penalty_range": (None, "conditioned_agent.md"),
    "backbone_distill_weight": (0.0, "backbone_distill.md"),
}


def _per_sample_ce(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _replica_scale(loss):
    """Divides a loss by the replica count so summed gradients are means."""
    replicas = tf.distribute.get_replica_context()
    num = replicas.num_replicas_in_sync if replicas is not None else 1
    return loss / num if num > 1 else loss


def _replica_gradients(tape, loss, variables):
    """Gradients of the replica-scaled loss; the scaling is recorded on the tape."""
    with tape:
        scaled = _replica_scale(loss)
    return tape.gradient(scaled, variables)


@keras.saving.register_keras_serializable(package="rnp_tf")
class RNPModel(keras.Model):
    """A CNN whose convolutions are pruned at run time, image by image.

    Args:
        backbone: a backbone description (see `rnp_tf.backbones`), e.g.
            `rnp_tf.backbones.cifar_cnn()`.
        image_shape: `(height, width, channels)` of the inputs.
        num_classes: number of classes of the classifier head.
        groups: `k`, the number of channel groups of every prunable conv.
            Defaults to 4.
        agent_embed_dim: size of the agent's per-layer encoders. Defaults to 64.
        agent_units: size of the agent's shared LSTM. Defaults to 64.
        penalty: `p`, the (negative) reward per extra group. Defaults to -0.1.
        alpha: weight of the classification loss in the last reward; `None`
            (default) sets it per batch to `1 / mean(L_cls)` so that
            `alpha * L_cls` averages 1, as the paper prescribes.
        gamma: Q-learning discount. Defaults to 1.0.
        q_loss: `"mse"` (the paper's) or `"huber"`. Defaults to `"mse"`.
        schedule: a `rnp_tf.Schedule`, Algorithm 1's phases and their
            options (phase lengths, agent warm-up, epsilon ramp,
            prefix-robust phase, full-width mixing, backbone re-pricing), or
            its config dict. Defaults to `Schedule()`.
        inference_engine: if True (default), `predict` and `predict_details`
            run through `rnp_tf.engine.InferenceEngine`, which computes only
            the channel groups the agent chose (really faster than the
            masked path; `jit_compile=True` uses the masked path). False: always the
            masked path. Either can be overridden per call
            (`predict(x, engine=...)`).
        compute_cap: the hard per-image MAC cap (`set_compute_cap`) as a
            fraction of the full model, or None (default). Saved with the
            model.
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Example:

    >>> model = RNPModel(cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1),
    ...                  num_classes=10)
    >>> out = model.rollout(np.zeros((2, 8, 8, 1), "float32"))
    >>> out["logits"].shape, out["actions"].shape, out["macs"].shape
    (TensorShape([2, 10]), TensorShape([2, 3]), TensorShape([2]))
    """

    def __init__(
        self,
        backbone,
        image_shape,
        num_classes,
        groups=4,
        agent_embed_dim=64,
        agent_units=64,
        penalty=-0.1,
        alpha=None,
        gamma=1.0,
        q_loss="mse",
        schedule=None,
        inference_engine=True,
        compute_cap=None,
        **kwargs,
    ):
        moved = sorted(set(kwargs) & set(SCHEDULE_FIELDS))
        if moved:
            raise ValueError(
                f"{', '.join(f'`{name}`' for name in moved)} moved into the training schedule: pass "
                f"`schedule=rnp_tf.Schedule({moved[0]}=...)`. Received: {moved[0]}={kwargs[moved[0]]!r}"
            )
        super().__init__(**kwargs)
        self.groups = validation.check_positive_int("groups", groups)
        self.backbone = backbones_lib.validate_backbone(backbone, self.groups)
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or any(
            isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in image_shape
        ):
            raise ValueError(
                f"`image_shape` must be (height, width, channels) positive ints. "
                f"Received: image_shape={image_shape!r}"
            )
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = validation.check_positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: num_classes={num_classes}")
        self.agent_embed_dim = validation.check_positive_int("agent_embed_dim", agent_embed_dim)
        self.agent_units = validation.check_positive_int("agent_units", agent_units)
        self.penalty = validation.check_float("penalty", penalty)
        self.alpha = None if alpha is None else validation.check_float("alpha", alpha, 0.0, low_open=True)
        self.gamma = validation.check_float("gamma", gamma, 0.0, 1.0)
        if q_loss not in ("mse", "huber"):
            raise ValueError(f"`q_loss` must be 'mse' or 'huber'. Received: q_loss={q_loss!r}")
        self.q_loss = q_loss
        if schedule is None:
            schedule = Schedule()
        elif isinstance(schedule, dict):
            schedule = Schedule.from_config(schedule)
        elif not isinstance(schedule, Schedule):
            raise ValueError(f"`schedule` must be an rnp_tf.Schedule or its config. Received: schedule={schedule!r}")
        self.schedule = schedule
        if not isinstance(inference_engine, bool):
            raise ValueError(
                f"`inference_engine` must be a bool. Received: inference_engine={inference_engine!r}"
            )
        self.inference_engine = inference_engine
        self._forced_phase = None
        self._cap_macs = None
        self._build_layers()
        self._build_trackers()
        if compute_cap is not None:
            self.set_compute_cap(compute_cap)

    # ------------------------------------------------------------ structure
    def _build_layers(self):
        """Builds the network plan, the agent and the model's own state.

        The layers stay in the attributes they always had (`convs`,
        `prunable`, `stem`, `head_layers`, `dropout`, `agent`), so that
        `.keras` files keep their weight paths.
        """
        self.plan = plan_lib.build_plan(self.backbone, self.image_shape, self.num_classes, self.groups)
        self.convs = list(self.plan.convs)
        self.prunable = list(self.plan.prunable)
        self.stem = self.plan.stem
        self.num_prunable = self.plan.num_decisions
        self.head_layers = list(self.plan.head.layers)
        self.dropout = self.plan.head.dropout
        self.agent = agent_lib.DecisionAgent(
            self.plan.feature_channels,
            groups=self.groups,
            embed_dim=self.agent_embed_dim,
            units=self.agent_units,
            skippable=sorted(self.plan.skippable),
            tied=sorted(self.plan.tied_to),
            # Q-values, rewards and TD targets stay float32 under mixed precision.
            dtype="float32",
            name="agent",
        )
        self.agent.build()
        self._schedule_step = self.add_weight(
            name="schedule_step", shape=(), dtype="int64", initializer="zeros",
            trainable=False, aggregation="only_first_replica",
        )
        self._agent_updates = self.add_weight(
            name="agent_updates", shape=(), dtype="int64", initializer="zeros",
            trainable=False, aggregation="only_first_replica",
        )
        self._penalty_setting = self.add_weight(
            name="penalty_setting", shape=(), initializer=keras.initializers.Constant(self.penalty),
            trainable=False, aggregation="only_first_replica",
        )
        # Budget calibration: compute fraction measured at a grid of penalties.
        self._calibration = self.add_weight(
            name="budget_calibration", shape=(2, 32), initializer="zeros",
            trainable=False, aggregation="only_first_replica",
        )
        self._epsilon = self.add_weight(
            name="epsilon", shape=(), initializer=keras.initializers.Constant(self.schedule.epsilon_start),
            trainable=False, aggregation="only_first_replica",
        )
        self.full_macs = self.plan.full_macs
        self.min_macs = self.plan.min_macs
        self.built = True

    @property
    def is_chain(self):
        """True when the backbone is a stem followed by prunable convs and pools only.

        The batched inference engine and the exporters handle such chains
        (the CIFAR CNN, VGG); residual blocks run on the masked and the
        reference sliced paths.
        """
        return self.plan.is_chain

    def build(self, input_shape=None):
        # Every weight is created in __init__ from `image_shape`.
        self.built = True

    def _build_trackers(self):
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.compute_tracker = keras.metrics.Mean(name="compute_fraction")
        self.spread_tracker = metrics_lib.StdDev(name="compute_spread")
        self.agent_loss_tracker = keras.metrics.Mean(name="agent_loss")
        self.epsilon_tracker = keras.metrics.Mean(name="epsilon")
        self.shares_tracker = metrics_lib.ActionShares(self.num_prunable, self.groups)

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.accuracy_tracker,
            self.compute_tracker,
            self.spread_tracker,
            self.agent_loss_tracker,
            self.epsilon_tracker,
            self.shares_tracker,
        ]

    @property
    def agent_variables(self):
        """Trainable variables of the decision agent."""
        return self.agent.trainable_variables

    @property
    def backbone_variables(self):
        """Trainable variables of the backbone (everything but the agent)."""
        agent_ids = {id(v) for v in self.agent.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in agent_ids]

    # ---------------------------------------------------------------- costs
    def macs(self, actions):
        """Backbone multiply-accumulates per sample for a batch of actions.

        Counts every conv on its (input prefix, output prefix) and the
        head's Dense layers, whose first input shrinks when the last conv
        is prunable (`NetworkPlan.macs`, the one MAC table). The agent's
        own cost is `agent.macs()`.

        Args:
            actions: int array or tensor `[batch, num_prunable]` in `1..k`.

        Returns:
            A float32 tensor `[batch]`.
        """
        return self.plan.macs(actions)

    def compute_fraction(self, actions):
        """Per-sample MACs as a fraction of the full model's, `[batch]`."""
        return self.macs(actions) / self.full_macs

    # -------------------------------------------------------------- rollout
    def _masked(self, x, policy, training=False):
        """The rollout on the masked executor (training, `call`, `rollout`).

        Args:
            x: image batch.
            policy: a policy of `rnp_tf.rollout` (`Greedy`, `EpsilonGreedy`,
                `Forced`, `Chooser`).
            training: BatchNorm/dropout mode of the backbone.

        Returns:
            A dict with `logits`, `actions`, `q_values` (None without the
            agent) and `macs`.
        """
        executor = rollout_lib.MaskedExecutor(self.plan, training, self.agent.compute_dtype)
        return rollout_lib.rollout(self.plan, self.agent, x, policy, executor).stacked(self.macs)

    def _empty(self, q_values=True):
        """The outputs of a rollout on an empty batch (an empty batch has nothing to decide or compute)."""
        return {
            "logits": tf.zeros([0, self.num_classes], tf.float32),
            "actions": tf.zeros([0, self.num_prunable], tf.int32),
            "q_values": tf.zeros([0, self.num_prunable, self.plan.q_width], tf.float32) if q_values else None,
            "macs": tf.zeros([0], tf.float32),
        }

    def greedy_policy(self, penalties=None):
        """The inference policy: greedy on `greedy_q` (the run-time knob applied).

        Args:
            penalties: as for `greedy_q` (default: `penalty_setting`).

        Returns:
            An `rnp_tf.rollout.Greedy` policy.
        """
        return rollout_lib.Greedy(lambda t, q, decided: self.greedy_q(t, q, decided, penalties))

    def greedy_q(self, t, q, decided, penalties=None):
        """Q-values the greedy policy maximises at decision `t`: the run-time knob applied.

        Re-prices the agent's raw Q-values to the inference penalty
        (`Q(s, a) + (p - p0) * (a - 1)`, see `set_penalty`), then gives the actions the hard per-image MAC cap forbids
        (`set_compute_cap`) the value -1e30. The greedy action is
        `argmax(greedy_q(...)) + 1`: `rollout`, `sliced_rollout` and the
        exporters all choose through this method.

        Args:
            t: the decision index, `0 <= t < num_prunable`.
            q: float `[batch, k]` raw Q-values of decision `t`.
            decided: list of the `t` earlier actions, each an int32 tensor
                `[batch]` (only read under a compute cap).
            penalties: the inference penalty: None (the model's
                `penalty_setting`, a variable read), a float (a constant,
                as the exporters freeze it) or a float `[batch]` tensor.

        Returns:
            A `[batch, k]` tensor of the same dtype as `q`.

        Example:

        >>> out = model.rollout(x, policy="epsilon", epsilon=1.0)
        >>> q = model.greedy_q(0, out["q_values"][:, 0], [])
        """
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.num_prunable:
            raise ValueError(f"`t` must be a decision index in [0, {self.num_prunable}). Received: t={t!r}")
        if len(decided) != t:
            raise ValueError(
                f"`decided` must hold the {t} earlier actions of decision {t}. Received: {len(decided)} actions"
            )
        q = self._repriced(t, q, penalties)
        if self._cap_macs is not None:
            q = knob_lib.cap_q_values(self.plan, t, q, decided, self._cap_macs)
        return q

    def _repriced(self, t, q, penalties=None):
        """Q-values of decision `t` re-priced to the inference penalty (`rnp_tf.knob.reprice`).

        An action taken by tied decisions too is priced once per decision
        that takes it (`NetworkPlan.decision_weight`).
        """
        if penalties is None:
            delta = self._penalty_setting.value - self.penalty
        else:
            delta = tf.cast(penalties, tf.float32) - self.penalty
        return knob_lib.reprice(q, delta * self.plan.decision_weight(t), self.groups)

    def rollout(self, x, actions=None, policy="greedy", epsilon=0.0, training=False, penalty=None):
        """Runs the model and returns logits, actions, Q-values and MACs.

        This is the documented way to see what the agent decided for every
        image: `call` returns only the logits.

        Args:
            x: float images `(batch, height, width, channels)`.
            actions: optional int `[batch, num_prunable]` forced actions in
                `1..k`; when given, `policy` is ignored and the agent is not
                run (`q_values` is None).
            policy: `"greedy"` (inference) or `"epsilon"` (epsilon-greedy).
            epsilon: exploration rate for `policy="epsilon"`.
            training: BatchNorm/dropout mode of the backbone.
            penalty: the run-time penalty for this call (default:
                `penalty_setting`; see `set_penalty`): a finite float, or a
                float tensor of shape `[]`, `[1]` or `[batch]`.

        Returns:
            A dict: `logits` `[batch, num_classes]`, `actions` int32
            `[batch, num_prunable]`, `q_values` `[batch, num_prunable, k]`,
            `macs` float32 `[batch]` (backbone MACs per image).

        Example:

        >>> out = model.rollout(x_test[:8])
        >>> out["actions"]  # groups computed at each prunable layer
        """
        x = validation.check_images(x, self.image_shape)
        if x.shape[0] == 0:  # nothing to decide: empty outputs of the right shapes
            return self._empty(q_values=actions is None)
        if actions is not None:
            actions = validation.check_actions(
                actions, x.shape[0], self.num_prunable, self.groups, self.plan.skip_columns
            )
            return self._masked(x, rollout_lib.Forced(actions), training)
        penalties = None
        if tf.is_tensor(penalty):
            penalties = tf.reshape(tf.cast(penalty, tf.float32), [-1]) + tf.zeros(tf.shape(x)[:1], tf.float32)
        elif penalty is not None:
            penalty = validation.check_float("penalty", penalty)
            penalties = tf.fill([tf.shape(x)[0]], tf.constant(penalty, tf.float32))
        if policy == "greedy":
            chosen = self.greedy_policy(penalties)
        elif policy == "epsilon":
            chosen = rollout_lib.EpsilonGreedy(epsilon)
        else:
            raise ValueError(f"`policy` must be 'greedy' or 'epsilon'. Received: policy={policy!r}")
        return self._masked(x, chosen, training)

    # ------------------------------------------------------ run-time knob
    @property
    def penalty_setting(self):
        """The penalty the agent is given at inference (a float)."""
        return float(self._penalty_setting.numpy())

    def set_penalty(self, penalty):
        """Moves the speed/accuracy balance of a trained model.

        `p` is the reward per extra group at inference: a more negative
        penalty makes every extra group cost more, so the agent computes less
        (a positive one rewards extra groups). For the paper's agent, trained
        with one penalty `p0`, the greedy choice re-prices the Q-values:
        `argmax_a Q(s, a) + (p - p0) * (a - 1)`, exactly the change of the
        immediate reward (later layers stay priced at `p0`). This knob was
        chosen by measurement: on Fashion-MNIST one agent trained at
        `p0 = -0.05` spanned 0.84 to 0.15 of the full MACs, monotonically,
        while a penalty-conditioned agent trained as long barely responded
        to its penalty input (docs/experiments/conditioned_agent.md). Saved
        with the model (`.keras`); used by `call`, `predict`,
        `evaluate`, `predict_details` and the exporters.

        Args:
            penalty: a finite float.

        Example:

        >>> model.set_penalty(-0.2)   # cheaper
        """
        self._penalty_setting.assign(validation.check_float("penalty", penalty))

    def calibrate_budget(self, x, num_points=9):
        """Measures mean compute at a grid of penalties, for `set_budget`.

        Args:
            x: images or a `tf.data.Dataset` (a validation split).
            num_points: number of penalties (<= 32): `p0 + d` with `d`
                evenly spaced from +1 to -2 (the scale of `alpha * L_cls`).

        Returns:
            A list of `(penalty, mean compute fraction)` pairs, penalties
            from the least to the most negative.

        Example:

        >>> model.calibrate_budget(data.validation)
        """
        validation.check_positive_int("num_points", num_points)
        if not 2 <= num_points <= 32:
            raise ValueError(f"`num_points` must be in 2..32. Received: num_points={num_points}")
        penalties = knob_lib.calibration_penalties(self.penalty, num_points)
        fractions = [self._mean_compute(x, penalty) for penalty in penalties]
        self._calibration.assign(knob_lib.calibration_table(penalties, fractions))
        return list(zip(penalties.tolist(), fractions))

    def _mean_compute(self, x, penalty):
        """Mean compute fraction of the greedy policy on `x` at `penalty` (the setting is left as it was)."""
        saved = self.penalty_setting
        try:
            self._penalty_setting.assign(float(penalty))
            return float(self.predict_details(x)["compute_fraction"].mean())
        finally:
            self._penalty_setting.assign(saved)

    def set_budget(self, compute_fraction, x=None, tolerance=0.02, max_iterations=12):
        """Sets the penalty whose measured mean compute is `compute_fraction`.

        Interpolates the calibration of `calibrate_budget` (made monotone:
        a smaller budget never gets a less negative penalty) and clips to the
        calibrated range. With images `x` (the calibration set), it then
        bisects the penalty on them until their mean compute is within
        `tolerance * compute_fraction` of the budget (mean compute falls as
        the penalty falls), keeping the closest penalty seen: the
        interpolation alone can miss by more than 5% where the agent's
        compute moves in steps. The tolerance is relative so that small
        budgets are held as tightly as large ones (an absolute 0.01 let a
        budget of 0.12 stop at the narrowest network's 0.113, 6% off).

        Args:
            compute_fraction: target mean MACs as a fraction of the full model.
            x: optional images or `tf.data.Dataset` to refine on.
            tolerance: relative tolerance of the refinement, as a share of
                `compute_fraction`. Defaults to 0.02.
            max_iterations: bisection steps at most. Defaults to 12.

        Returns:
            The penalty set.

        Example:

        >>> model.calibrate_budget(data.validation)
        >>> model.set_budget(0.4, data.validation)
        """
        penalty, penalties, fractions = knob_lib.budget_penalty(self._calibration.numpy(), compute_fraction)
        if x is not None:
            validation.check_float("tolerance", tolerance, 0.0, 1.0, low_open=True, high_open=True)
            validation.check_positive_int("max_iterations", max_iterations)
            penalty = knob_lib.refine_budget(
                lambda p: self._mean_compute(x, p), compute_fraction, penalty, penalties, fractions,
                tolerance * compute_fraction, max_iterations,
            )
        self._penalty_setting.assign(penalty)
        return penalty

    def set_compute_cap(self, compute_fraction):
        """Hard cap: no single image may exceed this share of the full MACs.

        Enforced in the greedy action selection (every layer's choice must
        leave room for the narrowest completion), so it holds for every
        image, not on average. `None` removes the cap.

        Args:
            compute_fraction: the cap as a fraction of the full model's
                MACs, at least the narrowest network's share, or None.

        Example:

        >>> model.set_compute_cap(0.5)
        """
        if compute_fraction is None:
            self._cap_macs = None
        else:
            floor = self.min_macs / self.full_macs
            fraction = validation.check_float("compute_fraction", compute_fraction, 0.0, 1.0)
            if fraction < floor - 1e-9:
                raise ValueError(
                    f"`compute_fraction` must lie in [{floor:.4f}, 1] (the narrowest network costs "
                    f"{floor:.4f}). Received: compute_fraction={compute_fraction}"
                )
            self._cap_macs = fraction * self.full_macs
        self.__dict__.pop("_details_functions", None)
        self.predict_function = None

    @property
    def compute_cap(self):
        """The hard per-image cap as a fraction of the full MACs, or None."""
        return None if self._cap_macs is None else self._cap_macs / self.full_macs

    @property
    def compute_cap_macs(self):
        """The hard per-image cap in MACs, exactly as the greedy choice applies it, or None."""
        return self._cap_macs

    def call(self, inputs, training=False):
        """Logits of the greedy policy (masked execution)."""
        x = validation.check_images(inputs, self.image_shape)
        if x.shape[0] == 0:
            return self._empty()["logits"]
        return self._masked(x, self.greedy_policy(), training)["logits"]

    def predict_details(self, x, batch_size=256, actions=None, engine=None):
        """Logits, actions, MACs and compute fractions as numpy arrays.

        Args:
            x: float images (numpy or tensor) or a `tf.data.Dataset` yielding
                images or `(images, labels)` batches.
            batch_size: batch size for arrays.
            actions: None (default) for the agent's greedy choices, or an int
                `a` in `1..k` to compute the first `a` groups at every
                prunable layer (static pruning, no agent).
            engine: as for `predict`: None (default) follows
                `inference_engine` (the engine), False
                runs the masked path, True requires the engine.

        Returns:
            A dict of numpy arrays: `logits`, `actions`, `macs`,
            `compute_fraction` (and `labels` when the dataset has them).

        Example:

        >>> details = model.predict_details(x_test)
        >>> details["compute_fraction"].mean()
        """
        if actions is not None:
            validation.check_action("actions", actions, self.groups)
        runner = self._engine_for(engine)
        if runner is None:
            fn = self._details_function(None if actions is None else int(actions))
        elif actions is None:
            fn = runner
        else:
            static = [int(actions)] * self.num_prunable
            fn = lambda images: runner(  # noqa: E731
                images, actions=engine_lib.uniform_actions(int(images.shape[0]), static)
            )
        if isinstance(x, tf.data.Dataset):
            batches = x
        else:
            x = validation.check_images(x, self.image_shape)
            batches = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
        parts = {"logits": [], "actions": [], "macs": [], "labels": []}
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                images, labels = batch[0], batch[1]
                parts["labels"].append(np.asarray(labels).reshape(-1))
            else:
                images = batch
            images = validation.check_images(images, self.image_shape)
            out = fn(tf.cast(images, tf.float32))
            for key in ("logits", "actions", "macs"):
                parts[key].append(out[key].numpy())
        if not parts["logits"]:
            raise ValueError("predict_details received no images.")
        result = {k: np.concatenate(v) for k, v in parts.items() if v}
        result["compute_fraction"] = result["macs"] / self.full_macs
        return result

    def _details_function(self, static_action):
        """Compiled rollout for `predict_details`: greedy (None) or static width.

        Two traced functions in all, each with a fixed signature, so no
        batch size or width setting retraces.
        """
        cache = self.__dict__.setdefault("_details_functions", {})
        images_spec = tf.TensorSpec([None, *self.image_shape], tf.float32)
        if "greedy" not in cache:
            cache["greedy"] = tf.function(
                lambda images: self._masked(images, self.greedy_policy()),
                input_signature=[images_spec],
            )
            cache["static"] = tf.function(
                lambda images, action: self._masked(
                    images, rollout_lib.Forced(tf.fill([tf.shape(images)[0], self.num_prunable], action))
                ),
                input_signature=[images_spec, tf.TensorSpec([], tf.int32)],
            )
        if static_action is None:
            return cache["greedy"]
        return lambda images: cache["static"](images, tf.constant(static_action, tf.int32))

    # ------------------------------------------------------ sliced inference
    def sliced_rollout(self, x, actions=None):
        """Inference that computes only the chosen channel prefixes.

        The reference sliced path: each image runs through the network on
        its own, every prunable conv convolving only
        `W[:, :, :in_prefix, :out_prefix]` of the narrow feature map, with
        BatchNorm folded in. It gives the same logits and actions as the
        masked path; batched execution belongs to the inference engine.

        Args:
            x: float images `(batch, height, width, channels)`.
            actions: optional forced int actions `[batch, num_prunable]`;
                by default the agent chooses greedily.

        Returns:
            A dict with numpy `logits`, `actions` and `macs`.

        Example:

        >>> out = model.sliced_rollout(x_test[:1])
        """
        x = validation.check_images(x, self.image_shape)
        if actions is not None:
            actions = validation.check_actions(
                actions, x.shape[0], self.num_prunable, self.groups, self.plan.skip_columns
            ).numpy()
        if x.shape[0] == 0:
            return {k: v.numpy() for k, v in self._empty(q_values=False).items() if v is not None}
        executor = rollout_lib.SlicedExecutor(self.plan)
        logits, chosen = [], []
        for i in range(x.shape[0]):
            if actions is None:
                policy = self.greedy_policy()
            else:
                policy = rollout_lib.Forced(tf.constant(actions[i : i + 1], tf.int32))
            out = rollout_lib.rollout(self.plan, self.agent, x[i : i + 1], policy, executor)
            logits.append(out.logits.numpy()[0])
            chosen.append([int(a[0]) for a in out.actions])
        actions = np.asarray(chosen, np.int32).reshape(-1, self.num_prunable)
        macs = self.macs(actions).numpy()
        return {"logits": np.stack(logits), "actions": actions, "macs": macs}

    # ------------------------------------------------------------- training
    def compile(self, optimizer="adam", agent_optimizer=None, loss=None, **kwargs):
        """Configures the two optimizers of Algorithm 1.

        Args:
            optimizer: optimizer of the backbone phases (name or instance).
                Defaults to `"adam"`.
            agent_optimizer: optimizer of the agent (DQN) phases. Defaults to
                `keras.optimizers.Adam(1e-3)`.
            loss: must be None or `"sparse_categorical_crossentropy"`: the
                model computes cross-entropy on its logits itself.
            **kwargs: other `keras.Model.compile` arguments
                (`steps_per_execution`, `jit_compile`, ...). `metrics` is
                not accepted: the model reports its own.
        """
        if loss not in (None, "sparse_categorical_crossentropy"):
            raise ValueError(
                "RNPModel computes sparse categorical cross-entropy on its "
                f"logits itself. Received: loss={loss!r}"
            )
        if kwargs.get("metrics"):
            raise ValueError(
                "RNPModel reports its own metrics (accuracy, compute_fraction, "
                f"...). Received: metrics={kwargs['metrics']!r}"
            )
        kwargs.pop("metrics", None)
        optimizer = keras.optimizers.get(optimizer)
        if agent_optimizer is None:
            agent_optimizer = keras.optimizers.Adam(1e-3)
        self.agent_optimizer = keras.optimizers.get(agent_optimizer)
        super().compile(optimizer=optimizer, **kwargs)
        self.agent_optimizer.build(self.agent_variables)
        self.optimizer.build(self.backbone_variables)

    def get_compile_config(self):
        if not self.compiled:
            return {}
        return {
            "optimizer": keras.optimizers.serialize(self.optimizer),
            "agent_optimizer": keras.optimizers.serialize(self.agent_optimizer),
        }

    def compile_from_config(self, config):
        self.compile(
            optimizer=keras.optimizers.deserialize(config["optimizer"]),
            agent_optimizer=keras.optimizers.deserialize(config["agent_optimizer"]),
        )

    def set_phase(self, phase):
        """Forces every following train step into one phase (None: schedule).

        Args:
            phase: `"full"` (plain classification at full width), `"robust"`,
                `"agent"`, `"backbone"`, or None for the automatic schedule.
                Steps of a forced phase do not advance the schedule (agent
                steps still advance epsilon's ramp).
        """
        if phase is not None and phase not in PHASES:
            raise ValueError(f"`phase` must be one of {PHASES} or None. Received: phase={phase!r}")
        self._forced_phase = phase

    @property
    def warmup_steps(self):
        """Length of the first agent phase."""
        return self.schedule.warmup_steps

    def current_phase(self):
        """The phase the next train step will run."""
        if self._forced_phase is not None:
            return self._forced_phase
        return self.schedule.phase_at(int(self._schedule_step.numpy()))

    def current_epsilon(self):
        """Exploration rate of the next agent step."""
        return self.schedule.epsilon_at(int(self._agent_updates.numpy()))

    def make_train_function(self, force=False):
        """One compiled function per phase, chosen per step in Python."""
        if self.train_function is not None and not force:
            return self.train_function
        compiled = {}

        def train_function(iterator):
            phase = self.current_phase()
            if phase not in compiled:
                step = functools.partial(self._train_step_for_phase, phase)
                compiled[phase] = self._make_function(step)
            self._epsilon.assign(self.current_epsilon())
            logs = compiled[phase](iterator)
            if self._forced_phase is None:
                self._schedule_step.assign_add(self.steps_per_execution)
            if phase == "agent":
                self._agent_updates.assign_add(self.steps_per_execution)
            return logs

        self.train_function = train_function
        return train_function

    def train_step(self, data):
        """One step of the phase that the schedule gives now."""
        return self._train_step_for_phase(self.current_phase(), data)

    def _unpack(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError("RNPModel.fit needs labels: pass (images, labels).")
        x = validation.check_images(x, self.image_shape)
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        return x, y

    def _train_step_for_phase(self, phase, data):
        x, y = self._unpack(data)
        if phase == "agent":
            return self._agent_step(x, y)
        if phase == "robust":
            return self._robust_step(x, y)
        return self._backbone_step(x, y, phase)

    def _update_metrics(self, y, out, ce, actions_visible=True):
        fraction = out["macs"] / self.full_macs
        self.loss_tracker.update_state(tf.reduce_mean(ce))
        self.accuracy_tracker.update_state(y, out["logits"])
        self.compute_tracker.update_state(fraction)
        self.spread_tracker.update_state(fraction)
        if actions_visible:
            self.shares_tracker.update_state(out["actions"])

    def _td_loss(self, out, ce):
        ce = tf.stop_gradient(ce)
        alpha = self.alpha if self.alpha is not None else 1.0 / (tf.reduce_mean(ce) + 1e-6)
        step_rewards = dqn.rewards(out["actions"], ce, self.penalty, alpha)
        live = self.plan.live(out["actions"])
        targets = dqn.td_targets(step_rewards, out["q_values"], self.gamma, live)
        return dqn.q_loss(out["q_values"], out["actions"], targets, self.q_loss, live)

    def _agent_step(self, x, y):
        epsilon = self._epsilon.value
        variables = self.agent_variables
        with tf.GradientTape() as tape:
            out = self._masked(x, rollout_lib.EpsilonGreedy(epsilon), training=False)
            ce = _per_sample_ce(y, out["logits"])
            loss = self._td_loss(out, ce)
        grads = _replica_gradients(tape, loss, variables)
        self.agent_optimizer.apply(grads, variables)
        self.agent_loss_tracker.update_state(loss)
        self.epsilon_tracker.update_state(epsilon)
        self._update_metrics(y, out, ce)
        return self.get_metrics_result()

    def _backbone_step(self, x, y, phase):
        variables = self.backbone_variables
        epsilon = self._epsilon.value
        with tf.GradientTape() as tape:
            if phase == "full":
                widest = tf.fill([tf.shape(x)[0], self.num_prunable], self.groups)
                out = self._masked(x, rollout_lib.Forced(widest), training=True)
            else:
                full = tf.random.uniform([tf.shape(x)[0]]) < self.schedule.full_width_fraction

                repriced = None
                if self.schedule.backbone_penalty_range is not None:
                    low, high = self.schedule.backbone_penalty_range
                    repriced = tf.random.uniform([tf.shape(x)[0]], low, high)

                def choose(t, q):
                    if repriced is not None:
                        q = self._repriced(t, q, repriced)
                    action = agent_lib.epsilon_greedy_actions(q, epsilon)
                    return tf.where(full, self.groups, action)

                out = self._masked(x, rollout_lib.Chooser(choose), training=True)
            ce = _per_sample_ce(y, out["logits"])
            loss = tf.reduce_mean(ce)
            loss += sum(self.losses)
        grads = _replica_gradients(tape, loss, variables)
        self.optimizer.apply(grads, variables)
        self._update_metrics(y, out, ce, actions_visible=phase != "full")
        return self.get_metrics_result()

    def _robust_step(self, x, y):
        """Prefix-robust ("sandwich") step: full, narrowest and random widths."""
        batch = tf.shape(x)[0]
        shape = [batch, self.num_prunable]
        draws = [tf.fill(shape, self.groups), tf.ones(shape, tf.int32)]
        for _ in range(self.schedule.robust_random_draws):
            draws.append(tf.random.uniform(shape, 1, self.groups + 1, dtype=tf.int32))
        actions = tf.concat(draws, axis=0)
        xx = tf.concat([x] * len(draws), axis=0)
        variables = self.backbone_variables
        with tf.GradientTape() as tape:
            out = self._masked(xx, rollout_lib.Forced(actions), training=True)
            logits = tf.split(out["logits"], len(draws), axis=0)
            ce_full = _per_sample_ce(y, logits[0])
            loss = tf.reduce_mean(ce_full)
            teacher = tf.stop_gradient(tf.nn.softmax(logits[0]))
            for narrow in logits[1:]:
                ce = tf.reduce_mean(_per_sample_ce(y, narrow))
                kd = tf.reduce_mean(
                    keras.losses.categorical_crossentropy(teacher, narrow, from_logits=True)
                )
                w = self.schedule.distill_weight
                loss += (1.0 - w) * ce + w * kd
            loss += sum(self.losses)
        grads = _replica_gradients(tape, loss, variables)
        self.optimizer.apply(grads, variables)
        full_out = {"logits": logits[0], "macs": out["macs"][:batch], "actions": actions[:batch]}
        self._update_metrics(y, full_out, ce_full, actions_visible=False)
        return self.get_metrics_result()

    def test_step(self, data):
        x, y = self._unpack(data)
        out = self._masked(x, self.greedy_policy(), training=False)
        ce = _per_sample_ce(y, out["logits"])
        self.agent_loss_tracker.update_state(self._td_loss(out, ce))
        self._update_metrics(y, out, ce)
        return self.get_metrics_result()

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        # Set by `predict` / `predict_on_batch` before the function is traced.
        runner = self.__dict__.get("_predict_engine")
        if runner is not None:
            return runner.logits(x)
        return self(x, training=False)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None, engine=None):
        """Greedy logits of the inputs, computed by the inference engine.

        `keras.Model.predict` with one difference: by default (see
        `inference_engine`) every batch runs through
        `rnp_tf.engine.InferenceEngine`, which computes only the channel
        groups the agent chose. Its logits equal the masked path's
        (`model(x)`) within 1e-4, with the same actions, and it follows the
        run-time knobs (`set_penalty`, `set_budget`, `set_compute_cap`).
        The engine's folded weights are checked against the model's weights
        at every call (`InferenceEngine.sync`), so predicting right after
        training or loading weights is safe.

        Args:
            x: input images (arrays, tensors, `tf.data.Dataset`, ...), as
                for `keras.Model.predict`.
            batch_size: as for `keras.Model.predict`.
            verbose: as for `keras.Model.predict`.
            steps: as for `keras.Model.predict`.
            callbacks: as for `keras.Model.predict`.
            engine: None (default) follows `inference_engine`; False runs
                the masked path; True requires the engine.

        Returns:
            Numpy logits `[num_samples, num_classes]`.

        Example:

        >>> logits = model.predict(x_test, batch_size=64)   # the engine
        >>> masked = model.predict(x_test, engine=False)    # masked path
        """
        if not isinstance(x, tf.data.Dataset) and hasattr(x, "shape") and len(x.shape) and x.shape[0] == 0:
            validation.check_images(x, self.image_shape)
            return np.zeros((0, self.num_classes), np.float32)
        self._prepare_predict(engine)
        return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)

    def predict_on_batch(self, x):
        """`keras.Model.predict_on_batch`, through the engine as `predict`."""
        self._prepare_predict(None)
        return super().predict_on_batch(x)

    def _prepare_predict(self, engine):
        runner = self._engine_for(engine)
        if runner is not self.__dict__.get("_predict_engine"):
            self.__dict__["_predict_engine"] = runner
            self.predict_function = None  # `predict_step` reads it when traced

    def _engine_for(self, engine):
        """The up-to-date `InferenceEngine` for inference, or None (masked path).

        Args:
            engine: None (follow `inference_engine`, falling back to the
                masked path where the engine does not apply), True (the
                engine or a ValueError) or False.
        """
        if engine is not None and not isinstance(engine, bool):
            raise ValueError(f"`engine` must be True, False or None. Received: engine={engine!r}")
        if not (self.inference_engine if engine is None else engine):
            return None
        reason = None
        if self.jit_compile and not self.run_eagerly:
            reason = "the model uses jit_compile=True (XLA cannot compile data-dependent group sizes)"
        if reason is not None:
            if engine:
                raise ValueError(f"The inference engine cannot run this model: {reason}. Received: engine=True")
            return None
        runner = self.__dict__.get("_engine")
        if runner is None:
            runner = self.__dict__["_engine"] = engine_lib.InferenceEngine(self)
        elif runner.sync():  # folded again: a predict function traced on its batch-1 graph holds the old agent
            self.predict_function = None
        return runner

    # ------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": self.backbone,
                "image_shape": list(self.image_shape),
                "num_classes": self.num_classes,
                "groups": self.groups,
                "agent_embed_dim": self.agent_embed_dim,
                "agent_units": self.agent_units,
                "penalty": self.penalty,
                "alpha": self.alpha,
                "gamma": self.gamma,
                "q_loss": self.q_loss,
                "schedule": self.schedule.get_config(),
                "inference_engine": self.inference_engine,
                "compute_cap": self.compute_cap,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuilds a model from `get_config`, including configs of older releases.

        Options measured and removed (`REMOVED_OPTIONS`) are dropped when they
        hold their old default; a model trained with one of them has other
        agent weights or another training recipe, so it is refused. The
        schedule's fields, arguments of the model before `Schedule`, are
        gathered into its schedule.
        """
        config = validation.drop_removed_options(config, REMOVED_OPTIONS, "RNPModel")
        # Before `Schedule`, its fields were arguments of the model.
        flat = {name: config.pop(name) for name in SCHEDULE_FIELDS if name in config}
        if flat:
            config["schedule"] = {**(config.get("schedule") or {}), **flat}
        return cls(**config)
