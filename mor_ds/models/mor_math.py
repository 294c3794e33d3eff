"""The Mixture-of-Recursions math, in one place: capacity schedule, k_r, router weights g, token-choice depths,
the causal decision and the rule that combines a recursion step's output with the hidden state.

Every path calls these functions: training (mor_ds.models.routers / recursion), evaluation's causal and top-k
routing, the inference runner and the decode tick (mor_ds.inference), the FLOP planner (mor_ds.flops), the
benchmarks, and the Hugging Face export, which ships this very file beside modeling_mor.py. So it imports nothing
but torch and the standard library.

Symbols (paper): Nr recursions, step r = 0…Nr−1, capacity_r, k_r, router weight g = α·act(logit), B_r the step's
shared block(s) with their own residual connections, x the MoR stack's input (the prelude's output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# How g combines a recursion step's output B_r(h) with the hidden state h (router.combine, whose config type lists
# the choices):
#   paper  expert-choice h ← h + g·B_r(h) (H^{r+1} = g·f(H^r) + H^r; the released code scatter-adds g·B_r(h));
#          token-choice steps 0…d ungated, h^{r+1} = B_r(h^r), and the token leaves as y = x + g·B_d(h^d).
#   delta  an ablation: expert-choice h ← h + g·(B_r(h) − h); token-choice as paper but the last step
#          h + g·(B_d(h) − h), the stack input x unused.


def capacity_schedule(num_recursions: int, capacity: Sequence[float] = ()) -> list[float]:
    """capacity_r for r = 0…Nr−1: the given list, else the paper's (Nr − r)/Nr (Nr=3: 1, 2/3, 1/3)."""
    return list(capacity) or [(num_recursions - r) / num_recursions for r in range(num_recursions)]


def topk_count(capacity: float, length: int, available: int) -> int:
    """k_r = max(1, ⌊capacity_r·S⌋), at most the `available` tokens still active (hierarchical selection)."""
    return min(max(1, math.floor(capacity * length)), available)


def hierarchical_counts(capacities: Sequence[float], length: int) -> list[int]:
    """k_0…k_{Nr−1} of one sequence of S = length tokens: each step picks among the previous step's picks."""
    counts, available = [], length
    for cap in capacities:
        available = topk_count(cap, length, available)
        counts.append(available)
    return counts


def expert_choice_weight(logits: Tensor, alpha: float, activation: str = "sigmoid",
                         valid: Tensor | None = None) -> Tensor:
    """g = α·σ(logit), or α·softmax over the sequence's active tokens (dim 1; `valid` masks padded slots)."""
    if activation == "sigmoid":
        return alpha * torch.sigmoid(logits)
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return alpha * torch.softmax(logits, dim=1)


def causal_margin(decide: Tensor, threshold: Tensor) -> Tensor:
    """Expert-choice causal routing: a token continues at step r iff its decision logit exceeds τ_r, i.e. iff
    this margin is > 0. It never looks at other tokens, so the model stays causal."""
    return decide - threshold


def token_choice_route(logits: Tensor, alpha: float, activation: str = "softmax",
                       bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Token choice from the router's logits (..., Nr) on x: (probs, depth in 0…Nr−1, g = α·p(depth)).
    The depth is the top-1 of the probabilities, plus `bias` (loss-free balancing: it moves the choice only)."""
    probs = torch.softmax(logits, -1) if activation == "softmax" else torch.sigmoid(logits)
    scores = probs.detach() + bias if bias is not None else probs
    depth = scores.argmax(dim=-1)
    return probs, depth, alpha * probs.gather(-1, depth[..., None]).squeeze(-1)


def expert_choice_update(h: Tensor, out: Tensor, g: Tensor, rule: str) -> Tensor:
    """A selected token's hidden state after step r: h the step's input, out = B_r(h), g (..., 1)."""
    g = g.to(out.dtype)
    return h + g * out if rule == "paper" else h + g * (out - h)


def token_choice_exit(x: Tensor | None, h: Tensor, out: Tensor, g: Tensor, rule: str) -> Tensor:
    """A token's hidden state after its last step d: x the stack input (unused by delta), h = h^d,
    out = B_d(h^d), g (..., 1). Its earlier steps are ungated (their output is out itself)."""
    g = g.to(out.dtype)
    return x + g * out if rule == "paper" else h + g * (out - h)
