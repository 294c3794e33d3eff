"""Active-token attention: Triton kernels vs full SDPA, gather + SDPA, masked SDPA and FlexAttention.

Workload per (preset shape, seq, active fraction f): full-length q, k, v (B, H, S, D) bf16 and the sorted
indices of a step's active tokens (random top-k for expert-choice; uneven per-sequence counts around f·S
for token-choice "tc-*", padded with PAD_POS). Every variant takes the full tensors and returns a
full-length output, so gathers and scatters are timed too. Modes:
- cache (recursion-wise KV caching): queries and keys are the active tokens, causal by original position;
- share (recursive KV sharing): active queries attend to every token's K/V (first recursion's).
Times are medians (ms) of forward and forward+backward; useful TFLOP/s counts only visible (query, key)
pairs: 4·D per pair and head forward, 14·D forward+backward. "ideal" = full causal SDPA time × the share of
visible pairs (≈ f² for cache, ≈ f for share): what a kernel that skips every invisible pair could reach.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mor_ds.attention import PAD_POS
from mor_ds.bench.timing import bench_graph_ms, bench_ms, environment
from mor_ds.config import load_config

if TYPE_CHECKING:
    from mor_ds.kernels import KernelConfigs

SHAPE_PRESETS = {"135m": "mor-135m-nr3", "360m": "mor-360m-nr3"}
MODES = ("cache", "share", "tc-cache", "tc-share")


def _named_configs() -> dict:
    from mor_ds.kernels import KernelConfigs, TileConfig

    # s1: the kernels as first measured, benchmarks/attention_h100_2026-11-25.md (memset zero-fill, a dK/dV loop per
    # head and run)
    return {"s1": KernelConfigs(TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3), TileConfig(128, 64, 4, 3),
                                fused_zero_fill=False, dkdv_single_loop=False)}


NAMED_CONFIGS = ("s1",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=list(SHAPE_PRESETS), choices=list(SHAPE_PRESETS))
    parser.add_argument("--seq", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch: batch = tokens // seq")
    parser.add_argument("--fractions", nargs="+", default=["1", "1/2", "1/3", "1/4"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--flex", choices=["none", "first", "all"], default="first",
                        help="FlexAttention baseline (compiles per shape; cache/share modes): none, first "
                             "shape/seq only, or all")
    parser.add_argument("--step", action="store_true",
                        help="also time one whole MoR recursion step (gather → decoder block → scatter)")
    parser.add_argument("--sweep", action="store_true", help="time Triton tile configs instead of the table")
    parser.add_argument("--sweep-dims", nargs="+", type=int, default=[64], choices=[64, 128],
                        help="head dims to sweep (D=128: 8 query / 4 KV heads, same tokens)")
    parser.add_argument("--triton-configs", nargs="*", default=[], choices=sorted(NAMED_CONFIGS),
                        help="also time the Triton kernels under these named configs (e.g. s1: the first measured "
                             "kernels)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of the Triton path instead")
    parser.add_argument("--rep-ms", type=int, default=100, help="timing window per measurement")
    parser.add_argument("--graphs", action="store_true",
                        help="time CUDA-graph replays (device time, no host launch overhead) instead of do_bench")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every variant this many times, interleaved, and keep each one's best median")
    parser.add_argument("--out", default="", help="write all numbers as JSON here")


@dataclass
class Workload:
    shape: str
    heads_q: int
    heads_kv: int
    dim: int
    batch: int
    seq: int
    frac: Fraction
    mode: str

    @property
    def kv_mode(self) -> str:
        return self.mode.removeprefix("tc-")

    def label(self) -> str:
        return f"{self.shape} S={self.seq} B={self.batch} f={self.frac}"


@dataclass
class Inputs:
    q: Tensor
    k: Tensor
    v: Tensor
    pos: Tensor  # (B, K) original positions of the active slots, PAD_POS on padded slots
    read_rows: Tensor  # (B, K) row to read per slot (padded slots: row 0)
    write_rows: Tensor  # (B, K) row to write per slot (padded slots: the dummy row S)
    valid: Tensor  # (B, K) bool
    pairs: int  # visible (query, key) pairs per head, summed over the batch
    full_pairs: int  # the same for full causal attention over all tokens


def active_counts(w: Workload, gen: torch.Generator) -> list[int]:
    """Fixed k = max(1, ⌊f·S⌋) (expert-choice), or per-sequence counts spread over [f/2, 3f/2]·S (token-choice)."""
    fixed = max(1, math.floor(w.frac * w.seq))
    if not w.mode.startswith("tc-"):
        return [fixed] * w.batch
    spread = torch.linspace(0.5, 1.5, w.batch)[torch.randperm(w.batch, generator=gen)]
    return [int(min(w.seq, max(1, round(float(w.frac) * w.seq * float(s))))) for s in spread]


def make_inputs(w: Workload, gen: torch.Generator, device: str = "cuda") -> Inputs:
    dev = torch.device(device)

    dev_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=dev_gen, device=dev).to(torch.bfloat16).requires_grad_()

    q, k, v = rand(w.batch, w.heads_q, w.seq, w.dim), rand(w.batch, w.heads_kv, w.seq, w.dim), rand(
        w.batch, w.heads_kv, w.seq, w.dim)
    counts = active_counts(w, gen)
    width = max(counts)
    pos = torch.full((w.batch, width), PAD_POS, dtype=torch.long)
    for b, c in enumerate(counts):
        pos[b, :c] = torch.randperm(w.seq, generator=gen)[:c].sort().values
    pos = pos.to(dev)
    valid = pos < PAD_POS
    if w.kv_mode == "cache":
        pairs = sum(c * (c + 1) // 2 for c in counts)
    else:
        pairs = int((torch.where(valid, pos, -1) + 1).sum())
    return Inputs(q, k, v, pos, torch.where(valid, pos, 0), torch.where(valid, pos, w.seq), valid, pairs,
                  w.batch * w.seq * (w.seq + 1) // 2)


def _gather(x: Tensor, rows: Tensor) -> Tensor:
    return x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _scatter(like: Tensor, rows: Tensor, y: Tensor) -> Tensor:
    """Scatter compact rows into a zero full-length tensor; padded slots land in a dummy row S, dropped."""
    out = like.new_zeros(like.shape[0], like.shape[1], like.shape[2] + 1, like.shape[3])
    return out.scatter(2, rows[:, None, :, None].expand(-1, y.shape[1], -1, y.shape[3]), y)[:, :, :-1]


def variants(w: Workload, x: Inputs, flex: bool,
             triton_configs: tuple[str, ...] = ()) -> dict[str, Callable[[], Tensor]]:
    """name -> callable returning the full-length output (inactive rows zero); "triton <name>": the kernels
    under a named config of NAMED_CONFIGS."""
    from mor_ds.kernels import active_attention

    q, k, v = x.q, x.k, x.v
    out: dict[str, Callable[[], Tensor]] = {
        "full causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    seq = w.seq
    if w.kv_mode == "cache":
        active = torch.zeros(w.batch, seq + 1, dtype=torch.bool, device=q.device)
        active.scatter_(1, x.write_rows, True)
        active = active[:, :seq]
        ar = torch.arange(seq, device=q.device)
        mask = ((ar[None, :] <= ar[:, None])[None] & active[:, None, :]) | torch.eye(seq, dtype=torch.bool,
                                                                                       device=q.device)
        mask = mask[:, None]
        out["dense masked SDPA"] = lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True) * active[:, None, :, None]
        # exact for real rows: padded keys sit after every real key in compact order
        out["gather+SDPA causal"] = lambda: _scatter(q, x.write_rows, F.scaled_dot_product_attention(
            _gather(q, x.read_rows), _gather(k, x.read_rows), _gather(v, x.read_rows), is_causal=True,
            enable_gqa=True))
        if flex:
            flex_fn, block_mask = _flex_causal(x.pos.shape[1])
            out["flex"] = lambda: _scatter(q, x.write_rows, flex_fn(
                _gather(q, x.read_rows), _gather(k, x.read_rows), _gather(v, x.read_rows), block_mask=block_mask,
                enable_gqa=True))
        triton = functools.partial(active_attention, q, k, v, q_rows=x.read_rows, kv_rows=x.read_rows, q_pos=x.pos,
                                   kv_pos=x.pos)
    else:
        kv_pos = torch.arange(seq, device=q.device)
        out["gather+masked SDPA"] = lambda: _scatter(q, x.write_rows, F.scaled_dot_product_attention(
            _gather(q, x.read_rows), k, v, attn_mask=(kv_pos[None, None, :] <= x.pos[:, :, None])[:, None],
            enable_gqa=True))
        if flex:
            flex_fn, block_mask_for = _flex_share(w.batch, x.pos.shape[1], seq)
            out["flex"] = lambda: _scatter(q, x.write_rows, flex_fn(
                _gather(q, x.read_rows), k, v, block_mask=block_mask_for(x.pos), enable_gqa=True))
        triton = functools.partial(active_attention, q, k, v, q_rows=x.read_rows, q_pos=x.pos)
    out["triton"] = triton
    named = _named_configs()
    for name in triton_configs:
        out[f"triton {name}"] = functools.partial(triton, configs=named[name])
    return out


_FLEX: dict = {}


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)  # recompiles once with dynamic shapes after a change
    return _FLEX["fn"]


def _flex_causal(length: int):
    """FlexAttention over the gathered active tokens with a causal block mask (data-independent: built once)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, length, length, device="cuda")
    return _flex_attention(), mask


