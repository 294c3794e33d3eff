"""Data mixtures: proportions at every point, per-source order, rank sharding, bit-exact resume, repetition of a small
source, a finite validation interleave, bad input."""

import itertools

import numpy as np
import pytest

from data_pipeline.errors import DataError, ShardError
from data_pipeline.loader import ShardLoader
from data_pipeline.mixture import MixtureLoader, Source, apportion
from data_pipeline.prepare import prepare
from data_pipeline.testing import embedded_sample, fineweb_records, write_records
from data_pipeline.tokenizer import load_tokenizer, train_sentencepiece

L = 32


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer_path):
    """Three prepared directories of different sizes: big (~24 shards), mid, small (~3 shards)."""
    root = tmp_path_factory.mktemp("mix")
    docs = embedded_sample(90, max_chars=1500)
    out = {}
    for name, part in (("big", docs[:60]), ("mid", docs[60:80]), ("small", docs[80:])):
        source = write_records(root / f"{name}.jsonl", fineweb_records(part))
        prepare(source, tokenizer_path, str(root / name), workers=0, shard_tokens=1000, show_progress=False)
        out[name] = str(root / name)
    return out


def mix(dirs, weights=(("big", 0.5), ("mid", 0.3), ("small", 0.2)), **kw):
    return MixtureLoader([Source(n, dirs[n], w) for n, w in weights], L, kw.pop("batch_size", 4), seed=5, **kw)


def rows(batches):
    return [bytes(np.asarray(r).astype(np.uint16)) for b in batches for r in b]


def source_windows(path, split="train"):
    """Every window of one source's split (any order)."""
    one = ShardLoader(path, L, 1, split=split)
    return set(rows([one.windows_at(np.arange(one.num_windows), {})]))


def test_every_stretch_holds_the_weights_and_each_window_its_source(dirs):
    m = mix(dirs)
    assert m.block >= 4096 and np.allclose(m.weights, [0.5, 0.3, 0.2])
    sources, local = m.assign(0, 3 * m.block + 100)
    for p in list(range(0, 200)) + [m.block, m.block + 7, 2 * m.block + 50]:
        behind = m.weights * p - np.bincount(sources[:p], minlength=3)
        assert np.abs(behind).max() < 2, (p, behind)
        assert (m.counts_before(p) == np.bincount(sources[:p], minlength=3)).all()
    for s in range(3):  # each source's k-th window is position k of its own sequence
        assert (local[sources == s] == np.arange((sources == s).sum())).all()
    batch = rows(itertools.islice(m, 25))
    expected = [m.loaders[s].windows_at(np.array([j]), {})[0] for s, j in zip(*m.assign(0, 100))]
    assert batch == [bytes(w.astype(np.uint16)) for w in expected]
    for name, window in zip([m.sources[s].name for s in sources[:100]], batch):
        assert window in source_windows(dirs[name])


def test_apportion_is_exact_and_within_one():
    w = np.array([0.5, 0.3, 0.2])
    for total in (0, 1, 7, 100, 4097):
        counts = apportion(w, total)
        assert counts.sum() == total and (np.abs(counts - w * total) < 1).all()


def test_the_order_depends_on_the_global_batch_only_and_ranks_are_disjoint(dirs):
    whole = rows(itertools.islice(mix(dirs, batch_size=4), 6))
    ranks = [rows(itertools.islice(mix(dirs, batch_size=2, rank=r, world_size=2), 6)) for r in range(2)]
    interleaved = [row for k in range(6) for r in range(2) for row in ranks[r][2 * k:2 * k + 2]]
    assert interleaved == whole


