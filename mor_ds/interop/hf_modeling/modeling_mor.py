"""Hugging Face modeling code for mor-ds recursive / Mixture-of-Recursions models (`trust_remote_code=True`).

Self-contained (torch + transformers only): the MoR math (router weights, k_r, token-choice depths, the combine
rule) comes from mor_math.py beside this file, the very file mor-ds trains with (mor_ds/models/mor_math.py, copied
by the export). Parameter names equal mor-ds's own, so an exported state dict loads unchanged. The forward pass is
a dense formulation of mor-ds's compacted one (mor_ds.models.recursion): at recursion step r every token runs
through the shared block, but attention only sees the step's active tokens (causal by original position) and only
active tokens take the step's output, combined by the router weight g (config.router_combine); inactive tokens
pass through unchanged. This spends compute on inactive tokens but gives the same logits, which the export tests
check.

Routing (config.routing, or the `routing=` forward argument):
  causal  a token continues at step r iff its own router score says so (expert-choice: router logit > τ_r, or the
          auxiliary router's logit > τ_r; token-choice: chosen depth ≥ r). Never looks at later tokens.
  topk    expert-choice training-time selection: the top k_r = max(1, ⌊capacity_r·S⌋) of the tokens still active
          (hierarchical). Uses the whole sequence, so logits of a prefix depend on the tokens after it.
No KV cache: `generate()` re-runs the full prefix at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mor import MoRConfig
from .mor_math import (capacity_schedule, causal_margin, expert_choice_update, expert_choice_weight,
                       token_choice_exit, token_choice_route, topk_count)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                shared_kv: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """mask: (B, 1, S, S) bool, key visible to query. shared_kv: K/V of recursion step 0 (KV sharing)."""
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), *rope)
        if shared_kv is None:
            shared_kv = (apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), *rope),
                         self._heads(self.v_proj(x), self.num_kv_heads))
        groups = self.num_heads // self.num_kv_heads
        k, v = (t.repeat_interleave(groups, dim=1) for t in shared_kv)
        compute = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.matmul(probs, v.to(compute)).to(q.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1)), shared_kv


class SwiGLU(nn.Module):
    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, mask, shared_kv=None):
        attn_out, kv = self.attn(self.attn_norm(x), rope, mask, shared_kv)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), kv


class RouterNet(nn.Module):
    def __init__(self, hidden_size: int, out_features: int, cfg: MoRConfig):
        super().__init__()
        if cfg.router_arch == "linear":
            self.net = nn.Linear(hidden_size, out_features, bias=False)
        else:
            inner = cfg.router_mlp_hidden_size or 2 * hidden_size
            self.net = nn.Sequential(nn.Linear(hidden_size, inner, bias=False), nn.GELU(),
                                     nn.Linear(inner, out_features, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ExpertChoiceRouter(nn.Module):
    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.routers = nn.ModuleList(RouterNet(cfg.hidden_size, 1, cfg) for _ in range(cfg.num_recursions))
        if cfg.router_causal_mode == "aux_router":
            self.aux_routers = nn.ModuleList(RouterNet(cfg.hidden_size, 1, cfg) for _ in range(cfg.num_recursions))
        # τ_r of causal routing, calibrated in training (mor-ds ExpertChoiceRouter; 0 = not calibrated)
        self.register_buffer("causal_threshold", torch.zeros(cfg.num_recursions))
        self.register_buffer("threshold_updates", torch.zeros(cfg.num_recursions, dtype=torch.long))


class TokenChoiceRouter(nn.Module):
    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.router = RouterNet(cfg.hidden_size, cfg.num_recursions, cfg)
        self.register_buffer("balance_bias", torch.zeros(cfg.num_recursions))


class Recursion(nn.Module):
    """Holds the router (MoR only) under the same parameter names as mor-ds."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        if cfg.family == "mor":
            self.router = ExpertChoiceRouter(cfg) if cfg.router_type == "expert_choice" else TokenChoiceRouter(cfg)


