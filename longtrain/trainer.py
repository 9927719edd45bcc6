"""The staged training loop: DeepSpeed ZeRO, document-masked attention, a RoPE schedule, exact resume.

A run is a list of stages (``longtrain/config.py``). At each stage start the RoPE setting is applied
in place, the accumulation steps and the sequence-parallel attention are set, and the stage's
dataset is read in its own deterministic order (``longtrain/data.py``). One DeepSpeed engine serves
the whole run, so the optimizer state carries across stages and one checkpoint format covers all.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.tokenizer import resolve_tokenizer_file
from longtrain import checkpoint
from longtrain.config import ConfigError, RunConfig, StageConfig, dump_config
from longtrain.data import PreparedDataset, StageOrder, StepLayout, check_stage_dataset
from longtrain.loss import chunked_lm_loss_sum, default_chunk_tokens
from longtrain.metrics import MetricsLogger, peak_flops, peak_memory_bytes, training_flops


# --------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of (stage, step), so resuming needs no scheduler state.


def learning_rate(stage: StageConfig, step_in_stage: int, total_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine / linear decay to ``min_lr`` at the last step, or constant."""
    if stage.warmup_steps and step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    if stage.decay == "constant":
        return stage.lr
    span = max(1, total_steps - stage.warmup_steps - 1)
    progress = min(1.0, (step_in_stage - stage.warmup_steps) / span)
    if stage.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return stage.min_lr + (stage.lr - stage.min_lr) * factor


def stage_steps(stage: StageConfig, rows_per_step: int) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (rows_per_step * stage.seq_len)))


# --------------------------------------------------------------------------------------------
# The module DeepSpeed wraps: the HF model plus our chunked loss.


class CausalLMLoss(torch.nn.Module):
    """Returns the *sum* of token cross-entropies of a packed micro-batch (docs/internals.md).

    Wrapping (rather than calling the HF model's own loss) lets DeepSpeed see one forward whose
    output is the loss, while the logits are computed chunk by chunk and never held in full.
    Parameter names gain the prefix ``hf_model.``; export strips it.
    """

    def __init__(self, hf_model: torch.nn.Module, loss_chunk_tokens: int | None):
        super().__init__()
        self.hf_model = hf_model
        self.loss_chunk_tokens = loss_chunk_tokens or default_chunk_tokens(hf_model.config.vocab_size)

    def forward(self, input_ids, position_ids, labels, cu_seqlens, max_seqlen: int):
        out = self.hf_model.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False,
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen)
        return chunked_lm_loss_sum(out.last_hidden_state, self.hf_model.lm_head, labels, self.loss_chunk_tokens)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (biases, norm weights and other 1-D tensors are not decayed)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            # A parameter already partitioned by zero.Init is a flat stub: its real shape is ds_shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint (``longtrain_state.json``)."""

    global_step: int = 0
    stage_index: int = 0
    step_in_stage: int = 0
    tokens_seen: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption) set a flag; the loop saves and exits 0 at the next step end."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name


def _attention_kernel_ops() -> set:
    """The fused attention kernels whose outputs selective checkpointing keeps (see below)."""
    aten = torch.ops.aten
    ops = {aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default}
    flash_attn = getattr(torch.ops, "flash_attn", None)  # flash-attn >= 2.6 registers torch custom ops
    for name in ("_flash_attn_varlen_forward", "_flash_attn_forward"):
        op = getattr(flash_attn, name, None) if flash_attn is not None else None
        if op is not None:
            ops.add(op.default)
    return ops


