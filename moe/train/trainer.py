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
from pathlib import Path

import torch
from tqdm import tqdm

from moe.checkpoint import (
    CheckpointError,
    check_compatible,
    complete_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_text_atomic,
)
from moe.data import Sampler, build_data
from moe.data.chat import template_files
from moe.parallel.world import pick_device, setup_world
from moe.typed_config import ConfigError

from . import balance
from .balance import StepLoads, update_expert_biases
from .config import RunConfig
from .engine import build_engine
from .evaluate import evaluate
from .faults import CollapseDetector, NonFiniteGuard, Preempted, PreemptionFlag
from .host_memory import keep_freed_host_memory
from .init_from import build_run_model, read_source, run_model_config
from .loss import lm_loss
from .metrics import MetricsLog, StepStats, truncate_metrics
from .micro_batch import choose_micro_batch, rank_share
from .optim import learning_rate, set_learning_rate


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, loss_fn=lm_loss):
        """``loss_fn``: the LM loss of a micro-batch (``loss.lm_loss``; tests inject faults
        through it)."""
        self.cfg, self.run_dir, self.loss_fn = cfg, run_dir, loss_fn
        run_dir.mkdir(parents=True, exist_ok=True)
        self.source = read_source(cfg.init_from) if cfg.init_from != "none" else None
        if self.source is not None:  # its shape decides the layout check below
            cfg = dataclasses.replace(cfg, model=run_model_config(self.source, cfg.model, 0))
        self.device = pick_device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_host_memory()  # expert gradients are new every step: host_memory.py
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

        source = self.source
        self.data = build_data(
            cfg.data,
            t.seq_len,
            source.tokenizer if source else None,
            source.path if source else None,
        )
        vocab = self.data.tokenizer.get_vocab_size()
        if source is not None:
            model_cfg = run_model_config(source, cfg.model, vocab)
        else:  # model.vocab_size follows the tokenizer
            model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
        self.cfg = cfg = dataclasses.replace(cfg, model=model_cfg)
        self.model = build_run_model(cfg.model, source, self.world, self.device)
        self.model.set_checkpointing(t.checkpointing)
        micro = choose_micro_batch(t, self.world.size, self.device, self._trial_step)
        self.cfg = cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(t, micro_batch_size=micro)
        )
        t = cfg.train
        self.accumulation = t.global_batch_size // (micro * self.world.size)
        self.engine = build_engine(self.model, cfg, self.world, self.accumulation)
        self.sampler = Sampler(self.data.train.count, cfg.seed)
        self.step, self.position = 0, 0
        moe_layers = sum(block.is_moe for block in self.model.blocks)
        self.step_loads = StepLoads(moe_layers, cfg.model.moe.num_experts)
        self.resumed_from = self._resume()
        if self.resumed_from is not None and self.world.main:  # those steps run again
            truncate_metrics(run_dir, self.step)
        self.nonfinite = NonFiniteGuard(t.max_nonfinite_steps)
        self.collapse = CollapseDetector(t.collapse_threshold, t.collapse_steps)
        self.preemption = PreemptionFlag()
        self.metrics = MetricsLog(
            run_dir, cfg.logger.wandb, dataclasses.asdict(cfg), enabled=self.world.main
        )

    def _trial_step(self, sequences: int) -> None:
        """Forward and backward of ``sequences`` training sequences, gradients dropped (to
        find the micro-batch that fits)."""
        batch = self.data.train.batch(torch.arange(sequences) % self.data.train.count)
        try:
            ce, out = lm_loss(self.model, *batch, self.cfg, self.device)
            (ce + out.aux_loss + out.z_loss).backward()
        finally:
            self.model.zero_grad(set_to_none=True)

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
        check_compatible(path, self.cfg.model)
        progress = load_checkpoint(path, self.model, self.engine, self.world)
        self.step_loads.restore(path)
        self.step, self.position = progress["step"], progress["data_position"]
        return path

    def _save(self) -> Path:
        files = {
            "config.json": json.dumps(dataclasses.asdict(self.cfg), indent=1),
            "tokenizer.json": self.data.tokenizer.to_str(),
            balance.FILE: self.step_loads.to_json(),
        }
        if self.data.chat_template is not None:
            files.update(template_files(self.data.chat_template))
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
        stats = StepStats()
        step_loads = self.step_loads.on(self.device)
        trained = self.data.train.trained_targets(indices)
        share = None  # text: every target trained, each micro-batch takes its own mean
        if self.data.train.trained is not None:  # chat: one mean over the global batch
            share = trained / (self.accumulation * self.world.size)
        for micro in indices.split(t.micro_batch_size * self.world.size):
            batch = self.data.train.batch(self.world.my_rows(micro))
            ce, out = self.loss_fn(
                self.engine.forward_model, *batch, cfg, self.device, step_loads, share
            )
            loss = ce + t.aux_loss_coef * out.aux_loss + t.z_loss_coef * out.z_loss
            self.engine.backward(loss)
            stats.add(loss, ce, out)
        means, loads = stats.over_ranks(self.world, self.accumulation)
        grad_norm, updated = self.engine.step(self.nonfinite, means["loss"], self.step + 1)
        if loads is not None:
            self.step_loads.update(loads)
        if updated and loads is not None:
            update_expert_biases(self.model, loads, t.expert_bias_rate)
        self.step += 1
        record = {
            "step": self.step,
            **means,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": self.nonfinite.skipped,
            "trained_tokens": trained,
        }
        if loads is not None:
            record["max_expert_load"] = max((l.max() / l.float().mean()).item() for l in loads)
            copies = t.global_batch_size * t.seq_len * cfg.model.moe.top_k
            for message in self.collapse.update(loads, copies, self.step):
                if self.world.main:
                    tqdm.write(f"warning: {message}")
                record["router_collapse"] = 1
        return record, loads

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
            if self.data.chat_template is not None:
                tqdm.write(f"moe-train: chat data, {self.data.train.describe_trained()}")
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
        trained_this_run = 0
        self.preemption.install()
        try:
            while self.step < t.max_steps:
                tick = time.perf_counter()
                record, loads = self.train_step()
                seconds = time.perf_counter() - tick
                steps_done += 1
                trained_this_run += record["trained_tokens"]
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
            "trained_tokens_this_run": trained_this_run,
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
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.metrics.summary(summary)
        return summary

    def close(self, together: bool = True) -> None:
        """``together``: all ranks reached this point (a finished run, or a stop they
        agreed on), so they leave the process group together."""
        self.metrics.close()
        self.world.close(together)
