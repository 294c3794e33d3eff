"""Model behaviour: causality, family equivalences, routing mechanics, gradients to routers."""

from __future__ import annotations

import pytest
import torch

from mor_ds.config import load_config
from mor_ds.models import build_model
from mor_ds.models.sharing import layer_plan, paper_num_layers

VOCAB = 256
SEQ = 24


def tiny(name: str, *overrides: str):
    cfg = load_config(name, ["model.vocab_size=256", "model.hidden_size=64", "model.num_heads=4",
                             "model.num_kv_heads=2", "model.intermediate_size=96", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.router).double(), cfg


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def sharpen_routers(model) -> None:
    """Random routers with real spread, so top-k / thresholds pick genuinely different tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 1.0)


FAMILIES = {
    "vanilla": ("tiny-vanilla", ()),
    "recursive": ("tiny-recursive", ()),
    "recursive-kvshare": ("tiny-recursive", ("model.kv_mode=share",)),
    "recursive-sequence": ("tiny-recursive", ("model.sharing=sequence", "model.num_layers=6")),
    "recursive-cycle": ("tiny-recursive", ("model.sharing=cycle", "model.num_layers=6")),
    "recursive-middle-sequence": ("tiny-recursive", ("model.sharing=middle_sequence",)),
    "mor": ("tiny-mor", ()),
    "mor-kvshare": ("tiny-mor-kvshare", ()),
    "mor-aux-router": ("tiny-mor", ("router.causal_mode=aux_router",)),
    "mor-nr3": ("tiny-mor", ("model.num_recursions=3", "model.num_layers=8")),
    "mor-tc": ("tiny-mor-tc", ()),
    "mor-tc-kvshare": ("tiny-mor-tc", ("model.kv_mode=share",)),
    "mor-tc-loss-free": ("tiny-mor-tc", ("router.balancing=loss_free",)),
}


def families(*names: str) -> list:
    """(preset, overrides) of the named FAMILIES (all of them by default), each with its name as the test id."""
    return [pytest.param(*FAMILIES[n], id=n) for n in names or FAMILIES]


@pytest.mark.parametrize("name,overrides", families())
def test_future_tokens_never_change_earlier_logits(name, overrides):
    model, _ = tiny(name, *overrides)
    sharpen_routers(model)
    model.eval()  # expert-choice routes causally at inference (thresholded scores / aux router)
    x = tokens()
    cut = SEQ // 2
    y = x.clone()
    y[:, cut:] = torch.randint(0, VOCAB, (2, SEQ - cut), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-10)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("name,overrides", families(*(n for n in FAMILIES if n.startswith("mor"))))
def test_batched_equals_each_sequence_alone(name, overrides):
    """Padding of uneven active counts (token-choice, causal expert-choice) never leaks across rows."""
    model, _ = tiny(name, *overrides)
    sharpen_routers(model)
    model.eval()
    x = tokens(batch=3, seed=3)
    with torch.no_grad():
        batched = model(x).logits
        alone = torch.cat([model(x[i:i + 1]).logits for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)


def test_document_mask_isolates_documents():
    model, _ = tiny("tiny-mor-tc", "model.document_mask=true")
    model.eval()
    x = tokens(batch=1)
    docs = torch.tensor([[0] * 10 + [1] * (SEQ - 10)])
    y = x.clone()
    y[:, :10] = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(x, doc_ids=docs).logits
        b = model(y, doc_ids=docs).logits
        # the second document alone, at positions 0.., gives the same logits as inside the pack
        alone = model(x[:, 10:]).logits
    torch.testing.assert_close(a[:, 10:], b[:, 10:], rtol=0, atol=1e-10)
    torch.testing.assert_close(a[:, 10:], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle", "sequence", "middle_sequence"])
def test_recursive_with_one_recursion_equals_vanilla(sharing):
    vanilla, _ = tiny("tiny-vanilla")
    recursive, _ = tiny("tiny-recursive", "model.num_recursions=1", f"model.sharing={sharing}")
    recursive.load_state_dict(vanilla.state_dict())
    x = tokens()
    torch.testing.assert_close(recursive(x).logits, vanilla(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kv_mode", ["cache", "share"])
@pytest.mark.parametrize("nr,layers", [(2, 6), (3, 8)])
def test_mor_at_full_capacity_without_scaling_equals_recursive(kv_mode, nr, layers):
    common = (f"model.num_recursions={nr}", f"model.num_layers={layers}", f"model.kv_mode={kv_mode}")
    recursive, _ = tiny("tiny-recursive", *common)
    mor, _ = tiny("tiny-mor", *common, f"router.capacity=[{', '.join(['1.0'] * nr)}]", "router.scale_output=false")
    missing, unexpected = mor.load_state_dict(recursive.state_dict(), strict=False)
    assert not unexpected and all("router" in k for k in missing)
    mor.train()
    recursive.train()
    x = tokens()
    torch.testing.assert_close(mor(x).logits, recursive(x).logits, rtol=0, atol=1e-12)


def test_expert_choice_selection_is_hierarchical_top_k():
    model, cfg = tiny("tiny-mor", "model.num_recursions=3", "model.num_layers=8")
    sharpen_routers(model)
    model.train()
    picked = []
    router = model.recursion.router
    original = router.select

    def record(step, x, prev, length, causal):
        sel = original(step, x, prev, length, causal)
        picked.append(sel.active.idx.clone())
        return sel

    router.select = record
    out = model(tokens(), labels=tokens())
    # capacity schedule (Nr−r)/Nr with S=24: k = 24, 16, 8 per sequence
    assert [p.shape[1] for p in picked] == [24, 16, 8]
    for prev, cur in zip(picked, picked[1:]):
        assert torch.all(cur[:, 1:] > cur[:, :-1])  # causal order kept
        for b in range(cur.shape[0]):
            assert set(cur[b].tolist()) <= set(prev[b].tolist())
    assert [round(float(out.stats[f"depth_frac/{r}"]), 4) for r in range(3)] == [1.0, 0.6667, 0.3333]
    assert set(out.aux_losses) == {"router_bce"}


def test_unselected_tokens_pass_through_unchanged():
    """Nr=2, capacity (1, 1/2): tokens dropped at step 1 leave the recursion with their step-0 state."""
    model, _ = tiny("tiny-mor")
    sharpen_routers(model)
    model.train()
    outputs = []
    model.recursion.register_forward_hook(lambda mod, args, out: outputs.append(out[0]))
    picked = []
    select = model.recursion.router.select
    model.recursion.router.select = lambda *a, **k: picked.append(select(*a, **k)) or picked[-1]
    x = tokens()
    with torch.no_grad():
        model(x, labels=x)
        model.recursion.num_recursions = 1  # the same model stopped after step 0
        model(x, labels=x)
    both_steps, step0_only = outputs
    kept = torch.zeros(2, SEQ, dtype=torch.bool).scatter_(1, picked[1].active.idx, True)
    assert kept.sum() == SEQ  # half of each sequence
    torch.testing.assert_close(both_steps[~kept], step0_only[~kept], rtol=0, atol=0)
    assert (both_steps[kept] - step0_only[kept]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("name,overrides", [("tiny-mor", ()), ("tiny-mor", ("router.causal_mode=aux_router",)),
                                            ("tiny-mor", ("router.arch=mlp",)), ("tiny-mor-tc", ())],
                         ids=["mor", "mor-aux-router", "mor-mlp-router", "mor-tc"])
def test_gradients_reach_router_parameters(name, overrides):
    model, _ = tiny(name, *overrides)
    model.train()
    out = model(tokens(), labels=tokens())
    out.total_loss.backward()
    router_grads = {n: p.grad for n, p in model.named_parameters() if "router" in n}
    assert router_grads
    for n, g in router_grads.items():
        assert g is not None and g.abs().sum() > 0, n


def test_router_lm_gradient_flows_through_block_scaling():
    """Not only the aux loss: the LM loss itself trains the router, through g scaling the block output."""
    model, _ = tiny("tiny-mor", "router.aux_loss_coef=0")
    model.train()
    out = model(tokens(), labels=tokens())
    out.loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "router" in n)


def test_loss_free_balancing_moves_bias_toward_underloaded_depths():
    model, _ = tiny("tiny-mor-tc", "router.balancing=loss_free", "router.bias_update_rate=0.5")
    model.train()
    model(tokens(), labels=tokens())
    load = model.recursion.router.load.clone()
    assert load.sum() == 2 * SEQ
    summed = []
    model.update_router_state(all_reduce=lambda t: summed.append(t) or t * 2)  # as if two ranks saw the same
    bias = model.recursion.router.balance_bias
    assert summed and torch.equal(bias, 0.5 * torch.sign(load.mean() - load))
    assert model.recursion.router.load.sum() == 0


def test_num_params_counts_unique_and_unrolled():
    model, cfg = tiny("tiny-mor", "model.num_recursions=2", "model.num_layers=6")
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(unique=False) - model.num_params() == 2 * per_layer  # 6 unrolled vs 4 unique
    assert model.num_params(embedding=False) == model.num_params() - VOCAB * 64


def test_layer_plans_follow_the_paper():
    assert layer_plan(6, 2, "cycle").recursive_part == ((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1))
    assert layer_plan(6, 2, "sequence").recursive_part == ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))
    mc = layer_plan(8, 3, "middle_cycle")
    assert mc.prelude == (0,) and mc.coda == (3,) and mc.num_unique_layers == 4
    assert [mc.block(r) for r in range(3)] == [(1, 2)] * 3
    ms = layer_plan(8, 3, "middle_sequence")
    assert [i for i, _ in ms.unrolled] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert paper_num_layers(32, 4) == 34 and paper_num_layers(30, 3) == 32 and paper_num_layers(32, 3) == 32


def test_autocast_keeps_q_k_v_in_one_dtype():
    """Under autocast the projections give bf16 while RoPE tables follow fp32 params: attention still gets one dtype."""
    cfg = load_config("tiny-mor", ["model.attention_backend=sdpa"])
    model = build_model(cfg.model, cfg.router)
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    assert torch.isfinite(out.loss)


def test_expert_choice_softmax_refuses_causal_routing():
    """Softmax weights over the sequence would leak the future: causal routing says so instead of leaking."""
    model, _ = tiny("tiny-mor", "router.activation=softmax")
    model.eval()
    with pytest.raises(ValueError, match="router.activation=softmax: expert-choice weights normalise over the whole"):
        model(tokens())
    assert model(tokens(), routing="topk").logits.shape == (2, SEQ, VOCAB)


@pytest.mark.parametrize("name,overrides", families("mor", "mor-nr3", "mor-kvshare"))
def test_compact_causal_shortcut_equals_attention_by_original_positions(name, overrides, monkeypatch):
    """Top-k rows are ascending and unpadded, so plain causal attention on the compact tensors (what FlashAttention
    runs) must equal attention masked by original positions."""
    from mor_ds.models import recursion

    model, _ = tiny(name, *overrides)
    sharpen_routers(model)
    model.train()
    x = tokens()
    original = recursion.SequenceContext.view
    seen = []

    def view(self, active, keep_shortcut):
        v = original(self, active)
        seen.append(v.ascending)
        v.ascending = v.ascending and keep_shortcut
        return v

    monkeypatch.setattr(recursion.SequenceContext, "view", lambda self, active: view(self, active, True))
    shortcut = model(x).logits
    assert any(seen)  # the shortcut really ran
    monkeypatch.setattr(recursion.SequenceContext, "view", lambda self, active: view(self, active, False))
    torch.testing.assert_close(model(x).logits, shortcut, rtol=0, atol=1e-12)


def test_compact_pads_uneven_counts_to_a_multiple_of_64():
    """Uneven counts pad to the longest rounded up to PAD_WIDTH_MULTIPLE (few distinct widths, never 1: no
    torch.compile recompiles as token-choice counts drift); the kept tokens stay in causal order, the rest is dummy."""
    from mor_ds.models.routers import PAD_WIDTH_MULTIPLE, ActiveSet, compact

    assert PAD_WIDTH_MULTIPLE == 64
    everything = ActiveSet.everything(2, 200, torch.device("cpu"))
    keep = torch.zeros(2, 200, dtype=torch.bool)
    keep[0, torch.arange(0, 140, 2)] = True  # 70 tokens
    keep[1, [5, 17, 199]] = True
    active, pick = compact(everything, keep, 200)
    assert active.idx.shape == (2, 128) and active.valid.sum(1).tolist() == [70, 3]
    assert active.idx[0, :70].tolist() == list(range(0, 140, 2)) and active.idx[1, :3].tolist() == [5, 17, 199]
    assert (active.idx[~active.valid] == 200).all()
    assert torch.equal(pick[active.valid], active.idx[active.valid])  # slots of `everything` are the indices
    same = compact(everything, keep[:1].expand(2, -1), 200)[0]  # equal counts: exact width, no padding
    assert same.idx.shape == (2, 70) and same.valid is None


def test_no_token_continuing_still_runs_the_step_on_a_dummy_slot():
    """When no token of the batch continues, compact keeps padded dummy slots (index S, invalid), so every
    data-parallel rank runs every recursion step's block: ZeRO-3 gathers a block's weights collectively and a
    rank that skipped the block hung or aborted the others (2-rank ZeRO-3 eval, tests/integration)."""
    from mor_ds.models.routers import ActiveSet, compact

    everything = ActiveSet.everything(2, 5, torch.device("cpu"))
    active, pick = compact(everything, torch.zeros(2, 5, dtype=torch.bool), 5)
    assert (active.idx == 5).all() and not active.valid.any()  # padded up to K_prev = 5 (< PAD_WIDTH_MULTIPLE)
    assert active.count().item() == 0 and pick.shape == (2, 5)
    cfg = load_config("tiny-mor", ["router.type=token_choice"])
    model = build_model(cfg.model, cfg.router).eval()
    with torch.no_grad():
        model.recursion.router.router.net.weight.zero_()  # equal logits: every token picks depth 0 (argmax)
        out = model(torch.randint(0, cfg.model.vocab_size, (2, 16)))
    assert torch.isfinite(out.logits).all() and out.stats["depth_frac/1"].item() == 0.0
