"""
What the recipes in `recipes/` share: parsing with recipe defaults, logging, the end of a run (save, evaluate,
`results.json`, summary) and the shutdown order.

`results.json` (written by the main process into `--output_dir` at the end of every recipe run) is the machine-readable
record that benchmarks read. Schema (`"schema": "hf_dppf.results/1"`):

    {
      "schema": "hf_dppf.results/1",
      "recipe": "image_classification",          # the recipe's name
      "model": "...", "dataset": "...",          # Hub id / path, or "offline:<what>" for the offline defaults
      "seed": 42,
      "num_processes": 2,                        # data-parallel workers (world size)
      "global_step": 120,                        # optimizer steps taken
      "train_runtime_s": 81.3,                   # the Trainer's train_runtime (seconds, training only)
      "train_loss": 0.41,                        # the Trainer's mean training loss
      "eval": {"eval_loss": 0.12, "eval_accuracy": 0.97, ...},   # the final evaluation (of the average under DPPF)
      "eval_history": [{"step": 0, "eval_loss": ...}, ...],      # every evaluation of the run, in order
      "method": {
        "name": "dppf",                          # "ddp" or the DPPF strategy ("dppf", "avg", ...), "+sam" with SAM
        "dppf": true, "strategy": "dppf", "tau": 4, "alpha": 0.5, "lambda": null, "width": 0.01,
        "lam_schedule": "lr", "warmup_steps": 0,  # the DPPF fields are null without --dppf; "width" is the one in
                                                  # force (null with an explicit lambda or a strategy without push)
        "sam_rho": 0.0, "sam_adaptive": false
      },
      "dppf_stats": {                            # null without --dppf
        "rounds": 30,                            # consensus rounds during training (max_steps // tau, + warmup)
        "bytes_per_worker": 12345678,            # bytes this process handed to collectives until then: those
                                                 # rounds, the engine's start-up check, evaluations of the average
        "replica_bytes": 6172839,                # the part of them sent inside this process's replica
                                                 # (--dppf_replica_size > 1; 0 otherwise): the rest crossed workers
        "valley_width": 0.8,                     # mean distance to the average after the last of them
        "average_norm": 42.0,                    # ||x_A|| at that round
        "round_ms": 510.0,                       # wall time of those rounds, milliseconds
        "final_spread": 0.9,                     # mean distance to the average when training ended
        "total_bytes_per_worker": 12756789       # all bytes of the run: the final averaging round included
      }
    }
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from transformers import HfArgumentParser, TrainerCallback

from ..engine import DPPFStats
from ..integrations.trainer import DPPFTrainer

logger = logging.getLogger(__name__)

OFFLINE_SPLIT_SEED = 0  # a recipe's held-out split never changes with --seed
RESULTS_NAME = "results.json"
RESULTS_SCHEMA = "hf_dppf.results/1"


@dataclasses.dataclass
class HubDataArguments:
    """
    The data flags every recipe shares. A recipe subclasses it, adds its own columns and overrides `dataset_name`'s
    help with its offline default (an overridden field keeps its place in `--help`).
    """

    dataset_name: str | None = dataclasses.field(
        default=None, metadata={"help": "Any Hub dataset (load_dataset id or local path)."}
    )
    dataset_config_name: str | None = dataclasses.field(
        default=None, metadata={"help": "The dataset's configuration name."}
    )
    train_split: str = dataclasses.field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Split to evaluate on. Default: 'validation' or 'test' if the dataset has one, else a held-out "
            "--test_size fraction of the training split."
        },
    )
    test_size: float = dataclasses.field(
        default=0.2, metadata={"help": "Held-out fraction when the dataset has no evaluation split (stratified)."}
    )
    max_train_samples: int | None = dataclasses.field(
        default=None, metadata={"help": "Truncate the training set to this many examples (quick runs)."}
    )
    max_eval_samples: int | None = dataclasses.field(
        default=None, metadata={"help": "Truncate the evaluation set to this many examples (quick runs)."}
    )


def _json_object(value: str) -> dict[str, Any]:
    """argparse type of `--metric_kwargs`: a JSON object."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--metric_kwargs={value!r} is not valid JSON ({e.msg}); give an object like '{{}}'."
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(
            f'--metric_kwargs={value!r} is invalid: it must be a JSON object such as \'{{"average": "macro"}}\'.'
        )
    return parsed


