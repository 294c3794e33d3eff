"""Triton active-token attention (mor_ds.kernels) against the plain-PyTorch reference.

CPU: the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny shapes, fp32/fp16 (and
bf16 through the kernels' upcast path, since the interpreter's own bf16 math is wrong). Outputs and
gradients of q, k, v for both KV modes, uneven active counts (padded and packed varlen), all-active and
single-active steps, GQA, document masks, fused gather/scatter and unsorted positions.
CUDA (`-m cuda`, needs TRITON_INTERPRET=0): the same checks at full model shapes in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from mor_ds.attention import PAD_POS, attention
from mor_ds.attention.reference import reference_attention
from mor_ds.kernels import active_attention, active_attention_varlen
from mor_ds.kernels.attention import interpreter_active

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖, with a floor of 1e-2 per element so that an all-zero reference (e.g. dQ of a query
    that sees a single key) accepts rounding noise only."""
    x, ref = x.detach().double(), ref.detach().double()
    assert torch.isfinite(x).all()
    return float((x - ref).norm() / (ref.norm() + 1e-2 * ref.numel() ** 0.5))


def sorted_active(batch: int, length: int, counts: list[int], gen: torch.Generator, device="cpu") -> torch.Tensor:
    """(B, max count) sorted original indices of random active tokens; padded slots at PAD_POS."""
    width = max(counts)
    rows = []
    for c in counts:
        idx = torch.randperm(length, generator=gen)[:c].sort().values
        rows.append(torch.cat([idx, torch.full((width - c,), PAD_POS, dtype=torch.long)]))
    return torch.stack(rows).to(device)


def make_qkv(batch, heads_q, heads_kv, len_q, len_kv, dim, dtype, gen, device="cpu"):
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return rand(batch, heads_q, len_q, dim), rand(batch, heads_kv, len_kv, dim), rand(batch, heads_kv, len_kv, dim)


def check_against_reference(q, k, v, *, row_valid=None, tol=None, **kwargs):
    """Output and q/k/v gradients of the triton backend vs the reference, on the real (non-padded) query rows."""
    out = attention(q, k, v, backend="triton", **kwargs)
    ref = reference_attention(q, k, v, **kwargs)
    valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if row_valid is None else row_valid
    valid = valid[:, None, :, None].to(q.device)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out) * valid
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    tol = tol or TOL[q.dtype]
    assert rel_err(out * valid, ref * valid) < tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < tol, f"d{name}: {rel_err(g, r)}"
    if row_valid is not None:  # padded query slots: zero output in the triton backend
        assert (out * ~valid).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mode1_recursion_wise_cache(dtype):
    gen = torch.Generator().manual_seed(0)
    idx = sorted_active(2, 96, [40, 40], gen)
    q, k, v = make_qkv(2, 4, 2, 40, 40, 32, dtype, gen)
    check_against_reference(q, k, v, q_pos=idx, kv_pos=idx)


def test_mode2_recursive_kv_sharing():
    gen = torch.Generator().manual_seed(1)
    idx = sorted_active(2, 80, [27, 27], gen)
    q, k, v = make_qkv(2, 6, 2, 27, 80, 32, torch.float32, gen)
    check_against_reference(q, k, v, q_pos=idx, kv_pos=None)


@pytest.mark.parametrize("mode", ["cache", "share"])
def test_uneven_counts_padded(mode):
    """Token-choice: counts differ per sequence, rows padded with PAD_POS (padded queries skipped)."""
    gen = torch.Generator().manual_seed(2)
    counts = [37, 9]
    idx = sorted_active(2, 64, counts, gen)
    valid = idx < PAD_POS
    kv_len = 37 if mode == "cache" else 64
    q, k, v = make_qkv(2, 4, 2, 37, kv_len, 16, torch.float32, gen)
    check_against_reference(q, k, v, q_pos=idx, kv_pos=idx if mode == "cache" else None, row_valid=valid)


