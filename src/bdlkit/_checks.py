"""Argument checks shared by the method modules (one wording for the same mistake)."""

from __future__ import annotations


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1 (bools refused), else raise naming ``name``.

    Example:
        >>> check_positive_int("rank", 3)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive (>= 1), got {value}")
    return value
