"""Trainer pieces that need no process group: schedules, launch discovery, DeepSpeed config, optimizer groups,
checkpoint resolution, metrics files, fault plans, activation checkpointing, CLI wiring. The multi-process runs
are in tests/integration/test_train_deepspeed.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from mor_ds import distributed
from mor_ds.config import ConfigError, OptimConfig, load_config
from mor_ds.train import checkpoint_dir as ckpt
from mor_ds.train import early_signals
from mor_ds.train.callbacks.metrics import read_metrics, truncate_metrics
from mor_ds.train.callbacks.wandb_logger import resolve_mode
from mor_ds.train.faults import (EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_PREEMPTED, FaultPlan, TrainingAborted,
                                 oom_message, peer_lost_message)
from mor_ds.train.loop import split_batch
from mor_ds.train.optim import param_groups
from mor_ds.train.schedules import lr_at


# ------------------------------------------------------------------------------------------------ schedules


def test_wsd_trapezoid():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, schedule="wsd", warmup_fraction=0.05, decay_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 warmup steps, never 0
    assert lrs[5:80] == [1.0] * 75  # stable
    assert lrs[80] == pytest.approx(1.0 - 0.9 / 20) and lrs[99] == pytest.approx(0.1)  # linear to min_lr
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_cosine_and_constant():
    cos = OptimConfig(lr=2.0, min_lr_ratio=0.0, schedule="cosine", warmup_fraction=0.1)
    lrs = [lr_at(s, 50, cos) for s in range(50)]
    assert lrs[4] == pytest.approx(2.0) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    mid = 5 + 45 // 2
    assert lrs[mid] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * (mid - 5 + 1) / 45)))
    const = OptimConfig(lr=1.0, schedule="constant", warmup_fraction=0.0)
    assert {lr_at(s, 10, const) for s in range(10)} == {1.0}


# ------------------------------------------------------------------------------------------------ launch discovery


def test_discover_torchrun_variables():
    env = distributed.discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                                "MASTER_PORT": "1234"})
    assert env == distributed.DistEnv(3, 8, 1, "n1", 1234)


def test_discover_srun_variables():
    env = distributed.discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                "SLURM_NODELIST": "gpu07", "SLURM_JOB_ID": "777"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu07")
    assert env.master_port == 15000 + 777  # every task derives the same port from the job id


def test_discover_deepspeed_local_rank_argument_and_single_process():
    env = distributed.discover({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "5"}, local_rank_arg=1)
    assert env.local_rank == 1
    alone = distributed.discover({})
    assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1") and alone.master_port > 0


def test_discover_rejects_inconsistent_variables():
    with pytest.raises(distributed.DistributedError, match="RANK='1' and WORLD_SIZE=None"):
        distributed.discover({"RANK": "1"})
    with pytest.raises(distributed.DistributedError, match="SLURM_NTASKS"):
        distributed.discover({"SLURM_PROCID": "0"})
    with pytest.raises(distributed.DistributedError, match="WORLD_SIZE='x' is not an integer"):
        distributed.discover({"RANK": "0", "WORLD_SIZE": "x"})
    with pytest.raises(distributed.DistributedError, match="rank 4 is not in"):
        distributed.discover({"RANK": "4", "WORLD_SIZE": "2"})


def test_slurm_node_range_expands_with_scontrol(tmp_path, monkeypatch):
    if shutil.which("scontrol") is None:
        with pytest.raises(distributed.DistributedError, match=r"SLURM_NODELIST='gpu\[03-04\]'.*set MASTER_ADDR"):
            distributed.slurm_master_addr("gpu[03-04]")
        return
    conf = tmp_path / "slurm.conf"  # scontrol parses a config even just to expand host lists
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert distributed.slurm_master_addr("gpu[03-04]") == "gpu03"
    env = distributed.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "gpu[03-04]",
                                "SLURM_JOB_ID": "1"})
    assert env.master_addr == "gpu03"


# ------------------------------------------------------------------------------------------------ DeepSpeed config


def test_ds_config_is_filled_from_the_config():
    cfg = load_config("tiny-mor", ["train.zero_stage=3", "train.precision=bf16", "train.global_batch_size=64",
                                   "train.micro_batch_size=4", "optim.grad_clip=0.5"])
    ds = distributed.build_ds_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == 3
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (64, 4, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and ds["bf16"]["check_grad_overflow"]
    offload = distributed.build_ds_config(load_config("tiny-mor", ["train.offload_optimizer=true"]), 2)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("preset, whole", [("tiny-vanilla", 6), ("tiny-mor", 2), ("tiny-recursive", 2)])
def test_zero3_fetches_only_blocks_that_run_once_whole(preset, whole):
    """Vanilla: every block is a z3 leaf (one all-gather per block). Shared blocks run Nr times, and DeepSpeed
    reduces a leaf's gradients at each of its backward hooks, so only the middle-cycle prelude/coda blocks are."""
    from deepspeed.utils import z3_leaf_module

    from mor_ds.models import build_model

    model = build_model(load_config(preset).model)
    assert distributed.fetch_blocks_whole(model) == whole
    leaves = [i for i, block in enumerate(model.layers) if z3_leaf_module(block)]
    assert leaves == ([*model.plan.prelude, *model.plan.coda] if whole == 2 else list(range(6)))


