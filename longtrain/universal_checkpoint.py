"""Resuming a checkpoint on another number of ranks, through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint holds the fp32 master weights and Adam moments as flat shards, one per rank of the
world it was saved with (ZeRO-1/2: ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``; ZeRO-3 also one
model-states file per rank). DeepSpeed loads them only on that same world size. Its universal format
(``deepspeed.checkpoint.ds_to_universal``) rewrites the shards as one folder per parameter (``fp32``,
``exp_avg``, ``exp_avg_sq``, ``step``), which an engine of any world size loads with
``"checkpoint": {"load_universal": true}``.

What needs the conversion: a change of the **world size** under ZeRO >= 1 (ZeRO partitions follow the
world size). A change of ``sp_size`` alone does not: longtrain does not tell DeepSpeed about sequence
parallelism, so ZeRO shards over all ranks whatever the data-parallel size (docs/internals.md, "Loss
contract"). The same world size loads directly (the fast path of before, bitwise).

The conversion runs once per checkpoint, on rank 0, in a subprocess (DeepSpeed's own converter with its
worker pools; its memory is returned when it ends), into ``TAG_DIR/.universal-partial/universal``,
which is renamed to ``TAG_DIR/universal`` after a ``UNIVERSAL_COMPLETE`` record is written in it: a
crash mid-conversion leaves only the partial folder, which the next resume deletes and redoes; a second
resume reuses ``TAG_DIR/universal``. The original files stay untouched (export reads them). Other ranks
wait by polling a status file rather than in a collective, so a conversion that takes longer than the
process group's timeout (30 minutes) does not abort the job.

Refused with a message (untested, or known broken in DeepSpeed 0.19.8; DESIGN.md section 3): another
ZeRO stage (on any world size: the file layouts differ); with another world size, another precision,
fp16, ZeRO-0, optimizer offload (CPU or NVMe: NVMe-swapped state is not in the ZeRO files) and optimizer
states other than Adam's ``exp_avg`` / ``exp_avg_sq`` (the only keys the converter knows). ZeRO-3's
universal load needs two repairs (``_repair_zero3_load``).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from longtrain.errors import UserError

UNIVERSAL_TAG = "universal"           # TAG_DIR/universal: loaded as DeepSpeed tag "universal" of TAG_DIR
PARTIAL_DIR = ".universal-partial"    # the conversion's work folder; renamed into place when complete
DONE_FILE = "UNIVERSAL_COMPLETE"      # written last inside the converted folder
LOG_FILE = "convert.log"              # the converter's output, kept in the converted folder
_STATUS_PREFIX = ".universal-status-"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_CONVERTER = ("import sys; from deepspeed.checkpoint import ds_to_universal as c; sys.argv[0] = c.__file__; "
              "c.main(c.parse_arguments())")


class UniversalCheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed on this world size; the message says why and what to do."""


@dataclass(frozen=True)
class Layout:
    """How DeepSpeed laid out a checkpoint's optimizer state (what decides whether it loads as it is)."""

    world_size: int
    zero_stage: int
    precision: str        # fp32 | bf16 | fp16
    offload: str | None   # optimizer offload device (cpu, nvme) or None

    def describe(self) -> str:
        off = f", optimizer offload to {self.offload}" if self.offload else ""
        return f"{ranks(self.world_size)}, ZeRO-{self.zero_stage}, {self.precision}{off}"


def ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _layout_of_ds_config(ds: dict[str, Any], world_size: int) -> Layout:
    zero = ds.get("zero_optimization") or {}
    precision = ("bf16" if (ds.get("bf16") or {}).get("enabled") else
                 "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32")
    offload = (zero.get("offload_optimizer") or {}).get("device")
    return Layout(world_size, int(zero.get("stage", 0)), precision, None if offload in (None, "none") else offload)


def current_layout(engine) -> Layout:
    return _layout_of_ds_config(engine.config, dist.get_world_size())


def saved_layout(tag_dir: Path) -> Layout:
    """The layout a checkpoint was saved with: the world size of its ``COMPLETE`` record, the DeepSpeed
    config of its model-states file (memory-mapped: its weights are not read)."""
    record = json.loads((tag_dir / "COMPLETE").read_text(encoding="utf-8"))
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise UniversalCheckpointError(f"{tag_dir}: no DeepSpeed *model_states.pt file; the checkpoint is damaged")
    try:
        head = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UniversalCheckpointError(f"{files[0]}: unreadable ({type(exc).__name__}: {exc}); the checkpoint is "
                                       "damaged, resume from an earlier one") from exc
    world = int(record.get("world_size", head.get("dp_world_size", 1)))
    return _layout_of_ds_config(head.get("ds_config") or {}, world)


