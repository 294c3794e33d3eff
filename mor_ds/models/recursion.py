"""The part of the model between prelude and coda: plain layer stacks (vanilla, recursive) and MoR's
routed recursion steps.

Recursive / vanilla: every unrolled position of the plan runs on all tokens.
MoR: at step r the shared block B_r = plan.block(r) runs only on the step's active tokens, gathered into a
compact (B, K, d) tensor; the router weight g combines its output with the hidden state (router.combine, formulas
in mor_ds.models.mor_math: paper expert-choice h ← h + g·B_r(h); token-choice ungated steps, leaving as
x + g·B_d(h^d)) and the result is scattered back; inactive tokens pass through unchanged.
KV: "cache" — attention at step r among the step's active tokens (causal by original position);
"share" — at r ≥ 1 active queries attend to the K/V that the same layer computed at step 0.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor, nn

from mor_ds.attention import PAD_POS
from mor_ds.choices import ModelFamily, RouterType, RoutingMode
from mor_ds.config import ModelConfig, RouterConfig
from mor_ds.models.block import KV, TokenView, rope_cos_sin
from mor_ds.models.mor_math import expert_choice_update, token_choice_exit
from mor_ds.models.routers import ActiveSet, ExpertChoiceRouter, Selection, TokenChoiceRouter, compact, masked_mean
from mor_ds.models.sharing import LayerPlan


class SequenceContext:
    """Positions and document ids of the full sequence, and views of token subsets for the blocks."""

    def __init__(self, cfg: ModelConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype,
                 doc_ids: Tensor | None):
        self.cfg, self.dtype = cfg, dtype
        arange = torch.arange(length, device=device)
        if doc_ids is not None and cfg.document_mask:
            # position within the document: index minus the index where the document started
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            self.pos, self.doc = arange - torch.where(starts, arange, 0).cummax(dim=1).values, doc_ids
            self.full = self._view(self.pos, doc_ids)
        else:
            self.pos, self.doc = arange.expand(batch, length), None
            self.full = TokenView(None, None, rope_cos_sin(arange[None], cfg.head_dim, cfg.rope_theta, dtype))

    @cached_property
    def _pos_ext(self) -> Tensor:
        """Positions with the dummy slot S appended (padded slots gather from it): PAD_POS, never visible.
        Built on first use, so vanilla and recursive models, which never take subsets, never pay for it."""
        return torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], 1), PAD_POS)], dim=1)

    @cached_property
    def _doc_ext(self) -> Tensor | None:
        """Document ids with the dummy slot's document −1 appended; None without document masking."""
        if self.doc is None:
            return None
        return torch.cat([self.doc, self.doc.new_full((self.doc.shape[0], 1), -1)], dim=1)

    def _view(self, pos: Tensor, doc: Tensor | None) -> TokenView:
        return TokenView(pos, doc, rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, self.dtype))

    def view(self, active: ActiveSet) -> TokenView:
        doc = self._doc_ext.gather(1, active.idx) if self._doc_ext is not None else None
        view = self._view(self._pos_ext.gather(1, active.idx), doc)
        view.ascending = active.valid is None and doc is None  # ActiveSet rows are ascending by construction
        return view


def gather_rows(h: Tensor, idx: Tensor) -> Tensor:
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))


