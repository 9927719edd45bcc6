"""Run configuration: typed dataclasses, YAML loading, dotted overrides, validation.

One source of truth (DESIGN.md section 1): a run's YAML is validated into these dataclasses,
command-line overrides (``--set stages.1.steps=200``) are merged strictly (an unknown key is an
error naming it), and the resolved config is what the run folder and every checkpoint store.
The DeepSpeed JSON is generated from it (``longtrain/ds_config.py``), never hand-synchronised.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key (e.g. ``stages.1.rope.theta``)."""


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
SP_MODES = ("ulysses", "ring")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAYS = ("cosine", "linear", "constant")
OPTIMIZER_IMPLS = ("auto", "torch", "fused", "cpu_adam")
VERIFY_DATA = ("fast", "full", "off")  # dataset files vs meta.json: sizes / sizes + sha256 / not checked
ATTENTION_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa_loop")  # longtrain/attention_backends.py
WANDB_MODES = ("online", "offline", "disabled")
# A mixture source's share of its stage's rows is realised in a repeating pattern of at most this many
# rows (longtrain/data.py, mixture_quotas); a smaller share could not get a row of its own.
MIX_PERIOD_MAX = 10_000


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Local HF model folder (or hub id where online) to continue training from."""
    config: dict[str, Any] | None = None
    """Build from scratch instead: HF config fields incl. ``model_type`` (e.g. llama, qwen2, mistral)."""
    tokenizer: str | None = None
    """Tokenizer file or folder; default: the model folder. Checked against every stage's dataset."""
    trust_remote_code: bool = False
    """Allow model code from the model folder / hub (off unless asked)."""
    init_seed: int = 0
    """Seed for the random initialisation of a model built from ``config``."""

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.config is None):
            raise ConfigError("model: give exactly one of model.name_or_path (continue a model) "
                              "or model.config (build one from scratch)")
        if self.config is not None and "model_type" not in self.config:
            raise ConfigError("model.config.model_type is required (e.g. llama, qwen2, mistral)")


@dataclass
class OptimizerConfig:
    impl: str = "auto"
    """auto (DeepSpeedCPUAdam with offload, else torch AdamW), torch (torch.optim.AdamW, ``fused=True`` on
    CUDA: no JIT build), fused (DeepSpeed's FusedAdam, JIT-compiled on first use), cpu_adam."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only; biases, norms and embeddings of size-1 dims are not decayed."""

    def __post_init__(self) -> None:
        _check_choice("train.optimizer.impl", self.impl, OPTIMIZER_IMPLS)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.optimizer.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class WandbConfig:
    project: str
    """The W&B project."""
    name: str | None = None
    """The W&B run name; default: the run folder's name."""
    mode: str = "online"
    """online, offline (files under WANDB_DIR, default the run folder; `wandb sync` uploads them) or disabled."""
    entity: str | None = None
    """The W&B team or user; default: wandb's own (WANDB_ENTITY, or the logged-in user)."""

    def __post_init__(self) -> None:
        _check_choice("train.wandb.mode", self.mode, WANDB_MODES)
        if not self.project:
            raise ConfigError("train.wandb.project must be a non-empty string")


