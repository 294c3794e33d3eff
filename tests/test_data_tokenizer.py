"""Tokenizers: SentencePiece training and exact round trip, HF tokenizer.json loading, hashes, errors."""

import hashlib
import json

import pytest

from data_pipeline.errors import DataError
from data_pipeline.testing import embedded_sample
from data_pipeline.tokenizer import load_tokenizer, train_sentencepiece

TRICKY = ["  two leading spaces", "tabs\tand\nnew\n\nlines\r\n", "unicode: café, naïve, 日本語, emoji 🎭", "",
          "trailing spaces   ", "</s> <unk> <pad> look like specials", "digits 0123456789 and ½"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(embedded_sample(60), str(tmp_path_factory.mktemp("tok") / "sp"), 600)


def test_sentencepiece_round_trip_and_ids(sp_model):
    tok = load_tokenizer(sp_model)
    assert (tok.kind, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == ("sentencepiece", 600, 0, 2, 3)
    texts = TRICKY + embedded_sample(3)
    ids = tok.encode_batch(texts)
    assert [tok.decode(x) for x in ids] == texts
    assert all(0 <= i < tok.vocab_size for x in ids for i in x)
    assert all(tok.eos_id not in x and tok.bos_id not in x for x in ids)  # text never yields control ids
    assert tok.id_to_piece(4) == "\n" and tok.encode_batch(["a\nb"])[0].count(4) == 1  # newline: its own piece


def test_hash_is_the_file_sha256_and_stable(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    with open(sp_model, "rb") as f:
        assert tok.hash == hashlib.sha256(f.read()).hexdigest()
    assert load_tokenizer(sp_model).hash == tok.hash
    again = train_sentencepiece(embedded_sample(60), str(tmp_path / "again"), 600)
    assert load_tokenizer(again).hash == tok.hash  # training is deterministic
    other = train_sentencepiece(embedded_sample(60), str(tmp_path / "other"), 700)
    assert load_tokenizer(other).hash != tok.hash


def test_training_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"tiny\.model failed: .*Vocabulary size too high"):
        train_sentencepiece(["just a few words"], str(tmp_path / "tiny"), 5000)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.model: tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a protobuf")
    with pytest.raises(DataError, match=r"junk\.model: not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(DataError, match=r"junk\.json: not a Hugging Face tokenizer\.json"):
        load_tokenizer(str(tmp_path / "junk.json"))


def _hf_tokenizer(path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(embedded_sample(40), trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json(tmp_path):
    path = _hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = load_tokenizer(path)
    assert (tok.kind, tok.eos_id, tok.bos_id, tok.pad_id) == ("hf", 0, 0, 0)  # SmolLM-style: all <|endoftext|>
    assert tok.vocab_size == 500
    ids = tok.encode_batch(TRICKY)
    assert [tok.decode(x) for x in ids] == TRICKY
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>", "pad_token": None}))
    tok = load_tokenizer(path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 2)


def test_hf_tokenizer_without_an_eos_is_refused(tmp_path):
    path = _hf_tokenizer(tmp_path / "tokenizer.json", ["<weird>"])
    with pytest.raises(DataError, match=r"tokenizer\.json: cannot tell the EOS token"):
        load_tokenizer(path)
