"""MoR routers: expert-choice (per recursion step, top-k of the still-active tokens) and token-choice
(one depth per token, chosen up front). Each router turns hidden states into a `Selection` plus its
auxiliary losses (already multiplied by their coefficients) and statistics.

Symbols (paper): Nr recursions, step r = 0…Nr−1, capacity_r, k_r = max(1, ⌊capacity_r·S⌋),
router weight g = α·act(router(h)); the formulas themselves live in mor_ds.models.mor_math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor_ds.config import ModelConfig, RouterConfig
from mor_ds.models.mor_math import causal_margin, expert_choice_weight, token_choice_route, topk_count


@dataclass
class ActiveSet:
    """Tokens active at a recursion step, compacted per sequence.

    idx: (B, K) original indices, ascending in each row (causal order kept); padded slots point at the
         dummy slot S. valid: (B, K) bool, None when every slot is real (fixed k per sequence).
    """

    idx: Tensor
    valid: Tensor | None = None

    @staticmethod
    def everything(batch: int, length: int, device: torch.device) -> "ActiveSet":
        return ActiveSet(torch.arange(length, device=device).expand(batch, length))

    def valid_mask(self) -> Tensor:
        return self.valid if self.valid is not None else torch.ones_like(self.idx, dtype=torch.bool)

    def count(self) -> Tensor:
        # new_full fills on the device; torch.tensor(n, device=cuda) would be a synchronizing host-to-device copy
        return self.valid_mask().sum() if self.valid is not None else self.idx.new_full((), self.idx.numel())


@dataclass
class Selection:
    """What a recursion step runs on: the active tokens, their router weights g (B, K, 1), and for
    token-choice which of them finish at this step (only their output is combined with g)."""

    active: ActiveSet
    weight: Tensor
    finishing: Tensor | None = None  # (B, K) bool; None = every selected token is combined with g
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


# Padded widths (uneven counts: token-choice, causal routing) are rounded up to a multiple of this: the width then
# takes few distinct values and is never 1, so torch.compile'd blocks stop recompiling as the counts drift (a size-1
# dimension is a specialisation of its own), and the GEMMs get tensor-core-friendly row counts. The padding rows are
# masked everywhere (attention skips them blockwise) and cost < 64 rows per sequence per step.
PAD_WIDTH_MULTIPLE = 64


def compact(prev: ActiveSet, keep: Tensor, length: int) -> tuple[ActiveSet, Tensor]:
    """Keep the slots of `prev` where `keep` (B, K_prev) is true, packed to the left in causal order.

    Returns the new ActiveSet and `pick` (B, K): for each new slot, its slot index in `prev`.
    Counts may differ per sequence; rows are then padded with the dummy index `length` to the longest count rounded
    up to PAD_WIDTH_MULTIPLE (at most K_prev). The width is at least 1 (dummy slots when no token continues), so
    every rank runs every recursion step's block: ZeRO-3 gathers a block's parameters collectively, and a rank
    skipping a block would desynchronise the others.
    """
    keep = keep & prev.valid_mask()
    counts = keep.sum(dim=1)
    width, fewest = torch.stack([counts.max().clamp_min(1), counts.min()]).tolist()  # the one host sync
    if fewest < width:
        width = min(-(-width // PAD_WIDTH_MULTIPLE) * PAD_WIDTH_MULTIPLE, prev.idx.shape[1])
    pick = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
    if fewest == width:  # every row has the same count: no padding
        return ActiveSet(prev.idx.gather(1, pick)), pick
    valid = torch.arange(width, device=keep.device) < counts[:, None]
    return ActiveSet(torch.where(valid, prev.idx.gather(1, pick), length), valid), pick


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


class RouterNet(nn.Module):
    """Linear(d, out) or the released code's MLP Linear(d, 2d) → GELU → Linear(2d, out), no biases; logits in at
    least fp32."""

    def __init__(self, hidden_size: int, out_features: int, cfg: RouterConfig):
        super().__init__()
        if cfg.arch == "linear":
            self.net: nn.Module = nn.Linear(hidden_size, out_features, bias=False)
        else:
            inner = cfg.mlp_hidden_size or 2 * hidden_size
            self.net = nn.Sequential(nn.Linear(hidden_size, inner, bias=False), nn.GELU(),
                                     nn.Linear(inner, out_features, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ExpertChoiceRouter(nn.Module):
    """One router per recursion step. Training: step r keeps the top-k_r of the tokens active after step
    r−1 (hierarchical), k_r = max(1, ⌊capacity_r·S⌋). Inference ("causal" routing): a token continues iff its
    own decision logit (the router's under the BCE aux loss, the aux router's in aux_router mode) exceeds the
    step's threshold τ_r, which never looks at other (future) tokens.

    τ_r (buffer `causal_threshold`, saved with the weights): with router.causal_threshold=calibrated, an EMA
    over optimizer steps of the decision logit at which top-k_r cuts (the score between the kept and the
    dropped tokens, pooled over the batch; the step's micro-batches and data-parallel ranks averaged, so
    every rank holds the same τ), so causal routing keeps ≈ capacity_r/capacity_{r−1} of the tokens at step
    r, as training did; −inf at steps whose capacity keeps everyone. Before its first update (buffer
    `threshold_updates` = 0), or with router.causal_threshold=zero, τ_r = 0: sigmoid(logit) > 0.5, the BCE's
    decision boundary. Forward passes in training only collect the cuts; `update_thresholds` (through
    `CausalLM.update_router_state`, after every optimizer step) moves τ."""

    def __init__(self, model_cfg: ModelConfig, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.capacities = cfg.capacities(model_cfg.num_recursions)
        self.routers = nn.ModuleList(RouterNet(model_cfg.hidden_size, 1, cfg) for _ in self.capacities)
        self.aux_routers = (nn.ModuleList(RouterNet(model_cfg.hidden_size, 1, cfg) for _ in self.capacities)
                            if cfg.causal_mode == "aux_router" else None)
        n = len(self.capacities)
        calibrated = cfg.causal_threshold == "calibrated"
        self.register_buffer("causal_threshold", torch.tensor(
            [-math.inf if calibrated and c >= 1.0 else 0.0 for c in self.capacities], dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros(n, dtype=torch.long))
        # cuts seen since the last optimizer step: [sum over micro-batches (n), how many (n)]
        self.register_buffer("cuts", torch.zeros(2, n, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        """τ and the collected cuts stay fp32 under .to(bf16) / DeepSpeed's bf16 cast: an EMA in bf16 would
        drop every update smaller than its 8-bit mantissa. Device moves still apply."""
        kept = {name: getattr(self, name) for name in ("causal_threshold", "cuts")}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            if getattr(self, name).dtype != torch.float32 and not value.is_meta:
                setattr(self, name, value.to(getattr(self, name).device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before calibration have no τ: load them as not calibrated (τ_r = 0)
        state_dict.setdefault(prefix + "causal_threshold", torch.zeros_like(self.causal_threshold))
        state_dict.setdefault(prefix + "threshold_updates", torch.zeros_like(self.threshold_updates))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def causal_margin(self, step: int, decide: Tensor) -> Tensor:
        """Decision logits minus τ_r: a token continues at step r iff its margin is > 0 (no host sync)."""
        return causal_margin(decide, self.causal_threshold[step])

    @torch.no_grad()
    def _collect_cut(self, step: int, decide: Tensor, k: int) -> None:
        """The decision logit at which top-k_r (k per sequence) cuts, pooled over the batch: the midpoint of
        the (kB)-th and (kB+1)-th largest of the B·K_prev logits; a non-finite one (a step the NaN guard
        skips) is left out. Device ops only."""
        cut = decide.detach().float().flatten().topk(k * decide.shape[0] + 1).values[-2:].mean()
        finite = cut.isfinite()
        self.cuts[0, step] += torch.where(finite, cut, 0.0)
        self.cuts[1, step] += finite.float()

    @torch.no_grad()
    def update_thresholds(self, all_reduce=None) -> None:
        """After an optimizer step: τ_r ← m·τ_r + (1 − m)·(mean cut of the step), the first update sets it;
        `all_reduce` sums the cuts over data-parallel ranks. Steps without a cut keep τ_r. No host sync."""
        cuts = all_reduce(self.cuts.clone()) if all_reduce is not None else self.cuts.clone()
        seen = cuts[1] > 0
        mean = cuts[0] / cuts[1].clamp_min(1)
        m = self.cfg.threshold_momentum
        ema = torch.where(self.threshold_updates == 0, mean, m * self.causal_threshold + (1 - m) * mean)
        self.causal_threshold.copy_(torch.where(seen, ema, self.causal_threshold))
        self.threshold_updates += seen.long()
        self.cuts.zero_()

    def select(self, step: int, x: Tensor, prev: ActiveSet, length: int, causal: bool) -> Selection:
        """x: (B, K_prev, d) hidden states of the tokens in `prev`, entering step r."""
        logits = self.routers[step](x).squeeze(-1)  # (B, K_prev)
        weights = expert_choice_weight(logits, self.cfg.alpha, self.cfg.activation, prev.valid)
        aux_logits = self.aux_routers[step](x.detach()).squeeze(-1) if self.aux_routers is not None else None
        decide = aux_logits if aux_logits is not None else logits  # the logits the BCE trains and τ_r cuts
        if causal:
            if self.cfg.activation == "softmax":
                raise ValueError("router.activation=softmax: expert-choice weights normalise over the whole sequence, "
                                 "so they cannot be computed causally; evaluate with routing='topk' or train with "
                                 "router.activation=sigmoid")
            active, pick = compact(prev, self.causal_margin(step, decide) > 0, length)
            return Selection(active, weights.gather(1, pick)[..., None])

        k = topk_count(self.capacities[step], length, prev.idx.shape[1])
        if k == logits.shape[1]:  # capacity 1 (the schedule's step 0): everyone stays, no top-k needed
            pick = torch.arange(k, device=logits.device).expand_as(logits)
        else:
            pick = logits.topk(k, dim=1).indices.sort(dim=1).values
            if self.training and self.cfg.causal_threshold == "calibrated":
                self._collect_cut(step, decide, k)
        chosen = torch.zeros_like(logits).scatter_(1, pick, 1.0)  # BCE target: picked (1) or not (0)
        aux = {"router_bce": self.cfg.aux_loss_coef * F.binary_cross_entropy_with_logits(decide, chosen)}
        if self.cfg.z_loss_coef:
            aux["z_loss"] = self.cfg.z_loss_coef * logits.pow(2).mean()
        return Selection(ActiveSet(prev.idx.gather(1, pick)), weights.gather(1, pick)[..., None], aux_losses=aux)


class TokenChoiceRouter(nn.Module):
    """Depth chosen once per token from a distribution over Nr depths (top-1), on the prelude's output x.
    A token of depth d runs steps 0…d; g = α·p(d) combines its last step's output (router.combine).
    Balancing: loss Σ_i P_i·f_i (P_i mean probability, f_i = Nr·fraction routed to depth i), or loss-free:
    a non-trained bias b added for the choice only, b ← b + rate·sign(mean load − load_i) per optimizer step."""

    def __init__(self, model_cfg: ModelConfig, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.num_recursions = model_cfg.num_recursions
        self.router = RouterNet(model_cfg.hidden_size, self.num_recursions, cfg)
        self.register_buffer("balance_bias", torch.zeros(self.num_recursions))
        self.register_buffer("load", torch.zeros(self.num_recursions), persistent=False)

    def assign(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """h: (B, S, d) -> depth (B, S) in 0…Nr−1, g (B, S), weighted aux losses."""
        logits = self.router(h)  # (B, S, Nr)
        probs, depth, weight = self.route(logits)
        routed = F.one_hot(depth, self.num_recursions).to(probs.dtype).mean(dim=(0, 1))
        aux: dict[str, Tensor] = {}
        if self.cfg.balancing == "loss":
            aux["balance"] = self.cfg.balance_loss_coef * (probs.mean(dim=(0, 1)) * self.num_recursions * routed).sum()
        elif self.training:
            self.load += routed.detach() * depth.numel()
        if self.cfg.z_loss_coef:
            aux["z_loss"] = self.cfg.z_loss_coef * torch.logsumexp(logits, -1).pow(2).mean()
        return depth, weight, aux

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(probs, depth, g) from the router's logits; sync-free, so the decode tick calls it too."""
        bias = self.balance_bias if self.cfg.balancing == "loss_free" else None
        return token_choice_route(logits, self.cfg.alpha, self.cfg.activation, bias)

    @torch.no_grad()
    def update_bias(self, all_reduce=None) -> None:
        """Loss-free balancing step; `all_reduce` sums the load over data-parallel ranks so biases agree."""
        load = self.load.clone()
        if all_reduce is not None:
            load = all_reduce(load)
        if load.sum() > 0:
            self.balance_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
