"""Decode throughput: vanilla vs recursive vs MoR through the continuous depth-wise batching engine.

Protocol (the paper's where known): prompts are windows of held-out corpus text (`--data`, a .npy of token
ids; the last 10% is held out), generation lengths ~ Normal(mean 256), a paged KV pool preallocated once,
the decode step captured in a CUDA graph, a fixed batch (32 slots) and the largest batch whose expected KV
fits the pool; each model serves `--requests-per-slot` × slots requests, so requests join and leave
continuously. MoR routers are made realistic by a short training run of the whole model on the training
part of `--data` before timing (random routers route ~50% per step and mean nothing); the depth
distribution the engine saw is reported. Vanilla and recursive weights are left random (their speed does
not depend on them). Every decode tick is compared with its memory-bandwidth floor: the weights it reads
(MoR: prelude + the shared block once + coda + head) plus the KV it attends, over the copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mor_ds.bench.timing import environment
from mor_ds.choices import ModelFamily, RoutingMode
from mor_ds.config import Config, OptimConfig, load_config
from mor_ds.inference.engine import SLOT_BUCKETS, TICKS_PER_REPLAY
from mor_ds.models.mor_math import capacity_schedule
from mor_ds.train.optim import build_optimizer, param_groups
from mor_ds.train.schedules import lr_at

DEFAULT_MODELS = ["vanilla-360m", "mor-360m-nr3", "mor-360m-nr2", "recursive-360m-nr3", "mor-360m-nr3-kvshare",
                  "mor-360m-nr4", "vanilla-360m-L34"]
SMOKE_OVERRIDES = ["model.vocab_size=512", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.intermediate_size=96", "model.num_layers=8"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="presets; NAME-L<depth> overrides the unrolled depth (vanilla at MoR-4's 34 layers)")
    parser.add_argument("--batches", nargs="+", default=["32", "max"],
                        help="slot counts; 'max' = what fits memory, capped at --max-batch-cap; 'maxN' = capped at N")
    parser.add_argument("--vanilla-batches", nargs="*", default=["128"], help="extra batches for vanilla models")
    parser.add_argument("--data", default=".bench_data/tokens.npy",
                        help="token ids: a .npy or a prepared shard directory (mor-data prepare); synthetic if missing")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-mean", type=float, default=256)
    parser.add_argument("--gen-std", type=float, default=64)
    parser.add_argument("--gen-max", type=int, default=448)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--requests-per-slot", type=float, default=2.0)
    parser.add_argument("--max-requests-per-slot", type=float, default=1.25, help="the same at the max batch")
    parser.add_argument("--max-batch-cap", type=int, default=2048)
    parser.add_argument("--decode-backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--kv-memory-fraction", type=float, default=0.8, help="of free GPU memory, for the KV pool")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=150, help="MoR router training steps (0 = random routers)")
    parser.add_argument("--train-seq", type=int, default=512, help="covers prompt + mean generation (384 tokens)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument("--threshold-momentum", type=float, default=0.9,
                        help="router.threshold_momentum for the short run (the preset's 0.99 spans ~100 steps)")
    parser.add_argument("--calibration-batches", type=int, default=8,
                        help="after training, re-estimate τ_r on the final weights from this many training batches "
                             "(no update; what a long run's LR decay gives the EMA)")
    parser.add_argument("--admit-batch", type=int, default=None,
                        help="engine admit_batch (default: the engine's, max_slots // 16)")
    parser.add_argument("--slot-buckets", type=int, default=SLOT_BUCKETS,
                        help="engine slot_buckets: ticks for S·i/N slots, live slots packed (1 = every tick runs S)")
    parser.add_argument("--prefill-rows", type=int, default=None, help="engine prefill_rows (default: the engine's)")
    parser.add_argument("--ticks-per-replay", type=int, default=None,
                        help=f"engine ticks_per_replay: ticks per CUDA-graph replay, host work once per replay "
                             f"(default {TICKS_PER_REPLAY} or the page size if smaller)")
    parser.add_argument("--eager-glue", action="store_true",
                        help="the tick's bookkeeping between its layers eager (default: compiled with CUDA graphs)")
    parser.add_argument("--sweep-compile-glue", action="store_true",
                        help="every batch also with the glue the other way (suffix _eg: eager, _cg: compiled)")
    parser.add_argument("--sweep-ticks-per-replay", type=int, nargs="*", default=[],
                        help="also measure every model's max batches at these ticks_per_replay (same process)")
    parser.add_argument("--sweep-buckets", type=int, nargs="*", default=[],
                        help="also measure every model's max batches at these slot_buckets (same process)")
    parser.add_argument("--sweep-prefill-rows", type=int, nargs="*", default=[],
                        help="also measure every model's max batches at these prefill_rows (same process)")
    parser.add_argument("--sweep-page-size", type=int, nargs="*", default=[],
                        help="also measure every model's max batches at these KV page sizes (same pool bytes)")
    parser.add_argument("--sweep-requests-per-slot", type=float, nargs="*", default=[],
                        help="also measure every model's max batches with these requests per slot (same process)")
    parser.add_argument("--width-fraction", type=float, default=0,
                        help="MoR prelude / coda widths W_in = W_out as a fraction of the slots (0 = the engine's "
                             "default, 1.25 × the expected tokens per tick)")
    parser.add_argument("--sweep-widths", type=float, nargs="*", default=[],
                        help="MoR at the memory-bound batches: also measure these width fractions (rows *_w<f>)")
    parser.add_argument("--profile-ticks", type=int, default=0,
                        help="after each timed run, profile this many steady-state ticks (top kernels by device time)")
    parser.add_argument("--profile-prefill", type=int, default=0,
                        help="after each timed run, time and profile this many admission prefills of the run's "
                             "size (wall per call; top ops by self CPU time and by device time)")
    parser.add_argument("--check", action="store_true",
                        help="first check the CUDA-graph engine against generate() of each request (tiny fp32 models)")
    parser.add_argument("--kernel-timing", action="store_true",
                        help="time the decode-attention kernel alone at the 360M head shape (BLOCK × num_warps)")
    parser.add_argument("--no-graph", action="store_true", help="eager decode steps (no CUDA graph)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no new measurement after this (0 = none)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check of the harness")
    parser.add_argument("--out", default="", help="write all numbers as JSON here (rewritten after each model)")


def build(name: str, smoke: bool, device: torch.device, threshold_momentum: float = 0.99):
    from mor_ds.models import build_model

    preset, _, depth = name.partition("-L")
    # SDPA for the short router training and the prefill (the Triton training kernels are timed elsewhere)
    overrides = ["model.attention_backend=sdpa"] + (list(SMOKE_OVERRIDES) if smoke else [])
    if preset.startswith(("mor", "tiny-mor")):
        overrides.append(f"router.threshold_momentum={threshold_momentum}")
    if depth:
        overrides.append(f"model.num_layers={int(depth)}")
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.router).to(device), cfg


def load_tokens(path: str, vocab: int, seed: int = 0) -> tuple[np.ndarray, str]:
    if Path(path).exists():
        if Path(path).is_dir():
            from data_pipeline.shards import ShardIndex, read_shard

            index = ShardIndex.load(path)
            tokens = np.concatenate([read_shard(path, info, index.token_dtype) for info in index.shards])
        else:
            tokens = np.load(path)
        tokens = tokens.astype(np.int64)
        if tokens.max() >= vocab:
            raise ValueError(f"--data {path}: token id {tokens.max()} >= model vocab {vocab}")
        return tokens, f"{path} ({len(tokens):,} tokens)"
    # a Zipf-ish Markov chain: learnable structure when no corpus is on the machine
    rng = np.random.default_rng(seed)
    n, states = 1 << 20, min(vocab, 8192)
    successors = rng.integers(0, states, size=(states, 4))
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 0
    jumps = rng.zipf(1.3, size=n) % states
    follow = rng.random(n) < 0.7
    pick = rng.integers(0, 4, size=n)
    for i in range(1, n):
        tokens[i] = successors[tokens[i - 1], pick[i]] if follow[i] else jumps[i]
    return tokens, "synthetic Markov chain (no --data file)"


def router_training_recipe(cfg: Config, args) -> OptimConfig:
    """The trainer's optimizer settings at --train-lr on its WSD schedule, warming up over the first 10% of the
    short run and decaying to 0 over the last 20% (as a full run ends)."""
    return dataclasses.replace(cfg.optim, lr=args.train_lr, schedule="wsd", warmup_fraction=0.1, decay_fraction=0.2,
                               min_lr_ratio=0.0)


def train_briefly(model, cfg: Config, tokens: np.ndarray, args, device: torch.device) -> dict:
    """Short training run of the whole model (LM + router losses) so routing is trained, not random: the
    trainer's parameter groups, AdamW, clipping and schedule (`router_training_recipe`), while the routers
    track their causal thresholds τ_r."""
    model.train()
    recipe = router_training_recipe(cfg, args)
    opt = build_optimizer(param_groups(model, recipe), recipe, device)
    rng = np.random.default_rng(1)
    seq, batch = args.train_seq, args.train_batch

    def windows() -> np.ndarray:
        return rng.integers(0, len(tokens) - seq - 1, size=batch)[:, None] + np.arange(seq + 1)

    losses = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    for step in range(args.train_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.train_steps, recipe)
        x = torch.from_numpy(tokens[windows()]).to(device)
        with autocast:
            out = model(x[:, :-1], labels=x[:, 1:])
        out.total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_state()
        if step == 0 or step == args.train_steps - 1:
            losses.append(round(float(out.loss.detach()), 3))
    router = getattr(model.recursion, "router", None)
    result: dict = {}
    if hasattr(router, "causal_threshold"):
        if args.calibration_batches:
            router.threshold_updates.zero_()
            with torch.no_grad(), autocast:
                for _ in range(args.calibration_batches):  # one "step" of several micro-batches
                    model(torch.from_numpy(tokens[windows()][:, :-1]).to(device))
            model.update_router_state()
        result["causal_thresholds"] = [round(t, 5) for t in router.causal_threshold.tolist()]
    model.eval()
    return {**result, "steps": args.train_steps, "tokens_per_step": seq * batch, "lm_loss_first_last": losses,
            "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def held_out_depth(model, tokens: np.ndarray, args, device: torch.device) -> list[float]:
    """Fraction of held-out tokens that reach each recursion step under causal routing (the model's own
    forward on corpus windows of the training length; the capacity schedule is what training kept)."""
    held = tokens[int(len(tokens) * 0.9):]
    seq = min(args.train_seq, len(held) // 16)
    x = torch.from_numpy(held[:16 * seq].reshape(16, seq)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        stats = model.eval()(x, routing=RoutingMode.CAUSAL).stats
    return [round(float(stats[f"depth_frac/{r}"]), 4) for r in range(model.cfg.num_recursions)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + written)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.randn(256 << 20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    bw = 10 * 2 * src.numel() * 4 / (start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def kernel_check(device: torch.device) -> dict:
    """Triton vs PyTorch on random bf16 data: the paged decode attention (360M head shape; max abs error),
    the fused RoPE + K/V write and SiLU·up (‖Triton − ref‖ / ‖ref‖, ref = PyTorch in fp32 on the same
    inputs); inf where a kernel failed."""
    from mor_ds.inference.fused_ops import rope_write_kv_torch, rope_write_kv_triton, silu_mul_torch, silu_mul_triton
    from mor_ds.inference.kv_cache import CacheLayout, PagedKVCache
    from mor_ds.inference.paged_attention import decode_attention_torch, decode_attention_triton
    from mor_ds.models.sharing import layer_plan

    def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
        return float((got.float() - ref).norm() / ref.norm())

    out = {}
    try:
        layout = CacheLayout.for_plan(layer_plan(4, 2, "middle_cycle"), False)
        cache = PagedKVCache(layout, max_slots=64, max_len=600, num_pages=4000, page_size=16, num_kv_heads=5,
                             head_dim=64, dtype=torch.bfloat16, device=device)
        cache.k.normal_()
        cache.v.normal_()
        rows = torch.arange(0, 256, 2, device=device)
        lengths = torch.randint(0, 600, (len(rows),), device=device, dtype=torch.int32)
        cache.reserve(rows.cpu().numpy(), lengths.cpu().numpy())
        q = torch.randn(len(rows), 15, 64, device=device, dtype=torch.bfloat16)
        want = decode_attention_torch(q, cache, rows, lengths).float()
        got = decode_attention_triton(q, cache, rows, lengths).float()
        out["decode_attention_max_abs"] = float((got - want).abs().max())
        n = len(rows)
        qkv = torch.randn(n, 25, 64, device=device, dtype=torch.bfloat16)
        angle = torch.rand(n, 1, 32, device=device) * 6.28
        rope = (torch.cat((angle.cos(),) * 2, -1), torch.cat((-angle.sin(), angle.sin()), -1))
        flat = torch.randperm(n * 4, device=device)[:n]
        ref_kv = [torch.zeros(n * 4, 5, 64, device=device) for _ in range(2)]
        kv = [t.view(-1, 5, 64)[:n * 4] for t in (cache.k, cache.v)]
        got = rope_write_kv_triton(qkv, tuple(t.to(torch.bfloat16) for t in rope), 15, *kv, flat)
        ref_q = rope_write_kv_torch(qkv.float(), tuple(t.to(torch.bfloat16).float() for t in rope), 15, *ref_kv, flat)
        out["rope_write_kv_rel"] = max(rel(got, ref_q), *(rel(t[flat], r[flat]) for t, r in zip(kv, ref_kv)))
        gate_up = torch.randn(n, 2 * 2560, device=device, dtype=torch.bfloat16) * 3
        out["silu_mul_rel"] = rel(silu_mul_triton(gate_up), silu_mul_torch(gate_up.float()))
    except Exception as exc:
        print(f"kernel check failed: {type(exc).__name__}: {exc}", flush=True)
        out["failed"] = float("inf")
    return out


def kernels_ok(errors: dict) -> bool:
    return (errors.get("decode_attention_max_abs", math.inf) < 2e-2 and errors.get("rope_write_kv_rel", math.inf) < 1e-2
            and errors.get("silu_mul_rel", math.inf) < 1e-2 and "failed" not in errors)


def engine_check(device: torch.device, compile_glue: bool) -> dict:
    """On the GPU: the CUDA-graph engine serving 6 requests on 3 slots (joining and leaving mid-recursion)
    against `generate` of each request alone (eager, masked prefill), greedy, fp32 tiny models with random
    routers of real spread; MoR also with 1-row prelude / coda widths (tokens wait to enter and leave) and
    with sampled requests whose nucleus is vanishing (the eager sampling path, greedy by construction);
    with compile_glue, the tick's glue compiled. Returns the fraction of generated tokens that agree per
    case."""
    from mor_ds.inference import Engine, Request, SamplingParams, generate
    from mor_ds.models import build_model

    shapes = ["model.vocab_size=256", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
              "model.intermediate_size=96"]
    nr3 = ["model.num_recursions=3", "model.num_layers=8"]
    narrow = {"prelude_width": 1, "coda_width": 1}
    cases = {"tiny-vanilla": ("tiny-vanilla", [], {}, False), "tiny-mor": ("tiny-mor", nr3, {}, False),
             "tiny-mor W=1": ("tiny-mor", nr3, narrow, False), "tiny-mor sampled": ("tiny-mor", nr3, {}, True),
             "tiny-mor-kvshare": ("tiny-mor-kvshare", [], {}, False), "tiny-mor-tc": ("tiny-mor-tc", [], {}, False),
             "tiny-mor-tc W=1": ("tiny-mor-tc", [], narrow, False)}
    result = {}
    for case, (name, extra, widths, sampled) in cases.items():
        cfg = load_config(name, shapes + extra)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.router).to(device).eval()
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "router" in param_name:
                    p.normal_(0, 1.0)
        gen = torch.Generator().manual_seed(1)
        sampling = SamplingParams(temperature=1.0, top_p=1e-6) if sampled else SamplingParams()
        requests = [Request(torch.randint(0, 256, (n,), generator=gen).tolist(), m, sampling)
                    for n, m in [(5, 9), (11, 4), (3, 12), (8, 1), (14, 7), (6, 10)]]
        alone = [generate(model, [r.prompt], r.max_new_tokens).tokens[0] for r in requests]
        served = Engine(model, max_slots=3, max_len=32, page_size=4, cuda_graph=True, compile_glue=compile_glue,
                        **widths).run(requests)
        same = sum(a == b for r, want in zip(served, alone) for a, b in zip(r.output, want))
        result[case] = round(same / sum(len(w) for w in alone), 4)
    return result


# --kernel-timing cases: (name, (query heads, KV heads, head dim), rows, mean cached length, recursion steps Nr);
# Nr = 0: every row at ~the mean (a vanilla tick's layer call); Nr > 0: a MoR block layer's call, each row at its
# own depth r (drawn at the capacity schedule) reading a depth-r cache of ~(Nr − r)/Nr of the mean, 5% of rows
# outside the recursion (length 0). Rows and lengths as a max batch's ticks at prompt 512 on an H100 (80 GB).
KERNEL_TIMING_CASES = [("360m vanilla", (15, 5, 64), 1500, 640, 0), ("360m MoR-4 block", (15, 5, 64), 2230, 640, 4),
                       ("1.7b vanilla", (32, 32, 64), 253, 640, 0), ("1.7b MoR-4 block", (32, 32, 64), 419, 640, 4)]


def kernel_timing_lengths(rows: int, mean_len: int, num_recursions: int, gen: torch.Generator) -> torch.Tensor:
    """Cached lengths of one decode-attention call's rows (see KERNEL_TIMING_CASES)."""
    lengths = mean_len - mean_len // 5 + torch.rand(rows, generator=gen) * (2 * mean_len // 5)
    if num_recursions:
        caps = torch.tensor(capacity_schedule(num_recursions))
        depth = torch.multinomial(caps, rows, replacement=True, generator=gen)  # P(row at r) ∝ tokens reaching r
        lengths = lengths * caps[depth]
        lengths[torch.rand(rows, generator=gen) < 0.05] = 0
    return lengths.to(torch.int32)


