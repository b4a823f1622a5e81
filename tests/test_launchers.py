"""The Accelerate loop recipe under the two real launchers, 2 CPU processes each, with exact round and byte counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import cpu_env, free_port

from hf_dppf.engine import FINGERPRINT_BYTES

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 128
# the recipe's MLP 64 -> HIDDEN -> HIDDEN -> 10, fp32
PARAM_BYTES = 4 * (64 * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN * 10 + 10)


def launch(launcher: str) -> list[str]:
    port = str(free_port())
    if launcher == "accelerate":
        return [
            "accelerate",
            "launch",
            "--config_file",
            "accelerate_configs/multi_cpu.yaml",
            "--main_process_port",
            port,
        ]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_accelerate_loop_recipe_under_launchers(launcher: str) -> None:
    args = ["recipes/accelerate_loop.py", "--dppf", "--dppf_tau", "4", "--epochs", "2", "--hidden", str(HIDDEN)]
    env = cpu_env()
    proc = subprocess.run(launch(launcher) + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, "only the main process prints"
    s = summaries[0]
    assert s["world_size"] == 2 and s["dppf"]
    # 1437 training digits -> 719 per process -> 45 micro-batches of 16 per epoch
    assert s["optimizer_steps"] == 90 and s["rounds"] == 90 // 4 + 1, "a round every 4 steps, and one on exit"
    # every byte is a round (parameters + 2 fp64 statistics), one evaluation of the average per epoch, or the
    # start-up fingerprint
    assert s["bytes_communicated"] == s["rounds"] * (PARAM_BYTES + 16) + 2 * PARAM_BYTES + FINGERPRINT_BYTES
    assert s["valley_width"] == 0.0, "on exit every worker holds the average"
    assert s["accuracy"] > 0.8
