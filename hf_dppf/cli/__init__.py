"""
hf-dppf: time the DPPF consensus round (bench), measure a saved model's sharpness with Inverse Mean Valley
(sharpness) and draw its loss landscape (landscape). `hf-dppf COMMAND --help` documents each command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

# Each subcommand lives in its own module and registers here: subcommand -> (module, help).
# A module provides `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("hf_dppf.benchmark", "time one consensus round against a flat all-reduce and accelerate's LocalSGD"),
    "sharpness": ("hf_dppf.cli_sharpness", "Inverse Mean Valley (and reference sharpness measures) of a saved model"),
    "landscape": ("hf_dppf.cli_landscape", "loss-landscape slice of a saved model, as a table and a PNG"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dppf", description=__doc__.strip())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