def _flex_share(batch: int, q_len: int, kv_len: int):
    """Compact queries over all keys: the block mask depends on the step's positions, so it is built per call."""
    from torch.nn.attention.flex_attention import create_block_mask

    def block_mask_for(pos: Tensor):
        return create_block_mask(lambda b, h, qi, ki: ki <= pos[b, qi], batch, None, q_len, kv_len, device="cuda")

    return _flex_attention(), block_mask_for


def time_variant(fn: Callable[[], Tensor], x: Inputs, rep_ms: int, graphs: bool = False) -> tuple[float, float]:
    """(forward ms, forward+backward ms); `graphs`: replays of a CUDA graph (device time only)."""
    grad = torch.randn_like(x.q)
    if graphs:
        def forward() -> None:
            with torch.no_grad():
                fn()

        def forward_backward() -> None:
            torch.autograd.grad(fn(), [x.q, x.k, x.v], grad, allow_unused=True)

        return bench_graph_ms(forward), bench_graph_ms(forward_backward)
    with torch.no_grad():
        fwd = bench_ms(fn, rep_ms=rep_ms)
    both = bench_ms(lambda: fn().backward(grad), grad_to_none=[x.q, x.k, x.v], rep_ms=rep_ms)
    return fwd, both


def check_variant(fn: Callable[[], Tensor], ref: Tensor, x: Inputs) -> float:
    with torch.no_grad():
        y = fn().float()
    rows = _gather(y, x.read_rows) - _gather(ref.float(), x.read_rows)
    rows = rows * x.valid[:, None, :, None]
    return float(rows.norm() / (_gather(ref.float(), x.read_rows) * x.valid[:, None, :, None]).norm())


