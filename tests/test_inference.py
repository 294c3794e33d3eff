"""Cached generation and the depth-wise batching engine against full recomputation with the model."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mor_ds.config import load_config
from mor_ds.inference import Engine, InferenceModel, Request, SamplingParams, generate, sample
from mor_ds.inference.kv_cache import CacheLayout, KVCacheFull, PagedKVCache
from mor_ds.inference.paged_attention import decode_attention_torch, triton
from mor_ds.inference.tick_glue import TickGlue
from mor_ds.models import build_model
from mor_ds.models.sharing import layer_plan

VOCAB = 256


def tiny(name: str, *overrides: str):
    cfg = load_config(name, ["model.vocab_size=256", "model.hidden_size=64", "model.num_heads=4",
                             "model.num_kv_heads=2", "model.intermediate_size=96", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router).double()
    with torch.no_grad():  # random routers with real spread, so routing decisions differ from token to token
        for param_name, p in model.named_parameters():
            if "router" in param_name:
                p.normal_(0, 1.0)
        if hasattr(model.recursion, "router") and hasattr(model.recursion.router, "causal_threshold"):
            model.recursion.router.causal_threshold.normal_(0, 0.2)  # calibrated thresholds τ_r ≠ 0
    return model.eval()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def recompute(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation by running the whole sequence through the model at every step."""
    ids, tokens, logits = list(ids), [], []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([ids]), routing="causal").logits[0, -1]
            tokens.append(int(last.argmax()))
            logits.append(last)
            ids.append(tokens[-1])
    return tokens, logits


FAMILIES = {
    "vanilla": ("tiny-vanilla", ()),
    "recursive-cycle": ("tiny-recursive", ("model.sharing=cycle", "model.num_layers=6")),
    "recursive": ("tiny-recursive", ()),  # middle_cycle
    "recursive-kvshare": ("tiny-recursive", ("model.kv_mode=share",)),
    "recursive-cycle-kvshare": ("tiny-recursive", ("model.sharing=cycle", "model.num_layers=6", "model.kv_mode=share")),
    "mor": ("tiny-mor", ()),  # expert-choice, aux_loss (thresholded router), recursion-wise caching
    "mor-kvshare": ("tiny-mor-kvshare", ()),
    "mor-nr3-aux-router": ("tiny-mor", ("router.causal_mode=aux_router", "model.num_recursions=3",
                                        "model.num_layers=8")),
    "mor-aux-router-kvshare": ("tiny-mor", ("router.causal_mode=aux_router", "model.kv_mode=share")),
    "mor-tc": ("tiny-mor-tc", ()),
    "mor-tc-kvshare-loss-free": ("tiny-mor-tc", ("model.kv_mode=share", "router.balancing=loss_free")),
    "mor-delta": ("tiny-mor", ("router.combine=delta",)),  # the ablation's rule, expert and token choice
    "mor-tc-delta-kvshare": ("tiny-mor-tc", ("router.combine=delta", "model.kv_mode=share")),
}


def families(*names: str) -> list:
    """(preset, overrides) of the named FAMILIES (all of them by default), each with its name as the test id."""
    return [pytest.param(*FAMILIES[n], id=n) for n in names or FAMILIES]


@pytest.mark.parametrize("name,overrides", families())
def test_cached_generation_equals_full_recomputation(name, overrides):
    model = tiny(name, *overrides)
    prompts = [prompt(7, 1), prompt(12, 2)]
    steps = 9
    out = generate(model, prompts, steps, return_logits=True)
    for i, p in enumerate(prompts):
        tokens, logits = recompute(model, p, steps)
        assert out.tokens[i] == tokens
        torch.testing.assert_close(torch.stack(out.logits[i]), torch.stack(logits), rtol=0, atol=1e-10)
    if "mor" in name:  # routing really varies: tokens stop at several depths
        assert sum(c > 0 for c in out.depth_counts) >= 2, out.depth_counts


REQUESTS = [(5, 9), (11, 4), (3, 12), (8, 1), (14, 7), (6, 10)]  # (prompt length, new tokens)


@pytest.mark.parametrize("name,overrides", families("vanilla", "mor-nr3-aux-router", "mor-aux-router-kvshare",
                                                    "mor-tc-kvshare-loss-free"))
