"""
The Accelerate block's state and bookkeeping: `accelerator.save_state` / `load_state` resume every worker exactly
(new processes, new objects), steps a grad scaler skips on one rank still count on every rank, the statistics reach
the accelerator's trackers, and the push follows the learning rate (`lam_schedule="lr"`) by exactly `lr_t / lr_0`.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from hf_dppf import DPPF, DPPFConfig
from hf_dppf.engine import FINGERPRINT_BYTES

TOTAL = 8


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )  # dropout: the resumed run must also get each rank's RNG back


def batch(rank: int, step: int, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)  # every worker reads its own data
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
    if poison:
        x[0, 0] = float("inf")
    return x, y


def _setup(config: DPPFConfig, log_with: list | None = None, scaler: bool = False):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, log_with=log_with)
    if scaler:  # what Accelerator(mixed_precision="fp16") builds on a GPU; on CPU the test sets it by hand
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / (4 * TOTAL)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    dppf = DPPF(accelerator, model, optimizer, config)
    return accelerator, model, optimizer, scheduler, dppf


def _train(
    rank: int, world_size: int, config: DPPFConfig, steps: range, save_at: int | None, ckpt: str, load: bool
) -> dict:
    accelerator, model, optimizer, scheduler, dppf = _setup(config)
    with dppf:
        if load:
            accelerator.load_state(ckpt)
        for step in steps:
            x, y = batch(rank, step)
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            dppf.step()
            if step + 1 == save_at:
                accelerator.save_state(ckpt)
        # this worker's own weights and Adam moments, before the exit average (numpy: pickled by value)
        own = [p.detach().numpy().copy() for p in model.module.parameters()]
        moments = [s[k].numpy().copy() for s in optimizer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
        return {
            "params": own,
            "moments": moments,
            "rng": torch.get_rng_state().numpy(),
            "stats": (dppf.stats.steps, dppf.stats.rounds, dppf.stats.bytes_communicated, dppf.stats.mean_distance),
            "lr": optimizer.param_groups[0]["lr"],
        }


CONFIGS = {
    "constant": (DPPFConfig(tau=3, alpha=0.5, lam=0.05, lam_schedule="constant"), 4),
    "lr_schedule": (DPPFConfig(tau=3, alpha=0.5, width=0.05), 4),
    "overlapped": (DPPFConfig(tau=3, alpha=0.5, lam=0.05, overlap_steps=1), 3),  # launched at step 3, saved in flight
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_state_load_state_resumes_every_worker_exactly(name: str, tmp_path) -> None:
    config, save_at = CONFIGS[name]
    ckpt, scratch = str(tmp_path / "ckpt"), str(tmp_path / "scratch")
    # The reference saves at the same step (to another folder): saving lands an overlapped round in flight, so the
    # resumed run is compared with the run that saved and went on (for blocking rounds saving changes nothing).
    straight = run_distributed(_train, 2, config, range(TOTAL), save_at, scratch, False, init=False)
    run_distributed(_train, 2, config, range(save_at), save_at, ckpt, False, init=False)
    assert sorted(os.listdir(os.path.join(ckpt, "dppf"))) == ["rank0", "rank1"]
    assert os.path.isfile(os.path.join(ckpt, "dppf", "rank1", "model.safetensors"))
    resumed = run_distributed(_train, 2, config, range(save_at, TOTAL), None, ckpt, True, init=False)
    for rank in range(2):
        want, got = straight[rank], resumed[rank]
        for a, b in zip(want["params"] + want["moments"], got["params"] + got["moments"], strict=True):
            assert np.array_equal(a, b), f"rank {rank}: max diff {np.abs(a - b).max()}"
        assert np.array_equal(want["rng"], got["rng"]) and want["lr"] == got["lr"]
        (steps, rounds, sent, width), (steps2, rounds2, sent2, width2) = want["stats"], got["stats"]
        assert (steps, rounds, width) == (steps2, rounds2, width2), (want["stats"], got["stats"])
        assert sent2 == sent + FINGERPRINT_BYTES, "the same bytes, plus the check that every rank resumed alike"
    assert straight[0]["stats"][1] == 2 and not np.array_equal(straight[0]["params"][0], straight[1]["params"][0])
    if name == "constant":  # saving between blocking rounds does not perturb the run
        plain = run_distributed(_train, 2, config, range(TOTAL), None, scratch, False, init=False)
        assert all(np.array_equal(a, b) for a, b in zip(plain[1]["params"], straight[1]["params"], strict=True))


def _load_other_world(rank: int, world_size: int, ckpt: str) -> str:
    accelerator, *_, dppf = _setup(DPPFConfig(tau=3))
    with pytest.raises(ValueError) as err:
        with dppf:
            accelerator.load_state(ckpt)
    return str(err.value)


def test_load_state_with_another_number_of_processes_is_refused(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    config = DPPFConfig(tau=3)
    run_distributed(_train, 2, config, range(2), 2, ckpt, False, init=False)
    (message,) = run_distributed(_load_other_world, 1, ckpt, init=False)
    assert "written by 2 DPPF workers, this run has 1" in message
    messages = run_distributed(_load_other_world, 3, ckpt, init=False)
    assert "has no DPPF state for this rank" in messages[2]


def _scaler_skips_on_one_rank(rank: int, world_size: int, ckpt: str) -> dict:
    accelerator, model, optimizer, scheduler, dppf = _setup(DPPFConfig(tau=2, timeout_s=60), scaler=True)
    skipped, ran = [], []
    with dppf:
        for step in range(6):
            x, y = batch(rank, step, poison=rank == 1 and step == 2)  # one rank overflows alone
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            skipped.append(optimizer.step_was_skipped)
            ran.append(dppf.step())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        scale = accelerator.scaler.get_scale()  # rank 1 halved its scale at its overflow, rank 0 did not
        accelerator.save_state(ckpt)
        accelerator.scaler.update(1.0)
        # right after the save: the block's load hook waits for rank 0 to finish writing Accelerate's files; each rank
        # gets its own scaler back (Accelerate's scaler.pt is one rank's)
        accelerator.load_state(ckpt)
        return {
            "skipped": skipped,
            "ran": ran,
            "steps": dppf.stats.steps,
            "rounds": dppf.stats.rounds,
            "scales": (scale, accelerator.scaler.get_scale()),
        }


def test_a_step_the_scaler_skips_on_one_rank_counts_on_every_rank(tmp_path) -> None:
    results = run_distributed(_scaler_skips_on_one_rank, 2, str(tmp_path / "ckpt"), init=False)
    assert results[1]["skipped"] == [False, False, True, False, False, False]
    assert not any(results[0]["skipped"])
    for r in results:  # the same steps and rounds on both ranks; no hang (timeout_s and the harness's timeout)
        assert r["steps"] == 6 and r["rounds"] == 3 and r["ran"] == [False, True] * 3
    assert results[0]["scales"] == (2.0**10, 2.0**10) and results[1]["scales"] == (2.0**9, 2.0**9)


class RecordingTracker:
    """A tracker that keeps what it is given (no network, no files)."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self) -> None:
        self.calls: list[tuple[dict, int | None]] = []

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.calls.append((dict(values), step))

    def finish(self) -> None:
        pass


