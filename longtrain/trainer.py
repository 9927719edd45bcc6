"""The staged training loop: resolved stages in, checkpoints and metrics out.

A run is a list of stages (``longtrain/config.py``), resolved once into every per-stage number
(``longtrain/stages.py``). At each stage start the train module applies the stage's RoPE setting in
place, its sequence-parallel attention and accumulation (``longtrain/train_module.py``), and the
stage's rows are read in their own deterministic order (``longtrain/stage_data.py``). One DeepSpeed
engine serves the whole run, so the optimizer state carries across stages and one checkpoint format
covers all. The loop itself knows no model internals.

What keeps a run trustworthy has a module each: the run folder's lock (``run_lock``), the checkpoint
to resume from, verified against its manifest (``checkpoint.choose_resume``), what may change on
resume (``resume_rules``), the divergence guard (``divergence``) and a full disk (``checkpoint_space``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from data_prep.tokenizer import tokenizer_identity
from longtrain import checkpoint
from longtrain.activation_checkpointing import recomputed_layers
from longtrain.config import RunConfig
from longtrain.data import datasets_tokenizer, open_stage_datasets, verify_stage_datasets
from longtrain.distributed import init_distributed, teardown
from longtrain.divergence import DivergenceError, DivergenceGuard, StepHealth, describe_step, diverged_message
from longtrain.ds_config import build_deepspeed_config
from longtrain.engine import build_engine, loss_module
from longtrain.metrics import MetricsLogger, peak_flops, peak_memory_bytes, release_freed_memory, training_flops
from longtrain.model import (attention_width, count_parameters, embedding_rows, is_partitioned, load_model,
                             load_model_config, tokenizer_path, zero3_loading)
from longtrain.parallel import init_parallel_states
from longtrain.plan import check_memory_plan
from longtrain.preemption import StopFlag
from longtrain.progress import Progress
from longtrain.resume_rules import check_resume
from longtrain.run_dir import METRICS, append_samples, truncate_logs, write_run_files
from longtrain.run_lock import lock_run_dir
from longtrain.stage_data import StageData
from longtrain.stages import ModelFacts, ResolvedStage, resolve_stages
from longtrain.train_module import StepStats, TrainModule


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = None, break_lock: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.break_lock = break_lock
        self.stop = StopFlag()
        self.rank = 0
        self.lock = None
        self.resume_from: Path | None = None

    # ----------------------------------------------------------------------------- build
    def setup(self) -> None:
        """Process groups, the run lock, resolved stages, the checkpoint to resume from (verified and
        checked against the config before any weight loads), model, datasets, engine, run files."""
        cfg = self.cfg
        self.device = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Every stage checked and resolved from the model's config.json alone, before any weight loads
        # (and before the collectives below, which would hang on a degree that does not divide the world).
        facts = ModelFacts.from_config(load_model_config(cfg.model))
        self.stages: list[ResolvedStage] = resolve_stages(cfg, self.world, facts)
        release_freed_memory(self.device)  # CPU: RSS follows live memory (what the plan predicts)
        # Refuses a stage that cannot fit, before the run folder is touched and before any weight loads.
        self.memory_plan = check_memory_plan(cfg, self.stages, facts.hf_config, self.device)
        self._event(self.memory_plan.summary())
        # Before anything is written to the run folder: one run per folder.
        self.lock = lock_run_dir(self.run_dir, self.break_lock, self._event)
        if self.resume is not None:
            self.resume_from = checkpoint.choose_resume(self.resume, self.run_dir, cfg.train.checkpoint_hashes,
                                                        self._event)
            if self.resume_from is None:
                self._event(f"resume auto: no complete checkpoint in {self.run_dir / 'checkpoints'}; starting fresh")
            else:
                for note in check_resume(checkpoint.read_state(self.resume_from), self.stages, cfg, self.resume_from):
                    self._event(f"note: {note}")
        verify_stage_datasets(cfg.stages, cfg.train.verify_data, self._event)  # damaged files: before any model
        # Process groups for every sequence-parallel degree of the run, created up front on all
        # ranks in the same order (torch.distributed.new_group is collective).
        self.parallel = init_parallel_states(s.sp_size for s in cfg.stages)
        ds_config = build_deepspeed_config(cfg, self.world, self.device.type == "cuda")
        self._zero3_loading = zero3_loading(cfg.model, ds_config)  # kept alive: transformers holds a weak ref
        hf_model = load_model(cfg.model)
        if is_partitioned(hf_model):
            self._event(f"loaded {cfg.model.name_or_path} into ZeRO-3 partitions (deepspeed.zero.Init)")
        self.tokenizer_dir = tokenizer_path(cfg.model)
        identity = tokenizer_identity(str(self.tokenizer_dir)) if self.tokenizer_dir is not None else None
        datasets = open_stage_datasets(cfg.stages, identity, embedding_rows(hf_model), cfg.train.verify_data)
        if self.tokenizer_dir is None:
            # Training from scratch without model.tokenizer: adopt the datasets' tokenizer (all must agree).
            self.tokenizer_dir = datasets_tokenizer(datasets)

        engine = build_engine(loss_module(hf_model, cfg.train), ds_config, cfg.train.optimizer.weight_decay)
        self.module = TrainModule(engine, hf_model, self.device, self.parallel)
        self.data = [StageData(stage, dataset, cfg.train.seed, self.parallel[stage.sp_size])
                     for stage, dataset in zip(self.stages, datasets)]
        self.source_model = cfg.model.name_or_path or f"from scratch ({cfg.model.config.get('model_type')})"
        self.n_params = count_parameters(hf_model)
        self.peak_flops = peak_flops(self.device, cfg.train.peak_tflops)
        train = cfg.train
        self.guard = DivergenceGuard(train.max_nonfinite_steps, train.loss_spike_factor, train.loss_spike_window,
                                     train.stop_on_loss_spike, fp16=train.precision == "fp16")
        layers = len(hf_model.model.layers)
        self._event(f"model: {self.n_params:,} parameters, {layers} layers, activation checkpointing on "
                    f"{recomputed_layers(hf_model)}/{layers} layers, attention "
                    f"'{hf_model.config._attn_implementation}' ({engine.module.describe()})")
        if self.rank == 0:
            write_run_files(self.run_dir, cfg, self.tokenizer_dir)
        dist.barrier()

    def restore(self) -> Progress:
        """Where to start: nothing, or the state of the checkpoint chosen in ``setup``."""
        if self.resume_from is None:
            return Progress()
        tag_dir = self.resume_from
        state = checkpoint.load(self.module.engine, tag_dir)
        if self.rank == 0:
            truncate_logs(self.run_dir, state["global_step"])  # steps after the checkpoint run again
        dist.barrier()
        self._event(f"resumed from {tag_dir} (global step {state['global_step']}, "
                    f"stage {state['stage_name']}, step {state['step_in_stage']})")
        self.last_good = tag_dir
        return Progress.from_state(state)

    # ----------------------------------------------------------------------------- loop
    def run(self) -> int:
        self.metrics = None
        try:
            self.setup()
            self.stop.install()
            self.last_good = None
            progress = self.restore()
            self.metrics = MetricsLogger(self.run_dir, self.rank == 0, sum(s.steps for s in self.stages),
                                         self.cfg.train.log_every, self.cfg.train.tensorboard,
                                         wandb=self.cfg.train.wandb, run_config=self.cfg.to_dict())
            self.steps_this_run = 0
            try:
                while progress.stage_index < len(self.stages):
                    stage = self.stages[progress.stage_index]
                    if progress.step_in_stage < stage.steps:
                        if self.train_stage(stage, progress) or self._stop_at_stage_end(stage, progress):
                            return 0  # stopped (signal, stop_after_steps, stop_at_stage_end), checkpoint saved
                    progress.next_stage()
                flagged = self.guard.total_nonfinite
                self._event(f"training done: {progress.global_step} steps, {progress.tokens_seen} tokens"
                            + (f", {flagged} non-finite steps this run (each in {METRICS})" if flagged else "")
                            + f"; checkpoints in {self.run_dir / 'checkpoints'}")
                return 0
            finally:
                self.metrics.close()
                teardown()
        finally:
            if self.lock is not None:
                self.lock.release()

    def train_stage(self, stage: ResolvedStage, progress: Progress) -> bool:
        """Train ``stage`` from ``progress`` to its end; True when the run stops early."""
        sp_state = self.module.begin_stage(stage)
        self._event(stage.describe())
        progress.begin_stage(self.stages, stage.index)
        self.guard.begin_stage()
        data = self.data[stage.index]
        if data.mixed:
            self._event(data.describe())
        train = self.cfg.train
        while progress.step_in_stage < stage.steps:
            start = time.perf_counter()
            step_in_stage = progress.step_in_stage
            step_rows = data.micro_batches(step_in_stage)
            source_tokens = data.step_tokens(step_in_stage)
            lr = stage.lr(step_in_stage)
            stats = self.module.forward_backward(step_rows.batches, count_docs=sp_state.sp_rank == 0,
                                                 source_targets=step_rows.source_targets)
            if stats.targets == 0:
                self._event("warning: a step with no target tokens (all loss_mask 0); gradients are zero")
            stats.grad_norm, applied = self.module.optim_step(lr)
            seconds = time.perf_counter() - start
            progress.advance(stage.tokens_per_step, source_tokens)
            self.steps_this_run += 1
            health = self.guard.observe(progress.global_step, stats.loss, stats.grad_norm, applied)
            rows = self._step_rows(stage, step_in_stage) if health.flagged else None
            self._log_step(stage, progress, lr, stats, seconds, health, rows, source_tokens)
            if train.log_samples:
                append_samples(self.run_dir, self.rank, {
                    "step": progress.global_step, "stage_index": stage.index, "dp_rank": sp_state.dp_rank,
                    "sp_rank": sp_state.sp_rank, "rows": step_rows.row_ids})
            if health.flagged:
                self._warn(stage, progress, stats, health)
            if health.stop:
                raise DivergenceError(self._diverged(stage, progress, health, rows))
            stopping = self.stop.agreed(self.device) or (
                train.stop_after_steps is not None and self.steps_this_run >= train.stop_after_steps)
            if progress.step_in_stage >= stage.steps or stopping or checkpoint.periodic_save_due(
                    train.checkpoint_every, progress.global_step):
                self._save(stage, progress)
            if stopping:
                reason = self.stop.signal_name or f"stop_after_steps={train.stop_after_steps}"
                self._event(f"stopping after global step {progress.global_step} ({reason}); "
                            f"resume with --resume auto")
                return True
        return False

    def _stop_at_stage_end(self, stage: ResolvedStage, progress: Progress) -> bool:
        """``train.stop_at_stage_end``: exit after a stage this invocation trained (its end was saved), so
        the next stage can be relaunched on another number of ranks."""
        if not self.cfg.train.stop_at_stage_end or stage.index == len(self.stages) - 1:
            return False
        self._event(f"stage {stage.index} '{stage.name}' done at global step {progress.global_step}; "
                    f"stopping (train.stop_at_stage_end): relaunch with --resume auto, on any number of ranks")
        return True

    # ----------------------------------------------------------------------------- outputs
    def _save(self, stage: ResolvedStage, progress: Progress) -> None:
        if not self.guard.healthy:
            # The weights may hold a non-finite update (fp32 without ZeRO applies it): keep the last good one.
            self._event(f"not saving a checkpoint at global step {progress.global_step}: its step was non-finite; "
                        f"the last good checkpoint stays {self.last_good or 'none'}")
            return
        state = {**progress.to_state(), "stage_name": stage.name, "source_model": self.source_model,
                 "tokenizer": str(self.run_dir / "tokenizer") if self.tokenizer_dir else None,
                 "config": self.cfg.to_dict()}
        train = self.cfg.train
        tag_dir = checkpoint.save(self.module.engine, self.run_dir / "checkpoints", state,
                                  self.module.hf_model.config, train.keep_checkpoints, train.checkpoint_hashes)
        self.last_good = tag_dir
        self._event(f"checkpoint saved: {tag_dir}")

    def _step_rows(self, stage: ResolvedStage, step_in_stage: int) -> list:
        """The dataset rows of a whole step (every data-parallel rank's): positions [s*R, (s+1)*R); in a
        mixture ``[source, row]`` pairs."""
        per_step = stage.layout.rows_per_step
        return self.data[stage.index].rows_of(list(range(step_in_stage * per_step, (step_in_stage + 1) * per_step)))

    def _where(self, stage: ResolvedStage, progress: Progress) -> str:
        return (f"global step {progress.global_step} (stage {stage.index} '{stage.name}', step "
                f"{progress.step_in_stage} of {stage.steps})")

    def _warn(self, stage: ResolvedStage, progress: Progress, stats: StepStats, health: StepHealth) -> None:
        what = describe_step(stats.loss, stats.grad_norm, health.update_skipped)
        if health.nonfinite:
            limit = self.cfg.train.max_nonfinite_steps
            self._event(f"warning: non-finite step at {self._where(stage, progress)}: {what}; {health.streak} in a "
                        f"row (train.max_nonfinite_steps {limit or 'off'}); its rows are in {METRICS}")
        elif health.spike_ratio is not None:
            self._event(f"warning: loss spike at {self._where(stage, progress)}: {health.spike_ratio:.2f}x the recent "
                        f"median; its rows are in {METRICS}")
        else:
            self._event(f"note: update skipped at {self._where(stage, progress)} (fp16 loss-scale overflow)")

    def _diverged(self, stage: ResolvedStage, progress: Progress, health: StepHealth, rows: list[int]) -> str:
        return diverged_message(health, self._where(stage, progress), rows, str(self.run_dir / METRICS),
                                str(self.last_good) if self.last_good else None, f"{stage.where}.lr")

    def _log_step(self, stage: ResolvedStage, progress: Progress, lr: float, stats: StepStats,
                  seconds: float, health: StepHealth, rows: list | None, source_tokens: dict[str, int]) -> None:
        config, data = self.module.hf_model.config, self.data[stage.index]
        tokens = stage.tokens_per_step
        flops = training_flops(self.n_params, config.num_hidden_layers, attention_width(config), tokens,
                               stats.sum_sq_doc_lens)
        record = {
            "step": progress.global_step, "stage": stage.name, "stage_index": stage.index,
            "step_in_stage": progress.step_in_stage, "loss": stats.loss, "lr": lr,
            "grad_norm": stats.grad_norm, "tokens": tokens, "targets": stats.targets,
            "tokens_per_s": tokens / seconds, "step_seconds": seconds,
            "mfu": flops / seconds / (self.peak_flops * self.world),
            "peak_mem_gb": peak_memory_bytes(self.device) / 2**30,
            "peak_mem_pred_gb": self.memory_plan.peak_gb(stage.index), "seq_len": stage.seq_len,
            "rope_theta": float(config.rope_parameters.get("rope_theta", 0.0)),
            "rope_type": config.rope_parameters.get("rope_type"), "sp_size": stage.sp_size,
            "epoch": data.epoch_after(progress.step_in_stage),
            "tokens_seen": progress.tokens_seen, "tokens_by_source": source_tokens,
            "targets_by_source": data.by_source(stats.targets_by_source or [stats.targets]),
            "epoch_by_source": data.epochs_after(progress.step_in_stage),
            "nonfinite": health.nonfinite, "update_skipped": health.update_skipped,
            "nonfinite_streak": health.streak,
        }
        if health.spike_ratio is not None:
            record["loss_spike"] = health.spike_ratio
        if rows is not None:
            record["rows"] = rows
        self.metrics.log_step(record)

    def _event(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)


def train(cfg: RunConfig, run_dir: str | Path, resume: str | None = None, break_lock: bool = False) -> int:
    return Trainer(cfg, run_dir, resume, break_lock).run()
