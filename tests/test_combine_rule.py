"""The router weight g's combine rule, pinned by values computed from the paper's formulas written out here.

The model is one shared block applied Nr = 2 times (cycle sharing, no prelude or coda) whose weights make its output
a closed form: q_proj = 0 (uniform attention over the visible keys), v_proj = o_proj = I, down_proj = 0 (no MLP), so
for token i with the set V_i of keys it may see

    B(h)_i = h_i + mean_{j ∈ V_i} n(h_j),   n(v) = v / sqrt(mean(v²) + eps)   (RMSNorm with unit weight).

Recursion-wise caching: V_i = the tokens active at the step at positions ≤ i; KV sharing at step 1: every token at
a position ≤ i, with the values n(·) of step 0's inputs. Every path is checked against the same hand values:
training's forward (top-k and causal routing), the inference runner (prefill) and the Hugging Face export.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mor_ds.config import load_config
from mor_ds.inference import InferenceModel
from mor_ds.interop.hf_export import _hf_model
from mor_ds.models import build_model

D, S, EPS = 4, 5, 1e-5
ALPHA = {"expert_choice": 0.5, "token_choice": 0.7}


def one_block_model(router: str, kv_mode: str, combine: str):
    cfg = load_config("tiny-mor", [
        "model.hidden_size=4", "model.num_heads=1", "model.num_kv_heads=1", "model.intermediate_size=4",
        "model.vocab_size=8", "model.num_layers=2", "model.num_recursions=2", "model.sharing=cycle",
        f"model.kv_mode={kv_mode}", "model.attention_backend=reference", f"model.rms_norm_eps={EPS}",
        f"router.type={router}", f"router.combine={combine}", f"router.alpha={ALPHA[router]}",
        "router.capacity=[1.0, 0.6]", "router.activation=" + ("sigmoid" if router == "expert_choice" else "softmax")])
    model = build_model(cfg.model, cfg.router).double().eval()
    gen = torch.Generator().manual_seed({"expert_choice": 3, "token_choice": 12}[router])
    with torch.no_grad():
        block = model.layers[0]
        model.embed.weight.copy_(torch.randn(8, D, generator=gen, dtype=torch.float64))
        block.attn.q_proj.weight.zero_()
        block.attn.v_proj.weight.copy_(torch.eye(D))
        block.attn.o_proj.weight.copy_(torch.eye(D))
        block.mlp.down_proj.weight.zero_()
        for p in model.recursion.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model, cfg


def n(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(v.pow(2).mean() + EPS)


def block(h: list[torch.Tensor], active: list[int], values: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """B on the active tokens: each sees the `values` of the keys at positions ≤ its own."""
    return {i: h[i] + torch.stack([values[j] for j in values if j <= i]).mean(0) for i in active}


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def expected_expert_choice(model, x: list[torch.Tensor], kv_mode: str, combine: str, routing: str):
    """h ← h + g·B_r(h) (paper) or h + g·(B_r(h) − h) (delta) for the tokens picked at step r; k_r = ⌊c_r·S⌋ (top-k)
    or router logit > 0 at a step of capacity < 1 (causal, τ_r = 0 before calibration)."""
    w = [r.net.weight[0] for r in model.recursion.router.routers]
    h, active, first_values = list(x), list(range(S)), None
    for step, capacity in enumerate((1.0, 0.6)):
        logit = {i: float(w[step] @ h[i]) for i in active}
        if capacity < 1.0:
            k = max(1, math.floor(capacity * S))
            active = (sorted(sorted(active, key=lambda i: -logit[i])[:k]) if routing == "topk"
                      else [i for i in active if logit[i] > 0])
            assert 0 < len(active) < S, "the fixture should drop some tokens at step 1 and keep some"
        values = first_values if kv_mode == "share" and step > 0 else {j: n(h[j]) for j in active}
        first_values = first_values or values
        out = block(h, active, values)
        for i in active:
            g = ALPHA["expert_choice"] * sigmoid(logit[i])
            h[i] = h[i] + g * out[i] if combine == "paper" else h[i] + g * (out[i] - h[i])
    return torch.stack(h)


def expected_token_choice(model, x: list[torch.Tensor], kv_mode: str, combine: str):
    """Depth d = argmax softmax(W·x), g = α·p_d; steps 0…d ungated; exit y = x + g·B_d(h^d) (paper) or
    h^d + g·(B_d(h^d) − h^d) (delta)."""
    W = model.recursion.router.router.net.weight
    probs = [torch.softmax(W @ xi, -1) for xi in x]
    depth = [int(p.argmax()) for p in probs]
    y, h, first_values = list(x), list(x), None
    for step in range(2):
        active = [i for i in range(S) if depth[i] >= step]
        values = first_values if kv_mode == "share" and step > 0 else {j: n(h[j]) for j in active}
        first_values = first_values or values
        out = block(h, active, values)
        for i in active:
            if depth[i] == step:
                g = ALPHA["token_choice"] * float(probs[i][step])
                y[i] = x[i] + g * out[i] if combine == "paper" else h[i] + g * (out[i] - h[i])
            h[i] = out[i]
    assert len(set(depth)) == 2, "the fixture should send tokens to both depths"
    return torch.stack(y)


@torch.no_grad()
def expected(model, ids, router, kv_mode, combine, routing):
    x = list(model.embed.weight[ids])
    if router == "expert_choice":
        return expected_expert_choice(model, x, kv_mode, combine, routing)
    return expected_token_choice(model, x, kv_mode, combine)


def hidden_before_norm(model, run) -> torch.Tensor:
    seen = []
    handle = model.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0].reshape(-1, D)


IDS = torch.tensor([3, 0, 6, 1, 5])
CASES = [(router, kv, combine) for router in ALPHA for kv in ("cache", "share") for combine in ("paper", "delta")]
ROUTED = [(*case, routing) for case in CASES for routing in ("topk", "causal")
          if case[0] == "expert_choice" or routing == "causal"]  # token choice has one routing
each_case = pytest.mark.parametrize("router,kv_mode,combine", CASES, ids=["-".join(c) for c in CASES])
each_routed_case = pytest.mark.parametrize("router,kv_mode,combine,routing", ROUTED, ids=["-".join(c) for c in ROUTED])


@each_routed_case
def test_training_forward_follows_the_combine_rule(router, kv_mode, combine, routing):
    model, _ = one_block_model(router, kv_mode, combine)
    got = hidden_before_norm(model, lambda: model(IDS[None], routing=routing))
    torch.testing.assert_close(got, expected(model, IDS, router, kv_mode, combine, routing), rtol=1e-12, atol=1e-12)


@each_case
def test_inference_prefill_follows_the_combine_rule(router, kv_mode, combine):
    model, _ = one_block_model(router, kv_mode, combine)
    im = InferenceModel(model, fuse_weights=False)
    cache = im.new_cache(max_slots=1, max_len=16, num_pages=32, page_size=4)
    with torch.no_grad():
        got = im.forward(cache, IDS, np.zeros(S, dtype=np.int64), torch.arange(S))
    want = model.norm(expected(model, IDS, router, kv_mode, combine, "causal"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@each_routed_case
def test_hugging_face_export_follows_the_combine_rule(router, kv_mode, combine, routing):
    model, cfg = one_block_model(router, kv_mode, combine)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # built in fp64, so loading the weights rounds nothing
    try:
        hf = _hf_model(model, cfg, None).eval()
    finally:
        torch.set_default_dtype(default)
    got = hidden_before_norm(hf, lambda: hf(IDS[None], routing=routing))
    torch.testing.assert_close(got, expected(model, IDS, router, kv_mode, combine, routing), rtol=1e-12, atol=1e-12)


def test_the_rules_differ_on_this_model():
    """The fixture is not degenerate: the two rules give different hidden states for both routers."""
    for router in ALPHA:
        paper, delta = (expected(one_block_model(router, "cache", c)[0], IDS, router, "cache", c, "causal")
                        for c in ("paper", "delta"))
        assert (paper - delta).abs().max() > 0.05


def test_the_export_ships_the_math_training_uses(tmp_path):
    """One source: the exported model's mor_math.py is mor_ds/models/mor_math.py byte for byte."""
    from mor_ds.interop.hf_export import copy_modeling_files
    from mor_ds.models import mor_math

    copy_modeling_files(tmp_path)
    assert (tmp_path / "mor_math.py").read_bytes() == open(mor_math.__file__, "rb").read()


def test_saves_from_before_the_combine_choice_keep_the_delta_rule():
    """A checkpoint's config without router.combine trained with the delta rule (and an MLP router of width d)."""
    from dataclasses import asdict

    from mor_ds.config import from_saved

    saved = asdict(load_config("tiny-mor-tc", ["router.arch=mlp"]))
    del saved["router"]["combine"]
    saved["router"]["mlp_hidden_size"] = 0
    old = from_saved(saved)
    assert (old.router.combine, old.router.mlp_hidden_size) == ("delta", old.model.hidden_size)
    assert from_saved(asdict(load_config("tiny-mor"))).router.combine == "paper"
