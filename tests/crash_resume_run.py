"""
A 2-process DPPFTrainer run for the crash tests, launched by torchrun: `python -m torch.distributed.run
--nproc_per_node 2 tests/crash_resume_run.py OUTPUT_DIR [--resume] [--kill_after_step N] [--kill_while_saving N]`.

Rank 1 kills itself with SIGKILL after optimizer step N, or while writing its own weights into the checkpoint of step
N. At the end every rank writes `own-rank{r}.safetensors` (its own weights right before the final average) and
`final-rank{r}.safetensors` (the model the run produces) into OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal

import torch.distributed as dist
from safetensors.torch import save_file
from trainer_fixtures import make_args, tiny_bert, toy_data
from transformers import TrainerCallback

import hf_dppf.integrations.common
from hf_dppf import DPPFTrainer

RUN = dict(dppf=True, dppf_tau=3, max_steps=8, logging_steps=1, save_strategy="steps", save_steps=2)


def weights(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


class Crash(TrainerCallback):
    """Kills rank 1 after step `kill_after_step`; records every rank's own weights before the final average."""

    def __init__(self, output_dir: str, kill_after_step: int | None) -> None:
        self.output_dir, self.kill_after_step = output_dir, kill_after_step
        self.trainer: DPPFTrainer | None = None

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.kill_after_step and args.process_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:  # runs before DPPF's final average
        save_file(weights(model), os.path.join(self.output_dir, f"own-rank{args.process_index}.safetensors"))


def kill_while_saving(step: int) -> None:
    """Rank 1 dies in the middle of writing the checkpoint of `step` (after the averaged model, before its own)."""
    save = hf_dppf.integrations.common.save_model  # what writes a worker's own weights

    def dying_save(model, filename: str, *args, **kwargs):
        if f"checkpoint-{step}" in filename and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(model, filename, *args, **kwargs)

    hf_dppf.integrations.common.save_model = dying_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true", help="resume_from_checkpoint=True")
    parser.add_argument("--kill_after_step", type=int, default=None)
    parser.add_argument("--kill_while_saving", type=int, default=None)
    args = parser.parse_args()
    if args.kill_while_saving is not None:
        kill_while_saving(args.kill_while_saving)
    crash = Crash(args.output_dir, args.kill_after_step)
    trainer = DPPFTrainer(
        model=tiny_bert(seed=1),
        args=make_args(args.output_dir, ddp_timeout=60, **RUN),
        train_dataset=toy_data(),
        callbacks=[crash],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    save_file(
        weights(trainer.model), os.path.join(args.output_dir, f"final-rank{trainer.args.process_index}.safetensors")
    )
    del trainer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
