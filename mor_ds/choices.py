"""The enumerated choices of a model, each defined once.

Each is a `StrEnum`: the type of its config field (`mor_ds.config` checks values against it and names the key), the
key of the registry that implements it, and the list that preset names, the sweep grid and CLI choices are built
from. Members equal their strings (`cfg.model.family == "mor"`), so YAML, JSON and saved configs hold plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """A StrEnum whose repr is its string's, so messages read `model.family='mor'` whether a value came from a
    config or a caller's string."""

    def __repr__(self) -> str:
        return repr(self.value)


class ModelFamily(Choice):
    VANILLA = "vanilla"  # L unique layers
    RECURSIVE = "recursive"  # shared layers applied Nr times, every token at every depth
    MOR = "mor"  # recursive, with a router choosing each token's depth


class SharingStrategy(Choice):
    """Which shared layer runs at each unrolled position (mor_ds.models.sharing)."""

    CYCLE = "cycle"
    SEQUENCE = "sequence"
    MIDDLE_CYCLE = "middle_cycle"
    MIDDLE_SEQUENCE = "middle_sequence"


class KVMode(Choice):
    CACHE = "cache"  # recursion-wise KV caching: each step attends to the keys of the tokens it runs
    SHARE = "share"  # recursive KV sharing: every step reuses the first recursion's keys and values


class RouterType(Choice):
    EXPERT_CHOICE = "expert_choice"  # each recursion step picks its top-k tokens
    TOKEN_CHOICE = "token_choice"  # each token picks its depth once


class RoutingMode(Choice):
    """How a MoR forward selects tokens (`model(…, routing=…)`)."""

    CAUSAL = "causal"  # inference / eval: each token decides from its own router score
    TOPK = "topk"  # training: expert choice's top-k over the whole sequence


class AttentionBackend(Choice):
    """`model.attention_backend`; AUTO resolves per device (mor_ds.attention.resolve_backend)."""

    AUTO = "auto"
    REFERENCE = "reference"
    SDPA = "sdpa"
    TRITON = "triton"


__all__ = ["AttentionBackend", "Choice", "KVMode", "ModelFamily", "RouterType", "RoutingMode", "SharingStrategy"]