def kernel_timing(device: torch.device, bandwidth: float) -> list[dict]:
    """The paged decode-attention kernel alone on the rows of one vanilla layer call and one MoR block layer
    call (KERNEL_TIMING_CASES; pages scattered over the pool as a free list hands them out): median time per
    (BLOCK, num_warps) and the K/V bytes it must read over that time, against the copy bandwidth."""
    from triton.testing import do_bench

    from mor_ds.inference.kv_cache import CacheLayout, PagedKVCache
    from mor_ds.inference.paged_attention import decode_attention_triton
    from mor_ds.models.sharing import layer_plan

    out = []
    layout = CacheLayout.for_plan(layer_plan(1, 1, "cycle"), False)  # one cache per slot
    for name, (heads, kv_heads, head_dim), rows, mean_len, nr in KERNEL_TIMING_CASES:
        gen = torch.Generator().manual_seed(0)
        lengths = kernel_timing_lengths(rows, mean_len, nr, gen)
        max_len = int(lengths.max()) + 1
        cache = PagedKVCache(layout, max_slots=rows, max_len=max_len, num_pages=rows * -(-max_len // 16) + 1,
                             page_size=16, num_kv_heads=kv_heads, head_dim=head_dim, dtype=torch.bfloat16,
                             device=device)
        cache.k.normal_()
        cache.v.normal_()
        perm = torch.randperm(cache.num_pages - 1, generator=gen)[:cache.tables.numel()] + 1  # scattered pages
        cache.tables.copy_(perm.view_as(cache.tables).to(device=device, dtype=torch.int32))
        q = torch.randn(rows, heads, head_dim, device=device, dtype=torch.bfloat16)
        slots, lengths_dev = torch.arange(rows, device=device), lengths.to(device)
        kv_bytes = int(lengths.sum()) * 2 * kv_heads * head_dim * 2
        for block, warps in ((64, 4), (128, 4), (64, 2), (64, 8)):
            ms = do_bench(functools.partial(decode_attention_triton, q, cache, slots, lengths_dev, block, warps),
                          return_mode="median")
            out.append({"case": name, "rows": rows, "mean_len": round(float(lengths.float().mean()), 1),
                        "block": block, "num_warps": warps, "ms": round(ms, 4),
                        "kv_read_GBps": round(kv_bytes / ms / 1e6, 1),
                        "of_copy_bw": round(kv_bytes / (ms / 1e3) / bandwidth, 3)})
        del cache
    return out


def tick_weight_bytes(im) -> int:
    """Weights one decode tick reads: MoR reads the shared block once per tick, other families every
    unrolled position; plus norms and the (tied) LM head, routers included."""
    model = im.model
    layer = [sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in model.layers]
    positions = (im.plan.prelude + im.block + im.plan.coda if im.mor else [i for i, _ in im.plan.unrolled])
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if not n.startswith(("layers.", "embed.")))
    return sum(layer[i] for i in positions) + other


