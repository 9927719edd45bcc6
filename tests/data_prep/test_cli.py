"""The commands as users run them: no torch/deepspeed import, `longtrain inspect` output."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from data_prep.cli import inspect_main
from tests.support.paths import REPO_ROOT

from .test_prepare import run_prepare

BLOCKED = ("torch", "deepspeed", "transformers")
RUNNER = textwrap.dedent("""
    import json, sys
    from longtrain.cli import main
    codes = [main(argv) for argv in json.loads(sys.argv[1])]
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed", "transformers"))
    print(json.dumps({"codes": codes, "loaded": loaded}))
""")


def test_commands_never_import_torch_or_deepspeed(tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "out"
    commands = [
        ["prepare", "--input", str(corpus["jsonl"]), "--input", f"{corpus['code']}/**/*.py:2", "--tokenizer",
         str(tiny_tokenizer), "--seq-len", "64", "--out", str(out), "--val-fraction", "0.1", "--num-proc", "2"],
        ["inspect", str(out), "--row", "1"],
        ["tokenizer", "--input", str(corpus["jsonl"]), "--vocab-size", "320", "--out", str(tmp_path / "tok"),
         "--max-chars", "20000"],
    ]
    # Packages that shadow the real ones and fail on import: a CPU-only node without them.
    shadow = tmp_path / "shadow"
    for name in BLOCKED:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported by data prep')")
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1",
                                                       "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{shadow}:{REPO_ROOT}"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "loaded": []}, (result, proc.stderr[-3000:])
    assert (out / "meta.json").is_file() and (out / "stats.png").is_file() and (tmp_path / "tok" / "tokenizer.model").is_file()
    assert "wrote" in proc.stdout and "segment 1/" in proc.stdout


def test_inspect_shows_segments_and_targets(tmp_path, corpus, tiny_tokenizer, capsys):
    meta = run_prepare(tmp_path / "out", [corpus["jsonl"]], tiny_tokenizer, strategy="concat")
    assert inspect_main([str(tmp_path / "out"), "--row", "2", "--chars", "0", "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "strategy concat, seq_len 64" in out and f"{meta['splits']['train']['rows']:,} rows" in out
    assert "row 2 of 'train'" in out and "── segment 1/" in out and "id:piece:target" in out
    assert "⟦" in out and "⟧" in out, "non-target tokens are marked"
    # The decoded row is the documents' text: some sentence of the corpus shows up verbatim.
    texts = [json.loads(line)["text"] for line in corpus["jsonl"].read_text().splitlines()]
    words = [w for t in texts for w in t.split()[:3]]
    assert sum(w in out for w in set(words)) > 5
    assert inspect_main([str(tmp_path / "out"), "--row", "99999"]) == 2
    assert "--row 99999: the 'train' split has rows 0.." in capsys.readouterr().err
    assert inspect_main([str(tmp_path / "out"), "--split", "validation"]) == 2
    assert "no split 'validation' (splits: train)" in capsys.readouterr().err
    assert inspect_main([str(tmp_path)]) == 2 and "no meta.json" in capsys.readouterr().err


def test_inspect_marks_slide_window_overlap(tmp_path, corpus, tiny_tokenizer, capsys):
    meta = run_prepare(tmp_path / "out", [corpus["book"]], tiny_tokenizer, strategy="slide-window", stride=16)
    assert meta["splits"]["train"]["rows"] > 3
    assert inspect_main([str(tmp_path / "out"), "--row", "1", "--chars", "0"]) == 0
    out = capsys.readouterr().out
    assert "64 tokens, 1 segment, 16 targets" in out
    text = out.split("targets\n")[-1]
    assert text.startswith("⟦") and text.count("⟦") == 1, "the overlap with the previous window is context only"