def plan(tag_dir: Path, saved: Layout, now: Layout) -> bool:
    """Whether ``tag_dir`` loads through the universal format on this run (True) or directly (False);
    refuses, naming what to change, what neither path carries over.

    Only a world-size change under ZeRO >= 1 moves optimizer shards. The same world size (any sp_size:
    it is not part of the layout, ZeRO shards over all ranks) is today's direct load, bitwise."""
    where = f"{tag_dir}: saved with {saved.describe()}, this run has {now.describe()}"
    back = f"resume on {ranks(saved.world_size)}, or export it (`longtrain export`) and start a new run from the export"
    if saved.zero_stage != now.zero_stage and (3 in (saved.zero_stage, now.zero_stage)
                                               or saved.world_size != now.world_size):
        # ZeRO-3 keeps other files than ZeRO-0/1/2 (DeepSpeed fails on them with a file-not-found error).
        raise UniversalCheckpointError(f"{where}; changing the ZeRO stage on resume is not supported: set "
                                       f"train.zero_stage: {saved.zero_stage}")
    if saved.world_size == now.world_size:
        return False
    if now.zero_stage == 0:
        raise UniversalCheckpointError(f"{where}; changing the number of ranks of a ZeRO-0 checkpoint is untested: "
                                       f"{back}")
    if saved.precision != now.precision:
        raise UniversalCheckpointError(f"{where}; changing the precision together with the number of ranks is not "
                                       f"supported: set train.precision: {saved.precision}")
    if saved.precision == "fp16":
        raise UniversalCheckpointError(f"{where}; fp16 checkpoints cannot change the number of ranks (fp32 and bf16 "
                                       f"can): {back}")
    if saved.offload or now.offload:
        raise UniversalCheckpointError(f"{where}; a checkpoint with optimizer offload cannot change the number of "
                                       f"ranks (DeepSpeed's universal checkpoints skip NVMe-swapped state; CPU "
                                       f"offload is untested): {back}")
    return True


def _optimizer_state_keys(tag_dir: Path) -> set[str]:
    """The per-parameter optimizer state keys of the first optimizer shard (memory-mapped)."""
    files = sorted(tag_dir.glob("*optim_states.pt"))
    if not files:
        raise UniversalCheckpointError(f"{tag_dir}: a ZeRO checkpoint without its *optim_states.pt files; the "
                                       "checkpoint is damaged")
    optim = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
    # ZeRO-1/2 and BF16_Optimizer: base_optimizer_state; ZeRO-3: optimizer_state_dict.
    inner = optim.get("base_optimizer_state") or optim.get("optimizer_state_dict") or {}
    states = inner.get("state", {})
    first = next(iter(states.values() if isinstance(states, dict) else states), {})
    return set(first)


# ------------------------------------------------------------------------------------ conversion


def is_converted(tag_dir: Path) -> bool:
    return (tag_dir / UNIVERSAL_TAG / DONE_FILE).is_file()


def _source_view(tag_dir: Path, dest: Path) -> Path:
    """A folder of links to exactly the DeepSpeed files of ``tag_dir``: the converter walks its input
    recursively (``deepspeed.checkpoint.reshape_utils.get_files``), and must never see our own files
    or the partial output it is writing inside the same tag folder."""
    dest.mkdir(parents=True)
    for path in sorted(tag_dir.glob("*_states.pt")):
        os.symlink(path.resolve(), dest / path.name)
    return dest