def test_resume_is_bit_exact_and_a_small_source_repeats(dirs):
    continuous = rows(itertools.islice(mix(dirs), 300))
    first = mix(dirs)
    it = iter(first)
    for _ in range(180):
        next(it)
    state = first.state_dict()
    resumed = mix(dirs)
    resumed.load_state_dict(state)
    assert rows(itertools.islice(resumed, 120)) == continuous[180 * 4:]
    counts = resumed.source_windows()
    assert sum(counts.values()) == 300 * 4 and counts == dict(zip(["big", "mid", "small"],
                                                                  apportion(resumed.weights, 1200).tolist()))
    epochs = resumed.source_epochs()
    assert epochs["small"] > 1 > epochs["big"]  # 20% of 1200 windows is more than the small source holds
    other = mix(dirs, weights=(("big", 0.5), ("mid", 0.4), ("small", 0.1)))
    with pytest.raises(DataError, match="loader state has sources="):
        other.load_state_dict(state)


def test_validation_interleaves_held_out_windows_once_in_order(dirs):
    val = mix(dirs, split="val", batch_size=2)
    first, second = rows(val), rows(val)
    assert first == second and len(first) == val.num_batches * 2 > 0
    assert len(set(first)) == len(first)  # no held-out window twice
    held = {n: source_windows(dirs[n], "val") for n in dirs}
    assert set(first) <= set().union(*held.values()) and not set(first) & source_windows(dirs["big"])
    sizes = [one.num_windows for one in val.loaders]
    assert any(c >= s - 2 for c, s in zip(val.counts_before(len(first)), sizes))  # ends as a source runs out


def test_bad_mixtures_are_one_line(dirs, tmp_path):
    with pytest.raises(DataError, match=r"mixture source 'mid': weight 0 must be > 0"):
        mix(dirs, weights=(("big", 1), ("mid", 0)))
    with pytest.raises(DataError, match="distinct names"):
        MixtureLoader([Source("a", dirs["big"], 1), Source("a", dirs["mid"], 1)], L, 2)
    other = load_tokenizer(train_sentencepiece(embedded_sample(30), str(tmp_path / "other"), 500))
    with pytest.raises(ShardError, match=r"mid/index\.json: shards were made with tokenizer"):
        mix(dirs, weights=(("mid", 1),), expected_tokenizer=other)


def test_resume_on_another_world_size_continues_the_interleave(dirs):
    """Saved by 2 ranks x 2 windows, resumed by 4 ranks x 1 (same global batch) and by 1 rank x 4: the windows of
    every later step are the uninterrupted run's."""
    continuous = rows(itertools.islice(mix(dirs), 20))
    saved = [mix(dirs, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for loader in saved:
        it = iter(loader)
        for _ in range(8):
            next(it)
    states = [loader.state_dict() for loader in saved]
    for world_size, batch_size in ((4, 1), (1, 4)):
        resumed = [mix(dirs, batch_size=batch_size, rank=r, world_size=world_size) for r in range(world_size)]
        for loader in resumed:
            loader.load_state_dicts(states)
        ranks = [rows(itertools.islice(loader, 12)) for loader in resumed]
        steps = [row for k in range(12) for r in range(world_size) for row in ranks[r][k * batch_size:
                                                                                         (k + 1) * batch_size]]
        assert steps == continuous[8 * 4:]
    with pytest.raises(DataError, match=r"loader states are at windows \[20, 32\]: not one step of one run"):
        mix(dirs).load_state_dicts([states[0], {**states[1], "consumed_windows": 20}])


def test_data_sources_config_errors_name_the_key(dirs):
    from mor_ds.config import ConfigError, load_config

    base = ["model.vocab_size=512"]
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight"):
        load_config("tiny-mor", [*base, f"data.sources=[{{path: {dirs['big']}}}, {{path: {dirs['mid']}, weight: 0}}]"])
    with pytest.raises(ConfigError, match="give data.prepared_dir or data.sources, not both"):
        load_config("tiny-mor", [*base, f"data.prepared_dir={dirs['big']}", f"data.sources=[{{path: {dirs['mid']}}}]"])
    with pytest.raises(ConfigError, match=r"data\.sources.*distinct names"):
        load_config("tiny-mor", [*base, f"data.sources=[{{path: {dirs['big']}}}, {{path: {dirs['big']}}}]"])
