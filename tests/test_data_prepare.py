"""prepare: exact packing, worker-count independence, crash resume, index contents, verify, the CLI."""

import json
import os

import numpy as np
import pytest

from data_pipeline.cli import main
from data_pipeline.errors import DataError
from data_pipeline.inspection import verify
from data_pipeline.prepare import merge_parts, prepare
from data_pipeline.shards import ShardIndex, read_shard, token_dtype
from data_pipeline.sources import DocumentStream
from data_pipeline.testing import embedded_sample, fineweb_records, write_records
from data_pipeline.tokenizer import file_hash, load_tokenizer, train_sentencepiece

DOCS = embedded_sample(40, max_chars=1500)
SHARD_TOKENS = 3000
FRAME_TOKENS = 1000


def split_corpus(root, bad_at: int, sizes: list[int]) -> str:
    """DOCS as FineWeb records with one text-less record at `bad_at`, in files part-K.jsonl.zst of `sizes` records;
    the glob of them."""
    records = fineweb_records(DOCS)
    records.insert(bad_at, {"id": "no text"})
    start = 0
    for part, size in enumerate(sizes):
        write_records(root / f"part-{part}.jsonl.zst", records[start:start + size])
        start += size
    return str(root / "*.jsonl.zst")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return split_corpus(tmp_path_factory.mktemp("src"), 7, [21, 21])


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


def test_resume_over_changed_sources_is_refused_naming_the_files(tmp_path, tokenizer_path):
    """Between an interruption and the re-run, a consumed file rewritten, a file added or one removed would make
    the resumed stream skip or repeat documents: the re-run is refused naming each file; restored files resume."""
    src = tmp_path / "src"
    records = fineweb_records(DOCS)
    for part in range(3):
        write_records(src / f"part-{part}.jsonl", records[part * 13:(part + 1) * 13])
    _run(str(src / "*.jsonl"), tokenizer_path, tmp_path / "straight")
    out = tmp_path / "out"
    assert _run(str(src / "*.jsonl"), tokenizer_path, out, max_shards=1) is None
    original = (src / "part-0.jsonl").read_bytes()
    write_records(src / "part-0.jsonl", records[13:26])  # a consumed file rewritten (other documents)
    write_records(src / "part-3.jsonl", records[:2])  # a new file
    (src / "part-2.jsonl").rename(tmp_path / "part-2.jsonl")  # a file gone
    with pytest.raises(DataError) as err:
        _run(str(src / "*.jsonl"), tokenizer_path, out)
    assert str(err.value).startswith(f"{out}/progress.json: the source changed since this prepare began "
                                     f"({src}/part-2.jsonl: removed; {src}/part-3.jsonl: added; {src}/part-0.jsonl: "
                                     f"rewritten (")
    assert str(err.value).endswith("resuming would duplicate or drop documents: restore the files, or prepare "
                                   "into a new --out")
    (src / "part-3.jsonl").unlink()
    (tmp_path / "part-2.jsonl").rename(src / "part-2.jsonl")
    (src / "part-0.jsonl").write_bytes(original[:-1] + b" ")  # same size, one byte other: found by content
    with pytest.raises(DataError, match=r"part-0\.jsonl: rewritten \(same size, other content\)\); resuming"):
        _run(str(src / "*.jsonl"), tokenizer_path, out)
    (src / "part-0.jsonl").write_bytes(original)  # restored: a new modification time, the same content
    index = _run(str(src / "*.jsonl"), tokenizer_path, out)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "straight")
    assert [f["path"] for f in index.source["files"]] == [str(src / f"part-{i}.jsonl") for i in range(3)]
    assert index.source["files"][0]["bytes"] == len(original) and len(index.source["files"][0]["xxh3_128"]) == 32


def test_source_deleted_during_prepare_is_a_one_line_error(tmp_path, tokenizer_path):
    """A file removed while prepare runs (here: before it is opened) must not end in exit 0 with its documents
    silently missing, nor in a traceback: one line names it, and the restored file lets the same command finish."""
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    write_records(src / "a.jsonl", fineweb_records(embedded_sample(150, max_chars=3000) * 6))
    write_records(src / "b.jsonl", fineweb_records(DOCS))
    args = ["prepare", "--source", str(src / "*.jsonl"), "--tokenizer", tokenizer_path, "--workers", "0",
            "--shard-tokens", "4000", "--no-progress", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", *args], stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "out" / "progress.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    kept = (src / "b.jsonl").read_bytes()
    (src / "b.jsonl").unlink()
    assert proc.poll() is None, "prepare finished before the file was deleted"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        f"mor-data prepare: error: --source {src}/*.jsonl: changed while prepare read it ({src}/b.jsonl: removed); "
        f"the shards would mix old and new contents or miss documents: restore the files and run the same command "
        f"again (it resumes from {tmp_path}/out/progress.json), or prepare into a new --out")
    assert not (tmp_path / "out" / "index.json").exists()
    (src / "b.jsonl").write_bytes(kept)
    assert main(args) == 0 and verify(str(tmp_path / "out")) == []