@pytest.mark.parametrize("mode", ["cache", "share"])
def test_varlen_packed_matches_per_sequence_reference(mode):
    gen = torch.Generator().manual_seed(3)
    counts, length = [33, 1, 20], 48
    idx = [torch.randperm(length, generator=gen)[:c].sort().values for c in counts]
    q_lens = counts
    kv_lens = counts if mode == "cache" else [length] * len(counts)
    kv_idx = idx if mode == "cache" else [torch.arange(length)] * len(counts)
    q = torch.randn(sum(q_lens), 4, 16, generator=gen).requires_grad_()
    k = torch.randn(sum(kv_lens), 2, 16, generator=gen).requires_grad_()
    v = torch.randn(sum(kv_lens), 2, 16, generator=gen).requires_grad_()
    cu_q = torch.tensor([0] + q_lens).cumsum(0).int()
    cu_k = torch.tensor([0] + kv_lens).cumsum(0).int()
    out = active_attention_varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, max_seqlen_q=max(q_lens),
                                  max_seqlen_kv=max(kv_lens), q_pos=torch.cat(idx), kv_pos=torch.cat(kv_idx))
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    refs = []
    for b in range(len(counts)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        refs.append(reference_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                        v[ks].transpose(0, 1)[None], q_pos=idx[b][None],
                                        kv_pos=kv_idx[b][None])[0].transpose(0, 1))
    ref = torch.cat(refs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert rel_err(out, ref) < TOL[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOL[torch.float32]


@pytest.mark.parametrize("dim", [64, 128])
def test_all_active_dense_causal(dim):
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 3, 1, 50, 50, dim, torch.float16, gen)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("mode", ["cache", "share"])
def test_single_active_token(mode):
    gen = torch.Generator().manual_seed(5)
    idx = torch.tensor([[17], [0]])
    kv_len = 1 if mode == "cache" else 40
    q, k, v = make_qkv(2, 2, 2, 1, kv_len, 16, torch.float32, gen)
    check_against_reference(q, k, v, q_pos=idx, kv_pos=idx if mode == "cache" else None)


@pytest.mark.parametrize("mode", ["cache", "share"])
def test_document_mask(mode):
    """Packed documents: positions restart in each document, attention stays inside it."""
    gen = torch.Generator().manual_seed(6)
    length = 72
    doc = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(s)) for s in ([30, 22, 20], [5, 60, 7])])
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    ar = torch.arange(length)
    pos = ar - torch.where(starts, ar, 0).cummax(dim=1).values
    idx = sorted_active(2, length, [36, 36], gen)
    q_pos, q_doc = pos.gather(1, idx), doc.gather(1, idx)
    if mode == "cache":
        kv_pos, kv_doc, kv_len = q_pos, q_doc, 36
    else:
        kv_pos, kv_doc, kv_len = pos, doc, length
    q, k, v = make_qkv(2, 4, 2, 36, kv_len, 16, torch.float32, gen)
    check_against_reference(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_doc=q_doc, kv_doc=kv_doc)


@pytest.mark.parametrize("knobs", [{"dkdv_single_loop": True}, {"dkdv_single_loop": False}],
                         ids=["dkdv-single-loop", "dkdv-loop-per-head"])
def test_masked_and_full_runs_agree_with_reference(knobs):
    """Documents give each block masked runs before and after its full run: the masked / full / masked loops
    (forward, dQ; dK/dV per head) and dK/dV's single pipelined loop (mask outside the full run) must match the
    reference."""
    from dataclasses import replace

    from mor_ds.kernels.attention import default_configs

    gen = torch.Generator().manual_seed(15)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([8, 72, 40]))[None].expand(2, -1)
    pos = torch.cat([torch.arange(n) for n in (8, 72, 40)])[None].expand(2, -1).contiguous()
    q, k, v = make_qkv(2, 4, 2, 120, 120, 16, torch.float32, gen)
    cfg = replace(default_configs(16, q.device), **knobs)
    out = active_attention(q, k, v, q_pos=pos, kv_pos=pos, q_doc=doc, kv_doc=doc, configs=cfg)
    ref = reference_attention(q, k, v, q_pos=pos, kv_pos=pos, q_doc=doc, kv_doc=doc)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert rel_err(out, ref) < TOL[torch.float32]
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < TOL[torch.float32], f"d{name}"


def test_unsorted_positions():
    """Block skipping is derived from per-block min/max, so any order of positions stays exact."""
    gen = torch.Generator().manual_seed(8)
    q_pos = torch.stack([torch.randperm(64, generator=gen)[:40] for _ in range(2)])
    kv_pos = torch.stack([torch.randperm(64, generator=gen)[:48] for _ in range(2)])
    kv_pos[:, 0] = 0  # every query sees at least one key
    q, k, v = make_qkv(2, 2, 1, 40, 48, 16, torch.float32, gen)
    check_against_reference(q, k, v, q_pos=q_pos, kv_pos=kv_pos)


