"""The SAFEDPO_* environment variables that tune the kernels, read and checked in one place.

A malformed value is an error that names the variable, never a silent fallback: a typo in a tile size
must not turn into a wrong result or a division by zero deep inside a kernel launch.
"""

from __future__ import annotations

import os


def env_int(name: str, default: int, *, minimum: int = 1, power_of_two: bool = False) -> int:
    """The integer value of environment variable ``name`` (``default`` when unset or empty).

    ValueError naming the variable when it is not an integer, is below ``minimum``, or (for tile sizes,
    which Triton's ``tl.arange`` needs as powers of two) is not a power of two.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def env_choice(name: str, default: str, choices: tuple) -> str:
    """The value of environment variable ``name`` (lower case), one of ``choices``; unset or empty gives
    ``default``; anything else is a ValueError naming the variable and the choices."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {os.environ[name]!r}")
    return text


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty gives
    ``default``; anything else is a ValueError naming the variable."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be one of {_TRUE + _FALSE}, got {os.environ[name]!r}")
