"""Next-token choice: greedy, temperature, nucleus (top-p); per-row parameters so one batch can mix them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: Tensor, temperature: Tensor, top_p: Tensor, generator: torch.Generator | None = None,
           all_greedy: bool = False) -> Tensor:
    """logits (N, V); temperature, top_p (N,) -> token ids (N,). Rows with temperature 0 take the argmax."""
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    probs = torch.softmax(logits.float() / temperature.clamp_min(1e-5)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token when the tokens before it already reach top_p (the first token always stays)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)