@dataclasses.dataclass
class ClassificationDataArguments(HubDataArguments):
    """`HubDataArguments` plus the label column, for `load_classification_splits`, and the evaluation metric."""

    label_column: str = dataclasses.field(
        default="label", metadata={"help": "Column holding the label (ClassLabel, int or str)."}
    )
    metric: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "The `evaluate` metric of the evaluation set, computed from the predicted labels (argmax of the "
            "logits) and the true ones: a local metric script or folder, or (online) a Hub metric such as f1 or "
            "matthews_correlation. Default: the accuracy script that ships with hf_dppf "
            "(hf_dppf/recipes/metrics/accuracy.py), which needs no network."
        },
    )
    metric_kwargs: str = dataclasses.field(
        default="{}",
        metadata={
            "help": 'Extra arguments of the metric\'s compute(), as a JSON object, e.g. \'{"average": "macro"}\'.'
        },
    )

    def __post_init__(self) -> None:
        self.metric_kwargs = json.dumps(_json_object(self.metric_kwargs))  # refuse bad JSON before any work


def classification_metric(args: ClassificationDataArguments, training_args: Any) -> Callable[[Any], dict[str, float]]:
    """
    `compute_metrics` for a classifier: `args.metric` (default: hf_dppf's offline accuracy script) loaded with
    `evaluate` and applied to the argmax of the logits and the labels, with `args.metric_kwargs`.

    The main process loads it first (it fills evaluate's module cache; the others then read it) and every process keeps
    its inputs in memory, so the ranks, which all compute the metric on the gathered predictions, share no cache file.
    """
    import evaluate
    import numpy as np

    from .metrics import ACCURACY

    with training_args.main_process_first(desc="loading the evaluation metric"):
        metric = evaluate.load(args.metric or ACCURACY, keep_in_memory=True)
    kwargs = json.loads(args.metric_kwargs)

    def compute(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids, **kwargs)

    return compute


def headline_metric(evaluation: dict[str, Any]) -> tuple[str, float]:
    """The metric a recipe prints: `eval_accuracy` if computed, else the first metric that is not bookkeeping."""
    if "eval_accuracy" in evaluation:
        return "accuracy", evaluation["eval_accuracy"]
    bookkeeping = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch"}
    name = next((k for k in evaluation if k.startswith("eval_") and k not in bookkeeping), "eval_loss")
    return name.removeprefix("eval_"), evaluation[name]


def print_classification_summary(record: dict[str, Any], examples: int) -> None:
    """`print_summary` for the classifier recipes: their headline metric over `examples` evaluation examples."""
    name, value = headline_metric(record["eval"])
    print_summary(record, name, f"{value:.4f}", f"{examples} examples")


def _columns(dataset: Any, args: Any, input_name: str) -> Any:
    """Keep only the input and label columns, named `input_name` (e.g. `text`, `image`) and `label`."""
    wanted = ((f"--{input_name}_column", getattr(args, f"{input_name}_column"), input_name),)
    wanted += (("--label_column", args.label_column, "label"),)
    for flag, column, _ in wanted:
        if column not in dataset.column_names:
            raise ValueError(f"{flag}={column!r} is not a column of {args.dataset_name}: {dataset.column_names}.")
    dataset = dataset.select_columns([column for _, column, _ in wanted])
    renames = {column: new for _, column, new in wanted if column != new}
    return dataset.rename_columns(renames) if renames else dataset


def _class_labels(dataset: Any, names: list[str]) -> Any:
    """The `label` column as a `ClassLabel` over `names` (labels that are ints or strings are matched as strings)."""
    import datasets

    if isinstance(dataset.features["label"], datasets.ClassLabel):
        return dataset
    dataset = dataset.cast_column("label", datasets.Value("string"))
    return dataset.cast_column("label", datasets.ClassLabel(names=names))


