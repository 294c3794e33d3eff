"""`mor-ds bench train`: the smoke run through the real DeepSpeed engine and trainer loop, the Hugging Face
baseline's shapes, arm parsing; and that our decoder block traces whole under torch.compile (train.compile)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from mor_ds.bench.train import (HF_BASELINES, H100_DENSE_BF16_FLOPS, Arm, CompileCounter, add_arguments,
                                flops_6n_per_token, parse_arm, plan_arms, run_hf)
from mor_ds.config import load_config
from mor_ds.models import build_model


def test_smoke_end_to_end(tmp_path):
    """Three arms, each in its own subprocess: vanilla (plain loss), MoR with the chunked loss, HF eager."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mor_ds.cli", "bench", "train", "--smoke", "--configs",
                           "vanilla-135m", "mor-135m-nr2+chunked", "--baselines", "hf-eager", "--profile-steps", "1",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["arm"]: row for row in json.loads(out.read_text())["arms"]}
    assert list(rows) == ["vanilla-135m", "hf-eager@vanilla-135m:2", "mor-135m-nr2+chunked"], rows
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and row["seq_len"] == 32 and row["micro_batch"] == 2
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["optimizer_ms"] > 0
        assert row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"] <= row["step_ms"] + 1e-6
        assert 0 < row["final_loss"] < 10  # random ids over a 512 vocab: ln 512 ≈ 6.2
        expect = flops_6n_per_token(row["params"], 8, 64, 32)  # smoke shapes: 8 layers, d 64, seq 32
        assert row["flops_6n_per_token"] == expect
        assert row["mfu_6n"] == pytest.approx(row["tokens_per_s_per_gpu"] * expect / H100_DENSE_BF16_FLOPS, abs=1e-4)
        assert row["mfu"] is None and "peak_rss_gib" in row  # no peak FLOP/s on CPU
        assert any(op["op"] == "aten::mm" for op in row["profile_top"])  # the profiled step after the timed ones
        assert row["triton_jit_in_timed_steps"] == 0 and row["compiled_graphs_in_timed_steps"] == 0
    van, mor, hf = rows["vanilla-135m"], rows["mor-135m-nr2+chunked"], rows["hf-eager@vanilla-135m:2"]
    assert van["fused_loss"] == "plain" and mor["fused_loss"] == "chunked"  # auto is plain on CPU
    assert van["zero_stage"] == 1 and van["precision"] == "bf16"
    assert hf["params"] == van["params"]  # the same model in Hugging Face's implementation
    assert mor["depth_fractions"] == [1.0, 0.5]  # expert-choice capacities (Nr−r)/Nr
    assert mor["exact_flops_per_token"] < van["exact_flops_per_token"]
    assert "tok/s/GPU" in proc.stdout  # the table


@pytest.mark.parametrize("preset,extra", [("vanilla-135m", []), ("vanilla-360m", []),
                                          ("vanilla-360m", ["model.tie_embeddings=false"])])
def test_hf_baseline_has_our_parameter_count(preset, extra):
    pytest.importorskip("transformers")
    from mor_ds.bench.train import build_hf_llama

    cfg = load_config(preset, extra)
    with torch.device("meta"):
        ours = build_model(cfg.model, cfg.router)
        theirs = build_hf_llama(cfg.model, cfg.train.seq_len)
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params()
    assert theirs.config.num_key_value_heads == cfg.model.num_kv_heads
    assert theirs.config._attn_implementation == "sdpa"


def test_liger_baseline_skips_without_liger():
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed")
    args = argparse.Namespace(smoke=True, seq_len=32, warmup=1, steps=1, zero_stage=1, overrides=[],
                              hf_precision="bf16")
    row = run_hf(Arm("hf-liger@vanilla-135m:2", "vanilla-135m", (), 2, "hf-liger"), args)
    assert row["skipped"].startswith("liger-kernel not importable")


def test_arm_parsing_and_bad_arms(tmp_path):
    assert parse_arm("vanilla-360m+compile+ckpt:8", 16) == Arm(
        "vanilla-360m+compile+ckpt:8", "vanilla-360m", ("train.compile=true", "train.activation_checkpointing=true"), 8)
    with pytest.raises(ValueError, match=r"unknown variant \+fast"):
        parse_arm("vanilla-360m+fast", 16)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).baselines == ",".join(HF_BASELINES)
    proc = subprocess.run([sys.executable, "-m", "mor_ds.bench.train", "--configs", "vanilla-9b"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "vanilla-9b" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_variants_of_one_shape_share_one_set_of_baselines():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--configs", "vanilla-135m", "vanilla-135m+compile", "vanilla-135m:8", "mor-135m-nr2",
                              "--baselines", "hf-eager,hf-liger"])
    assert [arm.name for arm in plan_arms(args)] == [
        "vanilla-135m", "hf-eager@vanilla-135m:16", "hf-liger@vanilla-135m:16", "vanilla-135m+compile",
        "vanilla-135m:8", "hf-eager@vanilla-135m:8", "hf-liger@vanilla-135m:8", "mor-135m-nr2"]


def test_decoder_block_traces_whole_under_compile():
    """train.compile compiles each unique block with dynamic shapes (MoR blocks see varying token counts).
    fullgraph=True fails on any graph break; aot_eager runs dynamo + AOTAutograd without inductor's C++ build
    (~90 s on CPU), so this checks tracing and numerics, not generated code."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    cfg = load_config("tiny-mor", ["model.vocab_size=96", "model.hidden_size=32", "model.num_heads=4",
                                   "model.num_kv_heads=2", "model.intermediate_size=48"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router).train()
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = model(ids[:, :-1], labels=ids[:, 1:]).total_loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for block in model.layers:  # what distributed.compile_blocks does, with a graph-break check
        block.compile(backend="aot_eager", dynamic=True, fullgraph=True)
    out = model(ids[:, :-1], labels=ids[:, 1:]).total_loss
    out.backward()
    torch.testing.assert_close(out, ref)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compile_counter_counts_only_inside_the_timed_steps():
    """A graph torch.compile builds during the timed steps is reported (the figures would include compile time);
    one built before (warm-up) or served from dynamo's cache is not."""
    counter = CompileCounter()
    double = torch.compile(lambda x: x * 2 + 1, backend="eager")
    double(torch.ones(3))  # warm-up compile
    counter.start()
    double(torch.ones(3))  # cached
    double(torch.ones(3, 4))  # another rank: a recompile inside the timed steps
    counter.stop()
    double(torch.ones(3, 4, 5))  # after the timed steps
    assert counter.report() == {"triton_jit_in_timed_steps": 0, "compiled_graphs_in_timed_steps": 1}


def test_source_fingerprint_names_the_code_by_content(tmp_path):
    """Benchmark records carry a fingerprint of the package's sources (device copies have stale git metadata):
    the same files anywhere give the same value; an edit, a rename or a new file changes it."""
    from mor_ds.bench.timing import environment, source_fingerprint

    def tree(root, files):
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return root

    files = {"a.py": "x = 1\n", "sub/b.py": "y = 2\n", "notes.txt": "not code"}
    one, two = tree(tmp_path / "one", files), tree(tmp_path / "two", files)
    base = source_fingerprint(one)
    assert len(base) == 12 and source_fingerprint(two) == base
    (two / "notes.txt").write_text("still not code")
    assert source_fingerprint(two) == base
    (two / "sub/b.py").write_text("y = 3\n")
    assert source_fingerprint(two) != base
    (one / "sub/b.py").rename(one / "sub/c.py")
    assert source_fingerprint(one) != base
    assert environment()["mor_ds_source"] == source_fingerprint()