def run_workload(w: Workload, flex: bool, rep_ms: int, repeats: int = 1, graphs: bool = False,
                 triton_configs: tuple[str, ...] = ()) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = make_inputs(w, gen)
    fns = variants(w, x, flex, triton_configs)
    ref_name = "gather+SDPA causal" if w.kv_mode == "cache" else "gather+masked SDPA"
    with torch.no_grad():
        ref = fns[ref_name]()
    result = {"workload": w.label(), "mode": w.mode, "pairs": x.pairs, "full_pairs": x.full_pairs,
              "flops_fwd": 4 * w.dim * w.heads_q * x.pairs, "times": {}, "rel_err_vs_" + ref_name: None}
    result["rel_err_vs_" + ref_name] = check_variant(fns["triton"], ref, x)
    for name in triton_configs:
        result[f"rel_err triton {name}"] = check_variant(fns[f"triton {name}"], ref, x)
    for _ in range(repeats):  # variants interleaved; the best median of each counts (noise only adds time)
        for name, fn in fns.items():
            if name in result.get("errors", {}):
                continue
            try:
                fwd, both = time_variant(fn, x, rep_ms, graphs)
            except Exception as exc:  # a baseline that cannot run (e.g. Flex on this build) is reported, not fatal
                result["times"][name] = None
                result.setdefault("errors", {})[name] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            best = result["times"].get(name) or (fwd, both)
            result["times"][name] = (min(best[0], fwd), min(best[1], both))
    del x, fns, ref
    torch.cuda.empty_cache()
    return result


