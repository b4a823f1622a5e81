#!/usr/bin/env python
"""
Benchmark DPPF against its baselines on one recipe: every method x every seed, launched with torchrun on CPU processes
(gloo) with the same budget, then a markdown table and plots.

    python scripts/benchmark.py --recipe text_classification --methods ddp avg easgd lsgd grawa dppf sam \
        --seeds 0 1 2 --nproc 4 --output_dir runs/benchmark -- --max_steps 60 --max_seq_length 64

Methods: `ddp` (stock synchronous data parallelism: gradients all-reduced every step), any consensus strategy of
`hf_dppf.strategies.STRATEGIES` (`dppf`, `avg` = Local SGD, `easgd`, `lsgd`, `grawa`, ...: `--dppf --dppf_strategy
<name> --dppf_tau <tau>`), `sam` (stock DDP with SAM, `--sam_rho`), and `<strategy>+sam` (a strategy with SAM on each
worker). Every method runs with the recipe's defaults plus the flags after `--` (the budget: steps, batch size,
learning rate are the same for all) and its own flags from `method_flags` (overridable with `--method_flags`).

Every run is `torchrun --nproc_per_node <nproc> scripts/count_ddp_bytes.py recipes/<recipe>.py --seed <s>
--output_dir <dir> ...` and writes `results.json` (schema `hf_dppf.results/1`, see `hf_dppf.recipes.common`). The
bytes of a run are what each worker handed to collectives while training: the DDP gradient buckets (counted by a
communication hook, `count_ddp_bytes.py`) plus the consensus rounds (the engine's `total_bytes_per_worker`, the final
averaging round included). The inverse mean valley (IMV) of each final model is measured by `hf-dppf sharpness`.

Output in `--output_dir`: `results.md` (settings, the summary table mean +- std over seeds, one row per run),
`summary.json`, `accuracy_vs_bytes.png`, `curves.png` (training loss and evaluation metric against steps), and one
folder per run with its `results.json`, `stdout.log` and `imv.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from trainer_logs import parse_logged_dict  # noqa: E402 (a sibling script, not a package)

from hf_dppf.strategies import STRATEGIES  # noqa: E402

# Which data the IMV is measured on and which metric the table leads with, per recipe (other recipes: the flags).
RECIPE_IMV_ARGS = {
    "text_classification": ["--dataset", "bbcnews"],
    "image_classification": ["--dataset", "mnist"],
}
RECIPE_METRIC = {"causal_lm": "eval_perplexity"}
DEFAULT_METRIC = "eval_accuracy"
SAM_RHO = 0.05  # Foret et al. (2021): their default for fine-tuning and for CIFAR-scale training


def method_flags(method: str, tau: int) -> list[str]:
    """
    The recipe flags of `method`, with the documented defaults ("tuned as documented"):

    - `ddp`: none (stock DDP).
    - a strategy `s`: `--dppf --dppf_strategy s --dppf_tau <tau>`; every other knob is `DPPFConfig`'s documented
      default (alpha 0.5; dppf: width 0.01 of ||x_A||, push following the learning rate; easgd: beta 0.9).
    - `sam` / `s+sam`: the same plus `--sam_rho 0.05`.

    Raises:
        `ValueError`: `method` is not `ddp`, `sam`, a registered strategy, or `<strategy>+sam`.
    """
    base, _, extra = method.partition("+")
    if method == "sam":
        base, extra = "ddp", "sam"
    if extra not in ("", "sam") or (base != "ddp" and base not in STRATEGIES):
        raise ValueError(
            f"--methods: {method!r} is not a method; use ddp, sam, one of the strategies {sorted(STRATEGIES)}, "
            "or <strategy>+sam."
        )
    flags = [] if base == "ddp" else ["--dppf", "--dppf_strategy", base, "--dppf_tau", str(tau)]
    return flags + (["--sam_rho", str(SAM_RHO)] if extra == "sam" else [])


def settings_note(methods: list[str], tau: int) -> list[str]:
    """One line per consensus strategy in `methods`: the `DPPFConfig` it runs with (every field, defaults included)."""
    from hf_dppf import DPPFConfig

    notes = []
    for strategy in dict.fromkeys(m.partition("+")[0] for m in methods):
        if strategy in STRATEGIES:
            config = DPPFConfig(strategy=strategy, tau=tau)
            in_force = {"width in force": config.push_width}
            if strategy == "easgd":
                in_force["beta in force"] = config.moving_rate
            extra = "".join(f"; {name} {value}" for name, value in in_force.items() if value is not None)
            notes.append(f"- {strategy}: `{config!r}`{extra}")
    if any(m == "sam" or m.endswith("+sam") for m in methods):
        notes.append(f"- sam: rho {SAM_RHO} (Foret et al. 2021's default), two forward/backward passes per step")
    return notes


@dataclass
class Run:
    """One training run: a method, a seed, its folder and command."""

    method: str
    seed: int
    folder: Path
    command: list[str]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_path(recipe: str) -> Path:
    """`recipes/<recipe>.py`, or `recipe` itself when it is a path to a script."""
    path = Path(recipe) if recipe.endswith(".py") else ROOT / "recipes" / f"{recipe}.py"
    if not path.is_file():
        available = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
        raise SystemExit(f"--recipe={recipe!r}: {path} does not exist; the recipes are {available}.")
    return path


def resolve_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each method's own flags: `method_flags`, or what `--method_flags NAME=FLAGS` gives instead."""
    try:
        flags = {m: method_flags(m, args.tau) for m in args.methods}
    except ValueError as error:
        raise SystemExit(str(error)) from None
    for spec in args.method_flags:
        name, _, given = spec.partition("=")
        if name not in flags:
            raise SystemExit(f"--method_flags {spec!r}: {name!r} is not one of --methods {args.methods}.")
        flags[name] = given.split()
    return flags


