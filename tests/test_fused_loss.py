"""The chunked linear + cross-entropy (model.fused_loss) against the plain full-logits path: loss and gradients."""

from __future__ import annotations

import pytest
import torch

from mor_ds.config import ConfigError, load_config
from mor_ds.models import build_model
from mor_ds.models.loss import chunked_linear_cross_entropy, plain_linear_cross_entropy, resolve_fused_loss

TINY = ["model.vocab_size=96", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=48", "train.seq_len=16"]


def _inputs(n: int = 37, d: int = 16, vocab: int = 50, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, d, generator=gen, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 100])
def test_chunked_matches_plain_fp64(chunk_size):
    h, w, labels = _inputs()
    ref = plain_linear_cross_entropy(h, w, labels)
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w))
    out = chunked_linear_cross_entropy(h, w, labels, chunk_size)
    grads = torch.autograd.grad(2.5 * out, (h, w))  # a non-unit upstream gradient is applied in backward
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert grads[0][::4].abs().max() == 0  # ignored positions get no gradient


def test_chunked_batched_shape_and_partial_grads():
    """(B, S, d) hidden states with (B, S) labels; only W requiring grad (h detached) works too."""
    h, w, labels = _inputs(n=24)
    h3, labels2 = h.detach().view(4, 6, -1), labels.view(4, 6)
    ref = plain_linear_cross_entropy(h3.reshape(24, -1), w, labels)
    (ref_gw,) = torch.autograd.grad(ref, (w,))
    out = chunked_linear_cross_entropy(h3, w, labels2, chunk_size=7)
    (gw,) = torch.autograd.grad(out, (w,))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-10, atol=1e-13)


def test_chunked_without_grad_and_all_ignored():
    h, w, labels = _inputs()
    with torch.no_grad():
        no_grad_loss = chunked_linear_cross_entropy(h, w, labels, 8)
    torch.testing.assert_close(no_grad_loss, plain_linear_cross_entropy(h, w, labels))
    none = torch.full_like(labels, -100)
    assert torch.isnan(chunked_linear_cross_entropy(h, w, none, 8))
    assert torch.isnan(plain_linear_cross_entropy(h, w, none))  # the same as F.cross_entropy
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_linear_cross_entropy(h, w, labels, 0)


def test_chunked_bf16_close_to_plain():
    """bf16 weights (DeepSpeed's bf16 mode): logits rounded like nn.Linear's, fp32 softmax; gradients in bf16."""
    h, w, labels = _inputs(dtype=torch.bfloat16)
    ref = plain_linear_cross_entropy(h, w, labels)
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = chunked_linear_cross_entropy(h, w, labels, 8)
    grads = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_chunk_math_on_cuda_matches_plain():
    """On CUDA each chunk's softmax/gradient runs as one torch.compile'd function: same loss and gradients as
    the plain path at a production vocabulary (bf16 weights, fp32 softmax), last chunk shorter than the others."""
    h, w, labels = _inputs(n=3000, d=256, vocab=49152, dtype=torch.float32)
    h, w = (t.detach().cuda().bfloat16().requires_grad_() for t in (h, w))
    labels = labels.cuda()
    ref = plain_linear_cross_entropy(h, w, labels)
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = chunked_linear_cross_entropy(h, w, labels, 1024)
    grads = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2


@pytest.mark.parametrize("preset,extra", [("tiny-vanilla", []), ("tiny-vanilla", ["model.tie_embeddings=false"]),
                                          ("tiny-mor", []), ("tiny-mor-tc", [])])
def test_model_loss_chunked_equals_plain(preset, extra):
    """The whole model in fp64: same loss and the same gradient on every parameter (the tied embedding gets
    its head gradient through the chunked path)."""
    results = []
    for mode in ("plain", "chunked"):
        cfg = load_config(preset, TINY + extra + [f"model.fused_loss={mode}", "model.loss_chunk_size=7",
                                                  "model.attention_backend=reference"])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.router).double().train()
        ids = torch.randint(0, cfg.model.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
        labels = ids[:, 1:].clone()
        labels[0, :5] = -100
        out = model(ids[:, :-1], labels=labels)
        out.total_loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert (model.lm_head.weight is model.embed.weight) == cfg.model.tie_embeddings
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-12, msg=name)


def test_logits_without_labels_unchanged():
    cfg = load_config("tiny-vanilla", TINY + ["model.fused_loss=chunked"])
    model = build_model(cfg.model, cfg.router).eval()
    ids = torch.randint(0, 96, (2, 9))
    out = model(ids)
    assert out.loss is None and out.logits.shape == (2, 9, 96)


def test_resolve_and_config_errors():
    assert resolve_fused_loss("auto", torch.device("cpu")) == "plain"
    assert resolve_fused_loss("auto", torch.device("cuda")) == "chunked"
    with pytest.raises(RuntimeError, match="CUDA only"):
        resolve_fused_loss("liger", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"model.fused_loss: 'fused' is not one of auto, plain, chunked, liger"):
        load_config("tiny-vanilla", ["model.fused_loss=fused"])
    with pytest.raises(ConfigError, match=r"model.loss_chunk_size=0: must be >= 1"):
        load_config("tiny-vanilla", ["model.loss_chunk_size=0"])
