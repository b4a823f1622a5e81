"""
`scripts/gpu_check.py` in its CPU form: the engine section against the oracle and exact byte counts, the training
sections' rounds and bytes, the bench section on the final `--output_json` interface, the platform choice, `--help`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import cpu_env

from hf_dppf.engine import FINGERPRINT_BYTES

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # spawned ranks import the script's functions by module name, as its own ranks do
import gpu_check as gc  # noqa: E402

CPU = gc.Platform("cpu", "gloo", ("cpu", "cpu"))
# The check model: Linear(37, 64), BatchNorm1d(64), Linear(64, 10); floating buffers: running mean and variance.
CHECK_ELEMENTS = (37 * 64 + 64) + 2 * 64 + (64 * 10 + 10) + 2 * 64
# What a round sends besides the weights: 2 fp64 distance statistics, and lsgd / grawa one fp64 value per worker.
ROUND_EXTRA = {"dppf": 16, "avg": 16, "easgd": 16, "lsgd": 16 + 8 * 2, "grawa": 16 + 8 * 2}


def test_engine_section_matches_the_oracle_with_exact_bytes() -> None:
    rows = gc.engine_rows(CPU)
    assert [r.check for r in rows] == [f"{s} / {w}" for s in gc.STRATEGIES for w in gc.WIRE_DTYPES]
    for row in rows:
        strategy, wire = row.check.split(" / ")
        assert row.status == "ok", row
        if wire == "fp32":
            assert row.values["gap"] <= 1e-6, row
        else:  # the wire dtype was in effect: the average carries its rounding, and no more
            assert 1e-5 < row.values["gap"] <= gc.TOLERANCE[wire], row
        assert row.values["payload_bytes"] == gc.WIRE_BYTES[wire] * CHECK_ELEMENTS
        assert row.values["bytes"] == row.values["payload_bytes"] + ROUND_EXTRA[strategy], row


def test_a_wrong_round_is_a_failure() -> None:
    want = [torch.zeros(3, 4), torch.ones(5)]
    got = [t.clone() for t in want]
    assert gc.worst_gap(got, want) == 0.0
    got[1][2] += 0.25
    assert gc.worst_gap(got, want) == 0.25
    got[0][1, 1] = float("nan")
    assert gc.worst_gap(got, want) == float("inf")


def test_training_sections_report_rounds_bytes_and_the_average() -> None:
    steps = 8  # 2 rounds (after steps 4 and 8) and the final average
    accelerate = gc.run_ranks(gc._accelerate_rank, CPU, steps, False, init=False)
    (row,) = gc.training_rows("accelerate", accelerate, steps, False)
    assert row.status == "ok", row
    for rank in accelerate:
        ddp, dppf = rank["ddp"], rank["dppf"]
        assert (ddp["rounds"], ddp["bytes"]) == (0, 0)
        assert dppf["rounds"] == steps // gc.TAU + 1
        # every byte is a round (the MLP's fp32 parameters + 2 fp64 statistics) or the start-up fingerprint
        params = 4 * (32 * 128 + 128 + 128 * 8 + 8)
        assert dppf["param_bytes"] == params
        assert dppf["bytes"] == dppf["rounds"] * (params + 16) + FINGERPRINT_BYTES
        assert dppf["accuracy"] > 0.9 and ddp["accuracy"] > 0.9  # separable blobs
    assert accelerate[0]["dppf"]["accuracy"] == accelerate[1]["dppf"]["accuracy"], "both ranks hold the average"


def test_trainer_section(tmp_path: Path) -> None:
    steps = 8
    ranks = gc.run_ranks(gc._trainer_rank, CPU, steps, False, str(tmp_path), init=False)
    (row,) = gc.training_rows("trainer", ranks, steps, False)
    assert row.status == "ok", row
    for rank in ranks:
        assert (rank["ddp"]["rounds"], rank["ddp"]["bytes"]) == (0, 0)
        assert rank["dppf"]["rounds"] == steps // gc.TAU + 1
        assert rank["dppf"]["bytes"] >= rank["dppf"]["rounds"] * rank["dppf"]["param_bytes"]
        assert 0.0 <= rank["dppf"]["accuracy"] <= 1.0


def _fake_bench(result: dict | None, returncode: int = 0, stderr: str = ""):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if result is not None:
            path = command[command.index("--output_json") + 1]
            Path(path).write_text(json.dumps(result))
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    return run, calls


def test_bench_section_reads_the_rounds_against_the_floor() -> None:
    result = {
        "floor_ms": 0.5,
        "rounds": {
            "dppf": {"median_ms": 1.5, "floor_multiple": 3.0, "ops": 40, "host_reads": 2},
            "avg": {"median_ms": 1.0, "floor_multiple": 2.0, "ops": 30, "host_reads": 3},
        },
    }
    run, calls = _fake_bench(result)
    rows = gc.bench_rows("cuda", quick=False, run=run)
    (command,) = calls
    assert command[command.index("--collectives") + 1] == "fake" and command[command.index("--device") + 1] == "cuda"
    assert command[command.index("--strategies") + 1 : command.index("--strategies") + 3] == ["dppf", "avg"]
    assert [(r.check, r.status) for r in rows] == [("round: dppf", "ok"), ("round: avg", "warn")]
    assert rows[0].values == {"median_ms": 1.5, "floor_multiple": 3.0, "ops": 40, "host_reads": 2, "floor_ms": 0.5}
    assert "3.00x the floor (0.500 ms)" in rows[0].result


def test_bench_section_is_pending_without_the_flags_and_fails_on_a_crash() -> None:
    run, _ = _fake_bench(None, 2, "hf-dppf bench: error: unrecognized arguments: --collectives fake --device cpu")
    assert [(r.status, r.result) for r in gc.bench_rows("cpu", quick=True, run=run)] == [("pending", gc.PENDING)]
    run, _ = _fake_bench(None, 1, "Traceback ...\nRuntimeError: boom")
    (row,) = gc.bench_rows("cpu", quick=True, run=run)
    assert row.status == "FAIL" and "RuntimeError: boom" in row.result


@pytest.mark.parametrize(
    "gpus, backend, devices",
    [(0, "gloo", ("cpu", "cpu")), (1, "gloo", ("cuda:0", "cuda:0")), (2, "nccl", ("cuda:0", "cuda:1"))],
)
def test_platform_one_gpu_per_nccl_rank_else_gloo(monkeypatch, gpus, backend, devices) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    platform = gc.choose_platform("auto")
    assert (platform.backend, platform.devices) == (backend, devices)
    envs = [gc.rank_env(r, platform, 1234) for r in range(2)]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    # both ranks on one GPU: each is local rank 0 of it, so no rank looks for a cuda:1 that is not there
    assert [e["LOCAL_RANK"] for e in envs] == (["0", "0"] if gpus == 1 else ["0", "1"])
    assert all(e.get("CUDA_VISIBLE_DEVICES") == "" for e in envs) == (gpus == 0)
    assert gc.choose_platform("cpu").devices == ("cpu", "cpu")


def test_help_documents_every_flag_and_versions_section_runs(tmp_path: Path) -> None:
    parser = gc.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[0] in text, action
    out = tmp_path / "check.json"
    command = [sys.executable, str(SCRIPTS / "gpu_check.py"), "--quick", "--sections", "versions"]
    done = subprocess.run(command + ["--output_json", str(out)], capture_output=True, text=True, env=cpu_env())
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["check"]: r["result"] for r in json.loads(out.read_text())["rows"]}
    assert rows["torch"] == torch.__version__ and rows["CUDA"].startswith("none")
    assert re.search(r"^\| versions +\| torch +\| ok +\| " + re.escape(torch.__version__), done.stdout, re.M)
