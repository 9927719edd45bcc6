"""The DeepSpeed trainer, run for real (gloo on 127.0.0.1): data-parallel parity under ZeRO-2/3, the
simulated two-node launch, exact resume after SIGKILL, preemption signals, the staged RoPE schedule."""
from __future__ import annotations

import json
import signal

import subprocess

import pytest
import torch
import yaml

from longtrain import checkpoint
from tests.support import env, models, runs

pytestmark = [pytest.mark.multiproc]


def _model(tokenizer, arch="llama", **over):
    return {"config": models.tiny_model_config(arch, **over), "tokenizer": str(tokenizer)}


def _assert_losses_match(got: list[float], want: list[float], rel: float) -> None:
    assert len(got) == len(want) == 8, (got, want)
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: {a!r} vs {b!r}"


def test_reference_run_is_complete(baseline_run):
    records = runs.metrics(baseline_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["stage"] for r in records] == ["s64_base10k"] * 4 + ["s128_base1M"] * 4
    # The RoPE base follows the schedule, and so does the checkpointed HF config.
    assert [r["rope_theta"] for r in records] == [1e4] * 4 + [1e6] * 4
    done = checkpoint.complete_checkpoints(baseline_run / "checkpoints")
    assert [d.name for d in done] == [f"step_0000000{n}" for n in (3, 4, 6, 8)]
    first_stage, last = done[1], done[-1]
    for tag, theta, max_pos in ((first_stage, 1e4, 64), (last, 1e6, 128)):
        hf = json.loads((tag / checkpoint.HF_CONFIG_DIR / "config.json").read_text())
        assert hf["rope_parameters"]["rope_theta"] == theta and hf["max_position_embeddings"] == max_pos
    state = checkpoint.read_state(last)
    assert state["global_step"] == 8 and [s["steps_done"] for s in state["stages"]] == [4, 4]
    assert records[0]["loss"] > records[-1]["loss"]  # it learns
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb", "seq_len", "targets"):
        assert all(r[key] is not None for r in records), key
    resolved = yaml.safe_load((baseline_run / "config.resolved.yaml").read_text())
    assert resolved["stages"][1]["rope"]["theta"] == 1000000
    assert (baseline_run / "tokenizer" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_two_ranks_zero2_simulated_two_nodes_match_one_process(tmp_path, baseline_run, stdlib_tokenizer,
                                                                stdlib_datasets):
    """Two "nodes" of one process each, started the way users start real nodes without ssh
    (launch/train.sh --hostfile H --nnodes 2 --node-rank N), same global batch as the single process."""
    stages = runs.two_stage_recipe(stdlib_datasets, s0__grad_accum=1, s1__grad_accum=1)
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, run_dir = env.free_port(), tmp_path / "run"
    procs = []
    for node_rank in (0, 1):
        # launch/train.sh runs `deepspeed --hostfile H --no_ssh --node_rank N ... --module longtrain.cli train`
        cmd = ["bash", str(env.REPO_ROOT / "launch" / "train.sh"), str(config), str(run_dir), "--hostfile",
               str(hostfile), "--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
               "--master-port", str(port)]
        procs.append(runs.start(cmd, tmp_path / f"node{node_rank}.log"))
    for node_rank, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"node{node_rank}.log").read_text()[-4000:]
    _assert_losses_match(runs.losses(run_dir), runs.losses(baseline_run), rel=1e-6)
    assert runs.rows_per_step(run_dir) == runs.rows_per_step(baseline_run)  # same global batches


