"""Sparsity schedules: callables ``step -> target sparsity`` in [0, 1] for ``Pruner`` and training loops.

Every schedule returns 0.0 before its ``begin`` step (nothing is pruned yet) and its ``final`` sparsity from
``end`` on; in between it changes only every ``frequency`` steps, counted from ``begin``.

- ``one_shot(final, at=0)``: ``final`` from step ``at`` on.
- ``linear(initial, final, begin, end, frequency=1)``: ``initial`` at ``begin``, rising linearly to ``final`` at
  ``end``.
- ``cubic(initial, final, begin, end, frequency)``: the gradual schedule of Zhu & Gupta (2017),
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * Δt))**3`` with ``t0 = begin``, ``n * Δt = end - begin`` and
  ``Δt = frequency``: fast pruning early, when redundant weights abound, slower as fewer remain.
"""

import math
import numbers

__all__ = ["Schedule", "cubic", "linear", "one_shot"]


def _check_step_arg(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer step, got {value!r}")  # noqa: TRY004 - the API's one error type
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sparsity(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a sparsity in [0, 1], got {value!r}")
    return float(value)


class Schedule:
    """Base: a ramp from ``initial`` at ``begin`` to ``final`` at ``end``, updated every ``frequency`` steps.

    Subclasses give the shape of the ramp, ``_ramp(fraction)`` in [0, 1] -> progress in [0, 1].
    """

    def __init__(self, initial, final, begin, end, frequency):
        self.initial = _check_sparsity("initial", initial)
        self.final = _check_sparsity("final", final)
        if self.initial > self.final:
            raise ValueError(f"initial ({self.initial}) must not exceed final ({self.final}): "
                             "pruning only raises sparsity")
        self.begin = _check_step_arg("begin", begin)
        self.end = _check_step_arg("end", end, minimum=self.begin)
        self.frequency = _check_step_arg("frequency", frequency, minimum=1)

    def __call__(self, step):
        step = _check_step_arg("step", step)
        if step < self.begin:
            return 0.0
        if step >= self.end:
            return self.final
        # Hold the value between updates: the sparsity changes only at begin + k * frequency.
        t = self.begin + (step - self.begin) // self.frequency * self.frequency
        progress = self._ramp((t - self.begin) / (self.end - self.begin))
        return min(self.final, self.initial + (self.final - self.initial) * progress)

    def _ramp(self, fraction):
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(initial={self.initial}, final={self.final}, begin={self.begin}, "
                f"end={self.end}, frequency={self.frequency})")

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self).__name__, *sorted(vars(self).items())))


class one_shot(Schedule):
    """``final`` sparsity from step ``at`` on, 0.0 before."""

    def __init__(self, final, at=0):
        final, at = _check_sparsity("final", final), _check_step_arg("at", at)
        super().__init__(final, final, at, at, 1)

    def _ramp(self, fraction):  # begin == end: never reached
        return 1.0

    def __repr__(self):
        return f"one_shot(final={self.final}, at={self.begin})"


class linear(Schedule):
    """``initial`` at ``begin``, rising linearly to ``final`` at ``end``; updated every ``frequency`` steps."""

    def __init__(self, initial, final, begin, end, frequency=1):
        super().__init__(initial, final, begin, end, frequency)

    def _ramp(self, fraction):
        return fraction


class cubic(Schedule):
    """Zhu & Gupta's gradual schedule: ``final + (initial - final) * (1 - (t - begin) / (end - begin))**3``."""

    def __init__(self, initial, final, begin, end, frequency):
        super().__init__(initial, final, begin, end, frequency)

    def _ramp(self, fraction):
        return 1.0 - math.pow(1.0 - fraction, 3)
