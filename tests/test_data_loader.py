"""Loaders: window coverage, rank sharding, determinism, bit-exact resume, val split, refusal of bad shards."""

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError, ShardError
from data_pipeline.loader import ShardLoader, StreamLoader
from data_pipeline.prepare import prepare
from data_pipeline.shards import ShardIndex, read_shard
from data_pipeline.sources import DocumentStream
from data_pipeline.testing import embedded_sample, fineweb_records, write_records
from data_pipeline.tokenizer import load_tokenizer, train_sentencepiece

L = 32  # seq_len


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    records = fineweb_records(embedded_sample(12, max_chars=700))
    for part in range(4):
        write_records(root / f"part-{part}.parquet", records[part * 3:(part + 1) * 3])
    return str(root / "*.parquet")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, source, tokenizer_path):
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare(source, tokenizer_path, str(out), workers=0, shard_tokens=700, frame_tokens=256, show_progress=False)
    return str(out)


def _rows(batches):
    return [bytes(row.numpy().astype(np.uint16)) for b in batches for row in b]


def _all_windows(shard_dir, shards):
    index = ShardIndex.load(shard_dir)
    windows = []
    for info in shards:
        tokens = read_shard(shard_dir, info, index.token_dtype)
        windows += [bytes(tokens[i * L:i * L + L + 1]) for i in range((info.tokens - 1) // L)]
    return windows


def test_batches_are_int64_windows_and_an_epoch_covers_every_window_once(shard_dir):
    loader = ShardLoader(shard_dir, L, 4, seed=3)
    assert loader.tokens_per_batch == 4 * L
    batches = list(itertools.islice(loader, -(-loader.num_windows // 4)))
    assert all(b.dtype == torch.int64 and b.shape == (4, L + 1) for b in batches)
    epoch = _rows(batches)[:loader.num_windows]
    assert sorted(epoch) == sorted(_all_windows(shard_dir, loader.shards))
    assert len(loader.shards) == len(ShardIndex.load(shard_dir).shards) - 1  # one held out for validation


def test_rank_sharding_is_disjoint_covering_and_independent_of_world_size(shard_dir):
    single = list(itertools.islice(ShardLoader(shard_dir, L, 6, seed=1), 40))  # crosses an epoch boundary
    ranks = [list(itertools.islice(ShardLoader(shard_dir, L, 2, rank=r, world_size=3, seed=1), 40)) for r in range(3)]
    for k in range(40):
        assert torch.equal(torch.cat([ranks[r][k] for r in range(3)]), single[k])
    n = ShardLoader(shard_dir, L, 2, seed=1).num_windows
    first_epoch = [_rows(ranks[r]) for r in range(3)]
    # global positions < n: rank r holds positions k*6 + 2r + {0, 1}
    seen = [row for k in range(40) for r in range(3) for i, row in enumerate(first_epoch[r][2 * k:2 * k + 2])
            if k * 6 + 2 * r + i < n]
    assert sorted(seen) == sorted(_all_windows(shard_dir, ShardLoader(shard_dir, L, 2).shards))


def test_order_is_seeded_and_changes_per_epoch(shard_dir):
    n = ShardLoader(shard_dir, L, 4).num_windows
    count = -(-2 * n // 4)  # two epochs
    a = _rows(itertools.islice(ShardLoader(shard_dir, L, 4, seed=5), count))
    assert a == _rows(itertools.islice(ShardLoader(shard_dir, L, 4, seed=5), count))
    assert a != _rows(itertools.islice(ShardLoader(shard_dir, L, 4, seed=6), count))
    assert a[:n] != a[n:2 * n] and sorted(a[:n]) == sorted(a[n:2 * n])


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_bit_exact(shard_dir, prefetch, world_size):
    for rank in range(world_size):
        make = functools.partial(ShardLoader, shard_dir, L, 3, rank=rank, world_size=world_size, seed=7,
                                 prefetch=prefetch)
        full = list(itertools.islice(make(), 70))
        first = make()
        head = list(itertools.islice(first, 23))
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        tail = list(itertools.islice(resumed, 47))
        assert all(torch.equal(x, y) for x, y in zip(head + tail, full, strict=True))


def test_resume_with_another_split_of_the_same_global_batch(shard_dir):
    ranks = [ShardLoader(shard_dir, L, 2, rank=r, world_size=2, seed=2) for r in range(2)]
    for loader in ranks:
        list(itertools.islice(loader, 9))
    single = ShardLoader(shard_dir, L, 4, seed=2)
    single.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(iter(single)), torch.cat([next(iter(r)) for r in ranks]))
    odd = ShardLoader(shard_dir, L, 3, seed=2)
    with pytest.raises(DataError, match="window 40, not a multiple of this run.s global batch 3"):
        odd.load_state_dict(ranks[0].state_dict())


def test_mismatched_state_is_refused(shard_dir):
    state = ShardLoader(shard_dir, L, 2).state_dict()
    with pytest.raises(DataError, match="seq_len=32 but this loader has 16"):
        ShardLoader(shard_dir, 16, 2).load_state_dict(state)
    with pytest.raises(DataError, match="not a StreamLoader"):
        StreamLoader.load_state_dict(object.__new__(StreamLoader), state)


def test_val_split_is_finite_deterministic_and_held_out(shard_dir):
    val = ShardLoader(shard_dir, L, 2, split="val", seed=9)
    first, second = list(val), list(val)
    assert len(first) == val.num_batches == val.num_windows // 2 > 0
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    index = ShardIndex.load(shard_dir)
    assert index.shards[-1].tokens < index.shards[-2].tokens  # a short final shard stays in training
    assert val.shards == index.shards[-2:-1] and index.shards[-1] in ShardLoader(shard_dir, L, 2).shards
    assert _rows(first) == _all_windows(shard_dir, index.shards[-2:-1])[:2 * val.num_batches]  # in order
    ranks = [list(ShardLoader(shard_dir, L, 1, split="val", rank=r, world_size=2)) for r in range(2)]
    assert _rows(ranks[0]) + _rows(ranks[1]) != [] and not set(_rows(ranks[0])) & set(_rows(ranks[1]))
    with pytest.raises(DataError, match="val_shards=0 does not fit"):
        ShardLoader(shard_dir, L, 2, split="val", val_shards=0)


def test_a_set_with_too_few_shards_holds_out_the_tail_of_its_last_shard(tmp_path, source, tokenizer_path):
    """One shard (a small corpus in the default shard size): validation is the last 5% of its windows per requested
    val shard, in order; training keeps the rest, shuffled and exactly resumable."""
    one = tmp_path / "one"
    prepare(source, tokenizer_path, str(one), workers=0, show_progress=False)
    index = ShardIndex.load(one)
    (info,) = index.shards
    tokens = read_shard(str(one), info, index.token_dtype)
    windows = [bytes(tokens[i * L:i * L + L + 1]) for i in range((info.tokens - 1) // L)]
    held = round(0.05 * len(windows))
    val = ShardLoader(str(one), L, 1, split="val", val_shards=1)
    assert val.num_windows == held > 0 and _rows(val) == windows[-held:]
    assert val.split_note == (f"1 shard(s) for val_shards=1: the last {held} windows (5%) of shard_000000.zst are "
                              f"held out")
    train = ShardLoader(str(one), L, 2, seed=4)
    assert train.num_windows == len(windows) - held
    epoch = _rows(itertools.islice(train, -(-train.num_windows // 2)))[:train.num_windows]
    assert sorted(epoch) == sorted(windows[:-held]) and epoch != windows[:-held]  # all of the rest, shuffled
    assert ShardLoader(str(one), L, 1, split="val", val_shards=2).num_windows == round(0.1 * len(windows))
    interrupted = ShardLoader(str(one), L, 2, seed=4)
    batches = iter(interrupted)
    for _ in range(3):
        next(batches)
    resumed = ShardLoader(str(one), L, 2, seed=4)
    resumed.load_state_dict(interrupted.state_dict())
    continuous = ShardLoader(str(one), L, 2, seed=4)
    assert _rows(itertools.islice(resumed, 4)) == _rows(itertools.islice(continuous, 7))[3 * 2:]
    with pytest.raises(DataError, match=r"fewer than one global batch \(64\); prepare with a smaller --shard-tokens"):
        ShardLoader(str(one), L, 64, split="val")


def test_tokenizer_hash_mismatch_is_refused(shard_dir, tmp_path):
    other = load_tokenizer(train_sentencepiece(embedded_sample(60), str(tmp_path / "other"), 700))
    with pytest.raises(ShardError, match=r"index\.json: shards were made with tokenizer [0-9a-f]{16}\.\.\. \(.*\), "
                                         r"this run uses .*other\.model \([0-9a-f]{16}\.\.\.\): 600 ids vs 700"):
        ShardLoader(shard_dir, L, 2, expected_tokenizer=other)
    ShardLoader(shard_dir, L, 2, expected_tokenizer=load_tokenizer(f"{shard_dir}/tokenizer.model"))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_named(shard_dir, tmp_path, damage):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in Path(shard_dir).iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    victim = broken / ShardIndex.load(broken).shards[2].file
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        match = "SHA-256 differs from the index"
    else:
        data = data[:-5]
        match = rf"{len(data)} bytes, the index says {len(data) + 5}"
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{victim}: {match}.*mor-data verify"):
        list(itertools.islice(ShardLoader(str(broken), L, 4, prefetch=2), 10_000))


# ------------------------------------------------------------------------------------------------- streaming


def _packed(tokenizer_path, docs):
    tok = load_tokenizer(tokenizer_path)
    return np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(docs)])


def _stream_of_windows(batches):
    rows = torch.cat(list(batches)).numpy()
    return np.concatenate([rows[:, :-1].reshape(-1), rows[-1:, -1]])


@pytest.mark.parametrize("rank", [0, 1])
def test_stream_loader_packs_the_ranks_documents_in_order(source, tokenizer_path, rank):
    docs = list(DocumentStream(source, rank=rank, world_size=2))
    expected = _packed(tokenizer_path, docs)
    loader = StreamLoader(source, tokenizer_path, L, 2, rank=rank, world_size=2, num_workers=0, shuffle_windows=0)
    count = (len(expected) - 1) // (2 * L)
    got = _stream_of_windows(itertools.islice(loader, count))
    np.testing.assert_array_equal(got, expected[:len(got)])
    other = list(DocumentStream(source, rank=1 - rank, world_size=2))
    assert not set(docs) & set(other) and len(docs) + len(other) == 12


def test_stream_loader_shuffles_within_blocks(source, tokenizer_path):
    plain = _rows(itertools.islice(StreamLoader(source, tokenizer_path, L, 2, num_workers=0, shuffle_windows=0), 8))
    mixed = _rows(itertools.islice(StreamLoader(source, tokenizer_path, L, 2, num_workers=0, shuffle_windows=8), 8))
    assert plain != mixed and sorted(plain[:8]) == sorted(mixed[:8]) and sorted(plain[8:]) == sorted(mixed[8:])


def test_stream_loader_resume_is_bit_exact_across_epochs(source, tokenizer_path):
    def make(workers: int) -> StreamLoader:
        return StreamLoader(source, tokenizer_path, L, 3, rank=1, world_size=2, seed=4, num_workers=workers,
                            shuffle_windows=7, prefetch=2)

    epoch_windows = len(_packed(tokenizer_path, list(DocumentStream(source, rank=1, world_size=2)))) // L
    total = 2 * epoch_windows // 3 + 5  # runs through two epochs
    full = list(itertools.islice(make(0), total))
    first = make(1)  # one tokenizer process
    head = list(itertools.islice(first, 11))
    state = first.state_dict()
    resumed = make(0)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, total - 11))
    assert all(torch.equal(x, y) for x, y in zip(head + tail, full, strict=True))


def test_stream_loader_rank_without_documents(tmp_path, tokenizer_path):
    write_records(tmp_path / "one.jsonl", [{"text": "the only document"}])
    loader = StreamLoader(str(tmp_path / "one.jsonl"), tokenizer_path, L, 2, rank=1, world_size=2, num_workers=0)
    with pytest.raises(DataError, match="part 1 of 2 .* holds no documents"):
        next(iter(loader))


# ------------------------------------------------------------------------------------------------ another world size


def _steps(loaders, accumulation, steps):
    """Every window each optimizer step consumes over all ranks (rank by rank, micro-batch by micro-batch), as
    sample ids (the window's bytes)."""
    iters = [iter(loader) for loader in loaders]
    return [[row for it in iters for _ in range(accumulation) for row in _rows([next(it)])] for _ in range(steps)]


@pytest.mark.parametrize("kind", ["prepared", "stream"])
@pytest.mark.parametrize("phases", [[(4, 3), (2, 3)], [(2, 3), (3, 2)], [(4, 3), (3, 4)], [(2, 3), (3, 2), (4, 1)]],
                         ids=["4to2", "2to3", "4to3", "2to3to4"])
def test_resume_on_another_world_size_skips_and_repeats_no_sample(shard_dir, source, tokenizer_path, kind, phases):
    """12 windows a step; (world size, micro-batch) changes at each restart, the gradient accumulation with it.
    Every sample id consumed over all the restarts, step by step, is the uninterrupted run's; the stream's parts
    wrap around into their second epoch."""
    if kind == "prepared":
        def make(rank, world_size, batch_size):
            return ShardLoader(shard_dir, L, batch_size, rank=rank, world_size=world_size, seed=3)
    else:
        def make(rank, world_size, batch_size):
            return StreamLoader(source, tokenizer_path, L, batch_size, rank=rank, world_size=world_size, seed=3,
                                num_workers=0, shuffle_windows=7, global_batch=12)
    lengths = [5, 4, 13][:len(phases) - 1] + [22 - 5 * (len(phases) - 1)]
    (w0, b0) = phases[0]
    uninterrupted = _steps([make(r, w0, b0) for r in range(w0)], 12 // (w0 * b0), sum(lengths))
    consumed, states = [], None
    for (world_size, batch_size), steps in zip(phases, lengths):
        loaders = [make(rank, world_size, batch_size) for rank in range(world_size)]
        if states is not None:
            for loader in loaders:
                loader.load_state_dicts(states)
        consumed += _steps(loaders, 12 // (world_size * batch_size), steps)
        states = [loader.state_dict() for loader in loaders]
    assert [sorted(s) for s in consumed] == [sorted(s) for s in uninterrupted]
    assert sorted(row for s in consumed for row in s) == sorted(row for s in uninterrupted for row in s)


def test_stream_loader_on_another_world_size_needs_the_global_batch_and_a_step_boundary(source, tokenizer_path):
    def make(rank, world, batch, global_batch=12):
        return StreamLoader(source, tokenizer_path, L, batch, rank=rank, world_size=world, num_workers=0,
                            global_batch=global_batch)
    saved = [make(r, 2, 3) for r in range(2)]  # 2 micro-batches a step
    _steps(saved, 2, 1)
    states = [loader.state_dict() for loader in saved]
    with pytest.raises(DataError, match="global_batch=12 but this loader has 8: a streamed source continues"):
        make(0, 4, 2, global_batch=8).load_state_dicts(states)
    next(iter(saved[0]))  # rank 0 one micro-batch into step 2
    states[0] = saved[0].state_dict()
    with pytest.raises(DataError, match=r"micro-batches \[2, 3\], not at one optimizer-step boundary"):
        make(0, 3, 2).load_state_dicts(states)


def test_the_same_tokenizer_in_another_format_reads_the_shards(shard_dir, tmp_path):
    """The tokenizer.json transformers converts a SentencePiece model into (what `mor-ds export --format hf` ships)
    has the model's identity: shards made with one are read with the other; another model of the same size is not."""
    from data_pipeline.tokenizer import difference
    from mor_ds.interop.hf_export import export_tokenizer

    made_with = load_tokenizer(f"{shard_dir}/tokenizer.model")
    export_tokenizer(made_with, tmp_path)
    converted = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert converted.hash != made_with.hash and converted.identity == made_with.identity
    assert ShardIndex.load(shard_dir).tokenizer["identity"] == made_with.identity
    ShardLoader(shard_dir, L, 2, expected_tokenizer=converted)
    other = load_tokenizer(train_sentencepiece(embedded_sample(30), str(tmp_path / "other"), 600))
    assert difference(made_with, other).startswith("id ")  # same size, other pieces
    with pytest.raises(ShardError, match=r": id \d+ is '.*' vs '.*'; re-prepare, or use the tokenizer the shards"):
        ShardLoader(shard_dir, L, 2, expected_tokenizer=other)