def convert(tag_dir: Path, log=print) -> Path:
    """Convert ``tag_dir`` to ``tag_dir/universal`` (once; atomic). Call on one process only."""
    final, partial = tag_dir / UNIVERSAL_TAG, tag_dir / PARTIAL_DIR
    if is_converted(tag_dir):
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash between the rename and the clean-up
        return final
    if partial.exists() or final.exists():
        log(f"discarding an interrupted universal conversion in {tag_dir}")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
    _check_free_space(tag_dir)
    keys = _optimizer_state_keys(tag_dir)
    if not set(ADAM_KEYS) <= keys:
        raise UniversalCheckpointError(
            f"{tag_dir}: optimizer state keys {sorted(keys)}; DeepSpeed's universal converter carries only Adam's "
            f"{' / '.join(ADAM_KEYS)}: resume on the world size it was saved with")
    source = _source_view(tag_dir, partial / "source")
    out = partial / UNIVERSAL_TAG
    workers = max(1, min(4, os.cpu_count() or 1))
    # DeepSpeed's own command line (`python -m deepspeed.checkpoint.ds_to_universal`), started through -c:
    # runpy warns about the module already being imported by its package.
    cmd = [sys.executable, "-c", _CONVERTER, "--input_folder", str(source),
           "--output_folder", str(out), "--inject_missing_state",  # we record no UNIVERSAL_CHECKPOINT_INFO
           "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    with open(partial / LOG_FILE, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    cpu_seconds = _children_cpu_seconds() - cpu_start  # the converter and its workers: load-independent
    if done.returncode != 0 or not (out / "zero").is_dir():
        tail = (partial / LOG_FILE).read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        shutil.rmtree(out, ignore_errors=True)  # free the space; the log stays until the next attempt
        raise UniversalCheckpointError(
            f"{tag_dir}: DeepSpeed's universal conversion failed (exit {done.returncode}: {tail[0][:300]}); "
            f"log: {partial / LOG_FILE}")
    _compact_weight_only_states(out / "zero")
    _compact_zero3_common_state(out / "zero" / "optimizer_state.pt")
    seconds = time.perf_counter() - start
    shutil.move(str(partial / LOG_FILE), out / LOG_FILE)
    record = {"source": tag_dir.name, "seconds": round(seconds, 3), "converter_cpu_seconds": round(cpu_seconds, 3),
              "bytes": folder_bytes(out)}
    _write_synced(out / DONE_FILE, json.dumps(record))
    os.rename(out, final)  # atomic: a universal/ folder is always complete
    _fsync_dir(tag_dir)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"converted {tag_dir.name} to DeepSpeed's universal format in {seconds:.1f} s "
        f"({record['bytes'] / 2**20:.1f} MiB in {final})")
    return final


def _compact_weight_only_states(zero_dir: Path) -> None:
    """Re-save the weight-only entries compactly. For a name without optimizer state (a tied
    ``lm_head.weight``: its parameter is ``embed_tokens.weight``'s) the converter saves the module
    state's tensor, a view into the flat weight buffer, and ``torch.save`` writes the whole buffer: a
    second copy of the model (measured: 391 MiB for the 94 MiB tied lm_head of a 100M-parameter model)."""
    for param_dir in zero_dir.iterdir():
        path = param_dir / "fp32.pt"
        if not path.is_file() or (param_dir / "exp_avg.pt").exists():
            continue
        entry = torch.load(path, map_location="cpu", weights_only=False)
        tensor = entry["param"] if isinstance(entry, dict) else entry  # deepspeed.checkpoint.constants.PARAM
        if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            compact = dict(entry, param=tensor.clone()) if isinstance(entry, dict) else tensor.clone()
            tmp = path.with_name("fp32.pt.tmp")
            torch.save(compact, tmp)
            os.replace(tmp, path)


def _compact_zero3_common_state(path: Path) -> None:
    """ZeRO-3's ``zero/optimizer_state.pt`` is rank 0's whole optimizer file, its shard of the fp32
    weights and Adam moments included (measured: 587 of 1,759 MiB at 100M parameters on 2 ranks), of
    which the universal load reads only the loss scaler, the parameter groups and ``step``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "fp32_flat_groups" not in state:  # ZeRO-1/2: DeepSpeed already keeps only the common part
        return
    del state["fp32_flat_groups"]
    inner = state["optimizer_state_dict"]
    inner["state"] = {k: {n: v for n, v in group.items() if n not in ADAM_KEYS} for k, group in inner["state"].items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_free_space(tag_dir: Path) -> None:
    """Refuse before writing anything when the conversion cannot fit: DeepSpeed first writes every
    state's fragments (the size of the optimizer shards), then the merged copy (about that again, plus
    the model states), and deletes the fragments only at the end."""
    optim = sum(p.stat().st_size for p in tag_dir.glob("*optim_states.pt"))
    need = 2 * optim + sum(p.stat().st_size for p in tag_dir.glob("*model_states.pt"))
    free = shutil.disk_usage(tag_dir).free
    if free < need:
        raise UniversalCheckpointError(
            f"{tag_dir}: converting it to DeepSpeed's universal format needs about {need / 2**20:,.1f} MiB free "
            f"there, {free / 2**20:,.1f} MiB are free; make room (fewer train.keep_checkpoints) or resume on the "
            "number of ranks it was saved with")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_on_rank0(tag_dir: Path, log=print) -> Path:
    """``convert`` on rank 0 while the other ranks wait (collective); every rank raises its error."""
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)  # a fresh status file per attempt: a stale one is never read
    status = tag_dir / f"{_STATUS_PREFIX}{token[0]}"
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            convert(tag_dir, log)
            result = {"ok": True}
        except Exception as exc:  # reported on every rank; a bug is re-raised on rank 0 with its traceback
            failure = exc
            message = str(exc) if isinstance(exc, UserError) else (
                f"{tag_dir}: universal conversion failed ({type(exc).__name__}: {exc})")
            result = {"ok": False, "error": message}
        _write_status(status, result)
    else:
        # Polling, not a collective: a long conversion must not run into the process group's timeout.
        while not status.is_file():
            time.sleep(0.2)
        result = json.loads(status.read_text(encoding="utf-8"))
    dist.barrier()
    if dist.get_rank() == 0:
        status.unlink(missing_ok=True)
        if failure is not None and not isinstance(failure, (UserError, OSError)):
            raise failure  # an OSError (read-only or full filesystem) is the user's to fix: one line
    if not result["ok"]:
        raise UniversalCheckpointError(result["error"])
    return tag_dir / UNIVERSAL_TAG


def _write_status(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, json.dumps(result))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class LoadSource:
    """Where ``engine.load_checkpoint`` reads from: DeepSpeed's (load_dir, tag)."""

    load_dir: str
    tag: str
    universal: bool
    same_world: bool


