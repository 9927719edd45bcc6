"""`bash launch/quickstart.sh --smoke`: the README's first command, end to end, in a shortened mode
(a few steps per stage; the full run is the same script with more steps): from the shipped base
(launch/quickstart_base/, skipped until it is in the checkout) and ``--from-scratch``."""
from __future__ import annotations

import json
import math
import re
import subprocess

import pytest

from benchmarks.study import cli as study_cli
from tests.support.paths import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


BASE = REPO_ROOT / "launch" / "quickstart_base"


def test_quickstart_smoke_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(["bash", "launch/quickstart.sh", "--smoke", "--from-scratch", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in (128, 256, 512):
        assert json.loads((out / "data" / f"len{n}" / "meta.json").read_text())["seq_len"] == n
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))  # interrupted and resumed, no step twice
    assert [r["rope_theta"] for r in records] == [1e4] * 12 + [1e5] * 4 + [1e6] * 8
    assert "stopping after global step" in (out / "train_part1.log").read_text()
    assert "resumed from" in (out / "train_part2.log").read_text()
    for name, theta, max_pos in (("export_short_128", 1e4, 128), ("export_extended_512", 1e6, 512)):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["rope_parameters"]["rope_theta"] == theta and cfg["rope_theta"] == theta
        assert cfg["max_position_embeddings"] == max_pos
    results = json.loads((out / "eval" / "results.json").read_text())
    for plot in ("ppl_by_position.png", "passkey.png"):  # real PNGs, not empty files
        assert (out / "eval" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | length | ppl" in proc.stdout and "plots" in proc.stdout
    assert [m["name"] for m in results["models"]] == ["short-128@10k", "extended-512@1M"]
    for model in results["models"]:
        for length in ("128", "512"):
            ppl = model["perplexity"][length]
            # --max-tokens 2048: whole windows until 2048 targets, so at most one window (L-1) more
            assert 2048 <= ppl["tokens"] < 2048 + int(length), ppl["tokens"]
            assert sum(b["tokens"] for b in ppl["buckets"]) == ppl["tokens"]
            assert ppl["buckets"][-1]["end"] == int(length)
            # better than chance after 24 steps (uniform over the 2048-token vocabulary), and exp(NLL)
            assert 1 < ppl["ppl"] < 2048 and ppl["ppl"] == pytest.approx(math.exp(ppl["nll"]), rel=1e-12)



def test_quickstart_smoke_from_the_shipped_base(tmp_path, capsys):
    if not (BASE / "config.json").is_file():
        pytest.skip(f"no pretrained base in this checkout ({BASE}): benchmarks/pretrain_base.py writes it")
    out = tmp_path / "qs"
    proc = subprocess.run(["bash", "launch/quickstart.sh", "--smoke", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13)), "interrupted and resumed, no step twice"
    assert [(r["seq_len"], r["rope_theta"]) for r in records] == [(256, 1e5)] * 4 + [(512, 1e6)] * 8
    for n in (256, 512):  # code, copies near and far (from n / 2 up), key-value documents
        sources = json.loads((out / "data" / f"ext{n}" / "meta.json").read_text())["sources"]
        assert [s["kind"] for s in sources] == ["glob"] + ["synthetic"] * 4
        assert sum(f"min_distance={n // 2}" in s["path"] for s in sources) == 1
        assert all(s["documents_train"] == 20 for s in sources[1:] if "passage=words" not in s["path"])
    # The study from the base (benchmarks/study/from_base.py) trains on the same 512 mix: its prepare
    # command, written again in Python, has the same inputs and weights but for the documents per input.
    assert study_cli.main(["--from-base", str(BASE), "--dry-run", "--work-dir", str(tmp_path / "study")]) == 0
    prepare = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[study] prepare 512:")).split()
    study_inputs = [prepare[i + 1] for i, x in enumerate(prepare) if x == "--input"]
    sources = json.loads((out / "data" / "ext512" / "meta.json").read_text())["sources"]
    quickstart_inputs = [s["path"] + ("" if s["kind"] == "synthetic" else f":{s['weight']}") for s in sources]
    assert [re.sub(r"docs=\d+", "docs=N", x) for x in study_inputs] == [re.sub(r"docs=\d+", "docs=N", x) for x in quickstart_inputs]
    cfg = json.loads((out / "export_extended_512" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 512 and cfg["rope_parameters"]["rope_theta"] == 1e6
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base-128@10k", "extended-512@1M"]
    for model in results["models"]:
        assert [c["distance"] for c in model["copy"]] == [96, 480], "0.75 L and 3.75 L"
        assert set(model["kv"]) == {"128", "512"}
    assert (out / "eval" / "probes.png").stat().st_size > 0
    assert "copy gain (d)" in proc.stdout


def test_quickstart_without_a_base_says_what_to_do(tmp_path):
    proc = subprocess.run(["bash", "launch/quickstart.sh", "--base", str(tmp_path / "none"), "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--from-scratch" in proc.stderr and "pretrain_base.py" in proc.stderr