def summarize(r: dict) -> dict:
    """Ideal times, speedups and the kernels' targets (the table's goals column) for one workload result."""
    t = r["times"]
    frac_pairs = r["pairs"] / r["full_pairs"]
    full = t["full causal SDPA"]
    tri = t["triton"]
    s = {"ideal": (full[0] * frac_pairs, full[1] * frac_pairs) if full else None}
    baselines = {n: v for n, v in t.items() if not n.startswith("triton") and v is not None}
    best = min(baselines, key=lambda n: baselines[n][1])
    s["best_baseline"] = best
    if tri is None:
        return s
    s["tflops"] = (r["flops_fwd"] / tri[0] / 1e9, 3.5 * r["flops_fwd"] / tri[1] / 1e9)
    s["speedup_best"] = baselines[best][1] / tri[1]
    s["vs_ideal"] = tri[1] / s["ideal"][1] if s["ideal"] else None
    goals = []
    if r["mode"] in ("cache", "share") and r["workload"].endswith("f=1"):
        goals.append(("f=1: within 10% of full causal SDPA", tri[1] <= 1.10 * full[1]))
    elif r["mode"] == "cache":
        g = t["gather+SDPA causal"]
        goals.append(("≥2x faster than gather+SDPA", g is not None and tri[1] * 2 <= g[1]))
    else:
        goals.append(("within 1.5x of ideal", tri[1] <= 1.5 * s["ideal"][1]))
        goals.append(("≥1.5x faster than best baseline", s["speedup_best"] >= 1.5))
    s["goals"] = goals
    return s


def _fmt(v: tuple[float, float] | None, i: int) -> str:
    return "—" if v is None else f"{v[i]:.3f}"