@contextlib.contextmanager
def load_source(engine, tag_dir: Path, log=None) -> Iterator[LoadSource]:
    """The (load_dir, tag) to load ``tag_dir`` from on this world size, with the engine switched to
    universal loading while it loads when the checkpoint has to be converted (collective)."""
    log = log or (lambda text: print(text, flush=True) if dist.get_rank() == 0 else None)
    saved, now = saved_layout(tag_dir), current_layout(engine)
    same_world = saved.world_size == now.world_size
    if not plan(tag_dir, saved, now):
        yield LoadSource(str(tag_dir.parent), tag_dir.name, False, same_world)
        return
    if is_converted(tag_dir):
        log(f"saved on {ranks(saved.world_size)}, resuming on {now.world_size}: loading its universal conversion "
            f"{tag_dir / UNIVERSAL_TAG}")
    else:
        log(f"saved on {ranks(saved.world_size)}, resuming on {now.world_size}: converting {tag_dir.name} to "
            f"DeepSpeed's universal format (once, in {tag_dir / UNIVERSAL_TAG})")
    convert_on_rank0(tag_dir, log)
    # DeepSpeed 0.19.8 reads the flag at load time only (engine.load_universal_checkpoint() ->
    # engine._config.load_universal_checkpoint; nothing at initialize depends on it), so it is switched
    # on for this load and off again: later saves and loads are the ordinary ones.
    config = engine._config
    if not hasattr(config, "load_universal_checkpoint"):
        raise UniversalCheckpointError(f"{tag_dir}: this DeepSpeed has no universal checkpoint loading "
                                       "(engine._config.load_universal_checkpoint); resume on the saved world size")
    config.load_universal_checkpoint = True
    try:
        yield LoadSource(str(tag_dir), UNIVERSAL_TAG, True, same_world)
        if now.zero_stage == 3:
            _repair_zero3_load(engine, tag_dir / UNIVERSAL_TAG)
    finally:
        config.load_universal_checkpoint = False


def _repair_zero3_load(engine, universal: Path) -> None:
    """Undo two flaws of DeepSpeed 0.19.8's ZeRO-3 universal load
    (``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``), each of which
    makes the loss drift from the uninterrupted run's from the second step after the resume (measured:
    7e-4 relative):

    - it copies the *first* saved parameter group's settings into every group, so the no-decay group
      (norms, biases: ``longtrain.engine.param_groups``) gets weight decay: restore each group's own;
    - it gives every sub-group's Adam state the *same* ``step`` tensor, which torch's AdamW increments in
      place once per sub-group, so the bias correction runs ahead: give each state its own copy.
    ZeRO-1/2 (``load_hp_checkpoint_state_from_checkpoint_dir``) restore both correctly."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer.optimizer  # the torch optimizer over ZeRO-3's fp32 partitions
    if len(saved_groups) != len(optimizer.param_groups):
        raise UniversalCheckpointError(f"{universal}: {len(saved_groups)} saved parameter groups but the optimizer "
                                       f"has {len(optimizer.param_groups)}")
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