def test_engine_moves_live_slots_into_the_smallest_bucket_without_changing_output(name, overrides):
    """Eight slots, sixteen requests of mixed lengths, 2-row prelude/coda widths: as the queue drains,
    live slots (tokens mid-recursion, waiting to enter or to leave) move down so the tick runs 1…8 slots;
    the output equals each request alone and equals the engine without buckets."""
    model = tiny(name, *overrides)
    shapes = [(3 + i % 5, 2 + (7 * i) % 13) for i in range(16)]
    alone = [generate(model, [prompt(n, 40 + i)], m).tokens[0] for i, (n, m) in enumerate(shapes)]
    stats = {}
    for buckets in (8, 1):
        engine = Engine(model, max_slots=8, max_len=32, page_size=4, slot_buckets=buckets, prelude_width=2,
                        coda_width=2, ticks_per_replay=1)  # a pack before every tick
        served = engine.run([Request(prompt(n, 40 + i), m) for i, (n, m) in enumerate(shapes)])
        assert [r.output for r in served] == alone
        assert engine.cache.free_pages == engine.cache.num_pages - 1
        stats[buckets] = engine.stats
    assert engine.buckets == [8] and stats[1].slot_moves == 0 and stats[1].slot_rows == 8 * stats[1].ticks
    assert stats[8].slot_moves > 0
    assert stats[8].slot_rows < 0.9 * stats[1].slot_rows  # the drain runs smaller ticks


@pytest.mark.parametrize("name,overrides", families("vanilla", "mor-nr3-aux-router", "mor-tc-kvshare-loss-free"))
def test_compiled_tick_glue_traces_whole_and_changes_no_output(name, overrides):
    """The tick's bookkeeping through torch.compile (fullgraph, dynamic shapes; the aot_eager backend traces
    it as Inductor would, without a compiler): slot buckets and narrow widths vary the shapes, and the output
    equals each request alone, with the same statistics as the eager glue."""
    model = tiny(name, *overrides)
    shapes = [(3 + i % 5, 2 + (7 * i) % 13) for i in range(10)]
    alone = [generate(model, [prompt(n, 40 + i)], m).tokens[0] for i, (n, m) in enumerate(shapes)]
    stats = []
    for glue in (TickGlue(), TickGlue(compiled=True, backend="aot_eager")):
        engine = Engine(model, max_slots=6, max_len=32, page_size=4, prelude_width=2, coda_width=2, slot_buckets=2)
        engine.glue = glue
        served = engine.run([Request(prompt(n, 40 + i), m) for i, (n, m) in enumerate(shapes)])
        assert [r.output for r in served] == alone
        if engine.im.mor:
            assert_phase_layers_agree(engine)
        st = engine.stats
        stats.append((st.ticks, st.tokens, st.live_slot_ticks, st.prelude_waits, st.coda_waits, st.slot_rows,
                      st.slot_moves, st.depth_fractions()))
    assert stats[0] == stats[1] and stats[1][5] < 6 * stats[1][0]  # ticks ran at both bucket sizes


@pytest.mark.parametrize("name,overrides", families("vanilla", "recursive-kvshare", "mor", "mor-kvshare",
                                                    "mor-nr3-aux-router", "mor-tc", "mor-tc-kvshare-loss-free"))
def test_engine_equals_each_request_alone(name, overrides):
    """Three slots for six requests: requests join and leave while others are mid-recursion."""
    model = tiny(name, *overrides)
    requests = [Request(prompt(n, 10 + i), m) for i, (n, m) in enumerate(REQUESTS)]
    alone = [generate(model, [r.prompt], r.max_new_tokens).tokens[0] for r in requests]
    engine = Engine(model, max_slots=3, max_len=32, page_size=4)
    served = engine.run(requests)
    assert [r.output for r in served] == alone
    assert all(r.finish_reason == "length" for r in served)
    assert engine.stats.tokens == sum(m for _, m in REQUESTS)
    assert engine.cache.free_pages == engine.cache.num_pages - 1  # every page came back
    if "mor" in name:
        assert sum(f > 0 for f in engine.stats.depth_fractions()) >= 2


def assert_phase_layers_agree(engine: Engine) -> None:
    """The layers of one phase (prelude, coda, the block at one depth) hold the same tokens of every slot
    in as many pages (the engine reserves pages per phase on that), and the host mirrors the lengths."""
    im, cache, S = engine.im, engine.cache, engine.max_slots
    assert np.array_equal(cache.host_lengths, cache.lengths.numpy())
    phases = [[(layer, 0) for layer in im.plan.prelude], [(layer, 0) for layer in im.plan.coda]]
    phases += [[(layer, r) for layer in im.block] for r in ([0] if im.kv_share else range(im.num_recursions))]
    for keys in filter(None, phases):
        rows = np.array([im.layout.read_group(layer, r) for layer, r in keys])[:, None] * S + np.arange(S)
        for held in (cache.host_lengths[rows], cache.page_count(rows)):
            assert (held == held[0]).all(), keys


