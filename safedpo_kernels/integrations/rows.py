"""The values of PKU-SafeRLHF-style rows, read the same way by every loader (the trainer's data
pipeline and ``integrations.trl.pku_to_preference``): a safety flag written as a bool, 0/1, 1.0/0.0 or
one of the strings true/false, 1/0, yes/no (any case), and a response id 0 or 1. Anything else is an
error naming where it was found -- never ``bool("false") == True``.
"""

from __future__ import annotations

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def safety_flag(value, where: str, error=ValueError) -> bool:
    """``value`` as a bool, or ``error`` naming ``where``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise error(f"{where}: expected a boolean safety flag (true/false, 1/0, yes/no), got {value!r}")


def response_id(value, where: str, error=ValueError) -> int:
    """0 or 1 (also 0.0 / 1.0, or those as strings), or ``error`` naming ``where``."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise error(f"{where}: expected 0 or 1, got {value!r}")
    return int(value)
