"""The tokenizer a model was trained with, found from its config (for evaluation and export)."""

from __future__ import annotations

from mor_ds.config import Config
from mor_ds.interop.errors import InteropError


def checkpoint_tokenizer(cfg: Config, override: str | None = None):
    """`override`, else cfg.data.tokenizer, else what the trainer derives for cfg.data (the embedded corpus's own
    SentencePiece model). Returns a data_pipeline.tokenizer.Tokenizer; InteropError naming the file otherwise."""
    from data_pipeline.errors import DataError
    from data_pipeline.tokenizer import load_tokenizer

    from mor_ds.config import ConfigError
    from mor_ds.distributed import DistEnv
    from mor_ds.train.data import resolve_data

    try:
        if override or cfg.data.tokenizer:
            tokenizer = load_tokenizer(override or cfg.data.tokenizer)
        else:
            _, tokenizer = resolve_data(cfg, DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                                                     master_port=0))
    except (DataError, ConfigError) as exc:
        raise InteropError(f"tokenizer: {exc} (pass --tokenizer PATH)") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise InteropError(f"tokenizer: {tokenizer.path} has {tokenizer.vocab_size} ids but model.vocab_size="
                           f"{cfg.model.vocab_size} (not the tokenizer this model was trained with?)")
    return tokenizer
