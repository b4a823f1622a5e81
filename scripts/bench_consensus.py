"""
One DPPF consensus round vs one flat all-reduce vs accelerate's LocalSGD averaging (`hf-dppf bench`), on this
machine's loopback and, with `--rates`, across bandwidth-limited links.

Without `--rates` this is `hf-dppf bench`: the processes talk over loopback, where on a small machine the CPU, not the
network, bounds the all-reduce. With `--rates` (needs root and iproute2) it runs the same measurement once over
loopback and once per rate with every process in its own network namespace behind a `tc tbf` link of that rate
(scripts/netns_testbed.py), measures each link's TCP goodput, and prints one table: how the round compares with the
all-reduce when the link is the bottleneck, as it is between servers.

    python scripts/bench_consensus.py                                  # BERT-base, 2 gloo processes, 7 repeats
    python scripts/bench_consensus.py --output bench.md
    sudo python scripts/bench_consensus.py --rates 10gbit 5gbit 2gbit 1gbit --output links.md
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns_testbed  # noqa: E402

from hf_dppf.cli import bench as benchmark  # noqa: E402


def _rate(value: str) -> str:
    """argparse type: a `tc` rate the testbed accepts."""
    try:
        netns_testbed.parse_rate(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--rate=")) from None
    return value


def _bench_command(args: argparse.Namespace, output_json: Path) -> list[str]:
    bench = [sys.executable, "-m", "hf_dppf.cli", "bench", *benchmark.bench_argv(args)]
    return [*bench, "--output_json", str(output_json)]


def _run_link(args: argparse.Namespace, rate: str | None, output_json: Path) -> tuple[dict, float | None]:
    """One `hf-dppf bench` run over loopback (`rate=None`) or across testbed links: its result and the goodput."""
    command = _bench_command(args, output_json)
    if rate is None:
        proc = subprocess.run(
            [*command, "--nproc", str(args.nproc)], capture_output=True, text=True, timeout=args.timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the loopback benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(output_json.read_text()), None
    with netns_testbed.Testbed(args.nproc, rate) as testbed:
        goodput = netns_testbed.measure_throughput(testbed)
        result = netns_testbed.launch(testbed, command, launcher="env", timeout_s=args.timeout, echo=False)
    if any(code != 0 for code in result.returncodes):
        codes = result.returncodes
        raise RuntimeError(f"the benchmark at {rate} failed (exit codes {codes}); logs in {result.log_dir}")
    return json.loads(output_json.read_text()), goodput


def links_table(runs: list[tuple[str, dict, float | None]]) -> str:
    """One row per link: each method's median ms and its ratio to the flat all-reduce measured over that link."""
    methods = list(runs[0][1]["methods"])
    lines = [
        benchmark.settings_line(runs[0][1]),
        "",
        "| link (each direction; measured TCP goodput) | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for label, result, goodput in runs:
        link = label if goodput is None else f"{label} ({goodput / 1e9:.2f} Gbit/s)"
        cells = []
        for name in methods:
            m = result["methods"][name]
            cells.append(f"{m['median_ms']:.0f} ms" + ("" if name == benchmark.FLOOR else f" ({m['ratio']:.2f}x)"))
        lines.append(f"| {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    parser.add_argument(
        "--rates",
        nargs="+",
        type=_rate,
        default=None,
        help="also run across testbed links of these rates (tc syntax, e.g. 1gbit 100mbit); needs root",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds before one run (one link) is killed (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.rates is None:
        return benchmark.run(args)
    if args.nproc < 2:
        parser.error(f"--nproc={args.nproc} is invalid: a consensus round needs at least 2 processes.")
    netns_testbed.check_requirements()
    signal.signal(signal.SIGTERM, netns_testbed._on_signal)  # the namespaces go away on SIGTERM too
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_links_") as tmp:
        for rate in [None, *args.rates]:
            label = "loopback (no shaping)" if rate is None else rate
            print(f"[bench] {label}: {args.nproc} processes, {args.repeats} repeats ...", flush=True)
            result, goodput = _run_link(args, rate, Path(tmp) / f"{label.split()[0]}.json")
            runs.append((label, result, goodput))
            print(benchmark.table(result), flush=True)
    text = links_table(runs)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps([r for _, r, _ in runs], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