def expected_groups_per_token(im, reach: list[float]) -> float:
    """Caches a token fills on average: every group for vanilla/recursive; for MoR the prelude/coda groups
    plus, per shared layer, the steps it runs (reach[r] = fraction of tokens running step r; no estimate:
    every step; KV sharing: step 0 only)."""
    if not im.mor:
        return float(im.layout.num_groups)
    reach = list(reach) or [1.0] * im.num_recursions
    per_layer = reach[0] if im.kv_share else sum(reach)
    return len(im.plan.prelude) + len(im.plan.coda) + len(im.block) * per_layer


def step_reach(depth_fractions: list[float]) -> list[float]:
    """Fraction of tokens running step r = 0…Nr−1, from the fractions that ran 0…Nr steps."""
    frac = np.asarray(depth_fractions)
    return [float(frac[r + 1:].sum()) for r in range(len(frac) - 1)]


def make_requests(n: int, tokens: np.ndarray, args, seed: int):
    from mor_ds.inference import Request, SamplingParams

    rng = np.random.default_rng(seed)
    held_out = tokens[int(len(tokens) * 0.9):]
    starts = rng.integers(0, len(held_out) - args.prompt_len, size=n)
    lengths = np.clip(np.rint(rng.normal(args.gen_mean, args.gen_std, size=n)), 1, args.gen_max).astype(int)
    sampling = SamplingParams(args.temperature, args.top_p)
    return [Request(held_out[s:s + args.prompt_len].tolist(), int(g), sampling) for s, g in zip(starts, lengths)]


