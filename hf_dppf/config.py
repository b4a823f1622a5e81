"""`DPPFConfig`: every knob of a DPPF run, validated once, in one place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .strategies import STRATEGIES

COMM_DTYPES = ("fp32", "bf16", "fp16")
LAM_SCHEDULES = ("lr", "constant")
NONFINITE_POLICIES = ("reseed", "raise")
PUSH_MODES = ("round", "step")

# Default push strength when neither `lam` nor `width` is given: a valley 1% of the average's norm wide.
# Measured at CPU scale (MNIST/digits, 4 workers) widths of 0.005 to 0.02 cost no accuracy; 0.05 does.
DEFAULT_WIDTH = 0.01
# EASGD's moving rate of the centre variable when `beta` is not given: the value Zhang, Choromanska & LeCun (2015)
# recommend. It does not depend on the number of workers, and the centre's distance to the average, which shrinks by
# |1 - alpha - beta| per round (with no training in between), contracts for every alpha in (0, 1].
DEFAULT_BETA = 0.9


def _bad(field: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"DPPFConfig.{field}={value!r} is invalid: {field} must be {valid}.")


@dataclass(kw_only=True)
class DPPFConfig:
    """
    Configuration of a DPPF (Distributed Pull-Push Force) run.

    Workers take `tau` local optimizer steps with no gradient synchronisation, then meet in a consensus round:
    with `x_A` the workers' average, `d_i = x_i - x_A` and `r_i = ||d_i||` (one global norm over all trainable
    parameters), each worker is pulled toward the average and pushed away from it,
    `x_i <- x_i - alpha * d_i + lam * d_i / r_i`, so that its distance settles at the valley width `lam / alpha`.

    Args:
        tau (`int`, defaults to 4):
            Local optimizer steps (not micro-batches) between two consensus rounds. 4 keeps the communication at a
            quarter of DDP's while staying close to it in accuracy; raise it on slow links.
        alpha (`float`, defaults to 0.5):
            Pull strength, `0 < alpha <= 1`. `1` moves every worker onto the average before the push (onto the centre
            for `easgd`, `lsgd` and `grawa`). 0.5 halves
            the distance each round, which keeps workers together without erasing their exploration.
        lam (`float`, *optional*):
            Push strength in parameter-norm units (`>= 0`). When given it wins over `width`. Its good value depends on
            the model's size, which is why the default is expressed with `width` instead.
        width (`float`, *optional*):
            Target valley width as a fraction of the average's norm (`>= 0`); each round uses
            `lam = alpha * width * ||x_A||`, so the workers settle at `width * ||x_A||` from their average. When
            neither `lam` nor `width` is given, `width` is 0.01 for `strategy="dppf"`.
        lam_schedule (`str`, defaults to `"lr"`):
            `"lr"` scales the push by `lr_t / lr_0` (the integrations pass it to `round()`), so the workers can still
            train the average point while the learning rate decays; `"constant"` keeps the push fixed.
        strategy (`str`, defaults to `"dppf"`):
            The consensus rule, one of `hf_dppf.strategies.STRATEGIES`: `"dppf"` (pull and push), `"avg"` (Local SGD:
            every worker is set to the average; `alpha` does not apply), and the baselines, which pull each worker
            toward a centre by `alpha` and do not push: `"easgd"` (a centre variable that follows the average by
            `beta`), `"lsgd"` (the worker with the lowest training loss since the last round) and `"grawa"` (the
            average weighted by 1 / (gradient norm + eps)). `lam` and `width` only apply to `"dppf"`.
        beta (`float`, *optional*):
            `strategy="easgd"` only: the moving rate of the centre variable, `z <- z + beta * (x_A - z)` each round,
            in (0, 1]. Defaults to 0.9 (the EASGD paper's choice; independent of the number of workers).
        warmup_steps (`int`, defaults to 0):
            During the first `warmup_steps` optimizer steps a round runs after every step (workers stay close
            while the learning rate is large and the loss falls fast); afterwards every `tau` steps.
        bucket_mb (`float`, defaults to 25.0):
            Size of the communication buckets in MiB. Parameters are packed into contiguous buckets and
            all-reduced asynchronously, bucket by bucket; 25 MiB is large enough to run at full bandwidth and small
            enough to overlap copying, communication and math.
        comm_dtype (`str`, defaults to `"fp32"`):
            Precision of the parameters on the wire: `"fp32"` (exact), `"bf16"` or `"fp16"` (half the bytes).
            float64 parameters always travel as float64.
        eps (`float`, defaults to 1e-12):
            The push is only applied when `r_i > eps`, so a worker sitting on the average (e.g. `M = 1`, or right
            after an averaging round) is not divided by zero. `strategy="grawa"` weighs worker i by
            `1 / (||g_i|| + eps)` and needs `eps > 0`.
        nonfinite_policy (`str`, defaults to `"reseed"`):
            What a round does when a worker's weights hold a NaN or Inf (detected from the round's own sums, at no
            extra cost while all are finite). `"reseed"`: the bad workers take the average of the healthy ones (and
            the integrations reset their optimizer state), the healthy ones do the round among themselves, and a
            warning names the workers; the run stops only if no worker is healthy. `"raise"`: every rank stops with
            a `RuntimeError` naming the workers. One diverged worker should not end a long run, hence the default.
        timeout_s (`float`, *optional*):
            Seconds to wait for one of the engine's collectives before every waiting rank fails with an error that
            names the round (e.g. a peer died or hangs). `None` keeps the process group's timeout (torch's default
            is 30 minutes; the Trainer's `--ddp_timeout`, Accelerate's `InitProcessGroupKwargs(timeout=...)`). Set it
            above your slowest round: a round of a 1 GB model over a 100 Mbit/s link takes about 3 minutes.
        overlap_steps (`int`, defaults to 0):
            `0`: a round blocks every worker until it is done. `k > 0` (overlapped, delayed rounds; `k < tau`): at a
            round boundary each worker snapshots its weights, starts the all-reduce in the background and keeps
            training; `k` optimizer steps later (or when the all-reduce completes, if later) it applies the round's
            correction computed from the snapshot, `x_i += round(snapshot)_i - snapshot_i`, so the local progress
            made meanwhile is kept. Costs one extra copy of the trainable weights (the snapshot). Rounds during
            warmup stay blocking. Only for the strategies that pull toward the plain average (`dppf`, `avg`).
        push_mode (`str`, defaults to `"round"`):
            Where the push is applied. `"round"`: at each consensus round, together with the pull. `"step"`: as the
            gradient of the relaxed Inverse-Mean-Valley regulariser at every local optimizer step, against the
            average `x_A` of the last round, `x_i <- x_i + (lr_t / lr_0) * (lam / tau) * (x_i - x_A) / ||x_i - x_A||`,
            and the round only pulls. Nothing more is sent; `x_A` is kept between rounds (one extra copy of the
            trainable weights, checkpointed). `strategy="dppf"` only, blocking rounds only (`overlap_steps=0`).
        replica_size (`int`, defaults to 1):
            Processes per worker (replica), `G`: the world is `G` x replicas and `G` neighbouring ranks form one
            replica (set it to the processes per machine). Inside a replica the gradients are averaged at every step
            (DDP over the replica; under DeepSpeed ZeRO shards and synchronises it); across replicas DPPF runs, its
            round sharded so that each process sends 1/G of the model. 1 (flat) makes every process a worker.
            `push_mode="step"` needs 1 without DeepSpeed.
    """

    tau: int = 4
    alpha: float = 0.5
    lam: float | None = None
    width: float | None = None
    lam_schedule: str = "lr"
    strategy: str = "dppf"
    beta: float | None = None
    warmup_steps: int = 0
    bucket_mb: float = 25.0
    comm_dtype: str = "fp32"
    eps: float = 1e-12
    nonfinite_policy: str = "reseed"
    timeout_s: float | None = None
    overlap_steps: int = 0
    push_mode: str = "round"
    replica_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise _bad("tau", self.tau, "an integer >= 1 (optimizer steps between rounds)")
        if not _is_real(self.alpha) or not 0.0 < self.alpha <= 1.0:
            raise _bad("alpha", self.alpha, "a number in (0, 1]")
        if self.lam is not None and (not _is_real(self.lam) or self.lam < 0):
            raise _bad("lam", self.lam, "None or a finite number >= 0")
        if self.width is not None and (not _is_real(self.width) or self.width < 0):
            raise _bad("width", self.width, "None or a finite number >= 0")
        if self.lam_schedule not in LAM_SCHEDULES:
            raise _bad("lam_schedule", self.lam_schedule, f"one of {list(LAM_SCHEDULES)}")
        if self.strategy not in STRATEGIES:
            raise _bad("strategy", self.strategy, f"one of {sorted(STRATEGIES)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise _bad("warmup_steps", self.warmup_steps, "an integer >= 0")
        if not _is_real(self.bucket_mb) or self.bucket_mb <= 0:
            raise _bad("bucket_mb", self.bucket_mb, "a finite number > 0 (MiB)")
        if self.comm_dtype not in COMM_DTYPES:
            raise _bad("comm_dtype", self.comm_dtype, f"one of {list(COMM_DTYPES)}")
        if not _is_real(self.eps) or self.eps < 0:
            raise _bad("eps", self.eps, "a finite number >= 0")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise _bad("nonfinite_policy", self.nonfinite_policy, f"one of {list(NONFINITE_POLICIES)}")
        if self.timeout_s is not None and (not _is_real(self.timeout_s) or self.timeout_s <= 0):
            raise _bad("timeout_s", self.timeout_s, "None or a finite number of seconds > 0")
        if isinstance(self.overlap_steps, bool) or not isinstance(self.overlap_steps, int) or self.overlap_steps < 0:
            raise _bad("overlap_steps", self.overlap_steps, "an integer >= 0 (0: blocking rounds)")
        if self.overlap_steps >= self.tau:
            raise _bad(
                "overlap_steps",
                self.overlap_steps,
                f"an integer in [0, tau - 1] = [0, {self.tau - 1}]: a round must land before the next one is due",
            )
        if self.overlap_steps and STRATEGIES[self.strategy].centre != "average":
            raise _bad(
                "overlap_steps",
                self.overlap_steps,
                f"0 with strategy={self.strategy!r}: overlapped rounds only apply to the strategies that pull toward "
                "the plain average ('dppf', 'avg')",
            )
        if self.push_mode not in PUSH_MODES:
            raise _bad("push_mode", self.push_mode, f"one of {list(PUSH_MODES)}")
        if self.push_mode == "step" and not STRATEGIES[self.strategy].pushes:
            raise _bad("push_mode", self.push_mode, f"'round' with strategy={self.strategy!r}, which does not push")
        if self.push_mode == "step" and self.overlap_steps:
            raise _bad(
                "push_mode",
                self.push_mode,
                f"'round' with overlap_steps={self.overlap_steps}: the step push needs the last round's average, "
                "which an overlapped round has not landed yet",
            )
        if isinstance(self.replica_size, bool) or not isinstance(self.replica_size, int) or self.replica_size < 1:
            raise _bad("replica_size", self.replica_size, "an integer >= 1 (processes per replica)")
        if not STRATEGIES[self.strategy].pushes and (self.lam or self.width):
            raise ValueError(
                f"DPPFConfig: strategy={self.strategy!r} does not push, so lam={self.lam!r} / width={self.width!r} "
                "would be ignored; use strategy='dppf' or leave lam and width unset."
            )
        if self.beta is not None:
            if not _is_real(self.beta) or not 0.0 < self.beta <= 1.0:
                raise _bad("beta", self.beta, "None or a number in (0, 1]")
            if STRATEGIES[self.strategy].centre != "elastic":
                raise ValueError(
                    f"DPPFConfig: beta={self.beta!r} is the moving rate of easgd's centre variable and would be "
                    f"ignored by strategy={self.strategy!r}; use strategy='easgd' or leave beta unset."
                )
        if "grad_norm" in STRATEGIES[self.strategy].needs and self.eps <= 0:
            raise _bad("eps", self.eps, f"a finite number > 0 with strategy={self.strategy!r} (weights 1/(||g||+eps))")

    @property
    def push_width(self) -> float | None:
        """The relative valley width in force (`None` when an absolute `lam` is set or the strategy does not push)."""
        if not STRATEGIES[self.strategy].pushes or self.lam is not None:
            return None
        return DEFAULT_WIDTH if self.width is None else self.width

    def push_strength(self, average_norm: float, push_scale: float = 1.0) -> float:
        """
        The `lam` of one round: the explicit `lam`, or `alpha * width * ||x_A||`, times `push_scale`.

        Args:
            average_norm (`float`): `||x_A||`, the global L2 norm of the workers' average.
            push_scale (`float`, defaults to 1.0): the schedule's factor (`lr_t / lr_0` for `lam_schedule="lr"`).
        """
        if not STRATEGIES[self.strategy].pushes:
            return 0.0
        base = self.lam if self.lam is not None else self.alpha * self.push_width * average_norm
        return base * push_scale

    @property
    def moving_rate(self) -> float:
        """easgd's `beta` in force: the given one or `DEFAULT_BETA`."""
        return DEFAULT_BETA if self.beta is None else self.beta

    @property
    def pushes_at_round(self) -> bool:
        """Whether the round applies the push (`push_mode="round"` with a pushing strategy)."""
        return STRATEGIES[self.strategy].pushes and self.push_mode == "round"

    def round_due(self, step: int) -> bool:
        """Whether a consensus round follows optimizer step number `step` (1-based)."""
        if step <= self.warmup_steps:
            return True
        return (step - self.warmup_steps) % self.tau == 0

    def overlapped(self, step: int) -> bool:
        """Whether the round after optimizer step `step` runs in the background (`overlap_steps > 0`, past warmup)."""
        return self.overlap_steps > 0 and step > self.warmup_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DPPFConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DPPFConfig got unknown fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**values)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
