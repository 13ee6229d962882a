"""Checks of user-given arguments shared by the entry points (``EngineConfig``, meshes, the distributed runtime,
beam search): a value of the wrong type is a ``TypeError``, one of the right type out of range a ``ValueError``,
and both name the argument and the value."""

from __future__ import annotations


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """``value`` is an int (not a bool) of at least 1, or None where ``allow_none``."""
    if value is None and allow_none:
        return
    expected = "a positive int or None" if allow_none else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
