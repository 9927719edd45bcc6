"""A prepared dataset's files are checked when it is opened: meta.json records every file's size and
sha256 at prepare time; a truncated, replaced, missing or (with the full check) changed file is named
with its dataset folder, and the trainer refuses it with exit 2 before any model is built."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_prep.cli import inspect_main
from data_prep.integrity import DamagedDatasetError, check_dataset_files
from longtrain.config import ConfigError, config_from_dict
from longtrain.data import PreparedDataset, verify_stage_datasets
from tests.support import models, runs

SHARD = "train/data-00000-of-00001.arrow"


@pytest.fixture
def dataset(tmp_path, stdlib_datasets) -> Path:
    """A copy of the session's 64-token dataset, ours to damage."""
    return Path(shutil.copytree(stdlib_datasets[64], tmp_path / "d64"))


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "overwritten":
        path.write_bytes(b"not an arrow file")
    elif how == "missing":
        path.unlink()
    elif how == "bytes flipped":
        with open(path, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))


def test_meta_records_size_and_sha256_of_every_file(stdlib_datasets):
    folder = stdlib_datasets[64]
    files = json.loads((folder / "meta.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*") if p.is_file())
    assert sorted(files) == on_disk and "validation/state.json" in files and SHARD in files
    for name, record in files.items():
        data = (folder / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert check_dataset_files(folder, full=True) is None


@pytest.mark.parametrize("how", ["truncated", "overwritten", "missing"])
def test_damaged_file_is_named_when_the_dataset_opens(capsys, dataset, how):
    size = (dataset / SHARD).stat().st_size
    damage(dataset / SHARD, how)
    with pytest.raises(DamagedDatasetError) as err:
        PreparedDataset(dataset)
    message = str(err.value)
    assert message.startswith(f"{dataset}: {SHARD} ") and "prepare the dataset again" in message
    assert (f"meta.json records {size:,} bytes" if how == "missing" else f"meta.json recorded {size:,}") in message
    assert isinstance(err.value, ValueError), "a ValueError, as the trainer's other dataset errors (eval catches those)"
    PreparedDataset(dataset, "validation")  # a split is checked on its own: validation/ is intact
    assert inspect_main([str(dataset)]) == 2 and message in capsys.readouterr().err


def test_flipped_byte_needs_the_full_check(capsys, dataset):
    damage(dataset / SHARD, "bytes flipped")
    assert len(PreparedDataset(dataset)) > 0, "same size: the fast check cannot see it"
    with pytest.raises(DamagedDatasetError, match=f"{SHARD}: its sha256 .* differs from the .* meta.json recorded"):
        PreparedDataset(dataset, verify="full")
    assert inspect_main([str(dataset)]) == 0
    capsys.readouterr()
    assert inspect_main([str(dataset), "--verify"]) == 2
    assert f"{dataset}: {SHARD}: its sha256" in capsys.readouterr().err


def test_old_dataset_without_records_still_opens_with_a_note(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    del meta["files"]
    (dataset / "meta.json").write_text(json.dumps(meta))
    opened = PreparedDataset(dataset)
    assert "cannot be checked" in opened.integrity_note and len(opened) > 0
    notes = []
    verify_stage_datasets([SimpleNamespace(data=str(dataset))], "full", notes.append)
    assert notes == [f"stages.0.data {dataset}: {opened.integrity_note}"]
    damage(dataset / SHARD, "truncated")  # unchecked, but still one line instead of pyarrow's traceback
    with pytest.raises(ConfigError, match=f"{dataset / 'train'}: cannot be read, the dataset is damaged"):
        PreparedDataset(dataset)


def test_verify_data_modes(tmp_path, dataset, stdlib_datasets):
    stages = [SimpleNamespace(data=str(stdlib_datasets[128])), SimpleNamespace(data=str(dataset))]
    damage(dataset / SHARD, "bytes flipped")
    verify_stage_datasets(stages, "fast", print)
    verify_stage_datasets(stages, "off", print)
    logged = []
    with pytest.raises(DamagedDatasetError, match=rf"^stages\.1\.data: {dataset}: {SHARD}: its sha256"):
        verify_stage_datasets(stages, "full", logged.append)
    assert len(logged) == 1 and "match their sha256 in meta.json" in logged[0] and logged[0].startswith("stages.0")
    raw = {"model": {"config": {"model_type": "llama"}}, "train": {"verify_data": "sha256"},
           "stages": [{"seq_len": 64, "rope": {"type": "default", "theta": 1e4}, "data": "d", "lr": 1e-3, "steps": 1}]}
    with pytest.raises(ConfigError, match="train.verify_data must be one of fast, full, off, got 'sha256'"):
        config_from_dict(raw)


@pytest.mark.multiproc
def test_trainer_refuses_a_damaged_dataset_before_building_the_model(tmp_path, dataset, stdlib_tokenizer,
                                                                     stdlib_datasets):
    """The model folder holds config.json but no weights: resolving the stages works, building the model
    would fail. The dataset's error coming back proves the check ran before any model was built."""
    size = (dataset / SHARD).stat().st_size
    damage(dataset / SHARD, "truncated")
    weightless = tmp_path / "weightless-model"
    models.tiny_config().save_pretrained(weightless)
    config = runs.write_config(tmp_path / "run.yaml", runs.two_stage_recipe({64: dataset, 128: stdlib_datasets[128]}),
                               {"name_or_path": str(weightless), "tokenizer": str(stdlib_tokenizer)})
    start = time.monotonic()
    proc = runs.run(runs.single_cmd() + runs.train_args(config, tmp_path / "run"), timeout=300)
    elapsed = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"longtrain train: error: stages.0.data: {dataset}: {SHARD} has {size // 2:,} bytes but "
                      f"meta.json recorded {size:,} when it was prepared (truncated or overwritten since); prepare "
                      "the dataset again (or restore the file from a copy)"], errors
    assert "parameters" not in proc.stdout and "cannot load" not in proc.stderr, "refused before any model"
    assert not (tmp_path / "run" / "checkpoints").exists()
    print(f"refused in {elapsed:.1f} s")