def test_ds_config_errors_name_the_key(tmp_path):
    cfg = load_config("tiny-mor", ["train.global_batch_size=24", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=24: must be a multiple of .* 4 × 4"):
        distributed.build_ds_config(cfg, world_size=4)
    with pytest.raises(ConfigError, match="train.zero_stage=0"):
        distributed.build_ds_config(load_config("tiny-mor", ["train.zero_stage=0"]), 1)
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"train.ds_config: {bad} is not valid JSON"):
        distributed.build_ds_config(load_config("tiny-mor", [f"train.ds_config={bad}"]), 1)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_step_clips_skips_nan_and_checks_gradients_in_a_few_kernels(zero_stage):
    """A real one-process DeepSpeed engine (gloo): the bf16 ZeRO-1/2 optimizer step reports the global norm of
    the reference gradients, hands AdamW exactly those gradients clipped to optim.grad_clip, skips a NaN step
    without touching the weights, and runs fewer ops than there are gradient tensors (DeepSpeed's own NaN/Inf
    and norm checks take ~10 ops per tensor; patches.fuse_zero_grad_checks replaces them).

    In a subprocess: DeepSpeed caches the world group, so a second engine after shutdown() in this process (the
    demo test builds one) would find it stale."""
    code = f"import runpy; runpy.run_path({__file__!r})['_zero_step_checks']({zero_stage})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


def _tiny_bf16_run(zero_stage: int, num_layers: int, micro_batch: int, global_batch: int, clip: float):
    """A tiny bf16 vanilla config, its model, a bf16 copy of it as the reference, and an AdamW class that records
    the flat fp32 gradient partition of each group it is handed (in the returned `seen` list)."""
    import copy

    from mor_ds.models import build_model

    cfg = load_config("tiny-vanilla", ["model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=32",
                                       f"model.num_layers={num_layers}", "train.precision=bf16",
                                       f"train.zero_stage={zero_stage}", f"train.micro_batch_size={micro_batch}",
                                       f"train.global_batch_size={global_batch}", f"optim.grad_clip={clip}"])
    seen: list[torch.Tensor] = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.extend(p.grad.clone() for group in self.param_groups for p in group["params"])
            return super().step(closure)

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router)
    return cfg, model, copy.deepcopy(model).bfloat16(), seen, RecordingAdamW


