"""
The Trainer's push follows the learning rate: with a linear-decay schedule each round's logged `dppf/lam` is
`alpha * width * ||x_A|| * lr_t / lr_0`, `lr_t` being the learning rate of the optimizer step that completes the round
(the Trainer's `on_optimizer_step` runs before the scheduler's step); with `lam_schedule="constant"` the factor is 1.
"""

from __future__ import annotations

import math

import pytest
from dist_utils import run_distributed
from trainer_fixtures import make_args, tiny_bert, toy_data

from hf_dppf import DPPFTrainer

ALPHA, WIDTH, TAU, STEPS, LR = 0.5, 0.05, 2, 12, 3e-3


def _logged_rounds(rank: int, world_size: int, out: str, schedule: str) -> list[dict]:
    args = make_args(
        out,
        dppf=True,
        dppf_tau=TAU,
        dppf_alpha=ALPHA,
        dppf_width=WIDTH,
        dppf_lam_schedule=schedule,
        learning_rate=LR,
        lr_scheduler_type="linear",
        max_steps=STEPS,
        logging_steps=TAU,  # one log right after each round: its statistics are the round's
        num_train_epochs=100,
    )
    trainer = DPPFTrainer(model=tiny_bert(seed=1), args=args, train_dataset=toy_data())
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return [entry for entry in trainer.state.log_history if "dppf/lam" in entry and "loss" in entry]  # not the summary


@pytest.mark.parametrize("schedule", ["lr", "constant"])
def test_trainer_round_lam_follows_the_learning_rate(schedule: str, tmp_path) -> None:
    logs = run_distributed(_logged_rounds, 2, str(tmp_path), schedule, init=False)[0]
    assert [entry["step"] for entry in logs] == list(range(TAU, STEPS + 1, TAU))
    for entry in logs:
        step = entry["step"]
        assert entry["dppf/rounds"] == step // TAU
        lr_t = LR * (1 - (step - 1) / STEPS)  # linear decay, no warmup: the step-th optimizer step's learning rate
        factor = lr_t / LR if schedule == "lr" else 1.0
        want = ALPHA * WIDTH * entry["dppf/average_norm"] * factor
        assert math.isclose(entry["dppf/lam"], want, rel_tol=1e-6), (step, entry["dppf/lam"], want)
    assert logs[-1]["dppf/lam"] < 0.3 * logs[0]["dppf/lam"] or schedule == "constant"
