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


def preference_pair(row: dict, where: str, error=ValueError) -> dict:
    """A PKU-SafeRLHF row (prompt, response_0/1, is_response_0/1_safe, better_response_id) as a preference
    pair: prompt, chosen (the helpfulness-preferred response, as SafeDPO takes it: T does the rest),
    rejected, chosen_safe, rejected_safe. Values read strictly; a missing column is ``error`` naming it."""
    missing = [c for c in ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                           "better_response_id") if c not in row]
    if missing:
        raise error(f"{where}: missing column(s) {missing}; a PKU-SafeRLHF row has prompt, response_0, response_1, "
                    f"is_response_0_safe, is_response_1_safe, better_response_id (it has {sorted(row)})")
    w = response_id(row["better_response_id"], f"{where}, column 'better_response_id'", error)
    safe = [safety_flag(row[f"is_response_{k}_safe"], f"{where}, column 'is_response_{k}_safe'", error) for k in (0, 1)]
    return dict(prompt=row["prompt"], chosen=row[f"response_{w}"], rejected=row[f"response_{1 - w}"],
                chosen_safe=safe[w], rejected_safe=safe[1 - w])


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