@pytest.mark.parametrize("name,overrides", families("mor-nr3-aux-router", "mor-tc-kvshare-loss-free"))
def test_narrow_prelude_and_coda_widths_make_tokens_wait_and_change_no_output(name, overrides):
    """W_in / W_out of 1–2 rows for 3 slots: tokens wait to enter and to leave, output is unchanged, and
    the wait counts close the books: slot-ticks of live slots = Σ over tokens of (ticks waiting to enter
    + max(d, 1) ticks in the recursion + ticks waiting for the coda)."""
    model = tiny(name, *overrides)
    requests = [(n, m) for n, m in REQUESTS]
    alone = [generate(model, [prompt(n, 10 + i)], m).tokens[0] for i, (n, m) in enumerate(requests)]
    for prelude_width, coda_width, ticks in ((1, 2, 1), (2, 1, 3), (3, 3, 4)):
        engine = Engine(model, max_slots=3, max_len=32, page_size=4, prelude_width=prelude_width,
                        coda_width=coda_width, ticks_per_replay=ticks)
        served = [engine.add(Request(prompt(n, 10 + i), m)) for i, (n, m) in enumerate(requests)]
        while engine.has_work():
            engine.step()
            assert_phase_layers_agree(engine)
            assert_device_state_agrees(engine)
        assert [r.output for r in served] == alone
        st = engine.stats
        holds = np.maximum(np.arange(len(st.depth)), 1)  # a token of d steps holds its slot max(d, 1) ticks
        assert st.live_slot_ticks == st.prelude_waits + st.coda_waits + int(st.depth @ holds)
        assert st.ticks >= (st.tokens - len(requests)) / coda_width  # at most W_out tokens leave per tick
        assert engine.cache.free_pages == engine.cache.num_pages - 1
        if coda_width == 1:
            assert st.coda_waits > 0 and st.wait_ticks > 0
        if prelude_width == 1:
            assert st.prelude_waits > 0  # three prompts admitted at once, one enters per tick
        if prelude_width == coda_width == 3:
            assert st.prelude_waits == st.coda_waits == st.wait_ticks == 0
    with pytest.raises(ValueError, match="coda_width=0"):
        Engine(model, max_slots=3, max_len=32, coda_width=0)


def test_engine_samples_outside_the_tick_reproducibly():
    """Sampled requests redo head + sampling on the tick's final hidden rows: a vanishing nucleus is
    greedy (equal to generate), a hot one is reproducible from the engine's seed and differs from it."""
    model = tiny("tiny-mor", "model.num_recursions=3", "model.num_layers=8")
    greedy = [generate(model, [prompt(n, 10 + i)], m).tokens[0] for i, (n, m) in enumerate(REQUESTS)]

    def serve(sampling: SamplingParams, seed: int) -> list[list[int]]:
        engine = Engine(model, max_slots=3, max_len=32, page_size=4, coda_width=1, seed=seed)
        requests = [Request(prompt(n, 10 + i), m, sampling) for i, (n, m) in enumerate(REQUESTS)]
        return [r.output for r in engine.run(requests)]

    assert serve(SamplingParams(temperature=1.0, top_p=1e-6), 0) == greedy
    hot = SamplingParams(temperature=2.0, top_p=0.95)
    assert serve(hot, 3) == serve(hot, 3) != greedy


def assert_device_state_agrees(engine: Engine) -> None:
    """Between replays the tick's device state (live slots, positions, tokens generated) is the host's."""
    st, live = engine.state, engine.host.live
    assert np.array_equal(st.live[:-1].bool().numpy(), live)
    assert np.array_equal(st.pos[:-1].numpy()[live], engine.host.pos[live])
    assert np.array_equal(st.out_len[:-1].numpy()[live], engine.host.out_len[live])


def test_engine_ends_sampled_requests_on_the_sampled_token():
    """The tick ends a request on its greedy token; a sampled request's token is drawn after the tick, so
    the host's decision goes back to the device (a slot the device kept live after its request stopped
    would write into freed pages; one it ended early would never get a token). Greedy requests and
    sampled ones with a stop token share the engine: the greedy ones equal generate, the sampled ones end
    at their first stop token, and the device agrees with the host after every step."""
    model = tiny("tiny-mor", "model.num_recursions=3", "model.num_layers=8")
    alone = [generate(model, [prompt(n, 10 + i)], m).tokens[0] for i, (n, m) in enumerate(REQUESTS)]
    stops = 0
    for seed, (temperature, top_p) in enumerate(((2.0, 0.9), (1.0, 0.5))):
        hot = SamplingParams(temperature=temperature, top_p=top_p)
        free = Engine(model, max_slots=4, max_len=40, page_size=4, seed=seed).run(
            [Request(prompt(n, 10 + i), 20, hot) for i, (n, _) in enumerate(REQUESTS)])
        stop = int(np.bincount(sum((r.output for r in free), [])).argmax())  # a token hot sampling draws
        engine = Engine(model, max_slots=4, max_len=40, page_size=4, seed=seed)
        greedy = [engine.add(Request(prompt(n, 10 + i), m)) for i, (n, m) in enumerate(REQUESTS)]
        sampled = [engine.add(Request(prompt(n, 10 + i), 20, hot, stop_token=stop))
                   for i, (n, _) in enumerate(REQUESTS)]
        while engine.has_work():
            engine.step()
            assert_device_state_agrees(engine)
        assert [r.output for r in greedy] == alone
        for r in sampled:
            assert stop not in r.output[:-1]
            assert r.finish_reason == ("stop" if r.output[-1] == stop else "length")
            stops += r.finish_reason == "stop"
        assert engine.cache.free_pages == engine.cache.num_pages - 1
    assert stops > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton (CUDA graph of the tick)")
