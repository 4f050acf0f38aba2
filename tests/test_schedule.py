"""Schedule: Algorithm 1's phases as one config object."""

import pytest

import rnp_tf


def test_phases_and_epsilon_follow_the_schedule():
    schedule = rnp_tf.Schedule(robust_steps=1, agent_steps=2, backbone_steps=1, epsilon_decay_steps=3)
    assert schedule.warmup_steps == 3
    assert [schedule.phase_at(s) for s in range(8)] == [
        "robust", "agent", "agent", "agent", "backbone", "agent", "agent", "backbone"]
    assert schedule.epsilon_at(0) == pytest.approx(1.0) and schedule.epsilon_at(10) == pytest.approx(0.1)
    assert rnp_tf.Schedule(agent_warmup=False, agent_steps=2).warmup_steps == 2


def test_config_round_trip_and_model_saving():
    schedule = rnp_tf.Schedule(agent_steps=3, backbone_penalty_range=(-0.3, 0.05))
    assert rnp_tf.Schedule.from_config(schedule.get_config()) == schedule
    model = rnp_tf.RNPModel(rnp_tf.cifar_cnn((8, 8, 16, 16)), image_shape=(8, 8, 1), num_classes=10,
                            schedule=schedule)
    assert rnp_tf.RNPModel.from_config(model.get_config()).schedule == schedule


@pytest.mark.parametrize(
    "field, value",
    [("agent_steps", -1), ("agent_steps", 1.5), ("epsilon_start", 1.5), ("epsilon_end", float("nan")),
     ("full_width_fraction", -0.1), ("distill_weight", "half"), ("agent_warmup", "yes"),
     ("backbone_penalty_range", (0.1, -0.3)), ("backbone_penalty_range", (float("inf"), 0.0)),
     ("backbone_penalty_range", "a,b")],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        rnp_tf.Schedule(**{field: value})


def test_no_phase_at_all_is_an_error():
    with pytest.raises(ValueError, match="At least one of"):
        rnp_tf.Schedule(agent_steps=0, backbone_steps=0).phase_at(0)
