"""slurm/train.sbatch and `mor-ds sweep` on a real one-node Slurm (started by slurm_cluster.py, as root).

A 2-task CPU job trains the tiny MoR over gloo through the real sbatch script and is interrupted twice: SIGUSR1 to
the batch shell (what `--signal=B:USR1@…` delivers before the time limit: the script checkpoints and requeues
itself) and `scontrol requeue` (SIGTERM: Slurm requeues). Every optimizer step must be trained exactly once.
Then the shipped 2-arm tiny sweep runs, after a dry run and a half-failed submission that is re-run.
Job states are polled with deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from slurm_jobs import finished, job_env, job_field, scontrol_requeue, text, wait_for
from wandb_records import read_records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MOR_DS = str(Path(sys.executable).parent / "mor-ds")
VOCAB = 512
STEPS = 60


def submit_train(tmp_path: Path, cache: Path, wandb_mode: str) -> tuple[str, Path, Path]:
    """A 2-task CPU job through the real slurm/train.sbatch: (job id, run dir, job log)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    sets = [f"model.vocab_size={VOCAB}", f"data.cache_dir={cache}", "train.seq_len=64", "train.micro_batch_size=2",
            "train.global_batch_size=4", f"train.max_steps={STEPS}", "train.log_interval=1",
            "train.eval_interval=1000", "checkpoint.interval=1000", f"wandb.mode={wandb_mode}"]
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30",
           f"--output={log}", str(REPO / "slurm" / "train.sbatch"), "tiny-mor"]
    for s in sets:
        cmd += ["--set", s]
    job = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=job_env(MOR_DS_RUN_DIR=str(run_dir), MOR_DS_CMD=MOR_DS)).stdout.strip()
    return job, run_dir, log


def assert_each_step_trained_once(job: str, run_dir: Path, log: Path, restarts: int) -> str:
    assert wait_for(lambda: finished(job), "the job to finish", log=log) == "COMPLETED", text(log)
    out = text(log)
    assert job_field(job, "Restarts") == str(restarts)
    # resumed, never restarted: each optimizer step was trained exactly once over all the starts
    trained = [int(s) for s in re.findall(rf"^step (\d+)/{STEPS} ", out, re.M)]
    assert trained == list(range(1, STEPS + 1))
    assert [r["step"] for r in map(json.loads, text(run_dir / "metrics.jsonl").splitlines())] == trained
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    starts = text(run_dir / "slurm-jobs.tsv").splitlines()
    assert [re.search(r"restart=(\d+)", s).group(1) for s in starts] == [str(i) for i in range(restarts + 1)]
    assert all(f"job={job}" in s and f"log={log}" in s for s in starts)
    return out


def test_train_job_checkpoints_requeues_and_resumes(cluster, cache, tmp_path, jobs):
    # W&B off: Slurm's SIGTERM also kills wandb's service process, see test_scontrol_requeue_with_wandb_on
    job, run_dir, log = submit_train(tmp_path, cache, wandb_mode="disabled")
    jobs.append(job)

    # 1) SIGUSR1 to the batch shell, as Slurm sends it before the time limit: checkpoint, exit 75, self-requeue
    wait_for(lambda: re.search(r"^step [3-9]\d*/", text(log), re.M), "training to reach step 3", log=log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    first = int(wait_for(lambda: re.search(r"SIGUSR1 received: stopped after step (\d+)", text(log)),
                         "the trainers to stop on SIGUSR1", log=log).group(1))
    wait_for(lambda: f"resumed from {run_dir}/checkpoints/step_{first:08d} at step {first}" in text(log),
             "the requeued job to resume", log=log)

    # 2) scontrol requeue (SIGTERM to every step, Slurm requeues): checkpoint and resume again
    wait_for(lambda: f"\nstep {first + 3}/{STEPS} " in text(log), "training to go on after the resume", log=log)
    scontrol_requeue(job)
    second = int(wait_for(lambda: re.search(r"SIGTERM received: stopped after step (\d+)", text(log)),
                          "the trainers to stop on SIGTERM", log=log).group(1))
    assert first < second < STEPS
    out = assert_each_step_trained_once(job, run_dir, log, restarts=2)
    assert f"resumed from {run_dir}/checkpoints/step_{second:08d} at step {second}" in out
    assert out.count("requeueing job") == 1  # the script requeued once (USR1); Slurm did the SIGTERM requeue


def test_scontrol_requeue_with_wandb_on(cluster, cache, tmp_path, jobs):
    job, run_dir, log = submit_train(tmp_path, cache, wandb_mode="offline")
    jobs.append(job)
    wait_for(lambda: re.search(r"^step [3-9]\d*/", text(log), re.M), "training to reach step 3", log=log)
    scontrol_requeue(job)
    wait_for(lambda: "restart=1" in text(run_dir / "slurm-jobs.tsv"), "the requeued job to start", log=log)
    stopped = re.search(r"SIGTERM received: stopped after step (\d+)", text(log))
    assert stopped, f"no checkpoint on SIGTERM with W&B on:\n{text(log)[-3000:]}"
    assert (run_dir / "checkpoints" / f"step_{int(stopped.group(1)):08d}").is_dir()
    assert re.search(r"W&B run [a-z0-9]+ \(offline\)", text(log))


def _tiny_sweep(tmp_path: Path, cache: Path, **changes) -> Path:
    """The shipped tiny sweep, pointed at the test's corpus cache and output directory."""
    data = yaml.safe_load((REPO / "slurm" / "sweeps" / "tiny.yaml").read_text())
    data["set"].update({"model.vocab_size": VOCAB, "data.cache_dir": str(cache)})
    data["output_dir"] = str(tmp_path / "sweep")
    data.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MOR_DS, "sweep", *args], capture_output=True, text=True, cwd=cwd, env=job_env())


