"""
Failure behaviour of the engine: mismatched ranks, non-finite workers and dead or stuck peers fail loudly (or are
repaired), the same way on every rank, instead of hanging or averaging garbage.

Oracles: `simulate_round` over the healthy workers, explicit averages, the engine's byte counts, wall-clock bounds.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import cpu_env, free_port, gather_workers, run_distributed
from safetensors.torch import load_file
from test_engine import OddModel, trainable
from trainer_fixtures import make_args, tiny_bert, toy_data
from transformers import HfArgumentParser, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_dppf import DPPFConfig, DPPFConsensus, DPPFTrainer, DPPFTrainingArguments, cli
from hf_dppf.engine import FINGERPRINT_BYTES
from hf_dppf.integrations.arguments import flag_name
from hf_dppf.simulate import distances_to_average, simulate_round

BAD = 2  # the rank whose weights go bad in the non-finite tests

# Every DPPFConfig field with values it must refuse (a new field without an entry fails the coverage test).
BAD_VALUES: dict[str, list] = {
    "tau": [0, -3, 1.5, True],
    "alpha": [0, 1.5, float("nan")],
    "lam": [-1.0, float("inf")],
    "width": [-0.1, float("nan")],
    "lam_schedule": ["cosine"],
    "strategy": ["sam"],
    "beta": [0, 1.5, float("nan")],
    "warmup_steps": [-1, 2.5],
    "bucket_mb": [0, -1.0, float("inf")],
    "comm_dtype": ["int8"],
    "eps": [-1e-9],
    "nonfinite_policy": ["ignore"],
    "timeout_s": [0, -5.0, float("nan")],
    "overlap_steps": [-1, 1.5, 4, True],
    "push_mode": ["regulariser"],  # 4 = the default tau: a round must land before the next one is due
    "replica_size": [0, -2, 1.5, True],
}


def _error(fn) -> str:
    """The message of the `RuntimeError` that `fn()` must raise."""
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


# ---------------------------------------------------------------------------------------------------- bad settings


def test_every_config_field_refuses_its_bad_values_naming_field_value_and_range() -> None:
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(DPPFConfig)}, "a field has no bad-value test"
    for name, values in BAD_VALUES.items():
        for value in values:
            with pytest.raises(ValueError, match=rf"DPPFConfig\.{name}=.* is invalid: {name} must be \S+"):
                DPPFConfig(**{name: value})


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_trainer_flag_refuses_a_bad_value_at_parsing(name: str) -> None:
    flag = f"--{flag_name(name)}"
    value = str(BAD_VALUES[name][0])
    parser = HfArgumentParser(DPPFTrainingArguments)
    with pytest.raises(ValueError, match=rf"DPPFConfig\.{name}=.* is invalid.*\(flag {flag}\)"):
        parser.parse_args_into_dataclasses(["--output_dir", "unused", "--use_cpu", "--dppf", f"{flag}={value}"])
    assert not dist.is_initialized(), "refused before any process group work"


@pytest.mark.parametrize(
    "argv, message",
    [
        ("bench --bucket_mb 0", "argument --bucket_mb: DPPFConfig.bucket_mb=0.0 is invalid"),
        ("bench --nproc 0", "argument --nproc: '0' is invalid: it must be an integer >= 1"),
        ("bench --repeats x", "argument --repeats: 'x' is invalid: it must be an integer >= 1"),
        ("bench --comm_dtype int8", "argument --comm_dtype: invalid choice: 'int8'"),
        ("sharpness --model_name_or_path m --num_directions 0", "argument --num_directions: '0' is invalid"),
        ("sharpness --model_name_or_path m --delta -1", "argument --delta: '-1' is invalid: it must be a finite"),
        (
            "sharpness --model_name_or_path m --rel_tol 1",
            "argument --rel_tol: '1' is invalid: it must be a finite number > 0 and < 1",
        ),
        ("sharpness --model_name_or_path m --max_samples 0", "argument --max_samples: '0' is invalid"),
        ("sharpness --model_name_or_path m --epsilon inf", "argument --epsilon: 'inf' is invalid"),
        ("sharpness --model_name_or_path m --reference_iterations 0", "argument --reference_iterations: '0'"),
        (
            "landscape --model_name_or_path m --points 1",
            "argument --points: '1' is invalid: it must be an integer >= 2",
        ),
        ("landscape --model_name_or_path m --span nan", "argument --span: 'nan' is invalid"),
    ],
)
def test_bad_cli_values_stop_at_parsing_naming_the_flag(argv: str, message: str, capsys) -> None:
    # the model "m" does not exist: a message about it would mean the value was checked too late
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv.split())
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_too_short_for_its_rounds_is_warned_about(tmp_path: Path, caplog) -> None:
    for flags, warning in (
        (dict(dppf_tau=4, max_steps=3), "dppf_tau=4 is larger than the 3 steps after warmup"),
        (dict(dppf_warmup_steps=3, max_steps=3), "dppf_warmup_steps=3 covers the whole run"),
    ):
        args = make_args(str(tmp_path), dppf=True, ddp_backend=None, **flags)  # one process
        with caplog.at_level(logging.WARNING, logger="hf_dppf"):
            DPPFTrainer(model=tiny_bert(seed=1), args=args, train_dataset=toy_data()).train()
        assert warning in caplog.text


# ---------------------------------------------------------------------------------------------------- mismatched ranks


def _mismatches(rank: int, world_size: int) -> dict[str, str]:
    messages = {}
    model = OddModel()
    if rank == 1:
        model.lin = torch.nn.Linear(13, 8)  # a different head on one rank
    messages["shape"] = _error(lambda: DPPFConsensus(model, DPPFConfig()))
    messages["config"] = _error(lambda: DPPFConsensus(OddModel(), DPPFConfig(tau=4 + rank)))
    engine = DPPFConsensus(OddModel(), DPPFConfig())  # agrees: no error
    state = engine.state_dict()
    state["stats"]["steps"] = 8 if rank == 0 else 6  # e.g. the ranks resumed from different checkpoints
    engine.load_state_dict(state)
    messages["steps"] = _error(engine.verify_ranks)
    messages["bytes"] = engine.stats.bytes_communicated
    return messages


def test_mismatched_ranks_fail_on_every_rank_naming_the_difference() -> None:
    for messages in run_distributed(_mismatches, 2):
        assert (
            "tensor 'lin.weight' is [7, 13] torch.float32 on rank 0 but rank 1 has 'lin.weight' [8, 13]"
            in (messages["shape"])
        )
        assert (
            "rank 1's DPPFConfig differs from rank 0's" in messages["config"]
            and "'tau': (4, 5)" in (messages["config"])
        )
        assert "rank 0 has counted 8 optimizer steps, rank 1 6" in messages["steps"]
        assert messages["bytes"] == 2 * FINGERPRINT_BYTES, "construction and the check after loading: 16 bytes each"


# ---------------------------------------------------------------------------------------------------- non-finite


def _poisoned_model(rank: int, what: str) -> OddModel:
    model = OddModel()
    model.randomise(seed=10 + rank)
    with torch.no_grad():
        if rank == BAD and what == "param":
            model.big[3, 4] = float("nan")
        if rank == BAD and what == "buffer":
            model.bn.running_var[1] = float("inf")
    return model


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a round touches: trainable parameters, then floating buffers."""
    return trainable(model) + [b.detach().clone() for b in model.buffers() if b.is_floating_point()]


