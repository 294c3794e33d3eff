"""`mor-ds export --format hf`: a directory that `transformers` loads, with the tokenizer.

vanilla          → `LlamaForCausalLM` (config.json + model.safetensors), loadable without trust_remote_code.
recursive / MoR  → `MoRForCausalLM` from mor_ds/interop/hf_modeling (configuration_mor.py, modeling_mor.py and its
                   KV cache cache_mor.py, and mor_ds/models/mor_math.py, the MoR math training uses, are copied next
                   to the weights and registered in config.json's auto_map), loaded with
                   `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
Tokenizer: a SentencePiece .model is shipped as tokenizer.model plus the tokenizer.json / tokenizer_config.json of
a Llama tokenizer built from it (no BOS added, as in training); a Hugging Face tokenizer.json is copied with a
tokenizer_config.json naming its special tokens.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from mor_ds.config import Config
from mor_ds.interop.errors import InteropError
from mor_ds.interop.progress import no_progress_bars
from mor_ds.interop.llama_names import to_hf
from mor_ds.models import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the files of an exported recursive / MoR model's code, and where each comes from
MODELING_FILES = {
    "configuration_mor.py": Path(__file__).parent / "hf_modeling" / "configuration_mor.py",
    "modeling_mor.py": Path(__file__).parent / "hf_modeling" / "modeling_mor.py",
    "cache_mor.py": Path(__file__).parent / "hf_modeling" / "cache_mor.py",
    "mor_math.py": Path(__file__).parents[1] / "models" / "mor_math.py",
}
_MODELING_PACKAGE = "mor_ds_hf_modeling"
_staged: list[tempfile.TemporaryDirectory] = []  # removed at exit


def copy_modeling_files(out: Path) -> None:
    for name, src in MODELING_FILES.items():
        shutil.copyfile(src, out / name)


def modeling_module() -> ModuleType:
    """The exported model's code as transformers will load it: the MODELING_FILES side by side (their relative
    imports resolve among themselves), imported once per process as package `mor_ds_hf_modeling`."""
    name = f"{_MODELING_PACKAGE}.modeling_mor"
    if name not in sys.modules:
        _staged.append(tempfile.TemporaryDirectory(prefix="mor-ds-hf-modeling-"))
        staged = Path(_staged[-1].name)
        copy_modeling_files(staged)
        spec = importlib.machinery.ModuleSpec(_MODELING_PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(staged)]
        sys.modules[_MODELING_PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(name)


def llama_config(cfg: Config, tokenizer=None):
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim, hidden_act="silu", max_position_embeddings=cfg.train.seq_len,
        rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, attention_bias=False, mlp_bias=False, **_special_ids(tokenizer))


def mor_config(model: CausalLM, cfg: Config, tokenizer=None):
    MoRConfig = modeling_module().MoRConfig

    m, r, plan = cfg.model, cfg.router, model.plan
    return MoRConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
        rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps, max_position_embeddings=cfg.train.seq_len,
        family=m.family, num_recursions=m.num_recursions, kv_mode=m.kv_mode,
        num_unique_layers=plan.num_unique_layers, prelude=list(plan.prelude), coda=list(plan.coda),
        recursive_part=[list(p) for p in plan.recursive_part],
        router_type=r.type, router_arch=r.arch, router_activation=r.activation,
        router_mlp_hidden_size=r.mlp_hidden_size,
        router_alpha=r.alpha, router_capacities=r.capacities(m.num_recursions), router_combine=r.combine,
        router_scale_output=r.scale_output,
        router_causal_mode=r.causal_mode, router_balancing=r.balancing, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, **_special_ids(tokenizer))


def _special_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {"eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
            "pad_token_id": tokenizer.pad_id}


def _hf_model(model: CausalLM, cfg: Config, tokenizer):
    """The transformers model holding `model`'s weights (shared storage where names map one to one)."""
    state = {k: v for k, v in model.state_dict().items()}
    if cfg.model.family == "vanilla":
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(llama_config(cfg, tokenizer))
        state = {to_hf(k): v for k, v in state.items()}
    else:
        modeling = modeling_module()
        MoRConfig, MoRForCausalLM = modeling.MoRConfig, modeling.MoRForCausalLM
        MoRConfig.register_for_auto_class()
        MoRForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        hf = MoRForCausalLM(mor_config(model, cfg, tokenizer))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InteropError(f"export: parameter names do not match the Hugging Face model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return hf


def export_hf(model: CausalLM, cfg: Config, out_dir: str | Path, tokenizer_path: str | None,
              dtype: str = "float32") -> Path:
    """Write `model` (+ its tokenizer) as a Hugging Face directory; returns the directory."""
    from data_pipeline.errors import DataError
    from data_pipeline.tokenizer import load_tokenizer
    from mor_ds.outputs import honour_umask

    if dtype not in DTYPES:
        raise InteropError(f"export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not tokenizer_path:
        raise InteropError("export: no tokenizer (the checkpoint's config has data.tokenizer empty; pass --tokenizer)")
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except DataError as exc:
        raise InteropError(f"export: tokenizer {exc}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise InteropError(f"export: tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but "
                           f"model.vocab_size={cfg.model.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = _hf_model(model, cfg, tokenizer).to(DTYPES[dtype])
    with no_progress_bars():  # "Writing model shards" for one file
        hf.save_pretrained(out)
    if cfg.model.family != "vanilla":  # save_pretrained copies the modeling files; make sure all are there
        copy_modeling_files(out)
    export_tokenizer(tokenizer, out)
    honour_umask(out)  # save_pretrained's safetensors files are 0600
    return out


def export_checkpoint_hf(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | None = None,
                         dtype: str = "float32") -> Path:
    """`mor-ds export --format hf`: anything mor_ds.weights.load_model reads (run dir, step_* dir, export file)
    → a Hugging Face directory. The tokenizer is --tokenizer, else the one the checkpoint's config trained with."""
    from mor_ds.weights import load_model
    from mor_ds.interop.tokenizer import checkpoint_tokenizer

    model, cfg = load_model(checkpoint)
    return export_hf(model, cfg, out_dir, checkpoint_tokenizer(cfg, tokenizer).path, dtype)


def add_hf_export_args(parser) -> None:
    """Flags of `mor-ds export --format hf` (the command owns --checkpoint, --out and --format)."""
    g = parser.add_argument_group("--format hf (a transformers directory)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one in the checkpoint's config)")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the exported weights")


def hf_export_main(args) -> int:
    """`mor-ds export --checkpoint … --format hf --out DIR`; one-line errors, exit code 2."""
    import sys

    from mor_ds.train.checkpoint_dir import CheckpointError

    try:
        out = export_checkpoint_hf(args.checkpoint, args.out, args.tokenizer, args.dtype)
    except (ValueError, CheckpointError) as exc:  # InteropError, ConfigError, not-an-export
        print(f"mor-ds export: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    kind = "MoRForCausalLM, trust_remote_code" if (out / "modeling_mor.py").exists() else "LlamaForCausalLM"
    print(f"exported {args.checkpoint} → {out} ({kind})")
    return 0


def export_tokenizer(tokenizer, out: Path) -> None:
    """Write the tokenizer files transformers' AutoTokenizer reads. `tokenizer`: data_pipeline.tokenizer.Tokenizer."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    names = {"eos_token": tokenizer.id_to_piece(tokenizer.eos_id), "pad_token": tokenizer.id_to_piece(tokenizer.pad_id)}
    if tokenizer.bos_id >= 0:
        names["bos_token"] = tokenizer.id_to_piece(tokenizer.bos_id)
    if tokenizer.kind == "sentencepiece":
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        # transformers converts tokenizer.model into a Llama tokenizer (byte fallback, "▁" prefix on the first
        # word); saving it again writes tokenizer.json so that loading needs no conversion
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": False, "unk_token": _unk_piece(tokenizer.path), **names}
    else:
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    cls = LlamaTokenizer if tokenizer.kind == "sentencepiece" else PreTrainedTokenizerFast
    cls.from_pretrained(str(out)).save_pretrained(str(out))


def _unk_piece(model_file: str) -> str:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    return sp.id_to_piece(sp.unk_id())
