"""Multi-node training on a real 3-node Slurm (slurm_cluster.py --nodes 3: network namespaces on this machine),
through the commands a user types: `sbatch --nodes=2 slurm/train.sbatch`, `torchrun --nnodes 2`, `mor-ds sweep`.

Every training run is the tiny MoR on 2 nodes x 2 ranks over gloo, and its per-step losses must equal those of a
4-process run on one machine (torchrun, no Slurm) with the same config: placement changes nothing, not even the
last bit. The cluster's daemons start once for the whole module. Job states are polled with deadlines; nothing
sleeps to synchronise.
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
from slurm_jobs import finished, hostnames, job_env, job_field, text, wait_for

from mor_ds.distributed import free_port
from mor_ds.train.callbacks.metrics import read_metrics
from mor_ds.train.checkpoint_dir import latest_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MOR_DS = str(Path(sys.executable).parent / "mor-ds")
NODES = 3
VOCAB = 512
STEPS = 12
TIMEOUT = 300


def train_sets(cache: Path, zero: int, *extra: str) -> list[str]:
    return [f"model.vocab_size={VOCAB}", f"data.cache_dir={cache}", "train.seq_len=64", "train.micro_batch_size=2",
            "train.global_batch_size=8", f"train.max_steps={STEPS}", "train.log_interval=1",
            "train.eval_interval=1000", f"train.zero_stage={zero}", "checkpoint.interval=4", "wandb.mode=disabled",
            *extra]


def train_args(run_dir: Path, sets: list[str]) -> list[str]:
    args = ["train", "--config", "tiny-mor", "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def one_machine(cache, tmp_path_factory):
    """losses(zero): per-step losses of the 4-process run on one machine (torchrun), computed once per stage."""
    done: dict[int, dict[int, float]] = {}

    def reference(zero: int) -> dict[int, float]:
        if zero not in done:
            run_dir = tmp_path_factory.mktemp(f"one-machine-zero{zero}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "-m", "mor_ds.cli",
                   *train_args(run_dir, train_sets(cache, zero))]
            proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            done[zero] = losses(run_dir)
            assert sorted(done[zero]) == list(range(1, STEPS + 1))
        return done[zero]

    return reference


def submit(tmp_path: Path, cache: Path, zero: int, *extra: str) -> tuple[str, Path, Path]:
    """`sbatch --nodes=2 --ntasks-per-node=2 slurm/train.sbatch tiny-mor …`: (job id, run dir, job log)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=30", f"--output={log}", str(REPO / "slurm" / "train.sbatch"), "tiny-mor"]
    for s in train_sets(cache, zero, *extra):
        cmd += ["--set", s]
    job = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=job_env(MOR_DS_RUN_DIR=str(run_dir), MOR_DS_CMD=MOR_DS)).stdout.strip()
    return job, run_dir, log


def starts(run_dir: Path) -> list[dict[str, str]]:
    """slurm-jobs.tsv: one record per start of the job (job, restart, nodes, tasks, log)."""
    return [dict(field.split("=", 1) for field in line.split("\t")[1:])
            for line in text(run_dir / "slurm-jobs.tsv").splitlines()]


