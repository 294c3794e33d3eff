"""`mor-ds train` end to end: real DeepSpeed over gloo, 2 processes, the embedded corpus, real wandb offline.

Launchers: torchrun for most runs; "srun-style" (each rank started with SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID,
as srun does) where a test needs every process's own exit code. A tiny MoR (d=128, vocab 512, seq 64) keeps a
run at a few seconds; 12 steps of 16 sequences (gradient accumulation 2 on 2 ranks).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mor_ds.config import load_config
from mor_ds.distributed import free_port
from mor_ds.train.callbacks.metrics import read_metrics
from mor_ds.train.checkpoint_dir import COMPLETE, is_complete, latest_checkpoint, step_tag, verify_checkpoint
from mor_ds.train.faults import (EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_SAVE_FAILED,
                                 FAULT_ENV)

sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import history, run_info

pytestmark = pytest.mark.slow

VOCAB = 512
STEPS = 12
TIMEOUT = 300


def overrides(cache: Path, zero: int, *extra: str) -> list[str]:
    return [f"model.vocab_size={VOCAB}", "train.seq_len=64", "train.micro_batch_size=4",
            "train.global_batch_size=16", f"train.max_steps={STEPS}", "train.log_interval=1",
            "train.eval_interval=6", "train.eval_batches=2", f"train.zero_stage={zero}", "checkpoint.interval=3",
            "checkpoint.keep_last=2", f"data.cache_dir={cache}", "wandb.enabled=false", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", FAULT_ENV) and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def _train_args(run_dir: Path, sets: list[str], config: str = "tiny-mor") -> list[str]:
    args = ["train", "--config", config, "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def torchrun(run_dir: Path, sets: list[str], nproc: int = 2, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "mor_ds.cli", *_train_args(run_dir, sets)]
    return subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sigint_default() -> None:
    """Ctrl-C as in a terminal, even when pytest itself runs with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def srun_env(rank: int, ntasks: int, port: str, **env: str) -> dict[str, str]:
    return _env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank), SLURM_NODELIST="localhost",
                SLURM_JOB_ID="4242", MASTER_PORT=port, **env)


def srun_style(run_dir: Path, sets: list[str], ntasks: int = 2, config: str = "tiny-mor",
               **env: str) -> list[subprocess.Popen]:
    """The ranks as srun starts them: rank/world/local rank from SLURM_*, no torchrun agent."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "mor_ds.cli", *_train_args(run_dir, sets, config)],
                             env=srun_env(rank, ntasks, port, **env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, preexec_fn=_sigint_default)
            for rank in range(ntasks)]


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def run_ok(run_dir: Path, sets: list[str], nproc: int = 2, **env: str) -> str:
    code, out = finish(torchrun(run_dir, sets, nproc, **env))
    assert code == 0, out[-4000:]
    return out


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen]) -> None:
    """Poll metrics.jsonl until `step` is logged (fails if the run ends first)."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and any(r["step"] >= step for r in read_metrics(path)):
            return
        assert all(p.poll() is None for p in procs), "the run ended before the step to interrupt it at"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its workers in their own sessions)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in descendants(c)]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def assert_learns(run_dir: Path) -> None:
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[1] > math.log(VOCAB) - 0.3  # starts near uniform
    assert loss[STEPS] < loss[1] - 0.8, loss