def enable_activation_checkpointing(hf_model: torch.nn.Module, keep_attention: bool = True) -> None:
    """Recompute every decoder layer in backward (non-reentrant: works with ZeRO-3's hooks).

    ``keep_attention``: selective checkpointing (torch's ``create_selective_checkpoint_contexts``)
    that keeps the output of the fused attention kernel instead of recomputing it. At long lengths
    attention is the O(S^2) part of a layer while its output is O(S) (flash kernels save only the
    output and the log-sum-exp), so this skips the most expensive recomputation for a few MB per
    layer; the projections and the MLP are recomputed as usual.

    transformers 5.24 renamed ``gradient_checkpointing_enable`` (deprecated) to
    ``activation_checkpointing_enable``; use whichever this version has.
    """
    import functools

    kwargs: dict = {"use_reentrant": False}
    if keep_attention:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        keep = _attention_kernel_ops()

        def policy(_ctx, op, *_args, **_kwargs):
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def init_distributed() -> torch.device:
    """Start the process group (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    import warnings

    import deepspeed

    # DeepSpeed 0.19 calls torch's deprecated all_gather_into_tensor name every step; nothing for
    # users to act on, so keep it out of the training log.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # Slurm (srun, one task per device) sets SLURM_* but not the torch variables.
    for torch_var, slurm_var in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"),
                                 ("LOCAL_RANK", "SLURM_LOCALID")):
        if torch_var not in os.environ and slurm_var in os.environ:
            os.environ[torch_var] = os.environ[slurm_var]
    if "RANK" not in os.environ:  # a plain `python -m longtrain ...`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False)
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.stop = _StopFlag()

    # ----------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        import deepspeed

        from longtrain.attention import register_attention
        from longtrain.ds_config import build_deepspeed_config
        from longtrain.model import count_parameters, load_model, tokenizer_path
        from longtrain.parallel import check_sp_for_model, init_parallel_states

        cfg = self.cfg
        self.device = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        for i, stage in enumerate(cfg.stages):
            if self.world % stage.sp_size:
                raise ConfigError(f"stages.{i}.sp_size ({stage.sp_size}) must divide the number of ranks "
                                  f"({self.world})")
        # Process groups for every sequence-parallel degree of the run, created up front on all
        # ranks in the same order (torch.distributed.new_group is collective).
        self.parallel = init_parallel_states(s.sp_size for s in cfg.stages)

        ds_config = build_deepspeed_config(cfg, self.world, self.device.type == "cuda")
        if cfg.train.zero_stage == 3 and cfg.model.name_or_path is not None:
            # ZeRO-3: let transformers load the pretrained weights straight into partitions
            # (deepspeed.zero.Init), so no rank ever holds the full model. The object must stay
            # alive: transformers keeps only a weak reference to it.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
        self.hf_model = load_model(cfg.model)
        if hasattr(self.hf_model.get_input_embeddings().weight, "ds_numel"):
            self._event(f"loaded {cfg.model.name_or_path} into ZeRO-3 partitions (deepspeed.zero.Init)")
        self.tokenizer_dir = tokenizer_path(cfg.model)
        tok_identity = None
        if self.tokenizer_dir is not None:
            from data_prep.tokenizer import tokenizer_identity

            tok_identity = tokenizer_identity(str(self.tokenizer_dir))
        from longtrain.rope import original_max_position_embeddings, rope_parameters

        # The pretraining length, read before any stage's apply_rope changes max_position_embeddings.
        self.original_max = original_max_position_embeddings(self.hf_model.config)
        self.rope_params: list[dict] = []  # per stage
        for i, stage in enumerate(cfg.stages):
            try:
                check_sp_for_model(self.hf_model.config, stage.sp_size, stage.sp_mode)
            except ValueError as exc:
                raise ConfigError(f"stages.{i}.sp_size / sp_mode: {exc}") from None
            try:  # every stage's RoPE checked before anything runs, not at its stage start
                self.rope_params.append(rope_parameters(stage.rope,
                                                        original_max_position_embeddings=self.original_max))
            except ValueError as exc:
                raise ConfigError(f"stages.{i}.rope: {exc}") from None
        # Rows per step and steps of every stage (the ETA and global progress need all of them).
        self.layouts = [StepLayout(self.parallel[s.sp_size].dp_size, s.micro_batch_size, s.grad_accum)
                        for s in cfg.stages]
        self.stage_totals = [stage_steps(s, layout.rows_per_step) for s, layout in zip(cfg.stages, self.layouts)]
        embed = self.hf_model.get_input_embeddings().weight
        vocab = int(getattr(embed, "ds_shape", embed.shape)[0])  # ds_shape: partitioned by zero.Init
        self.datasets = []
        for i, stage in enumerate(cfg.stages):
            dataset = PreparedDataset(stage.data)
            check_stage_dataset(dataset, stage, f"stages.{i}", tok_identity, vocab)
            self.datasets.append(dataset)
        if tok_identity is None:
            # Training from scratch without model.tokenizer: adopt the datasets' tokenizer (all must agree).
            hashes = {d.tokenizer.get("sha256") for d in self.datasets}
            if len(hashes) > 1:
                raise ConfigError("stages use datasets prepared with different tokenizers; set model.tokenizer")
            tok_path = self.datasets[0].tokenizer.get("path")
            self.tokenizer_dir = Path(tok_path) if tok_path and Path(tok_path).exists() else None

        register_attention()
        self.hf_model.set_attn_implementation("longtrain")
        self.hf_model.config.use_cache = False
        if cfg.train.activation_checkpointing:
            # Under ZeRO-3 DeepSpeed gathers and frees parameters inside every layer, so the
            # recomputation's op sequence differs from the forward's, which torch's selective
            # checkpointing refuses ("encountered during backward but not found in storage"):
            # full recomputation there.
            enable_activation_checkpointing(self.hf_model, keep_attention=cfg.train.zero_stage < 3)
        self.source_model = cfg.model.name_or_path or f"from scratch ({cfg.model.config.get('model_type')})"
        self.n_params = count_parameters(self.hf_model)
        text_cfg = self.hf_model.config
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        self.attn_width = head_dim * text_cfg.num_attention_heads
        self.n_layers = text_cfg.num_hidden_layers

        wrapped = CausalLMLoss(self.hf_model, cfg.train.loss_chunk_tokens)
        # from_pretrained returns a model in eval mode, where transformers silently skips
        # activation checkpointing (and dropout): training mode, explicitly.
        wrapped.train()
        self.engine, _, _, _ = deepspeed.initialize(
            model=wrapped, model_parameters=param_groups(wrapped, cfg.train.optimizer.weight_decay),
            config=ds_config)
        self.peak_flops = peak_flops(self.device, cfg.train.peak_tflops)
        layers = list(self.hf_model.model.layers)
        recomputed = sum(bool(getattr(layer, "gradient_checkpointing", False) and layer.training) for layer in layers)
        self._event(f"model: {self.n_params:,} parameters, {len(layers)} layers, activation checkpointing on "
                    f"{recomputed}/{len(layers)} layers, attention '{self.hf_model.config._attn_implementation}'")

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.resolved.yaml")
            if self.tokenizer_dir is not None:
                _copy_tokenizer(self.tokenizer_dir, self.run_dir / "tokenizer")
        dist.barrier()

    def _restore(self) -> Progress:
        if self.resume is None:
            return Progress()
        ckpt_root = self.run_dir / "checkpoints"
        if self.resume == "auto":
            tag_dir = checkpoint.latest_complete(ckpt_root)
            if tag_dir is None:
                self._event(f"resume auto: no complete checkpoint in {ckpt_root}; starting fresh")
                return Progress()
        else:
            tag_dir = checkpoint.resolve_checkpoint(self.resume)
        state = checkpoint.load(self.engine, tag_dir)
        if self.rank == 0:
            # Steps logged after this checkpoint by the interrupted run are done again now.
            _truncate_jsonl(self.run_dir / "metrics.jsonl", state["global_step"])
            for samples in self.run_dir.glob("samples.rank*.jsonl"):
                _truncate_jsonl(samples, state["global_step"])
        dist.barrier()
        if len(state["stages"]) and state["stage_index"] >= len(self.cfg.stages):
            raise ConfigError(f"{tag_dir}: reached stage {state['stage_index']} but the config has "
                              f"{len(self.cfg.stages)} stages")
        self._event(f"resumed from {tag_dir} (global step {state['global_step']}, "
                    f"stage {state['stage_name']}, step {state['step_in_stage']})")
        return Progress(global_step=state["global_step"], stage_index=state["stage_index"],
                        step_in_stage=state["step_in_stage"], tokens_seen=state["tokens_seen"],
                        stages=state["stages"])

    # ----------------------------------------------------------------------------- stages
    def _begin_stage(self, index: int) -> tuple[StepLayout, StageOrder, int]:
        from longtrain.parallel import parallelize_attention
        from longtrain.rope import apply_rope

        stage, params = self.cfg.stages[index], self.rope_params[index]
        # Applied after deepspeed.initialize (which may have cast buffers to bf16): apply_rope
        # recomputes inv_freq in fp32 with transformers' own init function.
        apply_rope(self.hf_model, params, self._max_position_embeddings(stage, self.original_max))
        state = self.parallel[stage.sp_size]
        parallelize_attention(self.hf_model, state, stage.sp_mode)
        self.engine.set_train_batch_size(stage.grad_accum * self.world)
        layout, total = self.layouts[index], self.stage_totals[index]
        order = StageOrder(len(self.datasets[index]), self.cfg.train.seed, index)
        self._event(f"stage {index} '{stage.name}': seq_len {stage.seq_len}, rope {params}, "
                    f"{total} steps x {layout.rows_per_step} rows, sp {stage.sp_size}"
                    f"{' (' + stage.sp_mode + ')' if stage.sp_size > 1 else ''}, dp {state.dp_size}, "
                    f"lr {stage.lr:g}")
        return layout, order, total

    @staticmethod
    def _max_position_embeddings(stage: StageConfig, original_max: int) -> int:
        """The stage's ``max_position_embeddings``: its seq_len by default; for dynamic NTK the original
        length, because transformers scales the base only beyond ``max_position_embeddings``."""
        if stage.max_position_embeddings is not None:
            return stage.max_position_embeddings
        return original_max if stage.rope.get("type") == "dynamic" else stage.seq_len

    # ----------------------------------------------------------------------------- one step
    def _micro_batches(self, index: int, layout: StepLayout, order: StageOrder, step_in_stage: int):
        from longtrain.batching import make_packed_batch
        from longtrain.parallel import shard_batch

        stage = self.cfg.stages[index]
        state = self.parallel[stage.sp_size]
        batches, row_ids = [], []
        for positions in layout.positions(step_in_stage, state.dp_rank):
            ids = order.row_ids(positions)
            row_ids.append(ids)
            batch = make_packed_batch(self.datasets[index].rows(ids))
            if stage.sp_size > 1:
                batch = shard_batch(batch, state, stage.sp_mode)
            batches.append(batch)
        return batches, row_ids

    def _train_step(self, index: int, batches, lr: float, apply_update: bool = True) -> dict[str, float]:
        """Forward and backward of every micro-batch of one optimizer step, then the update.

        ``apply_update=False`` stops after the last backward (gradients reduced, not applied): the
        sequence-parallel gradient tests read them there with ``deepspeed.utils.safe_get_full_grad``.
        """
        engine = self.engine
        stage = self.cfg.stages[index]
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        # Collective inputs live on the training device: NCCL has no CPU tensors (gloo: the device is the CPU).
        dev = self.device
        counts = torch.tensor([float(sum(b.num_targets for b in batches))], dtype=torch.float64, device=dev)
        dist.all_reduce(counts)
        global_targets = counts.item()
        if global_targets == 0:
            self._event("warning: a step with no target tokens (all loss_mask 0); gradients are zero")
        # engine.backward divides by grad_accum and ZeRO averages over all ranks: undo both so the
        # gradient is d(global loss sum / global targets) exactly (docs/internals.md, "Loss contract").
        scale = self.world * len(batches) / max(global_targets, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: no sync per micro-batch
        sum_sq = 0
        # Every SP rank sees the row's global cu_seqlens: count the documents on one SP rank only.
        count_docs = self.parallel[stage.sp_size].sp_rank == 0
        for i, batch in enumerate(batches):
            local = engine(batch.input_ids.to(dev), batch.position_ids.to(dev), batch.labels.to(dev),
                           batch.cu_seqlens.to(dev), batch.max_seqlen)
            engine.backward(local * scale)
            if apply_update or i < len(batches) - 1:
                engine.step()
            loss_sum += local.detach().double()
            if count_docs:
                lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
                sum_sq += int((lens * lens).sum())
        totals = torch.stack([loss_sum, torch.tensor(float(sum_sq), dtype=torch.float64, device=dev)])
        dist.all_reduce(totals)
        grad_norm = engine.get_global_grad_norm() if apply_update else None
        return {"loss": totals[0].item() / max(global_targets, 1.0), "targets": global_targets,
                "sum_sq_doc_lens": totals[1].item(),
                "grad_norm": float(grad_norm) if grad_norm is not None else None}

    # ----------------------------------------------------------------------------- loop
    def run(self) -> int:
        self._setup()
        self.stop.install()
        progress = self._restore()
        cfg = self.cfg
        totals = self.stage_totals
        metrics = MetricsLogger(self.run_dir, self.rank == 0, sum(totals), cfg.train.log_every,
                                cfg.train.tensorboard)
        self._metrics = metrics
        steps_this_run = 0
        try:
            while progress.stage_index < len(cfg.stages):
                index = progress.stage_index
                stage = cfg.stages[index]
                if progress.step_in_stage >= totals[index]:
                    progress.stage_index += 1
                    progress.step_in_stage = 0
                    continue
                layout, order, total = self._begin_stage(index)
                self._ensure_stage_record(progress, index)
                while progress.step_in_stage < total:
                    start = time.perf_counter()
                    batches, row_ids = self._micro_batches(index, layout, order, progress.step_in_stage)
                    lr = learning_rate(stage, progress.step_in_stage, total)
                    out = self._train_step(index, batches, lr)
                    step_seconds = time.perf_counter() - start
                    tokens = layout.rows_per_step * stage.seq_len
                    progress.global_step += 1
                    progress.step_in_stage += 1
                    progress.tokens_seen += tokens
                    record_stage = progress.stages[index]
                    record_stage["steps_done"] = progress.step_in_stage
                    record_stage["tokens"] += tokens
                    steps_this_run += 1
                    self._log_step(metrics, progress, index, lr, out, tokens, step_seconds, order, layout)
                    if cfg.train.log_samples:
                        self._log_samples(progress, index, row_ids)
                    stage_end = progress.step_in_stage >= total
                    periodic = cfg.train.checkpoint_every and progress.global_step % cfg.train.checkpoint_every == 0
                    stopping = self._agree_to_stop() or (cfg.train.stop_after_steps is not None
                                                         and steps_this_run >= cfg.train.stop_after_steps)
                    if stage_end or periodic or stopping:
                        self._save(progress, index)
                    if stopping:
                        reason = self.stop.signal_name or f"stop_after_steps={cfg.train.stop_after_steps}"
                        self._event(f"stopping after global step {progress.global_step} ({reason}); "
                                    f"resume with --resume auto")
                        return 0
                progress.stage_index += 1
                progress.step_in_stage = 0
            self._event(f"training done: {progress.global_step} steps, {progress.tokens_seen} tokens; "
                        f"checkpoints in {self.run_dir / 'checkpoints'}")
            return 0
        finally:
            metrics.close()
            # Explicit teardown (DESIGN.md section 3: rare aborts at interpreter exit otherwise).
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    def _ensure_stage_record(self, progress: Progress, index: int) -> None:
        """The checkpointed record of every stage begun; a resumed run's overrides (``--set``) update it."""
        def setting(stage: StageConfig) -> dict:
            return {"name": stage.name, "seq_len": stage.seq_len, "rope": dict(stage.rope),
                    "sp_size": stage.sp_size, "data": stage.data}

        while len(progress.stages) <= index:
            progress.stages.append({**setting(self.cfg.stages[len(progress.stages)]), "steps_done": 0, "tokens": 0})
        progress.stages[index].update(setting(self.cfg.stages[index]))

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.signal_name else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.stop.signal_name is None:
            self.stop.signal_name = "signal on another rank"
        return bool(flag.item())

    def _save(self, progress: Progress, index: int) -> None:
        stage = self.cfg.stages[index]
        state = {"global_step": progress.global_step, "stage_index": index,
                 "step_in_stage": progress.step_in_stage, "stage_name": stage.name,
                 "tokens_seen": progress.tokens_seen, "stages": progress.stages,
                 "source_model": self.source_model,
                 "tokenizer": str(self.run_dir / "tokenizer") if self.tokenizer_dir else None,
                 "config": self.cfg.to_dict()}
        tag_dir = checkpoint.save(self.engine, self.run_dir / "checkpoints", state, self.hf_model.config,
                                  self.cfg.train.keep_checkpoints)
        self._event(f"checkpoint saved: {tag_dir}")

    def _log_step(self, metrics, progress, index, lr, out, tokens, step_seconds, order, layout) -> None:
        stage = self.cfg.stages[index]
        flops = training_flops(self.n_params, self.n_layers, self.attn_width, tokens, int(out["sum_sq_doc_lens"]))
        record = {
            "step": progress.global_step, "stage": stage.name, "stage_index": index,
            "step_in_stage": progress.step_in_stage, "loss": out["loss"], "lr": lr,
            "grad_norm": out["grad_norm"], "tokens": tokens, "targets": int(out["targets"]),
            "tokens_per_s": tokens / step_seconds, "step_seconds": step_seconds,
            "mfu": flops / step_seconds / (self.peak_flops * self.world),
            "peak_mem_gb": peak_memory_bytes(self.device) / 2**30, "seq_len": stage.seq_len,
            "rope_theta": float(self.hf_model.config.rope_parameters.get("rope_theta", 0.0)),
            "rope_type": self.hf_model.config.rope_parameters.get("rope_type"),
            "sp_size": stage.sp_size, "epoch": order.epoch_of(progress.step_in_stage * layout.rows_per_step - 1),
            "tokens_seen": progress.tokens_seen,
        }
        metrics.log_step(record)

    def _log_samples(self, progress: Progress, index: int, row_ids: list[list[int]]) -> None:
        stage = self.cfg.stages[index]
        state = self.parallel[stage.sp_size]
        import json

        with open(self.run_dir / f"samples.rank{self.rank}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": progress.global_step, "stage_index": index,
                                     "dp_rank": state.dp_rank, "sp_rank": state.sp_rank,
                                     "rows": row_ids}) + "\n")

    def _event(self, text: str) -> None:
        if getattr(self, "rank", 0) == 0:
            print(text, flush=True)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records with ``step > last_step`` (a cut-off last line is dropped too)."""
    import json

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def _copy_tokenizer(source: Path, dest: Path) -> None:
    """Keep the run's tokenizer with the run (export and eval need it; the source may move)."""
    dest.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        # Under the standard name of its kind, which is what export and eval look for.
        _, kind = resolve_tokenizer_file(source)
        shutil.copy2(source, dest / ("tokenizer.json" if kind == "hf" else "tokenizer.model"))
        return
    for child in source.iterdir():
        if child.is_file() and (child.name.startswith("tokenizer") or child.name in
                                ("special_tokens_map.json", "vocab.json", "merges.txt")):
            shutil.copy2(child, dest / child.name)


def train(cfg: RunConfig, run_dir: str | Path, resume: str | None = None) -> int:
    return Trainer(cfg, run_dir, resume).run()