def engine_settings(slots: int, num_pages: int | None, args, device: torch.device,
                    width_fraction: float | None = None, slot_buckets: int | None = None,
                    prefill_rows: int | None = None, page_size: int | None = None,
                    ticks_per_replay: int | None = None, compile_glue: bool | None = None) -> tuple[dict, bool]:
    """(Engine keyword arguments, whether to capture CUDA graphs) for `slots` slots and a pool of `num_pages`
    pages (None: the engine's default), from the command line unless a variant's keyword says otherwise."""
    graph = device.type == "cuda" and not args.no_graph
    fraction = args.width_fraction if width_fraction is None else width_fraction
    width = math.ceil(fraction * slots) if fraction else None
    if page_size and num_pages:  # the same pool bytes in pages of another size
        num_pages = num_pages * args.page_size // page_size
    kwargs = dict(max_slots=slots, max_len=args.prompt_len + args.gen_max + 1, num_pages=num_pages,
                  page_size=page_size or args.page_size, count_kv_reads=True, decode_backend=args.decode_backend,
                  admit_batch=args.admit_batch, prelude_width=width, coda_width=width,
                  slot_buckets=slot_buckets or args.slot_buckets,
                  ticks_per_replay=ticks_per_replay or args.ticks_per_replay,
                  compile_glue=(graph and not args.eager_glue) if compile_glue is None else compile_glue)
    if prefill_rows or args.prefill_rows:
        kwargs["prefill_rows"] = prefill_rows or args.prefill_rows
    return kwargs, graph


