"""The trainer's side of data_pipeline: the data config as the run reads it, tokenizer, the train loader, held-out
validation batches, and the provenance of what was read.

  data.source=embedded  the installed demo corpus, tokenizer trained and shards prepared on first use (rank 0
                        first, the others then reuse the cache)
  data.mode=prepared    shards from `mor-data prepare` in data.prepared_dir; the last data.val_shards are held out
  data.mode=stream      documents streamed and tokenized on the fly from data.source; validation from
                        data.prepared_dir when set, else none
  data.mode=auto        (default) prepared when data.prepared_dir or data.sources is set or the source is the embedded
                        corpus, else stream
  data.sources          a weighted mixture of prepared shard directories (data_pipeline.mixture); validation
                        interleaves their held-out windows the same way; metrics log each source's tokens and epochs
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import Tensor

from mor_ds import distributed
from mor_ds.config import Config, ConfigError, with_absolute_paths


@dataclass
class TrainData:
    train: Any  # iterable of int64 (B, seq_len+1) windows with state_dict() / load_state_dict()
    make_val_batches: Callable[[], Iterable[Tensor]] | None
    tokenizer: Any  # data_pipeline.tokenizer.Tokenizer
    description: str
    # (shard directory, data_pipeline.shards.ShardInfo) of the training split's prepared shards (none streamed)
    train_shards: list[tuple[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # what the run reads (see mor_ds.provenance)


def _embedded(cfg: Config, env: distributed.DistEnv) -> tuple[str, str]:
    """Rank 0 builds the embedded corpus's tokenizer and shards first; its failure reaches every rank (the others
    would otherwise wait for it forever)."""
    from data_pipeline.embedded import ensure_embedded
    from data_pipeline.errors import DataError, VocabSizeError

    error: DataError | None = None
    if env.is_main:
        try:
            out = ensure_embedded(cfg.data.cache_dir, vocab_size=cfg.model.vocab_size)
        except DataError as exc:
            error = exc
    error = distributed.broadcast_object(error)
    if isinstance(error, VocabSizeError):  # the tokenizer is trained with model.vocab_size pieces
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the embedded corpus's tokenizer cannot have "
                          f"that many pieces ({error.reason})") from None
    if error is not None:
        raise error
    if not env.is_main:
        out = ensure_embedded(cfg.data.cache_dir, vocab_size=cfg.model.vocab_size)
    return out


def _check_vocab(cfg: Config, tokenizer: Any) -> None:
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids in {tokenizer.path})")


VOCAB_PADDING = 128  # rows a model may add beyond its tokenizer's vocabulary for matmul-friendly shapes


def unused_vocab_warning(cfg: Config, tokenizer: Any) -> str | None:
    """A warning when model.vocab_size exceeds the tokenizer's vocabulary by more than padding: the extra rows are
    never used, yet counted in the parameters and the FLOPs budget."""
    from mor_ds.flops import param_counts

    m = cfg.model
    padded = -(-tokenizer.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    if m.vocab_size <= padded:
        return None
    dead = (m.vocab_size - tokenizer.vocab_size) * m.hidden_size * (1 if m.tie_embeddings else 2)
    return (f"model.vocab_size={m.vocab_size} but the tokenizer has {tokenizer.vocab_size} ids ({tokenizer.path}): "
            f"{m.vocab_size - tokenizer.vocab_size} embedding rows are never used, {dead / 1e6:.2f}M of the model's "
            f"{param_counts(cfg).unique / 1e6:.2f}M parameters (counted in params and FLOPs); set "
            f"model.vocab_size={padded}")


def data_mode(cfg: Config) -> str:
    """`prepared` or `stream` (data.mode=auto decided)."""
    d = cfg.data
    if d.mode != "auto":
        return d.mode
    return "prepared" if d.prepared_dir or d.sources or d.source == "embedded" else "stream"


def resolve_data_config(cfg: Config, env: distributed.DistEnv) -> Config:
    """`cfg` with its data section as the run will read it, so config.yaml, checkpoints and W&B record that: absolute
    paths (`mor-ds eval` of the run works from any directory), data.mode decided, the embedded corpus built and its
    shards and tokenizer named, and in prepared mode data.source as the shards' index recorded it (the run reads the
    shards, whatever data.source said)."""
    from data_pipeline.shards import ShardIndex

    cfg = with_absolute_paths(cfg)
    d = cfg.data
    mode = data_mode(cfg)
    prepared_dir, tokenizer, source = d.prepared_dir, d.tokenizer, d.source
    if d.sources:  # a mixture: named sources, the first one's tokenizer unless one is given
        sources = [dataclasses.replace(s, name=s.name or Path(s.path).name) for s in d.sources]
        first = ShardIndex.load(sources[0].path)
        tokenizer = tokenizer or str(Path(sources[0].path) / first.tokenizer.get("file", "tokenizer.model"))
        return dataclasses.replace(cfg, data=dataclasses.replace(d, mode=mode, tokenizer=tokenizer, sources=sources,
                                                                 source="mixture"))
    if d.source == "embedded" and not (prepared_dir and tokenizer):
        embedded_shards, embedded_tokenizer = _embedded(cfg, env)
        prepared_dir, tokenizer = prepared_dir or embedded_shards, tokenizer or embedded_tokenizer
    if mode == "prepared" and prepared_dir:
        recorded = ShardIndex.load(prepared_dir).source
        files = recorded.get("files", [])
        source = files[0]["path"] if len(files) == 1 else recorded.get("spec", source)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, mode=mode, prepared_dir=prepared_dir,
                                                             tokenizer=tokenizer, source=source))


def resolve_data(cfg: Config, env: distributed.DistEnv) -> tuple[str, Any]:
    """(prepared shard dir or "", tokenizer); the embedded corpus is built on first use."""
    from data_pipeline.tokenizer import load_tokenizer

    d = resolve_data_config(cfg, env).data
    if not d.tokenizer:
        raise ConfigError(f"data.tokenizer: not set for data.source={d.source!r}; point it at the tokenizer the "
                          f"data was (or will be) tokenized with (a SentencePiece .model or tokenizer.json)")
    tokenizer = load_tokenizer(d.tokenizer)
    _check_vocab(cfg, tokenizer)
    return d.prepared_dir, tokenizer


def shard_loader(cfg: Config, env: distributed.DistEnv, shard_dir: str, tokenizer: Any, split: str) -> Any:
    """The prepared data of a run whose data section is resolved: its mixture (data.sources) or `shard_dir`."""
    from data_pipeline.loader import ShardLoader
    from data_pipeline.mixture import MixtureLoader, Source

    t, d = cfg.train, cfg.data
    if d.sources:
        return MixtureLoader([Source(s.name, s.path, s.weight) for s in d.sources], t.seq_len, t.micro_batch_size,
                             rank=env.rank, world_size=env.world_size, seed=t.seed, split=split,
                             val_shards=d.val_shards, expected_tokenizer=tokenizer)
    return ShardLoader(shard_dir, t.seq_len, t.micro_batch_size, rank=env.rank, world_size=env.world_size,
                       seed=t.seed, split=split, val_shards=d.val_shards, expected_tokenizer=tokenizer)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shards_provenance(loader: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """A prepared shard directory as a run reads it: where, which index (its SHA-256), what it was made from; for a
    mixture, one such record per source with its name and weight."""
    if hasattr(loader, "loaders"):  # a MixtureLoader
        return [{"name": source.name, "weight": float(weight), **shards_provenance(one)}
                for source, weight, one in zip(loader.sources, loader.weights, loader.loaders)]
    index = loader.index
    return {"shards": loader.shard_dir, "index_sha256": _sha256(Path(loader.shard_dir) / "index.json"),
            "source": index.source, "prepared": index.created, "command": index.command,
            "tokens": index.totals.get("tokens"), "split_windows": loader.num_windows, "seq_len": loader.seq_len}


def tokenizer_provenance(tokenizer: Any) -> dict[str, Any]:
    return {"path": tokenizer.path, "kind": tokenizer.kind, "sha256": tokenizer.hash, "identity": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size}


def build_data(cfg: Config, env: distributed.DistEnv) -> TrainData:
    """The loaders of a run (its data section resolved by `resolve_data_config`, or not yet)."""
    from data_pipeline.loader import StreamLoader

    d, t = cfg.data, cfg.train
    shard_dir, tokenizer = resolve_data(cfg, env)
    warning = unused_vocab_warning(cfg, tokenizer)
    if warning and env.is_main:
        print(f"[mor-ds] warning: {warning}", flush=True)
    mode = data_mode(cfg)  # as resolve_data_config decides it
    provenance: dict[str, Any] = {"mode": mode, "tokenizer": tokenizer_provenance(tokenizer)}
    if d.sources:
        train = shard_loader(cfg, env, shard_dir, tokenizer, "train")
        provenance["train"] = shards_provenance(train)
        description = "mixture " + ", ".join(
            f"{s.name} {w:.0%} ({one.shard_dir}, {one.num_windows * one.seq_len:,} tokens per epoch)"
            for s, w, one in zip(train.sources, train.weights, train.loaders))
    elif mode == "prepared":
        if not shard_dir:
            raise ConfigError(f"data.prepared_dir: not set for data.mode=prepared and data.source={d.source!r}; run "
                              f"`mor-data prepare` and point data.prepared_dir at its output (or use data.mode=stream)")
        train = shard_loader(cfg, env, shard_dir, tokenizer, "train")
        provenance["train"] = shards_provenance(train)
        description = (f"prepared shards {shard_dir} ({len(train.shards)} train shards, "
                       f"{train.num_windows * train.seq_len:,} tokens per epoch)")
    else:
        train = StreamLoader(d.source, tokenizer.path, t.seq_len, t.micro_batch_size, rank=env.rank,
                             world_size=env.world_size, seed=t.seed, text_field=d.text_field,
                             num_workers=d.num_workers, min_chars=d.min_chars, max_chars=d.max_chars,
                             global_batch=t.global_batch_size)
        provenance["train"] = {"stream": train.spec.describe()}
        description = f"stream {d.source}"
    make_val, val_shards = None, []
    if (shard_dir or d.sources) and d.val_shards > 0:
        def make_val() -> Iterable[Tensor]:
            return shard_loader(cfg, env, shard_dir, tokenizer, "val")

        val = make_val()
        val_shards = shard_files(val)
        provenance["val"] = shards_provenance(val)
        notes = [one.split_note for one in getattr(val, "loaders", [val]) if one.split_note]
        description += (f"; validation {val.num_batches * val.global_batch * t.seq_len:,} held-out tokens"
                        + (f" ({'; '.join(notes)})" if notes else ""))
    train_shards = shard_files(train) if mode == "prepared" else []
    check_shards(env, train_shards, val_shards)
    return TrainData(train, make_val, tokenizer, description, train_shards, provenance)


def shard_files(loader: Any) -> list[tuple[str, Any]]:
    """(shard directory, data_pipeline.shards.ShardInfo) of every shard a ShardLoader or MixtureLoader reads."""
    return [(one.shard_dir, info) for one in getattr(loader, "loaders", [loader]) for info in one.shards]


def check_shards(env: distributed.DistEnv, train_shards: list[tuple[str, Any]],
                 val_shards: list[tuple[str, Any]]) -> None:
    """Collective, at start-up: rank 0 checks the size of every shard the run will read and the SHA-256 of the
    validation shards (few, and otherwise read first at the first eval, which may be the end of the budget); the
    training shards' SHA-256 is checked in the background (callbacks.ShardAudit). A problem is a one-line
    DataError on every rank, naming the directory to verify."""
    from data_pipeline.errors import ShardError
    from data_pipeline.shards import shard_file_problem

    problems: list[tuple[str, str]] = []
    if env.is_main:
        problems = [(d, p) for d, info in train_shards if (p := shard_file_problem(d, info, full=False))]
        problems += [(d, f"validation shard {p}") for d, info in val_shards if (p := shard_file_problem(d, info))]
    problems = distributed.broadcast_object(problems)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        shard_dir, first = problems[0]
        raise ShardError(f"{first}{more}; run `mor-data verify {shard_dir}`")