def plan(args: argparse.Namespace, recipe_args: list[str], flags: dict[str, list[str]]) -> list[Run]:
    """Every (method, seed) run with its torchrun command line."""
    script = recipe_path(args.recipe)
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            folder = Path(args.output_dir) / method / f"seed{seed}"
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                "--master_port", "{port}", str(ROOT / "scripts" / "count_ddp_bytes.py"), str(script),
                "--seed", str(seed), "--output_dir", str(folder), *recipe_args, *flags[method],
            ]  # fmt: skip
            runs.append(Run(method, seed, folder, command))
    return runs


def execute(run: Run, timeout_s: float | None) -> float:
    """Launch `run` (stdout and stderr to `<folder>/stdout.log`); returns its wall time; raises if it failed."""
    run.folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COUNT_DDP_BYTES_DIR": str(run.folder / "ddp_bytes")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [part.replace("{port}", str(free_port())) for part in run.command]
    start = time.perf_counter()
    with open(run.folder / "stdout.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.method} seed {run.seed} failed (exit {proc.returncode}): {run.folder}/stdout.log")
    return time.perf_counter() - start


def measure_imv(run: Run, imv_args: list[str], timeout_s: float | None) -> dict:
    """`hf-dppf sharpness` of the run's final model (saved in its folder); returns its `--output_json` record."""
    out = run.folder / "imv.json"
    command = [
        sys.executable, "-m", "hf_dppf.cli", "sharpness", "--model_name_or_path", str(run.folder),
        "--device", "cpu", "--output_json", str(out), *imv_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(run.folder / "imv.log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"IMV of {run.folder} failed (exit {proc.returncode}); see {run.folder}/imv.log")
    return json.loads(out.read_text())


def collect(run: Run, wall_s: float, imv: dict | None, metric: str) -> dict:
    """One run's row: its `results.json`, its counted bytes and its training curve from the log."""
    results = json.loads((run.folder / "results.json").read_text())
    counts = [json.loads(p.read_text()) for p in sorted((run.folder / "ddp_bytes").glob("rank*.json"))]
    if len({c["ddp_allreduce_bytes"] for c in counts}) > 1:
        raise RuntimeError(f"{run.folder}: the ranks' DDP byte counts differ: {counts}")
    ddp_bytes = counts[0]["ddp_allreduce_bytes"] if counts else 0
    stats = results.get("dppf_stats") or {}
    consensus_bytes = stats.get("total_bytes_per_worker", 0)
    curve = []
    for line in (run.folder / "stdout.log").read_text().splitlines():
        logged = parse_logged_dict(line)
        if logged is not None and "loss" in logged:
            curve.append(logged)
    steps_per_log = results["global_step"] / len(curve) if curve else 0
    return {
        "method": run.method,
        "seed": run.seed,
        "metric": results["eval"].get(metric),
        "eval": results["eval"],
        "bytes_per_worker": ddp_bytes + consensus_bytes,
        "ddp_bytes": ddp_bytes,
        "consensus_bytes": consensus_bytes,
        "wall_s": wall_s,
        "train_runtime_s": results.get("train_runtime_s"),
        "global_step": results["global_step"],
        "valley_width": stats.get("valley_width"),
        "mean_valley": None if imv is None else imv.get("mean valley"),
        "imv": None if imv is None else imv.get("inverse mean valley"),
        "train_loss_curve": [[round((i + 1) * steps_per_log), c["loss"]] for i, c in enumerate(curve)],
        "eval_history": results.get("eval_history", []),
        "folder": str(run.folder),
    }


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    """One summary per method: mean and std over its seeds of every reported number."""
    summary = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "runs": len(mine)}
        for key in ("metric", "bytes_per_worker", "wall_s", "train_runtime_s", "valley_width", "mean_valley", "imv"):
            entry[key] = mean_std([r[key] for r in mine])
        summary.append(entry)
    return summary


def _pm(pair: tuple[float | None, float | None], fmt: str, scale: float = 1.0) -> str:
    mean, std = pair
    if mean is None:
        return "-"
    return f"{mean / scale:{fmt}} ± {std / scale:{fmt}}"


def markdown(summary: list[dict], rows: list[dict], metric: str, header: str, flags: dict[str, list[str]]) -> str:
    """`results.md`: the settings, the summary (mean ± std over seeds) and every run."""
    columns = f"method | flags | {metric} | MiB sent per worker | wall time (s) | training time (s) | valley width"
    lines = [header, "", f"| {columns} | mean valley | IMV | runs |", "|---|---|" + "---:|" * 8]
    for s in summary:
        lines.append(
            f"| {s['method']} | `{' '.join(flags[s['method']]) or '(none)'}` | {_pm(s['metric'], '.4f')} "
            f"| {_pm(s['bytes_per_worker'], '.1f', 2**20)} | {_pm(s['wall_s'], '.0f')} "
            f"| {_pm(s['train_runtime_s'], '.0f')} | {_pm(s['valley_width'], '.3g')} | {_pm(s['mean_valley'], '.3g')} "
            f"| {_pm(s['imv'], '.3g')} | {s['runs']} |"
        )
    columns = f"method | seed | {metric} | bytes per worker (DDP + consensus) | wall time (s) | valley width | IMV"
    lines += ["", "Every run:", "", f"| {columns} |", "|---|" + "---:|" * 6]
    for r in rows:
        width = "-" if r["valley_width"] is None else f"{r['valley_width']:.4g}"
        imv = "-" if r["imv"] is None else f"{r['imv']:.4g}"
        metric_value = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(
            f"| {r['method']} | {r['seed']} | {metric_value} | {r['bytes_per_worker']} "
            f"({r['ddp_bytes']} + {r['consensus_bytes']}) | {r['wall_s']:.1f} | {width} | {imv} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], rows: list[dict], metric: str, folder: Path) -> None:
    """`accuracy_vs_bytes.png` (mean ± std per method) and `curves.png` (loss and metric against steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        if s["metric"][0] is None:
            continue
        ax.errorbar(s["bytes_per_worker"][0] / 2**20, s["metric"][0], xerr=s["bytes_per_worker"][1] / 2**20,
                    yerr=s["metric"][1], fmt="o", capsize=3, label=s["method"])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("MiB sent per worker (log scale)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)

    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        color = None
        for i, r in enumerate(mine):
            if r["train_loss_curve"]:
                steps, losses = zip(*r["train_loss_curve"])
                (line,) = loss_ax.plot(steps, losses, color=color, alpha=0.8, label=method if i == 0 else None)
                color = line.get_color()
            history = [(h["step"], h[metric]) for h in r["eval_history"] if metric in h and "step" in h]
            if history:
                steps, values = zip(*history)
                eval_ax.plot(steps, values, marker=".", color=color, alpha=0.8, label=method if i == 0 else None)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (rank 0)")
    eval_ax.set_xlabel("optimizer step")
    eval_ax.set_ylabel(metric)
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="A recipe name (recipes/<name>.py) or a script path.")
    parser.add_argument(
        "--methods", nargs="+", default=["ddp", "avg", "dppf"], help="ddp, sam, strategies, <strategy>+sam."
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Seeds (default: %(default)s).")
    parser.add_argument("--nproc", type=int, default=4, help="Processes per run (default: %(default)s).")
    parser.add_argument("--tau", type=int, default=4, help="Local steps between rounds (default: %(default)s).")
    parser.add_argument(
        "--method_flags", action="append", default=[], help="NAME=FLAGS: replace a method's own flags (repeat)."
    )
    parser.add_argument("--output_dir", default="runs/benchmark", help="Where everything goes (default: %(default)s).")
    parser.add_argument("--metric", default=None, help="Headline metric (default: eval_accuracy; causal_lm: ppl).")
    parser.add_argument("--no_imv", dest="imv", action="store_false", help="Skip the sharpness (IMV) measurement.")
    parser.add_argument(
        "--imv_args",
        default=None,
        help="Flags for `hf-dppf sharpness` (default: the recipe's data, --max_samples 128 --num_directions 8).",
    )
    parser.add_argument("--timeout", type=float, default=None, help="Kill a run after this many seconds.")
    parser.add_argument("--reuse", action="store_true", help="Reuse the runs (and IMVs) already in --output_dir.")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="-- then flags every run gets (the budget).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe_args = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    if args.nproc < 1:
        raise SystemExit(f"--nproc={args.nproc} is invalid: it must be >= 1.")
    flags = resolve_flags(args)
    runs = plan(args, recipe_args, flags)
    recipe = Path(recipe_path(args.recipe)).stem
    metric = args.metric or RECIPE_METRIC.get(recipe, DEFAULT_METRIC)
    imv_args = (
        args.imv_args.split()
        if args.imv_args is not None
        else [*RECIPE_IMV_ARGS.get(recipe, []), "--max_samples", "128", "--num_directions", "8"]
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    for run in runs:
        try:
            wall_file = run.folder / "wall_s.txt"
            if args.reuse and (run.folder / "results.json").exists() and wall_file.exists():
                wall_s = float(wall_file.read_text())
            else:
                wall_s = execute(run, args.timeout)
                wall_file.write_text(str(wall_s))
            if not args.imv:
                imv = None
            elif args.reuse and (run.folder / "imv.json").exists():
                imv = json.loads((run.folder / "imv.json").read_text())
            else:
                imv = measure_imv(run, imv_args, args.timeout)
            rows.append(collect(run, wall_s, imv, metric))
            print(f"{run.method} seed {run.seed}: {metric}={rows[-1]['metric']} in {wall_s:.0f} s", flush=True)
        except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError) as error:
            failures.append(str(error))
            print(f"FAILED: {error}", flush=True)
    summary = summarize(rows, args.methods)
    header = "\n".join(
        [
            f"# Benchmark: {recipe}",
            "",
            f"- command: `python scripts/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"- {args.nproc} CPU processes per run (torchrun, gloo), seeds {args.seeds}, tau {args.tau}; every run "
            f"gets `{' '.join(recipe_args) or '(recipe defaults)'}`",
            f"- machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- bytes: per worker, DDP gradient buckets (counted by a comm hook) + consensus rounds (engine count, "
            "final averaging included); mean ± sample std over seeds",
            f"- IMV: `hf-dppf sharpness {' '.join(imv_args)}` on each run's final model"
            if args.imv
            else "- IMV: not measured (--no_imv)",
            "- method settings (the documented defaults, `--method_flags` overrides them; the recipe's optimizer, "
            "learning-rate schedule and batch size for all):",
            *settings_note(args.methods, args.tau),
            *(f"- FAILED: {f}" for f in failures),
        ]
    )
    (out / "results.md").write_text(markdown(summary, rows, metric, header, flags))
    (out / "summary.json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))
    if rows:
        plot(summary, rows, metric, out)
    print((out / "results.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
