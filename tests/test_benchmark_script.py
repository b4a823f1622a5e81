"""
scripts/benchmark.py: the table says what the runs did. Bytes are checked against an independent count (DDP
all-reduces every trainable gradient once per step), against each run's own `results.json`, and the mean / std
against numpy.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.dist_utils import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark")


def test_two_methods_table_matches_the_runs(bench, tmp_path):
    out = tmp_path / "bench"
    budget = ["--max_steps", "6", "--logging_steps", "2", "--max_train_samples", "256", "--max_eval_samples", "64"]
    # the IMV on a few sklearn digits (resized to the model's 28x28): checks the plumbing, not the number
    code = bench.main(
        ["--recipe", "image_classification", "--methods", "ddp", "dppf", "--seeds", "0", "--nproc", "2", "--tau", "3"]
        + ["--output_dir", str(out), "--imv_args=--dataset digits --max_samples 16 --num_directions 1", "--"]
        + [*budget, "--disable_tqdm", "True"]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "results.md").read_text()
    runs = {r["method"]: r for r in summary["runs"]}
    assert sorted(runs) == ["ddp", "dppf"]

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out / "ddp" / "seed0")
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for method, run in runs.items():
        results = json.loads((out / method / "seed0" / "results.json").read_text())
        stats = results["dppf_stats"] or {}
        assert run["global_step"] == results["global_step"] == 6
        if method == "ddp":  # one all-reduce of every gradient per optimizer step, nothing else
            assert run["ddp_bytes"] == 6 * gradient_bytes and run["consensus_bytes"] == 0
            assert stats == {}
        else:  # no gradient all-reduce; the engine's own count (2 rounds + the final average)
            assert run["ddp_bytes"] == 0 and run["consensus_bytes"] == stats["total_bytes_per_worker"] > 0
            assert stats["rounds"] == 6 // 3
            assert run["valley_width"] == stats["valley_width"]
        assert run["bytes_per_worker"] == run["ddp_bytes"] + run["consensus_bytes"]
        assert run["metric"] == results["eval"]["eval_accuracy"]
        imv = json.loads((out / method / "seed0" / "imv.json").read_text())
        assert run["imv"] == imv["inverse mean valley"] > 0
        row = f"| {method} | 0 | {run['metric']:.4f} | {run['bytes_per_worker']} ({run['ddp_bytes']} + "
        assert row in table
        # one seed: the mean is the run, the spread zero
        mib = run["bytes_per_worker"] / 2**20
        assert re.search(rf"\| {method} \| `[^`]*` \| {run['metric']:.4f} ± 0\.0000 \| {mib:.1f} ± 0\.0 \|", table)
        assert len(run["train_loss_curve"]) == 3  # logged every 2 of 6 steps
    for png in ("accuracy_vs_bytes.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_is_mean_and_sample_std_over_seeds(bench):
    rng = np.random.default_rng(0)
    rows = [
        {"method": m, "seed": s, "metric": float(rng.random()), "bytes_per_worker": int(rng.integers(1, 1e9)),
         "wall_s": float(rng.random() * 100), "train_runtime_s": None, "valley_width": None, "mean_valley": 1.0,
         "imv": float(rng.random())}
        for m in ("ddp", "dppf") for s in range(3)
    ]  # fmt: skip
    summary = {s["method"]: s for s in bench.summarize(rows, ["ddp", "dppf"])}
    for method in ("ddp", "dppf"):
        for key in ("metric", "bytes_per_worker", "wall_s", "imv"):
            values = np.array([r[key] for r in rows if r["method"] == method], dtype=np.float64)
            mean, std = summary[method][key]
            assert mean == pytest.approx(values.mean(), rel=1e-12)
            assert std == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert summary[method]["train_runtime_s"] == (None, None)
        assert summary[method]["mean_valley"] == (1.0, 0.0)


def test_methods_are_ddp_sam_and_the_registered_strategies(bench):
    from hf_dppf.strategies import STRATEGIES

    for name in STRATEGIES:
        assert bench.method_flags(name, 8) == ["--dppf", "--dppf_strategy", name, "--dppf_tau", "8"]
        assert bench.method_flags(f"{name}+sam", 8)[-2:] == ["--sam_rho", str(bench.SAM_RHO)]
    assert bench.method_flags("ddp", 8) == []
    assert bench.method_flags("sam", 8) == ["--sam_rho", str(bench.SAM_RHO)]
    with pytest.raises(ValueError, match=r"'nope' is not a method; use ddp, sam, one of the strategies \["):
        bench.method_flags("nope", 8)
    with pytest.raises(SystemExit, match="'nope' is not a method"):
        bench.main(["--recipe", "image_classification", "--methods", "ddp", "nope"])