def test_train_sh_refuses_several_nodes_without_a_hostfile(tmp_path):
    """The deepspeed launcher without a hostfile starts a one-node job: every node would train alone."""
    cmd = ["bash", str(env.REPO_ROOT / "launch" / "train.sh"), "configs/tiny_cpu.yaml", str(tmp_path / "run"),
           "--nnodes", "2", "--node-rank", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--nnodes 2 with the deepspeed launcher needs --hostfile" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_ranks_zero3_torchrun_match_one_process(tmp_path, baseline_run, stdlib_tokenizer, stdlib_datasets):
    stages = runs.two_stage_recipe(stdlib_datasets, s0__grad_accum=1, s1__grad_accum=1)
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer), {"zero_stage": 3})
    run_dir = tmp_path / "run"
    runs.check(runs.run(runs.torchrun_cmd(2, env.free_port()) + runs.train_args(config, run_dir),
                        log=tmp_path / "log.txt"))
    _assert_losses_match(runs.losses(run_dir), runs.losses(baseline_run), rel=1e-6)
    assert runs.rows_per_step(run_dir) == runs.rows_per_step(baseline_run)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, baseline_run, stdlib_tokenizer, stdlib_datasets):
    """Killed with SIGKILL inside stage 2 (after a periodic checkpoint at step 6), resumed with
    --resume auto: every later loss equals the uninterrupted run bitwise, no row repeated or skipped."""
    config = runs.write_config(tmp_path / "run.yaml", runs.two_stage_recipe(stdlib_datasets),
                               _model(stdlib_tokenizer), {"checkpoint_every": 3, "keep_checkpoints": 2})
    run_dir = tmp_path / "run"
    proc = runs.start(runs.single_cmd() + runs.train_args(config, run_dir), tmp_path / "killed.log")
    runs.wait_for_step(run_dir, 7, proc)
    runs.kill_group(proc)
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    assert done and done[-1].name == "step_00000006", done  # 3 and 4 (stage end) pruned to keep 2
    assert [d.name for d in done] == ["step_00000004", "step_00000006"]
    resumed = runs.check(runs.run(runs.single_cmd() + runs.train_args(config, run_dir, "--resume", "auto"),
                                  log=tmp_path / "resumed.log"))
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout
    assert runs.losses(run_dir) == runs.losses(baseline_run)  # bitwise, fp32 on CPU
    assert [r["step"] for r in runs.metrics(run_dir)] == list(range(1, 9))
    assert runs.rows_per_step(run_dir) == runs.rows_per_step(baseline_run)


@pytest.mark.slow
def test_resume_from_mid_stage_crosses_the_stage_boundary_bitwise(tmp_path, baseline_run):
    """--resume PATH from the reference run's step-3 checkpoint (stage 1 of 2) into a new run folder:
    steps 4-8 (the stage change, the new RoPE base and dataset) equal the uninterrupted run bitwise."""
    config = baseline_run.parent / "run.yaml"
    run_dir = tmp_path / "from3"
    proc = runs.check(runs.run(runs.single_cmd() + runs.train_args(
        config, run_dir, "--resume", str(baseline_run / "checkpoints" / "step_00000003")), log=tmp_path / "log.txt"))
    assert "resumed from" in proc.stdout and "stage s64_base10k, step 3" in proc.stdout
    records = runs.metrics(run_dir)
    assert [r["step"] for r in records] == [4, 5, 6, 7, 8]
    assert [r["stage"] for r in records] == ["s64_base10k"] + ["s128_base1M"] * 4
    assert [r["loss"] for r in records] == runs.losses(baseline_run)[3:]
    want = runs.rows_per_step(baseline_run)
    assert runs.rows_per_step(run_dir) == {step: want[step] for step in range(4, 9)}


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, stdlib_tokenizer, stdlib_datasets):
    stages = runs.two_stage_recipe(stdlib_datasets, s0__steps=200)
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer))
    run_dir = tmp_path / "run"
    proc = runs.start(runs.single_cmd() + runs.train_args(config, run_dir), tmp_path / "log.txt")
    runs.wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "SIGTERM" in log and "--resume auto" in log
    latest = checkpoint.latest_complete(run_dir / "checkpoints")
    state = checkpoint.read_state(latest)
    assert state["global_step"] == runs.metrics(run_dir)[-1]["step"] >= 2
    assert state["stage_index"] == 0 and state["step_in_stage"] == state["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_model_families_train(tmp_path, arch, stdlib_tokenizer, stdlib_datasets):
    stages = runs.two_stage_recipe(stdlib_datasets, s0__steps=2, s1__steps=1)
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer, arch))
    run_dir = tmp_path / "run"
    runs.check(runs.run(runs.single_cmd() + runs.train_args(config, run_dir), log=tmp_path / "log.txt"))
    records = runs.metrics(run_dir)
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    hf = json.loads((checkpoint.latest_complete(run_dir / "checkpoints") / "hf_config" / "config.json").read_text())
    assert hf["model_type"] == arch and hf["rope_parameters"]["rope_theta"] == 1e6


