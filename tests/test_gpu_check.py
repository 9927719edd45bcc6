"""The GPU check's CPU dry run: the same code as on a GPU at toy sizes, every section measured and
written to the JSON a GPU session reads (benchmarks/gpu_check.py, docs/gpu.md)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.env import REPO_ROOT, child_env

pytestmark = pytest.mark.slow  # about a minute on 2 cores: four sections, a trainer and an export subprocess

SECTIONS = ("kernels", "train", "longest_seq_len", "export")


def test_cpu_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-dry-run", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["meta"]["cpu_dry_run"] is True and set(SECTIONS) <= set(result)
    assert all("error" not in result[name] for name in SECTIONS), {n: result[n].get("error") for n in SECTIONS}

    kernels = result["kernels"]
    assert kernels["backends"]["sdpa_loop"] == "available"
    assert kernels["backends"]["torch_varlen"].startswith("unavailable: it needs a CUDA device")
    names = {(c["kernel"], c["case"]) for c in kernels["cases"]}
    assert {("document_attention[sdpa_loop]", "gqa+window"), ("ring block[cpu]", "causal"),
            ("ring block[cpu]", "full")} <= names and any(k.startswith("ring_attention") for k, _ in names)
    assert all(c["ok"] and c["grad_err"] > 0 for c in kernels["cases"])  # bf16 vs fp32: errors exist, in tolerance

    runs = [r for r in result["train"]["runs"] if "tokens_per_s" in r]
    assert {(r["zero_stage"], r["seq_len"]) for r in runs} >= {(2, 256), (2, 512), (3, 256), (3, 512)}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_allocated_gb"] > 0 for r in runs)
    assert all(r["kernel"].startswith("sdpa_loop") for r in runs)
    assert all(r["predicted_gb"] > 0 and "plan_error" in r for r in runs)  # the plan next to what was measured

    longest = result["longest_seq_len"]
    assert longest["longest"] == 2048 and [p["seq_len"] for p in longest["probes"]] == [512, 1024, 2048]
    assert all(p["ok"] for p in longest["probes"])

    export = result["export"]
    assert export["ok"], export["steps"]
    assert set(export["stages"]) == {"s128_base10k", "s256_base1M"}
    assert export["stages"]["s256_base1M"]["rope_theta"] == 1e6 and export["export_config"]["rope_theta"] == 1e6
    table = proc.stdout[proc.stdout.index("gpu_check on cpu"):]  # the printed table: a row per measurement
    assert all(f"\n{name}" in table for name in SECTIONS) and "longest 2048" in table
