"""A searched value as a study file writes it: a range (low, high, log, step) or a list of choices."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from regsearch._errors import ConfigError


class Invalid(ValueError):
    """A bad value said without its key: the key is put in front where the value's place is known.

    `key` names a part of the value (`log` of a range), appended to the value's own key.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """A hyperparameter: fixed when low == high, else searched in [low, high] (on a log scale if log; on a grid of
    `step` if given)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False
    step: float | None = None

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def suggest(self, trial: Any, name: str) -> float | int:
        """The value for this trial: suggested on the trial unless the range is a single value."""
        if self.fixed:
            return int(self.low) if self.integer else self.low
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    @property
    def middle(self) -> float | int:
        """Mid-range (geometric on a log scale), on the grid: the baseline trial's value of a searched key."""
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        if self.step:
            mid = self.low + round((mid - self.low) / self.step) * self.step
        return round(mid) if self.integer else mid

    def decode(self, stored: Any) -> float | int:
        """The value an Optuna parameter value stands for (itself: see `Choice.decode`)."""
        return stored

    def values(self) -> tuple[float | int, ...]:
        """The ends of the range (each is checked like a fixed value)."""
        return (int(self.low), int(self.high)) if self.integer else (self.low, self.high)

    def __str__(self) -> str:
        if self.fixed:
            return f"{self.low:g}"
        return (f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")
                + (f" step {self.step:g}" if self.step else ""))


@dataclass(frozen=True)
class Choice:
    """A key searched among `choices` (Optuna's categorical). A list value (`model.hidden: [256, 128]`) is one
    choice, stored in Optuna as its JSON text (`"[256, 128]"`: Optuna keeps only numbers, strings, bools, None)."""

    choices: tuple[Any, ...]

    @staticmethod
    def encode(value: Any) -> Any:
        """The Optuna parameter value of a choice."""
        return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value

    def decode(self, stored: Any) -> Any:
        """The choice an Optuna parameter value stands for."""
        return next((c for c in self.choices if self.encode(c) == stored), stored)

    def suggest(self, trial: Any, name: str) -> Any:
        return self.decode(trial.suggest_categorical(name, [self.encode(c) for c in self.choices]))

    @property
    def middle(self) -> Any:
        """The first choice: the baseline trial's value."""
        return self.choices[0]

    def values(self) -> tuple[Any, ...]:
        return self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(str(self.encode(c)) for c in self.choices)


def parse_range(
    value: Any,
    where: str,
    *,
    log: bool = False,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    maximum_open: bool = False,
) -> Range:
    """Read a number (fixed) or [low, high] / {low, high, log, step} (searched) and check its bounds.

    `where` names the value in error messages, e.g. "regularizers.l1.strength".
    """
    try:
        return read_range(value, log=log, integer=integer, minimum=minimum, maximum=maximum,
                           maximum_open=maximum_open)
    except Invalid as exc:
        raise ConfigError(f"{where}{'.' + exc.key if exc.key else ''}: {exc}") from None


def read_range(value: Any, *, log: bool = False, integer: bool = False, minimum: float | None = None,
                maximum: float | None = None, maximum_open: bool = False) -> Range:
    step = None
    if isinstance(value, Range):
        low, high, log, step = value.low, value.high, value.log, value.step
    elif isinstance(value, Mapping):
        extra = set(value) - set(RANGE_KEYS)
        if extra or not {"low", "high"} <= set(value):
            raise Invalid(f"expected a number, [low, high] or {{low, high, log, step}} (low and high both "
                           f"given); got {dict(value)!r}")
        low, high, log, step = value["low"], value["high"], value.get("log", log), value.get("step")
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise Invalid(f"a range is [low, high]; got {list(value)!r}")
        low, high = value
    else:
        low = high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise Invalid(f"expected a number or [low, high] of numbers; got {value!r}")
        if integer and bound != int(bound):
            raise Invalid(f"expected whole numbers; got {value!r}")
    if not isinstance(log, bool):
        raise Invalid(f"expected true or false; got {log!r}", key="log")
    if low > high:
        raise Invalid(f"low must not exceed high; got [{low}, {high}]")
    if log and low <= 0:
        raise Invalid(f"a log-scale range must be above 0; got [{low}, {high}]")
    if minimum is not None and low < minimum:
        raise Invalid(f"must be >= {minimum}; got {value!r}")
    if maximum is not None and (high > maximum or (maximum_open and high == maximum)):
        bracket = ")" if maximum_open else "]"
        lower = "" if minimum is None else f"[{minimum}, "
        raise Invalid(f"must be in {lower or '(-inf, '}{maximum}{bracket}; got {value!r}")
    if step is not None:
        _check_step(step, low, high, log=log, integer=integer)
        step = float(step)
    return Range(float(low), float(high), log=log and low != high, integer=integer, step=step)


RANGE_KEYS = ("low", "high", "log", "step")


def _check_step(step: Any, low: float, high: float, *, log: bool, integer: bool) -> None:
    """A grid step: positive, whole for whole numbers, a whole number of steps from low to high, never on a log
    scale (Optuna samples a log range continuously)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        raise Invalid(f"expected a number above 0; got {step!r}", key="step")
    if integer and step != int(step):
        raise Invalid(f"expected a whole number; got {step!r}", key="step")
    if log:
        raise Invalid(f"a log-scale range takes no step (Optuna samples it continuously); got step {step!r}",
                       key="step")
    steps = (high - low) / step
    if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
        raise Invalid(f"high - low must be a whole number of steps; got [{low}, {high}] step {step}",
                       key="step")


_PLAIN = (str, int, float, bool, type(None))


def read_choice(value: Mapping[Any, Any], where: str) -> Choice:
    """`{choices: [...]}`: a non-empty list of distinct plain values or lists of them."""
    extra = sorted(str(k) for k in value if k != "choices")
    if extra:
        raise ConfigError(f"{where}: {{choices: [...]}} takes no other keys; got {', '.join(extra)}")
    choices = value["choices"]
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(f"{where}.choices: expected a non-empty list of values; got {choices!r}")
    seen = []
    for choice in choices:
        items = choice if isinstance(choice, (list, tuple)) else [choice]
        if not all(isinstance(item, _PLAIN) for item in items):
            raise ConfigError(f"{where}.choices: a choice is a number, a string, true/false, null or a list of "
                              f"those; got {choice!r}")
        typed = (type(choice), Choice.encode(choice))  # 1 and true are two choices, though 1 == True
        if typed in seen:
            raise ConfigError(f"{where}.choices: {choice!r} is given twice")
        seen.append(typed)
    return Choice(tuple(choices))


def read_key_range(value: Any, where: str, integer: bool) -> Range:
    """A study key's [low, high] or {low, high, log, step}: on a log scale where it says so or, unless it says
    otherwise (or gives a step), where the range spans two decades or more."""
    r = parse_range(value, where, integer=integer)
    said = isinstance(value, Mapping) and ("log" in value or "step" in value)
    if not said and not r.fixed and r.low > 0 and r.high >= 100 * r.low:
        r = dataclasses.replace(r, log=True)
    return r