def scatter_rows(h: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    return h.scatter(1, idx[..., None].expand(-1, -1, h.shape[-1]), rows)


class LayerStack(nn.Module):
    """Vanilla and recursive models: the plan's recursive part, every token at every position."""

    def __init__(self, cfg: ModelConfig, plan: LayerPlan):
        super().__init__()
        self.plan, self.kv_share = plan, cfg.kv_mode == "share"

    def forward(self, h: Tensor, ctx: SequenceContext, layers: nn.ModuleList,
                routing: str) -> tuple[Tensor, dict, dict]:
        first_kv: dict[int, KV] = {}
        for layer_id, step in self.plan.recursive_part:
            shared = first_kv.get(layer_id) if self.kv_share and step > 0 else None
            h, kv = layers[layer_id](h, ctx.full, shared)
            if self.kv_share and step == 0:
                first_kv[layer_id] = kv
        return h, {}, {}


class MoRStack(nn.Module):
    """Routed recursion steps shared by both router types; subclasses decide each step's Selection."""

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, plan: LayerPlan):
        super().__init__()
        self.plan, self.kv_share = plan, cfg.kv_mode == "share"
        self.scale_output, self.rule = router_cfg.scale_output, router_cfg.combine
        self.num_recursions = cfg.num_recursions

    def begin(self, h: Tensor, routing: str) -> dict[str, Tensor]:
        """Called once before step 0 with the prelude's output; returns aux losses."""
        return {}

    def select(self, step: int, h: Tensor, prev: ActiveSet, length: int, routing: str) -> Selection:
        raise NotImplementedError

    def combine(self, sel: Selection, stack_input: Tensor, h: Tensor, out: Tensor) -> Tensor:
        """The active rows after their step: h = their input, out = B_r(h); stack_input = x, all (B, S+1, d) rows."""
        raise NotImplementedError

    def forward(self, h: Tensor, ctx: SequenceContext, layers: nn.ModuleList,
                routing: str) -> tuple[Tensor, dict, dict]:
        batch, length, _ = h.shape
        h = torch.cat([h, h.new_zeros(batch, 1, h.shape[-1])], dim=1)  # dummy slot S for padded rows
        stack_input = h
        aux = self.begin(h[:, :length], routing)
        active = ActiveSet.everything(batch, length, h.device)
        first_kv: dict[int, KV] = {}
        stats: dict[str, Tensor] = {}
        weights, weight_masks = [], []
        for step in range(self.num_recursions):
            sel = self.select(step, h, active, length, routing)
            for name, loss in sel.aux_losses.items():
                aux[name] = aux[name] + loss if name in aux else loss
            active = sel.active
            stats[f"depth_frac/{step}"] = active.count().float().detach() / (batch * length)
            if active.idx.shape[1] == 0:
                continue
            weights.append(sel.weight.squeeze(-1))
            weight_masks.append(active.valid_mask() if sel.finishing is None else sel.finishing & active.valid_mask())
            x = gather_rows(h, active.idx)
            view = ctx.view(active)
            y = x
            for layer_id in self.plan.block(step):
                shared = first_kv.get(layer_id) if self.kv_share and step > 0 else None
                y, kv = layers[layer_id](y, view, shared)
                if self.kv_share and step == 0:
                    first_kv[layer_id] = kv
            if self.scale_output:
                y = self.combine(sel, stack_input, x, y)
            h = scatter_rows(h, active.idx, y)
        if weights:
            g = torch.cat([w.flatten() for w in weights]).detach()
            m = torch.cat([w.flatten() for w in weight_masks])
            mean = masked_mean(g, m)
            stats["router_weight/mean"] = mean
            stats["router_weight/std"] = masked_mean((g - mean).pow(2), m).sqrt()
        return h[:, :length], aux, stats


class ExpertChoiceMoR(MoRStack):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, plan: LayerPlan):
        super().__init__(cfg, router_cfg, plan)
        self.router = ExpertChoiceRouter(cfg, router_cfg)

    def select(self, step: int, h: Tensor, prev: ActiveSet, length: int, routing: str) -> Selection:
        return self.router.select(step, gather_rows(h, prev.idx), prev, length, causal=routing == RoutingMode.CAUSAL)

    def combine(self, sel: Selection, stack_input: Tensor, h: Tensor, out: Tensor) -> Tensor:
        return expert_choice_update(h, out, sel.weight, self.rule)

    def update_router_state(self, all_reduce=None) -> None:
        self.router.update_thresholds(all_reduce)


class TokenChoiceMoR(MoRStack):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, plan: LayerPlan):
        super().__init__(cfg, router_cfg, plan)
        self.router = TokenChoiceRouter(cfg, router_cfg)
        self._depth: Tensor | None = None
        self._weight: Tensor | None = None

    def begin(self, h: Tensor, routing: str) -> dict[str, Tensor]:
        depth, weight, aux = self.router.assign(h)
        pad = depth.new_full((depth.shape[0], 1), -1)  # the dummy slot never runs
        self._depth, self._weight = torch.cat([depth, pad], 1), torch.cat([weight, weight.new_zeros(pad.shape)], 1)
        return aux

    def select(self, step: int, h: Tensor, prev: ActiveSet, length: int, routing: str) -> Selection:
        depth = self._depth.gather(1, prev.idx)
        active, pick = compact(prev, depth >= step, length)
        finishing = self._depth.gather(1, active.idx) == step
        return Selection(active, self._weight.gather(1, active.idx)[..., None], finishing)

    def combine(self, sel: Selection, stack_input: Tensor, h: Tensor, out: Tensor) -> Tensor:
        x = gather_rows(stack_input, sel.active.idx) if self.rule == "paper" else None
        return torch.where(sel.finishing[..., None], token_choice_exit(x, h, out, sel.weight, self.rule), out)

    def update_router_state(self, all_reduce=None) -> None:
        self.router.update_bias(all_reduce)


MOR_STACKS: dict[RouterType, type[nn.Module]] = {RouterType.EXPERT_CHOICE: ExpertChoiceMoR,
                                                 RouterType.TOKEN_CHOICE: TokenChoiceMoR}


def build_recursion(cfg: ModelConfig, router_cfg: RouterConfig, plan: LayerPlan) -> nn.Module:
    if cfg.family != ModelFamily.MOR:
        return LayerStack(cfg, plan)
    return MOR_STACKS[router_cfg.type](cfg, router_cfg, plan)
