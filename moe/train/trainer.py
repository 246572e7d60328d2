"""The training loop: data -> model -> loss -> AdamW, with evaluation, checkpoints, metrics.

Loss = LM cross-entropy + ``aux_loss_coef`` x (sum of MoE layers' load-balancing losses)
+ ``z_loss_coef`` x (sum of router z-losses). Gradient accumulation is derived:
``global_batch_size / (micro_batch_size x processes)`` micro-batches per optimizer step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from moe.model import MoETransformer
from moe.model.config import MOE_WEIGHT_SHAPE_FIELDS, WEIGHT_SHAPE_FIELDS

from .batches import PackedSequences, Sampler
from .checkpoint import (
    CheckpointError,
    complete_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    read_config,
    save_checkpoint,
    verify_checkpoint,
)
from .config import ConfigError, RunConfig
from .data import build_data
from .distributed import World, setup_world, shard_model
from .engine import build_engine
from .faults import CollapseDetector, NonFiniteGuard, Preempted, PreemptionFlag
from .metrics import MetricsLog, truncate_metrics
from .micro_batch import GPU_TOKEN_BUDGET, rank_share, resolve_micro_batch
from .optim import learning_rate, set_learning_rate

BALANCE_FILE = "expert_loads.json"  # the last step's global expert loads, for resume


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(model: MoETransformer, inputs, targets, cfg: RunConfig, device, expert_loads=None):
    with autocast(cfg, device):
        out = model(inputs.to(device), expert_loads)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.to(device).flatten())
    return ce, out


@torch.no_grad()
def evaluate(
    model: MoETransformer, val: PackedSequences, cfg: RunConfig, device, world: World | None = None
) -> float:
    """Mean LM loss over the first ``eval.batches`` global micro-batches of the validation
    split (each rank evaluates its share; the same sequences whatever the layout)."""
    world = world or World()
    was_training = model.training
    model.eval()
    mb = cfg.train.micro_batch_size * world.size
    total, count = 0.0, 0
    for b in range(cfg.eval.batches):
        indices = world.my_rows(torch.arange(b * mb, (b + 1) * mb) % val.count)
        ce, _ = lm_loss(model, *val.batch(indices), cfg, device)
        total += ce.item() * len(indices)
        count += len(indices)
    model.train(was_training)
    total, count = world.sum([total, count])
    return total / count


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.world = setup_world(
            cfg.parallel.ep, cfg.model.moe.num_experts, self.device, cfg.parallel.engine
        )
        t = cfg.train
        rank_share(t.global_batch_size, self.world.size)  # fail before the data is built
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)

        self.data = build_data(cfg.data, t.seq_len)
        vocab = self.data.tokenizer.get_vocab_size()
        # model.vocab_size always follows the tokenizer.
        model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
        self.cfg = cfg = dataclasses.replace(cfg, model=model_cfg)
        self.model = shard_model(MoETransformer(cfg.model), self.world).to(self.device)
        self.model.set_checkpointing(t.checkpointing)
        micro = self._micro_batch()
        self.cfg = cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(t, micro_batch_size=micro)
        )
        t = cfg.train
        self.accumulation = t.global_batch_size // (micro * self.world.size)
        self.engine = build_engine(self.model, cfg, self.world, self.accumulation)
        self.sampler = Sampler(self.data.train.count, cfg.seed)
        self.step, self.position = 0, 0
        # Global load balancing takes the expert frequencies of the last optimizer step's
        # global batch (known before any micro-batch of this step runs, so the objective
        # does not depend on the split); the first step balances against uniform loads.
        moe_layers = sum(block.is_moe for block in self.model.blocks)
        self.step_loads = [torch.ones(cfg.model.moe.num_experts)] * moe_layers
        self.resumed_from = self._resume()
        if self.resumed_from is not None and self.world.main:  # those steps run again
            truncate_metrics(run_dir, self.step)
        self.nonfinite = NonFiniteGuard(t.max_nonfinite_steps)
        self.collapse = CollapseDetector(t.collapse_threshold, t.collapse_steps)
        self.preemption = PreemptionFlag()
        self.metrics = MetricsLog(
            run_dir, cfg.logger.wandb, dataclasses.asdict(cfg), enabled=self.world.main
        )

    def _micro_batch(self) -> int:
        """``train.micro_batch_size`` resolved (``auto``: see ``micro_batch.py``)."""
        t, world = self.cfg.train, self.world
        if self.device.type != "cuda":
            return resolve_micro_batch(
                t.micro_batch_size, t.global_batch_size, world.size, t.seq_len
            )
        if world.size > 1:
            return resolve_micro_batch(
                t.micro_batch_size, t.global_batch_size, world.size, t.seq_len, GPU_TOKEN_BUDGET
            )
        return resolve_micro_batch(
            t.micro_batch_size, t.global_batch_size, 1, t.seq_len, fits=self._fits
        )

    def _fits(self, sequences: int) -> bool:
        """Trial forward and backward of ``sequences`` training sequences; leaves the
        weights, gradients and random state as they were."""
        batch = self.data.train.batch(torch.arange(sequences) % self.data.train.count)
        try:
            with torch.random.fork_rng(devices=[self.device]):
                ce, out = lm_loss(self.model, *batch, self.cfg, self.device)
                (ce + out.aux_loss + out.z_loss).backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            self.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    def _resume(self) -> Path | None:
        choice = self.cfg.resume
        if choice == "none":
            return None
        if choice == "auto":
            path = newest_good_checkpoint(self.run_dir)
            if path is None:
                return None
        else:
            path = Path(choice)
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                raise ConfigError(f"resume={choice}: {err}") from None
        self._check_compatible(path)
        progress = load_checkpoint(path, self.model, self.engine, self.world)
        if (path / BALANCE_FILE).exists():  # checkpoints before global balancing lack it
            loads = json.loads((path / BALANCE_FILE).read_text())
            self.step_loads = [torch.tensor(load) for load in loads]
        self.step, self.position = progress["step"], progress["data_position"]
        return path

    def _check_compatible(self, path: Path) -> None:
        """Refuse a checkpoint of another model shape before loading anything from it."""
        stored = read_config(path)["model"]
        current = dataclasses.asdict(self.cfg.model)
        for key in WEIGHT_SHAPE_FIELDS:
            if stored.get(key) != current[key]:
                raise ConfigError(
                    f"checkpoint {path} has model.{key}={stored.get(key)}, this "
                    f"run model.{key}={current[key]}; resume with a matching model"
                )
        for key in MOE_WEIGHT_SHAPE_FIELDS:
            if stored["moe"].get(key) != current["moe"][key]:
                raise ConfigError(
                    f"checkpoint {path} has model.moe.{key}={stored['moe'].get(key)}, this run "
                    f"model.moe.{key}={current['moe'][key]}; resume with a matching model"
                )

    def _save(self) -> Path:
        files = {
            "config.json": json.dumps(dataclasses.asdict(self.cfg), indent=1),
            "tokenizer.json": self.data.tokenizer.to_str(),
            BALANCE_FILE: json.dumps([load.tolist() for load in self.step_loads]),
        }
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.engine,
            self.position,
            files,
            self.cfg.checkpoint.keep,
            self.world,
        )

    def train_step(self) -> tuple[dict, list[torch.Tensor] | None]:
        """One optimizer step over one global batch: its metrics and per-layer expert loads."""
        cfg, t = self.cfg, self.cfg.train
        lr = learning_rate(self.step, t.max_steps, cfg.optim)
        set_learning_rate(self.engine.optimizer, lr)
        indices = self.sampler.indices(self.position, t.global_batch_size)
        self.position += t.global_batch_size
        sums = {
            "loss": 0.0,
            "lm_loss": 0.0,
            "aux_loss": 0.0,
            "z_loss": 0.0,
            "dropped_fraction": 0.0,
            "router_entropy": 0.0,
        }
        loads = None
        step_loads = [load.to(self.device) for load in self.step_loads]
        for micro in indices.split(t.micro_batch_size * self.world.size):
            mine = self.world.my_rows(micro)
            batch = self.data.train.batch(mine)
            ce, out = lm_loss(self.engine.forward_model, *batch, cfg, self.device, step_loads)
            loss = ce + t.aux_loss_coef * out.aux_loss + t.z_loss_coef * out.z_loss
            self.engine.backward(loss)
            sums["loss"] += loss.item()
            sums["lm_loss"] += ce.item()
            sums["aux_loss"] += out.aux_loss.item()
            sums["z_loss"] += out.z_loss.item()
            if out.moe:
                layers = len(out.moe)
                sums["dropped_fraction"] += sum(a.dropped_fraction.item() for a in out.moe) / layers
                sums["router_entropy"] += sum(a.entropy.item() for a in out.moe) / layers
                micro_loads = [a.routed_E.detach().cpu() for a in out.moe]
                loads = (
                    micro_loads
                    if loads is None
                    else [a + b for a, b in zip(loads, micro_loads, strict=True)]
                )
        # Every rank must agree on what it logs and whether it updates: average over ranks.
        totals = self.world.sum(list(sums.values()))
        sums = {k: v / self.world.size for k, v in zip(sums, totals, strict=True)}
        if loads is not None and self.world.size > 1:
            stacked = torch.stack(loads)
            dist.all_reduce(stacked)
            loads = list(stacked)
        grad_norm, updated = self.engine.step(self.nonfinite, sums["loss"], self.step + 1)
        if loads is not None:
            self.step_loads = loads
        if updated and loads is not None:
            self._update_expert_biases(loads)
        self.step += 1
        record = {
            "step": self.step,
            **{k: v / self.accumulation for k, v in sums.items()},
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": self.nonfinite.skipped,
        }
        if loads is not None:
            record["max_expert_load"] = max((l.max() / l.float().mean()).item() for l in loads)
            tokens = t.global_batch_size * t.seq_len
            for message in self.collapse.update(loads, tokens, self.step):
                if self.world.main:
                    tqdm.write(f"warning: {message}")
                record["router_collapse"] = 1
        return record, loads

    def _update_expert_biases(self, loads: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing: nudge each router's bias by this step's expert loads."""
        moe_blocks = [b for b in self.model.blocks if b.is_moe]
        for block, load in zip(moe_blocks, loads, strict=True):
            if block.ffn.router.expert_bias_E is not None:
                block.ffn.router.update_expert_bias(
                    load.to(self.device), self.cfg.train.expert_bias_rate
                )

    def train(self) -> dict:
        """Train to ``train.max_steps``; returns the run summary (also ``summary.json``).

        Raises ``Preempted`` after checkpointing when SIGTERM/SIGUSR1 arrives, and
        ``NumericalFault`` after too many non-finite steps in a row.
        """
        cfg, t = self.cfg, self.cfg.train
        counts = self.model.parameter_counts()
        tokens_per_step = t.global_batch_size * t.seq_len
        flops_per_token = self.model.flops_per_token(t.seq_len)
        if self.world.main:
            tqdm.write(
                f"moe-train: {self.world.size} process(es), parallel.ep={cfg.parallel.ep}, "
                f"micro-batch {t.micro_batch_size} per rank x {self.accumulation} accumulation "
                f"= global batch {t.global_batch_size}; run dir {self.run_dir}"
            )
        first_val = None
        if self.resumed_from is None:  # a resumed run already logged its earlier evaluations
            first_val = evaluate(self.model, self.data.val, cfg, self.device, self.world)
            self.metrics.write({"step": self.step, "split": "val", "loss": first_val})
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (cfg.logger.progress_bar and self.world.main),
            dynamic_ncols=True,
        )
        last_val, record, started, steps_done = first_val, {}, time.perf_counter(), 0
        self.preemption.install()
        try:
            while self.step < t.max_steps:
                tick = time.perf_counter()
                record, loads = self.train_step()
                seconds = time.perf_counter() - tick
                steps_done += 1
                record["tokens_per_s"] = tokens_per_step / seconds
                record["tflops"] = flops_per_token * tokens_per_step / seconds / 1e12
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    lr=f"{record['lr']:.2e}",
                )
                last = self.step == t.max_steps
                signalled = self.world.any(self.preemption.signum is not None)
                stopping = signalled and not last
                if self.step % t.log_every == 0 or last or stopping:
                    self.metrics.write(record, loads)
                if self.step % cfg.eval.every == 0 or last:
                    last_val = evaluate(self.model, self.data.val, cfg, self.device, self.world)
                    self.metrics.write({"step": self.step, "split": "val", "loss": last_val})
                    if self.world.main:
                        bar.write(f"step {self.step}: val loss {last_val:.4f}")
                if self.step % cfg.checkpoint.every == 0 or last or stopping:
                    saved = self._save()
                if stopping:
                    signum = self.preemption.signum or signal.SIGTERM  # another rank's signal
                    raise Preempted(signum, self.step, saved)
        finally:
            self.preemption.restore()
            bar.close()
        elapsed = time.perf_counter() - started
        found = complete_checkpoints(self.run_dir)
        summary = {
            "steps": self.step,
            "steps_this_run": steps_done,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "train_loss": record.get("loss"),
            "val_loss_start": first_val,
            "val_loss": last_val,
            "tokens_per_s": steps_done * tokens_per_step / elapsed if steps_done else None,
            "skipped_steps": self.nonfinite.skipped,
            "micro_batch_size": t.micro_batch_size,
            "accumulation": self.accumulation,
            "params_total": counts["total"],
            "params_active": counts["active"],
            "flops_per_token": flops_per_token,
            "seconds": elapsed,
            "checkpoint": str(found[-1]) if found else None,
            "run_dir": str(self.run_dir),
        }
        if self.world.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.metrics.summary(summary)
        return summary

    def close(self, together: bool = True) -> None:
        """``together``: all ranks reached this point (a finished run, or a stop they
        agreed on), so they leave the process group together."""
        self.metrics.close()
        self.world.close(together)
