"""
`hf-dppf landscape`: a loss-landscape slice of a saved model, printed as a table and drawn to a PNG.

`--mode 1d` / `2d` slice along one / two filter-normalised random directions; `--mode line` (the default when
`--other_model_name_or_path` is given) follows the line through two models, e.g. a DPPF worker's checkpoint and the
average. Model and data flags are those of `hf-dppf sharpness`.
"""

from __future__ import annotations

import argparse

from .arg_types import POSITIVE_FLOAT, number
from .sharpness import (
    add_direction_arguments,
    add_model_and_data_arguments,
    finish_distributed,
    infer_task,
    init_distributed_from_env,
    is_main_process,
    load_model,
    markdown_table,
    prepare,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data_arguments(parser)
    slice_ = parser.add_argument_group("slice")
    slice_.add_argument(
        "--mode",
        default=None,
        choices=("1d", "2d", "line"),
        help="Slice: 1d or 2d along random filter-normalised directions, or the line to the other model "
        "(default: line with --other_model_name_or_path, else 1d).",
    )
    slice_.add_argument(
        "--other_model_name_or_path",
        default=None,
        help="Second model (same architecture) for --mode line: t=0 is --model_name_or_path, t=1 this one.",
    )
    slice_.add_argument(
        "--span",
        type=POSITIVE_FLOAT,
        default=1.0,
        help="Extent: [-span, span] per axis for 1d/2d, [-span/2, 1 + span/2] for line (default: %(default)s).",
    )
    slice_.add_argument(
        "--points",
        type=number(int, at_least=2),
        default=21,
        help="Grid points per axis; 2d evaluates points^2 (default: %(default)s).",
    )
    add_direction_arguments(slice_)
    parser.add_argument("--output", default="landscape.png", help="PNG to write (default: %(default)s).")
    parser.add_argument("--title", default=None, help="Plot title (default: a description of the slice).")


def run(args: argparse.Namespace) -> int:
    from ..sharpness import loss_landscape

    started = init_distributed_from_env()
    model, batches, description = prepare(args)
    other = None
    if args.other_model_name_or_path is not None:
        task = infer_task(args.model_name_or_path, args.task)
        other = load_model(args.other_model_name_or_path, task, str(next(model.parameters()).device))
    result = loss_landscape(
        model,
        batches,
        mode=args.mode,
        other=other,
        span=args.span,
        points=args.points,
        seed=args.seed,
        bias_mode=args.bias_mode,
        progress=is_main_process(),
    )
    if is_main_process():
        path = result.plot(args.output, args.title, labels=("model", "other model"))
        print(f"{args.model_name_or_path} on {description}; {result.mode} slice")
        if result.mode == "2d":
            rows = [
                ("loss at the model", result.base_loss),
                ("lowest loss on the grid", result.losses.min().item()),
                ("highest loss on the grid", result.losses.max().item()),
            ]
            print(markdown_table(("point", "loss"), rows))
        else:
            axis = "t" if result.mode == "line" else "step"
            rows = [(f"{x:.4g}", loss) for x, loss in zip(result.x.tolist(), result.losses.tolist())]
            print(markdown_table((axis, "loss"), rows))
        print(f"wrote {path}")
    finish_distributed(started)
    return 0
