"""Sparsity schedules: values at known steps, held between updates, and argument validation."""

import math
import pickle

import pytest

from nnopt.prune.schedules import cubic, linear, one_shot


def test_one_shot():
    s = one_shot(0.8)
    assert [s(t) for t in (0, 1, 1000)] == [0.8, 0.8, 0.8]
    s = one_shot(0.5, at=10)
    assert [s(t) for t in (0, 9, 10, 11)] == [0.0, 0.0, 0.5, 0.5]


def test_linear_values_and_frequency():
    s = linear(0.0, 0.8, begin=10, end=50)
    assert s(0) == 0.0 and s(9) == 0.0
    assert s(10) == 0.0 and math.isclose(s(30), 0.4) and math.isclose(s(40), 0.6)
    assert s(50) == 0.8 and s(10_000) == 0.8
    s = linear(0.2, 0.6, begin=0, end=100, frequency=25)
    assert [s(t) for t in (0, 24)] == [0.2, 0.2]
    assert all(math.isclose(s(t), 0.3) for t in (25, 30, 49))
    assert math.isclose(s(75), 0.5) and s(99) == s(75) and s(100) == 0.6


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """The paper's formula, written out: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n·Δt))^3 at t0, t0 + Δt, ..."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def test_cubic_matches_zhu_gupta():
    s_i, s_f, t0, n, dt = 0.1, 0.9, 100, 10, 50
    s = cubic(s_i, s_f, begin=t0, end=t0 + n * dt, frequency=dt)
    assert s(0) == 0.0 and s(t0 - 1) == 0.0
    for k in range(n):
        t = t0 + k * dt
        assert math.isclose(s(t), zhu_gupta(t, s_i, s_f, t0, n, dt), rel_tol=1e-12)
        assert s(t + dt - 1) == s(t)  # held until the next update
    assert s(t0 + n * dt) == s_f and s(10**9) == s_f
    values = [s(t) for t in range(0, t0 + n * dt + 1, dt)]
    assert values == sorted(values)  # never lowers sparsity
    # the cubic prunes fastest early: the first update adds more than the last
    assert s(t0 + dt) - s(t0) > s(t0 + n * dt) - s(t0 + (n - 1) * dt)


def test_cubic_frequency_one_and_equality_and_pickle():
    s = cubic(0.0, 0.5, 0, 8, 1)
    assert math.isclose(s(4), 0.5 * (1 - 0.5 ** 3))
    assert s == pickle.loads(pickle.dumps(s)) and s != cubic(0.0, 0.5, 0, 8, 2)
    assert "cubic(initial=0.0, final=0.5" in repr(s)


@pytest.mark.parametrize("make, arg", [
    (lambda: cubic(-0.1, 0.5, 0, 10, 1), "initial"),
    (lambda: cubic(0.0, 1.5, 0, 10, 1), "final"),
    (lambda: cubic(0.6, 0.5, 0, 10, 1), "initial"),
    (lambda: cubic(0.0, 0.5, -1, 10, 1), "begin"),
    (lambda: cubic(0.0, 0.5, 5, 4, 1), "end"),
    (lambda: cubic(0.0, 0.5, 0, 10, 0), "frequency"),
    (lambda: cubic(0.0, 0.5, 0, 10, 1.5), "frequency"),
    (lambda: cubic(0.0, "0.5", 0, 10, 1), "final"),
    (lambda: linear(0.0, 0.5, 0.5, 10), "begin"),
    (lambda: linear(0.0, 0.5, 0, 10, frequency=-2), "frequency"),
    (lambda: one_shot(2.0), "final"),
    (lambda: one_shot(0.5, at=-3), "at"),
    (lambda: one_shot(True), "final"),
])
def test_bad_arguments_raise_value_error_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_bad_step():
    with pytest.raises(ValueError, match="step"):
        linear(0.0, 0.5, 0, 10)(-1)
    with pytest.raises(ValueError, match="step"):
        cubic(0.0, 0.5, 0, 10, 1)(2.5)