def assert_trained_like_one_machine(run_dir: Path, log: Path, reference: dict[int, float]) -> str:
    out = text(log)
    assert "4 process(es)" in out
    assert losses(run_dir) == reference  # bit-identical, step by step
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final.name
    return out


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_nodes_train_like_one_machine(cluster, cache, one_machine, tmp_path, jobs, zero):
    job, run_dir, log = submit(tmp_path, cache, zero)
    jobs.append(job)
    assert wait_for(lambda: finished(job), "the job to finish", log=log) == "COMPLETED", text(log)
    (start,) = starts(run_dir)
    assert len(hostnames(start["nodes"])) == 2 and start["tasks"] == "4"
    assert_trained_like_one_machine(run_dir, log, one_machine(zero))
    # every rank, on either node, wrote its optimizer shard into the one shared run directory
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in final.glob("zero_pp_rank_*_optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)]
    if zero == 3:  # and its parameter shard
        assert sorted(p.name for p in final.glob("zero_pp_rank_*_model_states.pt")) == [
            f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(4)]


def test_sigusr1_requeue_resumes_on_other_nodes(cluster, cache, one_machine, tmp_path, jobs):
    job, run_dir, log = submit(tmp_path, cache, 2)
    jobs.append(job)
    wait_for(lambda: re.search(r"^step [2-9]\d*/", text(log), re.M), "training to reach step 2", log=log)
    first_nodes = hostnames(starts(run_dir)[0]["nodes"])
    # the job's first node takes no new work: the requeued job must run on the other two
    cluster.scontrol("update", f"nodename={first_nodes[0]}", "state=drain", "reason=test:move-the-job")
    try:
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        stopped = int(wait_for(lambda: re.search(r"SIGUSR1 received: stopped after step (\d+)", text(log)),
                               "the trainers to stop on SIGUSR1", log=log).group(1))
        assert wait_for(lambda: finished(job), "the requeued job to finish", log=log) == "COMPLETED", text(log)
    finally:
        cluster.scontrol("update", f"nodename={first_nodes[0]}", "state=resume")
    first, second = starts(run_dir)
    assert second["restart"] == "1" and job_field(job, "Restarts") == "1"
    assert first_nodes[0] not in hostnames(second["nodes"]) and len(hostnames(second["nodes"])) == 2
    out = assert_trained_like_one_machine(run_dir, log, one_machine(2))
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in out
    # each optimizer step trained exactly once over both starts
    assert [int(s) for s in re.findall(rf"^step (\d+)/{STEPS} ", out, re.M)] == list(range(1, STEPS + 1))


def test_a_node_dies_mid_job_and_the_requeued_job_resumes_on_the_others(cluster, cache, one_machine, tmp_path,
                                                                         jobs):
    """The second node of a running ZeRO-3 job dies (link down, then its slurmd and ranks killed): the ranks on
    the first node give up within train.collective_timeout_s and say so, Slurm marks the node DOWN and requeues the
    job (NODE_FAIL), and the job resumes on the two nodes left from the last complete checkpoint."""
    timeout = 15
    job, run_dir, log = submit(tmp_path, cache, 3, f"train.collective_timeout_s={timeout}")
    jobs.append(job)
    wait_for(lambda: re.search(r"^step [5-9]/", text(log), re.M), "training past the step-4 checkpoint", log=log)
    cluster.scontrol("suspend", job)  # freezes every rank (SIGSTOP), so the failure lands mid-run
    first_nodes = hostnames(starts(run_dir)[0]["nodes"])
    dead = first_nodes[1]  # not the batch script's node: the log and rank 0 live on
    last_complete = latest_checkpoint(run_dir / "checkpoints").step
    cluster.fail_node(dead)
    try:
        cluster.scontrol("resume", job)
        survivors = wait_for(
            lambda: len(found := re.findall(r"^mor-ds train: rank (\d) on (\S+): lost contact with the other ranks "
                                            r"after step \d+ \(", text(log), re.M)) == 2 and found,
            "both survivors to report the lost peers", deadline=timeout + 30, log=log)
        assert sorted(survivors) == [("0", first_nodes[0]), ("1", first_nodes[0])]
        assert f"train.collective_timeout_s={timeout}" in text(log)
        assert wait_for(lambda: finished(job), "the requeued job to finish", log=log) == "COMPLETED", text(log)
    finally:
        cluster.revive_node(dead)
    out = text(log)
    assert "DUE TO NODE FAILURE" in out  # Slurm's own account of the failure, in the same log
    first, second = starts(run_dir)
    assert second["restart"] == "1" and dead not in hostnames(second["nodes"])
    assert f"resumed from {run_dir}/checkpoints/step_{last_complete:08d} at step {last_complete}" in out
    # nothing lost: every step's loss, retrained after the resume where needed, is the one-machine run's
    assert_trained_like_one_machine(run_dir, log, one_machine(3))


def test_torchrun_two_nodes_c10d_without_slurm(cluster, cache, one_machine, tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d` on node1 and node2, as docs/training.md shows it."""
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"node1:{free_port()}", "--rdzv-id", "c10d-test",
                "-m", "mor_ds.cli", *train_args(run_dir, train_sets(cache, 2))]
    env = job_env()
    env.pop("SLURM_CONF", None)  # no Slurm involved
    agents = [subprocess.Popen(cluster.node_command(node, torchrun), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for node in ("node1", "node2")]
    try:
        outputs = [agent.communicate(timeout=TIMEOUT)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "4 process(es)" in "".join(outputs)
    assert losses(run_dir) == one_machine(2)


def test_sweep_arms_span_two_nodes(cluster, cache, tmp_path, jobs):
    """The shipped tiny sweep with `slurm: {nodes: 2}`: each arm's job runs on two nodes, one rank on each."""
    data = yaml.safe_load((REPO / "slurm" / "sweeps" / "tiny.yaml").read_text())
    data["set"].update({"model.vocab_size": VOCAB, "data.cache_dir": str(cache), "wandb.mode": "disabled"})
    data["slurm"]["nodes"] = 2
    data["output_dir"] = str(tmp_path / "sweep")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.run([MOR_DS, "sweep", str(path)], capture_output=True, text=True, cwd=tmp_path,
                          env=job_env())
    assert proc.returncode == 0, proc.stderr
    state = json.loads((tmp_path / "sweep" / "sweep-state.json").read_text())["arms"]
    jobs.extend(r["job_id"] for r in state.values())
    assert list(state) == ["tiny-vanilla", "tiny-mor-nr2"]
    for arm, steps in (("tiny-vanilla", 20), ("tiny-mor-nr2", 24)):
        arm_dir, job = tmp_path / "sweep" / arm, state[arm]["job_id"]
        log = arm_dir / f"slurm-{job}.out"
        assert wait_for(lambda job=job: finished(job), f"arm {arm} to finish", log=log) == "COMPLETED", text(log)
        (start,) = starts(arm_dir)
        assert len(hostnames(start["nodes"])) == 2 and start["tasks"] == "2"
        assert "2 process(es)" in text(log)
        assert [r["step"] for r in read_metrics(arm_dir / "metrics.jsonl")] == list(range(1, steps + 1))


def test_prepare_as_an_array_job_then_a_merge_equals_one_host(cluster, tokenizer_path, tmp_path, jobs):
    """`sbatch --array=0-2 slurm/prepare.sbatch …` (one part per node) then the merge job (afterok): the shard set
    is the one-host `mor-data prepare`'s, byte for byte, under one verified index."""
    from data_pipeline.prepare import prepare
    from data_pipeline.shards import ShardIndex
    from data_pipeline.testing import embedded_sample, fineweb_records, write_records

    records = fineweb_records(embedded_sample(40, max_chars=1500))
    for k in range(6):
        write_records(tmp_path / "corpus" / f"part-{k}.jsonl.zst", records[k * 7:(k + 1) * 7])
    source = str(tmp_path / "corpus" / "*.jsonl.zst")
    shape = ["--shard-tokens", "1000", "--frame-tokens", "300"]
    one_host = prepare(source, tokenizer_path, str(tmp_path / "one-host"), workers=0, shard_tokens=1000,
                       frame_tokens=300, show_progress=False)
    out, script = tmp_path / "shards", str(REPO / "slurm" / "prepare.sbatch")
    env = job_env(MOR_DATA_CMD=str(Path(sys.executable).parent / "mor-data"))

    def sbatch(*args: str) -> str:
        job = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--time=10", *args], check=True,
                             capture_output=True, text=True, cwd=tmp_path, env=env).stdout.strip()
        jobs.append(job)
        return job

    array = sbatch("--array=0-2", "--exclusive", f"--output={tmp_path}/part-%a.out", script, "--source", source,
                   "--tokenizer", tokenizer_path, "--out", str(out), "--workers", "0", *shape)
    merge = sbatch(f"--dependency=afterok:{array}", f"--output={tmp_path}/merge.out", script, "--merge", str(out))
    log = tmp_path / "merge.out"
    assert wait_for(lambda: finished(merge), "the merge job to finish", log=log) == "COMPLETED", text(log)
    assert "(merged from 3 parts, verified)" in text(log)
    assert sorted(job_field(f"{array}_{k}", "NodeList") for k in range(3)) == cluster.nodes  # a part per node
    merged = ShardIndex.load(out)
    assert merged.shards == one_host.shards and merged.totals == one_host.totals and merged.source["parts"] == 3
    assert {p.name: p.read_bytes() for p in out.glob("shard_*.zst")} == {
        p.name: p.read_bytes() for p in (tmp_path / "one-host").glob("shard_*.zst")}
    assert not (out / "parts").exists()
