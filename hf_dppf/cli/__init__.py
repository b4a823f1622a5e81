"""
The `hf-dppf` command (console script `hf_dppf.cli:main`, or `python -m hf_dppf.cli`) and its subcommands.

Here: this dispatcher; one module per subcommand (`bench.py`, `sharpness.py`, `landscape.py`),
each with `add_arguments(parser)` and `run(args) -> int`; `arg_types.py`, the argparse types they share. A
subcommand may import any part of the library (config, engine, sharpness, the recipes' offline data); nothing in the
library imports the CLI. A subcommand's module is imported only when the parser is built, so `import hf_dppf` stays
light.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import import_module

DESCRIPTION = (
    "hf-dppf: time the DPPF consensus round (bench), measure a saved model's sharpness with Inverse Mean Valley "
    "(sharpness) and draw its loss landscape (landscape). `hf-dppf COMMAND --help` documents each command."
)

# Each subcommand lives in its own module and registers here: subcommand -> (module, help).
# A module provides `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "hf_dppf.cli.bench",
        "time one consensus round, count its ops and host reads, against a flat all-reduce or the memory floor",
    ),
    "sharpness": ("hf_dppf.cli.sharpness", "Inverse Mean Valley (and reference sharpness measures) of a saved model"),
    "landscape": ("hf_dppf.cli.landscape", "loss-landscape slice of a saved model, as a table and a PNG"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dppf", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return import_module(args._module).run(args)
