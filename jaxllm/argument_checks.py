"""Checks of user-given arguments shared by the entry points (``EngineConfig``, ``SamplingParams``, vLLM's
no-effect arguments, meshes, the distributed runtime, beam search): a value of the wrong type is a ``TypeError``, one
of the right type out of range a ``ValueError``, and both name the argument and the value."""

from __future__ import annotations

import numbers


def number_error(value, *, minimum, integer: bool = True) -> type[Exception] | None:
    """The error a number argument earns: ``TypeError`` unless an int (any real number unless ``integer``; never a
    bool), ``ValueError`` below ``minimum``, None when valid."""
    if isinstance(value, bool) or not isinstance(value, int if integer else numbers.Real):
        return TypeError
    return None if value >= minimum else ValueError


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """``value`` is an int (not a bool) of at least 1, or None where ``allow_none``."""
    if value is None and allow_none:
        return
    if (error := number_error(value, minimum=1)) is not None:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise error(f"{name} must be {expected}, got {value!r}")