@pytest.mark.parametrize("name,overrides", families("vanilla", "mor-nr3-aux-router", "mor-tc-kvshare-loss-free"))
def test_cuda_graph_engine_equals_each_request_alone(name, overrides):
    """The captured tick (compacted prelude / coda, head and greedy choice inside the graph), default and
    1-row widths, against generate of each request alone on the same device."""
    model = tiny(name, *overrides).float().cuda()
    alone = [generate(model, [prompt(n, 10 + i)], m).tokens[0] for i, (n, m) in enumerate(REQUESTS)]
    for width in (None, 1):
        engine = Engine(model, max_slots=3, max_len=32, page_size=4, cuda_graph=True, prelude_width=width,
                        coda_width=width)
        served = engine.run([Request(prompt(n, 10 + i), m) for i, (n, m) in enumerate(REQUESTS)])
        assert [r.output for r in served] == alone
        assert engine.cache.free_pages == engine.cache.num_pages - 1


def test_default_widths_follow_the_expected_flow():
    """W = 1.25 · S / E[ticks per token], E = the capacity schedule's mean depth (Nr+1)/2."""
    assert Engine(tiny("tiny-mor", "model.num_recursions=3", "model.num_layers=8"), max_slots=32,
                  max_len=16).coda_width == 20  # 1.25 · 32 / 2
    engine = Engine(tiny("tiny-mor"), max_slots=64, max_len=16)
    assert engine.prelude_width == engine.coda_width == 54  # ⌈1.25 · 64 / 1.5⌉
    assert Engine(tiny("tiny-vanilla"), max_slots=8, max_len=16, coda_width=2).coda_width == 8  # every slot


def test_engine_admission_batches_wait_for_free_slots_and_change_no_output():
    model = tiny("tiny-mor")
    requests = [(n, m) for n, m in REQUESTS * 2]
    alone = [generate(model, [prompt(n, 10 + i)], m).tokens[0] for i, (n, m) in enumerate(requests)]
    prefills = {}
    for admit_batch in (1, 3):
        engine = Engine(model, max_slots=4, max_len=32, page_size=4, admit_batch=admit_batch)
        served = engine.run([Request(prompt(n, 10 + i), m) for i, (n, m) in enumerate(requests)])
        assert [r.output for r in served] == alone
        prefills[admit_batch] = engine.stats.prefills
    assert prefills[3] < prefills[1]
    # one admission fills every free slot, in as many prefill calls of prefill_rows rows as it takes
    engine = Engine(model, max_slots=4, max_len=32, page_size=4, prefill_rows=12)
    for i, (n, m) in enumerate(requests):
        engine.add(Request(prompt(n, 10 + i), m))
    engine._admit()
    assert len(engine.queue) == len(requests) - 4 and engine.stats.prefills == 3  # prompts of 5, 11, 3 + 8 rows
    with pytest.raises(ValueError, match="admit_batch=0"):
        Engine(model, max_slots=4, max_len=32, admit_batch=0)


def test_engine_preempts_when_the_pool_runs_out_and_output_is_unchanged():
    model = tiny("tiny-mor")
    requests = [Request(prompt(n, 10 + i), m) for i, (n, m) in enumerate(REQUESTS)]
    alone = [generate(model, [r.prompt], r.max_new_tokens).tokens[0] for r in requests]
    engine = Engine(model, max_slots=3, max_len=32, num_pages=40, page_size=4)
    assert [r.output for r in engine.run(requests)] == alone
    assert engine.stats.preemptions > 0


def test_engine_stop_token_and_max_len():
    model = tiny("tiny-mor-tc")
    p = prompt(6, 3)
    free_run = generate(model, [p], 8).tokens[0]
    stop = free_run[3]
    engine = Engine(model, max_slots=2, max_len=10, page_size=4)
    stopped, capped = engine.run([Request(p, 8, stop_token=stop), Request(p, 8)])
    assert stopped.output == free_run[:free_run.index(stop) + 1] and stopped.finish_reason == "stop"
    assert capped.output == free_run[:4] and capped.finish_reason == "max_len"  # 6 + 4 tokens = max_len


