"""
Where `hf_dppf.benchmark` (the `bench` subcommand, still at the top) finds the CLI's argument types, which now live in
`hf_dppf.cli.arg_types`. Delete this module when `benchmark.py` moves into `hf_dppf/cli/`.
"""

from .cli.arg_types import POSITIVE_FLOAT, POSITIVE_INT, config_field, number

__all__ = ["POSITIVE_FLOAT", "POSITIVE_INT", "config_field", "number"]
