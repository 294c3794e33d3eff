"""The causal language model shared by all three families: embedding → prelude → recursion → coda → head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor, nn

from mor_ds.choices import ModelFamily, RoutingMode, SharingStrategy
from mor_ds.config import ModelConfig, RouterConfig
from mor_ds.models.block import DecoderBlock, RMSNorm
from mor_ds.models.loss import LMHead
from mor_ds.models.recursion import ExpertChoiceMoR, SequenceContext, TokenChoiceMoR, build_recursion
from mor_ds.models.sharing import layer_plan

@dataclass
class ModelOutput:
    loss: Tensor | None  # LM cross-entropy (mean over labels != -100) when labels are given
    logits: Tensor | None  # (B, S, V) when no labels are given
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # router losses, coefficients applied
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for logging

    @property
    def total_loss(self) -> Tensor:
        return self.loss + sum(self.aux_losses.values()) if self.aux_losses else self.loss


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.router_cfg = router_cfg or RouterConfig()
        recursive = cfg.family != ModelFamily.VANILLA
        num_recursions = cfg.num_recursions if recursive else 1
        self.plan = layer_plan(cfg.num_layers, num_recursions, cfg.sharing if recursive else SharingStrategy.CYCLE)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(self.plan.num_unique_layers))
        self.recursion = build_recursion(cfg, self.router_cfg, self.plan)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.fused_loss, cfg.loss_chunk_size)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *, doc_ids: Tensor | None = None,
                routing: RoutingMode | None = None) -> ModelOutput:
        routing = routing or (RoutingMode.TOPK if self.training else RoutingMode.CAUSAL)
        h = self.embed(input_ids)
        ctx = SequenceContext(self.cfg, *input_ids.shape, input_ids.device, h.dtype, doc_ids)
        for layer_id in self.plan.prelude:
            h, _ = self.layers[layer_id](h, ctx.full)
        h, aux_losses, stats = self.recursion(h, ctx, self.layers, routing)
        for layer_id in self.plan.coda:
            h, _ = self.layers[layer_id](h, ctx.full)
        h = self.norm(h)
        if labels is None:
            return ModelOutput(None, self.lm_head(h), aux_losses, stats)
        return ModelOutput(self.lm_head(h, labels), None, aux_losses, stats)  # never (B, S, V) logits when fused

    def update_router_state(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """The routers' running state, moved once per optimizer step (call after every applied one; `all_reduce`
        sums over data-parallel ranks so every rank moves it alike): token-choice's loss-free balancing bias and
        expert-choice's calibrated causal thresholds τ_r (EMA of where training's top-k cut); no-op otherwise."""
        if (isinstance(self.recursion, TokenChoiceMoR) and self.router_cfg.balancing == "loss_free"
                or isinstance(self.recursion, ExpertChoiceMoR) and self.router_cfg.causal_threshold == "calibrated"):
            self.recursion.update_router_state(all_reduce)

    def num_params(self, unique: bool = True, embedding: bool = True) -> int:
        """Parameters of the model (unique=True) or of the vanilla model it unrolls to (unique=False)."""
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]
        layer_total = sum(per_layer) if unique else sum(per_layer[i] for i, _ in self.plan.unrolled)
        embed = self.embed.weight.numel() * (1 if self.cfg.tie_embeddings else 2)
        other = sum(p.numel() for p in self.parameters()) - sum(per_layer) - embed
        return layer_total + other + (embed if embedding else 0)


def build_model(cfg: ModelConfig, router_cfg: RouterConfig | None = None) -> CausalLM:
    return CausalLM(cfg, router_cfg)
