"""
`recipes/accelerate_text_classification.py` under both launchers (2 CPU processes, offline): the rounds, the tracked
statistics, its checkpoints, and a run resumed from one of them that ends with the very same model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from dist_utils import free_port, launcher_env
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "accelerate_text_classification.py"
# a few steps of the offline MiniLM-L6 on a slice of BBC News
QUICK = ["--max_train_samples", "256", "--max_eval_samples", "32", "--max_seq_length", "64", "--max_train_steps", "4"]
QUICK += ["--per_device_train_batch_size", "8", "--dppf", "--dppf_tau", "2"]


def launch(launcher: str, args: list[str]) -> dict:
    port = str(free_port())
    env = launcher_env()
    if launcher == "accelerate":  # as docs/recipes.md: two processes on CPU (`--cpu` alone would start one)
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += [str(RECIPE), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, "only the main process prints the summary"
    return {**summaries[0], "stdout": done.stdout, "stderr": done.stderr}


def test_recipe_runs_tracks_checkpoints_and_resumes_exactly_under_both_launchers(tmp_path: Path) -> None:
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run = launch("accelerate", [*QUICK, "--output_dir", str(first), "--checkpointing_steps", "2", "--with_tracking"])
    assert run["world_size"] == 2 and run["dppf"] and run["optimizer_steps"] == 4 and run["rounds"] == 2
    assert 0.0 <= run["eval_accuracy"] <= 1.0
    assert "rounds=2" in run["stderr"], "the progress bar shows the round statistics"
    for step in (2, 4):
        assert sorted(p.name for p in (first / f"step_{step}" / "dppf").iterdir()) == ["rank0", "rank1"]
    logged = [json.loads(line) for line in (first / "tracking.jsonl").read_text().splitlines()]
    rounds = [entry for entry in logged if "dppf/lam" in entry]
    assert [entry["step"] for entry in rounds] == [2, 4] and [entry["dppf/rounds"] for entry in rounds] == [1, 2]
    assert any("eval_accuracy" in entry for entry in logged) and any("train_loss" in entry for entry in logged)

    resumed.mkdir()
    shutil.copytree(first / "step_2", resumed / "step_2")
    again = launch("torchrun", [*QUICK, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert f"resumed from {resumed / 'step_2'} at optimizer step 2" in again["stdout"]
    assert again["optimizer_steps"] == 4 and again["rounds"] == 2 and again["valley_width"] == run["valley_width"]
    want, got = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want), "resume is exact"


def test_recipe_help_documents_every_flag() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("accelerate_text_classification", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    actions = [a for a in module.build_parser()._actions if a.option_strings and a.dest != "help"]
    undocumented = [a.option_strings[0] for a in actions if not (a.help or "").strip()]
    assert not undocumented, undocumented
    flags = {a.option_strings[0] for a in actions}
    assert {"--dppf", "--dppf_tau", "--checkpointing_steps", "--resume_from_checkpoint", "--with_tracking"} <= flags
