"""Hugging Face interoperability: export (vanilla → LlamaForCausalLM; recursive/MoR → our modeling code for
trust_remote_code) and import (a local Llama checkpoint → our vanilla model)."""

from mor_ds.interop.errors import InteropError
from mor_ds.interop.hf_export import export_checkpoint_hf, export_hf
from mor_ds.interop.hf_import import import_hf, write_export

__all__ = ["InteropError", "export_checkpoint_hf", "export_hf", "import_hf", "write_export"]
