"""prepare: exact packing, worker-count independence, crash resume, index contents, verify, the CLI."""

import json
import os

import numpy as np
import pytest

from data_pipeline.cli import main
from data_pipeline.errors import DataError
from data_pipeline.inspection import verify
from data_pipeline.prepare import prepare
from data_pipeline.shards import ShardIndex, read_shard, token_dtype
from data_pipeline.testing import embedded_sample, fineweb_records, write_records
from data_pipeline.tokenizer import file_hash, load_tokenizer, train_sentencepiece

DOCS = embedded_sample(40, max_chars=1500)
SHARD_TOKENS = 3000
FRAME_TOKENS = 1000


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    records = fineweb_records(DOCS)
    records.insert(7, {"id": "no text"})
    for part in range(2):
        write_records(root / f"part-{part}.jsonl.zst", records[part * 21:(part + 1) * 21])
    return str(root / "*.jsonl.zst")


def _run(source, tokenizer_path, out, **kw):
    kw = {"workers": 0, "shard_tokens": SHARD_TOKENS, "frame_tokens": FRAME_TOKENS, "show_progress": False,
          "task_bytes": 5000} | kw
    return prepare(source, tokenizer_path, str(out), **kw)


def _all_tokens(directory):
    index = ShardIndex.load(directory)
    return np.concatenate([read_shard(directory, s, index.token_dtype) for s in index.shards])


def _shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard_*.zst"))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, source, tokenizer_path):
    out = tmp_path_factory.mktemp("prepared") / "out"
    _run(source, tokenizer_path, out, workers=2, command="mor-data prepare (test)")
    return out


