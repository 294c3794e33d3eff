"""Hugging Face modeling code for mor-ds recursive / Mixture-of-Recursions models (`trust_remote_code=True`).

Self-contained (torch + transformers only): the MoR math (router weights, k_r, token-choice depths, the combine
rule) comes from mor_math.py beside this file, the very file mor-ds trains with (mor_ds/models/mor_math.py, copied
by the export), and the KV cache is cache_mor.py's MoRCache. Parameter names equal mor-ds's own, so an exported
state dict loads unchanged.

The forward pass is mor-ds's compacted one (mor_ds.models.recursion, mor_ds.inference.runner): at recursion step r
the shared block runs only on the step's active tokens, packed per sequence (sequences with none drop out of the
step), and attends to the step's cache group causally by original position (recursion-wise caching: the tokens
that reached step r; KV sharing at r >= 1: what step 0 wrote); their output is combined with the hidden state by
the router weight g (config.router_combine), the others pass through unchanged. Every forward runs through a
MoRCache, the one passed in (`cache=`, as `generate()` does) or a fresh one, so a full forward and cached decoding
(each new token computed only at the steps it reaches, against the cached keys) give the same logits.

Routing (config.routing, or the `routing=` forward argument):
  causal  a token continues at step r iff its own router score says so (expert-choice: router logit > τ_r, or the
          auxiliary router's logit > τ_r; token-choice: chosen depth >= r). Never looks at later tokens, so it
          decodes with the cache.
  topk    expert-choice training-time selection: the top k_r = max(1, ⌊capacity_r·S⌋) of the tokens still active
          (hierarchical). Uses the whole sequence, so logits of a prefix depend on the tokens after it: no cache
          (generate with use_cache=False re-runs the prefix).
Host syncs per forward: one to count each row's real tokens when an attention mask is given, and one per
recursion step (which tokens go on), as in mor-ds's runner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_mor import MoRCache, MoRCacheLayer
from .configuration_mor import MoRConfig
from .mor_math import (capacity_schedule, causal_margin, expert_choice_update, expert_choice_weight,
                       token_choice_exit, token_choice_route, topk_count)

ROUTINGS = ("causal", "topk")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE factors (R, K, 1, D/2) for tokens (R, K, H, D) at original positions (R, K)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TokenSet:
    """Tokens of the current input that run one phase (the layers outside the recursion, or one recursion step),
    packed per batch row.

    rows (R,) batch rows; cols (R, K) each slot's column in the hidden states (padded slots: the dummy column S);
    valid (R, K) bool, None when every slot is real; pos (R, K) original positions; rank (R, K) each real slot's
    index among its row's real slots; counts (R,) real slots per row. host_rows / host_counts: the same on the host,
    so that caches grow and reads are sliced without a device sync. The layers of a phase append the same tokens
    to cache groups that held the same tokens, so the attention mask (or the plain causal shortcut) is worked out
    once per phase, here."""

    def __init__(self, batch: int, length: int, rows: Tensor, cols: Tensor, valid: Tensor | None, pos: Tensor,
                 rank: Tensor, counts: Tensor, host_rows: Tensor, host_counts: Tensor, dense: bool, cfg: MoRConfig,
                 dtype: torch.dtype, parent: tuple[Tensor | None, Tensor | None] = (None, None)):
        self.batch, self.length = batch, length  # the input's (B, S)
        self.rows, self.cols, self.valid, self.pos, self.rank = rows, cols, valid, pos, rank
        self.counts, self.host_rows, self.host_counts = counts, host_rows, host_counts
        self.dense = dense  # every row, columns 0…S−1 in order: gather / scatter are slices
        self.all_rows = len(host_rows) == batch
        self.rope = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)
        self.cfg, self.dtype = cfg, dtype
        self._parent = parent  # (rows kept, slot order) of the set this one was compacted from
        self.fresh: bool | None = None  # its cache groups were empty for these rows and every slot is real
        self._mask: Tensor | None = None

    @staticmethod
    def everything(real: Tensor, host_counts: Tensor, pos: Tensor, cfg: MoRConfig, dtype: torch.dtype) -> "TokenSet":
        """Every column of the input (B, S); the real ones are `real`."""
        batch, length = real.shape
        dev = real.device
        all_real = int(host_counts.min()) == length
        rank = (torch.arange(length, device=dev).expand(batch, length) if all_real else real.long().cumsum(1) - 1)
        return TokenSet(batch, length, torch.arange(batch, device=dev),
                        torch.arange(length, device=dev).expand(batch, length),
                        None if all_real else real, pos, rank, real.sum(1), torch.arange(batch), host_counts, True,
                        cfg, dtype)

    def gather(self, t: Tensor) -> Tensor:
        """This set's slots of t (B, S[+1], …)."""
        if self.dense:
            return t[:, :self.length]
        return t[self.rows[:, None], self.cols]

    def scatter(self, t: Tensor, values: Tensor) -> Tensor:
        """t (B, S + 1, …) with this set's slots replaced by values (R, K, …); padded slots land in column S."""
        if self.dense:
            return torch.cat([values, t[:, self.length:]], dim=1)
        return t.index_put((self.rows[:, None].expand_as(self.cols), self.cols), values)

    def take(self, t: Tensor) -> Tensor:
        """This set's slots of t (R', K', …) laid out like the set it was compacted from."""
        sel, order = self._parent
        if sel is not None:
            t = t[sel]
        if order is not None:
            t = t.gather(1, order.view(*order.shape, *(1,) * (t.dim() - 2)).expand(*order.shape, *t.shape[2:]))
        return t

    def compact(self, keep: Tensor) -> "TokenSet | None":
        """The slots where keep (R, K) holds (real slots only), packed left in position order; rows left with none
        dropped; None when no token goes on. Its counts are the one host sync of a recursion step."""
        if self.valid is not None:
            keep = keep & self.valid
        counts = keep.sum(1)
        host_counts = counts.cpu()
        live = host_counts.nonzero().squeeze(1)
        if not len(live):
            return None
        width = int(host_counts.max())
        sel = None
        rows, cols, pos = self.rows, self.cols, self.pos
        if len(live) < len(host_counts):
            sel = live.to(keep.device)
            keep, counts, rows, cols, pos = keep[sel], counts[sel], rows[sel], cols[sel], pos[sel]
            host_counts = host_counts[live]
        packed = int(host_counts.min()) == width
        order = None
        if not (packed and width == keep.shape[1]):  # else every slot of every row left goes on, in place
            order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
            cols, pos = cols.gather(1, order), pos.gather(1, order)
        slot = torch.arange(width, device=keep.device)
        valid = None if packed else slot < counts[:, None]
        if valid is not None:
            cols = torch.where(valid, cols, self.length)
        return TokenSet(self.batch, self.length, rows, cols, valid, pos, slot.expand(len(live), width), counts,
                        self.host_rows[live], host_counts, self.dense and sel is None and order is None,
                        self.cfg, self.dtype, (sel, order))

    def attention_mask(self, key_pos: Tensor, key_len: Tensor) -> Tensor:
        """(R, 1, K, L) bool: key j visible to a query iff j is one of the row's cached tokens and at a position <=
        the query's. A padded slot sees the row's first key only (finite output that is discarded)."""
        if self._mask is None:
            slot = torch.arange(key_pos.shape[1], device=key_pos.device)
            mask = (slot < key_len[:, None])[:, None, :] & (key_pos[:, None, :] <= self.pos[:, :, None])
            if self.valid is not None:
                mask = mask | (~self.valid[:, :, None] & (slot == 0))
            self._mask = mask[:, None]
        return self._mask