def load_classification_splits(args: Any, input_name: str, offline: Callable[[], Any]) -> tuple[Any, Any]:
    """
    The training and evaluation sets of a classification recipe, with an `input_name` column and a `ClassLabel` column
    `label`: `offline()` when no `--dataset_name` is given, else the Hub dataset's `--train_split` and `--eval_split`
    (default: `validation` or `test`). Without an evaluation split, a stratified `--test_size` is held out with a fixed
    seed. `--max_train_samples` / `--max_eval_samples` then keep the first examples of each.

    Args:
        args: the recipe's data arguments (`dataset_name`, `dataset_config_name`, `train_split`, `eval_split`,
            `<input_name>_column`, `label_column`, `test_size`, `max_train_samples`, `max_eval_samples`).
        input_name (`str`): `"text"` or `"image"`.
        offline (`Callable[[], datasets.Dataset]`): the offline default (columns `input_name` and `label`).
    """
    import datasets

    if args.dataset_name is None:
        train, evaluation = offline(), None
    else:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        if args.train_split not in raw:
            raise ValueError(f"--train_split={args.train_split!r} is not a split of {args.dataset_name}: {list(raw)}.")
        train = _columns(raw[args.train_split], args, input_name)
        feature = train.features["label"]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else sorted({str(v) for v in train["label"]})
        train = _class_labels(train, names)
        eval_name = args.eval_split or next((s for s in ("validation", "test") if s in raw), None)
        evaluation = None if eval_name is None else _class_labels(_columns(raw[eval_name], args, input_name), names)
    if evaluation is None:
        split = train.train_test_split(test_size=args.test_size, seed=OFFLINE_SPLIT_SEED, stratify_by_column="label")
        train, evaluation = split["train"], split["test"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


def parse_recipe_args(
    dataclass_types: tuple[type, ...], defaults: dict[str, Any], description: str | None, argv: list[str] | None
) -> tuple[Any, ...]:
    """`HfArgumentParser` over `dataclass_types`, with the recipe's defaults for some flags (the command line wins)."""
    parser = HfArgumentParser(dataclass_types, description=description)
    parser.set_defaults(**defaults)
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def setup_logging(training_args: Any) -> None:
    """Log to stdout (INFO on the main process, WARNING elsewhere) and say what this process runs."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logging.getLogger().info(
        "process %d of %d on %s; DPPF %s; SAM rho %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        training_args.dppf_config if training_args.dppf else "off (stock DDP)",
        getattr(training_args, "sam_rho", 0.0),
    )


class _LastRoundStats(TrainerCallback):
    """Keeps a copy of the engine's statistics after every step, i.e. as they were before the final averaging round."""

    def __init__(self, trainer: DPPFTrainer) -> None:
        self.trainer = trainer
        self.stats: DPPFStats | None = None

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.trainer.dppf_engine is not None:
            self.stats = dataclasses.replace(self.trainer.dppf_engine.stats)


def method(args: Any) -> dict[str, Any]:
    """The `method` entry of `results.json`: DPPF and SAM settings of a run."""
    sam_rho = float(getattr(args, "sam_rho", 0.0))
    out: dict[str, Any] = {"dppf": bool(args.dppf)}
    cfg = args.dppf_config if args.dppf else None
    for key, attr in (
        ("strategy", "strategy"),
        ("tau", "tau"),
        ("alpha", "alpha"),
        ("lambda", "lam"),
        ("lam_schedule", "lam_schedule"),
        ("warmup_steps", "warmup_steps"),
    ):
        out[key] = getattr(cfg, attr) if cfg is not None else None
    out["width"] = cfg.push_width if cfg is not None else None  # the width in force (defaults resolved)
    out["sam_rho"] = sam_rho
    out["sam_adaptive"] = bool(getattr(args, "sam_adaptive", False)) if sam_rho > 0 else False
    out["name"] = (cfg.strategy if cfg is not None else "ddp") + ("+sam" if sam_rho > 0 else "")
    return out


def dppf_stats(final: DPPFStats, last_step: DPPFStats | None) -> dict[str, Any]:
    """The `dppf_stats` entry of `results.json` from the engine's final statistics and those after the last step."""
    last = last_step or final
    return {
        "rounds": last.rounds,
        "bytes_per_worker": last.bytes_communicated,
        "replica_bytes": last.replica_bytes,
        "valley_width": last.mean_distance,
        "average_norm": last.average_norm,
        "round_ms": last.total_round_ms,
        "final_spread": final.distance_before if final.rounds > last.rounds else last.mean_distance,
        "total_bytes_per_worker": final.bytes_communicated,
    }


def train_and_evaluate(
    trainer: DPPFTrainer,
    *,
    recipe: str,
    model: str,
    dataset: str,
    resume_from_checkpoint: str | bool | None = None,
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """
    Train, save the model (the workers' average under DPPF), evaluate it, log and save the metrics and write
    `results.json` (see the module docstring) on the main process. Call it on every process.

    Args:
        trainer (`DPPFTrainer`): the trainer (any subclass, e.g. `SAMTrainer`).
        recipe, model, dataset (`str`): what `results.json` records as the recipe's name, model and dataset.
        resume_from_checkpoint: passed to `trainer.train`.
        derived_metrics (`Callable`, *optional*): extra metrics computed from an evaluation's metrics (e.g. the
            perplexity from `eval_loss`), added to every evaluation of the run and to the final one.

    Returns:
        `dict`: the `results.json` record (on every process).
    """
    recorder = _LastRoundStats(trainer)
    trainer.add_callback(recorder)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    evaluation = trainer.evaluate()
    if derived_metrics is not None:
        evaluation.update(derived_metrics(evaluation))
    trainer.log_metrics("train", result.metrics)
    trainer.log_metrics("eval", evaluation)
    trainer.save_metrics("all", {**result.metrics, **evaluation})
    history = []
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            item = {k: v for k, v in entry.items() if k == "step" or k.startswith("eval_")}
            if derived_metrics is not None:
                item.update(derived_metrics(item))
            history.append(item)
    args = trainer.args
    engine = trainer.dppf_engine
    record = {
        "schema": RESULTS_SCHEMA,
        "recipe": recipe,
        "model": model,
        "dataset": dataset,
        "seed": args.seed,
        "num_processes": args.world_size,
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.metrics.get("train_loss"),
        "eval": evaluation,
        "eval_history": history,
        "method": method(args),
        "dppf_stats": dppf_stats(engine.stats, recorder.stats) if args.dppf and engine is not None else None,
    }
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, RESULTS_NAME), "w") as f:
            json.dump(record, f, indent=2, default=_json_default)
    return record


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_summary(record: dict[str, Any], name: str, value: str, scope: str) -> None:
    """
    Print the recipe's headline, `eval <name> of <the model or the average>: <value> (<scope>, <N> processes)`, and,
    with DPPF, the consensus summary (main process only).
    """
    what = "the averaged model (DPPF)" if record["method"]["dppf"] else "the model (stock DDP)"
    print(f"eval {name} of {what}: {value} ({scope}, {record['num_processes']} processes)", flush=True)
    stats = record["dppf_stats"]
    if stats is not None:
        print(
            f"DPPF: {stats['rounds']} rounds, valley width {stats['valley_width']:.4g} at the last round, "
            f"{stats['bytes_per_worker'] / 2**20:.1f} MiB sent per process"
            + (
                f" ({stats['replica_bytes'] / 2**20:.1f} MiB of it inside its replica)"
                if stats["replica_bytes"]
                else ""
            ),
            flush=True,
        )


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """`eval_perplexity = exp(eval_loss)` (inf when the loss overflows), for `train_and_evaluate(derived_metrics=)`."""
    if "eval_loss" not in metrics:
        return {}
    try:
        return {"eval_perplexity": math.exp(metrics["eval_loss"])}
    except OverflowError:
        return {"eval_perplexity": float("inf")}


def end(trainer: DPPFTrainer) -> None:
    """
    Finish the run in an order that cannot hang: free the DDP wrapper first, then destroy the process group.

    Left to the end, DDP's reducer would own the last reference to the gloo process group and destroy it while holding
    the GIL, racing gloo's worker threads that need the GIL to release their last work: a PyTorch issue (stock DDP
    included) that now and then aborts or hangs a process at exit.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    # What `Trainer.end()` does where it exists (transformers >= 5.20): finish the trackers, destroy the process
    # group. Called on the Accelerator so that it works on every supported transformers.
    trainer.accelerator.end_training()