def test_packing_keeps_every_token_exactly_once(prepared, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    expected = np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(DOCS)])
    np.testing.assert_array_equal(_all_tokens(prepared), expected)
    index = ShardIndex.load(prepared)
    assert [s.tokens for s in index.shards[:-1]] == [SHARD_TOKENS] * (len(index.shards) - 1)
    assert 0 < index.shards[-1].tokens <= SHARD_TOKENS
    assert sum(s.docs for s in index.shards) == len(DOCS) == index.totals["docs"]
    ends = np.cumsum([len(ids) + 1 for ids in tok.encode_batch(DOCS)])  # docs counted where they end
    assert [s.docs for s in index.shards] == np.bincount((ends - 1) // SHARD_TOKENS).tolist()


def test_index_records_provenance(prepared, source, tokenizer_path):
    index = ShardIndex.load(prepared)
    assert index.dtype == "<u2" and index.vocab_size == 600 and index.eos_id == 3
    assert index.tokenizer["hash"] == file_hash(tokenizer_path) == file_hash(prepared / "tokenizer.model")
    assert index.source["spec"] == source and len(index.source["files"]) == 2
    assert index.command == "mor-data prepare (test)" and index.versions["sentencepiece"]
    assert index.totals["bad_records"] == {"missing_field": 1}
    assert index.totals["bad_examples"] == [f"{source[:-11]}part-0.jsonl.zst:8: no field 'text'"]
    assert all(len(s.frames) == -(-s.tokens // FRAME_TOKENS) for s in index.shards)
    assert not list(prepared.glob("progress*")) and not list(prepared.glob(".*tmp*"))


def test_token_dtype():
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")


def test_output_does_not_depend_on_workers_or_tasks(prepared, source, tokenizer_path, tmp_path):
    _run(source, tokenizer_path, tmp_path / "inline", workers=0, task_bytes=1 << 20)
    assert _shard_bytes(tmp_path / "inline") == _shard_bytes(prepared)


def test_resume_after_stop_gives_the_same_shards(prepared, source, tokenizer_path, tmp_path):
    out = tmp_path / "resumed"
    assert _run(source, tokenizer_path, out, max_shards=2) is None
    assert sorted(_shard_bytes(out)) == ["shard_000000.zst", "shard_000001.zst"]
    assert not (out / "index.json").exists() and (out / "progress.json").exists()
    with pytest.raises(DataError, match=r"index\.json: no shard index \(an unfinished prepare"):
        ShardIndex.load(out)
    (out / ".shard_000002.zst.tmp-999").write_bytes(b"partial write of a crashed run")
    assert _run(source, tokenizer_path, out, max_shards=1) is None
    assert not (out / ".shard_000002.zst.tmp-999").exists()
    index = _run(source, tokenizer_path, out, workers=2)
    assert _shard_bytes(out) == _shard_bytes(prepared)
    assert index.totals == ShardIndex.load(prepared).totals  # bad-record counts are not double-counted
    assert not (out / "progress.json").exists()
    assert _run(source, tokenizer_path, out).shards == index.shards  # a finished dir is returned as is


def test_changed_settings_are_refused(prepared, source, tokenizer_path, tmp_path):
    with pytest.raises(DataError, match=r"index\.json: made with shard_tokens=3000, this run has 4000"):
        _run(source, tokenizer_path, prepared, shard_tokens=4000)
    _run(source, tokenizer_path, tmp_path / "partial", max_shards=1)
    other = train_sentencepiece(embedded_sample(60), str(tmp_path / "other"), 700)
    with pytest.raises(DataError, match=r"progress\.json: made with tokenizer_hash="):
        _run(source, other, tmp_path / "partial")


def test_existing_shards_are_never_overwritten(tmp_path, source, tokenizer_path):
    (tmp_path / "shard_000000.zst").write_bytes(b"someone else's shard")
    with pytest.raises(DataError, match="holds shards but no progress.json or index.json; refusing to overwrite"):
        _run(source, tokenizer_path, tmp_path)
    assert (tmp_path / "shard_000000.zst").read_bytes() == b"someone else's shard"


def test_one_prepare_per_directory(tmp_path, source, tokenizer_path):
    from filelock import FileLock

    with FileLock(str(tmp_path / ".prepare.lock")):
        with pytest.raises(DataError, match="another `mor-data prepare` is writing here"):
            _run(source, tokenizer_path, tmp_path)


def test_all_bad_source_is_an_error(tmp_path, tokenizer_path):
    write_records(tmp_path / "bad.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match="no documents"):
        _run(str(tmp_path / "bad.jsonl"), tokenizer_path, tmp_path / "out")


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_verify_names_shard_and_byte_offset(prepared, tmp_path, capsys):
    assert verify(str(prepared)) == []
    assert main(["verify", str(prepared)]) == 0
    broken = _copy(prepared, tmp_path / "broken")
    shard = ShardIndex.load(broken).shards[1]
    offset, length, _ = shard.frames[1]
    data = bytearray((broken / shard.file).read_bytes())
    data[offset + length // 2] ^= 0xFF
    (broken / shard.file).write_bytes(bytes(data))
    problems = verify(str(broken))
    assert problems == [f"{broken}/{shard.file}: corrupt bytes in frame 1, byte offset {offset}..{offset + length - 1}"]
    last = ShardIndex.load(broken).shards[-1]
    (broken / last.file).write_bytes((broken / last.file).read_bytes()[:-10])
    assert main(["verify", str(broken)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {broken}/{shard.file}: corrupt bytes in frame 1, byte offset {offset}" in out
    assert f"FAILED {broken}/{last.file}: {last.bytes - 10} bytes, the index says {last.bytes}: missing data from " \
           f"byte offset {last.bytes - 10}" in out


def test_verify_checks_the_tokenizer(prepared, tmp_path, capsys):
    other = train_sentencepiece(embedded_sample(60), str(tmp_path / "other"), 700)
    assert main(["verify", str(prepared), "--tokenizer", other]) == 1
    assert "differs from the shards' tokenizer" in capsys.readouterr().out


def test_cli_end_to_end(tmp_path, source, capsys):
    prefix = str(tmp_path / "tok")
    assert main(["train-tokenizer", "--source", source, "--vocab-size", "500", "--out", prefix]) == 0
    assert "bpe vocab 500 (pad 0, bos 2, eos 3)" in capsys.readouterr().out
    out = tmp_path / "shards"
    assert main(["prepare", "--source", source, "--tokenizer", f"{prefix}.model", "--out", str(out), "--workers",
                 "1", "--shard-tokens", "4000", "--no-progress"]) == 0
    assert "bad records skipped: 1 {'missing_field': 1}" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["command"].startswith("mor-data ") and index["source"]["settings"]["shard_tokens"] == 4000
    assert main(["inspect", str(out), "--samples", "1", "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert f"{sum(s['tokens'] for s in index['shards']):,}" in text and "sample 1" in text
    assert main(["prepare", "--source", str(tmp_path / "nothing*.jsonl"), "--tokenizer", f"{prefix}.model",
                 "--out", str(tmp_path / "x")]) == 2
    assert "nothing*.jsonl': no files match" in capsys.readouterr().err


def test_strict_prepare_stops_at_the_bad_record(tmp_path, source, tokenizer_path):
    with pytest.raises(DataError, match=r"part-0\.jsonl\.zst:8: no field 'text'"):
        _run(source, tokenizer_path, tmp_path / "strict", strict=True)
    assert not os.path.exists(tmp_path / "strict" / "index.json")


def test_bench_reports_every_figure(prepared, source, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--source", source, "--tokenizer", tokenizer_path, "--shards", str(prepared), "--workers",
                 "0,1", "--repeats", "1", "--sample-mb", "0.05", "--seq-len", "64", "--batch-size", "2", "--seconds",
                 "0.2", "--synthetic-shard-tokens", "5000", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    tok = results["tokenization"]
    assert [row["workers"] for row in tok["workers"]] == [0, 1] and all(row["mb_per_s"] > 0 for row in tok["workers"])
    assert min(tok["read_jsonl_zst_mb_per_cpu_s"], tok["library_mb_per_cpu_s"], tok["pipeline_mb_per_cpu_s"]) > 0
    count = len(ShardIndex.load(prepared).shards)
    assert [(r["shards"], r["prefetch"]) for r in results["loader"]] == [(count, 0), (count, 2), (2, 0), (2, 2)]
    assert all(r["tokens_per_s"] > 0 for r in results["loader"])
    assert "ShardLoader on one core" in capsys.readouterr().out


def test_large_vocab_shards_are_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(2, 70_000, size=50)) for _ in range(30)]
    write_records(tmp_path / "big.jsonl", fineweb_records(docs))
    index = _run(str(tmp_path / "big.jsonl"), str(tmp_path / "tokenizer.json"), tmp_path / "out", workers=1)
    assert index.dtype == "<u4" and index.vocab_size == 70_000 and index.tokenizer["kind"] == "hf"
    expected = np.concatenate([[int(w[1:]) for w in d.split()] + [0] for d in docs])
    np.testing.assert_array_equal(_all_tokens(tmp_path / "out"), expected)
    assert verify(str(tmp_path / "out")) == [] and (tmp_path / "out" / "tokenizer.json").exists()


def test_resume_after_sigkill(tmp_path, tokenizer_path):
    """A prepare killed mid-run (SIGKILL, after its first shard) continues to the bytes of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    write_records(tmp_path / "src" / "all.jsonl.zst", fineweb_records(embedded_sample(150, max_chars=3000)))
    args = ["--source", str(tmp_path / "src" / "*.jsonl.zst"), "--tokenizer", tokenizer_path, "--workers", "0",
            "--shard-tokens", "4000", "--frame-tokens", "1024", "--no-progress"]
    assert main(["prepare", *args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", "prepare", *args, "--out", str(out)])
    try:
        while not (out / "progress.json").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "index.json").exists()
    assert main(["prepare", *args, "--out", str(out)]) == 0
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "straight") and len(_shard_bytes(out)) > 10
    assert verify(str(out)) == []