def test_dataset_that_does_not_fit_the_stage_is_refused(tmp_path, stdlib_tokenizer, stdlib_datasets):
    stages = runs.two_stage_recipe(stdlib_datasets)
    stages[1]["data"] = str(stdlib_datasets[64])  # 64-token rows for the 128-token stage
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer))
    proc = runs.run(runs.single_cmd() + runs.train_args(config, tmp_path / "run"))
    assert proc.returncode == 2
    assert "stages.1.seq_len is 128" in proc.stderr and "--seq-len 128" in proc.stderr



def test_bad_input_is_one_line_and_exit_2_on_every_rank(tmp_path, stdlib_datasets):
    """A model.tokenizer folder without tokenizer files, 2 ranks under the README's launcher (deepspeed):
    every rank exits 2, one error line for the job, no traceback."""
    (tmp_path / "tok").mkdir()
    config = runs.write_config(tmp_path / "run.yaml", runs.two_stage_recipe(stdlib_datasets),
                               _model(tmp_path / "tok"))
    cmd = ["bash", str(env.REPO_ROOT / "launch" / "train.sh"), str(config), str(tmp_path / "run"), "--nproc", "2",
           "--master-port", str(env.free_port())]
    proc = runs.run(cmd)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "longtrain train: error:" in line]
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1 and f"tokenizer folder {tmp_path / 'tok'} holds neither" in errors[0], errors
    # the deepspeed launcher stops the job at the first rank's exit and reports its code
    assert "exits with return code = 2" in out, out[-3000:]


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory, stdlib_tokenizer):
    """A Hugging Face folder (save_pretrained + tokenizer.model): what users continue training from."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    fields = models.tiny_model_config()
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    shutil.copy(stdlib_tokenizer, folder / "tokenizer.model")
    return folder


@pytest.mark.slow
def test_continue_a_pretrained_folder_zero3_partitioned_load_matches_one_process(tmp_path, pretrained_folder,
                                                                                 stdlib_datasets):
    """The main use case: continue an HF model folder (its tokenizer found and checked). Under ZeRO-3
    the weights load straight into partitions (zero.Init); losses equal one process's ZeRO-2 run."""
    stages = runs.two_stage_recipe(stdlib_datasets, s0__steps=2, s1__steps=2)
    model = {"name_or_path": str(pretrained_folder)}
    single_cfg = runs.write_config(tmp_path / "single.yaml", stages, model)
    single = runs.check(runs.run(runs.single_cmd() + runs.train_args(single_cfg, tmp_path / "single"),
                                 log=tmp_path / "single.log"))
    assert "zero.Init" not in single.stdout
    # from_pretrained returns eval mode, where transformers silently skips checkpointing: it must be on.
    assert "activation checkpointing on 2/2 layers" in single.stdout
    stages = runs.two_stage_recipe(stdlib_datasets, s0__steps=2, s1__steps=2, s0__grad_accum=1, s1__grad_accum=1)
    sharded_cfg = runs.write_config(tmp_path / "z3.yaml", stages, model, {"zero_stage": 3})
    sharded = runs.check(runs.run(runs.torchrun_cmd(2, env.free_port()) + runs.train_args(sharded_cfg, tmp_path / "z3"),
                                  log=tmp_path / "z3.log"))
    assert "into ZeRO-3 partitions (deepspeed.zero.Init)" in sharded.stdout
    want, got = runs.losses(tmp_path / "single"), runs.losses(tmp_path / "z3")
    assert len(want) == len(got) == 4
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, want)), (got, want)
    assert (tmp_path / "z3" / "tokenizer" / "tokenizer.model").is_file()


def test_run_keeps_its_tokenizer_under_the_standard_name(tmp_path):
    """model.tokenizer may be any .json / SentencePiece file name; export and eval look for the standard ones."""
    from longtrain.run_dir import copy_tokenizer

    for name, standard in (("my_tok.json", "tokenizer.json"), ("spm_32k.spm", "tokenizer.model")):
        source = tmp_path / name
        source.write_bytes(name.encode())
        copy_tokenizer(source, tmp_path / f"run_{standard}")
        assert [p.name for p in (tmp_path / f"run_{standard}").iterdir()] == [standard]
        assert (tmp_path / f"run_{standard}" / standard).read_bytes() == name.encode()
