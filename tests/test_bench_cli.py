"""`hf-dppf bench` end to end on a tiny model: two spawned gloo processes, a table with every method and strategy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from dist_utils import cpu_env


def test_bench_cli_writes_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    cmd = [
        sys.executable,
        "-m",
        "hf_dppf.cli",
        "bench",
        "--model",
        "bert-tiny",
        "--repeats",
        "2",
        "--output",
        str(out),
        "--output_json",
        str(tmp_path / "bench.json"),
        "--strategies",
        "dppf",
        "easgd",
        "lsgd",
        "grawa",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\| (.+?) \| [\d.]+ \| [\d.]+ \| ([\d.]+)x \|", out.read_text(), re.M)
    }
    assert set(rows) == {
        "flat all-reduce (floor)",
        "DPPFConsensus.round()",
        "DPPFConsensus.round() [easgd]",
        "DPPFConsensus.round() [lsgd]",
        "DPPFConsensus.round() [grawa]",
        "copy + bucketed all-reduce (no pull-push)",
        "copy + all-reduce + read sum and weights + write-back (bound)",
        "accelerate LocalSGD averaging",
    }
    assert rows["flat all-reduce (floor)"] == 1.0 and all(v > 0 for v in rows.values())
    assert "2 gloo processes" in out.read_text()
    # the JSON holds the same measurements: each ratio is that method's median over the flat all-reduce's median
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["schema"] == "hf_dppf.bench/2" and result["processes"] == 2 and result["repeats"] == 2
    floor = result["methods"]["flat all-reduce (floor)"]["median_ms"]
    for name, m in result["methods"].items():
        assert m["ratio"] == m["median_ms"] / floor and m["min_ms"] <= m["median_ms"]
        assert rows[name] == float(f"{m['ratio']:.2f}")
    # every round row counts its ops and host reads: O(buckets) ops, two reads
    assert set(result["rounds"]) == {"dppf", "easgd", "lsgd", "grawa"}
    for name, r in result["rounds"].items():
        assert r["host_reads"] <= 2 and 0 < r["ops"] <= 10 * r["buckets"] + 60, (name, r)
        assert r["floor_multiple"] == result["methods"][name_of(name)]["ratio"]


def name_of(strategy: str) -> str:
    return "DPPFConsensus.round()" + ("" if strategy == "dppf" else f" [{strategy}]")


def test_bench_cli_rejects_single_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hf_dppf.cli", "bench", "--nproc", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--nproc=1 is invalid" in proc.stderr
