"""Parameter names: mor-ds vanilla model <-> transformers LlamaForCausalLM (same tensors, no permutation: both use
the rotate-halves RoPE convention on the same q/k projection layout)."""

from __future__ import annotations

import re

# (ours, Hugging Face) with `{i}` for the layer index
_PAIRS = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *((f"layers.{{i}}.attn.{p}_proj.weight", f"model.layers.{{i}}.self_attn.{p}_proj.weight") for p in "qkvo"),
    *((f"layers.{{i}}.mlp.{p}_proj.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")),
)


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_OURS_TO_HF = [(_compile(ours), hf) for ours, hf in _PAIRS]
_HF_TO_OURS = [(_compile(hf), ours) for ours, hf in _PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return None


def to_hf(name: str) -> str | None:
    """The LlamaForCausalLM name of one of our vanilla parameters (None: no counterpart)."""
    return _rename(name, _OURS_TO_HF)


def from_hf(name: str) -> str | None:
    """Our name of a LlamaForCausalLM parameter (None: no counterpart, e.g. rotary buffers)."""
    return _rename(name, _HF_TO_OURS)
