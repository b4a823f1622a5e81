#!/usr/bin/env python
"""
A plain Accelerate training loop with DPPF: the `with DPPF(...)` block is the only change to a stock loop.

Offline default: a small MLP on scikit-learn's digits (1,797 real 8x8 handwritten digits, fixed 80/20 split). Each
process reads its own shard of the training set (Accelerate shards the DataLoader); between rounds nothing is
communicated. Every epoch prints the training loss, the valley width and the accuracy of the workers' average;
the last line is a JSON summary.

    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/accelerate_loop.py --dppf
    torchrun --nproc_per_node 2 recipes/accelerate_loop.py --dppf --dppf_tau 8 --dppf_width 0.02
    python recipes/accelerate_loop.py --help
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from transformers import HfArgumentParser

from hf_dppf import DPPF
from hf_dppf.integrations.arguments import DPPFArguments


@dataclass
class LoopArguments:
    epochs: int = field(default=4, metadata={"help": "Passes over the training set."})
    batch_size: int = field(default=16, metadata={"help": "Micro-batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=0.05, metadata={"help": "SGD learning rate (cosine decay to 0)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (each worker keeps its own)."})
    hidden: int = field(default=128, metadata={"help": "Width of the MLP's two hidden layers."})
    seed: int = field(default=0, metadata={"help": "Seed of the model's initialisation and the data order."})
    output_dir: str | None = field(default=None, metadata={"help": "Save the final (averaged) model here."})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} is invalid: it must be an integer >= 1.")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate={self.learning_rate} is invalid: it must be > 0.")


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    as_set = lambda a, b: TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b))  # noqa: E731
    return as_set(x_tr, y_tr), as_set(x_te, y_te)


def main(argv: list[str] | None = None) -> dict:
    loop, dppf_args = HfArgumentParser((LoopArguments, DPPFArguments)).parse_args_into_dataclasses(argv)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), gradient_accumulation_steps=loop.gradient_accumulation_steps
    )
    set_seed(loop.seed)
    train, test = digits()
    model = torch.nn.Sequential(
        torch.nn.Linear(64, loop.hidden), torch.nn.ReLU(), torch.nn.Linear(loop.hidden, loop.hidden), torch.nn.ReLU(),
        torch.nn.Linear(loop.hidden, 10),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=loop.learning_rate, momentum=loop.momentum)
    train_loader = DataLoader(train, batch_size=loop.batch_size, shuffle=True)
    test_loader = DataLoader(test, batch_size=256)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    # Accelerate steps a prepared scheduler once per process at every optimizer step.
    steps = loop.epochs * len(train_loader) // loop.gradient_accumulation_steps * accelerator.num_processes
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1)))

    def accuracy() -> float:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                pred, y = accelerator.gather_for_metrics((model(x).argmax(-1), y))
                correct, total = correct + (pred == y).sum().item(), total + len(y)
        model.train()
        return correct / total

    with DPPF(accelerator, model, optimizer, dppf_args.dppf_config, enabled=dppf_args.dppf) as dppf:
        for epoch in range(loop.epochs):
            losses = []
            for x, y in train_loader:
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    dppf.observe(loss=loss)  # --dppf_strategy lsgd elects the lowest-loss worker (others: dropped)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                dppf.step()
                losses.append(loss.item())
            with dppf.averaged():  # evaluate the workers' average; their own weights come back after
                acc = accuracy()
            s = dppf.stats
            accelerator.print(
                f"epoch {epoch + 1}/{loop.epochs}  loss {sum(losses) / len(losses):.4f}  valley_width "
                f"{s.mean_distance:.4f}  rounds {s.rounds}  MiB sent {s.bytes_communicated / 2**20:.2f}  "
                f"accuracy(average) {acc:.4f}",
                flush=True,
            )
    summary = {
        "world_size": accelerator.num_processes,
        "dppf": dppf_args.dppf,
        "optimizer_steps": dppf.stats.steps,
        "rounds": dppf.stats.rounds,
        "bytes_communicated": dppf.stats.bytes_communicated,
        "valley_width": dppf.stats.mean_distance,
        "accuracy": accuracy(),  # after the block every worker holds the average
    }
    if loop.output_dir:
        accelerator.save_model(model, loop.output_dir)
    accelerator.print(json.dumps(summary), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