def _healthy_mean(workers: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    healthy = [w for i, w in enumerate(workers) if i != BAD]
    return [torch.stack(ts).double().mean(0).float() for ts in zip(*healthy)]


def _nonfinite_rounds(rank: int, world_size: int) -> dict:
    out: dict = {}
    n_params = len(trainable(OddModel()))
    config = DPPFConfig(alpha=0.5, lam=0.3)

    # a NaN in a weight: healthy workers do the round among themselves, the bad one takes their average
    model = _poisoned_model(rank, "param")
    before = gather_workers(_state(model), world_size)
    engine = DPPFConsensus(model, config)
    bytes_before = engine.stats.bytes_communicated
    stats = engine.round()
    healthy = [w[:n_params] for i, w in enumerate(before) if i != BAD]
    expected = simulate_round(healthy, config)[rank - (rank > BAD)] if rank != BAD else _healthy_mean(before)
    if rank != BAD:
        expected = expected + _healthy_mean(before)[n_params:]  # buffers: the healthy workers' average
    out["round_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), expected))
    out["round_bytes"] = stats.bytes_communicated - bytes_before
    out["param_bytes"] = sum(t.numel() * 4 for t in _state(model))
    out["reseeded"], out["count"] = engine.last_reseeded, stats.reseeded_workers
    out["distance_before"] = (stats.distance_before, sum(distances_to_average(healthy)) / len(healthy))

    # an Inf in a BatchNorm buffer is caught too
    model = _poisoned_model(rank, "buffer")
    before = gather_workers(_state(model), world_size)
    DPPFConsensus(model, DPPFConfig(strategy="avg")).round()
    out["buffer_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), _healthy_mean(before)))

    # averaged(): the healthy average inside the block, every worker's own weights (NaN included) after it
    model = _poisoned_model(rank, "param")
    own = _state(model)
    before = gather_workers(own, world_size)
    engine = DPPFConsensus(model, config)
    with engine.averaged():
        out["averaged_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), _healthy_mean(before)))
    out["restored"] = all(torch.equal(g, e) for g, e in zip(_state(model), own) if not torch.isnan(e).any())
    out["still_nan"] = bool(torch.isnan(model.big).any())

    # ensure_finite(): only the bad worker moves, to the healthy average
    out["ensure_returned"] = engine.ensure_finite()
    expected = _healthy_mean(before) if rank == BAD else own
    out["ensure_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), expected))
    out["ensure_again"] = engine.ensure_finite()  # all finite now: nothing to do

    # nonfinite_policy="raise": every rank stops, nobody moves
    model = _poisoned_model(rank, "param")
    own = _state(model)
    engine = DPPFConsensus(model, DPPFConfig(alpha=0.5, lam=0.3, nonfinite_policy="raise"))
    out["raise"] = _error(engine.round)
    out["untouched"] = all(torch.equal(g, e) for g, e in zip(_state(model), own) if not torch.isnan(e).any())
    out["raise_at_save"] = _error(engine.ensure_finite)

    # no healthy worker left: even "reseed" must stop
    model = _poisoned_model(BAD, "param")  # every rank holds the NaN
    out["all_bad"] = _error(DPPFConsensus(model, config).round)
    return out


def test_nonfinite_worker_is_reseeded_from_the_healthy_average_or_stops_every_rank() -> None:
    results = run_distributed(_nonfinite_rounds, 3)
    for rank, r in enumerate(results):
        assert r["round_error"] <= 1e-6, (rank, r["round_error"])
        assert r["buffer_error"] <= 1e-6, (rank, r["buffer_error"])
        assert r["averaged_error"] <= 1e-6 and r["restored"] and r["still_nan"] == (rank == BAD)
        assert r["ensure_returned"] == (rank == BAD) and r["ensure_error"] <= 1e-6 and r["ensure_again"] is False
        assert r["reseeded"] == (rank == BAD) and r["count"] == 1, "every rank counts the re-seeded worker"
        got, want = r["distance_before"]
        assert got == pytest.approx(want, rel=1e-5), "the statistics are the healthy workers (fp32 norms)"
        # the first reduction finds the NaN in the shared sum; then M flags, the healthy reduction and the distances
        assert r["round_bytes"] == 2 * r["param_bytes"] + 8 * 3 + 16
        assert "DPPF round 1 (after optimizer step 0): worker(s) [2] of 3 hold NaN/Inf weights" in r["raise"]
        assert "nonfinite_policy='raise'" in r["raise"] and r["untouched"]
        assert "worker(s) [2] of 3 hold NaN/Inf weights" in r["raise_at_save"]
        assert "worker(s) [0, 1, 2] of 3" in r["all_bad"] and "no healthy worker is left" in r["all_bad"]


# ---------------------------------------------------------------------------------------------------- dead peers


def _peer_dies_between_rounds(rank: int, world_size: int, how: str) -> dict | None:
    engine = DPPFConsensus(OddModel(), DPPFConfig(timeout_s=3.0))
    engine.round()  # round 1 completes on both ranks
    if rank == 1:
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(15)  # "stuck": alive, but never joins round 2
        return None
    start = time.monotonic()
    message = _error(engine.round)
    return {"message": message, "seconds": time.monotonic() - start}


@pytest.mark.parametrize("how", ["killed", "stuck"])
def test_a_dead_or_stuck_peer_fails_the_round_within_the_timeout(how: str) -> None:
    result = run_distributed(_peer_dies_between_rounds, 2, how, dying=(1,))[0]
    assert "DPPF round 2 (after optimizer step 0) failed on rank 0 of 2" in result["message"]
    assert "3 s (DPPFConfig.timeout_s)" in result["message"]
    # a killed peer is noticed at once (connection reset); a stuck one after the 3 s timeout, not in 30 min
    assert result["seconds"] < 10, result["seconds"]
    if how == "stuck":
        assert result["seconds"] >= 2.9, result["seconds"]


# ---------------------------------------------------------------------------------------------------- Trainer: crashes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "crash_resume_run.py"


def _launch(output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    env = cpu_env(PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "0"]
    command += ["--master_port", str(free_port()), str(SCRIPT), str(output_dir), *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _weights(output_dir: Path, kind: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(output_dir / f"{kind}-rank{r}.safetensors") for r in range(2)]


def test_kill_9_at_any_point_then_resume_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert _launch(full).returncode == 0

    # rank 1 is killed while writing checkpoint-6: the half-written folder must not count as a checkpoint
    assert _launch(crashed, "--kill_while_saving", "6").returncode != 0
    assert (crashed / "tmp-checkpoint-6").is_dir() and not (crashed / "checkpoint-6").exists()
    assert get_last_checkpoint(str(crashed)).endswith("checkpoint-4")

    # resumed from checkpoint-4, rank 1 is killed again after step 7 (checkpoint-6 written in full this time)
    assert _launch(crashed, "--resume", "--kill_after_step", "7").returncode != 0
    assert (crashed / "checkpoint-6" / "dppf" / "rank1" / "model.safetensors").is_file()
    assert not (crashed / "tmp-checkpoint-6").exists() and not (crashed / "checkpoint-8").exists()

    done = _launch(crashed, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(crashed.glob("tmp-checkpoint-*")), "no staging folder is left behind"
    for kind in ("own", "final"):  # each worker's own weights before the final average, and the model produced
        for got, want in zip(_weights(crashed, kind), _weights(full, kind)):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), kind


# ---------------------------------------------------------------------------------------------------- Trainer: NaN


class PoisonRank1(TrainerCallback):
    """After optimizer step 2 (before the checkpoint of step 2 is written) rank 1's weights get a NaN."""

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step == 2 and args.process_index == 1:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")


def _nan_before_checkpoint(rank: int, world_size: int, tmp: str) -> dict:
    out: dict = {}
    run = dict(dppf=True, dppf_tau=10, max_steps=2, save_strategy="steps", save_steps=2)  # no round before the save
    trainer = DPPFTrainer(model=tiny_bert(seed=1), args=make_args(f"{tmp}/reseed", **run), train_dataset=toy_data())
    trainer.add_callback(PoisonRank1())
    trainer.train()
    worker = f"{tmp}/reseed/checkpoint-2/dppf/rank{{}}/"
    own = [load_file(worker.format(r) + "model.safetensors") for r in range(world_size)]
    out["finite"] = all(bool(torch.isfinite(t).all()) for w in own for t in w.values())
    out["rank1_is_rank0"] = all(torch.equal(own[0][k], own[1][k]) for k in own[0])  # the healthy average of one
    average = load_file(f"{tmp}/reseed/checkpoint-2/model.safetensors")
    out["average_finite"] = all(bool(torch.isfinite(t).all()) for t in average.values())
    state = torch.load(worker.format(rank) + "optimizer.pt", weights_only=True)["state"]
    out["optimizer_state_kept"] = len(state) > 0
    del trainer
    gc.collect()

    strict = DPPFTrainer(
        model=tiny_bert(seed=1),
        args=make_args(f"{tmp}/raise", dppf_nonfinite_policy="raise", **run),
        train_dataset=toy_data(),
    )
    strict.add_callback(PoisonRank1())
    out["raise"] = _error(strict.train)
    out["nothing_written"] = not os.path.exists(f"{tmp}/raise/checkpoint-2") and not os.path.exists(
        f"{tmp}/raise/tmp-checkpoint-2"
    )
    del strict
    gc.collect()
    return out


def test_no_nan_reaches_a_checkpoint(tmp_path: Path) -> None:
    for rank, out in enumerate(run_distributed(_nan_before_checkpoint, 2, str(tmp_path), init=False)):
        assert out["finite"] and out["average_finite"], "a checkpoint holds NaN"
        assert out["rank1_is_rank0"], "the NaN worker was not re-seeded from the healthy one"
        assert out["optimizer_state_kept"] == (rank == 0), "the re-seeded worker's optimizer state must be reset"
        assert "worker(s) [1] of 2 hold NaN/Inf weights" in out["raise"] and "nonfinite_policy='raise'" in out["raise"]
        assert out["nothing_written"]


# ---------------------------------------------------------------------------------------------------- untrusted files


def test_every_torch_load_is_weights_only() -> None:
    """Static audit: pickles run code, so every `torch.load` in the package, recipes and scripts is weights-only."""
    calls = []
    for path in [*REPO.glob("hf_dppf/**/*.py"), *REPO.glob("recipes/*.py"), *REPO.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "the audit found no torch.load at all: it is not looking at the code"
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["HF_DPPF_PWNED"],))


def test_a_tampered_checkpoint_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("HF_DPPF_PWNED", str(marker))
    run = dict(dppf=True, dppf_tau=2, max_steps=2, save_strategy="steps", save_steps=2, ddp_backend=None)  # 1 process
    DPPFTrainer(model=tiny_bert(seed=1), args=make_args(str(tmp_path), **run), train_dataset=toy_data()).train()
    checkpoint = tmp_path / "checkpoint-2"
    # a tampered checkpoint: the worker's optimizer file is a pickle that runs code when unpickled
    torch.save({"state": _Payload(), "param_groups": []}, checkpoint / "dppf" / "rank0" / "optimizer.pt")
    resumed = DPPFTrainer(
        model=tiny_bert(seed=1), args=make_args(str(tmp_path), **{**run, "max_steps": 4}), train_dataset=toy_data()
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists(), "unpickling ran the checkpoint's code"


def _float64_rounds(rank: int, world_size: int) -> float:
    """A float64 model (a dtype the wire keeps) through every path that reads the average: avg, averaged(), dppf."""
    model = OddModel().double()
    model.randomise(seed=30 + rank)
    before = gather_workers(_state(model), world_size)
    engine = DPPFConsensus(model, DPPFConfig(strategy="avg"))
    with engine.averaged():
        inside = _state(model)
    engine.round()
    mean = [torch.stack(ts).mean(0) for ts in zip(*before)]
    return max((g - e).abs().max().item() for got in (inside, _state(model)) for g, e in zip(got, mean))


def test_float64_parameters_are_averaged_in_float64() -> None:
    for error in run_distributed(_float64_rounds, 2):
        assert error <= 1e-12, error
