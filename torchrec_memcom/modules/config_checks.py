"""The checks the methods' config dataclasses share: one size given of two, lower bounds, and
choices of a ``str`` enum, with errors that name the class and field (``HashConfig.ratio ...``)."""

import enum
from typing import Any, Mapping, Tuple, Type


def choices(kind: Type[enum.Enum]) -> Tuple[str, ...]:
    """The values of a ``str`` enum, as a tuple (``("mod", "mix")``)."""
    return tuple(k.value for k in kind)


def check_config(
    config: Any,
    exactly_one: Tuple[str, str],
    at_least: Mapping[str, float],
    kinds: Mapping[str, Type[enum.Enum]],
) -> None:
    """Raise unless exactly one of the fields ``exactly_one`` is set, every set field of
    ``at_least`` is at least its bound, and every field of ``kinds`` is one of its enum's
    values (YAML strings and enum members alike; the field keeps the plain string)."""
    name = type(config).__name__
    a, b = exactly_one
    if (getattr(config, a) is None) == (getattr(config, b) is None):
        raise ValueError(f"{name} needs exactly one of `{a}` or `{b}`")
    for key, low in at_least.items():
        value = getattr(config, key)
        if value is not None and value < low:
            raise ValueError(f"{name}.{key} must be >= {low:g}, got {value}")
    for key, kind in kinds.items():
        value = getattr(config, key)
        if value not in choices(kind):
            raise ValueError(f"{name}.{key} must be one of {choices(kind)}, got {value!r}")
        object.__setattr__(config, key, kind(value).value)
