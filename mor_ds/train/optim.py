"""AdamW with decoupled weight-decay groups.

Decision: weight decay applies to every parameter with >= 2 dimensions (attention/MLP matrices, router
projections and the token embedding, which is tied to the LM head) and not to 1-D parameters (RMSNorm gains,
biases). This is the recipe of the paper's Hugging Face Trainer runs (no decay on biases and norm weights
only), so compute-matched comparisons with it stay like for like. Non-trainable buffers (e.g. the token-choice
loss-free balancing bias) are not optimizer state at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mor_ds.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused kernel on CUDA; never DeepSpeed's JIT FusedAdam, which compiles for ~45 s on CPU)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=device.type == "cuda")
