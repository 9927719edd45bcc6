"""`launch/slurm.sbatch` run for real on one machine: a fake `srun` starts the tasks locally with the
variables Slurm gives them (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), a fake `scontrol` names the
node. The job is preempted (SIGUSR1 to every task, as `#SBATCH --signal=USR1@120` does), exits 0, and is
"requeued" (the same script run again): the run resumes and ends as the uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.longtrain.test_trainer import _assert_losses_match, _model
from tests.support import env, runs

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

# What `srun --kill-on-bad-exit=1 CMD...` does in a job step, reduced to one node: SLURM_NTASKS tasks
# with their ids; signals forwarded to the tasks; a failing task takes the others down.
FAKE_SRUN = textwrap.dedent("""\
    #!{python}
    import os, signal, subprocess, sys, time
    args = sys.argv[1:]
    while args[0].startswith("--"):  # srun's own options (--kill-on-bad-exit=1), then the command
        args = args[1:]
    n = int(os.environ["SLURM_NTASKS"])
    tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))) for i in range(n)]
    with open(os.environ["FAKE_SRUN_PIDS"], "w") as f:
        f.write(" ".join(str(t.pid) for t in tasks))
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, _: [t.send_signal(s) for t in tasks])
    codes = [None] * n
    while None in codes:
        for i, t in enumerate(tasks):
            if codes[i] is None and t.poll() is not None:
                codes[i] = t.returncode
                if codes[i] != 0:
                    [o.kill() for o in tasks if o.poll() is None]
        time.sleep(0.05)
    sys.exit(max(abs(c) for c in codes))
    """)


def _slurm_env(tmp_path, port: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")  # `show hostnames LIST`
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return env.child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS="2",
                         SLURM_JOB_NODELIST="node-0", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="1",
                         SLURM_SUBMIT_DIR=str(env.REPO_ROOT), MASTER_PORT=str(port),
                         FAKE_SRUN_PIDS=str(tmp_path / "tasks.pid"))


def _sbatch(config, run_dir, job_env, log):
    with open(log, "w") as handle:
        return subprocess.Popen(["bash", str(env.REPO_ROOT / "launch" / "slurm.sbatch"), str(config), str(run_dir)],
                                cwd=env.REPO_ROOT, env=job_env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_slurm_job_preempted_and_requeued_ends_as_the_uninterrupted_run(tmp_path, baseline_run, stdlib_tokenizer,
                                                                        stdlib_datasets):
    stages = runs.two_stage_recipe(stdlib_datasets, s0__grad_accum=1, s1__grad_accum=1)
    config = runs.write_config(tmp_path / "run.yaml", stages, _model(stdlib_tokenizer))
    run_dir = tmp_path / "run"
    job_env = _slurm_env(tmp_path, env.free_port())

    first = _sbatch(config, run_dir, job_env, tmp_path / "job1.log")
    runs.wait_for_step(run_dir, 2, first)
    for pid in (tmp_path / "tasks.pid").read_text().split():  # Slurm signals the tasks, not the batch shell
        os.kill(int(pid), signal.SIGUSR1)
    assert first.wait(timeout=300) == 0, (tmp_path / "job1.log").read_text()[-4000:]
    log1 = (tmp_path / "job1.log").read_text()
    assert "SIGUSR1" in log1 and "--resume auto" in log1
    stopped_at = runs.metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < len(runs.losses(baseline_run)), "preempted before the end"

    time.sleep(0.5)  # the requeued job: the same script, the same command line
    second = _sbatch(config, run_dir, job_env, tmp_path / "job2.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "job2.log").read_text()[-4000:]
    assert f"global step {stopped_at}" in (tmp_path / "job2.log").read_text()
    # 2 ranks against the single process (reduction order differs): as the other 2-rank tests
    _assert_losses_match(runs.losses(run_dir), runs.losses(baseline_run), rel=1e-6)
    assert runs.rows_per_step(run_dir) == runs.rows_per_step(baseline_run)
