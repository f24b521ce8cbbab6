"""Reading the kernel backends' tuning knobs from environment variables, with clear errors."""
from __future__ import annotations

import math
import os
from typing import Callable, TypeVar

N = TypeVar("N", int, float)


def env_number(name: str, default: N, parse: Callable[[str], N], valid: Callable[[N], bool], what: str) -> N:
    """``default`` if ``name`` is unset or empty, else its value parsed by ``parse``.

    Raises a ValueError naming the variable, ``"{name}='raw' must be {what}"``, when the value
    does not parse, is NaN, or ``valid`` rejects it.
    """
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and math.isnan(value)) or not valid(value):
        raise ValueError(f"{name}={raw!r} must be {what}")
    return value
