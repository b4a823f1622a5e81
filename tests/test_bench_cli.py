"""`hf-dppf bench` end to end on a tiny model: two spawned gloo processes, a table with every method and strategy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


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
        "--strategies",
        "dppf",
        "easgd",
        "lsgd",
        "grawa",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\| (.+?) \| \d+ \| \d+ \| ([\d.]+)x \|$", out.read_text(), re.M)
    }
    assert set(rows) == {
        "flat all-reduce (floor)",
        "DPPFConsensus.round()",
        "DPPFConsensus.round() [easgd]",
        "DPPFConsensus.round() [lsgd]",
        "DPPFConsensus.round() [grawa]",
        "copy + bucketed all-reduce (no pull-push)",
        "accelerate LocalSGD averaging",
    }
    assert rows["flat all-reduce (floor)"] == 1.0 and all(v > 0 for v in rows.values())
    assert "2 gloo processes" in out.read_text()


def test_bench_cli_rejects_single_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hf_dppf.cli", "bench", "--nproc", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--nproc=1 is invalid" in proc.stderr
