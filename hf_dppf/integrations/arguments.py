"""
`DPPFArguments`: the `--dppf` switch and one `--dppf_<field>` flag per `DPPFConfig` field, for any `HfArgumentParser`
script. `DPPFTrainingArguments` is `TrainingArguments` plus these; a plain Accelerate script parses them on their own.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ..config import COMM_DTYPES, LAM_SCHEDULES, NONFINITE_POLICIES, PUSH_MODES, DPPFConfig
from ..strategies import STRATEGIES

# `DPPFConfig` field -> `DPPFArguments` field (and command-line flag). `lam` is a Python keyword elsewhere.
_FLAG_NAMES = {"lam": "dppf_lambda"}
_CHOICES = {
    "strategy": sorted(STRATEGIES),
    "lam_schedule": list(LAM_SCHEDULES),
    "comm_dtype": list(COMM_DTYPES),
    "nonfinite_policy": list(NONFINITE_POLICIES),
    "push_mode": list(PUSH_MODES),
}


def flag_name(config_field: str) -> str:
    """The `DPPFTrainingArguments` field (and `--flag`) that sets `DPPFConfig.<config_field>`."""
    return _FLAG_NAMES.get(config_field, f"dppf_{config_field}")


def config_field_help() -> dict[str, str]:
    """
    The help text of every `DPPFConfig` field, read from the `Args:` section of its docstring (one source of truth for
    the docs and `--help`), with the valid values appended for the fields that take a name.
    """
    doc = inspect.cleandoc(DPPFConfig.__doc__ or "").split("Args:", 1)[-1]
    helps: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in doc.splitlines():
        header = re.match(r"^ {4}(\w+) \(.*\):\s*$", line)
        if header:
            current = helps.setdefault(header.group(1), [])
        elif current is not None and line.startswith(" " * 8):
            current.append(line.strip())
        elif line.strip():
            current = None
    out = {}
    for f in fields(DPPFConfig):
        text = " ".join(helps.get(f.name, [])) or f"DPPFConfig.{f.name}"
        if f.name in _CHOICES:
            text += f" Valid values: {', '.join(_CHOICES[f.name])}."
        out[f.name] = text
    return out


_HELP = config_field_help()
_DEFAULTS = {f.name: f.default for f in fields(DPPFConfig)}


def _dppf_field(config_field: str) -> Any:
    """A dataclass field mirroring `DPPFConfig.<config_field>`: same default, help from its docstring."""
    if _DEFAULTS[config_field] is MISSING:
        raise TypeError(f"DPPFConfig.{config_field} has no default; every DPPF flag needs one.")
    return field(default=_DEFAULTS[config_field], metadata={"help": f"[DPPF] {_HELP[config_field]}"})


@dataclass
class DPPFArguments:
    """
    `--dppf` and one `--dppf_<field>` flag per `DPPFConfig` field (`lam` is `--dppf_lambda`), each with the config's
    default and the help text of its docstring. The `DPPFConfig` is built (and validated) when the arguments are, so a
    bad value fails at argument parsing with the config's message; it is available as `args.dppf_config`.

    Example:
        ```python
        parser = HfArgumentParser((ScriptArguments, DPPFArguments))
        script_args, dppf_args = parser.parse_args_into_dataclasses()
        with DPPF(accelerator, model, optimizer, dppf_args.dppf_config, enabled=dppf_args.dppf): ...
        ```
    """

    dppf: bool = field(
        default=False,
        metadata={
            "help": "[DPPF] Train with DPPF (Distributed Pull-Push Force): workers take local optimizer steps with no "
            "gradient all-reduce and meet in a pull-push consensus round every --dppf_tau steps; evaluation and "
            "saved models are the workers' average. Off: the stock Trainer (DDP)."
        },
    )
    dppf_tau: int = _dppf_field("tau")
    dppf_alpha: float = _dppf_field("alpha")
    dppf_lambda: float | None = _dppf_field("lam")
    dppf_width: float | None = _dppf_field("width")
    dppf_lam_schedule: str = _dppf_field("lam_schedule")
    dppf_strategy: str = _dppf_field("strategy")
    dppf_beta: float | None = _dppf_field("beta")
    dppf_warmup_steps: int = _dppf_field("warmup_steps")
    dppf_bucket_mb: float = _dppf_field("bucket_mb")
    dppf_comm_dtype: str = _dppf_field("comm_dtype")
    dppf_eps: float = _dppf_field("eps")
    dppf_nonfinite_policy: str = _dppf_field("nonfinite_policy")
    dppf_timeout_s: float | None = _dppf_field("timeout_s")
    dppf_overlap_steps: int = _dppf_field("overlap_steps")
    dppf_push_mode: str = _dppf_field("push_mode")
    dppf_replica_size: int = _dppf_field("replica_size")

    def __post_init__(self) -> None:
        self.dppf_config = self.build_dppf_config()
        parent = getattr(super(), "__post_init__", None)  # cooperative: `TrainingArguments.__post_init__` follows
        if parent is not None:
            parent()

    def build_dppf_config(self) -> DPPFConfig:
        """The `DPPFConfig` these arguments describe (raises `ValueError` naming the bad flag and the valid range)."""
        try:
            return DPPFConfig(**{f.name: getattr(self, flag_name(f.name)) for f in fields(DPPFConfig)})
        except ValueError as err:
            bad = re.match(r"DPPFConfig\.(\w+)=", str(err))
            flag = f" (flag --{flag_name(bad.group(1))})" if bad else ""
            raise ValueError(f"{err}{flag}") from err