class Attention(nn.Module):
    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, tokens: TokenSet, group: MoRCacheLayer, write: bool) -> Tensor:
        """x (R, K, d) of `tokens`; their K/V are appended to `group` when `write` (KV sharing at r >= 1 projects
        none), then they attend to what the group holds for their rows."""
        rows, width, _ = x.shape
        hq, hkv, dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(rows, width, hq, dim), *tokens.rope).transpose(1, 2)
        if write:
            k = apply_rope(self.k_proj(x).view(rows, width, hkv, dim), *tokens.rope)
            v = self.v_proj(x).view(rows, width, hkv, dim)
            if tokens.fresh is None:
                tokens.fresh = tokens.valid is None and group.is_empty(tokens.host_rows)
            group.append(tokens, k, v)
            if tokens.fresh:  # the keys are exactly these tokens, in order: plain causal attention (flash on CUDA)
                out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                                     enable_gqa=hq != hkv)
                return self.o_proj(out.transpose(1, 2).reshape(rows, width, -1))
        keys, values, key_pos, key_len = group.read(tokens)
        mask = tokens.attention_mask(key_pos, key_len)
        if width == 1:  # decoding: the query heads of one K/V head as rows of one query, no K/V copy
            out = F.scaled_dot_product_attention(q.reshape(rows, hkv, hq // hkv, dim), keys, values, attn_mask=mask)
        else:
            keys, values = (t.repeat_interleave(hq // hkv, dim=1) for t in (keys, values))
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.reshape(rows, hq, width, dim).transpose(1, 2).reshape(rows, width, -1))


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

    def forward(self, x: Tensor, tokens: TokenSet, group: MoRCacheLayer, write: bool) -> Tensor:
        x = x + self.attn(self.attn_norm(x), tokens, group, write)
        return x + self.mlp(self.mlp_norm(x))


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
        # MoR: the shared block's layers at each recursion step (cycle-type sharing: contiguous steps)
        self._blocks = [[layer for layer, r in config.recursive_part if r == step]
                        for step in range(config.num_recursions)]
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

    def _expert_choice(self, step: int, x: Tensor, tokens: TokenSet, routing: str,
                       length: int) -> tuple[Tensor, Tensor]:
        """Which of the step's candidates `tokens` (hidden states x (R, K, d)) go on, and their router weights g."""
        router, cfg = self.recursion.router, self.config
        logits = router.routers[step](x).squeeze(-1)
        weight = expert_choice_weight(logits, cfg.router_alpha, cfg.router_activation, tokens.valid)
        if routing == "causal":
            if cfg.router_activation == "softmax":
                raise ValueError("router_activation=softmax: expert-choice weights normalise over the whole "
                                 "sequence, so they cannot be computed causally; use routing='topk'")
            decide = router.aux_routers[step](x).squeeze(-1) if hasattr(router, "aux_routers") else logits
            return causal_margin(decide, router.causal_threshold[step].float()) > 0, weight
        capacity = capacity_schedule(cfg.num_recursions, cfg.router_capacities or ())[step]
        k = topk_count(capacity, length, int(tokens.host_counts.min()))  # top-k rows are unpadded: equal counts
        pick = logits.topk(k, dim=1).indices
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, pick, True), weight

    def _token_choice_depth(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Depth in 0…Nr−1 and router weight g = α·p(depth), chosen once per token on the prelude's output."""
        router, cfg = self.recursion.router, self.config
        bias = router.balance_bias if cfg.router_balancing == "loss_free" else None
        _, depth, weight = token_choice_route(router.router(h), cfg.router_alpha, cfg.router_activation, bias)
        return depth, weight

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                routing: str | None = None, cache: MoRCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, S): the new columns after what `cache` holds. attention_mask: (B, S) or (B, past + S), 1 for
        real tokens (left or right padding). Returns the cache when use_cache (default config.use_cache; never under
        top-k routing)."""
        cfg = self.config
        routing = routing or cfg.routing
        if routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r}: one of {', '.join(ROUTINGS)}")
        batch, length = input_ids.shape
        if routing == "topk":
            if cache is not None or use_cache:
                raise ValueError("routing='topk' selects over whole sequences, so it cannot decode from a KV cache: "
                                 "pass use_cache=False")
            use_cache = False
        elif use_cache is None:
            use_cache = cfg.use_cache
        if cache is None:
            cache = MoRCache(cfg)
        elif not isinstance(cache, MoRCache):
            raise ValueError(f"cache: a {type(cache).__name__}; this model keeps its K/V per recursion depth in a "
                             "MoRCache (pass none and the model makes one)")
        if attention_mask is not None:
            real = attention_mask[:, -length:].bool()
            host_counts = real.sum(1).cpu()
        else:
            real = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
            host_counts = torch.full((batch,), length)
        if routing == "topk" and int(host_counts.min()) < length:
            raise ValueError("routing='topk' selects over whole sequences: pass unpadded inputs")
        h = self.embed(input_ids)
        everything = TokenSet.everything(real, host_counts, cache.next_positions(real), cfg, h.dtype)
        for layer_id in cfg.prelude:
            h = self.layers[layer_id](h, everything, cache.group(layer_id, 0), True)
        if cfg.family == "mor":
            h = self._mor(h, everything, cache, routing)
        else:
            for layer_id, step in cfg.recursive_part:
                h = self.layers[layer_id](h, everything, cache.group(layer_id, step), cache.writes(step))
        for layer_id in cfg.coda:
            h = self.layers[layer_id](h, everything, cache.group(layer_id, 0), True)
        logits = self.lm_head(self.norm(h[:, -logits_to_keep:] if logits_to_keep else h))
        loss = None
        if labels is not None:  # Hugging Face convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def _mor(self, h: Tensor, everything: TokenSet, cache: MoRCache, routing: str) -> Tensor:
        """The routed recursion steps on h (B, S, d); each runs the shared block on its active tokens only."""
        cfg = self.config
        batch, length, dim = h.shape
        h = torch.cat([h, h.new_zeros(batch, 1, dim)], dim=1)  # dummy column S: where padded slots gather / scatter
        token_choice, rule = cfg.router_type == "token_choice", cfg.router_combine
        if token_choice:
            stack_input = h
            depth, tc_weight = self._token_choice_depth(h[:, :length])
            depth, tc_weight = F.pad(depth, (0, 1), value=-1), F.pad(tc_weight, (0, 1))
        tokens = everything
        for step in range(cfg.num_recursions):
            x = tokens.gather(h)
            if token_choice:
                keep, weight = tokens.gather(depth) >= step, tokens.gather(tc_weight)
            else:
                keep, weight = self._expert_choice(step, x, tokens, routing, length)
            tokens = tokens.compact(keep)
            if tokens is None:  # no token goes on: later steps have none either
                break
            x, weight = tokens.take(x), tokens.take(weight)
            y = x
            for layer_id in self._blocks[step]:
                y = self.layers[layer_id](y, tokens, cache.group(layer_id, step), cache.writes(step))
            if cfg.router_scale_output and not token_choice:
                y = expert_choice_update(x, y, weight[..., None], rule)
            elif cfg.router_scale_output:
                done = token_choice_exit(tokens.gather(stack_input), x, y, weight[..., None], rule)
                y = torch.where((tokens.gather(depth) == step)[..., None], done, y)
            h = tokens.scatter(h, y)
        return h[:, :length]

    # ---------------------------------------------------------------------------------------- generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """generate() decodes with a MoRCache (a group per recursion depth, see cache_mor.py) instead of the
        DynamicCache it would make; a cache passed in must be one."""
        given = model_kwargs.get("cache")
        if given is not None and not isinstance(given, MoRCache):
            raise ValueError(f"cache: a {type(given).__name__}; this model decodes from a MoRCache (pass none)")
        if given is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r}: this model's cache "
                             "is its own MoRCache (leave cache_implementation unset)")
        model_kwargs["cache"] = MoRCache(self.config)
