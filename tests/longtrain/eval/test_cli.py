"""`longtrain eval` end to end on HF folders saved with save_pretrained, and its error messages."""
from __future__ import annotations

import json

import pytest

from longtrain.cli import main as longtrain_main

from tests.support.text import BOOK_HELDOUT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_eval_two_models_end_to_end(tmp_path, capsys, trained_folder, untrained_folder, book_text):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(book_text[BOOK_HELDOUT])
    out = tmp_path / "out"
    rc = longtrain_main(["eval", str(trained_folder), str(untrained_folder), "--names", "trained", "random",
                         "--data", str(heldout), "--lengths", "64", "128", "--bucket-size", "16",
                         "--passkey-lengths", "128", "--passkey-depths", "0", "1", "--passkey-trials", "1",
                         "--max-tokens", "4000", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["trained", "random"]
    for m in res["models"]:
        assert m["rope"]["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
        assert m["rope"]["max_position_embeddings"] == 128
        for length in (64, 128):
            p = m["perplexity"][str(length)]
            buckets = p["buckets"]
            assert [(b["start"], b["end"]) for b in buckets] == [(s, s + 16) for s in range(0, length, 16)]
            assert sum(b["tokens"] for b in buckets) == p["tokens"] >= 4000
            assert p["long_range"]["start"] == length // 4 and p["long_range"]["tokens"] > 0
        assert set(m["passkey"]["128"]) == {"0", "1"}
        assert all(0 <= a <= 1 for a in m["passkey"]["128"].values())
    trained, rand = res["models"]
    assert trained["perplexity"]["128"]["ppl"] < 0.5 * rand["perplexity"]["128"]["ppl"]
    for name in ("ppl_by_position.png", "passkey.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    stdout = capsys.readouterr().out
    assert "| model | length | ppl |" in stdout and "| trained | 128 |" in stdout and "| random | 64 |" in stdout
    assert (out / "summary.md").read_text().startswith("| model |")


def test_errors_name_the_problem(tmp_path, capsys, trained_folder, book_text):
    short = tmp_path / "short.txt"
    short.write_text(book_text[:2000])
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [
        ([str(not_a_model), "--data", str(short)], "without config.json"),
        ([str(trained_folder), "--data", str(short), "--lengths", "4096"], "--lengths [4096]: no document has that many tokens"),
        ([str(trained_folder), "--data", str(tmp_path / "nope.txt")], "nope.txt: no such file or folder"),
        ([str(trained_folder), "--data", str(short), "--lengths", "64", "--passkey-lengths", "30"], "cannot hold"),
        ([str(trained_folder), "--data", str(short), "--names", "a", "b"], "--names: 2 names for 1 models"),
        ([str(trained_folder), "--data", str(short), "--passkey-depths", "1.5"], "between 0 and 1"),
    ]
    for argv, message in cases:
        rc = longtrain_main(["eval", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
        assert rc == 2, argv
        assert message in capsys.readouterr().err, argv


def test_checkpoints_evaluate_like_their_export(tmp_path, baseline_run):
    """A run folder, its checkpoints/ folder and a tag folder are all checkpoints to eval; the model
    it builds from one gives the logits of that checkpoint's verified export."""
    import torch

    from longtrain.eval.loading import load_eval_model, model_kind

    tag = baseline_run / "checkpoints" / "step_00000008"
    assert {model_kind(p) for p in (baseline_run, baseline_run / "checkpoints", tag)} == {"checkpoint"}
    assert longtrain_main(["export", str(tag), str(tmp_path / "export"), "--dtype", "fp32", "--no-progress"]) == 0
    from_checkpoint = load_eval_model(str(baseline_run / "checkpoints"))
    from_export = load_eval_model(str(tmp_path / "export"))
    assert from_checkpoint.kind == "checkpoint" and from_export.kind == "hf"
    assert from_checkpoint.model.config.rope_parameters["rope_theta"] == 1e6  # the last stage's base
    ids = torch.arange(1, 129).unsqueeze(0) % from_export.model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(from_checkpoint.model(ids).logits, from_export.model(ids).logits, rtol=0, atol=0)
