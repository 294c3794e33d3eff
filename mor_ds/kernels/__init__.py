"""Triton kernels. `active_attention` / `active_attention_varlen`: flash attention over the active tokens of
a recursion step, causal by original position, with GQA, document masks, fused gather/scatter and a packed
varlen layout (forward and backward). Importing this package needs triton."""

from mor_ds.patches import interpreter_active, patch_interpreter

if interpreter_active():  # before any kernel runs
    patch_interpreter()

from mor_ds.kernels.attention import KernelConfigs, TileConfig, active_attention, active_attention_varlen

__all__ = ["KernelConfigs", "TileConfig", "active_attention", "active_attention_varlen"]