# ------------------------------------------------------------------------------------------------
# ZeRO-2 reference run (W&B offline): training, logging, export


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("ref")
    out = run_ok(run_dir, overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test"))
    assert "Warning" not in out, out  # e.g. DeepSpeed's deprecated torch.distributed calls, once per rank
    return run_dir


def test_zero2_learns_and_logs_every_metric(reference):
    assert_learns(reference)
    records = read_metrics(reference / "metrics.jsonl")
    first = records[0]
    for key in ("step", "loss", "lr", "tokens", "flops", "grad_norm", "aux/router_bce", "depth_frac/0",
                "depth_frac/1", "router_weight/mean", "perf/tokens_per_s", "perf/tflops_per_gpu",
                "perf/data_wait_frac", "perf/peak_rss_gib"):
        assert key in first, key
    assert [r["tokens"] for r in records] == [16 * 64 * s for s in range(1, STEPS + 1)]
    assert first["depth_frac/0"] == 1.0 and first["depth_frac/1"] == 0.5  # expert-choice capacities 1, 1/2
    assert [r["step"] for r in records if "val/loss" in r] == [6, 12]
    assert records[-1]["lr"] == 0.0  # wsd decays to min_lr = 0 at the last step
    cfg_text = (reference / "config.yaml").read_text()
    assert "zero_stage: 2" in cfg_text and f"vocab_size: {VOCAB}" in cfg_text
    ckpts = reference / "checkpoints"
    assert latest_checkpoint(ckpts).tag == step_tag(STEPS)
    assert sorted(p.name for p in ckpts.glob("step_*")) == [step_tag(9), step_tag(12)]  # keep_last=2


def test_wandb_offline_run_holds_the_logged_metrics(reference):
    (wandb_file,) = (reference / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(wandb_file)
    logged = {r["step"]: r for r in read_metrics(reference / "metrics.jsonl")}
    assert [row["_step"] for row in rows] == sorted(logged)
    for row in rows:
        rec = logged[row["_step"]]
        assert row["loss"] == rec["loss"] and row["lr"] == rec["lr"] and row["tokens"] == rec["tokens"]
    assert rows[-1]["val/loss"] == logged[STEPS]["val/loss"]
    info = run_info(wandb_file)
    assert info["project"] == "mor-ds-test"
    assert info["config"]["train"]["zero_stage"] == 2 and info["config"]["world_size"] == 2


def live_val_loss(run_dir: Path) -> float:
    """The engine's validation loss at the last step: mean over both ranks' first 2 val batches."""
    return read_metrics(run_dir / "metrics.jsonl")[-1]["val/loss"]


def two_rank_val_loss(model: torch.nn.Module, cache: Path) -> float:
    """The same validation loss from a plain (exported or consolidated) model, in this one process."""
    from mor_ds.distributed import DistEnv
    from mor_ds.train.callbacks.evaluate import evaluate
    from mor_ds.train.data import resolve_data, shard_loader

    cfg = load_config("tiny-mor", overrides(cache, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training processes ran
    try:
        per_rank = []
        for rank in range(2):
            env = DistEnv(rank, 2, rank, "127.0.0.1", 0)
            shard_dir, tokenizer = resolve_data(cfg, env)
            per_rank.append(evaluate(model, shard_loader(cfg, env, shard_dir, tokenizer, "val"), 2,
                                     torch.device("cpu"))["val/loss"])
    finally:
        torch.set_num_threads(threads)
    return sum(per_rank) / 2


def test_export_loads_and_matches_the_live_eval_loss(reference, cache, tmp_path):
    from mor_ds.weights import load_model
    from mor_ds.cli import main

    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(reference), "--out", str(out)]) == 0
    model, cfg = load_model(out)
    assert cfg.train.zero_stage == 2 and cfg.model.vocab_size == VOCAB
    assert two_rank_val_loss(model, cache) == pytest.approx(live_val_loss(reference), rel=1e-6, abs=0)
    # the CLI eval of the export (one process: rank 0's view of the val shards)
    result_file = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out), "--batches", "2", "--json", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    assert result["val/batches"] == 2 and math.isfinite(result["val/loss"])
    assert result["val/ppl"] == pytest.approx(math.exp(result["val/loss"]))


# ------------------------------------------------------------------------------------------------
# faults and resume


def test_kill9_mid_run_then_resume_auto_reproduces_every_loss(reference, cache, tmp_path):
    sets = overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test")
    proc = torchrun(tmp_path, sets)
    wait_for_step(tmp_path, 7, [proc])  # checkpoints at 3 and 6 are complete
    for pid in [proc.pid, *descendants(proc.pid)]:  # the whole job at once, as a node failure would
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert latest_checkpoint(tmp_path / "checkpoints").step in (6, 9)
    out = run_ok(tmp_path, sets)
    assert "resumed from" in out
    assert f"took over the stale lock {tmp_path}/train.lock of pid " in out and ": that process is gone" in out
    assert losses(tmp_path) == losses(reference)  # bit-identical per-step losses, steps 1..12
    val = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/loss" in r}
    assert val == {r["step"]: r["val/loss"] for r in read_metrics(reference / "metrics.jsonl") if "val/loss" in r}
    # one W&B run: the same id before and after the restart (directories are offline-run-<time>-<id>), kept in the
    # run dir, and the restart rewinds its history to the checkpoint, so steps past it are not logged twice
    resumed_at = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = runs[0].name.rsplit("-", 1)[1]
    assert len(runs) == 2 and runs[1].name.endswith(run_id)
    assert (tmp_path / "wandb" / "run-id").read_text().strip() == run_id
    second = next(runs[1].glob("run-*.wandb"))  # (the first one's wandb service died with the job, unflushed)
    assert run_info(second)["id"] == run_id and run_info(second)["branch_point"] == (run_id, resumed_at)
    assert [r["_step"] for r in history(second)] == list(range(resumed_at + 1, STEPS + 1))
    assert run_info(second)["config"]["provenance"]["resumed_from"].endswith(step_tag(resumed_at))


def test_zero3_torn_checkpoint_is_never_latest(cache, tmp_path):
    sets = overrides(cache, 3, "train.activation_checkpointing=true")
    code, out = finish(torchrun(tmp_path, sets, **{FAULT_ENV: "kill_in_save@6"}))
    assert code != 0
    torn = tmp_path / "checkpoints" / step_tag(6)
    assert torn.is_dir() and any(torn.iterdir()) and not (torn / COMPLETE).exists()  # files written, no commit
    assert (tmp_path / "checkpoints" / "latest").read_text() == step_tag(3)
    first_attempt = losses(tmp_path)
    out = run_ok(tmp_path, sets)
    assert f"{step_tag(3)} at step 3" in out
    assert_learns(tmp_path)  # ZeRO-3 trains
    resumed = losses(tmp_path)
    assert all(resumed[s] == first_attempt[s] for s in (4, 5, 6))  # ZeRO-3 resume is exact too
    # ZeRO-3 shards of an activation-checkpointed model consolidate into the plain model's names and weights
    from mor_ds.weights import load_model

    model, cfg = load_model(tmp_path)
    assert cfg.train.zero_stage == 3 and cfg.train.activation_checkpointing
    assert two_rank_val_loss(model, cache) == pytest.approx(live_val_loss(tmp_path), rel=1e-6, abs=0)
    # step 6 was saved again, then pruned (keep_last=2); no torn directory is left behind
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [step_tag(9), step_tag(12)]
    assert all((p / COMPLETE).exists() for p in (tmp_path / "checkpoints").glob("step_*"))


def test_zero1_nan_step_is_skipped_and_sigterm_leaves_a_resumable_checkpoint(cache, tmp_path):
    sets = overrides(cache, 1)
    procs = srun_style(tmp_path, sets, **{FAULT_ENV: "nan_loss@2"})
    wait_for_step(tmp_path, 4, procs)
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the stop is agreed over all ranks
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [EXIT_PREEMPTED] * 2, results[0][1][-3000:]
    assert "SIGTERM received" in results[0][1]
    stopped = max(losses(tmp_path))
    assert latest_checkpoint(tmp_path / "checkpoints").step == stopped
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert math.isnan(records[2]["loss"]) and records[2]["skipped_steps"] == 1
    assert records[1]["skipped_steps"] == 0 and math.isfinite(records[3]["loss"])
    assert "non-finite loss or gradients, update skipped" in results[0][1]
    out = run_ok(tmp_path, sets)
    assert f"at step {stopped}" in out
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["skipped_steps"] == 1
    assert records[-1]["loss"] < records[0]["loss"] - 0.8  # ZeRO-1 trains


def test_ctrl_c_on_one_rank_stops_both_after_the_step_with_a_checkpoint(reference, cache, tmp_path):
    sets = overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test")
    procs = srun_style(tmp_path, sets, **{FAULT_ENV: "interrupt@5"})  # rank 0 gets a SIGINT after step 5
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [EXIT_INTERRUPTED] * 2, results[0][1][-3000:]
    out = results[0][1]
    assert "[mor-ds] Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop at once" in out
    assert "[mor-ds] Ctrl-C: stopped after step 5 with a checkpoint; run the same command again" in out
    assert all("Traceback" not in o and "KeyboardInterrupt" not in o for _, o in results)
    assert latest_checkpoint(tmp_path / "checkpoints").step == 5 and max(losses(tmp_path)) == 5
    run_ok(tmp_path, sets)
    assert losses(tmp_path) == losses(reference)  # the interrupted run continues exactly
    # one W&B run in two offline segments: steps 1-5, then from the checkpoint on, rewound to it
    first, second = (next(d.glob("run-*.wandb")) for d in sorted((tmp_path / "wandb").glob("offline-run-*")))
    run_id = (tmp_path / "wandb" / "run-id").read_text().strip()
    assert (run_info(first)["id"], run_info(first)["branch_point"]) == (run_id, None)
    assert [r["_step"] for r in history(first)] == [1, 2, 3, 4, 5]
    assert (run_info(second)["id"], run_info(second)["branch_point"]) == (run_id, (run_id, 5))
    assert [r["_step"] for r in history(second)] == list(range(6, STEPS + 1))


def test_a_second_ctrl_c_stops_at_once_without_saving(cache, tmp_path):
    sets = overrides(cache, 2)
    # the first Ctrl-C after step 5; the second while step 5's checkpoint is being written
    (proc,) = srun_style(tmp_path, sets, ntasks=1, **{FAULT_ENV: "interrupt@5,interrupt_in_save@5"})
    code, out = finish(proc)
    assert code == EXIT_INTERRUPTED, out[-3000:]
    assert out.strip().splitlines()[-1] == ("mor-ds train: stopped at once by a second Ctrl-C, without saving; the "
                                            "same command continues from the last complete checkpoint")
    assert "Traceback" not in out
    torn = tmp_path / "checkpoints" / step_tag(5)
    assert torn.is_dir() and not (torn / COMPLETE).exists()
    assert latest_checkpoint(tmp_path / "checkpoints").step == 3


def test_a_dead_wandb_service_costs_a_line_not_a_checkpoint_or_a_traceback(cache, tmp_path):
    """Slurm signals every process of a job, wandb's service included: the trainer still checkpoints and stops,
    and what wandb could not do is one line each, not the 30-line traceback of its exit hook."""
    sets = overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test")
    (proc,) = srun_style(tmp_path, sets, ntasks=1)
    wait_for_step(tmp_path, 2, [proc])
    (service,) = [pid for pid in descendants(proc.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "wandb-core"]
    os.kill(service, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out and "socket.send()" not in out, out[-3000:]
    assert "[mor-ds] SIGTERM received: stopped after step" in out
    assert latest_checkpoint(tmp_path / "checkpoints").step == max(losses(tmp_path))


def test_nan_steps_in_a_row_abort_with_a_checkpoint(cache, tmp_path):
    sets = overrides(cache, 2, "train.max_bad_steps=2")
    (proc,) = srun_style(tmp_path, sets, ntasks=1, **{FAULT_ENV: "nan_loss@2,nan_loss@3"})
    code, out = finish(proc)
    assert code == EXIT_NONFINITE, out[-3000:]
    assert "aborting at step 3: 2 steps in a row had NaN/Inf loss or gradients (train.max_bad_steps=2)" in out
    assert latest_checkpoint(tmp_path / "checkpoints").step == 3
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]


def test_demo_trains_exports_evaluates_and_plots(cache, tmp_path, capsys):
    from mor_ds.cli import main

    code = main(["demo", "--run-dir", str(tmp_path), "--steps", "4", "--set", f"model.vocab_size={VOCAB}",
                 "--set", f"data.cache_dir={cache}", "--set", "train.seq_len=64", "--set", "train.eval_batches=2",
                 "--set", "wandb.enabled=false"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "== 4/4 summary" in out and "val loss" in out
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    assert not distributed_env_left_behind()


def distributed_env_left_behind() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() or any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))


@pytest.mark.slurm
def test_srun_launch_trains_exactly_like_torchrun(reference, cache, tmp_path):
    """A real `srun -n 2`: rank, world, master address (first host of SLURM_NODELIST) and port (from the job id)
    come from Slurm alone, and the run's per-step losses equal the torchrun reference's."""
    from slurm_cluster import ClusterUnavailable, ensure_cluster

    try:
        cluster = ensure_cluster()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    cmd = ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--kill-on-bad-exit=1", sys.executable, "-m",
           "mor_ds.cli", *_train_args(tmp_path, overrides(cache, 2))]
    proc = subprocess.run(cmd, env=_env(**cluster.env), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "2 process(es)" in proc.stdout
    assert losses(tmp_path) == losses(reference)


def test_model_vocab_smaller_than_the_tokenizer_fails_in_one_line(cache, tmp_path, capsys):
    from mor_ds.cli import main

    (root,) = cache.glob(f"embedded-*-vocab{VOCAB}")
    code = main(["train", "--config", "tiny-mor", "--run-dir", str(tmp_path), "--set", "model.vocab_size=256",
                 "--set", f"data.source={root / 'shards'}", "--set", f"data.prepared_dir={root / 'shards'}",
                 "--set", f"data.tokenizer={root / 'tokenizer.model'}", "--set", "wandb.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"mor-ds train: model.vocab_size=256: smaller than the tokenizer's vocabulary ({VOCAB} ids "
                       f"in {root / 'tokenizer.model'})")


# ------------------------------------------------------------------------------------------------
# nothing silently wrong: the run dir lock, damaged checkpoints, NaN runs, failed saves and loads, damaged shards


def test_a_second_training_into_a_run_dir_is_refused_naming_the_holder(reference, cache, tmp_path):
    """Two trainings into one run dir used to both exit 0, one's metrics beside the other's config and weights."""
    sets = overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test")
    first = torchrun(tmp_path, sets)
    wait_for_step(tmp_path, 2, [first])
    job = [first.pid, *descendants(first.pid)]
    for pid in job:  # held still, so that it is surely running when the second one starts
        os.kill(pid, signal.SIGSTOP)
    try:
        config = (tmp_path / "config.yaml").read_text()
        holder = json.loads((tmp_path / "train.lock").read_text())
        (second,) = srun_style(tmp_path, overrides(cache, 2, "optim.lr=0.01"), ntasks=1)
        code, out = finish(second)
    finally:
        for pid in job:
            os.kill(pid, signal.SIGCONT)
    assert code == EXIT_CONFIG, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(
        f"mor-ds train: --run-dir {tmp_path}: in use by another training (pid {holder['pid']} on {holder['host']}, "
        f"started ")
    assert (tmp_path / "config.yaml").read_text() == config
    code, out = finish(first)
    assert code == 0, out[-3000:]
    assert losses(tmp_path) == losses(reference)  # the refused start changed nothing
    assert not (tmp_path / "train.lock").exists()  # released at the end


def test_a_damaged_checkpoint_is_passed_over_and_the_resume_stays_exact(reference, cache, tmp_path):
    """A flipped byte in the optimizer state used to resume silently and diverge: now the newest intact checkpoint
    is taken instead, the damaged file named, and the resumed run reproduces the uninterrupted one."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    last = run / "checkpoints" / step_tag(STEPS)
    shard = last / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's: verified by rank 1, named by rank 0
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    out = run_ok(run, overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test"))
    assert (f"[mor-ds] checkpoint {last} is damaged: {shard}: content differs from its xxh3_128 digest (corrupt); "
            f"marked it CORRUPT, trying the next newest, {step_tag(9)}") in out
    assert f"resumed from {run / 'checkpoints' / step_tag(9)} at step 9" in out
    assert losses(run) == losses(reference)
    assert (last / COMPLETE).exists() and not (last / "CORRUPT").exists()  # step 12 saved anew


def test_nan_runs_never_end_in_exit_0_or_in_a_checkpoint_of_nan_weights(cache, tmp_path):
    sets = overrides(cache, 2)
    (proc,) = srun_style(tmp_path / "streak", sets, ntasks=1, **{FAULT_ENV: "nan_loss@11,nan_loss@12"})
    code, out = finish(proc)
    assert code == EXIT_NONFINITE, out[-3000:]
    assert ("the budget ended at step 12 in 2 NaN/Inf steps in a row: the run did not finish healthy; the checkpoint "
            "of step 12 holds the weights of step 10, the last applied update, and the earlier checkpoints are kept"
            ) in out
    kept = sorted(p.name for p in (tmp_path / "streak" / "checkpoints").glob("step_*"))
    assert kept == [step_tag(6), step_tag(9), step_tag(12)]  # keep_last=2, but a save in a NaN streak prunes nothing
    (proc,) = srun_style(tmp_path / "poisoned", sets, ntasks=1, **{FAULT_ENV: "nan_weight@5"})
    code, out = finish(proc)
    assert code == EXIT_NONFINITE, out[-3000:]
    ckpts = tmp_path / "poisoned" / "checkpoints"
    assert out.strip().splitlines()[-1] == (
        f"mor-ds train: step 6: the model weights hold NaN/Inf; no checkpoint written (the newest checkpoint "
        f"{ckpts / step_tag(3)} (step 3) is kept): resume from it with a lower optim.lr or check the data")
    assert latest_checkpoint(ckpts).step == 3 and not (ckpts / step_tag(6)).exists()


def _mount_namespace() -> list[str] | None:
    """A command prefix that runs in a private mount namespace where tmpfs can be mounted, or None."""
    prefix = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    try:
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"], capture_output=True)
    except FileNotFoundError:
        return None
    return prefix if probe.returncode == 0 else None


_LAUNCH = """import json, subprocess, sys
jobs = json.loads(open(sys.argv[1]).read())
procs = [subprocess.Popen(j["cmd"], env=j["env"], stdout=open(j["log"], "w"), stderr=subprocess.STDOUT) for j in jobs]
for p, j in zip(procs, jobs):
    open(j["log"] + ".code", "w").write(str(p.wait()))
"""


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, cache, tmp_path):
    """ENOSPC inside DeepSpeed's save was a traceback on one rank and a hang on the other: now every rank stops
    with exit 5 and one line, the partial checkpoint is removed, the previous one stays latest and resumes exactly."""
    prefix = _mount_namespace()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare --mount) to fill a small tmpfs")
    run, saved = tmp_path / "run", tmp_path / "saved"
    (run / "checkpoints").mkdir(parents=True)
    sets = overrides(cache, 2, "wandb.enabled=true", "wandb.project=mor-ds-test")
    port = str(free_port())
    jobs = [{"cmd": [sys.executable, "-m", "mor_ds.cli", *_train_args(run, sets)], "env": srun_env(r, 2, port),
             "log": str(tmp_path / f"rank{r}.log")} for r in range(2)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "launch.py").write_text(_LAUNCH)
    # one checkpoint is ~13 MB: the one of step 3 fits in 20 MB, the one of step 6 does not
    script = (f"mount -t tmpfs -o size=20m none {run / 'checkpoints'} && {sys.executable} {tmp_path / 'launch.py'} "
              f"{tmp_path / 'jobs.json'} && cp -a {run / 'checkpoints'} {saved}")
    proc = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = [int((tmp_path / f"rank{r}.log.code").read_text()) for r in range(2)]
    out0 = (tmp_path / "rank0.log").read_text()
    assert codes == [EXIT_SAVE_FAILED] * 2, out0[-3000:]
    ckpts = run / "checkpoints"
    line = out0.strip().splitlines()[-1]
    assert line.startswith(f"mor-ds train: saving checkpoint {ckpts / step_tag(6)} failed (rank ")
    assert "No space left on device (ENOSPC)" in line and line.endswith(
        f"removed the partial {step_tag(6)}, the previous checkpoint {ckpts / step_tag(3)} is intact and stays latest")
    assert sorted(p.name for p in saved.glob("step_*")) == [step_tag(3)]
    assert latest_checkpoint(saved).step == 3 and verify_checkpoint(latest_checkpoint(saved)) == []
    shutil.rmtree(ckpts)
    shutil.copytree(saved, ckpts)  # the same directory on a disk with room again: the run resumes from step 3
    out = run_ok(run, sets)
    assert f"resumed from {ckpts / step_tag(3)} at step 3" in out
    assert losses(run) == losses(reference)


def test_resuming_another_model_shape_or_family_is_a_one_line_error(reference, cache, tmp_path):
    for config, extra in (("tiny-mor", ["model.hidden_size=64"]), ("tiny-vanilla", [])):
        run = tmp_path / config
        shutil.copytree(reference / "checkpoints", run / "checkpoints")
        results = [finish(p) for p in srun_style(run, overrides(cache, 2, *extra), config=config)]
        assert [code for code, _ in results] == [EXIT_CONFIG] * 2, results[0][1][-3000:]
        out = results[0][1]
        assert "Traceback" not in out
        line = out.strip().splitlines()[-1]
        assert line.startswith("mor-ds train: ") and "model." in line and step_tag(STEPS) in line, line


def _private_shards(cache: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the embedded shards (to damage) and the overrides that train on it."""
    (root,) = cache.glob(f"embedded-*-vocab{VOCAB}")
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    return shards, [f"data.prepared_dir={shards}", f"data.tokenizer={root / 'tokenizer.model'}"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_validation_shard_damaged_mid_run_stops_with_a_checkpoint(cache, tmp_path):
    """A validation read error used to crash the run at its eval, at the end of a budget before the final save."""
    from data_pipeline.loader import held_out
    from data_pipeline.shards import ShardIndex

    shards, data_sets = _private_shards(cache, tmp_path)
    index = ShardIndex.load(shards)
    (val,) = [shards / index.shards[n].file for n in held_out(index, 1)]
    run = tmp_path / "run"
    (proc,) = srun_style(run, overrides(cache, 2, "train.eval_interval=4", *data_sets), ntasks=1)
    wait_for_step(run, 2, [proc])  # past the start-up check, before the first eval
    proc.send_signal(signal.SIGSTOP)
    _flip_byte(val)
    proc.send_signal(signal.SIGCONT)
    code, out = finish(proc)
    assert code == EXIT_CONFIG, out[-3000:]
    assert (f"data error in the validation at step 4: {val}: SHA-256 differs from the index (corrupt or from another "
            f"prepared set; run `mor-data verify {shards}`); stopped with a checkpoint") in out
    assert latest_checkpoint(run / "checkpoints").step == 4


def test_a_damaged_training_shard_is_found_in_the_background_and_stops_with_a_checkpoint(cache, tmp_path):
    from data_pipeline.loader import ShardLoader

    shards, data_sets = _private_shards(cache, tmp_path)
    sets = overrides(cache, 2, *data_sets)
    loader = ShardLoader(str(shards), 64, 4, seed=load_config("tiny-mor", sets).train.seed)
    last_read = shards / loader.shards[int(loader._epoch_order(0)[-1])].file  # far from the first steps' reads
    _flip_byte(last_read)  # the size stays: start-up passes, only the SHA-256 tells
    run = tmp_path / "run"
    (proc,) = srun_style(run, sets, ntasks=1)
    code, out = finish(proc)
    assert code == EXIT_CONFIG, out[-3000:]
    assert (f"data error: {last_read}: SHA-256 differs from the index (corrupt or from another prepared set) (found "
            f"by the background check of the training shards); stopped with a checkpoint: run `mor-data verify "
            f"{shards}`") in out
    stopped = max(losses(run))
    assert stopped < STEPS and latest_checkpoint(run / "checkpoints").step == stopped


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_signal_during_start_up_is_kept_before_torch_is_even_loaded(cache, tmp_path):
    """SIGUSR1 in the first seconds (imports, DeepSpeed init) used to kill the run (exit 138)."""
    (proc,) = srun_style(tmp_path, overrides(cache, 2), ntasks=1)
    while not _catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None
        time.sleep(0.001)
    assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()  # the handler came first
    proc.send_signal(signal.SIGUSR1)
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "SIGUSR1 received: stopped after step 1 with a checkpoint" in out
    assert latest_checkpoint(tmp_path / "checkpoints").step == 1


# ------------------------------------------------------------------------------------------------
# resume on another number of processes


@pytest.mark.parametrize("zero,before,after", [(0, (2, 2), (1, 2)), (1, (4, 3), (2, 3)), (2, (2, 2), (3, 2)),
                                               (3, (2, 2), (3, 2))],
                         ids=["zero0-2to1", "zero1-4to2", "zero2-2to3", "zero3-2to3"])
def test_resume_on_another_number_of_processes_continues_the_run(cache, tmp_path, zero, before, after):
    """(processes, micro-batch) change across the resume, 12 sequences a step: model, optimizer moments, step,
    schedule and data position continue, so steps 5-8 of the resumed run are the uninterrupted run's steps up to
    the rounding of another reduction order; its final weights are the uninterrupted run's too."""
    (procs, micro), (new_procs, new_micro) = before, after
    sets = [*overrides(cache, zero), "train.max_steps=8", "checkpoint.interval=4", "train.eval_interval=1000",
            "train.global_batch_size=12", *(["train.precision=bf16"] if zero == 0 else [])]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_ok(whole, [*sets, f"train.micro_batch_size={micro}"], nproc=procs)
    # the run directory as a job preempted after step 4 left it, then resumed (--resume auto) on other hardware
    shutil.copytree(whole / "checkpoints" / step_tag(4), resumed / "checkpoints" / step_tag(4))
    (resumed / "checkpoints" / "latest").write_text(step_tag(4))
    out = run_ok(resumed, [*sets, f"train.micro_batch_size={new_micro}"], nproc=new_procs)
    assert f"resumed from {resumed / 'checkpoints' / step_tag(4)} at step 4" in out
    assert f"{new_procs} process(es)" in out and f"grad accumulation {12 // (new_procs * new_micro)}" in out
    if zero:
        assert f"was saved by {procs} process(es): resuming it on {new_procs}" in out
        assert is_complete(resumed / "checkpoints" / step_tag(4) / "universal")
    ref, got = read_metrics(whole / "metrics.jsonl")[4:], read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [5, 6, 7, 8]
    assert [(r["lr"], r["tokens"], r["flops"]) for r in got] == [(r["lr"], r["tokens"], r["flops"]) for r in ref]
    tolerance = 2e-2 if zero == 0 else 1e-4  # bf16 rounds each reduction order differently
    for mine, theirs in zip(got, ref):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=tolerance)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=20 * tolerance)
    for name, weight in final_weights(whole, zero).items():
        torch.testing.assert_close(final_weights(resumed, zero)[name], weight, **(
            {"rtol": 1.6e-2, "atol": 1e-3} if zero == 0 else {"rtol": 0, "atol": 1.5e-5}))  # bf16: ulps, 1/3 of a step


def final_weights(run_dir: Path, zero: int) -> dict[str, torch.Tensor]:
    """The weights of step 8: ZeRO shards consolidated in fp32, or ZeRO-0's module as saved (zero_to_fp32 reads
    ZeRO checkpoints only)."""
    from mor_ds.distributed import consolidate_checkpoint

    if zero:
        return consolidate_checkpoint(run_dir / "checkpoints", step_tag(8))
    saved = torch.load(run_dir / "checkpoints" / step_tag(8) / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    return {name: tensor.float() for name, tensor in saved["module"].items()}


# ------------------------------------------------------------------------------------------------
# a new user's run: a FineWeb-schema corpus prepared into shards, paths relative to where the run starts


NEW_USER_STEPS = 4


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory, cache) -> Path:
    """A directory holding tok.model (the cache's 512-piece tokenizer) and shards/ (a FineWeb-schema .jsonl.zst
    corpus prepared with it, 6 shards), as a user's working directory."""
    import shutil

    from data_pipeline.prepare import prepare
    from data_pipeline.testing import embedded_sample, fineweb_records, write_records

    root = tmp_path_factory.mktemp("newuser")
    (tokenizer,) = cache.glob(f"embedded-*-vocab{VOCAB}/tokenizer.model")
    shutil.copy(tokenizer, root / "tok.model")
    corpus = write_records(root / "corpus" / "fw.jsonl.zst", fineweb_records(embedded_sample(60)))
    prepare(corpus, str(root / "tok.model"), str(root / "shards"), workers=0, shard_tokens=1 << 14,
            show_progress=False)
    return root


def new_user_sets(*extra: str) -> list[str]:
    return [f"model.vocab_size={VOCAB}", "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8",
            f"train.max_steps={NEW_USER_STEPS}", "train.log_interval=1", f"train.eval_interval={NEW_USER_STEPS}",
            "train.eval_batches=1", "checkpoint.interval=2", "data.prepared_dir=shards", "data.tokenizer=tok.model",
            "wandb.enabled=true", "wandb.project=mor-ds-test", *extra]


def mor_ds(cwd: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "mor_ds.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def new_user_run(fineweb) -> Path:
    code, out = mor_ds(fineweb, *_train_args(Path("runs/first"), new_user_sets()))
    assert code == 0, out[-4000:]
    return fineweb / "runs" / "first"


def test_a_run_records_absolute_paths_and_what_it_read(new_user_run, fineweb, tmp_path):
    import hashlib

    from mor_ds.config import load_config
    from mor_ds.provenance import read_provenance
    from mor_ds.train.checkpoint_dir import checkpoint_meta

    data = load_config(str(new_user_run / "config.yaml")).data
    assert (data.prepared_dir, data.tokenizer, data.mode) == (str(fineweb / "shards"), str(fineweb / "tok.model"),
                                                              "prepared")
    assert data.source == str(fineweb / "corpus" / "fw.jsonl.zst")  # what the shards were made from, not "embedded"
    (start,) = read_provenance(new_user_run)
    read = start["data"]
    assert read["train"]["shards"] == str(fineweb / "shards")
    assert read["train"]["index_sha256"] == hashlib.sha256((fineweb / "shards" / "index.json").read_bytes()).hexdigest()
    assert read["tokenizer"]["sha256"] == hashlib.sha256((fineweb / "tok.model").read_bytes()).hexdigest()
    assert read["val"]["split_windows"] > 0 and start["step"] == 0 and start["resumed_from"] is None
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert start["code"]["git_commit"] == head.strip()
    assert checkpoint_meta(latest_checkpoint(new_user_run / "checkpoints"))["provenance"] == start
    (wandb_file,) = (new_user_run / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_info(wandb_file)["config"]["provenance"] == start
    assert (new_user_run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # every run draws its curve
    # the run's relative paths were resolved when it started: eval works from any directory
    code, out = mor_ds(tmp_path, "eval", "--checkpoint", str(new_user_run), "--batches", "1")
    assert code == 0 and "val loss" in out, out[-3000:]
    assert "zero checkpoint" not in out and "Reconstructed fp32" not in out  # DeepSpeed's consolidation banner


def test_a_finished_run_says_so_and_a_resume_never_rewrites_its_config(new_user_run, tmp_path):
    import shutil

    from mor_ds.provenance import read_provenance
    from mor_ds.train.checkpoint_dir import checkpoint_meta

    run = tmp_path / "run"
    shutil.copytree(new_user_run, run, symlinks=True)
    cwd = new_user_run.parent.parent
    config = (run / "config.yaml").read_bytes()
    wandb_dirs = sorted((run / "wandb").glob("offline-run-*"))

    code, out = mor_ds(cwd, *_train_args(run, new_user_sets()))
    assert code == 0, out[-3000:]
    assert (f"{run} already finished: its checkpoint is at step {NEW_USER_STEPS} and the budget "
            f"(train.max_steps={NEW_USER_STEPS}) is {NEW_USER_STEPS} steps; nothing to train") in out
    assert sorted((run / "wandb").glob("offline-run-*")) == wandb_dirs  # no new, empty W&B run
    assert len(read_provenance(run)) == 1

    code, out = mor_ds(cwd, *_train_args(run, new_user_sets("optim.lr=0.01", "model.init_std=0.03",
                                                            "train.max_steps=6")))
    assert code == 2
    assert out.strip().splitlines()[-1].startswith(
        f"mor-ds train: resuming {run / 'checkpoints' / step_tag(NEW_USER_STEPS)} with changed settings: "
        "model.init_std: 0.02 -> 0.03, optim.lr: 0.003 -> 0.01; they change what the run computes (safe to change: "
        "the budget")
    assert (run / "config.yaml").read_bytes() == config and len(read_provenance(run)) == 1

    code, out = mor_ds(cwd, *_train_args(run, new_user_sets("train.max_steps=6")))
    assert code == 0, out[-3000:]
    assert "resuming with changed settings (safe: budget): train.max_steps: 4 -> 6" in out
    assert (run / "config.yaml").read_bytes() == config  # how the run started
    starts = read_provenance(run)
    assert [s["changes"] for s in starts] == [{}, {"train.max_steps": [NEW_USER_STEPS, 6]}]
    assert checkpoint_meta(latest_checkpoint(run / "checkpoints"))["config"]["train"]["max_steps"] == 6


def test_a_run_that_fails_to_start_leaves_no_run_dir(fineweb):
    code, out = mor_ds(fineweb, *_train_args(Path("runs/broken"), new_user_sets("data.tokenizer=missing.model")))
    assert code == 2 and out.strip().splitlines()[-1] == (f"mor-ds train: data error: {fineweb / 'missing.model'}: "
                                                          f"tokenizer file not found")
    assert not (fineweb / "runs" / "broken").exists()


def test_a_data_mixture_trains_resumes_exactly_and_logs_each_sources_tokens(fineweb, tmp_path):
    from data_pipeline.prepare import prepare
    from data_pipeline.testing import embedded_sample, fineweb_records, write_records
    from mor_ds.provenance import read_provenance

    plays = write_records(tmp_path / "plays.jsonl.zst", fineweb_records(embedded_sample(120)[60:], 1000))
    prepare(plays, str(fineweb / "tok.model"), str(tmp_path / "plays"), workers=0, shard_tokens=1 << 14,
            show_progress=False)
    sources = f"[{{path: {fineweb / 'shards'}, weight: 3}}, {{path: {tmp_path / 'plays'}, weight: 1, name: plays}}]"
    sets = [s for s in new_user_sets("wandb.enabled=false", "train.max_steps=6") if not s.startswith("data.")]
    sets += [f"data.sources={sources}", f"data.tokenizer={fineweb / 'tok.model'}"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert [finish(p)[0] for p in srun_style(straight, sets)] == [0, 0]
    assert [finish(p)[0] for p in srun_style(stopped, sets, **{FAULT_ENV: "interrupt@3"})] == [EXIT_INTERRUPTED] * 2
    assert [finish(p)[0] for p in srun_style(stopped, sets)] == [0, 0]
    assert losses(stopped) == losses(straight)  # the mixture resumes bit-exactly
    records = read_metrics(straight / "metrics.jsonl")
    tokens = [(r["data/shards/tokens"], r["data/plays/tokens"]) for r in records]
    assert [a + b for a, b in tokens] == [r["tokens"] for r in records]  # every window is one source's
    assert tokens[-1] == (36 * 64, 12 * 64)  # 6 steps of 8 windows: 3 : 1
    assert records[-1]["data/plays/epochs"] > 0 and "val/loss" in records[-1]
    (start,) = read_provenance(straight)
    assert [(s["name"], s["weight"], s["shards"]) for s in start["data"]["train"]] == [
        ("shards", 0.75, str(fineweb / "shards")), ("plays", 0.25, str(tmp_path / "plays"))]
    # mor-ds eval scores the mixture's held-out windows as the run's last validation did (1 batch of 4 on each of 2
    # ranks: the first 8 windows of the interleave, here 2 batches of 4 on one process)
    from mor_ds.commands.eval import evaluate_checkpoint

    scored = evaluate_checkpoint(str(straight), batches=2)
    assert [(s["name"], s["weight"]) for s in scored["data"]] == [("shards", 3.0), ("plays", 1.0)]
    assert scored["val/loss"] == pytest.approx(records[-1]["val/loss"], rel=1e-4)
