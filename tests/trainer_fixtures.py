"""Tiny Trainer fixtures shared by the Trainer tests and the crash/resume script: a BERT, toy data, arguments."""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_dppf import DPPFTrainingArguments

N_SAMPLES = 48  # 2 workers x 4 per micro-batch x 2 micro-batches per step: 3 optimizer steps per epoch


def tiny_bert(seed: int, vocab_size: int = N_SAMPLES + 16, num_labels: int = 3) -> BertForSequenceClassification:
    """A 2-layer, 16-wide BERT classifier with dropout on, so that the RNG state matters for an exact resume."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def toy_data() -> Any:
    """Token 0 of sample i is i, so the training inputs tell which samples each worker read."""
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, N_SAMPLES + 16, (N_SAMPLES, 8), generator=g)
    ids[:, 0] = torch.arange(N_SAMPLES)
    labels = ids[:, 1] % 3
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def make_args(output_dir: str, **overrides: Any) -> DPPFTrainingArguments:
    values = dict(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        max_steps=5,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return DPPFTrainingArguments(**values)
