"""KV-cached generation for a fixed batch of prompts: one batched prefill, then one token per sequence
per step (every sequence runs its full depth each step). Simple and synchronous; the serving path with
continuous depth-wise batching is `mor_ds.inference.engine.Engine`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mor_ds.inference.runner import InferenceModel
from mor_ds.inference.sampling import SamplingParams, sample
from mor_ds.models.model import CausalLM


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (stop token included)
    logits: list[list[Tensor]] = field(default_factory=list)  # per prompt, per generated token (V,), if asked
    depth_counts: list[int] = field(default_factory=list)  # MoR: tokens by number of recursion steps run


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, *,
             sampling: SamplingParams = SamplingParams(), stop_token: int | None = None, seed: int = 0,
             page_size: int = 16, decode_backend: str = "auto", return_logits: bool = False) -> Generation:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    im = InferenceModel(model, decode_backend)
    dev, n = im.device, len(prompts)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    pages = im.layout.num_groups * n * -(-max_len // page_size) + 1
    cache = im.new_cache(max_slots=n, max_len=max_len, num_pages=pages, page_size=page_size)
    generator = torch.Generator(device=dev).manual_seed(seed)
    temperature = torch.full((n,), sampling.temperature, device=dev)
    top_p = torch.full((n,), sampling.top_p, device=dev)
    stats: dict = {}

    tokens = torch.tensor([t for p in prompts for t in p], device=dev)
    slots = np.array([i for i, p in enumerate(prompts) for _ in p])
    pos = torch.tensor([j for p in prompts for j in range(len(p))], device=dev)
    hidden = im.forward(cache, tokens, slots, pos, stats=stats)
    logits = im.logits(hidden[torch.tensor(np.cumsum([len(p) for p in prompts]) - 1, device=dev)])

    out = Generation([[] for _ in prompts], [[] for _ in prompts] if return_logits else [])
    active = list(range(n))
    while True:
        chosen = sample(logits, temperature[active], top_p[active], generator, all_greedy=sampling.greedy).tolist()
        still = []
        for row, (i, tok) in enumerate(zip(active, chosen)):
            out.tokens[i].append(tok)
            if return_logits:
                out.logits[i].append(logits[row].cpu())
            if len(out.tokens[i]) < max_new_tokens and tok != stop_token:
                still.append(i)
        active = still
        if not active:
            break
        tokens = torch.tensor([out.tokens[i][-1] for i in active], device=dev)
        pos = torch.tensor([len(prompts[i]) + len(out.tokens[i]) - 1 for i in active], device=dev)
        hidden = im.forward(cache, tokens, np.array(active), pos, stats=stats)
        logits = im.logits(hidden)
    if "depth" in stats:
        out.depth_counts = stats["depth"].tolist()
    return out