def poison_empty_like(monkeypatch) -> None:
    """Buffers the kernels allocate with torch.empty_like start as NaN: every element must be written."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))


def fused_gather_reference(q, k, v, idx, mode):
    """Reference for the fused gather/scatter: gather the active rows, attend, scatter into zeros."""
    heads_q, heads_kv, dim = q.shape[1], k.shape[1], q.shape[-1]
    rows = idx[:, None, :, None].expand(-1, heads_q, -1, dim)
    kv_gather = (lambda x: x.gather(2, idx[:, None, :, None].expand(-1, heads_kv, -1, dim))) if mode == "cache" \
        else (lambda x: x)
    ref_active = reference_attention(q.gather(2, rows), kv_gather(k), kv_gather(v), q_pos=idx,
                                     kv_pos=idx if mode == "cache" else None)
    return torch.zeros_like(q).scatter(2, rows, ref_active)


@pytest.mark.parametrize("mode", ["cache", "share"])
@pytest.mark.parametrize("knobs", [{}, {"fused_zero_fill": False, "dkdv_single_loop": False}],
                         ids=["default", "memset+loop-per-head"])
def test_fused_gather_scatter(mode, knobs, monkeypatch):
    """q_rows / kv_rows: read active rows of full-length tensors, write results back to those rows, zeros (and
    zero gradients) in every other row, whether the kernels' extra programs or a memset write them."""
    from dataclasses import replace

    from mor_ds.kernels.attention import default_configs

    poison_empty_like(monkeypatch)
    gen = torch.Generator().manual_seed(9)
    length = 70
    idx = sorted_active(2, length, [30, 30], gen)
    q, k, v = make_qkv(2, 4, 2, length, length, 32, torch.float32, gen)
    kv_rows = idx if mode == "cache" else None
    cfg = replace(default_configs(32, q.device), **knobs)
    out = active_attention(q, k, v, q_rows=idx, kv_rows=kv_rows, configs=cfg)
    ref = fused_gather_reference(q, k, v, idx, mode)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert rel_err(out, ref) < TOL[torch.float32]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOL[torch.float32]


@pytest.mark.parametrize("mode", ["cache", "share"])
def test_fused_gather_with_padded_slots(mode, monkeypatch):
    """Token-choice through the fused gather: padded slots point at row 0 (a real, active row) with PAD_POS;
    they must neither disturb that row's output nor its gradients, nor mark a row active."""
    poison_empty_like(monkeypatch)
    gen = torch.Generator().manual_seed(13)
    length = 50
    idx = sorted_active(2, length, [25, 11], gen)
    idx[:, 0] = 0
    valid = idx < PAD_POS
    rows = torch.where(valid, idx, 0)
    q, k, v = make_qkv(2, 2, 1, length, length, 16, torch.float32, gen)
    kv_rows = rows if mode == "cache" else None
    out = active_attention(q, k, v, q_rows=rows, kv_rows=kv_rows, q_pos=idx, kv_pos=idx if mode == "cache" else None)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for b, count in enumerate([25, 11]):
        sel = idx[b, :count]
        qb, kb, vb = (x[b:b + 1].detach().requires_grad_() for x in (q, k, v))
        kv_sel = (lambda x, sel=sel: x[:, :, sel]) if mode == "cache" else (lambda x: x)
        ref = reference_attention(qb[:, :, sel], kv_sel(kb), kv_sel(vb), q_pos=sel[None],
                                  kv_pos=sel[None] if mode == "cache" else None)
        ref_grads = torch.autograd.grad(ref, (qb, kb, vb), grad_out[b:b + 1, :, sel])
        assert rel_err(out[b:b + 1, :, sel], ref) < TOL[torch.float32]
        inactive = torch.ones(length, dtype=torch.bool)
        inactive[sel] = False
        assert (out[b][:, inactive] == 0).all()
        for g, r in zip(grads, ref_grads):
            assert rel_err(g[b:b + 1], r) < TOL[torch.float32]


def test_transposed_views_keep_layout():
    """The model passes (B, S, H, D) projections as (B, H, S, D) views; no copy, output in the same layout."""
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(2, 33, 4, 16, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 33, 2, 16, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 33, 2, 16, generator=gen).transpose(1, 2).requires_grad_()
    out = active_attention(q, k, v)
    assert out.stride() == q.stride()
    check_against_reference(q, k, v)


def test_bad_inputs_raise_one_line_errors():
    q = torch.randn(1, 3, 8, 16)
    kv = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        active_attention(q, kv, kv)
    with pytest.raises(ValueError, match="head dim"):
        active_attention(torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24), torch.randn(1, 2, 8, 24))
    with pytest.raises(ValueError, match=r"q_pos must have shape \(1, 8\)"):
        active_attention(kv, kv, kv, q_pos=torch.arange(7)[None])
    with pytest.raises(ValueError, match="both q_doc and kv_doc"):
        active_attention(kv, kv, kv, q_doc=torch.zeros(1, 8, dtype=torch.long))


def test_kernel_sentinels_match_reference():
    from mor_ds.kernels import common

    assert common.PAD_POS.value == PAD_POS