def test_bad_counts_are_refused(tmp_path, source, tokenizer_path, capsys):
    assert main(["prepare", "--source", source, "--tokenizer", tokenizer_path, "--out", str(tmp_path),
                 "--workers", "-1"]) == 2
    assert capsys.readouterr().err == "mor-data prepare: error: --workers -1: must be >= 0\n"
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataError, match=r"^--max-shards -2: must be >= 0$"):
        _run(source, tokenizer_path, tmp_path, max_shards=-2)
    with pytest.raises(DataError, match=r"^min_chars=-1, max_chars=0: must be >= 0"):
        _run(source, tokenizer_path, tmp_path, min_chars=-1)


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


@pytest.mark.parametrize("dtype", ["<f4", "<u4", "banana", 7])
def test_verify_refuses_an_index_with_an_edited_dtype(prepared, tmp_path, capsys, dtype):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(prepared, edited)
    index = json.loads((edited / "index.json").read_text())
    (edited / "index.json").write_text(json.dumps({**index, "dtype": dtype}))
    assert main(["verify", str(edited)]) == 1
    assert capsys.readouterr().out == (f"FAILED {edited}/index.json: not a valid shard index (dtype {dtype!r} does "
                                       f"not fit vocab_size 600 (prepare writes '<u2': uint16 up to 65536 ids, "
                                       f"uint32 above))\n")


def test_verify_checks_the_tokenizer(prepared, tmp_path, capsys):
    other = train_sentencepiece(embedded_sample(60), str(tmp_path / "other"), 700)
    assert main(["verify", str(prepared), "--tokenizer", other]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {prepared}/index.json: shards were made with tokenizer" in out and ": 600 ids vs 700; " in out


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
    assert [(r["loader"], r["shards"], r["prefetch"]) for r in results["loader"]] == [
        ("ShardLoader", count, 0), ("ShardLoader", count, 2), ("ShardLoader", 2, 0), ("ShardLoader", 2, 2),
        ("MixtureLoader", count + 2, 0), ("MixtureLoader", count + 2, 2)]
    assert all(r["tokens_per_s"] > 0 for r in results["loader"])
    assert "ShardLoader and MixtureLoader on one core" in capsys.readouterr().out


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


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for a reaper that a container may lack)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_tokenizer_workers_die_with_a_killed_prepare(tmp_path, tokenizer_path):
    """kill -9 of `mor-data prepare` must not leave its tokenizer worker processes behind."""
    import signal
    import subprocess
    import sys
    import time

    write_records(tmp_path / "src.jsonl", fineweb_records(embedded_sample(150, max_chars=3000) * 4))
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", "prepare", "--source",
                             str(tmp_path / "src.jsonl"), "--tokenizer", tokenizer_path, "--workers", "2",
                             "--shard-tokens", "4000", "--no-progress", "--out", str(tmp_path / "out")])
    workers: list[int] = []
    try:
        while not (tmp_path / "out" / "progress.json").exists() and proc.poll() is None:
            time.sleep(0.01)  # a shard is written: the workers are up and tokenizing
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                workers += [int(pid) for pid in f.read().split()]
        assert len(workers) >= 2  # the pool's workers (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if _running(pid)] == [], "tokenizer workers outlived their parent"
    finally:
        proc.kill()
        proc.wait()
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ many hosts


@pytest.fixture(scope="module")
def five_files(tmp_path_factory):
    """Five files (one with a bad record), so three parts hold 2, 2 and 1 of them."""
    return split_corpus(tmp_path_factory.mktemp("five"), 19, [9, 9, 9, 9, 5])


def test_prepare_in_parts_then_merge_equals_one_host_token_for_token(five_files, tokenizer_path, tmp_path, capsys):
    one_host = _run(five_files, tokenizer_path, tmp_path / "one", shard_tokens=1000, frame_tokens=300)
    out = tmp_path / "many"
    for k in range(3):  # each part as its own host would run it; part 1 through the CLI
        if k == 1:
            assert main(["prepare", "--source", five_files, "--tokenizer", tokenizer_path, "--out", str(out),
                         "--part", "1/3", "--workers", "0", "--shard-tokens", "1000", "--frame-tokens", "300",
                         "--no-progress"]) == 0
            assert f"once all 3 parts are done: mor-data merge {out}" in capsys.readouterr().out
        else:
            _run(five_files, tokenizer_path, out, shard_tokens=1000, frame_tokens=300, part=(k, 3))
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert parts == ["0-of-3", "1-of-3", "2-of-3"]
    part_docs = [ShardIndex.load(out / "parts" / p).totals["docs"] for p in parts]
    assert sum(part_docs) == one_host.totals["docs"] and all(part_docs)  # disjoint, none empty
    assert main(["merge", str(out)]) == 0
    assert "(merged from 3 parts, verified)" in capsys.readouterr().out
    merged = ShardIndex.load(out)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "one")  # the same shard files, byte for byte
    assert merged.shards == one_host.shards and len(merged.shards) > 3
    assert merged.totals == one_host.totals and merged.totals["bad_records"] == {"missing_field": 1}
    assert merged.source["settings"] == one_host.source["settings"] and merged.source["parts"] == 3
    assert merged.source["files"] == one_host.source["files"]  # each file's identity, as one host recorded it
    assert verify(str(out)) == [] and not (out / "parts").exists()
    assert merge_parts(str(out)).shards == merged.shards  # a re-run changes nothing
    assert prepare(five_files, tokenizer_path, str(out), part=(2, 3), shard_tokens=1000, frame_tokens=300,
                   show_progress=False).shards == merged.shards  # nor does a re-run task


