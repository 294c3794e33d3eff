"""Inference: paged KV caches (per depth for recursion-wise caching, step-0 for KV sharing), KV-cached
generation, and the continuous depth-wise batching engine."""

from mor_ds.inference.engine import Engine, EngineStats, Request
from mor_ds.inference.generate import Generation, generate
from mor_ds.inference.kv_cache import CacheLayout, KVCacheFull, PagedKVCache
from mor_ds.inference.runner import InferenceModel
from mor_ds.inference.sampling import SamplingParams, sample

__all__ = ["CacheLayout", "Engine", "EngineStats", "Generation", "InferenceModel", "KVCacheFull", "PagedKVCache",
           "Request", "SamplingParams", "generate", "sample"]
