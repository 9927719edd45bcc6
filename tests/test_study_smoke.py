"""Plumbing of the long-context study (the ``benchmarks.study`` package), without training.

The study itself takes over two hours on 2 CPU cores; these checks take seconds: the corpus split
holds documents out, every method's overrides make a valid run config with equal tokens per step,
the training-free variants get exactly the frequencies a training stage would set, the report's
position-range arithmetic and goal checks are right, the study's subprocesses get the tests'
environment, and the dry run lists the whole pipeline.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.study import analysis, cli, corpus, from_base, recipe, report, runner, variants
from longtrain.config import load_config
from longtrain.eval.loading import load_eval_model
from longtrain.rope import apply_rope, rope_parameters
from tests.support import models
from tests.support.env import child_env
from tests.support.paths import SHARED_DATA, shared_file


def test_corpus_split_holds_out_whole_documents(tmp_path):
    shared_file("corpora", corpus.WIKITEXT)
    manifest = corpus.build_corpus(tmp_path / "corpus", SHARED_DATA, quick=False)
    root = tmp_path / "corpus"
    code_train = {p.name for p in (root / "train" / "code").iterdir()}
    code_held = {p.name for p in (root / "heldout" / "code").iterdir()}
    assert len(code_held) >= 5 and len(code_train) >= 100, (len(code_held), len(code_train))
    assert not code_train & code_held
    assert all(corpus.heldout_code(n) for n in code_held) and not any(corpus.heldout_code(n) for n in code_train)
    train_lines = (root / "train" / "prose" / "wikitext_train.jsonl").read_text().splitlines()
    held_lines = (root / "heldout" / "prose" / "wikitext_heldout.jsonl").read_text().splitlines()
    assert (len(train_lines), len(held_lines)) == (48, 12)
    held_titles = {json.loads(x)["text"][:200] for x in held_lines}
    assert not held_titles & {json.loads(x)["text"][:200] for x in train_lines}
    assert sorted(manifest["code_heldout"]) == sorted(code_held)
    assert {p.name for p in (root / "train" / "prose").iterdir()} >= set(corpus.TRAIN_BOOKS)


def test_every_method_is_a_valid_run_with_equal_tokens_per_step(tmp_path):
    _, methods = recipe.load_study()
    runs = recipe.plan_runs(methods, [0, 1], list(methods["arms"]))
    assert {r["arm"] for r in runs} == {"x4", "x16"} and len(runs) >= 10
    steps = {"base": 4000, "extend": 400}
    tokens = set()
    for run in runs:
        arm = methods["arms"][run["arm"]]
        overrides = recipe.method_overrides(arm, run["spec"], tmp_path / "data", run["seed"], steps)
        cfg = load_config(recipe.RECIPE, overrides)
        base, ext = cfg.stages
        assert (base.seq_len, base.rope, base.steps) == (128, {"type": "default", "theta": 10000}, 4000)
        assert ext.rope == run["spec"]["rope"] and ext.steps == 400 and cfg.train.seed == run["seed"]
        assert Path(ext.data).name == f"ds{ext.seq_len}"
        rope_parameters(ext.rope, original_max_position_embeddings=128)  # raises on a bad setting
        tokens.add(ext.seq_len * ext.micro_batch_size)
    assert tokens == {base.seq_len * base.micro_batch_size}  # the same tokens per step everywhere
    assert 43870 < 10000 * 4 ** (32 / 30) < 43876  # the NTK-aware base written in methods.yaml


def _tiny_export(path: Path) -> Path:
    models.tiny_model("llama", vocab_size=300, intermediate_size=96, num_attention_heads=2,
                      max_position_embeddings=128).save_pretrained(path)
    tok = shared_file("tokenizers", "spm_botchan_test_model.model")
    (path / "tokenizer.model").write_bytes(tok.read_bytes())
    return path


@pytest.mark.parametrize("rope", [{"type": "linear", "factor": 4, "theta": 10000},
                                  {"type": "dynamic", "factor": 4, "theta": 10000},
                                  {"type": "yarn", "factor": 4, "theta": 10000},
                                  {"type": "default", "theta": 43873}])
def test_training_free_variant_matches_a_training_stage(tmp_path, rope):
    """The edited config.json loads (eval refuses a rotary that differs from its config) with the
    frequencies longtrain.rope.apply_rope gives a training stage; dynamic NTK changes nothing up to L."""
    src = _tiny_export(tmp_path / "base")
    dst = variants.write_rope_variant(src, tmp_path / "variant", rope, 128)
    config = json.loads((dst / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 and config["rope_theta"] == rope["theta"]
    assert (config["rope_scaling"] is None) == (rope["type"] == "default")
    variant = load_eval_model(str(dst)).model
    reference = AutoModelForCausalLM.from_pretrained(src)
    apply_rope(reference, rope_parameters(rope, original_max_position_embeddings=128), 128)
    assert torch.equal(variant.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert variant.model.rotary_emb.attention_scaling == reference.model.rotary_emb.attention_scaling
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(4, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(variant(ids).logits, base(ids).logits)
    assert same == (rope["type"] == "dynamic"), rope  # only dynamic NTK leaves positions < L untouched


def _entry(length: int, ppls: list[float], tokens: int = 10) -> dict:
    width = length // len(ppls)
    return {"ppl": None, "buckets": [{"start": i * width, "end": (i + 1) * width, "ppl": p, "tokens": tokens}
                                     for i, p in enumerate(ppls)]}


def test_range_ppl_and_model_numbers():
    entry = _entry(512, [40.0, 20.0, 20.0, 20.0] + [10.0] * 12)  # buckets of 32
    assert analysis.range_ppl(entry, 0, 32) == pytest.approx(40.0)
    assert analysis.range_ppl(entry, 32, 128) == pytest.approx(20.0)
    assert analysis.range_ppl(entry, 0, 128) == pytest.approx(math.exp((math.log(40) + 3 * math.log(20)) / 4))
    with pytest.raises(ValueError, match="straddles"):
        analysis.range_ppl(entry, 16, 128)
    entry["buckets"][5]["ppl"] = None  # an empty bucket is skipped, not counted as zero
    assert analysis.range_ppl(entry, 128, 512) == pytest.approx(10.0)
    model = {"perplexity": {"512": dict(entry, ppl=12.0), "128": {"ppl": 21.0}}}
    nums = analysis.model_numbers(model, 512)
    assert nums["ppl_L"] == 21.0 and nums["ppl_long"] == 12.0
    assert nums["ratio"] == pytest.approx(0.5)


def _synthetic_results(runs: list[dict], methods: dict) -> dict:
    """Eval-shaped results where method m has perplexity (1 + k_m / 100) x a base curve."""
    results = {}
    for kind in corpus.HELDOUT_SETS:
        results[f"curve_{kind}"] = {"models": [{"name": f"base@{s}", "perplexity": {"128": {"ppl": 30.0 - s}}}
                                               for s in (1, 2)]}
        for arm_name, arm in methods["arms"].items():
            L4 = arm["seq_len"]
            names = ["base-128"] + [f"{t['name']} (no training)" for t in arm.get("training_free", [])]
            names += [f"{r['method']} s{r['seed']}" for r in runs if r["arm"] == arm_name]
            models = []
            for name in names:
                # PI 5% worse everywhere; seed 1 0.2% worse than seed 0 (a spread), control included
                scale = (1.05 if name.startswith("pi") else 1.0) * (1.002 if name.endswith(" s1") else 1.0)
                beyond = 25.0 if name.startswith(("base", "control")) else 15.0
                curve = [40.0, 20.0, 20.0, 20.0] + [beyond] * (L4 // 32 - 4)
                models.append({"name": name, "perplexity": {
                    str(L4): dict(_entry(L4, [scale * p for p in curve]), ppl=scale * 18.0),
                    "128": {"ppl": 22.0 * scale * (1.03 if "yarn" in name else 1.0)}}})
            results[f"{arm_name}_{kind}"] = {"models": models}
    return results


def test_report_tables_goals_and_plots(tmp_path):
    _, methods = recipe.load_study()
    runs = recipe.plan_runs(methods, [0, 1], list(methods["arms"]))
    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / "manifest.json").write_text(json.dumps({"python": "3.x"}))
    (work / "runs" / "base").mkdir(parents=True)
    (work / "runs" / "base" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 50)))
    docs = tmp_path / "docs"
    docs.mkdir()
    out = report.report(work, methods, list(methods["arms"]), runs, _synthetic_results(runs, methods),
                       {"base": 2, "extend": 1}, docs)
    checks = {(c["goal"][:12], c["method"]): c for c in out["checks"]["x4_code"]}
    assert checks[("ppl [128,512", "abf-1e6")]["met"]                  # 15 vs 20: beyond L is lower
    assert checks[("ppl [128,512", "abf-1e6")]["value"] == pytest.approx(0.75)
    assert not checks[("ppl [128,512", "base10k-512")]["met"]          # 25 vs 20
    assert not checks[("regression a", "yarn-4")]["met"]               # +3% vs the control
    assert checks[("regression a", "abf-1e6")]["value"] == pytest.approx(0.0, abs=1e-12)
    assert checks[("regression a", "yarn-4")]["value"] == pytest.approx(0.03)
    abf_pi = checks[("ABF ppl@512 ", "abf-1e6 vs pi-4")]
    assert abf_pi["met"] and abf_pi["value"] == pytest.approx(1 / 1.05 - 1)  # PI is 5% worse here
    abf = out["arms"]["x4"]["code"]["abf-1e6"]
    assert abf["seeds"] == 2 and abf["ppl_long"] == pytest.approx((18.0 * 1.001, 18.0 * 0.001))  # mean, half-range
    x16 = {c["method"]: c for c in out["checks"]["x16_code"] if c["goal"].startswith("regression")}
    # vs the mean of the 4x arm's control seeds (22 and 22 x 1.002)
    assert x16["pi-16"]["value"] == pytest.approx(1.05 / 1.001 - 1) and not x16["pi-16"]["met"]
    assert out["arms"]["x4"]["code"]["yarn-4"]["regression"][1] == pytest.approx(1.03 * (1.002 - 1 / 1.002) / 2)
    text = (work / "report.md").read_text()
    assert "| abf-1e6 |" in text and "regression" in text
    for name in ("study_base.png", "study_before.png", "study_after_x4.png", "study_x16.png"):
        size = (docs / name).stat().st_size
        assert 5_000 < size < 300_000, (name, size)


def test_study_subprocesses_get_the_tests_environment(tmp_path):
    assert runner.Runner(tmp_path, dry_run=True, threads=3).env == child_env(threads=3)


def test_dry_run_lists_the_pipeline(tmp_path, capsys):
    assert cli.main(["--dry-run", "--work-dir", str(tmp_path / "w"), "--seeds", "0"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[study] ")]
    steps = [x.split(":")[0][8:] for x in lines]
    assert steps[:5] == ["tokenizer", "prepare 128", "prepare 512", "prepare 2048", "train base"]
    assert "export base" in steps and "eval x4 code" in steps and "eval x16 prose" in steps
    assert sum(s.startswith("train x4/") for s in steps) == 6 and sum(s.startswith("train x16/") for s in steps) == 4
    assert not (tmp_path / "w" / "runs").exists()  # nothing ran


def test_from_base_dry_run_trains_each_method_from_the_base(tmp_path, capsys):
    base = recipe.REPO / "launch" / "quickstart_base"
    docs = tmp_path / "new" / "docs"  # created before any work, so the plots' copy at the end cannot fail
    assert cli.main(["--from-base", str(base), "--dry-run", "--work-dir", str(tmp_path / "w"), "--docs-dir", str(docs)]) == 0
    assert docs.is_dir()
    lines = [x[8:] for x in capsys.readouterr().out.splitlines() if x.startswith("[study] ") and ": -m " in x]
    assert [x.split(":")[0] for x in lines] == ["prepare 512", "train pi-4", "train yarn-4", "train abf-1e6", "eval base-128",
        "eval dynamic-ntk-4", "eval pi-4", "eval yarn-4", "eval abf-1e6"]
    for line, rope in zip(lines[1:4], from_base.TRAINED.values()):
        assert f"model.name_or_path={base}" in line and "stages.0.steps=200" in line
        args = line.split(" --set ")[1:]
        cfg = load_config(from_base.CONFIG, [a.split(" --")[0] for a in args])
        assert cfg.stages[0].rope == rope and cfg.stages[0].seq_len * cfg.stages[0].micro_batch_size == 2048
    assert "--copy-distances 96 480" in lines[-1] and "--kv-lengths 128 512" in lines[-1]
    assert not (tmp_path / "w" / "runs").exists()
    (tmp_path / "file").write_text("")
    work = ["--dry-run", "--work-dir", str(tmp_path / "w")]
    bad = {"--docs-dir": ["--from-base", str(base), "--docs-dir", str(tmp_path / "file" / "d")],
           "--from-base": ["--from-base", str(tmp_path)], "--arms": ["--arms", "x99"]}
    for option, args in bad.items():  # one line naming the option, exit 2, as for longtrain's commands
        assert cli.main(work + args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"python -m benchmarks.study: error: {option} "), err


def test_from_base_report_says_which_methods_keep_retrieval(tmp_path):
    def model(name, gain480, kv512):
        return {"name": name, "perplexity": {"128": {"ppl": 9.0}, "512": {"ppl": 8.0}},
                "copy": [{"distance": 96, "gain": 1.2}, {"distance": 480, "gain": gain480}],
                "kv": {"128": {"0.5": 0.8}, "512": {"0.1": kv512, "0.9": kv512 / 2}}}
    results = {"models": [model("base-128", -2.5, 0.0), model("abf-1e6", 1.1, 1.0), model("pi-4", 1.5, 1.2)]}
    out = from_base.write_report(tmp_path, results, 350, None)
    keep = {n: r["keeps_retrieval"] for n, r in out["rows"].items()}
    assert keep == {"base-128": False, "abf-1e6": False, "pi-4": True}  # kv@512 is the mean over depths
    assert out["rows"]["pi-4"]["kv_512"] == pytest.approx(0.9)
    assert "| pi-4 | 9.00 | 8.00 | +1.20 | +1.50 | 0.80 | 0.90 | yes |" in (tmp_path / "report_from_base.md").read_text()
    assert 5_000 < (tmp_path / "study_from_base.png").stat().st_size < 300_000