class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    base_model_prefix = ""
    _no_split_modules = ["DecoderBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=getattr(self.config, "initializer_range", 0.02))


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_unique_layers))
        self.recursion = Recursion(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ---------------------------------------------------------------------------------------- routing

    def _expert_choice(self, step: int, h: Tensor, prev: Tensor, routing: str) -> tuple[Tensor, Tensor]:
        """Active tokens (B, S) bool and router weights g (B, S) at step r, among the tokens active before."""
        router, cfg = self.recursion.router, self.config
        logits = router.routers[step](h).squeeze(-1)
        weight = expert_choice_weight(logits, cfg.router_alpha, cfg.router_activation, prev)
        if routing == "causal":
            if cfg.router_activation == "softmax":
                raise ValueError("router_activation=softmax: expert-choice weights normalise over the whole "
                                 "sequence, so they cannot be computed causally; use routing='topk'")
            decide = router.aux_routers[step](h).squeeze(-1) if hasattr(router, "aux_routers") else logits
            return prev & (causal_margin(decide, router.causal_threshold[step].float()) > 0), weight
        capacity = capacity_schedule(cfg.num_recursions, cfg.router_capacities or ())[step]
        k = topk_count(capacity, h.shape[1], int(prev.sum(1).min()))
        pick = logits.masked_fill(~prev, float("-inf")).topk(k, dim=1).indices
        return torch.zeros_like(prev).scatter_(1, pick, True), weight

    def _token_choice_depth(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Depth in 0…Nr−1 and router weight g = α·p(depth), chosen once per token on the prelude's output."""
        router, cfg = self.recursion.router, self.config
        bias = router.balance_bias if cfg.router_balancing == "loss_free" else None
        _, depth, weight = token_choice_route(router.router(h), cfg.router_alpha, cfg.router_activation, bias)
        return depth, weight

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                routing: str | None = None, **kwargs) -> CausalLMOutputWithPast:
        cfg = self.config
        routing = routing or cfg.routing
        batch, length = input_ids.shape
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones(batch, length, dtype=torch.bool, device=input_ids.device))
        if routing == "topk" and not bool(real.all()):
            raise ValueError("routing='topk' selects over whole sequences: pass unpadded inputs")
        pos = (real.long().cumsum(1) - 1).clamp_min(0)  # positions of real tokens (left or right padding)
        h = self.embed(input_ids)
        rope = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, h.dtype)
        causal = (pos[:, None, :] <= pos[:, :, None]) & torch.ones(length, length, dtype=torch.bool,
                                                                     device=h.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=h.device)

        def mask_for(keys: Tensor) -> Tensor:
            # a query that sees no key (inactive token, its output discarded) sees itself: no NaN
            return ((causal & keys[:, None, :]) | eye)[:, None]

        full = mask_for(real)
        for layer_id in cfg.prelude:
            h, _ = self.layers[layer_id](h, rope, full)
        h = self._recursion(h, rope, real, mask_for, routing)
        for layer_id in cfg.coda:
            h, _ = self.layers[layer_id](h, rope, full)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:  # Hugging Face convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _recursion(self, h: Tensor, rope, real: Tensor, mask_for, routing: str) -> Tensor:
        cfg = self.config
        share = cfg.kv_mode == "share"
        first_kv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer id -> (K, V, key mask) of step 0
        if cfg.family != "mor":
            full = mask_for(real)
            for layer_id, step in cfg.recursive_part:
                shared = first_kv.get(layer_id) if share and step > 0 else None
                h, kv = self.layers[layer_id](h, rope, full, shared[:2] if shared else None)
                if share and step == 0:
                    first_kv[layer_id] = (*kv, full)
            return h
        token_choice, rule = cfg.router_type == "token_choice", cfg.router_combine
        if token_choice:
            depth, tc_weight = self._token_choice_depth(h)
        stack_input, active = h, real
        for step in range(cfg.num_recursions):
            if token_choice:
                active, weight, finishing = active & (depth >= step), tc_weight, depth == step
            else:
                active, weight = self._expert_choice(step, h, active, routing)
                finishing = None
            if not bool(active.any()):
                continue
            x = y = h
            for layer_id in (i for i, r in cfg.recursive_part if r == step):
                shared = first_kv.get(layer_id) if share and step > 0 else None
                mask = shared[2] if shared else mask_for(active)
                y, kv = self.layers[layer_id](y, rope, mask, shared[:2] if shared else None)
                if share and step == 0:
                    first_kv[layer_id] = (*kv, mask)
            if cfg.router_scale_output and finishing is None:
                y = expert_choice_update(x, y, weight[..., None], rule)
            elif cfg.router_scale_output:
                y = torch.where(finishing[..., None], token_choice_exit(stack_input, x, y, weight[..., None], rule), y)
            h = torch.where(active[..., None], y, h)
        return h

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
