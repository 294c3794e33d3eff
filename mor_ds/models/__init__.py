"""Models: one Llama-style block; vanilla, recursive and MoR families built from a LayerPlan."""

from mor_ds.models.model import CausalLM, ModelOutput, build_model

__all__ = ["CausalLM", "ModelOutput", "build_model"]