def start_engine(model, graph: bool, kwargs: dict):
    """(engine, CUDA graphs captured, why not if they failed, seconds to build: KV pool, capture, the glue's
    compilation); a failed capture falls back to eager steps and says so."""
    from mor_ds.inference import Engine

    graph_error = None
    start = time.perf_counter()
    try:
        engine = Engine(model, cuda_graph=graph, **kwargs)
    except Exception as exc:
        if not graph:
            raise
        graph, graph_error = False, f"{type(exc).__name__}: {exc}"
    if graph_error:  # outside the except block, so the failed engine's KV pool is freed first
        gc.collect()
        torch.cuda.empty_cache()
        engine = Engine(model, cuda_graph=False, **kwargs)
    return engine, graph, graph_error, time.perf_counter() - start


def timed_run(engine, tokens: np.ndarray, slots: int, per_slot: float, args,
              device: torch.device) -> tuple[list, float]:
    """A warm-up (prefill and decode paths, allocator; counters reset after it), then slots × per_slot requests
    timed end to end: (requests, wall seconds)."""
    from mor_ds.inference import Request

    engine.run([Request(r.prompt, 4) for r in make_requests(min(slots, 64), tokens, args, seed=99)])
    engine.reset_stats()
    requests = make_requests(max(slots, int(slots * per_slot)), tokens, args, seed=slots)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.run(requests)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return requests, time.perf_counter() - start


def run_row(engine, requests: list, wall: float, bandwidth: float, device: torch.device) -> dict:
    """A timed run's figures: throughput, prefill and tick times against the tick's bandwidth floor (weights and
    the KV it read, over the copy bandwidth), routing, widths and waits, engine settings."""
    im, st, cfg = engine.im, engine.stats, engine.im.model.cfg
    decode_tokens = st.tokens - len(requests) - st.preemptions  # the first token of each admission is prefill's
    kv_bytes_tick = float(im.kv_tokens_read) / max(1, st.ticks) * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    weight_bytes = tick_weight_bytes(im)
    tick_ms = st.decode_s / max(1, st.ticks) * 1e3
    floor_ms = (weight_bytes + kv_bytes_tick) / bandwidth * 1e3
    return {
        "slots": engine.max_slots, "requests": len(requests), "generated_tokens": st.tokens,
        "wall_s": round(wall, 3), "tokens_per_s": round(st.tokens / wall, 1),
        "decode_tokens_per_s": round(decode_tokens / st.decode_s, 1) if st.decode_s else None,
        "prefill_s": round(st.prefill_s, 3), "decode_s": round(st.decode_s, 3), "ticks": st.ticks,
        "prefills": st.prefills, "prefill_ms_per_call": round(st.prefill_s / max(1, st.prefills) * 1e3, 2),
        "prefill_tokens_per_call": round(st.prefill_tokens / max(1, st.prefills), 1), "admit_batch": engine.admit_batch,
        "prefill_rows": engine.prefill_rows,
        "tokens_per_tick": round(decode_tokens / max(1, st.ticks), 2),
        "tick_ms": round(tick_ms, 3), "tick_floor_ms": round(floor_ms, 3),
        # device idle per tick: decode wall time outside the replays (host work between them)
        "tick_idle_ms": (round((st.decode_s - st.replay_device_s) / max(1, st.ticks) * 1e3, 3)
                         if device.type == "cuda" else None),
        "ticks_per_replay": engine.ticks_per_replay, "replays": st.replays,
        "floor_fraction": round(floor_ms / tick_ms, 3) if tick_ms else None,
        "tick_weight_MB": round(weight_bytes / 1e6, 1), "tick_kv_MB": round(kv_bytes_tick / 1e6, 1),
        "depth_fractions": st.depth_fractions(), "preemptions": st.preemptions,
        # MoR: rows per tick through prelude / coda (W_in, W_out) and how often a token found them taken
        "prelude_width": engine.prelude_width, "coda_width": engine.coda_width,
        "prelude_waits": st.prelude_waits, "coda_waits": st.coda_waits, "wait_ticks": st.wait_ticks,
        "waits_per_token": round((st.prelude_waits + st.coda_waits) / max(1, decode_tokens), 4),
        "kv_pool_pages": engine.cache.num_pages, "compile_glue": engine.glue.compiled,
        # occupancy buckets: slots the ticks ran on average, slots moved to keep the live ones packed
        "slot_buckets": len(engine.buckets), "slots_per_tick": round(st.slot_rows / max(1, st.ticks), 1),
        "slot_moves": st.slot_moves,
    }


