"""
Read what a Hugging Face `Trainer` prints: one dict per logging step or evaluation, e.g.
`{'loss': '1.54', 'learning_rate': '9e-06', 'epoch': '0.29'}` or `{'eval_loss': 1.5, 'eval_accuracy': 0.6, ...}`.

Transformers 5 prints logged floats as strings and older versions as numpy scalars (`np.float64(0.5)`); both come back
as Python floats. Shared by `netns_testbed.py` (time to a target metric) and `benchmark.py` (training curves).
"""

from __future__ import annotations

import ast
import re

_DICT = re.compile(r"\{[^{}]*\}")
_NUMPY_SCALAR = re.compile(r"np\.(?:float|int)\d*\(([^()]*)\)")


def _number(value: object) -> object:
    """A number (or a string holding one) as a float; anything else unchanged."""
    if isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def parse_logged_dict(line: str) -> dict | None:
    """The dict the `Trainer` printed on `line` (values that are numbers as floats), or None if there is none."""
    match = _DICT.search(line)
    if match is None:
        return None
    try:
        value = ast.literal_eval(_NUMPY_SCALAR.sub(r"\1", match.group(0)))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, dict) or not value or not all(isinstance(key, str) for key in value):
        return None
    return {key: _number(item) for key, item in value.items()}


def parse_metrics(line: str) -> dict | None:
    """The metrics of an evaluation printed on `line` (a logged dict with an `eval_*` key), or None."""
    logged = parse_logged_dict(line)
    return logged if logged is not None and any(key.startswith("eval_") for key in logged) else None
