"""Hugging Face config of a mor-ds recursive / Mixture-of-Recursions model (shipped with `mor-ds export --format hf`).

Self-contained (torch + transformers only) so that `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works
without mor-ds installed. The layer plan (which parameterised layer runs at which unrolled position and recursion
step) is stored explicitly, so this file carries no sharing-strategy logic.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoRConfig(PretrainedConfig):
    model_type = "mor"

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 576,
        num_hidden_layers: int = 30,  # L, unrolled depth
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        intermediate_size: int = 1536,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 2048,
        family: str = "recursive",  # recursive | mor
        num_recursions: int = 1,  # Nr
        kv_mode: str = "cache",  # cache (recursion-wise KV caching) | share (first recursion's KV)
        num_unique_layers: int = 1,
        prelude: list[int] | None = None,  # unique layers before the recursion
        coda: list[int] | None = None,  # unique layers after it
        recursive_part: list[list[int]] | None = None,  # [layer id, recursion step r] in execution order
        router_type: str = "expert_choice",  # expert_choice | token_choice
        router_arch: str = "linear",  # linear | mlp
        router_activation: str = "sigmoid",  # sigmoid | softmax
        router_mlp_hidden_size: int = 0,
        router_alpha: float = 0.1,  # α in g = α·act(router(h))
        router_capacities: list[float] | None = None,  # expert-choice capacity per step
        router_combine: str = "paper",  # paper: h + g·B_r(h) / x + g·B_d(h^d) | delta: h + g·(B_r(h) − h)
        router_scale_output: bool = True,
        router_causal_mode: str = "aux_loss",  # aux_loss | aux_router
        router_balancing: str = "loss",  # token-choice: loss | loss_free
        routing: str = "causal",  # causal (per-token decisions) | topk (expert-choice over the whole sequence)
        tie_word_embeddings: bool = True,
        use_cache: bool = True,  # generate() decodes from a MoRCache (cache_mor.py)
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.family = family
        self.num_recursions = num_recursions
        self.kv_mode = kv_mode
        self.num_unique_layers = num_unique_layers
        self.prelude = list(prelude or [])
        self.coda = list(coda or [])
        self.recursive_part = [list(p) for p in (recursive_part or [])]
        self.router_type = router_type
        self.router_arch = router_arch
        self.router_activation = router_activation
        self.router_mlp_hidden_size = router_mlp_hidden_size
        self.router_alpha = router_alpha
        self.router_capacities = list(router_capacities or [])
        self.router_combine = router_combine
        self.router_scale_output = router_scale_output
        self.router_causal_mode = router_causal_mode
        self.router_balancing = router_balancing
        self.routing = routing
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