@dataclass
class TrainConfig:
    seed: int = 1234
    """Seed of the data order (per stage) and of any randomness in training."""
    verify_data: str = "fast"
    """Check every stage dataset's files against meta.json before the model loads: fast (sizes), full
    (sizes and sha256: ~0.3-0.5 GB/s per rank, docs/data_prep.md), off."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (uses DeepSpeedCPUAdam)."""
    offload_param: bool = False
    """ZeRO-3 parameter offload to CPU."""
    precision: str = "bf16"
    """fp32, bf16 or fp16 (mixed precision through DeepSpeed; RoPE frequencies always stay fp32)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    activation_checkpointing: bool = True
    """Recompute each decoder layer in backward (HF gradient checkpointing, non-reentrant)."""
    loss_chunk_tokens: int | None = None
    """Tokens per chunk of the cross-entropy (``[seq, vocab]`` logits are never held in full);
    default: about 64 MiB of fp32 logits per chunk (512 tokens at vocab 32k, 128 at 128k)."""
    checkpoint_every: int = 0
    """Save every N optimizer steps (0: only at stage ends, on SIGTERM/SIGUSR1 and at the end)."""
    keep_checkpoints: int = 3
    """Keep the last K complete checkpoints (0 keeps all)."""
    log_every: int = 1
    """Console line every N steps (metrics.jsonl always gets every step)."""
    tensorboard: bool = True
    """Also log to TensorBoard when the ``tensorboard`` package is installed."""
    peak_tflops: float | None = None
    """Per-device peak for the MFU estimate; default: measured matmul peak (CPU) or a known GPU table."""
    log_samples: bool = False
    """Write the dataset row ids each rank consumed per step to samples.rank{R}.jsonl (audits data order)."""
    stop_after_steps: int | None = None
    """Stop (with a checkpoint) after this many global steps of this invocation; for tests and demos."""
    checkpoint_hashes: bool = True
    """sha256 of every checkpoint file, recorded at save and checked before resume and export (sizes are
    always recorded and checked). false: sizes only, for checkpoints so large that reading every file
    back costs too much (README "Benchmarks": the cost measured)."""
    max_nonfinite_steps: int = 3
    """Stop with exit code 3 after this many consecutive steps whose loss or gradient norm is not finite
    (DeepSpeed skips such updates; without ZeRO in fp32 it applies them). 0: never stop; every such step
    is still counted and logged with its rows in metrics.jsonl. No checkpoint is saved while one is pending."""
    loss_spike_factor: float | None = None
    """Loss-spike check (Megatron's spiky-loss idea): a step whose loss exceeds this factor times the
    median of the stage's last ``loss_spike_window`` finite losses is logged as a spike (e.g. 2.0; null: off)."""
    loss_spike_window: int = 50
    """Recent finite losses of the stage that the spike check takes the median of (at least 5 are needed)."""
    stop_on_loss_spike: bool = False
    """Stop with exit code 3 at a loss spike instead of only logging it (needs ``loss_spike_factor``)."""
    # --- kernels and long rows on one device (docs/gpu.md, docs/training.md "Attention", "Very long rows")
    attention: str = "auto"
    """Attention kernel: auto (flash_attn, else torch_varlen, else sdpa_loop: the first that runs here),
    flash_attn (flash-attn's varlen kernel), torch_varlen (torch's built-in FlashAttention, no build
    step), sdpa_loop (the exact per-document path; CPU and fp32 always use it). Chosen once at start-up
    and logged; a forced one that cannot run on this device / dtype / installation is an error."""
    tiled_mlp: Any = 1
    """Compute each decoder layer's MLP in N tiles along the sequence (DeepSpeed's TiledMLP: the MLP's
    [T, intermediate] activations shrink N-fold; its forward runs again in backward): an integer N
    (1: off) or auto (tiles of max(hidden_size, 4096) tokens)."""
    offload_activations: bool = False
    """Keep what the forward saves for backward in host memory (with activation checkpointing: the
    layer inputs) and copy it back in backward; frees device memory at very long rows."""
    # Elastic runs (docs/training.md, "Changing the number of GPUs").
    stop_at_stage_end: bool = False
    """Save and exit 0 at the end of every stage but the last, so the next stage can be relaunched on
    another number of GPUs with ``--resume auto`` (give its stages ``global_batch_rows``)."""
    # --- memory plan (longtrain/plan/, docs/plan.md)
    ignore_memory_plan: bool = False
    """Start even when the memory plan says a stage cannot fit (the trainer plans every stage at start-up,
    before loading weights, and stops with the plan's message otherwise)."""
    # --- experiment tracking (docs/training.md "Metrics")
    wandb: WandbConfig | None = None
    """Also log every step's metrics and the stage transitions to Weights & Biases (rank 0, when the
    ``wandb`` package is installed): ``{project, name, mode, entity}``."""

    def __post_init__(self) -> None:
        _check_choice("train.attention", self.attention, ATTENTION_BACKENDS)
        if not (self.tiled_mlp == "auto" or (isinstance(self.tiled_mlp, int) and not isinstance(self.tiled_mlp, bool)
                                             and self.tiled_mlp >= 1)):
            raise ConfigError(f"train.tiled_mlp must be a positive integer (tiles) or auto, got {self.tiled_mlp!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.verify_data", self.verify_data, VERIFY_DATA)
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("train.offload_param needs train.zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1")
        if self.loss_chunk_tokens is not None:
            _check_positive("train.loss_chunk_tokens", self.loss_chunk_tokens)
        _check_positive("train.log_every", self.log_every)
        if self.checkpoint_every < 0 or self.keep_checkpoints < 0:
            raise ConfigError("train.checkpoint_every and train.keep_checkpoints must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError(f"train.loss_spike_factor must be > 1 (or null), got {self.loss_spike_factor}")
        if self.loss_spike_window < 5:
            raise ConfigError(f"train.loss_spike_window must be >= 5, got {self.loss_spike_window}")
        if self.stop_on_loss_spike and self.loss_spike_factor is None:
            raise ConfigError("train.stop_on_loss_spike needs train.loss_spike_factor (e.g. 2.0)")


@dataclass
class DataSource:
    """One source of a stage's data mixture (docs/training.md "Data mixtures")."""

    path: str
    """A ``longtrain prepare`` folder at the stage's seq_len, prepared with the same tokenizer as the others."""
    weight: float
    """This source's share of the stage's rows, relative to the other sources' weights (30, 30, 40 or 0.3, ...)."""
    name: str | None = None
    """Label in metrics and the checkpoint's stage record; default: the folder's name."""


@dataclass
class StageConfig:
    seq_len: int
    """Tokens per dataset row in this stage (must equal the dataset's seq_len)."""
    rope: dict[str, Any]
    """RoPE setting, e.g. {type: default, theta: 1000000} or {type: yarn, factor: 4, theta: 10000}."""
    data: str | list[DataSource]
    """Prepared dataset folder (``longtrain prepare``) for this stage, or a mixture of several:
    ``[{path, weight}, ...]`` (rows drawn by weight in a deterministic order, longtrain/data.py)."""
    lr: float
    """Peak learning rate of this stage."""
    name: str | None = None
    """Label for logs and checkpoints; default ``stage{i}``."""
    steps: int | None = None
    """Optimizer steps in this stage (give steps or tokens)."""
    tokens: int | None = None
    """Token budget instead of steps: steps = ceil(tokens / tokens_per_step)."""
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay: str = "cosine"
    """cosine, linear or constant after warmup, from lr down to min_lr at the stage's last step."""
    micro_batch_size: int = 1
    """Dataset rows per forward per data-parallel rank (flattened into one packed sequence)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step per data-parallel rank (the global batch then grows with the
    number of ranks; see global_batch_rows)."""
    # Elastic runs: a global batch that does not depend on the world size.
    global_batch_rows: int | None = None
    """Rows per optimizer step over all ranks, instead of grad_accum: the accumulation is derived as
    global_batch_rows / (micro_batch_size x data-parallel size), so the step count, the LR schedule and
    the rows of every step are the same on any number of ranks, also when a resume changes it."""
    global_batch_tokens: int | None = None
    """The global batch as tokens instead: global_batch_rows = global_batch_tokens / seq_len."""
    sp_size: int = 1
    """Sequence-parallel degree: ranks sharing each sequence (data parallel = world / sp_size)."""
    sp_mode: str = "ulysses"
    """ulysses (all-to-all over heads) or ring (KV blocks around a ring, zigzag-balanced)."""
    max_position_embeddings: int | None = None
    """Written into the model config for this stage; default seq_len."""

    def validate(self, where: str) -> None:
        _check_positive(f"{where}.seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ConfigError(f"{where}.seq_len must be >= 2, got {self.seq_len}")
        if (self.steps is None) == (self.tokens is None):
            raise ConfigError(f"{where}: give exactly one of {where}.steps or {where}.tokens")
        if self.steps is not None:
            _check_positive(f"{where}.steps", self.steps)
        if self.tokens is not None:
            _check_positive(f"{where}.tokens", self.tokens)
        if not self.lr > 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{where}.min_lr must be in [0, lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_choice(f"{where}.decay", self.decay, LR_DECAYS)
        _check_positive(f"{where}.micro_batch_size", self.micro_batch_size)
        _check_positive(f"{where}.grad_accum", self.grad_accum)
        self._validate_global_batch(where)
        _check_positive(f"{where}.sp_size", self.sp_size)
        _check_choice(f"{where}.sp_mode", self.sp_mode, SP_MODES)
        rope_type = self.rope.get("type")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"{where}.rope.type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_len:
            raise ConfigError(f"{where}.max_position_embeddings ({self.max_position_embeddings}) "
                              f"is below {where}.seq_len ({self.seq_len})")
        if isinstance(self.data, list):
            _validate_sources(self.data, f"{where}.data")

    def sources(self) -> list[DataSource]:
        """The stage's data as a list of sources: a single folder is one source of weight 1."""
        if isinstance(self.data, list):
            return list(self.data)
        return [DataSource(path=self.data, weight=1.0, name=_source_name(self.data))]


    def _validate_global_batch(self, where: str) -> None:
        """``global_batch_rows`` / ``global_batch_tokens``: at most one, never with grad_accum, whole rows,
        whole micro-batches (the data-parallel split is checked against the world size in stages.py)."""
        given = [k for k in ("global_batch_rows", "global_batch_tokens") if getattr(self, k) is not None]
        if not given:
            return
        if len(given) > 1:
            raise ConfigError(f"{where}: give at most one of {where}.global_batch_rows or {where}.global_batch_tokens")
        key = f"{where}.{given[0]}"
        _check_positive(key, getattr(self, given[0]))
        if self.grad_accum != 1:
            raise ConfigError(f"{where}: give {where}.grad_accum ({self.grad_accum}) or {key}, not both "
                              "(the accumulation is derived from the global batch and the number of ranks)")
        if self.global_batch_tokens is not None and self.global_batch_tokens % self.seq_len:
            raise ConfigError(f"{key} ({self.global_batch_tokens}) must be a multiple of {where}.seq_len "
                              f"({self.seq_len}): a step trains whole rows")
        rows = self.global_rows
        if rows % self.micro_batch_size:
            value = (f"{self.global_batch_tokens} = {rows} rows of {self.seq_len}"
                     if self.global_batch_tokens is not None else f"{rows}")
            raise ConfigError(f"{key} ({value}) must be a multiple of {where}.micro_batch_size "
                              f"({self.micro_batch_size})")

    @property
    def global_rows(self) -> int | None:
        """Rows per optimizer step when the stage fixes its global batch; None with grad_accum."""
        if self.global_batch_tokens is not None:
            return self.global_batch_tokens // self.seq_len
        return self.global_batch_rows


def _source_name(path: str) -> str:
    return Path(path).name or str(path)


def _validate_sources(sources: list[DataSource], where: str) -> None:
    """Weights positive, names (default: folder names) and folders distinct, no share too small to draw."""
    if not sources:
        raise ConfigError(f"{where}: a mixture needs at least one {{path, weight}} source")
    for k, source in enumerate(sources):
        if not (math.isfinite(source.weight) and source.weight > 0):
            raise ConfigError(f"{where}.{k}.weight must be a positive number, got {source.weight}")
        if source.name is None:
            source.name = _source_name(source.path)
    total = sum(s.weight for s in sources)
    seen_names: dict[str, int] = {}
    seen_paths: dict[str, int] = {}
    for k, source in enumerate(sources):
        if source.weight / total < 1 / MIX_PERIOD_MAX:
            raise ConfigError(f"{where}.{k}.weight: a share of {source.weight / total:.2g} of the stage is below "
                              f"the smallest a mixture draws (1/{MIX_PERIOD_MAX:,} of its rows)")
        if source.name in seen_names:
            raise ConfigError(f"{where}.{k}.name: {source.name!r} is also the name of {where}.{seen_names[source.name]}; "
                              f"give each source a distinct name")
        path = os.path.normpath(os.path.expanduser(source.path))
        if path in seen_paths:
            raise ConfigError(f"{where}.{k}.path: {source.path} is also {where}.{seen_paths[path]}.path; "
                              f"list a dataset once, with the sum of its weights")
        seen_names[source.name] = seen_paths[path] = k


@dataclass
class RunConfig:
    model: ModelConfig
    stages: list[StageConfig]
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed keys merged over the generated config (nested dicts merge; values win)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages.{i}")
            if stage.name is None:
                stage.name = f"stage{i}"
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"stages: names must be unique, repeated: {', '.join(dupes)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading, overrides and strict typed construction


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML, apply dotted ``key=value`` overrides, validate into a RunConfig.

    Relative dataset and model paths are resolved against the working directory.
    """
    raw = _read_yaml_with_includes(Path(path), seen=())
    for item in overrides or []:
        apply_override(raw, item)
    cfg = config_from_dict(raw)
    _resolve_paths(cfg)
    return cfg


def _read_yaml_with_includes(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Read a YAML mapping; ``include: [preset.yaml, ...]`` (paths relative to this file) are merged
    first, in order, and this file's own keys win (e.g. ``configs/deepspeed/zero3_offload.yaml``)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in seen)})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with model, stages, train, deepspeed")
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, _read_yaml_with_includes(path.parent / inc, seen + (path.resolve(),)))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` merged in: nested mappings key by key, anything else replaced.
    Used for recipe ``include:`` files and for the ``deepspeed:`` pass-through section (ds_config.py)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, copy.deepcopy(raw), "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.0.c=value`` (value parsed as YAML) to the raw config dict, in place.

    Keys must already exist except inside free-form mappings (``deepspeed``, ``model.config``,
    ``stages.N.rope``); the typed construction afterwards rejects unknown keys anyway.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    value = yaml.safe_load(text) if text.strip() else None
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is a value, not a mapping or list")


def _child(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise ConfigError(f"unknown key: {where}")
            node[part] = {}
        return node[part]
    raise ConfigError(f"override {where}: parent is a value, not a mapping or list")


def _list_index(node: list, part: str, where: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(f"override {where}: {part!r} must be a list index") from None
    if not -len(node) <= index < len(node):
        raise ConfigError(f"override {where}: index {index} out of range (the list has {len(node)} items)")
    return index


def _build(tp: Any, value: Any, where: str) -> Any:
    """Strictly convert ``value`` to type ``tp``; errors name the key path ``where``."""
    name = where or "<top level>"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _build(non_none[0], value, where)
        return _build(_union_member(non_none, value, name), value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys here: {', '.join(sorted(fields))})")
        kwargs = {}
        for key, item in value.items():
            kwargs[key] = _build(hints[key], item, f"{where}.{key}" if where else key)
        missing = [f.name for f in fields.values() if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"missing required key {prefix}{missing[0]}")
        try:
            return tp(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_build(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    return _scalar(tp, value, name)


def _union_member(members: list[Any], value: Any, name: str) -> Any:
    """The member of a union such as ``str | list[DataSource]`` that ``value``'s shape selects."""
    def shape(tp: Any) -> type:
        origin = typing.get_origin(tp)
        if origin is list:
            return list
        if origin is dict or dataclasses.is_dataclass(tp):
            return dict
        return tp

    for tp in members:
        if isinstance(value, shape(tp)) and not (shape(tp) is int and isinstance(value, bool)):
            return tp
    words = {list: "a list", dict: "a mapping", str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    expected = " or ".join(words.get(shape(tp), str(tp)) for tp in members)
    raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _scalar(tp: type, value: Any, name: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e6" as a string; accept integral numbers written that way.
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover


def _resolve_paths(cfg: RunConfig) -> None:
    """Make relative local paths absolute against the working directory (as every CLI does).

    Stored absolute in the resolved config, so a resumed or exported run finds the same files
    from any directory. A model id such as ``Qwen/Qwen2-7B`` with no such local folder stays as
    written (a hub id).
    """
    for stage in cfg.stages:
        if isinstance(stage.data, list):
            for source in stage.data:
                source.path = str(Path(source.path).expanduser().resolve())
        else:
            stage.data = str(Path(stage.data).expanduser().resolve())
    for attr in ("name_or_path", "tokenizer"):
        value = getattr(cfg.model, attr)
        if value is not None and Path(value).expanduser().exists():
            setattr(cfg.model, attr, str(Path(value).expanduser().resolve()))


def _check_positive(key: str, value: int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
