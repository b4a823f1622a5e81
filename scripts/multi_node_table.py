#!/usr/bin/env python
"""
The table of docs/multi_node.md ("Measured") from a `netns_testbed.py --compare --output_json` file whose methods ran
`recipes/text_classification.py` with an `--output_dir` of their own (so each left its `results.json`):

    python scripts/multi_node_table.py docs/benchmark/multi_node_100mbit.json [--results_dir DIR]

Per method: the step time (the Trainer's `train_runtime` / optimizer steps, both from `results.json`), the MiB that
crossed the slow links per process (the testbed's counters: the mean over the nodes of what each sent, divided by the
processes per node; the whole run: start-up, training, the final average and evaluation), the eval accuracy of the
final model (the workers' average under DPPF) and the consensus rounds; then the first method's step time over each
other's. `--results_dir DIR` reads `DIR/<method>/results.json` instead of the `--output_dir` in the method's flags
(e.g. copies kept with the JSON).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path


def results_path(row: dict, results_dir: str | None) -> Path:
    if results_dir is not None:
        return Path(results_dir) / row["method"] / "results.json"
    flags = shlex.split(row["flags"])
    return Path(flags[flags.index("--output_dir") + 1]) / "results.json"


def table(rows: list[dict], results_dir: str | None = None) -> str:
    step_s = {}
    lines = [
        "| method | step time (s) | MiB across the slow link per process | accuracy of the average | rounds "
        "| optimizer steps | train_runtime (s) | MiB sent by node 0 / node 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        record = json.loads(results_path(row, results_dir).read_text())
        steps, runtime = record["global_step"], record["train_runtime_s"]
        stats = record["dppf_stats"]
        rounds = "-" if stats is None else str(stats["rounds"])
        nodes = " / ".join(f"{b / 2**20:.0f}" for b in row["link_tx_bytes"])
        step_s[row["method"]] = runtime / steps
        lines.append(
            f"| {row['method']} | {runtime / steps:.2f} | {row['link_mib_sent_per_process']:.0f} "
            f"| {record['eval']['eval_accuracy']:.4f} | {rounds} | {steps} | {runtime:.1f} | {nodes} |"
        )
    first, *others = step_s
    ratios = [f"{first} / {name} step time: {step_s[first] / step_s[name]:.2f}x" for name in others]
    return "\n".join(lines + ["", *ratios])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("compare_json", help="The --output_json of netns_testbed.py --compare.")
    parser.add_argument("--results_dir", default=None, help="Read DIR/<method>/results.json.")
    args = parser.parse_args(argv)
    print(table(json.loads(Path(args.compare_json).read_text()), args.results_dir))


if __name__ == "__main__":
    main()
