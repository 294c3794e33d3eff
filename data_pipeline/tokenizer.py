"""Tokenizers behind one small interface: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``.

Public API (used by ``mor_ds.train`` and by ``mor-data``):

* :func:`load_tokenizer` ``(path) -> Tokenizer``
* :class:`Tokenizer`: ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``, ``encode_batch``, ``decode``, ``hash``
* :func:`train_sentencepiece` trains a model on an iterable of documents.
* :func:`difference` says how two tokenizers differ (``None``: the same identity).

The tokenizer's ``hash`` (SHA-256 of the model file) and ``identity`` are written into every prepared shard index,
and the loader refuses shards made with another tokenizer. Identity is what the ids mean, not the file's bytes: the
vocabulary in id order, the EOS/BOS/pad ids and the ids of :data:`IDENTITY_PROBES` (texts that exercise the
normaliser: runs of spaces, newlines, tabs, Unicode compatibility forms, digits, bytes outside the vocabulary).
So a SentencePiece ``.model`` and the ``tokenizer.json`` transformers converts it into are the same tokenizer,
and an unrelated tokenizer with the same vocabulary size is not. The probes all start with a non-space character:
the converted tokenizer places the word-boundary prefix of a text that starts with whitespace differently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from data_pipeline.errors import DataError, VocabSizeError
from data_pipeline.files import atomic_write_bytes

# Lines longer than this (characters) are cut before SentencePiece training; it skips longer "sentences" anyway.
_TRAIN_LINE_CHARS = 4096
# Special-token names tried, in order, when a tokenizer.json has no tokenizer_config.json next to it.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")
IDENTITY_PROBES = ("The quick brown fox jumps over the lazy dog.", "Two  spaces,   three, and\ta tab.",
                   "Lines\none\n\ntwo\n", "Café Ünïcödé ﬁ ① ² Ⅻ ＡＢＣ", "Digits 0123456789 3.14159 1,000,000",
                   "Bytes 🤖 ∮ 中文 ελληνικά", "MiXeD CaSe, punctuation!? (yes) [no] {maybe} <tag>")


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """What the pipeline and the trainer need from a tokenizer.

    Attributes:
        path: the model file it was loaded from.
        kind: ``"sentencepiece"`` or ``"hf"``.
        vocab_size: number of ids (every id the model can emit is ``< vocab_size``).
        eos_id: end-of-document id; the packer puts one after every document.
        bos_id: beginning-of-sequence id (``-1`` when the model has none).
        pad_id: padding id (the EOS id when the model has no pad piece).
        hash: SHA-256 hex digest of the model file; stable across machines and loads.
    """

    kind = ""

    def __init__(self, path: str, vocab_size: int, eos_id: int, bos_id: int, pad_id: int):
        self.path = path
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.hash = file_hash(path)
        self._identity: str | None = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (the packer adds EOS)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of a list of ids (special ids decode to nothing or to their piece, as the library does)."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, for inspection."""
        raise NotImplementedError

    def set_threads(self, threads: int) -> None:
        """Threads the library may use inside one ``encode_batch`` call (worker processes set 1)."""

    def pieces(self) -> list[str]:
        return [self.id_to_piece(i) for i in range(self.vocab_size)]

    @property
    def identity(self) -> str:
        """SHA-256 of what the ids mean (see the module docstring)."""
        if self._identity is None:
            meaning = {"pieces": self.pieces(), "special": [self.eos_id, self.bos_id, self.pad_id],
                       "probes": self.encode_batch(list(IDENTITY_PROBES))}
            self._identity = hashlib.sha256(json.dumps(meaning, ensure_ascii=False).encode()).hexdigest()
        return self._identity

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "hash": self.hash, "identity": self.identity,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"{path}: the SentencePiece model has no EOS piece (train it with eos_id >= 0)")
        pad = self._sp.pad_id()
        super().__init__(path, self._sp.get_piece_size(), eos, self._sp.bos_id(), pad if pad >= 0 else eos)
        self._threads = -1  # SentencePiece's default: all cores

    def set_threads(self, threads: int) -> None:
        self._threads = threads

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=self._threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (e.g. SmolLM's 49152-token BPE used by the MoR paper).

    Special tokens come from a ``tokenizer_config.json`` next to the file (``eos_token``, ``bos_token``,
    ``pad_token``) or, without one, from the usual names (``<|endoftext|>``, ``</s>``, ...).
    """

    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        named = _configured_special_tokens(Path(path).with_name("tokenizer_config.json"))
        eos = self._special_id(named.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise DataError(f"{path}: cannot tell the EOS token (add a tokenizer_config.json with eos_token)")
        bos = self._special_id(named.get("bos_token"), _BOS_CANDIDATES)
        pad = self._special_id(named.get("pad_token"), _PAD_CANDIDATES)
        super().__init__(path, self._tok.get_vocab_size(with_added_tokens=True), eos,
                         -1 if bos is None else bos, eos if pad is None else pad)

    def _special_id(self, configured: str | None, candidates: tuple[str, ...]) -> int | None:
        for name in ((configured,) if configured else candidates):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def set_threads(self, threads: int) -> None:
        if threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""


def difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """How `b` differs from `a` in one phrase (the first difference found), or None when they have one identity."""
    if a.hash == b.hash or a.identity == b.identity:
        return None
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size} ids vs {b.vocab_size}"
    for token_id, (x, y) in enumerate(zip(a.pieces(), b.pieces())):
        if x != y:
            return f"id {token_id} is {x!r} vs {y!r}"
    for name, x, y in (("EOS", a.eos_id, b.eos_id), ("BOS", a.bos_id, b.bos_id), ("pad", a.pad_id, b.pad_id)):
        if x != y:
            return f"{name} id {x} vs {y}"
    probes = list(IDENTITY_PROBES)
    for text, x, y in zip(probes, a.encode_batch(probes), b.encode_batch(probes)):
        if x != y:
            return f"the same vocabulary, but {text!r} encodes to {x[:8]}... vs {y[:8]}..."
    return "identities differ"


def _configured_special_tokens(config_path: Path) -> dict[str, str]:
    if not config_path.exists():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{config_path}: unreadable ({e})") from None
    names = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (chosen by the file's suffix).

    Raises :class:`DataError` naming the file when it is missing or unreadable.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found")
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def _training_lines(documents: Iterable[str], sample_bytes: int, used: dict) -> Iterable[str]:
    """Non-empty lines of the documents, up to ``sample_bytes`` of text; SentencePiece trains on lines. ``used``
    counts what was read: documents, lines, UTF-8 bytes."""
    used.update(documents=0, lines=0, bytes=0)
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                used["lines"] += 1
                yield line[:_TRAIN_LINE_CHARS]
        used["documents"] += 1
        used["bytes"] += len(doc.encode("utf-8", "surrogatepass"))
        if sample_bytes and used["bytes"] >= sample_bytes:
            return


# SentencePiece's trainer flags, as `mor-data train-tokenizer` names them
_SP_FLAGS = {"vocab_size": "--vocab-size", "character_coverage": "--character-coverage",
             "input_sentence_size": "--sample-mb", "model_type": "--model-type", "byte_fallback": "--no-byte-fallback"}


def _without_location(message: str) -> str:
    """SentencePiece's error without its source location (`trainer_interface.cc(123) [cond] `)."""
    return re.sub(r"^[A-Z_]+: \S+\.cc\(\d+\) \[.*?\] ", "", message.strip())


def sentencepiece_advice(message: str) -> str:
    """SentencePiece's error without its source location, its flag names replaced by mor-data's."""
    text = _without_location(message)
    text = re.sub(r"\b(\w+) with --\1 option", r"\1", text)  # "decrease x with --x option"
    text = re.sub(r"(?<![-\w])-?-?(" + "|".join(_SP_FLAGS) + r")\b", lambda m: _SP_FLAGS[m[1]], text)
    if "Vocabulary size too high" in text:
        text += " (lower --vocab-size, or raise --sample-mb for more text)"
    return text


def train_sentencepiece(documents: Iterable[str], out_prefix: str, vocab_size: int, *, model_type: str = "bpe",
                        byte_fallback: bool = True, sample_bytes: int = 200_000_000, threads: int = 0,
                        character_coverage: float = 0.9995, used: dict | None = None) -> str:
    """Train a SentencePiece model on (a prefix of) ``documents`` and write ``{out_prefix}.model`` atomically.
    ``used`` (when given) receives the documents, lines and bytes of text the training read.

    Ids: pad=0, unk=1, bos=2, eos=3. Normalization is the identity and whitespace is kept as is, so
    ``decode(encode(text)) == text`` for any text (with byte fallback, unseen characters become byte pieces);
    ``"\\n"`` is its own piece so line structure survives. Returns the model path.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(documents, sample_bytes, used if used is not None else {})),
            model_writer=model, character_coverage=character_coverage,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], max_sentence_length=4 * _TRAIN_LINE_CHARS,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raw = str(e).splitlines()[-1]
        message = f"SentencePiece training for {out_prefix}.model failed: {sentencepiece_advice(raw)}"
        if "Vocabulary size" in raw:  # e.g. "… Vocabulary size too high (100000). Please set it to …"
            raise VocabSizeError(message, f"vocab size {vocab_size}: {_without_location(raw)}") from None
        raise DataError(message) from None
    path = f"{out_prefix}.model"
    atomic_write_bytes(path, model.getvalue())
    return path