def test_half_failed_sweep_resubmits_only_the_missing_arm(cluster, cache, tmp_path, jobs):
    """sbatch refuses the second arm: the first stays recorded with its job id and is not submitted twice."""
    arms = [{"name": "a", "config": "tiny-vanilla"},
            {"name": "b", "config": "tiny-mor", "slurm": {"partition": "nope"}}]
    held = {"sbatch_args": ["--hold"]}  # held jobs never run: this test is about submission only
    path = _tiny_sweep(tmp_path, cache, arms=arms, grid=None, slurm={**yaml.safe_load(
        (REPO / "slurm" / "sweeps" / "tiny.yaml").read_text())["slurm"], **held})
    proc = sweep_cli(str(path), cwd=tmp_path)
    state_file = tmp_path / "sweep" / "sweep-state.json"
    first = json.loads(state_file.read_text())["arms"]
    jobs.extend(r["job_id"] for r in first.values())
    assert proc.returncode == 1, proc.stderr
    assert list(first) == ["a"]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("mor-ds sweep: arm b: sbatch failed: ")
    assert "invalid partition" in err.lower() and f"submitted so far: a={first['a']['job_id']}" in err

    path.write_text(path.read_text().replace("partition: nope", "partition: debug"))
    proc = sweep_cli(str(path), cwd=tmp_path)
    second = json.loads(state_file.read_text())["arms"]
    jobs.extend(r["job_id"] for r in second.values())
    assert proc.returncode == 0, proc.stderr
    assert f"a: already submitted as job {first['a']['job_id']}; skipped" in proc.stdout
    assert second["a"] == first["a"] and second["b"]["job_id"] != first["a"]["job_id"]
    assert job_field(second["b"]["job_id"], "JobState") == "PENDING"  # held


def test_tiny_sweep_dry_run_then_two_arms_train_and_evaluate(cluster, cache, tmp_path, jobs):
    path = _tiny_sweep(tmp_path, cache, eval={"args": ["--batches", "1"]})
    dry = sweep_cli(str(path), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"^tiny-vanilla .* 20 ", dry.stdout, re.M) and re.search(r"^tiny-mor-nr2 .* 24 ", dry.stdout, re.M)
    assert dry.stdout.count("#!/bin/bash") == 4 and not (tmp_path / "sweep").exists()  # train + eval per arm

    proc = sweep_cli(str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = json.loads((tmp_path / "sweep" / "sweep-state.json").read_text())["arms"]
    jobs.extend(j for r in state.values() for j in (r["job_id"], r["eval_job_id"]))
    assert list(state) == ["tiny-vanilla", "tiny-mor-nr2"]
    for record in state.values():  # each eval waits for its training job
        assert job_field(record["eval_job_id"], "Dependency").startswith(f"afterok:{record['job_id']}")
    for arm, steps in (("tiny-vanilla", 20), ("tiny-mor-nr2", 24)):
        arm_dir = tmp_path / "sweep" / arm
        log = arm_dir / f"slurm-{state[arm]['job_id']}.out"
        job = state[arm]["job_id"]
        assert wait_for(lambda job=job: finished(job), f"arm {arm} to finish", log=log) == "COMPLETED", text(log)
        metrics = [json.loads(line) for line in text(arm_dir / "metrics.jsonl").splitlines()]
        assert [r["step"] for r in metrics] == list(range(1, steps + 1))
        assert json.loads(text(arm_dir / "plan.json"))["steps"] == steps
        # the arms are one W&B group, each run named after its arm
        (wandb_file,) = (arm_dir / "wandb").glob("offline-run-*/run-*.wandb")
        run = next(r.run for r in read_records(wandb_file) if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.display_name) == ("tiny", arm)
        assert f"W&B run {run.run_id} (offline): upload with wandb sync {arm_dir}/wandb/" in text(log)
        eval_job = state[arm]["eval_job_id"]
        eval_log = arm_dir / f"slurm-eval-{eval_job}.out"
        finished_eval = wait_for(lambda job=eval_job: finished(job), f"arm {arm}'s eval to finish", log=eval_log)
        assert finished_eval == "COMPLETED", text(eval_log)
        assert json.loads(text(arm_dir / f"eval-{eval_job}.json"))["val/batches"] == 1
    # status: each arm's jobs, their Slurm states, the last step and loss
    shown = sweep_cli("status", str(path), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for arm, steps in (("tiny-vanilla", 20), ("tiny-mor-nr2", 24)):
        metrics = [json.loads(line) for line in text(tmp_path / "sweep" / arm / "metrics.jsonl").splitlines()]
        row = next(line.split() for line in shown.stdout.splitlines() if line.startswith(arm + " "))
        assert row == [arm, state[arm]["job_id"], "COMPLETED", f"{steps}/{steps}", f"{metrics[-1]['loss']:.4f}",
                       f"{metrics[-1]['val/loss']:.4f}", row[6], "done", state[arm]["eval_job_id"], "COMPLETED"]
    # a re-run submits nothing
    again = sweep_cli(str(path), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("already submitted") == 2