def test_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time compile for sm_90a with Triton's bundled ptxas (in a process without the interpreter): GPU-only
    compile errors show up on CPU CI; at their default tiles the matmuls must be Hopper `wgmma` with 16-byte loads,
    and no kernel may spill registers to local memory (ptxas's own count)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "mor_ds.kernels.aot"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")
    assert set(report) >= {f"{k} D={d}" for k in kernels for d in (64, 128)} | {"block_ranges_kernel"}
    for name, facts in report.items():
        assert facts["spill_bytes"] == 0, f"{name} spills to local memory: {facts}"
        assert 0 < facts["registers"] <= 255, facts
        if name.startswith("attention_"):
            assert facts["wgmma"] and facts["cp_async_16B"], f"{name}: {facts}"


# ---------------------------------------------------------------------------------------------------------
# Full model shapes on a GPU: `TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_kernels.py`

cuda = pytest.mark.skipif(not torch.cuda.is_available() or interpreter_active(),
                          reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("heads_q,heads_kv,dim", [(15, 5, 64), (9, 3, 64), (16, 8, 128)])
@pytest.mark.parametrize("mode", ["cache", "share"])
@pytest.mark.parametrize("frac", [1.0, 0.5, 0.25])
def test_full_shapes_bf16_cuda(heads_q, heads_kv, dim, mode, frac):
    gen = torch.Generator().manual_seed(11)
    batch, length = 4, 2048
    count = int(frac * length)
    idx = sorted_active(batch, length, [count] * batch, gen, "cuda")
    kv_len = count if mode == "cache" else length
    q, k, v = make_qkv(batch, heads_q, heads_kv, count, kv_len, dim, torch.bfloat16, gen, "cuda")
    check_against_reference(q, k, v, q_pos=idx, kv_pos=idx if mode == "cache" else None, tol=1e-2)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["cache", "share"])
def test_full_shapes_token_choice_and_documents_cuda(mode):
    gen = torch.Generator().manual_seed(12)
    batch, length = 4, 2048
    counts = [2048, 1500, 700, 64]
    idx = sorted_active(batch, length, counts, gen, "cuda")
    valid = idx < PAD_POS
    doc = (torch.arange(length, device="cuda") // 300).expand(batch, length)
    pos = torch.arange(length, device="cuda") % 300
    pos = pos.expand(batch, length)
    safe = idx.clamp_max(length - 1)
    q_doc = torch.where(valid, doc.gather(1, safe), -1)
    q_pos = torch.where(valid, pos.gather(1, safe), PAD_POS)
    kv_len = max(counts) if mode == "cache" else length
    q, k, v = make_qkv(batch, 15, 5, max(counts), kv_len, 64, torch.bfloat16, gen, "cuda")
    kv = dict(kv_pos=q_pos, kv_doc=q_doc) if mode == "cache" else dict(kv_pos=pos, kv_doc=doc)
    check_against_reference(q, k, v, q_pos=q_pos, q_doc=q_doc, row_valid=valid.cpu(), tol=1e-2, **kv)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["cache", "share"])
@pytest.mark.parametrize("frac", [0.5, 0.25])
def test_full_shapes_fused_gather_scatter_cuda(mode, frac, monkeypatch):
    """The benchmark's path: full-length bf16 q, k, v with q_rows / kv_rows, every inactive row written as zero."""
    poison_empty_like(monkeypatch)
    gen = torch.Generator().manual_seed(14)
    batch, length = 4, 2048
    idx = sorted_active(batch, length, [int(frac * length)] * batch, gen, "cuda")
    q, k, v = make_qkv(batch, 15, 5, length, length, 64, torch.bfloat16, gen, "cuda")
    out = active_attention(q, k, v, q_rows=idx, kv_rows=idx if mode == "cache" else None)
    ref = fused_gather_reference(q.float(), k.float(), v.float(), idx, mode)
    grad_out = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
    assert rel_err(out, ref) < 1e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-2, f"d{name}: {rel_err(g, r)}"


@pytest.mark.cuda
@cuda
def test_active_widths_share_one_compiled_variant_cuda():
    """Token-choice widths change every training step (including a width of 1, the dummy slot): none may make
    Triton compile a new kernel variant (~1 s of JIT each, paid inside the step)."""
    from mor_ds.kernels.block_ranges import block_ranges_kernel
    from mor_ds.kernels.flash_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
    from mor_ds.kernels.flash_fwd import attention_fwd_kernel

    kernels = (attention_fwd_kernel, attention_bwd_dq_kernel, attention_bwd_dkdv_kernel, block_ranges_kernel)
    device = torch.cuda.current_device()
    gen = torch.Generator().manual_seed(15)
    seen = []
    for width in (1, 17, 48, 100, 333):
        idx = sorted_active(2, 512, [width, max(1, width - 5)], gen, "cuda")  # second row padded
        q, k, v = make_qkv(2, 15, 5, width, width, 64, torch.bfloat16, gen, "cuda")
        active_attention(q, k, v, q_pos=idx, kv_pos=idx).sum().backward()
        seen.append([len(kernel.device_caches[device][0]) for kernel in kernels])
    assert all(counts == seen[0] for counts in seen), f"compiled variants per kernel after each width: {seen}"
