"""
Argument types for the `hf-dppf` commands: a bad value stops the command at parsing, before any model, data or process
group is touched, with argparse's usage line and a message naming the flag, the value and the valid range.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type, *, above: float | None = None, at_least: float | None = None, below: float | None = None):
    """
    An argparse `type=` for an int or float in a range: `above` (exclusive) or `at_least` (inclusive) as the lower
    bound, `below` (exclusive) as the upper one. Floats must be finite.

    Example:
        ```python
        parser.add_argument("--points", type=number(int, at_least=2), default=21)
        ```
    """
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    valid = f"{'an integer' if kind is int else 'a finite number'} {' and '.join(bounds)}".strip()

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and (kind is int or math.isfinite(value))
        ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
        ok = ok and (below is None or value < below)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: it must be {valid}")
        return value

    parse.__name__ = valid  # what argparse would print for a conversion error
    return parse


def config_field(name: str) -> Callable[[str], float]:
    """An argparse `type=` for a numeric `DPPFConfig` field, validated by the config itself (one source of truth)."""
    from ..config import DPPFConfig

    def parse(text: str) -> float:
        try:
            value = float(text)
            DPPFConfig(**{name: value})
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = f"DPPFConfig.{name}"
    return parse


POSITIVE_INT = number(int, at_least=1)
POSITIVE_FLOAT = number(float, above=0)