def _zero_step_checks(zero_stage: int) -> None:
    from torch.profiler import profile

    clip = 0.05
    cfg, model, reference, seen, RecordingAdamW = _tiny_bf16_run(zero_stage, 24, 2, 2, clip)
    ids = torch.randint(0, 64, (2, 17))
    reference(ids[:, :-1], labels=ids[:, 1:]).total_loss.backward()
    grads = [p.grad.double() for p in reference.parameters()]
    norm = torch.stack([g.norm() for g in grads]).norm().item()
    assert norm > 10 * clip  # clipping is active
    by_group = ([g for g, p in zip(grads, reference.parameters()) if p.ndim >= 2],  # param_groups: decay first
                [g for g, p in zip(grads, reference.parameters()) if p.ndim < 2])

    env = distributed.discover({})
    distributed.init_distributed(env)
    try:
        engine = distributed.build_engine(model, cfg, env, param_groups(model, cfg.optim),
                                          lambda groups: RecordingAdamW(groups, lr=cfg.optim.lr))
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).total_loss)
        with profile() as prof:
            engine.step()
        assert engine.step_applied() and engine.grad_norm() == pytest.approx(norm, rel=1e-6)
        assert len(seen) == 2
        for flat, group in zip(seen, by_group):  # DeepSpeed scales by 1 / ((norm + 1e-6) / clip)
            expected = torch.cat([g.flatten() for g in group]) * clip / (norm + 1e-6)
            torch.testing.assert_close(flat[:expected.numel()].double(), expected, rtol=1e-6, atol=0)
            assert not flat[expected.numel():].any()  # alignment padding
        aliasing = {"aten::view", "aten::narrow", "aten::detach", "aten::_has_compatible_shallow_copy_type"}
        ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in aliasing
               and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
        assert len(ops) < len(grads), Counter(ops).most_common(5)  # ~120 here; DeepSpeed's own checks: ~2,300

        seen.clear()
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).total_loss * float("nan"))
        engine.step()
        assert not engine.step_applied() and engine.grad_norm() == math.inf and not seen
        assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).total_loss)
        engine.step()
        assert engine.step_applied() and math.isfinite(engine.grad_norm()) and len(seen) == 2
    finally:
        distributed.shutdown()


def test_bf16_gradients_accumulate_in_fp32_with_zero2_and_3(tmp_path):
    def accum_dtype(stage: int, global_batch: int, *extra: str) -> str | None:
        cfg = load_config("tiny-mor", [f"train.zero_stage={stage}", "train.precision=bf16",
                                       "train.micro_batch_size=4", f"train.global_batch_size={global_batch}", *extra])
        return distributed.build_ds_config(cfg, world_size=2).get("data_types", {}).get("grad_accum_dtype")

    assert accum_dtype(2, 64) == accum_dtype(3, 64) == "fp32"
    assert accum_dtype(2, 8) is None  # one micro-batch per step: nothing to accumulate, keep the bf16 partition
    assert accum_dtype(1, 64) is None and accum_dtype(2, 64, "train.offload_optimizer=true") is None
    template = json.loads((distributed.DS_CONFIG_DIR / "zero2.json").read_text())
    bf16_on_purpose = tmp_path / "bf16-accum.json"
    bf16_on_purpose.write_text(json.dumps({**template, "data_types": {"grad_accum_dtype": "bf16"}}))
    assert accum_dtype(2, 64, f"train.ds_config={bf16_on_purpose}") == "bf16"  # the template's choice wins
    zero1_fp32 = tmp_path / "zero1-fp32.json"
    zero1_fp32.write_text(json.dumps({**template, "data_types": {"grad_accum_dtype": "fp32"}}))
    refused = f"train.ds_config: {zero1_fp32}: data_types.grad_accum_dtype=fp32 with ZeRO-1 and bf16 makes"
    with pytest.raises(ConfigError, match=refused):
        accum_dtype(1, 64, f"train.ds_config={zero1_fp32}")


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_accumulated_gradient_is_the_fp32_sum_of_the_micro_batches(zero_stage):
    """8 bf16 micro-batches in one process: ZeRO-2/3 hand AdamW the fp32 sum of the micro-batch gradients (and its
    norm) to ~1e-9, where a bf16 running sum is ~4e-3 off; ZeRO-1 still sums in bf16 (build_ds_config says why).
    A NaN micro-batch skips its step and leaves nothing behind in the fp32 buffer. In a subprocess (see above)."""
    code = f"import runpy; runpy.run_path({__file__!r})['_accumulation_checks']({zero_stage})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


