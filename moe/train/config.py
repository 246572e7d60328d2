"""The run's configuration as typed dataclasses, validated before anything heavy starts.

Hydra composes a ``DictConfig``; ``RunConfig.from_dict`` turns it into these dataclasses,
rejecting unknown keys and bad values with one line that names the key. The model and the
trainer never see a ``DictConfig``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe.data import DataSection
from moe.layers import MoEConfig
from moe.model import CHECKPOINTING, ModelConfig
from moe.typed_config import ConfigError, from_dict


@dataclass
class TrainSection:
    """max_steps: optimizer steps. global_batch_size: sequences per optimizer step, all ranks
    together. micro_batch_size: sequences per rank per forward, or ``auto`` (the largest that
    divides the rank's share and fits; see ``moe/train/micro_batch.py``); accumulation is
    derived and the losses do not depend on it.
    seq_len: tokens per sequence. deterministic: deterministic kernels and a seeded data order
    (bitwise-reproducible on the CPU). dtype: float32, or bfloat16 autocast.
    checkpointing: activation checkpointing none/full/moe. compile: torch.compile each
    transformer block (``moe/train/compile.py``): true, false, or auto (on CUDA; an error
    while compiling then falls back to eager).
    aux_loss_coef / z_loss_coef: weights of the MoE losses in the total loss.
    grad_clip: max global gradient norm (<= 0: off). log_every: steps between log lines.
    expert_bias_rate: step size of the aux-loss-free expert bias update (used when
    ``model.moe.expert_bias`` is true). max_nonfinite_steps: consecutive steps with a
    non-finite loss or gradient norm (each skipped) before the run stops.
    collapse_threshold / collapse_steps: warn when one expert takes more than this share of
    a layer's tokens for this many consecutive steps."""

    max_steps: int = 800
    global_batch_size: int = 16
    micro_batch_size: int | str = "auto"
    seq_len: int = 128
    deterministic: bool = False
    dtype: str = "float32"
    checkpointing: str = "none"
    compile: bool | str = "auto"
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.001
    grad_clip: float = 1.0
    log_every: int = 10
    expert_bias_rate: float = 1e-3
    max_nonfinite_steps: int = 5
    collapse_threshold: float = 0.9
    collapse_steps: int = 50

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "global_batch_size",
            "seq_len",
            "log_every",
            "max_nonfinite_steps",
            "collapse_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto":
            raise ConfigError(
                f"train.micro_batch_size must be auto or a number, got {self.micro_batch_size!r}"
            )
        if isinstance(self.micro_batch_size, int) and self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.checkpointing not in CHECKPOINTING:
            raise ConfigError(f"train.checkpointing must be one of {CHECKPOINTING}")
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ConfigError(f"train.compile must be true, false or auto, got {self.compile!r}")
        if not 0 < self.collapse_threshold <= 1:
            raise ConfigError("train.collapse_threshold must be in (0, 1]")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError("train.aux_loss_coef and train.z_loss_coef must be >= 0")


@dataclass
class OptimSection:
    """AdamW with a linear warmup over ``warmup_steps`` (runs shorter than that never reach
    ``lr``; lower it for them) then cosine decay to ``lr * min_lr_ratio``. No weight decay on
    norms, biases and embeddings. Expert weights use ``lr * expert_lr_scale``."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    expert_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.expert_lr_scale <= 0:
            raise ConfigError("optim.warmup_steps/weight_decay must be >= 0, expert_lr_scale > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")


@dataclass
class EvalSection:
    """every: steps between validation passes (and one at the end). batches: batches of
    ``train.micro_batch_size`` sequences (per rank) per pass, the sequences spread evenly
    over the whole validation split."""

    every: int = 100
    batches: int = 8

    def __post_init__(self) -> None:
        if self.every < 1 or self.batches < 1:
            raise ConfigError("eval.every and eval.batches must be >= 1")


@dataclass
class CheckpointSection:
    """every: steps between checkpoints (one is always written at the end). keep: how many
    of the newest checkpoints to keep."""

    every: int = 200
    keep: int = 2

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")


WANDB_MODES = ("offline", "online", "disabled")
# wandb's own older spellings of the modes, as its environment variable may hold them.
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


@dataclass
class WandbSection:
    """Weights & Biases. A key left null takes the standard environment variable, then the
    default: mode <- ``WANDB_MODE``, else offline (sync later with ``wandb sync``); project
    <- ``WANDB_PROJECT``, else moe-train; entity <- ``WANDB_ENTITY``; group <-
    ``WANDB_RUN_GROUP``, else (in a sweep) the sweep directory's name; dir <- ``WANDB_DIR``,
    else the run directory. A key set in the config wins over the environment."""

    mode: str | None = None
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError(
                f"logger.wandb.mode must be offline, online or disabled, got {self.mode!r}"
            )

    def resolved(self, environ: Mapping[str, str]) -> WandbSection:
        """Null keys filled from the environment (then the defaults)."""
        mode = self.mode or environ.get("WANDB_MODE") or "offline"
        mode = WANDB_MODE_ALIASES.get(mode, mode)
        if mode not in WANDB_MODES:
            raise ConfigError(
                f"WANDB_MODE={mode!r} is not offline, online or disabled; fix the environment "
                "variable or set logger.wandb.mode"
            )
        return WandbSection(
            mode=mode,
            project=self.project or environ.get("WANDB_PROJECT") or "moe-train",
            entity=self.entity or environ.get("WANDB_ENTITY"),
            group=self.group or environ.get("WANDB_RUN_GROUP"),
            name=self.name,
            dir=self.dir or environ.get("WANDB_DIR"),
        )


@dataclass
class LoggerSection:
    wandb: WandbSection = field(default_factory=WandbSection)
    progress_bar: bool = True


@dataclass
class ParallelSection:
    """ep: expert-parallel degree: each MoE layer's experts are split over ``ep`` ranks
    (it must divide the number of processes and ``model.moe.num_experts``); the world is
    data-parallel over the rest. engine: ``native`` (our gradient sync, torch AdamW) or
    ``deepspeed`` (DeepSpeed ZeRO with expert parameters in DeepSpeed's MoE groups; needs the
    ``bench`` extra). zero_stage: the ZeRO stage under ``engine=deepspeed`` (1 or 2)."""

    ep: int = 1
    engine: str = "native"
    zero_stage: int = 2

    def __post_init__(self) -> None:
        if self.ep < 1:
            raise ConfigError(f"parallel.ep must be >= 1, got {self.ep}")
        if self.engine not in ("native", "deepspeed"):
            raise ConfigError(f"parallel.engine must be native or deepspeed, got {self.engine!r}")
        if self.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: pip install deepspeed")
        if self.zero_stage not in (1, 2):
            raise ConfigError(
                f"parallel.zero_stage must be 1 or 2 (used with parallel.engine=deepspeed), "
                f"got {self.zero_stage}"
            )


@dataclass
class RunConfig:
    """seed: seeds weights, data order and router jitter. resume: ``none``, ``auto`` (newest
    complete checkpoint of the run directory) or a checkpoint path. init_from: ``none``, or
    a Hugging Face model directory of a supported family or one of our checkpoints / run
    directories whose weights, model shape and tokenizer a new run starts from (step 0,
    fresh optimizer; ``moe/train/init_from.py``). device: auto, cpu or cuda."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logger: LoggerSection = field(default_factory=LoggerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    seed: int = 0
    resume: str = "none"
    init_from: str = "none"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        if self.train.compile is True and self.parallel.engine != "native":
            raise ConfigError("train.compile=true works with parallel.engine=native only")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        return from_dict(cls, values)


__all__ = ["ConfigError", "DataSection", "MoEConfig", "ModelConfig", "RunConfig"]
