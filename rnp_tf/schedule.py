"""`Schedule`: Algorithm 1's training schedule as one config object.

Algorithm 1 of Lin et al. (2017) alternates N1 agent (DQN) steps with N2
backbone (classification) steps. Because the paper's plain recipe collapses
to one action for every image, rnp-tf's schedule adds documented options: a
first prefix-robust ("sandwich") backbone phase, an agent warm-up that lasts
until epsilon reaches its floor, backbone phases under epsilon-greedy actions
mixed with full-width samples, and, for the run-time knob, backbone phases
under Q-values re-priced to random penalties.

`RNPModel(schedule=Schedule(...))` takes it, as tfmot's pruning wrapper takes
a `PruningSchedule`: the model says what the network is, the schedule how
it is trained.

Example:

>>> schedule = Schedule(agent_steps=20, backbone_steps=20, robust_steps=100)
>>> schedule.phase_at(0), schedule.phase_at(100)
('robust', 'agent')
>>> Schedule.from_config(schedule.get_config()) == schedule
True
"""

import dataclasses
import math
import numbers

import keras

from rnp_tf import dqn

PHASES = ("full", "robust", "agent", "backbone")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int. Received: {name}={value!r}")


def _check_unit(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="rnp_tf")
@dataclasses.dataclass(frozen=True)
class Schedule:
    """How `RNPModel.fit` trains: Algorithm 1's phases and their options.

    Args:
        agent_steps: N1, agent steps per phase. Defaults to 50.
        backbone_steps: N2, backbone steps per phase. Defaults to 50.
        robust_steps: length of the first, prefix-robust backbone phase:
            each step trains the full width, the narrowest width and
            `robust_random_draws` random per-sample, per-layer widths, the
            narrower ones distilled from the full one. Defaults to 0.
        agent_warmup: if True (default) the first agent phase lasts until
            epsilon reaches its floor (at least N1 steps) before the backbone
            is touched.
        epsilon_start: exploration rate at the first agent step. Defaults to 1.0.
        epsilon_end: exploration floor. Defaults to 0.1.
        epsilon_decay_steps: agent steps of the linear ramp. Defaults to 300.
        full_width_fraction: share of samples computed at full width in the
            backbone phases (the others use the agent's epsilon-greedy
            actions), so unused widths are not forgotten. Defaults to 0.25.
        robust_random_draws: random width draws per robust step. Defaults to 2.
        distill_weight: weight of distillation from the full width in the
            robust phase (the rest is cross-entropy). Defaults to 0.5.
        backbone_penalty_range: `(p_min, p_max)`: in the backbone phases each
            image's epsilon-greedy choice is made on the Q-values re-priced
            to a penalty drawn uniformly from this range (as `set_penalty`
            does at inference), so the backbone is fine-tuned under the
            action distributions of the whole run-time knob. The agent's own
            updates keep the model's `penalty`. None (default): the paper's
            backbone phases.

    Example:

    >>> Schedule(agent_steps=20, backbone_steps=20).warmup_steps
    300
    """

    agent_steps: int = 50
    backbone_steps: int = 50
    robust_steps: int = 0
    agent_warmup: bool = True
    epsilon_start: float = 1.0
    epsilon_end: float = 0.1
    epsilon_decay_steps: int = 300
    full_width_fraction: float = 0.25
    robust_random_draws: int = 2
    distill_weight: float = 0.5
    backbone_penalty_range: tuple | None = None

    def __post_init__(self):
        for name in ("agent_steps", "backbone_steps", "robust_steps", "epsilon_decay_steps", "robust_random_draws"):
            _check_int(name, getattr(self, name))
            object.__setattr__(self, name, int(getattr(self, name)))
        if not isinstance(self.agent_warmup, (bool, int)) or self.agent_warmup not in (0, 1):
            raise ValueError(f"`agent_warmup` must be a bool. Received: agent_warmup={self.agent_warmup!r}")
        object.__setattr__(self, "agent_warmup", bool(self.agent_warmup))
        for name in ("epsilon_start", "epsilon_end", "full_width_fraction", "distill_weight"):
            _check_unit(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.backbone_penalty_range is not None:
            try:
                low, high = (float(v) for v in self.backbone_penalty_range)
            except (TypeError, ValueError):
                low = high = math.nan
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(
                    "`backbone_penalty_range` must be (p_min, p_max), finite, with p_min < p_max. "
                    f"Received: backbone_penalty_range={self.backbone_penalty_range!r}"
                )
            object.__setattr__(self, "backbone_penalty_range", (low, high))

    @property
    def warmup_steps(self):
        """Length of the first agent phase."""
        if self.agent_warmup:
            return max(self.agent_steps, self.epsilon_decay_steps)
        return self.agent_steps

    def phase_at(self, step):
        """The phase of global training step `step` (0-based): "robust", "agent" or "backbone"."""
        if self.agent_steps == 0 and self.backbone_steps == 0 and self.robust_steps == 0:
            raise ValueError("At least one of agent_steps, backbone_steps, robust_steps must be > 0.")
        return dqn.phase_at(
            step,
            robust_steps=self.robust_steps,
            agent_steps=self.agent_steps,
            backbone_steps=self.backbone_steps,
            warmup_steps=self.warmup_steps,
        )

    def epsilon_at(self, agent_updates):
        """Exploration rate after `agent_updates` agent steps."""
        return dqn.epsilon_at(agent_updates, self.epsilon_start, self.epsilon_end, self.epsilon_decay_steps)

    def get_config(self):
        """Plain values, for `.keras` saving and `from_config`."""
        config = dataclasses.asdict(self)
        if config["backbone_penalty_range"] is not None:
            config["backbone_penalty_range"] = list(config["backbone_penalty_range"])
        return config

    @classmethod
    def from_config(cls, config):
        """The schedule of `get_config()`."""
        return cls(**config)


FIELDS = tuple(field.name for field in dataclasses.fields(Schedule))