def _tracked(rank: int, world_size: int, config: DPPFConfig, log_every: int | None) -> dict:
    from accelerate.tracking import GeneralTracker

    tracker = type("Recording", (RecordingTracker, GeneralTracker), {})()
    accelerator, model, optimizer, scheduler, _ = _setup(config, log_with=[tracker])
    accelerator.init_trackers("dppf-test")
    lrs = []
    with DPPF(accelerator, model, optimizer, config, log_every=log_every) as dppf:
        for step in range(TOTAL):
            x, y = batch(rank, step)
            accelerator.backward(F.mse_loss(model(x), y))
            lrs.append(optimizer.param_groups[0]["lr"])  # the learning rate this optimizer step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            dppf.step()
    accelerator.end_training()
    return {"calls": tracker.calls, "lrs": lrs, "lr0": 0.01}


@pytest.mark.parametrize("schedule", ["lr", "constant"])
def test_round_stats_reach_the_trackers_and_the_push_follows_the_lr(schedule: str) -> None:
    alpha, width, tau = 0.5, 0.05, 2
    config = DPPFConfig(tau=tau, alpha=alpha, width=width, lam_schedule=schedule)
    main, other = run_distributed(_tracked, 2, config, None, init=False)
    assert other["calls"] == [], "trackers log on the main process only"
    calls, lrs = main["calls"], main["lrs"]
    assert [step for _, step in calls] == list(range(tau, TOTAL + 1, tau)), "one log per round, at its step"
    assert lrs[-1] < 0.8 * lrs[0], "the schedule decays enough for the test to tell the factor from 1"
    for values, step in calls:
        assert set(values) >= {"dppf/valley_width", "dppf/lam", "dppf/bytes", "dppf/average_norm", "dppf/rounds"}
        assert values["dppf/rounds"] == step // tau
        # lr_t: the learning rate of the optimizer step that completes the round (read before scheduler.step())
        factor = lrs[step - 1] / main["lr0"] if schedule == "lr" else 1.0
        want = alpha * width * values["dppf/average_norm"] * factor
        assert math.isclose(values["dppf/lam"], want, rel_tol=1e-6), (step, values["dppf/lam"], want)


def test_log_every_sets_the_logging_interval() -> None:
    main, _ = run_distributed(_tracked, 2, DPPFConfig(tau=3), 1, init=False)
    assert [step for _, step in main["calls"]] == list(range(1, TOTAL + 1))
    assert [values["dppf/rounds"] for values, _ in main["calls"]] == [0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="log_every=0"):
        DPPF(None, torch.nn.Linear(2, 2), None, DPPFConfig(), log_every=0)