def print_tables(results: list[dict]) -> None:
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        names = list(dict.fromkeys(n for r in rows for n in r["times"]))
        print(f"\n### mode {mode}: ms forward / forward+backward (gather/scatter included)\n")
        head = ["workload"] + names + ["ideal", "triton TFLOP/s", "best baseline ÷ triton", "triton ÷ ideal",
                                       "goals (fwd+bwd)", "rel err"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            s = summarize(r)
            cells = [r["workload"]] + [f"{_fmt(r['times'][n], 0)} / {_fmt(r['times'][n], 1)}"
                                       if n in r["times"] else "—" for n in names]
            cells.append(f"{_fmt(s['ideal'], 0)} / {_fmt(s['ideal'], 1)}")
            cells.append(f"{s['tflops'][0]:.0f} / {s['tflops'][1]:.0f}" if "tflops" in s else "—")
            cells.append(f"{s.get('speedup_best', float('nan')):.2f}x ({s['best_baseline']})")
            cells.append(f"{s['vs_ideal']:.2f}" if s.get("vs_ideal") else "—")
            cells.append("; ".join(f"{g}: {'met' if ok else 'MISSED'}" for g, ok in s.get("goals", [])))
            err = next(v for k, v in r.items() if k.startswith("rel_err"))
            cells.append(f"{err:.1e}")
            print("| " + " | ".join(cells) + " |")
            for name, msg in r.get("errors", {}).items():
                print(f"  ({name} failed: {msg})")


def time_index_building(seqs: list[int], fractions: list[Fraction], batch_tokens: int, rep_ms: int) -> list[dict]:
    """Expert-choice index building: top-k over router scores, then sort to keep causal order."""
    out = []
    for seq in seqs:
        batch = batch_tokens // seq
        scores = torch.randn(batch, seq, device="cuda")
        for f in fractions:
            k = max(1, math.floor(f * seq))
            ms = bench_ms(lambda scores=scores, k=k: scores.topk(k, dim=1).indices.sort(dim=1).values, rep_ms=rep_ms)
            out.append({"seq": seq, "batch": batch, "frac": str(f), "ms": ms})
    return out


def _recursion_step(shape: str, seq: int, batch: int, kv_mode: str, backend: str, frac: Fraction):
    """One MoR recursion step as the model runs it (gather h → shared decoder block → scatter, fwd+bwd):
    returns (callable, leaves whose grads to reset)."""
    from mor_ds.models.block import KV, DecoderBlock, TokenView, rope_cos_sin
    from mor_ds.models.recursion import gather_rows, scatter_rows

    cfg = load_config(SHAPE_PRESETS[shape], [f"model.attention_backend={backend}"]).model
    torch.manual_seed(0)
    block = DecoderBlock(cfg).to("cuda", torch.bfloat16)
    h = torch.randn(batch, seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    full_view = TokenView(None, None, rope_cos_sin(torch.arange(seq, device="cuda")[None], cfg.head_dim,
                                                   cfg.rope_theta, torch.bfloat16))
    shared = None
    if kv_mode == "share":
        with torch.no_grad():
            _, kv = block(h, full_view)
        shared = KV(kv.k.clone().requires_grad_(), kv.v.clone().requires_grad_(), full_view)
    k = max(1, math.floor(frac * seq))
    idx = torch.rand(batch, seq, device="cuda").topk(k, dim=1).indices.sort(dim=1).values
    view = TokenView(idx, None, rope_cos_sin(idx, cfg.head_dim, cfg.rope_theta, torch.bfloat16))
    grad = torch.randn_like(h)

    def step() -> None:
        y, _ = block(gather_rows(h, idx), view, shared)
        scatter_rows(h, idx, y).backward(grad)

    return step, [h] + list(block.parameters()) + ([shared.k, shared.v] if shared else [])


def time_recursion_step(shape: str, seq: int, batch: int, fractions: list[Fraction], rep_ms: int) -> list[dict]:
    results = []
    for kv_mode in ("cache", "share"):
        for backend in ("sdpa", "triton"):
            for f in fractions:
                step, leaves = _recursion_step(shape, seq, batch, kv_mode, backend, f)
                ms = bench_ms(step, grad_to_none=leaves, rep_ms=rep_ms)
                results.append({"shape": shape, "seq": seq, "batch": batch, "kv_mode": kv_mode, "backend": backend,
                                "frac": str(f), "fwd_bwd_ms": ms})
    return results


def profile(args: argparse.Namespace, fractions: list[Fraction]) -> None:
    """Kernel-level breakdown (torch.profiler) of the Triton path's forward+backward and of a recursion step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from mor_ds.kernels import flash_bwd, flash_fwd
    from mor_ds.kernels.block_ranges import block_ranges_kernel

    kernels = [flash_fwd.attention_fwd_kernel, flash_bwd.attention_bwd_dq_kernel, flash_bwd.attention_bwd_dkdv_kernel,
               block_ranges_kernel]

    def compiled_variants() -> int:
        return sum(len(cache[0]) for fn in kernels for cache in fn.device_caches.values())

    for shape in args.shapes:
        preset = load_config(SHAPE_PRESETS[shape]).model
        for seq in args.seq:
            for mode in args.modes:
                for frac in fractions:
                    w = Workload(shape, preset.num_heads, preset.num_kv_heads, preset.head_dim, args.tokens // seq,
                                 seq, frac, mode)
                    x = make_inputs(w, torch.Generator().manual_seed(0))
                    fn = variants(w, x, False)["triton"]
                    grad = torch.randn_like(x.q)
                    step, leaves = (lambda fn=fn, grad=grad: fn().backward(grad)), [x.q, x.k, x.v]
                    for name, (run_once, reset) in {
                        f"kernel {mode} {w.label()}": (step, leaves),
                        f"step {w.kv_mode} {w.label()}": _recursion_step(shape, seq, w.batch, w.kv_mode, "triton",
                                                                         frac),
                    }.items():
                        for _ in range(3):
                            run_once()
                        torch.cuda.synchronize()
                        before = compiled_variants()
                        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                            for _ in range(5):
                                for t in reset:
                                    t.grad = None
                                run_once()
                            torch.cuda.synchronize()
                        print(f"\n#### profile: {name} (5 iterations; compiled Triton variants "
                              f"{before} -> {compiled_variants()})")
                        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                        max_name_column_width=60))


def _sweep_trials(head_dim: int) -> list[tuple[str, KernelConfigs]]:
    """(label, configs): each trial changes one kernel's tiles (forward and dQ share a block shape) or one knob
    of the default configs; candidates are the tiles that compile without register spills (`aot`)."""
    from dataclasses import replace

    from mor_ds.kernels import TileConfig as T
    from mor_ds.kernels.attention import default_configs

    base = default_configs(head_dim, torch.device("cuda"))
    trials = [("default", base), ("memset zero-fill", replace(base, fused_zero_fill=False)),
              ("dkdv loop per head", replace(base, dkdv_single_loop=False))]
    if head_dim == 64:  # the former defaults (fwd/dQ 128x64, dQ 8 warps) and the H100 sweep's runners-up
        fwd_dq = [(T(128, 64, 4, 3), T(128, 64, 8, 3)), (T(128, 32, 4, 3), T(128, 32, 4, 3)),
                  (T(64, 64, 4, 4), T(64, 64, 4, 4))]
        dq_only = [T(64, 64, 8, 3)]
        dkdv = [T(32, 64, 4, 3), T(32, 64, 4, 4), T(64, 64, 4, 4)]
    else:
        fwd_dq = [(T(64, 64, 4, 3), T(64, 64, 4, 3))]
        dq_only = []
        dkdv = [T(64, 64, 8, 3), T(32, 64, 4, 3), T(32, 64, 8, 3)]  # 32x64 at 4 warps spills
    trials += [(f"fwd+dq {f.block_m}x{f.block_n} w{f.num_warps}s{f.num_stages} / dq w{d.num_warps}s{d.num_stages}",
                replace(base, fwd=f, dq=d)) for f, d in fwd_dq]
    trials += [(f"dq w{d.num_warps}s{d.num_stages}", replace(base, dq=d)) for d in dq_only
               if (d.block_m, d.block_n) == (base.fwd.block_m, base.fwd.block_n)]
    trials += [(f"dkdv {t.block_m}x{t.block_n} w{t.num_warps}s{t.num_stages}", replace(base, dkdv=t)) for t in dkdv]
    return trials


def sweep(shape: str, seq: int, batch_tokens: int, rep_ms: int, graphs: bool, head_dims: list[int]) -> list[dict]:
    """Time Triton configs (forward, forward+backward) on cache and share workloads; a failing config (e.g.
    out of shared memory) is reported and skipped."""
    from mor_ds.kernels import active_attention

    preset = load_config(SHAPE_PRESETS[shape]).model
    out = []
    for head_dim in head_dims:
        heads_q, heads_kv = (preset.num_heads, preset.num_kv_heads) if head_dim == preset.head_dim else (8, 4)
        trials = _sweep_trials(head_dim)
        for mode, frac in (("cache", Fraction(1, 4)), ("cache", Fraction(1, 2)), ("share", Fraction(1, 2)),
                           ("cache", Fraction(1))):
            w = Workload(shape, heads_q, heads_kv, head_dim, batch_tokens // seq, seq, frac, mode)
            x = make_inputs(w, torch.Generator().manual_seed(0))
            kv_rows = x.read_rows if mode == "cache" else None
            kv_pos = x.pos if mode == "cache" else None

            call = functools.partial(active_attention, x.q, x.k, x.v, q_rows=x.read_rows, kv_rows=kv_rows, q_pos=x.pos,
                                     kv_pos=kv_pos)
            for label, cfg in trials:
                try:
                    fwd, both = time_variant(functools.partial(call, configs=cfg), x, rep_ms, graphs)
                except Exception as exc:
                    print(f"  D={head_dim} {mode} f={frac} {label}: failed ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0][:160]})", flush=True)
                    continue
                out.append({"head_dim": head_dim, "mode": mode, "frac": str(frac), "trial": label,
                            "configs": repr(cfg), "fwd_ms": fwd, "fwd_bwd_ms": both})
                print(f"  D={head_dim} {mode} f={frac} {label}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms", flush=True)
            torch.cuda.empty_cache()
    return out


def print_sweep(rows: list[dict]) -> None:
    """One line per trial: fwd+bwd ms per workload, relative to the default config."""
    workloads = list(dict.fromkeys((r["head_dim"], r["mode"], r["frac"]) for r in rows))
    trials = list(dict.fromkeys(r["trial"] for r in rows))
    at = {(r["head_dim"], r["mode"], r["frac"], r["trial"]): r["fwd_bwd_ms"] for r in rows}
    print("\n### sweep: fwd+bwd ms (÷ default)\n")
    print("| trial | " + " | ".join(f"D={d} {m} f={f}" for d, m, f in workloads) + " |")
    print("|---|" + "---|" * len(workloads))
    for t in trials:
        cells = []
        for d, m, f in workloads:
            v, ref = at.get((d, m, f, t)), at.get((d, m, f, "default"))
            cells.append("—" if v is None else f"{v:.3f}" + (f" ({v / ref:.2f})" if ref else ""))
        print(f"| {t} | " + " | ".join(cells) + " |")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("mor-ds bench attention: needs a CUDA GPU")
        return 2
    env = environment()
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    fractions = [Fraction(f) for f in args.fractions]
    record: dict = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    if args.profile:
        profile(args, fractions)
    elif args.sweep:
        record["sweep"] = sweep(args.shapes[-1], args.seq[0], args.tokens, args.rep_ms, args.graphs, args.sweep_dims)
        print_sweep(record["sweep"])
    else:
        results = []
        for si, shape in enumerate(args.shapes):
            preset = load_config(SHAPE_PRESETS[shape]).model
            for qi, seq in enumerate(args.seq):
                flex_here = args.flex == "all" or (args.flex == "first" and si == 0 and qi == 0)
                for mode in args.modes:
                    flex = flex_here and not mode.startswith("tc-")  # compile time; tc behaves like its mode
                    for frac in fractions:
                        w = Workload(shape, preset.num_heads, preset.num_kv_heads, preset.head_dim,
                                     args.tokens // seq, seq, frac, mode)
                        results.append(run_workload(w, flex, args.rep_ms, args.repeats, args.graphs,
                                                    tuple(args.triton_configs)))
                        print("  " + json.dumps(results[-1]), flush=True)  # partial results survive a timeout
        record["results"] = results
        record["index_building"] = time_index_building(args.seq, fractions, args.tokens, args.rep_ms)
        if args.step:
            seq = args.seq[0]
            record["recursion_step"] = time_recursion_step(args.shapes[-1], seq, args.tokens // seq, fractions,
                                                           args.rep_ms)
        print_tables(results)
        print("\n### index building (top-k + sort), ms\n")
        for r in record["index_building"]:
            print(f"  S={r['seq']} B={r['batch']} f={r['frac']}: {r['ms']:.3f}")
        for r in record.get("recursion_step", []):
            print(f"  step {r['shape']} S={r['seq']} B={r['batch']} {r['kv_mode']} {r['backend']} f={r['frac']}: "
                  f"{r['fwd_bwd_ms']:.3f} ms fwd+bwd")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=1, default=str)
    return 0
