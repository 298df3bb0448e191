"""LU-KV's offline allocation math on hand-made curves."""

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from prhs_compile.lu_kv import allocate, convexify, pava_non_increasing


def test_pava_pools_increasing_runs():
    assert pava_non_increasing([3.0, 1.0, 2.0, 0.0], [1, 1, 1, 1]) == [3.0, 1.5, 1.5, 0.0]
    assert pava_non_increasing([1.0, 2.0], [3, 1]) == [1.25, 1.25]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=20))
def test_pava_output_is_non_increasing_and_keeps_the_weighted_mean(values):
    fitted = pava_non_increasing(values, [1.0] * len(values))
    assert all(a >= b - 1e-9 for a, b in zip(fitted, fitted[1:]))
    assert sum(fitted) == pytest.approx(sum(values), abs=1e-6)


def test_convexify_makes_gains_diminishing():
    budgets = [16, 32, 64, 128]
    losses = [0.9, 0.85, 0.3, 0.25]  # a late big drop: not convex
    curve = convexify(budgets, losses)
    gains = [(a - b) / (y - x) for a, b, x, y in zip(curve, curve[1:], budgets, budgets[1:])]
    assert all(g1 >= g2 - 1e-12 for g1, g2 in zip(gains, gains[1:]))
    assert curve[0] == 0.9 and curve[-1] == pytest.approx(0.25)


def test_allocation_gives_budget_where_it_buys_the_most():
    budgets = [16, 32, 64]
    curves = {
        (0, 0): [0.5, 0.1, 0.05],  # gains a lot from the first step
        (0, 1): [0.2, 0.19, 0.18],  # barely gains
    }
    assert allocate(curves, budgets, mean_budget=24) == {(0, 0): 32, (0, 1): 16}
    assert allocate(curves, budgets, mean_budget=40) == {(0, 0): 64, (0, 1): 16}
    assert allocate(curves, budgets, mean_budget=64) == {(0, 0): 64, (0, 1): 64}
    with pytest.raises(ValueError, match="below the smallest grid budget 16"):
        allocate(curves, budgets, mean_budget=8)