def profiles(engine, tokens: np.ndarray, slots: int, args, device: torch.device) -> dict:
    """--profile-prefill / --profile-ticks on the engine after its timed run; a failure is reported, not raised."""
    out = {}
    if args.profile_prefill:  # on the idle engine, before the tick profile leaves requests in flight
        try:
            out["prefill_profile"] = profile_prefills(engine, tokens, args, args.profile_prefill)
        except Exception as exc:
            out["prefill_profile"] = f"{type(exc).__name__}: {exc}"
    if args.profile_ticks and device.type == "cuda":
        try:
            requests = make_requests(slots, tokens, args, seed=slots + 1)
            out["profile"] = profile_ticks(engine, requests, args.profile_ticks)
        except Exception as exc:
            out["profile"] = f"{type(exc).__name__}: {exc}"
    return out


def measure(model, tokens: np.ndarray, slots: int, num_pages: int | None, args, device, bandwidth: float,
            requests_per_slot: float | None = None, **variant) -> dict:
    """One row: an engine of `slots` slots (`variant`: engine settings other than the command line's, see
    `engine_settings`) serving slots × requests per slot held-out prompts."""
    kwargs, graph = engine_settings(slots, num_pages, args, device, **variant)
    engine, graph, graph_error, build_s = start_engine(model, graph, kwargs)
    per_slot = requests_per_slot or (args.requests_per_slot if num_pages is None else args.max_requests_per_slot)
    requests, wall = timed_run(engine, tokens, slots, per_slot, args, device)
    out = {**run_row(engine, requests, wall, bandwidth, device), "cuda_graph": graph,
           "engine_build_s": round(build_s, 1)}
    if graph_error:
        out["cuda_graph_error"] = graph_error
    out.update(profiles(engine, tokens, slots, args, device))
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def profile_ticks(engine, requests: list, ticks: int) -> dict:
    """Fill every slot, let the recursion reach steady state, then profile engine steps until `ticks` ticks
    ran (whole replays): the top kernels by device time per tick (graph replays included) and the kernel
    count per tick."""
    from torch.profiler import ProfilerActivity, profile

    for r in requests:
        engine.add(r)
    while engine.queue:
        engine.step()
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    ticks_before = engine.stats.ticks
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_work() and engine.stats.ticks - ticks_before < ticks:
            engine.step()
        torch.cuda.synchronize()
    ticks = max(1, engine.stats.ticks - ticks_before)
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    return {"ticks": ticks, "device_ms_per_tick": round(total / ticks / 1e3, 3),
            "kernels_per_tick": round(sum(e.count for e in events) / ticks, 1),
            "top": [{"name": e.key[:90], "ms_per_tick": round(e.device_time_total / ticks / 1e3, 3),
                     "calls_per_tick": round(e.count / ticks, 1)} for e in events[:30]]}


def profile_prefills(engine, tokens: np.ndarray, args, calls: int) -> dict:
    """`calls` admissions of the timed run's size (an admission batch of prompts, split at prefill_rows) on
    the idle engine, each followed by releasing its slots: wall per call (median; each call ends in the
    first tokens' device-to-host copy, so device work is inside), then the same under torch.profiler: top
    ops by self CPU time (Python dispatch, launches, syncs), top kernels by device time, syncs per call."""
    from torch.profiler import ProfilerActivity, profile

    prompts = max(1, min(engine.admit_batch, engine.prefill_rows // args.prompt_len, engine.max_slots))
    seeds = iter(range(10_000, 20_000))

    def admit() -> float:
        for r in make_requests(prompts, tokens, args, seed=next(seeds)):
            engine.add(r)
        start = time.perf_counter()
        engine._admit()
        wall = time.perf_counter() - start
        engine._evict(np.flatnonzero(engine.host.live))
        return wall

    admit()  # this size's first call
    walls = [admit() for _ in range(calls)]
    cuda = engine.im.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            admit()
    events = list(prof.key_averages())

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", 0) or 0

    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    kernels = sorted((e for e in events if device_us(e) > 0), key=device_us, reverse=True)
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                       "cudaEventSynchronize", "cudaMemcpy"))
    return {"calls": calls, "prompts_per_call": prompts, "tokens_per_call": prompts * args.prompt_len,
            "wall_ms_per_call": round(float(np.median(walls)) * 1e3, 2),
            "wall_ms_min": round(min(walls) * 1e3, 2),
            "host_self_ms_per_call": round(sum(e.self_cpu_time_total for e in events) / calls / 1e3, 2),
            "device_ms_per_call": round(sum(map(device_us, kernels)) / calls / 1e3, 2),
            "kernels_per_call": round(sum(e.count for e in kernels) / calls, 1),
            "syncs_per_call": round(syncs / calls, 1),
            "top_self_cpu": [{"name": e.key[:80], "ms_per_call": round(e.self_cpu_time_total / calls / 1e3, 3),
                              "calls_per_call": round(e.count / calls, 1)} for e in by_cpu[:12]],
            "top_device": [{"name": e.key[:80], "ms_per_call": round(device_us(e) / calls / 1e3, 3),
                            "calls_per_call": round(e.count / calls, 1)} for e in kernels[:10]]}