def test_recursion_wise_cache_holds_only_tokens_that_reached_each_depth():
    model = tiny("tiny-mor", "model.num_recursions=3", "model.num_layers=8")
    im = InferenceModel(model)
    cache = im.new_cache(max_slots=1, max_len=64, num_pages=200, page_size=4)
    ids = torch.tensor(prompt(40, 5))
    stats: dict = {}
    im.forward(cache, ids, np.zeros(40, dtype=np.int64), torch.arange(40), stats=stats)
    ran = stats["depth"]  # tokens that ran exactly 0, 1, 2, 3 steps
    reached = [int(ran[r + 1:].sum()) for r in range(3)]
    layer = im.block[0]
    held = [int(cache.host_lengths[cache.row(im.layout.groups[(layer, r)], 0)]) for r in range(3)]
    assert held == reached and reached[0] > reached[1] > reached[2] > 0
    used_pages = cache.num_pages - 1 - cache.free_pages
    assert used_pages < im.layout.num_groups * 10  # fewer pages than every cache holding all 40 tokens
    # each recursion step ran on the rows still in it: every depth cache got exactly its tokens' pages, and
    # the host knows every length without reading the device's
    assert np.array_equal(cache.host_lengths, cache.lengths.numpy())
    assert used_pages == int((-(-cache.host_lengths // 4)).sum())


def test_kv_sharing_keeps_one_cache_per_shared_layer():
    plan = layer_plan(8, 3, "middle_cycle")
    share, per_depth = CacheLayout.for_plan(plan, True), CacheLayout.for_plan(plan, False)
    assert share.num_groups == 2 + 2 and per_depth.num_groups == 2 + 2 * 3
    assert share.read_group(1, 2) == share.read_group(1, 0) and not share.writes(2)


def test_decode_attention_kernel_matches_torch():
    if triton is None:
        pytest.skip("triton not installed")
    from mor_ds.inference.paged_attention import decode_attention_triton

    layout = CacheLayout.for_plan(layer_plan(4, 2, "middle_cycle"), False)
    cache = PagedKVCache(layout, max_slots=3, max_len=100, num_pages=40, page_size=16, num_kv_heads=2,
                         head_dim=32, dtype=torch.float32, device="cpu")
    rows, lengths = torch.tensor([0, 5, 7, 9]), [0, 1, 37, 100]
    gen = torch.Generator().manual_seed(0)
    for row, n in zip(rows.tolist(), lengths):
        cache.reserve(np.array([row]), n)
        rank = torch.arange(n)
        flat = cache.append_slots(torch.full((1, n), row), rank, rank)[0]
        cache.write_at(flat, torch.randn(n, 2, 32, generator=gen), torch.randn(n, 2, 32, generator=gen))
    q = torch.randn(4, 8, 32, generator=gen)[:, :6]  # GQA: 3 query heads per KV head; a strided view
    got = decode_attention_triton(q, cache, rows, cache.lengths[rows])
    torch.testing.assert_close(got, decode_attention_torch(q, cache, rows, cache.lengths[rows]), rtol=1e-5, atol=1e-5)
    assert torch.all(got[0] == 0)  # an empty cache row attends to nothing


def test_fused_rope_kv_write_and_silu_mul_kernels_match_torch():
    if triton is None:
        pytest.skip("triton not installed")
    from mor_ds.inference.fused_ops import rope_write_kv_torch, rope_write_kv_triton, silu_mul_torch, silu_mul_triton
    from mor_ds.models.block import rope_cos_sin

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, n = 6, 2, 32, 5  # GQA 3; 10 heads padded to 16 in the kernel
    qkv = torch.randn(n, hq + 2 * hkv, d, generator=gen)
    cos, sin = rope_cos_sin(torch.randint(0, 500, (n, 1), generator=gen), d, 10000.0, torch.float32)
    rope = (torch.cat((cos[:, 0], cos[:, 0]), -1), torch.cat((-sin[:, 0], sin[:, 0]), -1))
    flat = torch.tensor([3, 7, 0, 0, 11])  # two masked rows land in the trash slot 0
    caches = [torch.full((16, hkv, d), float("nan")) for _ in range(4)]  # poisoned: every written slot is checked
    q_ref = rope_write_kv_torch(qkv, rope, hq, caches[0], caches[1], flat)
    q = rope_write_kv_triton(qkv, rope, hq, caches[2], caches[3], flat)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        torch.testing.assert_close(got[[3, 7, 11]], want[[3, 7, 11]], rtol=1e-6, atol=1e-6)
        assert torch.isnan(got[[1, 2, 4]]).all()  # nothing written elsewhere
    gate_up = torch.randn(n, 2 * 1500, generator=gen) * 4  # two blocks of 1024, the second partial
    torch.testing.assert_close(silu_mul_triton(gate_up), silu_mul_torch(gate_up), rtol=1e-5, atol=1e-5)


def test_pool_exhaustion_and_release():
    layout = CacheLayout.for_plan(layer_plan(4, 1, "cycle"), False)
    cache = PagedKVCache(layout, max_slots=2, max_len=16, num_pages=5, page_size=4, num_kv_heads=1, head_dim=8,
                         dtype=torch.float32, device="cpu")
    cache.reserve(np.array([cache.row(0, 0), cache.row(1, 0)]), 8)  # slot 0 of both groups
    with pytest.raises(KVCacheFull, match="KV pool exhausted"):
        cache.reserve(np.array([cache.row(0, 1)]), 1)
    with pytest.raises(ValueError, match="max_len=16"):
        cache.reserve(np.array([3]), 17)
    cache.release(0)
    assert cache.free_pages == 4


def test_sampling_parameters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    greedy = sample(logits, torch.zeros(400), torch.ones(400), gen)
    assert torch.all(greedy == 0)
    nucleus = sample(logits, torch.ones(400), torch.full((400,), 0.7), gen)  # p = .61, .22, .14, .03
    assert set(nucleus.tolist()) == {0, 1}
    free = sample(logits, torch.full((400,), 1.0), torch.ones(400), gen)
    assert set(free.tolist()) == {0, 1, 2, 3}
    again = sample(logits, torch.ones(400), torch.full((400,), 0.7), torch.Generator().manual_seed(0))
    assert torch.equal(again, sample(logits, torch.ones(400), torch.full((400,), 0.7),
                                     torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)


def test_sampled_generation_is_reproducible_and_respects_top_p():
    model = tiny("tiny-mor")
    p = [prompt(5, 1)]
    hot = SamplingParams(temperature=1.5, top_p=0.9)
    a = generate(model, p, 12, sampling=hot, seed=3).tokens
    assert a == generate(model, p, 12, sampling=hot, seed=3).tokens
    assert generate(model, p, 12, sampling=SamplingParams(temperature=1.0, top_p=1e-6)).tokens == \
        generate(model, p, 12).tokens  # a vanishing nucleus is greedy


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="softmax"):
        InferenceModel(tiny("tiny-mor", "router.activation=softmax"))
    engine = Engine(tiny("tiny-vanilla"), max_slots=1, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        engine.add(Request(prompt(8, 0), 2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add(Request(prompt(3, 0), 0))


def test_generate_command_on_an_export_and_a_config_dir(tmp_path, capsys):
    import json

    from safetensors.torch import save_model

    from mor_ds.weights import CONFIG_KEY
    from mor_ds.cli import main

    cfg = load_config("tiny-mor", ["model.vocab_size=256", "model.hidden_size=64", "model.num_heads=4",
                                   "model.num_kv_heads=2", "model.intermediate_size=96"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router)
    save_model(model, str(tmp_path / "export.safetensors"), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    (tmp_path / "run").mkdir()
    save_model(model, str(tmp_path / "run" / "model.safetensors"))
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml())
    expected = generate(model.eval(), [[5, 6, 7]], 6).tokens[0]
    for ckpt in (tmp_path / "export.safetensors", tmp_path / "run"):
        assert main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                     "--no-stop", "--json", "--device", "cpu"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[0])["output_ids"] == expected
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", "5,6,7", "--prompt-ids", "9",
                 "--max-new-tokens", "6", "--no-stop", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"=== 1/2 prompt (3 tokens) ===\n5 6 7\n=== 1/2 output (6 tokens, length) ===\n"
                          f"{' '.join(map(str, expected))}\n\n=== 2/2 prompt (1 tokens) ===\n9\n")
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", "5,6,7", "--max-new-tokens",
                 str(cfg.train.seq_len), "--no-stop", "--device", "cpu", "--json"]) == 0
    assert capsys.readouterr().err.startswith(
        f"mor-ds generate: warning: the longest prompt (3 tokens) + --max-new-tokens {cfg.train.seq_len} = "
        f"{cfg.train.seq_len + 3} tokens exceeds the model's context of {cfg.train.seq_len} (train.seq_len)")
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt-ids", "1"]) == 2
    assert "missing: not found" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", "1,999", "--no-stop"]) == 2
    assert "ids must be in 0..255" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny-vanilla", "tiny-recursive", "tiny-mor", "tiny-mor-tc"])
def test_decode_step_creates_no_tensor_from_host_data(name):
    """CUDA graph capture forbids host-to-device copies: the tick must build nothing from Python data."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostData(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "lift_fresh" in str(func):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    engine = Engine(tiny(name), max_slots=2, max_len=20, page_size=4)
    engine.add(Request(prompt(5, 1), 3))
    engine._admit()
    engine._reserve(engine.ticks_per_replay)
    with HostData() as mode:
        engine._replay(engine.max_slots, engine.ticks_per_replay)
    assert mode.seen == []


@pytest.mark.parametrize("causal_mode", ["aux_loss", "aux_router"])
def test_calibrated_thresholds_give_causal_routing_the_capacity_schedule(causal_mode):
    """Training tracks τ_r (the logit where top-k_r cuts); causal routing with it keeps the schedule's
    fractions (1, 2/3, 1/3 of the tokens reach steps 0, 1, 2) on held-out data."""
    cfg = load_config("tiny-mor", ["model.vocab_size=256", "model.hidden_size=64", "model.num_heads=4",
                                   "model.num_kv_heads=2", "model.intermediate_size=96", "model.num_recursions=3",
                                   "model.num_layers=8", f"router.causal_mode={causal_mode}",
                                   "router.threshold_momentum=0.9"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router)
    router = model.recursion.router
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 30
    for i in range(steps):  # linear decay to 0, as a run's schedule ends
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - i / steps)
        x = torch.randint(0, VOCAB, (16, 65), generator=gen)
        model(x[:, :-1], labels=x[:, 1:]).total_loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_state()  # τ moves once per optimizer step
    assert router.threshold_updates.tolist() == [0, steps, steps]  # step 0 keeps everyone: no cut to track
    assert router.causal_threshold[0] == -math.inf
    model.eval()
    with torch.no_grad():
        stats = model(torch.randint(0, VOCAB, (32, 64), generator=gen), routing="causal").stats
    reached = [float(stats[f"depth_frac/{r}"]) for r in range(3)]
    assert reached == pytest.approx([1, 2 / 3, 1 / 3], abs=0.06)

    # τ is saved with the weights, stays fp32 under a bf16 cast, and checkpoints without it load as τ = 0
    state = model.state_dict()
    assert torch.equal(state["recursion.router.causal_threshold"], router.causal_threshold)
    assert model.to(torch.bfloat16).recursion.router.causal_threshold.dtype == torch.float32
    fresh = build_model(cfg.model, cfg.router)
    fresh.load_state_dict({k: v for k, v in state.items() if "threshold" not in k})
    assert fresh.recursion.router.causal_threshold.tolist() == [0, 0, 0]


def _rank_thresholds(rank: int, world: int, init_file: str, batches: torch.Tensor, out: str) -> None:
    """One data-parallel rank: a training forward on its own batch, then the per-step threshold update."""
    import torch.distributed as dist

    from mor_ds import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _threshold_model()
        model(batches[rank])
        model.update_router_state(distributed.all_reduce_sum)
        torch.save(model.recursion.router.causal_threshold, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _threshold_model():
    cfg = load_config("tiny-mor", ["model.vocab_size=256", "model.hidden_size=64", "model.num_heads=4",
                                   "model.num_kv_heads=2", "model.intermediate_size=96", "model.num_recursions=3",
                                   "model.num_layers=8"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.router).train()


def test_calibrated_thresholds_are_the_same_on_every_data_parallel_rank(tmp_path):
    """Two gloo ranks, one batch each: both end with the τ that one process gets from the two batches as
    micro-batches of one optimizer step (cuts averaged over micro-batches and ranks)."""
    batches = torch.randint(0, VOCAB, (2, 4, 32), generator=torch.Generator().manual_seed(3))
    torch.multiprocessing.spawn(_rank_thresholds, args=(2, str(tmp_path / "pg"), batches, str(tmp_path / "tau")),
                                nprocs=2)
    ranks = [torch.load(tmp_path / f"tau.{r}") for r in range(2)]
    single = _threshold_model()
    for batch in batches:  # two micro-batches, one step
        single(batch)
    single.update_router_state()
    assert torch.equal(ranks[0], ranks[1])
    assert torch.equal(ranks[0], single.recursion.router.causal_threshold)
    assert ranks[0][0] == -math.inf and torch.all(ranks[0][1:].isfinite())


def test_bench_compares_each_model_with_the_vanilla_of_its_depth():
    """MoR-4 (34 unrolled layers) against the 34-layer vanilla, MoR-3 against the 32-layer one, whatever the order
    of --models; a depth without its own vanilla falls back to the first vanilla."""
    from mor_ds.bench.inference import vanilla_baselines

    def model(name, layers, tok_s):
        return {"model": name, "layers": layers, "batch_max": {"tokens_per_s": tok_s, "decode_tokens_per_s": tok_s}}

    results = {"models": [model("vanilla-360m-L34", 34, 1.0), model("mor-360m-nr4", 34, 5.0),
                          model("vanilla-360m", 32, 2.0), model("mor-360m-nr3", 32, 7.0)]}
    base = vanilla_baselines(results)
    assert base[(34, "batch_max")]["tokens_per_s"] == 1.0 and base[(32, "batch_max")]["tokens_per_s"] == 2.0
    assert base[(None, "batch_max")]["tokens_per_s"] == 1.0 and (30, "batch_max") not in base


def test_bench_trains_routers_with_the_trainers_groups_and_schedule():
    """The benchmark's short router training is the trainer's recipe: its parameter groups (no decay on norm gains)
    and WSD schedule (10% warmup, decay to 0 over the last 20%), at --train-lr; it trains (loss falls) and
    calibrates the causal thresholds."""
    from types import SimpleNamespace

    from mor_ds.bench.inference import router_training_recipe, train_briefly
    from mor_ds.train.optim import param_groups
    from mor_ds.train.schedules import lr_at

    cfg = load_config("tiny-mor", [f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.num_heads=2",
                                   "model.num_kv_heads=1", "model.intermediate_size=48"])
    args = SimpleNamespace(train_lr=1e-3, train_steps=10, train_seq=16, train_batch=4, calibration_batches=1)
    recipe = router_training_recipe(cfg, args)
    assert (recipe.betas, recipe.weight_decay, recipe.grad_clip) == (cfg.optim.betas, 0.1, 1.0)
    assert [round(lr_at(s, 10, recipe), 9) for s in range(10)] == [1e-3] * 8 + [5e-4, 0.0]
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.router)
    groups = param_groups(model, recipe)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(p.ndim == 1 for p in groups[1]["params"])
    tokens = np.tile(np.arange(64) % 7, 200)  # a learnable periodic text
    result = train_briefly(model, cfg, tokens, args, torch.device("cpu"))
    first, last = result["lm_loss_first_last"]
    assert result["steps"] == 10 and last < first and len(result["causal_thresholds"]) == 2


def test_bench_sizes_mor_pools_by_the_steps_tokens_run():
    """The max batch's KV per sequence counts, per shared layer, the steps a token runs (the prompt at held-out
    routing, the generation at generated text's once a row measured it); with no estimate every step."""
    from types import SimpleNamespace

    from mor_ds.bench.inference import expected_groups_per_token, kv_tokens_per_sequence, step_reach

    assert step_reach([0.0, 0.25, 0.25, 0.5]) == [1.0, 0.75, 0.5]
    im = InferenceModel(tiny("tiny-mor", "model.num_recursions=3", "model.num_layers=8"))  # 1 + 2·3 shared + 1
    assert len(im.plan.prelude) == len(im.plan.coda) == 1 and len(im.block) == 2
    assert expected_groups_per_token(im, [1.0, 0.75, 0.5]) == 2 + 2 * 2.25
    assert expected_groups_per_token(im, []) == im.layout.num_groups == 8
    args = SimpleNamespace(prompt_len=100, gen_mean=10, page_size=16)
    # prompt: 2 + 2·2.25 caches per token; generation: 2 + 2·1.0; half a page of slack in each of the 8 caches
    assert kv_tokens_per_sequence(im, [1.0, 0.75, 0.5], [1.0, 0.0, 0.0], args) == 6.5 * 100 + 4.0 * 10 + 8 * 8
    vanilla = InferenceModel(tiny("tiny-vanilla"))
    assert expected_groups_per_token(vanilla, [0.5]) == vanilla.layout.num_groups  # every layer, every token


def test_kernel_timing_rows_follow_the_capacity_schedule():
    """--kernel-timing's MoR rows: depth r drawn ∝ the tokens reaching it, each reading ~(Nr − r)/Nr of the mean
    length, 5% outside the recursion; vanilla rows all within ±20% of the mean."""
    from mor_ds.bench.inference import kernel_timing_lengths

    vanilla = kernel_timing_lengths(4000, 640, 0, torch.Generator().manual_seed(0))
    assert vanilla.min() >= 512 and vanilla.max() <= 768
    mor = kernel_timing_lengths(20000, 640, 4, torch.Generator().manual_seed(0)).float()
    assert abs((mor == 0).float().mean().item() - 0.05) < 0.01
    # E[cap_r] with P(r) ∝ cap_r: Σ cap² / Σ cap = 1.875 / 2.5 = 0.75 of the mean, times the 95% inside
    assert abs(mor.mean().item() / 640 - 0.95 * 0.75) < 0.02


def test_host_slots_move_carries_every_array_and_the_request():
    from mor_ds.inference.slot_state import HostSlots

    host = HostSlots(4, max_len=3)
    host.requests[3], host.live[3], host.pos[3], host.admitted_at[3] = "req", True, 7, 2
    host.out_buf[3], host.out_len[3], host.budget[3], host.stop[3] = [5, 6, 0], 2, 9, 1
    host.move(np.array([3]), np.array([1]))
    assert host.requests == [None, "req", None, None]
    assert host.live.tolist() == [False, True, False, False]
    assert (host.pos[1], host.admitted_at[1], host.out_len[1], host.budget[1], host.stop[1]) == (7, 2, 2, 9, 1)
    assert host.out_buf[1].tolist() == [5, 6, 0]
