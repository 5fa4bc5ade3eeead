"""The values of PKU-SafeRLHF-style rows, read the same way by every loader (the trainer's data
pipeline and ``integrations.trl.pku_to_preference``): a safety flag written as a bool, 0/1, 1.0/0.0 or
one of the strings true/false, 1/0, yes/no, on/off (any case), and a response id 0 or 1. Anything else is an
error naming where it was found -- never ``bool("false") == True``.
"""

from __future__ import annotations

from .._env import parse_bool


def safety_flag(value, where: str, error=ValueError) -> bool:
    """``value`` as a bool (read by ``parse_bool``, the one reader of true/false words), or ``error``
    naming ``where``."""
    flag = parse_bool(value)
    if flag is None:
        raise error(f"{where}: expected a boolean safety flag (true/false, 1/0, yes/no, on/off), got {value!r}")
    return flag


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