def test_merge_names_the_part_that_is_missing_or_different(five_files, tokenizer_path, tmp_path):
    out = tmp_path / "out"
    for k in (0, 2):
        _run(five_files, tokenizer_path, out, shard_tokens=1000, part=(k, 3))
    with pytest.raises(DataError, match=r"parts/1-of-3: part 1 of 3 is not finished \(no index.json\)"):
        merge_parts(str(out))
    _run(five_files, tokenizer_path, out, shard_tokens=2000, part=(1, 3))
    with pytest.raises(DataError, match="parts/1-of-3: made with shard_tokens=2000, part 0 with 1000"):
        merge_parts(str(out))
    with pytest.raises(DataError, match=r"--part 0/6: the source has 5 file\(s\)"):
        _run(five_files, tokenizer_path, tmp_path / "six", part=(0, 6))


def test_a_part_reports_progress_through_its_own_files(five_files):
    """Parts of 2, 2 and 1 files: each one's progress runs from 0 to the bytes of its own files."""
    import glob

    sizes = [os.path.getsize(p) for p in sorted(glob.glob(five_files))]
    for k, files in enumerate([sizes[:2], sizes[2:4], sizes[4:]]):
        stream = DocumentStream(five_files, part=(k, 3))
        assert stream.source_bytes == sum(files)
        for _ in stream:
            assert 0 <= stream.bytes_read <= stream.source_bytes
        assert stream.bytes_read == sum(files)


def test_progress_outside_a_terminal_is_a_full_line_per_interval(tmp_path, tokenizer_path):
    """A batch job's log (stderr not a terminal): whole progress lines with rates, shards, the share of the source
    read and an ETA, then a final one; not one truncated line at the end."""
    import re
    import subprocess
    import sys

    # ~1 MB of text in four files: four tasks of 256 kB, a line after each
    docs = fineweb_records(embedded_sample(400, max_chars=3000))
    for part in range(4):
        write_records(tmp_path / "src" / f"part-{part}.jsonl.zst", docs[part * 100:(part + 1) * 100])
    source = str(tmp_path / "src" / "*.jsonl.zst")
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "prepare", "--source", source, "--tokenizer",
                           tokenizer_path, "--workers", "0", "--shard-tokens", "40000", "--out", str(tmp_path / "out"),
                           "--progress-interval", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    line = re.compile(rf"^prepare {re.escape(source)}: [\d,]+ docs [\d,]+ docs/s \| [\d.]+ MB/s \| [\d,]+ tokens "
                      rf"[\d,]+ tokens/s \| \d+ shards \| [\d.]+% of [\d.]+ MB(, ETA \d+:\d\d:\d\d)?")
    assert len(lines) > 3 and all(line.match(x) for x in lines), lines
    assert any(", ETA " in x for x in lines[1:-1])
    shards = len(json.loads((tmp_path / "out" / "index.json").read_text())["shards"])
    assert f"| {shards} shards | 100.0% of " in lines[-1] and lines[-1].endswith(" elapsed")


def test_library_warnings_are_printed_once():
    """huggingface_hub's retry warnings (its own handler and the root's) appear once, as a mor-data line."""
    import subprocess
    import sys

    code = ("from data_pipeline.cli import configure_logging; configure_logging(); "
            "from huggingface_hub.utils import logging; "
            "logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.splitlines() == ["mor-data: Retrying in 1s [Retry 1/5]."]


def test_verify_and_inspect_treat_a_missing_index_alike(tmp_path, capsys):
    for command in ("verify", "inspect"):
        assert main([command, str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip() == (f"mor-data {command}: error: {tmp_path}/index.json: no shard "
                                                   f"index; make one with `mor-data prepare`")


def test_train_tokenizer_says_how_much_text_it_used_and_advises_in_our_flags(tmp_path, source, capsys):
    assert main(["train-tokenizer", "--source", source, "--vocab-size", "400", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    docs = sum(1 for _ in DocumentStream(source))
    assert f"; trained on 0.1 MB of text ({docs} documents, " in out and "lines, the whole source)" in out
    assert main(["train-tokenizer", "--source", source, "--vocab-size", "40", "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mor-data train-tokenizer: error: SentencePiece training for {tmp_path}/u.model failed: "
                          f"Vocabulary size is smaller than required_chars. 40 vs ")
    assert err.endswith("Increase --vocab-size or decrease --character-coverage.")