def kv_tokens_per_sequence(im, prompt_reach: list[float], gen_reach: list[float], args) -> float:
    """Cached tokens (summed over caches) a sequence holds at the expected length: its prompt's at the
    routing of prompt text (held-out), its generation's at the routing of generated text once a row
    measured it (the two differ: token-choice routed generated text 0 / 0.49 / 0.51 / 0 over 0…3 steps
    against held-out 1 / 0.70 / 0.31 reaching steps 0…2 at 360M); half a page of slack per cache."""
    return (expected_groups_per_token(im, prompt_reach) * args.prompt_len
            + expected_groups_per_token(im, gen_reach) * args.gen_mean + im.layout.num_groups * args.page_size / 2)


def max_slots_for(model, prompt_reach: list[float], gen_reach: list[float], args, device,
                  cap: int) -> tuple[int, int]:
    """(slots, pool pages): the pool takes --kv-memory-fraction of free memory; slots = what the pool holds
    at the expected KV per sequence (`kv_tokens_per_sequence`)."""
    from mor_ds.inference import InferenceModel
    from mor_ds.inference.kv_cache import PagedKVCache

    im = InferenceModel(model)
    per_token = PagedKVCache.bytes_per_token(model.cfg.num_kv_heads, model.cfg.head_dim, im.dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = 2 << 30
    pool = int(free * args.kv_memory_fraction) - (2 << 30 if device.type == "cuda" else 0)
    pages = pool // (per_token * args.page_size)
    slots = int(pages * args.page_size / kv_tokens_per_sequence(im, prompt_reach, gen_reach, args))
    return max(1, min(slots, cap)), int(pages)


def batch_order(batch: str) -> tuple[float, int]:
    """Fixed batches by size, then the memory-bound ones by cap."""
    if batch.startswith("max"):
        return math.inf, int(batch[3:] or 0)
    return int(batch), 0


def device_checks(device: torch.device, args) -> tuple[dict, float]:
    """The run's environment and its device checks (kernels against PyTorch, the engine against generate,
    the decode kernel's timing), and the copy bandwidth the floors are computed with."""
    env = environment()
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 1e11
    env["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    if device.type != "cuda":
        return env, bandwidth
    if args.decode_backend != "torch":
        env["kernel_errors"] = kernel_check(device)  # decode attention, fused RoPE + K/V write, SiLU·up
        if not kernels_ok(env["kernel_errors"]):
            args.decode_backend = "torch"
            env["decode_backend"] = "torch (kernel check failed)"
    if args.check:
        try:
            compiled = not args.eager_glue
            env["engine_vs_generate_token_agreement"] = engine_check(device, compiled)
            if args.sweep_compile_glue:
                other = "eager" if compiled else "compiled"
                env[f"engine_vs_generate_token_agreement_{other}_glue"] = engine_check(device, not compiled)
        except Exception as exc:
            env["engine_vs_generate_token_agreement"] = f"{type(exc).__name__}: {exc}"
    if args.kernel_timing:
        try:
            env["decode_kernel_timing"] = kernel_timing(device, bandwidth)
        except Exception as exc:
            env["decode_kernel_timing"] = f"{type(exc).__name__}: {exc}"
    return env, bandwidth


def batch_variants(batch: str, family: str, compiled_glue: bool, args) -> list[tuple[str, dict]]:
    """(row-key suffix, `measure` keywords) of the extra rows at one batch: the --sweep-* settings at the
    memory-bound batches (prelude / coda widths: MoR only), the glue the other way with --sweep-compile-glue."""
    variants = []
    if batch.startswith("max"):
        widths = args.sweep_widths if family == ModelFamily.MOR else []
        variants += [(f"w{f}", {"width_fraction": f}) for f in widths]
        variants += [(f"b{b}", {"slot_buckets": b}) for b in args.sweep_buckets]
        variants += [(f"p{r}", {"prefill_rows": r}) for r in args.sweep_prefill_rows]
        variants += [(f"r{r:g}", {"requests_per_slot": r}) for r in args.sweep_requests_per_slot]
        variants += [(f"g{g}", {"page_size": g}) for g in args.sweep_page_size]
        variants += [(f"k{k}", {"ticks_per_replay": k}) for k in args.sweep_ticks_per_replay]
    if args.sweep_compile_glue:
        variants.append(("eg" if compiled_glue else "cg", {"compile_glue": not compiled_glue}))
    return variants


def bench_model(name: str, entry: dict, args, device: torch.device, bandwidth: float, over_budget) -> None:
    """Every batch of one model into `entry`: MoR routers trained first, the held-out depth distribution, then a
    row per batch and variant (each printed as it lands)."""
    model, cfg = build(name, args.smoke, device, args.threshold_momentum)
    family = cfg.model.family
    tokens, source = load_tokens(args.data, cfg.model.vocab_size)
    entry.update(data=source, unique_params=model.num_params(), layers=cfg.model.num_layers)
    if family == ModelFamily.MOR and args.train_steps:
        entry["router_training"] = train_briefly(model, cfg, tokens[:int(len(tokens) * 0.9)], args, device)
    if family == ModelFamily.MOR:
        entry["causal_depth_held_out"] = held_out_depth(model, tokens, args, device)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    # steps a token runs, for the KV a max batch's sequence holds: prompts at held-out text's, generated tokens at
    # generated text's once a row measured it (held-out's before; a uniform guess undersizes MoR pools)
    prompt_reach: list[float] = entry.get("causal_depth_held_out", [])
    reach = prompt_reach
    batches = list(args.batches) + (list(args.vanilla_batches) if family == ModelFamily.VANILLA else [])
    for batch in sorted(batches, key=batch_order):
        if over_budget():
            entry[f"batch_{batch}"] = {"skipped": "time budget"}
            continue
        if batch.startswith("max"):
            cap = int(batch[3:]) if batch[3:] else args.max_batch_cap
            slots, pages = max_slots_for(model, prompt_reach, reach, args, device, cap)
        else:
            slots, pages = int(batch), None
        row = measure(model, tokens, slots, pages, args, device, bandwidth)
        reach = step_reach(row["depth_fractions"]) if row["depth_fractions"] else reach
        entry[f"batch_{batch}"] = row
        print(json.dumps({"model": name, "batch": batch, **row}), flush=True)
        for suffix, variant in batch_variants(batch, family, row["compile_glue"], args):
            if over_budget():
                break
            row = measure(model, tokens, slots, pages, args, device, bandwidth, **variant)
            entry[f"batch_{batch}_{suffix}"] = row
            print(json.dumps({"model": name, "batch": f"{batch}_{suffix}", **row}), flush=True)


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env, bandwidth = device_checks(device, args)
    print(json.dumps(env), flush=True)
    results = {"environment": env, "args": {k: v for k, v in vars(args).items() if not callable(v)}, "models": []}
    begin = time.perf_counter()

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - begin > args.budget_s

    for name in args.models:
        if over_budget():
            results["models"].append({"model": name, "skipped": "time budget"})
            continue
        entry: dict = {"model": name}
        results["models"].append(entry)
        try:
            bench_model(name, entry, args, device, bandwidth, over_budget)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(entry), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def vanilla_baselines(results: dict) -> dict[tuple[int | None, str], dict]:
    """The vanilla row each row is compared with, by (unrolled depth, batch key): the vanilla model of the same
    depth (MoR-4 against the 34-layer vanilla, as the paper compares), else (depth None) the first vanilla."""
    base: dict[tuple[int | None, str], dict] = {}
    for m in results["models"]:
        if m["model"].startswith("vanilla"):
            for key, row in m.items():
                if key.startswith("batch_") and "tokens_per_s" in row:
                    base.setdefault((m.get("layers"), key), row)
                    base.setdefault((None, key), row)
    return base


def floor_per_token(row: dict) -> float:
    """Bandwidth floor of a row's decode per generated token (ms)."""
    return row["tick_floor_ms"] / max(row["tokens_per_tick"], 1e-9)


def print_table(results: dict) -> None:
    """One row per (model, batch): end-to-end and decode tokens/s, each against the same-depth vanilla at the
    same batch key ('max' rows: each model at its own memory-bound slot count, as the paper compares), and the
    ratio the two rows' bandwidth floors allow (floor x: the vanilla's floor per generated token over this
    row's; weights and live KV read once per tick at the routing measured)."""
    base = vanilla_baselines(results)
    print(f"\n{'model':22} {'batch':>8} {'slots':>5} {'tok/s':>8} {'decode':>8} {'e2e x':>6} {'dec x':>6} "
          f"{'floor x':>7} {'prefill s':>9} {'pf ms':>6} {'decode s':>8} {'tick ms':>7} {'floor':>6} {'tok/tick':>8} "
          f"{'slots/tick':>10} {'W':>5} {'waits':>6} depth (0..Nr steps)")
    for m in results["models"]:
        if "error" in m or "skipped" in m:
            print(f"{m['model']:22} {m.get('error') or m.get('skipped')}")
            continue
        for key, row in m.items():
            if not key.startswith("batch_") or "tokens_per_s" not in row:
                continue
            batch_key = key.split("_w")[0]
            ref = base.get((m.get("layers"), batch_key)) or base.get((None, batch_key))
            e2e = row["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
            dec = (row["decode_tokens_per_s"] or 0) / ref["decode_tokens_per_s"] if ref else float("nan")
            floor = floor_per_token(ref) / floor_per_token(row) if ref else float("nan")
            print(f"{m['model']:22} {key[6:]:>8} {row['slots']:>5} {row['tokens_per_s']:>8.0f} "
                  f"{row['decode_tokens_per_s'] or 0:>8.0f} {e2e:>6.2f} {dec:>6.2f} {floor:>7.2f} "
                  f"{row['prefill_s']:>9.2f} "
                  f"{row.get('prefill_ms_per_call', 0):>6.1f} {row['decode_s']:>8.2f} {row['tick_ms']:>7.2f} "
                  f"{row['tick_floor_ms']:>6.2f} "
                  f"{row['tokens_per_tick']:>8.1f} {row.get('slots_per_tick', row['slots']):>10} "
                  f"{row.get('coda_width', ''):>5} {row.get('waits_per_token', ''):>6} "
                  f"{row['depth_fractions']}")
        if "causal_depth_held_out" in m:
            print(f"{'':22} held-out text, fraction reaching each step: {m['causal_depth_held_out']}")


if __name__ == "__main__":  # runnable without the CLI's other subcommands (e.g. on a GPU box without DeepSpeed)
    _parser = argparse.ArgumentParser(prog="python -m mor_ds.bench.inference", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
