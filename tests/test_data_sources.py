"""Sources: --source parsing, real `datasets` streaming of local files, bad records, rank sharding, resume."""

import gzip
import json

import pytest
import zstandard

from data_pipeline.errors import DataError
from data_pipeline.sources import DocumentStream, parse_source
from data_pipeline.testing import embedded_sample, encode_jsonl, fineweb_records, write_records

DOCS = embedded_sample(24, max_chars=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 24 documents as 4 files of each format."""
    root = tmp_path_factory.mktemp("corpus")
    records = fineweb_records(DOCS)
    for suffix in ("jsonl", "jsonl.zst", "jsonl.gz", "parquet"):
        for part in range(4):
            write_records(root / suffix.replace(".", "_") / f"part-{part}.{suffix}", records[part * 6:(part + 1) * 6])
    return root


def test_parse_source():
    assert parse_source("embedded").kind == "embedded"
    hub = parse_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train")
    assert (hub.kind, hub.name, hub.config, hub.split) == ("hub", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    hub = parse_source("hf:allenai/c4@validation")
    assert (hub.name, hub.config, hub.split) == ("allenai/c4", None, "validation")
    assert parse_source("hf:roneneldan/TinyStories").split == "train"
    with pytest.raises(DataError, match="expected hf:NAME"):
        parse_source("hf:@train")


def test_parse_local_paths(corpus, tmp_path):
    spec = parse_source(str(corpus / "jsonl_zst" / "*.jsonl.zst"))
    assert [p.rsplit("/", 1)[1] for p in spec.files] == [f"part-{i}.jsonl.zst" for i in range(4)]
    assert len(parse_source(str(corpus)).files) == 16  # a directory: every supported file under it
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        parse_source(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="no files match"):
        parse_source(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        parse_source(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl_zst", "jsonl_gz", "parquet"])
def test_stream_local_files_in_order(corpus, fmt):
    stream = DocumentStream(str(corpus / fmt / "*"))
    assert list(stream) == DOCS
    assert stream.bad.total == 0
    assert list(stream) == DOCS  # the next epoch is the same pass again


def test_txt_paragraphs_and_text_field(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first para\nline two\n\n\nbad \xff para\n\nthird para\n")
    stream = DocumentStream(str(tmp_path / "a.txt"))
    assert list(stream) == ["first para\nline two", "third para"]
    assert stream.bad.examples == [f"{tmp_path}/a.txt:5: invalid UTF-8 at byte 4 of line 5"]
    write_records(tmp_path / "c.jsonl", [{"content": "x" * 5}, {"content": "y" * 50}, {"content": "z" * 500}])
    stream = DocumentStream(str(tmp_path / "c.jsonl"), text_field="content", min_chars=10, max_chars=100)
    assert list(stream) == ["y" * 50]
    assert stream.filtered == {"shorter_than_min_chars": 1, "longer_than_max_chars": 1}


def _bad_jsonl(path):
    good = [json.dumps({"text": t}).encode() for t in ("alpha", "beta", "gamma", "delta")]
    lines = [good[0], b'{"text": "caf\xe9 latin-1"}', b'{"text": "unterminated', good[1],
             json.dumps({"body": "no text field"}).encode(), json.dumps({"text": 7}).encode(),
             json.dumps({"text": "   "}).encode(), b"[1, 2]", good[2], good[3]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return ["alpha", "beta", "gamma", "delta"]


def test_bad_records_are_counted_named_and_skipped(tmp_path):
    expected = _bad_jsonl(tmp_path / "bad.jsonl")
    stream = DocumentStream(str(tmp_path / "bad.jsonl"))
    assert list(stream) == expected
    assert stream.bad.counts == {"bad_utf8": 1, "malformed": 2, "missing_field": 2, "empty": 1}
    path = tmp_path / "bad.jsonl"
    assert stream.bad.examples[:3] == [f"{path}:2: invalid UTF-8 at byte 13 of the line",
                                       f"{path}:3: malformed JSON (Unterminated string starting at: line 1 column 10 "
                                       f"(char 9))", f"{path}:5: no field 'text'"]
    assert f"{path}:6: field 'text' is int, not a string" in stream.bad.examples
    assert f"{path}:7: empty document" in stream.bad.examples


def test_strict_makes_the_first_bad_record_fatal(tmp_path):
    _bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid UTF-8 .*--strict"):
        list(DocumentStream(str(tmp_path / "bad.jsonl"), strict=True))


@pytest.mark.parametrize("suffix", ["jsonl.zst", "jsonl.gz"])
def test_truncated_compressed_file_keeps_complete_records(tmp_path, suffix):
    records = fineweb_records(embedded_sample(200))
    data = encode_jsonl(records)
    packed = zstandard.ZstdCompressor().compress(data) if suffix.endswith("zst") else gzip.compress(data)
    (tmp_path / f"cut.{suffix}").write_bytes(packed[:len(packed) // 2])
    write_records(tmp_path / f"next.{suffix}", [{"text": "after the cut file"}])
    stream = DocumentStream(str(tmp_path / f"*.{suffix}"))
    docs = list(stream)
    assert 0 < len(docs) - 1 < 200 and docs[-1] == "after the cut file"
    assert docs[:-1] == [r["text"] for r in records[:len(docs) - 1]]  # every complete record before the cut
    assert stream.bad.counts == {"truncated": 1}
    assert stream.bad.examples[0].startswith(f"{tmp_path}/cut.{suffix}: ")
    assert f"records after line {len(docs) - 1} are lost" in stream.bad.examples[0]
    with pytest.raises(DataError, match=rf"cut\.{suffix.replace('.', '.')}: .*stream ends"):
        list(DocumentStream(str(tmp_path / f"*.{suffix}"), strict=True))


@pytest.mark.parametrize("suffix", ["jsonl.gz", "jsonl.zst"])
def test_corrupt_compressed_file_is_dropped_whole_before_any_record_counts(tmp_path, suffix):
    """gzip checks its CRC only at the end of the file (zstd at the end of a frame): the records decoded from a
    flipped bit must not be used before that check disowns them."""
    records = fineweb_records(embedded_sample(400))
    data = encode_jsonl(records)
    packed = bytearray(gzip.compress(data) if suffix == "jsonl.gz" else
                       zstandard.ZstdCompressor(write_checksum=True).compress(data))
    for offset in range(len(packed) // 3, len(packed) - 64, 997):  # flip bits until the decoded text differs
        packed[offset] ^= 0x04
        try:
            decoded = gzip.decompress(packed) if suffix == "jsonl.gz" else zstandard.ZstdDecompressor().decompress(
                packed)
            assert decoded != data
        except (OSError, zstandard.ZstdError):
            break
    (tmp_path / f"a.{suffix}").write_bytes(bytes(packed))
    write_records(tmp_path / f"b.{suffix}", [{"text": "the next file"}])
    stream = DocumentStream(str(tmp_path / f"*.{suffix}"))
    assert list(stream) == ["the next file"]  # nothing of the corrupt file, the next file intact
    assert stream.bad.counts == {"corrupt": 1}
    kind = "gzip" if suffix == "jsonl.gz" else "zstd"
    assert stream.bad.examples[0].startswith(f"{tmp_path}/a.{suffix}: corrupt {kind} data (")
    assert stream.bad.examples[0].endswith("): every record of the file is skipped")
    with pytest.raises(DataError, match=rf"a\.{suffix.replace('.', '.')}: corrupt {kind} data"):
        list(DocumentStream(str(tmp_path / f"*.{suffix}"), strict=True))


def test_parquet_without_the_text_column(tmp_path):
    write_records(tmp_path / "a.parquet", [{"content": "x"}])
    stream = DocumentStream(str(tmp_path / "a.parquet"))
    assert list(stream) == []
    assert stream.bad.examples == [f"{tmp_path}/a.parquet: no column 'text' (columns: ['content'])"]


@pytest.mark.parametrize("world_size", [2, 3])  # 4 files: whole files per rank (2), every 3rd record (3)
def test_rank_sharding_is_disjoint_and_covering(corpus, world_size):
    per_rank = [list(DocumentStream(str(corpus / "jsonl_zst" / "*"), rank=r, world_size=world_size))
                for r in range(world_size)]
    assert all(per_rank)
    assert sorted(d for docs in per_rank for d in docs) == sorted(DOCS)  # covering, and disjoint (no duplicates)


@pytest.mark.parametrize("fmt,world_size", [("jsonl_gz", 1), ("parquet", 2), ("jsonl_zst", 3)])
def test_state_dict_resumes_after_the_last_document(corpus, fmt, world_size):
    stream = DocumentStream(str(corpus / fmt / "*"), rank=world_size - 1, world_size=world_size)
    docs = iter(stream)
    head = [next(docs) for _ in range(4)]
    state = stream.state_dict()
    rest = list(docs)
    resumed = DocumentStream(str(corpus / fmt / "*"), rank=world_size - 1, world_size=world_size)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and head
    assert resumed.epoch == 1 and len(list(resumed)) == len(head) + len(rest)  # later epochs start from the top


def test_hub_path_through_load_dataset(corpus, tmp_path):
    """`hf:` goes through datasets.load_dataset(..., streaming=True); a local dataset dir stands in for the hub."""
    write_records(tmp_path / "ds" / "train.jsonl", fineweb_records(DOCS[:5]) + [{"text": "", "id": "x"}])
    stream = DocumentStream(f"hf:{tmp_path / 'ds'}@train")
    assert list(stream) == DOCS[:5]
    assert stream.bad.examples == [f"hf:{tmp_path / 'ds'}@train (rank 0/1) record 6: empty document"]
