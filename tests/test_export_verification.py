"""export.verification: the parity checks' action tuples and comparisons."""

import itertools

import numpy as np
import pytest

from export import exceptions
from export import verification


def test_covering_tuples_run_every_pair_at_every_layer():
    tuples = verification.action_tuples(num_prunable=13, groups=4, limit=256)
    assert len(tuples) == 16
    for t in range(1, 13):
        assert {(int(a), int(b)) for a, b in tuples[:, t - 1 : t + 1]} == set(itertools.product(range(1, 5), repeat=2))


def test_compare_reports_the_measured_difference():
    ref = {"logits": np.zeros((2, 3)), "actions": np.ones((2, 2), np.int32), "macs": np.ones(2)}
    got = dict(ref, logits=np.full((2, 3), 3e-4))
    with pytest.raises(exceptions.ParityError, match=r"max \|logits diff\| = 0.0003"):
        verification.compare("x", ref, got)
    got = dict(ref, actions=np.array([[1, 1], [2, 1]]))
    with pytest.raises(exceptions.ParityError, match="actions agree on 50.0%"):
        verification.compare("x", ref, got)
    assert verification.compare("x", ref, got, min_agreement=0.5)["action_agreement"] == 0.5