def _accumulation_checks(zero_stage: int) -> None:
    import functools

    gas, micro = 8, 2
    cfg, model, reference, seen, RecordingAdamW = _tiny_bf16_run(zero_stage, 4, micro, gas * micro, clip=0.0)
    windows = torch.randint(0, 64, (3, gas, micro, 33))

    def micro_grads(ids: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each micro-batch's bf16 gradient of loss / gas, as DeepSpeed's backward computes it."""
        out = []
        for batch in ids:
            reference.zero_grad(set_to_none=True)
            (reference(batch[:, :-1], labels=batch[:, 1:]).total_loss / gas).backward()
            out.append([p.grad.clone() for p in reference.parameters()])
        return out

    def by_group(grads: list[torch.Tensor]) -> list[torch.Tensor]:  # param_groups: decay (ndim >= 2) first
        return [torch.cat([g.flatten() for g, p in zip(grads, reference.parameters()) if (p.ndim >= 2) == decay])
                for decay in (True, False)]

    def rel_errors(expected: list[torch.Tensor]) -> list[float]:
        return [((flat[:e.numel()].double() - e).norm() / e.norm()).item() for flat, e in zip(seen, expected)]

    env = distributed.discover({})
    distributed.init_distributed(env)
    try:
        engine = distributed.build_engine(model, cfg, env, param_groups(model, cfg.optim),
                                          lambda groups: RecordingAdamW(groups, lr=0.0))  # weights stay put
        fused_calls = Counter()
        if zero_stage < 3:  # the fused NaN/Inf and norm checks still run on the fp32 partition buffer
            opt = engine._ds.optimizer
            for name in ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct"):
                fused = getattr(opt, name)
                assert fused.__qualname__.startswith("fuse_zero_grad_checks.")
                setattr(opt, name, lambda *a, _f=fused, _n=name, **k: fused_calls.update([_n]) or _f(*a, **k))

        def run_window(ids: torch.Tensor, nan_at: int = -1) -> None:
            seen.clear()
            for k, batch in enumerate(ids):
                loss = engine(batch[:, :-1], labels=batch[:, 1:]).total_loss
                engine.backward(loss * float("nan") if k == nan_at else loss)
                engine.step()

        for window in (0, 2):  # window 1 is the NaN one: what it accumulated must not leak into window 2
            grads = micro_grads(windows[window])
            fp32_sum = by_group([sum(g[i].double() for g in grads) for i in range(len(grads[0]))])
            bf16_sum = by_group([functools.reduce(torch.add, (g[i] for g in grads)) for i in range(len(grads[0]))])
            norm = torch.cat(fp32_sum).norm().item()
            run_window(windows[window])
            assert engine.step_applied() and len(seen) == 2
            if zero_stage == 1:
                assert max(rel_errors([g.double() for g in bf16_sum])) == 0.0
                assert min(rel_errors(fp32_sum)) > 1e-3, rel_errors(fp32_sum)
            else:
                assert max(rel_errors(fp32_sum)) < 1e-6, rel_errors(fp32_sum)  # bf16 summation: ~4e-3
                assert engine.grad_norm() == pytest.approx(norm, rel=1e-6)  # bf16 summation: ~1e-4
            if window == 0:
                run_window(windows[1], nan_at=3)
                assert not engine.step_applied() and engine.grad_norm() == math.inf and not seen
        if zero_stage < 3:
            assert fused_calls == {"has_overflow_partitioned_grads_serial": 3, "get_grad_norm_direct": 4}  # 2 groups
    finally:
        distributed.shutdown()


# ------------------------------------------------------------------------------------------------ optimizer groups


def test_weight_decay_groups():
    from mor_ds.models import build_model

    cfg = load_config("tiny-mor")
    model = build_model(cfg.model, cfg.router)
    decay, no_decay = param_groups(model, cfg.optim)
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.embed.weight for p in decay["params"])  # tied embedding / LM head: decayed, once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------------ checkpoints


def _fake_checkpoint(root, step, complete=True):
    path = root / ckpt.step_tag(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    return path


def test_torn_checkpoint_is_never_latest(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(root, 3)
    torn = _fake_checkpoint(root, 6, complete=False)
    # e.g. DeepSpeed's own `latest`, written before all ranks finished
    (root / ckpt.LATEST).write_text(ckpt.step_tag(6))
    assert ckpt.latest_checkpoint(root).step == 3
    assert ckpt.resolve_checkpoint(tmp_path / "run").step == 3  # a run dir resolves to its checkpoints
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_checkpoint(torn)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        ckpt.resolve_checkpoint(tmp_path / "nope")


def _digested_checkpoint(root, step, ranks=2):
    """A checkpoint directory as CheckpointManager.save leaves it: DeepSpeed's file names, digests in COMPLETE."""
    path = root / ckpt.step_tag(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
    for rank in range(ranks):
        (path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(7000 + rank))
    files = {k: v for rank in range(ranks) for k, v in ckpt.digest_files(path, rank, ranks).items()}
    (path / ckpt.COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    return ckpt.CheckpointRef(root, path.name)


def test_checkpoint_digests_are_split_by_rank_and_catch_every_damage(tmp_path):
    ref = _digested_checkpoint(tmp_path, 9)
    meta = ckpt.checkpoint_meta(ref)
    assert sorted(meta["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert set(ckpt.digest_files(ref.path, 1, 2)) == {"zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # its own shard
    assert ckpt.verify_checkpoint(ref) == []
    optim = ref.path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[3000] ^= 0x01  # one flipped bit
    optim.write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(ref, 0, 2) == []  # rank 0 does not read rank 1's shard ...
    assert ckpt.verify_checkpoint(ref, 1, 2) == [f"{optim}: content differs from its xxh3_128 digest (corrupt)"]
    assert ckpt.verify_checkpoint(ref, 0, 3) == []  # ... and at another world size the shards are shared out again
    assert ckpt.verify_checkpoint(ref, 1, 3) == [f"{optim}: content differs from its xxh3_128 digest (corrupt)"]
    model = ref.path / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    (ref.path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert ckpt.verify_checkpoint(ref) == [
        f"{model}: 100 bytes, 5000 when saved (truncated or replaced)",
        f"{ref.path}/zero_pp_rank_0_mp_rank_00_optim_states.pt: no such file or directory",
        f"{optim}: content differs from its xxh3_128 digest (corrupt)"]


def test_a_damaged_checkpoint_is_marked_and_never_picked_again(tmp_path):
    root = tmp_path / "checkpoints"
    older, newer = _digested_checkpoint(root, 6), _digested_checkpoint(root, 9)
    (root / ckpt.LATEST).write_text(newer.tag)
    assert ckpt.newest_first(root) == [newer, older]
    (newer.path / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.intact_checkpoint(tmp_path)  # eval / export: refused, never an older model in its place
    assert str(err.value) == (f"checkpoint {newer.path} is damaged: {newer.path}/mp_rank_00_model_states.pt: 0 bytes, "
                              f"5000 when saved (truncated or replaced)")
    ckpt.mark_corrupt(newer, ["a problem"])
    assert not ckpt.is_complete(newer.path) and json.loads((newer.path / ckpt.CORRUPT).read_text())["problems"] == [
        "a problem"]
    assert ckpt.newest_first(root) == [older] and ckpt.intact_checkpoint(tmp_path) == older


def test_metrics_of_an_interrupted_run_are_truncated_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9)))
    truncate_metrics(path, 6)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ data checks


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer_path):
    """A small prepared set: 10 shards of 3000 tokens (the last two: validation and a short tail)."""
    from data_pipeline.prepare import prepare
    from data_pipeline.testing import embedded_sample, fineweb_records, write_records

    root = tmp_path_factory.mktemp("shards")
    write_records(root / "src.jsonl", fineweb_records(embedded_sample(40, max_chars=1500)))
    prepare(str(root / "src.jsonl"), tokenizer_path, str(root / "out"), workers=0, shard_tokens=3000,
            show_progress=False)
    return root / "out"


def _data_config(shard_dir, tokenizer_path):
    return load_config("tiny-mor", ["model.vocab_size=600", "train.seq_len=64", "train.micro_batch_size=2",
                                    "train.global_batch_size=2", f"data.prepared_dir={shard_dir}",
                                    f"data.tokenizer={tokenizer_path}", f"data.source={shard_dir}/../src.jsonl"])


def test_start_up_checks_every_shard_the_run_reads(shard_dir, tokenizer_path, tmp_path):
    """A damaged validation shard used to surface at the first eval (at the end of a budget, before the final
    checkpoint); a truncated training shard when the loader reached it. Both are refused before training starts."""
    from data_pipeline.errors import ShardError
    from data_pipeline.shards import ShardIndex
    from mor_ds.train.data import build_data

    env = distributed.DistEnv(0, 1, 0, "127.0.0.1", 0)
    data = build_data(_data_config(shard_dir, tokenizer_path), env)
    index = ShardIndex.load(shard_dir)
    assert [(d, s.file) for d, s in data.train_shards] == [
        (str(shard_dir), s.file) for s in index.shards if s.file != index.shards[-2].file]  # the second last: val
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    val = copy / index.shards[-2].file
    damaged = bytearray(val.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10  # same size: only the SHA-256 tells
    val.write_bytes(bytes(damaged))
    with pytest.raises(ShardError) as err:
        build_data(_data_config(copy, tokenizer_path), env)
    assert str(err.value) == (f"validation shard {val}: SHA-256 differs from the index (corrupt or from another "
                              f"prepared set); run `mor-data verify {copy}`")
    train = copy / index.shards[3].file
    train.write_bytes(train.read_bytes()[:-5])
    with pytest.raises(ShardError, match=rf"^{train}: {index.shards[3].bytes - 5} bytes, the index says "
                                         rf"{index.shards[3].bytes} \(truncated or replaced\) \(and 1 more\)"):
        build_data(_data_config(copy, tokenizer_path), env)


def test_a_vocab_size_the_embedded_tokenizer_cannot_have_names_model_vocab_size(tmp_path, capsys, monkeypatch):
    from mor_ds.cli import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code = main(["train", "--config", "tiny-mor", "--run-dir", str(tmp_path / "run"), "--set", "model.vocab_size=200",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "wandb.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("mor-ds train: model.vocab_size=200: the embedded corpus's tokenizer cannot have that "
                              "many pieces (vocab size 200: Vocabulary size is smaller than required_chars.")


# ------------------------------------------------------------------------------------------------ faults, logging


def test_fault_plan_from_environment():
    plan = FaultPlan.from_env({"MOR_DS_INJECT_FAULTS": "nan_loss@3, nan_loss@4,kill_in_save@6,nan_weight@5,"
                                                       "interrupt@2"})
    assert plan.nan_loss == {3, 4} and plan.kill_in_save == {6} and plan.nan_weight == {5} and plan.interrupt == {2}
    assert plan.active
    assert not FaultPlan.from_env({}).active
    with pytest.raises(ValueError, match="bad entry 'explode@2'"):
        FaultPlan.from_env({"MOR_DS_INJECT_FAULTS": "explode@2"})


def test_a_lost_peer_is_told_from_other_errors():
    """gloo's transport errors (as a dead rank or node produces them) and c10d's DistErrors are a lost peer, in
    gloo's words without its source location and advice; anything else is not."""
    from mor_ds.distributed import peer_failure

    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
    closed = RuntimeError(f"{gloo}pair.cc:553] Connection closed by peer [10.77.0.12]:5558. This is typically "
                          "caused by a remote worker crashing. Check the logs of the remote worker before reporting "
                          "an error.")
    assert peer_failure(closed) == "Connection closed by peer [10.77.0.12]:5558."
    silent = RuntimeError(f"{gloo}unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation to complete")
    assert peer_failure(silent) == "Timed out waiting 20000ms for recv operation to complete"
    lost = torch.distributed.DistNetworkError("failed to recv, got 0 bytes")
    assert peer_failure(lost) == "failed to recv, got 0 bytes"
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    assert peer_failure(TrainingAborted("NaN", 3)) is None
    message = peer_lost_message(peer_failure(silent), "after step 7", 20.0)
    assert message.startswith("lost contact with the other ranks after step 7 (Timed out waiting 20000ms")
    assert "train.collective_timeout_s=20" in message and message.endswith(f"(exit code {EXIT_PEER_LOST})")


def test_oom_message_names_the_knobs_and_the_estimate():
    msg = oom_message(load_config("mor-360m-nr3"), world_size=4)
    for text in ("train.micro_batch_size=16", "train.zero_stage=2", "train.activation_checkpointing=false",
                 "planner estimate per GPU", "GiB with activation checkpointing"):
        assert text in msg


def test_wandb_mode(monkeypatch, tmp_path):
    cfg = load_config("tiny-mor").wandb
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(cfg) == "disabled"
    assert resolve_mode(load_config("tiny-mor", ["wandb.enabled=false"]).wandb) == "disabled"


# ----------------------------------------------------------------------------------------- batches, model wrapping


def test_split_batch_targets_and_document_ids():
    eos = 0
    batch = torch.tensor([[5, 6, 0, 7, 0, 8, 9]])
    inputs, labels, docs = split_batch(batch, torch.device("cpu"), eos)
    assert inputs.tolist() == [[5, 6, 0, 7, 0, 8]] and labels.tolist() == [[6, 0, 7, 0, 8, 9]]
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2]]  # an EOS closes its own document
    assert split_batch(batch, torch.device("cpu"), None)[2] is None


def test_activation_checkpointing_keeps_names_loss_and_gradients():
    from mor_ds.models import build_model

    cfg = load_config("tiny-mor", ["model.vocab_size=64"])
    torch.manual_seed(0)
    plain = build_model(cfg.model, cfg.router)
    wrapped = build_model(cfg.model, cfg.router)
    wrapped.load_state_dict(plain.state_dict())
    distributed.apply_activation_checkpointing(wrapped)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 64, (2, 33))
    losses = []
    for model in (plain, wrapped):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.total_loss.backward()
        losses.append(out.total_loss.item())
    assert losses[0] == losses[1]
    grads = {distributed.clean_param_name(n): p.grad for n, p in wrapped.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_accepts_the_deepspeed_launcher_local_rank():
    from mor_ds.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "train", "--config", "tiny-mor", "--run-dir", "x"])
    assert args.top_local_rank == 1 and args.resume == "auto"
    args = build_parser().parse_args(["train", "--config", "tiny-mor", "--run-dir", "x", "--local_rank=2"])
    assert args.local_rank == 2


def test_paper_preset_without_tokenizer_fails_in_one_line(tmp_path, capsys, monkeypatch):
    from mor_ds.cli import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code = main(["train", "--config", "mor-360m-nr3", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("mor-ds train: data.tokenizer: not set for data.source='hf:HuggingFaceTB/")
    assert not distributed.is_initialized()  # the process group is always torn down


@pytest.fixture
def stop_signals():
    """The stop-signal module with its state and this process's handlers restored afterwards; yields a lone
    trainer stand-in (one process: no all-reduce, no host sync) and the stops it was asked for."""
    import signal

    from mor_ds.train.callbacks import signals

    previous = {sig: signal.getsignal(sig) for sig in early_signals.SIGNALS}
    # Python's own Ctrl-C handler, as at a terminal: a suite started in the background inherits SIG_IGN, which
    # install() rightly keeps
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stops: list[tuple[int, str]] = []
    lone = SimpleNamespace(env=distributed.DistEnv(0, 1, 0, "127.0.0.1", 0), device=torch.device("cpu"),
                           state=SimpleNamespace(step=1), request_stop=lambda *a: stops.append(a))
    try:
        yield signals, lone, stops
    finally:
        early_signals.received.clear()
        for sig, h in previous.items():
            signal.signal(sig, h)


def test_signal_during_start_up_is_kept_for_the_first_step(stop_signals):
    """SIGUSR1 before training starts (imports, DeepSpeed init) must not kill the process: it is recorded and the
    signal callback sees it once training starts, so the run stops after its first step with a checkpoint."""
    import signal

    signals, lone, stops = stop_signals
    early_signals.install()
    os.kill(os.getpid(), signal.SIGUSR1)  # delivered synchronously to this (main) thread
    handler = signals.SignalHandler()
    handler.on_train_start(lone)
    assert not stops  # the first step still runs
    handler.on_step_end(lone, result=None)
    assert stops == [(EXIT_PREEMPTED, stops[0][1])] and stops[0][1].startswith("SIGUSR1 received: stopped after step 1")
    handler.on_train_end(lone)


def test_ctrl_c_stops_after_the_step_a_second_stops_at_once_a_third_kills(stop_signals, capfd):
    import signal

    signals, lone, stops = stop_signals
    before = signal.getsignal(signal.SIGINT)
    handler = signals.SignalHandler()
    handler.on_train_start(lone)
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the step goes on
    assert capfd.readouterr().err == ("[mor-ds] Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: "
                                      "stop at once, without saving)\n")
    handler.on_step_end(lone, result=None)
    assert stops == [(EXIT_INTERRUPTED, "Ctrl-C: stopped after step 1 with a checkpoint; run the same command "
                                        "again to continue (exit code 130)")]
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a third Ctrl-C kills the process
    handler.on_train_end(lone)
    assert signal.getsignal(signal.SIGINT) == before  # the caller's handler is back


def test_ctrl_c_during_start_up_stops_before_the_first_step_and_preemption_outranks_it(stop_signals):
    import signal

    signals, lone, stops = stop_signals
    early_signals.install()
    os.kill(os.getpid(), signal.SIGINT)
    handler = signals.SignalHandler()
    handler.on_train_start(lone)
    assert stops == [(EXIT_INTERRUPTED, "Ctrl-C during start-up: stopped before training (step 1); nothing new to "
                                        "save")]
    stops.clear()
    os.kill(os.getpid(), signal.SIGTERM)  # a requeue must not be lost to an earlier Ctrl-C
    handler.on_step_end(lone, result=None)
    assert stops[0][0] == EXIT_PREEMPTED and stops[0][1].startswith("SIGTERM received")
    handler.on_train_end(lone)


# ------------------------------------------------------------------------------------------------ resume checks, paths


def test_resume_check_names_every_changed_key_and_says_which_are_safe():
    from mor_ds.train.resume import check_resume

    old = load_config("tiny-mor").to_dict()
    safe = load_config("tiny-mor", ["train.max_steps=400", "checkpoint.interval=7", "train.micro_batch_size=4"])
    changes, notices = check_resume(old, safe.to_dict(), "runs/x")
    assert changes == {"train.micro_batch_size": [8, 4], "train.max_steps": [200, 400], "checkpoint.interval": [100, 7]}
    assert notices == ["resuming with changed settings (safe: budget, checkpointing, memory (the global batch stays)): "
                       "train.micro_batch_size: 8 -> 4, train.max_steps: 200 -> 400, checkpoint.interval: 100 -> 7"]
    unsafe = load_config("tiny-mor", ["optim.lr=0.01", "train.seq_len=128", "train.max_steps=400"]).to_dict()
    with pytest.raises(ConfigError, match=r"^resuming runs/x with changed settings: optim.lr: 0.003 -> 0.01, "
                                          r"train.seq_len: 256 -> 128; they change what the run computes"):
        check_resume(old, unsafe, "runs/x")
    changes, notices = check_resume(old, unsafe, "runs/x", allow_changes=True)
    assert set(changes) == {"optim.lr", "train.seq_len", "train.max_steps"}
    assert notices[1] == ("resuming with changed settings (--allow-changes): optim.lr: 0.003 -> 0.01, train.seq_len: "
                          "256 -> 128")


def test_paths_become_absolute_and_auto_mode_follows_prepared_dir(tmp_path, monkeypatch):
    from mor_ds.config import with_absolute_paths
    from mor_ds.train.data import data_mode

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config("tiny-mor", ["data.source=corpus/*.jsonl.zst", "data.tokenizer=tok/a.model",
                                                       "data.prepared_dir=shards", "data.cache_dir=~/c"]))
    d = cfg.data
    assert (d.source, d.tokenizer, d.prepared_dir) == (f"{tmp_path}/corpus/*.jsonl.zst", f"{tmp_path}/tok/a.model",
                                                       f"{tmp_path}/shards")
    assert d.cache_dir == os.path.expanduser("~/c") and cfg.train.ds_config == ""
    assert with_absolute_paths(load_config("tiny-mor", ["data.source=hf:a/b"])).data.source == "hf:a/b"
    assert data_mode(cfg) == "prepared" and data_mode(load_config("tiny-mor")) == "prepared"  # embedded
    paper = load_config("mor-360m-nr3")
    assert data_mode(paper) == "stream"  # from the hub, until data.prepared_dir names shards
    assert data_mode(load_config("mor-360m-nr3", ["data.prepared_dir=shards"])) == "prepared"
    assert data_mode(load_config("mor-360m-nr3", ["data.prepared_dir=shards", "data.mode=stream"])) == "stream"


def test_code_version_names_the_checkout_commit():
    from mor_ds.provenance import PACKAGE_ROOT, code_version

    version = code_version()
    assert version["mor_ds"] != "unknown"
    if (PACKAGE_ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert version["git_commit"] == head.stdout.strip() and isinstance(version["git_dirty"], bool)


def test_unused_vocabulary_rows_are_warned_about_beyond_padding():
    from mor_ds.train.data import unused_vocab_warning

    tokenizer = SimpleNamespace(vocab_size=1000, path="tok.model")
    assert unused_vocab_warning(load_config("tiny-mor", ["model.vocab_size=1024"]), tokenizer) is None  # padding
    warning = unused_vocab_warning(load_config("tiny-mor"), tokenizer)  # 4096 rows, d=128, tied
    assert warning.startswith("model.vocab_size=4096 but the tokenizer has 1000 ids (tok.model): 3096 embedding rows "
                              "are never used, 0.40M of the model's ")
    assert warning.endswith("(counted in params and FLOPs); set model.vocab_size=1024")
